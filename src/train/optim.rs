//! AdamW (decoupled weight decay, per-parameter bias correction, as `torch.optim.AdamW`), the
//! linear learning-rate schedule with warm-up, and global gradient-norm clipping.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};

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
    m: Tensor,
    v: Tensor,
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
                Ok(Slot { m: var.zeros_like()?, v: var.zeros_like()?, steps: 0, decay, name, var })
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
            slot.m = ((&slot.m * b1)? + (g * (1.0 - b1))?)?;
            slot.v = ((&slot.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
            let denom = ((&slot.v / bc2)?.sqrt()? + self.config.eps)?;
            let update = ((&slot.m / denom)? * (lr / bc1))?;
            let mut param = slot.var.as_tensor().detach();
            if slot.decay && self.config.weight_decay > 0.0 {
                param = (&param * (1.0 - lr * self.config.weight_decay))?;
            }
            slot.var.set(&(param - update)?)?;
        }
        Ok(())
    }

    /// Moments and step counts as named tensors (`m.NAME`, `v.NAME`, `steps.NAME`).
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for s in &self.slots {
            out.insert(format!("m.{}", s.name), s.m.clone());
            out.insert(format!("v.{}", s.name), s.v.clone());
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
            s.m = m.to_device(s.var.device())?.to_dtype(s.var.dtype())?;
            s.v = v.to_device(s.var.device())?.to_dtype(s.var.dtype())?;
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

/// The global L2 norm of all gradients.
pub fn global_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let mut sum = 0.0;
    for g in grads.iter().flatten() {
        sum += g.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    }
    Ok(sum.sqrt())
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
    #[test]
    fn adamw_matches_the_torch_update() {
        let var = Var::new(&[1f64, -2.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(
            vec![("w".into(), var.clone())],
            AdamWConfig { betas: [0.9, 0.999], eps: 1e-8, weight_decay: 0.01 },
        )
        .unwrap();
        let mut p = [1f64, -2.0];
        let (mut m, mut v) = ([0f64; 2], [0f64; 2]);
        for (t, g) in [[0.5, 0.25], [-1.0, 2.0]].iter().enumerate() {
            let grad = Tensor::new(&g[..], &Device::Cpu).unwrap();
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
        let ours = var.as_tensor().to_vec1::<f64>().unwrap();
        for i in 0..2 {
            assert!((ours[i] - p[i]).abs() < 1e-12, "{ours:?} vs {p:?}");
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
