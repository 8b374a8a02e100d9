//! AdamW (decoupled weight decay, per-parameter bias correction) in the formula of
//! `torch.optim.AdamW` or of `transformers.AdamW` (4.x), the linear learning-rate schedule with
//! warm-up, and global gradient-norm clipping.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};

use crate::config::Optimizer;
use crate::ops::{AdamUpdate, Lerp};

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
    pub formula: Optimizer,
    /// A parameter without a gradient in a step (after its first) is updated as if it were zero.
    pub update_idle: bool,
}

impl AdamWConfig {
    /// The parameter update at a parameter's `t`-th step with learning rate `lr`.
    fn update(&self, t: i32, lr: f64, decay: bool) -> AdamUpdate {
        let [b1, b2] = self.betas;
        let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        let decayed = if decay { 1.0 - lr * self.weight_decay } else { 1.0 };
        match self.formula {
            // p = p (1 - lr wd) - lr / bc1 * m / (sqrt(v / bc2) + eps)
            Optimizer::Adamw => AdamUpdate {
                step_size: lr / bc1,
                bias_correction2: bc2,
                eps: self.eps,
                decay_before: decayed,
                decay_after: 1.0,
            },
            // p = (p - lr sqrt(bc2) / bc1 * m / (sqrt(v) + eps)) (1 - lr wd)
            Optimizer::TransformersAdamw => AdamUpdate {
                step_size: lr * bc2.sqrt() / bc1,
                bias_correction2: 1.0,
                eps: self.eps,
                decay_before: 1.0,
                decay_after: decayed,
            },
        }
    }
}

/// One parameter with its moments and its own step count (a parameter that got no gradient in a
/// step, like the grounding heads on text batches, is not updated and does not count the step,
/// unless `update_idle` says so and it has had a gradient before).
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

    /// Updates every parameter that has a gradient (`grads` in [`Self::params`] order), and with
    /// `update_idle` every other one that has had one before.
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        let [b1, b2] = self.config.betas;
        for (slot, grad) in self.slots.iter_mut().zip(grads) {
            let g = match grad {
                Some(g) => g.clone(),
                None if self.config.update_idle && slot.steps > 0 => slot.var.zeros_like()?,
                None => continue,
            };
            slot.steps += 1;
            let update = self.config.update(slot.steps as i32, lr, slot.decay);
            let device = slot.var.device();
            let fused = (device.is_cpu() || device.is_cuda()) && slot.var.dtype() == DType::F32;
            if fused {
                // Three passes over memory, no temporaries.
                let g = g.contiguous()?;
                slot.m.as_tensor().inplace_op2(&g, &Lerp { keep: b1, square: false })?;
                slot.v.as_tensor().inplace_op2(&g, &Lerp { keep: b2, square: true })?;
                slot.var.as_tensor().inplace_op3(slot.m.as_tensor(), slot.v.as_tensor(), &update)?;
            } else {
                slot.m.set(&((slot.m.as_tensor() * b1)? + (&g * (1.0 - b1))?)?)?;
                slot.v.set(&((slot.v.as_tensor() * b2)? + (g.sqr()? * (1.0 - b2))?)?)?;
                let denom = ((slot.v.as_tensor() / update.bias_correction2)?.sqrt()? + update.eps)?;
                let step = ((slot.m.as_tensor() / denom)? * update.step_size)?;
                let param = (slot.var.as_tensor().detach() * update.decay_before)?;
                slot.var.set(&((param - step)? * update.decay_after)?)?;
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

/// Linear warm-up from 0 to 1 over `warmup` steps, then linear decay to 0 at `total` (the
/// schedule of `transformers.get_linear_schedule_with_warmup`).
pub fn linear_schedule(step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    ((total.saturating_sub(step)) as f64 / total.saturating_sub(warmup).max(1) as f64).max(0.0)
}

/// The elementwise sum of two gradient lists (in the optimiser's order); a parameter without a
/// gradient in one keeps the other's.
pub fn add_grads(a: Vec<Option<Tensor>>, b: Vec<Option<Tensor>>) -> Result<Vec<Option<Tensor>>> {
    a.into_iter()
        .zip(b)
        .map(|pair| match pair {
            (Some(a), Some(b)) => Ok(Some((a + b)?)),
            (a, b) => Ok(a.or(b)),
        })
        .collect()
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
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], torch_config(Optimizer::Adamw)).unwrap();
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
    fn torch_config(formula: Optimizer) -> AdamWConfig {
        AdamWConfig { betas: [0.9, 0.999], eps: 1e-8, weight_decay: 0.01, formula, update_idle: false }
    }

    /// Three steps of `transformers.AdamW` (4.8.2's `optimization.py`: exp_avg and exp_avg_sq
    /// updated, denom = sqrt(exp_avg_sq) + eps, step_size = lr * sqrt(1 - b2^t) / (1 - b1^t),
    /// p -= step_size * exp_avg / denom, then p -= lr * wd * p) with eps 1e-6 and weight decay 0.1
    /// on fixed gradients, on both paths.
    #[test]
    fn transformers_adamw_matches_its_formula() {
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-6)] {
            let var = Var::from_tensor(
                &Tensor::new(&[0.5f64, -1.5, 2.0], &Device::Cpu).unwrap().to_dtype(dtype).unwrap(),
            )
            .unwrap();
            let config =
                AdamWConfig { eps: 1e-6, weight_decay: 0.1, ..torch_config(Optimizer::TransformersAdamw) };
            let mut opt = AdamW::new(vec![("w".into(), var.clone())], config).unwrap();
            let (lr, (b1, b2), eps, wd) = (0.05, (0.9f64, 0.999f64), 1e-6, 0.1);
            let mut p = [0.5f64, -1.5, 2.0];
            let (mut m, mut v) = ([0f64; 3], [0f64; 3]);
            for (t, g) in [[0.3, -0.2, 1.0], [-0.7, 0.1, 0.4], [0.05, 0.9, -1.2]].iter().enumerate() {
                let grad = Tensor::new(&g[..], &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                opt.step(&[Some(grad)], lr).unwrap();
                let t = t as i32 + 1;
                let step_size = lr * (1.0 - b2.powi(t)).sqrt() / (1.0 - b1.powi(t));
                for i in 0..3 {
                    m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                    v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                    p[i] -= step_size * m[i] / (v[i].sqrt() + eps);
                    p[i] -= lr * wd * p[i];
                }
            }
            let ours = var.as_tensor().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
            for i in 0..3 {
                assert!((ours[i] - p[i]).abs() < tol, "{dtype:?}: {ours:?} vs {p:?}");
            }
        }
    }

    /// A parameter without a gradient in a step: skipped (and its step not counted) by default;
    /// with `update_idle`, once it has had a gradient, updated as with a zero gradient (PyTorch 1.7's
    /// `zero_grad()` leaving zeros): its moments decay, its step count goes on, and it moves.
    #[test]
    fn idle_parameters_move_only_when_asked() {
        let run = |update_idle: bool| {
            let var = Var::from_tensor(&Tensor::new(&[1f64, -1.0], &Device::Cpu).unwrap()).unwrap();
            let config = AdamWConfig { weight_decay: 0.0, update_idle, ..torch_config(Optimizer::Adamw) };
            let mut opt = AdamW::new(vec![("head".into(), var.clone())], config).unwrap();
            let value = || var.as_tensor().to_vec1::<f64>().unwrap();
            // No gradient before the first paired step: never moved, whatever the setting.
            opt.step(&[None], 0.1).unwrap();
            assert_eq!(value(), [1.0, -1.0]);
            opt.step(&[Some(Tensor::new(&[0.5f64, 0.5], &Device::Cpu).unwrap())], 0.1).unwrap();
            let after_paired = value();
            opt.step(&[None], 0.1).unwrap();
            let steps = opt.state().unwrap()["steps.head"].to_vec1::<i64>().unwrap()[0];
            (after_paired, value(), steps)
        };
        let (paired, idle, steps) = run(false);
        assert_eq!((idle, steps), (paired, 1), "skipped");
        let (paired, idle, steps) = run(true);
        assert_eq!(steps, 2);
        // Step 2 with g = 0: m = 0.9 * 0.05, v = 0.999 * 0.00025, bias-corrected at t = 2.
        let (m, v) = (0.9 * 0.05, 0.999 * 0.00025);
        let expected = paired[0] - 0.1 / (1.0 - 0.81) * m / ((v / (1.0 - 0.999f64.powi(2))).sqrt() + 1e-8);
        assert!((idle[0] - expected).abs() < 1e-12, "{idle:?} vs {expected}");
    }

    /// Clipping scales every gradient by max_norm / norm when the global norm is above it (as
    /// `torch.nn.utils.clip_grad_norm_`), leaves it otherwise, and reports the norm before.
    #[test]
    fn clipping_scales_to_the_global_norm() {
        let grads = || {
            vec![
                Some(Tensor::new(&[3f32, 0.0], &Device::Cpu).unwrap()),
                None,
                Some(Tensor::new(&[4f32], &Device::Cpu).unwrap()),
            ]
        };
        let values = |g: &[Option<Tensor>]| -> Vec<f32> {
            g.iter().flatten().flat_map(|t| t.to_vec1::<f32>().unwrap()).collect()
        };
        let mut clipped = grads();
        assert!((clip_global_norm(&mut clipped, 1.0).unwrap() - 5.0).abs() < 1e-12);
        let expected = [3.0 / (5.0 + 1e-6), 0.0, 4.0 / (5.0 + 1e-6)];
        for (a, b) in values(&clipped).iter().zip(expected) {
            assert!((*a as f64 - b).abs() < 1e-6, "{:?}", values(&clipped));
        }
        assert!(clipped[1].is_none());
        for max_norm in [10.0, 0.0] {
            let mut kept = grads();
            clip_global_norm(&mut kept, max_norm).unwrap();
            assert_eq!(values(&kept), [3.0, 0.0, 4.0], "max_norm {max_norm}");
        }
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
