//! Softmax over the last dimension, with its backward (candle-nn's fused softmax has none).

#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use super::cuda;
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
        let mut dst = vec![0f32; src.len()];
        dst.par_chunks_mut(dim).zip(src.par_chunks(dim)).for_each(|(dst, src)| {
            let max = src.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (d, s) in dst.iter_mut().zip(src) {
                *d = (s - max).exp();
                sum += *d;
            }
            let inv = 1.0 / sum;
            dst.iter_mut().for_each(|d| *d *= inv);
        });
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
        // dx = y * (g - sum(g * y))
        let dot = (grad_res * res)?.sum_keepdim(D::Minus1)?;
        Ok(Some(res.mul(&grad_res.broadcast_sub(&dot)?)?))
    }
}
