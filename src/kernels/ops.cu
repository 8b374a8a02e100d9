// The training path's fused ops on the GPU (f32), twins of the CPU kernels in src/ops/:
// softmax over the last dimension, LayerNorm forward and backward, exact GELU forward and
// backward (with the same rational erf), L2 normalisation each way, and the objective's angular
// cross-entropy each way.
// Row kernels run one block per row (a grid-stride loop
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

// One InfoNCE term of the objective over its cosine matrix (ops/angular_cross_entropy.rs, the
// same arithmetic): `Params` there, field for field.
struct AngularTermParams {
    unsigned int rows, cols, row_offset, adaptive, filtered;
    float inv_temp, lo, hi, gate_below, base, cos_m, sin_m, threshold, masked_logit;
};

// e^x as ops/angular_cross_entropy.rs `exp` computes it (Cephes expf), 0 below -87.3.
__device__ float cephes_exp(float x) {
    const float clamped = fminf(fmaxf(x, -87.33654f), 88.72283f);
    const float k = (clamped * 1.44269504f + 12582912.0f) - 12582912.0f;
    const float r = (clamped - k * 0.6933594f) - k * -2.1219444e-4f;
    const float p = ((((1.9875691e-4f * r + 1.3981999e-3f) * r + 8.333452e-3f) * r + 4.1665796e-2f) * r +
                     1.6666665e-1f) * r + 0.5f;
    const float scale = __int_as_float(((int)k + 127) << 23);
    const float e = (p * (r * r) + r + 1.0f) * scale;
    return x < -87.33654f ? 0.0f : e;
}

// sin x and cos x as `sin_cos` there (Cephes sinf and cosf).
__device__ void cephes_sin_cos(float x, float *sin_x, float *cos_x) {
    const float a = fabsf(x);
    const int j = ((int)(a * 1.27323954f) + 1) & ~1;
    const float y = (float)j;
    const float z = ((a - y * 0.78515625f) - y * 2.4187565e-4f) - y * 3.774895e-8f;
    const float zz = z * z;
    const float sin_z = ((-1.9515296e-4f * zz + 8.332161e-3f) * zz - 1.6666655e-1f) * zz * z + z;
    const float cos_z = ((2.4433157e-5f * zz - 1.3887316e-3f) * zz + 4.1666646e-2f) * zz * zz - 0.5f * zz + 1.0f;
    float s = (j & 2) ? cos_z : sin_z, c = (j & 2) ? sin_z : cos_z;
    if (j & 4) s = -s;
    if ((j + 2) & 4) c = -c;
    *sin_x = x < 0.0f ? -s : s;
    *cos_x = c;
}

// The logit of column j of `row`, and its derivative in the cosine into `slope`.
__device__ float angular_logit(const float *cos, const float *similarity, const float *scores,
                               const AngularTermParams &p, unsigned int row, unsigned int j,
                               float *slope) {
    const size_t at = (size_t)row * p.cols + j;
    const bool positive = j == p.row_offset + row;
    float c = cos[at];
    float d = (c >= p.lo && c <= p.hi) ? p.inv_temp : 0.0f;
    c = fminf(fmaxf(c, p.lo), p.hi);
    float logit = c;
    if (!positive && c < p.gate_below) {
        float cos_m = p.cos_m, sin_m = p.sin_m;
        if (p.adaptive) cephes_sin_cos((1.0f - similarity[at]) * p.base, &sin_m, &cos_m);
        const float sin_theta = sqrtf(1.0f - c * c);
        logit = c + (c * cos_m + sin_theta * sin_m - c);
        d *= cos_m - c / sin_theta * sin_m;
    }
    logit *= p.inv_temp;
    if (p.filtered && !positive && scores[at] > p.threshold) logit += p.masked_logit;
    *slope = d;
    return logit;
}

// Per row: the loss, the negatives the filter removed, the largest logit and the sum of
// exp(logit - max) (4 floats a row). Absent matrices may be any buffer: the flags say they are
// not read.
extern "C" __global__ void angular_cross_entropy(const float *cos, const float *similarity,
                                                 const float *scores, float *out,
                                                 AngularTermParams p) {
    __shared__ float shared[MAX_BLOCK];
    for (unsigned int row = blockIdx.x; row < p.rows; row += gridDim.x) {
        float max = -3.402823466e+38f, removed = 0.0f, target = 0.0f, slope;
        for (unsigned int j = threadIdx.x; j < p.cols; j += blockDim.x) {
            const float logit = angular_logit(cos, similarity, scores, p, row, j, &slope);
            max = fmaxf(max, logit);
            if (j == p.row_offset + row) {
                target = logit;
            } else if (p.filtered && scores[(size_t)row * p.cols + j] > p.threshold) {
                removed += 1.0f;
            }
        }
        max = block_reduce(max, shared, true);
        removed = block_reduce(removed, shared, false);
        target = block_reduce(target, shared, false); // one thread holds it, the others 0
        float sum = 0.0f;
        for (unsigned int j = threadIdx.x; j < p.cols; j += blockDim.x) {
            sum += cephes_exp(angular_logit(cos, similarity, scores, p, row, j, &slope) - max);
        }
        sum = block_reduce(sum, shared, false);
        if (threadIdx.x == 0) {
            float *o = out + (size_t)row * 4;
            o[0] = -((target - max) - logf(sum));
            o[1] = removed;
            o[2] = max;
            o[3] = sum;
        }
    }
}

// d loss / d cos from the forward's rows (`forward`) and their gradient (`grad`, the loss
// column's counts).
extern "C" __global__ void angular_cross_entropy_backward(const float *cos, const float *similarity,
                                                          const float *scores, const float *forward,
                                                          const float *grad, float *dcos,
                                                          AngularTermParams p) {
    for (unsigned int row = blockIdx.x; row < p.rows; row += gridDim.x) {
        const float g = grad[(size_t)row * 4], max = forward[(size_t)row * 4 + 2];
        const float inv_sum = 1.0f / forward[(size_t)row * 4 + 3];
        for (unsigned int j = threadIdx.x; j < p.cols; j += blockDim.x) {
            float slope;
            const float logit = angular_logit(cos, similarity, scores, p, row, j, &slope);
            const float prob = cephes_exp(logit - max) * inv_sum;
            const float target = j == p.row_offset + row ? 1.0f : 0.0f;
            dcos[(size_t)row * p.cols + j] = g * (prob - target) * slope;
        }
    }
}

// Rows divided by their L2 norm, clamped at 1e-12 (ops/l2_normalize.rs).
extern "C" __global__ void l2_normalize(const float *x, float *y, unsigned int rows,
                                        unsigned int dim) {
    __shared__ float shared[MAX_BLOCK];
    for (unsigned int row = blockIdx.x; row < rows; row += gridDim.x) {
        const float *src = x + (size_t)row * dim;
        float sq = 0.0f;
        for (unsigned int i = threadIdx.x; i < dim; i += blockDim.x) sq += src[i] * src[i];
        const float n = fmaxf(sqrtf(block_reduce(sq, shared, false)), 1e-12f);
        for (unsigned int i = threadIdx.x; i < dim; i += blockDim.x) y[(size_t)row * dim + i] = src[i] / n;
    }
}

// dx = (g - y (g . y)) / |x| per row; g / 1e-12 where the norm was clamped.
extern "C" __global__ void l2_normalize_backward(const float *x, const float *grad, float *dx,
                                                 unsigned int rows, unsigned int dim) {
    __shared__ float shared[MAX_BLOCK];
    for (unsigned int row = blockIdx.x; row < rows; row += gridDim.x) {
        const float *src = x + (size_t)row * dim, *g = grad + (size_t)row * dim;
        float sq = 0.0f;
        for (unsigned int i = threadIdx.x; i < dim; i += blockDim.x) sq += src[i] * src[i];
        const float raw = sqrtf(block_reduce(sq, shared, false)), n = fmaxf(raw, 1e-12f);
        float dot = 0.0f;
        for (unsigned int i = threadIdx.x; i < dim; i += blockDim.x) dot += g[i] * (src[i] / n);
        dot = block_reduce(dot, shared, false);
        if (raw < 1e-12f) dot = 0.0f;
        for (unsigned int i = threadIdx.x; i < dim; i += blockDim.x) {
            dx[(size_t)row * dim + i] = (g[i] - src[i] / n * dot) / n;
        }
    }
}
