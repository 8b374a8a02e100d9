// The training path's fused ops on the GPU (f32), twins of the CPU kernels in model/ops.rs:
// softmax over the last dimension, LayerNorm forward and backward, exact GELU forward and
// backward (with the same rational erf). Row kernels run one block per row (a grid-stride loop
// over rows) with a shared-memory tree reduction, so any power-of-two block size works.
// Compiled at run time with NVRTC.

#define MAX_BLOCK 1024

// The sum (or max) of v over the block; every thread gets it. `shared` holds blockDim.x floats.
__device__ float block_reduce(float v, float *shared, bool take_max) {
    const unsigned int t = threadIdx.x;
    shared[t] = v;
    __syncthreads();
    for (unsigned int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s) {
            shared[t] = take_max ? fmaxf(shared[t], shared[t + s]) : shared[t] + shared[t + s];
        }
        __syncthreads();
    }
    const float out = shared[0];
    __syncthreads();
    return out;
}

extern "C" __global__ void softmax_last_dim(const float *x, float *y, unsigned int rows,
                                            unsigned int dim) {
    __shared__ float shared[MAX_BLOCK];
    for (unsigned int row = blockIdx.x; row < rows; row += gridDim.x) {
        const float *src = x + (size_t)row * dim;
        float *dst = y + (size_t)row * dim;
        float max = -3.402823466e+38f; // -FLT_MAX (NVRTC has no math.h for INFINITY)
        for (unsigned int i = threadIdx.x; i < dim; i += blockDim.x) max = fmaxf(max, src[i]);
        max = block_reduce(max, shared, true);
        float sum = 0.0f;
        for (unsigned int i = threadIdx.x; i < dim; i += blockDim.x) {
            const float e = expf(src[i] - max);
            dst[i] = e;
            sum += e;
        }
        const float inv = 1.0f / block_reduce(sum, shared, false);
        for (unsigned int i = threadIdx.x; i < dim; i += blockDim.x) dst[i] *= inv;
    }
}

// Mean and 1/sqrt(var + eps) of one row.
__device__ void row_moments(const float *src, unsigned int dim, float eps, float *shared,
                            float *mean, float *rstd) {
    float sum = 0.0f;
    for (unsigned int i = threadIdx.x; i < dim; i += blockDim.x) sum += src[i];
    const float m = block_reduce(sum, shared, false) / dim;
    float sq = 0.0f;
    for (unsigned int i = threadIdx.x; i < dim; i += blockDim.x) sq += (src[i] - m) * (src[i] - m);
    const float var = block_reduce(sq, shared, false) / dim;
    *mean = m;
    *rstd = 1.0f / sqrtf(var + eps);
}

extern "C" __global__ void layer_norm(const float *x, const float *weight, const float *bias,
                                      float *y, unsigned int rows, unsigned int dim, float eps) {
    __shared__ float shared[MAX_BLOCK];
    for (unsigned int row = blockIdx.x; row < rows; row += gridDim.x) {
        const float *src = x + (size_t)row * dim;
        float *dst = y + (size_t)row * dim;
        float mean, rstd;
        row_moments(src, dim, eps, shared, &mean, &rstd);
        for (unsigned int i = threadIdx.x; i < dim; i += blockDim.x) {
            dst[i] = (src[i] - mean) * rstd * weight[i] + bias[i];
        }
    }
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = grad * weight, one row per block.
extern "C" __global__ void layer_norm_backward_input(const float *x, const float *weight,
                                                     const float *grad, float *dx,
                                                     unsigned int rows, unsigned int dim,
                                                     float eps) {
    __shared__ float shared[MAX_BLOCK];
    for (unsigned int row = blockIdx.x; row < rows; row += gridDim.x) {
        const float *src = x + (size_t)row * dim;
        const float *gr = grad + (size_t)row * dim;
        float mean, rstd;
        row_moments(src, dim, eps, shared, &mean, &rstd);
        float sum_g = 0.0f, sum_gx = 0.0f;
        for (unsigned int i = threadIdx.x; i < dim; i += blockDim.x) {
            const float g = gr[i] * weight[i];
            sum_g += g;
            sum_gx += g * (src[i] - mean) * rstd;
        }
        const float mean_g = block_reduce(sum_g, shared, false) / dim;
        const float mean_gx = block_reduce(sum_gx, shared, false) / dim;
        for (unsigned int i = threadIdx.x; i < dim; i += blockDim.x) {
            const float xhat = (src[i] - mean) * rstd;
            dx[(size_t)row * dim + i] = rstd * (gr[i] * weight[i] - mean_g - xhat * mean_gx);
        }
    }
}

// dweight = sum over rows of grad * xhat, dbias = sum of grad, in two deterministic stages like
// the CPU code: per chunk of `chunk_rows` rows (rows in order) into `partial` ([2, chunks, dim]),
// then the chunks in order. `stats` holds each row's mean and rstd (2 floats a row).
extern "C" __global__ void layer_norm_backward_params(const float *x, const float *grad,
                                                      const float *stats, float *partial,
                                                      unsigned int rows, unsigned int dim,
                                                      unsigned int chunk_rows) {
    const unsigned int chunks = (rows + chunk_rows - 1) / chunk_rows;
    const size_t n = (size_t)chunks * dim;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const unsigned int col = i % dim, chunk = i / dim;
        const unsigned int end = (chunk + 1) * chunk_rows < rows ? (chunk + 1) * chunk_rows : rows;
        float dw = 0.0f, db = 0.0f;
        for (unsigned int row = chunk * chunk_rows; row < end; row++) {
            const size_t at = (size_t)row * dim + col;
            dw += grad[at] * ((x[at] - stats[2 * row]) * stats[2 * row + 1]);
            db += grad[at];
        }
        partial[i] = dw;
        partial[n + i] = db;
    }
}

extern "C" __global__ void layer_norm_backward_params_sum(const float *partial, float *dweight,
                                                          float *dbias, unsigned int chunks,
                                                          unsigned int dim) {
    const size_t n = (size_t)chunks * dim;
    for (unsigned int col = blockIdx.x * blockDim.x + threadIdx.x; col < dim;
         col += gridDim.x * blockDim.x) {
        float dw = 0.0f, db = 0.0f;
        for (unsigned int c = 0; c < chunks; c++) {
            dw += partial[(size_t)c * dim + col];
            db += partial[n + (size_t)c * dim + col];
        }
        dweight[col] = dw;
        dbias[col] = db;
    }
}

// Each row's mean and rstd, for layer_norm_backward_params.
extern "C" __global__ void layer_norm_stats(const float *x, float *stats, unsigned int rows,
                                            unsigned int dim, float eps) {
    __shared__ float shared[MAX_BLOCK];
    for (unsigned int row = blockIdx.x; row < rows; row += gridDim.x) {
        float mean, rstd;
        row_moments(x + (size_t)row * dim, dim, eps, shared, &mean, &rstd);
        if (threadIdx.x == 0) {
            stats[2 * row] = mean;
            stats[2 * row + 1] = rstd;
        }
    }
}

// Eigen's generic_fast_erf_float, as model/ops.rs `fast_erf` (the same f32 constants and order).
__device__ float fast_erf(float x) {
    x = fminf(fmaxf(x, -4.0f), 4.0f);
    const float x2 = x * x;
    const float p = ((((((-2.7261423e-10f * x2 + 2.7706814e-8f) * x2 - 2.101024e-6f) * x2 -
                         5.6925064e-5f) * x2 - 7.3499063e-4f) * x2 - 2.9546003e-3f) * x2 -
                     1.6096033e-2f) * x;
    const float q = (((-1.4566072e-5f * x2 - 2.1337406e-4f) * x2 - 1.682827e-3f) * x2 -
                      7.3733295e-3f) * x2 - 1.426474e-2f;
    return p / q;
}

extern "C" __global__ void gelu_erf(const float *x, float *y, unsigned int n) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const float v = x[i];
        y[i] = 0.5f * v * (1.0f + fast_erf(v * 0.70710678118654752f));
    }
}

// d/dx x Phi(x) = Phi(x) + x phi(x), times the incoming gradient.
extern "C" __global__ void gelu_erf_backward(const float *x, const float *grad, float *dx,
                                             unsigned int n) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const float v = x[i];
        const float cdf = 0.5f * (1.0f + fast_erf(v * 0.70710678118654752f));
        // 1/sqrt(2 pi), computed as the CPU code does.
        const float inv_sqrt_2pi = 0.5f * 1.12837916709551257f * 0.70710678118654752f;
        const float pdf = inv_sqrt_2pi * expf(-0.5f * v * v);
        dx[i] = grad[i] * (cdf + v * pdf);
    }
}
