//! AdamW (decoupled weight decay, per-parameter bias correction, as `torch.optim.AdamW`), the
//! linear learning-rate schedule with warm-up, and global gradient-norm clipping.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Tensor, Var};
use rayon::prelude::*;

use crate::model::ops::{cpu_f32, cpu_f32_mut};

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
}

/// One parameter with its moments and its own step count (a parameter that got no gradient in a
/// step, like the grounding heads on text batches, is not updated and does not count the step).
struct Slot {
    name: String,
    var: Var,
    /// First and second moments; `Var`s so the CPU path can update them in place.
    m: Var,
    v: Var,
    steps: u64,
    decay: bool,
}

pub struct AdamW {
    slots: Vec<Slot>,
    config: AdamWConfig,
}

impl AdamW {
    /// Parameters in a fixed (name) order. Biases and LayerNorm weights get no weight decay.
    pub fn new(mut params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let slots = params
            .into_iter()
            .map(|(name, var)| {
                let decay = !(name.ends_with("bias") || name.contains("LayerNorm"));
                let zeros = || Var::zeros(var.shape(), var.dtype(), var.device());
                Ok(Slot { m: zeros()?, v: zeros()?, steps: 0, decay, name, var })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { slots, config })
    }

    /// The parameters, in the optimiser's order.
    pub fn params(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.slots.iter().map(|s| (s.name.as_str(), &s.var))
    }

    /// Updates every parameter that has a gradient (`grads` in [`Self::params`] order).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        let [b1, b2] = self.config.betas;
        for (slot, grad) in self.slots.iter_mut().zip(grads) {
            let Some(g) = grad else { continue };
            slot.steps += 1;
            let t = slot.steps as i32;
            let decay = if slot.decay { 1.0 - lr * self.config.weight_decay } else { 1.0 };
            let update = AdamUpdate {
                step_size: lr / (1.0 - b1.powi(t)),
                bias_correction2: 1.0 - b2.powi(t),
                eps: self.config.eps,
                decay,
            };
            let device = slot.var.device();
            let fused = (device.is_cpu() || device.is_cuda()) && slot.var.dtype() == DType::F32;
            if fused {
                // Three passes over memory, no temporaries.
                let g = g.contiguous()?;
                slot.m.as_tensor().inplace_op2(&g, &Lerp { keep: b1, square: false })?;
                slot.v.as_tensor().inplace_op2(&g, &Lerp { keep: b2, square: true })?;
                slot.var.as_tensor().inplace_op3(slot.m.as_tensor(), slot.v.as_tensor(), &update)?;
            } else {
                slot.m.set(&((slot.m.as_tensor() * b1)? + (g * (1.0 - b1))?)?)?;
                slot.v.set(&((slot.v.as_tensor() * b2)? + (g.sqr()? * (1.0 - b2))?)?)?;
                let denom = ((slot.v.as_tensor() / update.bias_correction2)?.sqrt()? + update.eps)?;
                let step = ((slot.m.as_tensor() / denom)? * update.step_size)?;
                let param = (slot.var.as_tensor().detach() * update.decay)?;
                slot.var.set(&(param - step)?)?;
            }
        }
        Ok(())
    }

    /// Moments and step counts as named tensors (`m.NAME`, `v.NAME`, `steps.NAME`).
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for s in &self.slots {
            out.insert(format!("m.{}", s.name), s.m.as_tensor().clone());
            out.insert(format!("v.{}", s.name), s.v.as_tensor().clone());
            out.insert(format!("steps.{}", s.name), Tensor::new(&[s.steps as i64], s.m.device())?);
        }
        Ok(out)
    }

    /// Restores [`Self::state`]; every parameter must be present with its shape.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        for s in &mut self.slots {
            let get = |kind: &str| -> Result<&Tensor> {
                state
                    .get(&format!("{kind}.{}", s.name))
                    .with_context(|| format!("optimizer state has no {kind}.{}", s.name))
            };
            let (m, v) = (get("m")?, get("v")?);
            if m.dims() != s.var.dims() || v.dims() != s.var.dims() {
                bail!(
                    "optimizer state for {} has shape {:?}, the parameter {:?}",
                    s.name,
                    m.dims(),
                    s.var.dims()
                );
            }
            s.m.set(&m.to_device(s.var.device())?.to_dtype(s.var.dtype())?)?;
            s.v.set(&v.to_device(s.var.device())?.to_dtype(s.var.dtype())?)?;
            s.steps = get("steps")?.to_dtype(DType::I64)?.flatten_all()?.get(0)?.to_scalar::<i64>()? as u64;
        }
        Ok(())
    }
}

const CHUNK: usize = 1 << 14;

/// `x = keep * x + (1 - keep) * g` (or `g^2`), in place: a moment update.
struct Lerp {
    keep: f64,
    square: bool,
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
        let square = self.square;
        x.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).for_each(|(x, g)| {
            for (x, &g) in x.iter_mut().zip(g) {
                *x = keep * *x + take * if square { g * g } else { g };
            }
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
        let [rx, rg] = ranges([l1, l2], self.name())?;
        let n = rx.len() as u32;
        let mut x = s1.as_cuda_slice_mut::<f32>()?.slice_mut(rx);
        let g = s2.as_cuda_slice::<f32>()?.slice(rg);
        let (keep, take, square) = (self.keep as f32, (1.0 - self.keep) as f32, i32::from(self.square));
        let mut args = kernel.args();
        args.arg(&mut x).arg(&g).arg(&n).arg(&keep).arg(&take).arg(&square);
        // SAFETY: the arguments follow adamw.cu's adamw_moment; both ranges hold n elements.
        unsafe { kernel.launch(args, LaunchConfig::for_num_elems(n)) }
    }
}

#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc::driver::LaunchConfig;

/// The contiguous element range of each operand of an in-place op, all of one size.
#[cfg(feature = "cuda")]
fn ranges<const N: usize>(
    layouts: [&Layout; N],
    op: &str,
) -> candle_core::Result<[std::ops::Range<usize>; N]> {
    let mut out = std::array::from_fn(|_| 0..0);
    for (range, layout) in out.iter_mut().zip(layouts) {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg(format!("{op}: operands must be contiguous")))?;
        *range = start..end;
    }
    if out.iter().any(|r| r.len() != out[0].len()) {
        candle_core::bail!("{op}: operands of different sizes {out:?}");
    }
    Ok(out)
}

/// `p = decay * p - step_size * m / (sqrt(v / bias_correction2) + eps)`, in place.
#[derive(Debug, Clone, Copy)]
struct AdamUpdate {
    step_size: f64,
    bias_correction2: f64,
    eps: f64,
    decay: f64,
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
        let (step, bc2, eps, decay) =
            (self.step_size as f32, self.bias_correction2 as f32, self.eps as f32, self.decay as f32);
        p.par_chunks_mut(CHUNK).zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK))).for_each(|(p, (m, v))| {
            for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                *p = decay * *p - step * m / ((v / bc2).sqrt() + eps);
            }
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
        let [rp, rm, rv] = ranges([l1, l2, l3], self.name())?;
        let n = rp.len() as u32;
        let mut p = s1.as_cuda_slice_mut::<f32>()?.slice_mut(rp);
        let m = s2.as_cuda_slice::<f32>()?.slice(rm);
        let v = s3.as_cuda_slice::<f32>()?.slice(rv);
        let (step, bc2, eps, decay) =
            (self.step_size as f32, self.bias_correction2 as f32, self.eps as f32, self.decay as f32);
        let mut args = kernel.args();
        args.arg(&mut p).arg(&m).arg(&v).arg(&n).arg(&step).arg(&bc2).arg(&eps).arg(&decay);
        // SAFETY: the arguments follow adamw.cu's adamw_update; all ranges hold n elements.
        unsafe { kernel.launch(args, LaunchConfig::for_num_elems(n)) }
    }
}

/// Linear warm-up from 0 to 1 over `warmup` steps, then linear decay to 0 at `total` (the
/// schedule of `transformers.get_linear_schedule_with_warmup`).
pub fn linear_schedule(step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    ((total.saturating_sub(step)) as f64 / total.saturating_sub(warmup).max(1) as f64).max(0.0)
}

/// The global L2 norm of all gradients.
pub fn global_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    // Per-tensor sums stay on the device; one read at the end (a GPU waits once, not per tensor).
    let sums: Vec<Tensor> = grads
        .iter()
        .flatten()
        .map(|g| g.sqr()?.sum_all()?.to_dtype(DType::F64))
        .collect::<candle_core::Result<_>>()?;
    if sums.is_empty() {
        return Ok(0.0);
    }
    Ok(Tensor::stack(&sums, 0)?.sum_all()?.to_scalar::<f64>()?.sqrt())
}

/// Scales gradients so their global norm is at most `max_norm` (as `clip_grad_norm_`); returns
/// the norm before clipping.
pub fn clip_global_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    let coef = max_norm / (norm + 1e-6);
    if max_norm > 0.0 && coef < 1.0 {
        for g in grads.iter_mut().flatten() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two steps of torch.optim.AdamW(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    /// on p = [1, -2] with gradients [0.5, 0.25] then [-1, 2], worked by hand.
    /// Both paths: f64 runs the tensor-op path, f32 on CPU the fused in-place kernels.
    #[test]
    fn adamw_matches_the_torch_update() {
        adamw_case(DType::F64, 1e-12);
        adamw_case(DType::F32, 1e-6);
    }

    fn adamw_case(dtype: DType, tol: f64) {
        let var =
            Var::from_tensor(&Tensor::new(&[1f64, -2.0], &Device::Cpu).unwrap().to_dtype(dtype).unwrap())
                .unwrap();
        let mut opt = AdamW::new(
            vec![("w".into(), var.clone())],
            AdamWConfig { betas: [0.9, 0.999], eps: 1e-8, weight_decay: 0.01 },
        )
        .unwrap();
        let mut p = [1f64, -2.0];
        let (mut m, mut v) = ([0f64; 2], [0f64; 2]);
        for (t, g) in [[0.5, 0.25], [-1.0, 2.0]].iter().enumerate() {
            let grad = Tensor::new(&g[..], &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            opt.step(&[Some(grad)], 0.1).unwrap();
            for i in 0..2 {
                p[i] *= 1.0 - 0.1 * 0.01;
                m[i] = 0.9 * m[i] + 0.1 * g[i];
                v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
                let (mh, vh) =
                    (m[i] / (1.0 - 0.9f64.powi(t as i32 + 1)), v[i] / (1.0 - 0.999f64.powi(t as i32 + 1)));
                p[i] -= 0.1 * mh / (vh.sqrt() + 1e-8);
            }
        }
        let ours = var.as_tensor().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
        for i in 0..2 {
            assert!((ours[i] - p[i]).abs() < tol, "{dtype:?}: {ours:?} vs {p:?}");
        }
    }

    /// adamw.cu, compiled for the host, updates moments and parameters exactly as the CPU
    /// kernels do (the GPU may fuse multiply-adds: that is its only licence to differ).
    #[test]
    fn cuda_kernels_compute_the_cpu_update() {
        let dir = tempfile::tempdir().unwrap();
        let exe = crate::kernels::host::compile(
            dir.path(),
            crate::kernels::ADAMW,
            r#"static float arg(char *s) { unsigned u = strtoul(s, 0, 10); float f; memcpy(&f, &u, 4); return f; }
static void print(const std::vector<float> &xs) {
    for (float f : xs) { unsigned u; memcpy(&u, &f, 4); printf("%u\n", u); }
}
// argv: n, then p, m, v, g (n each), then keep1, take1, keep2, take2, step, bc2, eps, decay.
int main(int argc, char **argv) {
    unsigned n = atoi(argv[1]);
    std::vector<float> p(n), m(n), v(n), g(n);
    for (unsigned i = 0; i < n; i++) {
        p[i] = arg(argv[2 + i]); m[i] = arg(argv[2 + n + i]);
        v[i] = arg(argv[2 + 2 * n + i]); g[i] = arg(argv[2 + 3 * n + i]);
    }
    char **h = argv + 2 + 4 * n;
    adamw_moment(m.data(), g.data(), n, arg(h[0]), arg(h[1]), 0);
    adamw_moment(v.data(), g.data(), n, arg(h[2]), arg(h[3]), 1);
    adamw_update(p.data(), m.data(), v.data(), n, arg(h[4]), arg(h[5]), arg(h[6]), arg(h[7]));
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
            decay: 1.0 - 3e-5 * 0.01,
        };
        let consts = [
            0.9,
            0.1,
            0.999,
            1.0 - 0.999,
            update.step_size,
            update.bias_correction2,
            update.eps,
            update.decay,
        ];
        let out = std::process::Command::new(&exe)
            .arg(n.to_string())
            .args([&p, &m, &v, &g].into_iter().flatten().map(|x| x.to_bits().to_string()))
            .args(consts.map(|c| (c as f32).to_bits().to_string()))
            .output()
            .unwrap();
        let host: Vec<f32> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| f32::from_bits(l.parse().unwrap()))
            .collect();

        let cpu = |xs: &[f32]| Tensor::new(xs, &Device::Cpu).unwrap();
        let (pt, mt, vt, gt) = (cpu(&p), cpu(&m), cpu(&v), cpu(&g));
        mt.inplace_op2(&gt, &Lerp { keep: 0.9, square: false }).unwrap();
        vt.inplace_op2(&gt, &Lerp { keep: 0.999, square: true }).unwrap();
        pt.inplace_op3(&mt, &vt, &update).unwrap();
        let expected: Vec<f32> = [pt, mt, vt].iter().flat_map(|t| t.to_vec1::<f32>().unwrap()).collect();
        assert_eq!(host, expected);
    }

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        assert_eq!(linear_schedule(0, 10, 110), 0.0);
        assert_eq!(linear_schedule(5, 10, 110), 0.5);
        assert_eq!(linear_schedule(10, 10, 110), 1.0);
        assert_eq!(linear_schedule(60, 10, 110), 0.5);
        assert_eq!(linear_schedule(110, 10, 110), 0.0);
        assert_eq!(linear_schedule(0, 0, 300), 1.0);
    }
}
