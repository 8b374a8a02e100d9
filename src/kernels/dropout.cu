// Dropout masks on the GPU: element for element the function `mask_values` in model/dropout.rs
// computes on the CPU (same hash of row key, site and element coordinates), so that a run's
// masks do not depend on the device either. Compiled at run time with NVRTC.
typedef unsigned long long u64;

// splitmix64's finaliser (dropout.rs `mix`).
__device__ __forceinline__ u64 mix(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

// The mask of a [rows, d0, d1, d2] tensor, one key and coordinate origin per row (a row that is
// a slice of a larger one, such as a packed token of a sentence, starts at that slice's
// coordinates; model/dropout.rs). `kept` is the bit pattern of the
// inverted-dropout scale in the output's dtype, so one kernel per element width serves every
// float dtype of that width.
#define DROPOUT_MASK(NAME, T)                                                                     \
    extern "C" __global__ void NAME(const u64 *keys, const u64 *origins, u64 site,                \
                                    unsigned int rows,                                            \
                                    unsigned int d0, unsigned int d1, unsigned int d2,            \
                                    u64 threshold, T kept, T *out) {                              \
        const u64 per_row = (u64)d0 * d1 * d2;                                                    \
        const u64 n = per_row * rows;                                                             \
        const u64 site_mix = mix(site);                                                           \
        for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n;                           \
             i += (u64)gridDim.x * blockDim.x) {                                                  \
            const u64 row = i / per_row, rem = i % per_row;                                       \
            const u64 c = rem % d2, b = (rem / d2) % d1, a = rem / ((u64)d1 * d2);                \
            const u64 row_key = mix(keys[row] ^ site_mix);                                        \
            const u64 coords = origins[row] + ((a << 40) | (b << 20) | c);                        \
            const u64 draw = mix(row_key + coords * 0x9E3779B97F4A7C15ULL) >> 40;                 \
            out[i] = draw >= threshold ? kept : (T)0;                                             \
        }                                                                                         \
    }

DROPOUT_MASK(dropout_mask_16, unsigned short)
DROPOUT_MASK(dropout_mask_32, unsigned int)
DROPOUT_MASK(dropout_mask_64, u64)
