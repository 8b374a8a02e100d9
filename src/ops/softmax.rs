//! Softmax over the last dimension, with its backward (candle-nn's fused softmax has none), and
//! attention's softmax of scaled, masked scores as one pass each way on the CPU.

#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, D};

#[cfg(feature = "cuda")]
use super::cuda;
use super::math::exp;
use super::{cpu_f32, fused};

/// Softmax over the last dimension.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if fused(xs) {
        xs.contiguous()?.apply_op1(SoftmaxLastDim)
    } else {
        softmax_last_dim_composed(xs)
    }
}

/// Softmax from primitives (exp, sum, div), the reference for the fused kernel.
pub fn softmax_last_dim_composed(xs: &Tensor) -> Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let exp = xs.broadcast_sub(&max)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

struct SoftmaxLastDim;

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "kdmcse-softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = cpu_f32(storage, layout, self.name())?;
        let dim = layout.dims()[layout.dims().len() - 1];
        // SAFETY: each piece is one row of the last dimension, written whole below.
        let dst = unsafe {
            super::written_in_pieces(
                src.len(),
                dim,
                #[inline(always)]
                |row: usize, dst: &mut [std::mem::MaybeUninit<f32>]| {
                    let src = &src[row * dim..][..dim];
                    let max = src.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    for (d, s) in dst.iter_mut().zip(src) {
                        d.write(exp(s - max));
                    }
                    // SAFETY: the loop above wrote each of the row's `dim` elements.
                    let dst = dst.assume_init_mut();
                    let inv = 1.0 / dst.iter().sum::<f32>();
                    dst.iter_mut().for_each(|d| *d *= inv);
                },
            )
        };
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dim = layout.dims()[layout.dims().len() - 1];
        let n = layout.shape().elem_count();
        let x = cuda::input(storage, layout, self.name())?;
        let mut y = unsafe { storage.device.alloc::<f32>(n)? };
        let (func, rows, dim32) = (
            crate::kernels::Kernel::load(&storage.device, crate::kernels::OPS, "softmax_last_dim")?,
            (n / dim) as u32,
            dim as u32,
        );
        let mut args = func.args();
        args.arg(&x).arg(&mut y).arg(&rows).arg(&dim32);
        // SAFETY: the arguments follow the kernel's signature in ops.cu; buffers hold its elements.
        unsafe { func.launch(args, cuda::rows(n / dim, dim))? };
        Ok((cuda::output(y, &storage.device), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(softmax_last_dim_backward(res, grad_res)?))
    }
}

/// The softmax backward from its output `probs` and the output's gradient:
/// `probs * (grad - sum(grad * probs))` per row.
fn softmax_last_dim_backward(probs: &Tensor, grad: &Tensor) -> Result<Tensor> {
    attention_softmax_backward(probs, grad, 1.0)
}

/// The gradient of [`attention_softmax`]'s scores from its output and the output's gradient:
/// `scale *` the softmax backward. One pass per row on the CPU; composed elsewhere.
pub fn attention_softmax_backward(probs: &Tensor, grad: &Tensor, scale: f64) -> Result<Tensor> {
    if fused(probs) && probs.device().is_cpu() && grad.dtype() == probs.dtype() {
        probs.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBackward { scale: scale as f32 })
    } else {
        let dot = (grad * probs)?.sum_keepdim(D::Minus1)?;
        probs.mul(&grad.broadcast_sub(&dot)?)? * scale
    }
}

/// Attention probabilities: `softmax(scores * scale + mask_bias)` over keys, with `scores`
/// `[batch, heads, queries, keys]` and the additive key mask `mask_bias` `[batch, 1, 1, keys]`
/// (no gradient).
pub fn attention_softmax(scores: &Tensor, scale: f64, mask_bias: &Tensor) -> Result<Tensor> {
    if fused(scores) && scores.device().is_cpu() && mask_bias.dtype() == scores.dtype() {
        scores.contiguous()?.apply_op2(&mask_bias.contiguous()?, AttentionSoftmax { scale })
    } else {
        softmax_last_dim(&super::add_constant(&(scores * scale)?, mask_bias)?)
    }
}

struct AttentionSoftmax {
    scale: f64,
}

impl CustomOp2 for AttentionSoftmax {
    fn name(&self) -> &'static str {
        "kdmcse-attention-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (scores, mask) = (cpu_f32(s1, l1, self.name())?, cpu_f32(s2, l2, self.name())?);
        let dims = l1.dims();
        let keys = dims[dims.len() - 1];
        if dims.len() != 4 || l2.dims() != [dims[0], 1, 1, keys] {
            candle_core::bail!("{}: scores {dims:?} with mask {:?}", self.name(), l2.dims());
        }
        let rows_per_example = dims[1] * dims[2];
        let scale = self.scale as f32;
        // SAFETY: each piece is one row of keys, written whole below.
        let dst = unsafe {
            super::written_in_pieces(
                scores.len(),
                keys,
                #[inline(always)]
                |row: usize, dst: &mut [std::mem::MaybeUninit<f32>]| {
                    let src = &scores[row * keys..][..keys];
                    let mask = &mask[(row / rows_per_example) * keys..][..keys];
                    let mut max = f32::NEG_INFINITY;
                    for ((d, s), m) in dst.iter_mut().zip(src).zip(mask) {
                        max = max.max(*d.write(s * scale + m));
                    }
                    // SAFETY: the loop above wrote each of the row's `keys` elements.
                    let dst = dst.assume_init_mut();
                    let mut sum = 0f32;
                    for d in dst.iter_mut() {
                        *d = exp(*d - max);
                        sum += *d;
                    }
                    let inv = 1.0 / sum;
                    dst.iter_mut().for_each(|d| *d *= inv);
                },
            )
        };
        Ok((CpuStorage::F32(dst), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _scores: &Tensor,
        _mask: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(attention_softmax_backward(res, grad, self.scale)?), None))
    }
}

struct SoftmaxBackward {
    scale: f32,
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "kdmcse-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (ys, gs) = (cpu_f32(s1, l1, self.name())?, cpu_f32(s2, l2, self.name())?);
        let dim = l1.dims()[l1.dims().len() - 1];
        if ys.len() != gs.len() {
            candle_core::bail!("{}: {} outputs, {} gradients", self.name(), ys.len(), gs.len());
        }
        // SAFETY: each piece is one row of the last dimension, written whole below.
        let dx = unsafe {
            super::written_in_pieces(
                ys.len(),
                dim,
                #[inline(always)]
                |row: usize, dx: &mut [std::mem::MaybeUninit<f32>]| {
                    let (ys, gs) = (&ys[row * dim..][..dim], &gs[row * dim..][..dim]);
                    let dot: f32 = ys.iter().zip(gs).map(|(y, g)| y * g).sum();
                    for ((d, y), g) in dx.iter_mut().zip(ys).zip(gs) {
                        d.write(self.scale * (y * (g - dot)));
                    }
                },
            )
        };
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::max_diff;
    use super::*;
    use candle_core::{Device, Var};

    /// The one-pass attention softmax and its backward against the composed ops, padding keys
    /// masked in the second example.
    #[test]
    fn attention_softmax_matches_composed() {
        let device = Device::Cpu;
        let scores = Var::from_tensor(&Tensor::randn(0f32, 3.0, (2, 3, 4, 5), &device).unwrap()).unwrap();
        let mask = Tensor::new(&[0f32, 0., 0., 0., 0., 0., 0., 0., -1e9, -1e9], &device).unwrap();
        let mask = mask.reshape((2, 1, 1, 5)).unwrap();
        let fused = attention_softmax(&scores, 0.3, &mask).unwrap();
        let composed =
            softmax_last_dim_composed(&(scores.as_tensor() * 0.3).unwrap().broadcast_add(&mask).unwrap())
                .unwrap();
        assert!(max_diff(&fused, &composed) < 1e-6);
        let masked = fused.get(1).unwrap().narrow(2, 3, 2).unwrap();
        assert_eq!(masked.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        let probe = Tensor::randn(0f32, 1.0, (2, 3, 4, 5), &device).unwrap();
        let g_fused = (fused * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let g_composed = (composed * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(g_fused.get(&scores).unwrap(), g_composed.get(&scores).unwrap()) < 1e-5);
    }
}
