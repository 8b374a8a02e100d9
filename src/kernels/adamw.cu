// AdamW's in-place updates on the GPU, the same arithmetic as the CPU kernels in
// train/optim.rs (f32, one thread per element). Compiled at run time with NVRTC.

// x = keep * x + take * (square ? g * g : g): a moment update.
extern "C" __global__ void adamw_moment(float *x, const float *g, unsigned int n, float keep,
                                        float take, int square) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const float gi = g[i];
        x[i] = keep * x[i] + take * (square ? gi * gi : gi);
    }
}

// p = after * (before * p - step * m / (sqrt(v / bc2) + eps)).
extern "C" __global__ void adamw_update(float *p, const float *m, const float *v, unsigned int n,
                                        float step, float bc2, float eps, float before, float after) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        p[i] = after * (before * p[i] - step * m[i] / (sqrtf(v[i] / bc2) + eps));
    }
}
