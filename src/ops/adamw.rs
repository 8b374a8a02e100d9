//! AdamW's in-place updates (moments, then parameters): three passes over memory and no
//! temporaries, on the CPU here and on CUDA with adamw.cu.

use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use super::cuda;
use super::{cpu_f32, cpu_f32_mut, Isa};

const CHUNK: usize = 1 << 14;

/// `x = keep * x + (1 - keep) * g` (or `g^2`), in place: a moment update.
pub(crate) struct Lerp {
    pub(crate) keep: f64,
    pub(crate) square: bool,
}

impl InplaceOp2 for Lerp {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (x, g) = (cpu_f32_mut(s1, l1, self.name())?, cpu_f32(s2, l2, self.name())?);
        let (keep, take) = (self.keep as f32, (1.0 - self.keep) as f32);
        let (square, isa) = (self.square, Isa::selected());
        x.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).for_each(|(x, g)| {
            isa.run(
                #[inline(always)]
                || {
                    for (x, &g) in x.iter_mut().zip(g) {
                        *x = keep * *x + take * if square { g * g } else { g };
                    }
                },
            )
        });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        let kernel = crate::kernels::Kernel::load(&s1.device, crate::kernels::ADAMW, "adamw_moment")?;
        let [rx, rg] = cuda::ranges([l1, l2], self.name())?;
        let n = rx.len() as u32;
        let mut x = s1.as_cuda_slice_mut::<f32>()?.slice_mut(rx);
        let g = s2.as_cuda_slice::<f32>()?.slice(rg);
        let (keep, take, square) = (self.keep as f32, (1.0 - self.keep) as f32, i32::from(self.square));
        let mut args = kernel.args();
        args.arg(&mut x).arg(&g).arg(&n).arg(&keep).arg(&take).arg(&square);
        // SAFETY: the arguments follow adamw.cu's adamw_moment; both ranges hold n elements.
        unsafe { kernel.launch(args, cuda::elementwise(n as usize)) }
    }
}

/// `p = decay_after * (decay_before * p - step_size * m / (sqrt(v / bias_correction2) + eps))`,
/// in place: PyTorch's AdamW decays before the step, transformers' after it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdamUpdate {
    pub(crate) step_size: f64,
    pub(crate) bias_correction2: f64,
    pub(crate) eps: f64,
    pub(crate) decay_before: f64,
    pub(crate) decay_after: f64,
}

impl AdamUpdate {
    /// The kernels' f32 constants: step size, bias correction 2, eps, decay before and after.
    fn constants(&self) -> [f32; 5] {
        [self.step_size, self.bias_correction2, self.eps, self.decay_before, self.decay_after]
            .map(|c| c as f32)
    }
}

impl InplaceOp3 for AdamUpdate {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let name = self.name();
        let (p, m, v) = (cpu_f32_mut(s1, l1, name)?, cpu_f32(s2, l2, name)?, cpu_f32(s3, l3, name)?);
        let [step, bc2, eps, before, after] = self.constants();
        let isa = Isa::selected();
        p.par_chunks_mut(CHUNK).zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK))).for_each(|(p, (m, v))| {
            isa.run(
                #[inline(always)]
                || {
                    for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                        *p = after * (before * *p - step * m / ((v / bc2).sqrt() + eps));
                    }
                },
            )
        });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        let kernel = crate::kernels::Kernel::load(&s1.device, crate::kernels::ADAMW, "adamw_update")?;
        let [rp, rm, rv] = cuda::ranges([l1, l2, l3], self.name())?;
        let n = rp.len() as u32;
        let mut p = s1.as_cuda_slice_mut::<f32>()?.slice_mut(rp);
        let m = s2.as_cuda_slice::<f32>()?.slice(rm);
        let v = s3.as_cuda_slice::<f32>()?.slice(rv);
        let [step, bc2, eps, before, after] = self.constants();
        let mut args = kernel.args();
        args.arg(&mut p).arg(&m).arg(&v).arg(&n).arg(&step).arg(&bc2).arg(&eps).arg(&before).arg(&after);
        // SAFETY: the arguments follow adamw.cu's adamw_update; all ranges hold n elements.
        unsafe { kernel.launch(args, cuda::elementwise(n as usize)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// adamw.cu, compiled for the host, updates moments and parameters exactly as the CPU
    /// kernels do (the GPU may fuse multiply-adds: that is its only licence to differ).
    #[test]
    fn cuda_kernels_compute_the_cpu_update() {
        let dir = tempfile::tempdir().unwrap();
        let exe = crate::kernels::host::compile(
            dir.path(),
            crate::kernels::ADAMW,
            r#"static float arg(char *s) { unsigned u = strtoul(s, 0, 10); float f; memcpy(&f, &u, 4); return f; }
// argv: n, then p, m, v, g (n each), then keep1, take1, keep2, take2, step, bc2, eps, decay
// before, decay after.
int main(int argc, char **argv) {
    unsigned n = atoi(argv[1]);
    std::vector<float> p(n), m(n), v(n), g(n);
    for (unsigned i = 0; i < n; i++) {
        p[i] = arg(argv[2 + i]); m[i] = arg(argv[2 + n + i]);
        v[i] = arg(argv[2 + 2 * n + i]); g[i] = arg(argv[2 + 3 * n + i]);
    }
    char **h = argv + 2 + 4 * n;
    float *pp = p.data(), *mp = m.data(), *vp = v.data(), *gp = g.data();
    unsigned grid = blocks_for(n, ELEMENTWISE_THREADS);
    launch(grid, ELEMENTWISE_THREADS, [&] { adamw_moment(mp, gp, n, arg(h[0]), arg(h[1]), 0); });
    launch(grid, ELEMENTWISE_THREADS, [&] { adamw_moment(vp, gp, n, arg(h[2]), arg(h[3]), 1); });
    launch(grid, ELEMENTWISE_THREADS,
           [&] { adamw_update(pp, mp, vp, n, arg(h[4]), arg(h[5]), arg(h[6]), arg(h[7]), arg(h[8])); });
    print(p); print(m); print(v);
}"#,
        );
        let n = 37;
        let values = |seed: f32, positive: bool| -> Vec<f32> {
            (0..n)
                .map(|i| (seed * (i as f32 + 1.0)).sin() * if positive { 1e-3 } else { 1.0 })
                .map(|x| if positive { x.abs() } else { x })
                .collect()
        };
        let (p, m, v, g) = (values(0.7, false), values(1.3, false), values(2.9, true), values(0.4, false));
        let update = AdamUpdate {
            step_size: 3e-5 / (1.0 - 0.9f64.powi(3)),
            bias_correction2: 1.0 - 0.999f64.powi(3),
            eps: 1e-8,
            decay_before: 1.0 - 3e-5 * 0.01,
            decay_after: 1.0 - 3e-5 * 0.02,
        };
        let consts = [
            0.9,
            0.1,
            0.999,
            1.0 - 0.999,
            update.step_size,
            update.bias_correction2,
            update.eps,
            update.decay_before,
            update.decay_after,
        ];
        let args: Vec<String> = std::iter::once(n.to_string())
            .chain([&p, &m, &v, &g].into_iter().flatten().map(|x| x.to_bits().to_string()))
            .chain(consts.map(|c| (c as f32).to_bits().to_string()))
            .collect();
        let host = crate::kernels::host::run(&exe, &args, &[]);

        let cpu = |xs: &[f32]| Tensor::new(xs, &Device::Cpu).unwrap();
        let (pt, mt, vt, gt) = (cpu(&p), cpu(&m), cpu(&v), cpu(&g));
        mt.inplace_op2(&gt, &Lerp { keep: 0.9, square: false }).unwrap();
        vt.inplace_op2(&gt, &Lerp { keep: 0.999, square: true }).unwrap();
        pt.inplace_op3(&mt, &vt, &update).unwrap();
        let expected: Vec<f32> = [pt, mt, vt].iter().flat_map(|t| t.to_vec1::<f32>().unwrap()).collect();
        assert_eq!(host, expected);
    }
}
