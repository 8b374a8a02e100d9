//! LayerNorm over the last dimension, with a hand-written backward whose parameter gradients are
//! summed in fixed chunks of rows (the same order on CPU and GPU, whatever the thread count).

#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use super::cuda;
use super::{cpu_f32, fused, Isa};

/// LayerNorm over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`.
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if fused(xs) {
        // The kernels (CPU and CUDA) take the row length from the weight.
        let dim = xs.dim(D::Minus1)?;
        if weight.dims() != [dim] || bias.dims() != [dim] {
            candle_core::bail!(
                "layer-norm: weight {:?} / bias {:?} do not match input {:?}",
                weight.dims(),
                bias.dims(),
                xs.dims()
            );
        }
        xs.contiguous()?.apply_op3(weight, bias, LayerNorm { eps })
    } else {
        layer_norm_composed(xs, weight, bias, eps)
    }
}

/// LayerNorm from primitives, the reference for the fused kernel.
pub fn layer_norm_composed(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = xs.mean_keepdim(D::Minus1)?;
    let centered = xs.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(weight)?.broadcast_add(bias)
}

struct LayerNorm {
    eps: f64,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "kdmcse-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let xs = cpu_f32(s1, l1, self.name())?;
        let weight = cpu_f32(s2, l2, self.name())?;
        let bias = cpu_f32(s3, l3, self.name())?;
        let dim = weight.len();
        let eps = self.eps as f32;
        if dim == 0 || !xs.len().is_multiple_of(dim) || bias.len() != dim {
            candle_core::bail!("{}: rows of {} for weight {dim}, bias {}", self.name(), xs.len(), bias.len());
        }
        // SAFETY: each piece is one row of `dim` elements, and weight and bias have `dim` too.
        let dst = unsafe {
            super::written_in_pieces(
                xs.len(),
                dim,
                #[inline(always)]
                |row: usize, dst: &mut [std::mem::MaybeUninit<f32>]| {
                    let src = &xs[row * dim..][..dim];
                    let mean = src.iter().sum::<f32>() / dim as f32;
                    let var = src.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / dim as f32;
                    let rstd = 1.0 / (var + eps).sqrt();
                    for (((d, x), w), b) in dst.iter_mut().zip(src).zip(weight).zip(bias) {
                        d.write((x - mean) * rstd * w + b);
                    }
                },
            )
        };
        Ok((CpuStorage::F32(dst), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let name = self.name();
        let (x, w, b) = (cuda::input(s1, l1, name)?, cuda::input(s2, l2, name)?, cuda::input(s3, l3, name)?);
        let dim = w.len();
        let n = l1.shape().elem_count();
        let mut y = unsafe { s1.device.alloc::<f32>(n)? };
        let rows = n / dim;
        let (r, d, eps) = (rows as u32, dim as u32, self.eps as f32);
        let func = crate::kernels::Kernel::load(&s1.device, crate::kernels::OPS, "layer_norm")?;
        let mut args = func.args();
        args.arg(&x).arg(&w).arg(&b).arg(&mut y).arg(&r).arg(&d).arg(&eps);
        // SAFETY: the arguments follow the kernel's signature in ops.cu; buffers hold its elements.
        unsafe { func.launch(args, cuda::rows(rows, dim))? };
        Ok((cuda::output(y, &s1.device), l1.shape().clone()))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = layer_norm_backward(xs, weight, bias, grad, self.eps)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// The gradients of LayerNorm's input, weight and bias from the output's gradient.
pub fn layer_norm_backward(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    grad: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    if !(fused(xs) && grad.dtype() == xs.dtype()) {
        let f = |t: &[Tensor]| layer_norm_composed(&t[0], &t[1], &t[2], eps);
        let mut out = super::vjp(f, &[xs, weight, bias], grad)?.into_iter();
        let mut next = || out.next().expect("three gradients");
        return Ok((next(), next(), next()));
    }
    let dim = weight.dim(0)?;
    let (xs2, grad2) = (xs.reshape(((), dim))?.contiguous()?, grad.reshape(((), dim))?.contiguous()?);
    let rows = xs2.dim(0)?;
    let packed = xs2.apply_op3_no_bwd(&weight.contiguous()?, &grad2, &LayerNormBackward { eps })?;
    let dx = packed.narrow(0, 0, rows)?.reshape(xs.shape())?;
    Ok((dx, packed.get(rows)?, packed.get(rows + 1)?))
}

/// The LayerNorm backward of `(xs [rows, dim], weight, grad [rows, dim])`, packed as one
/// `[rows + 2, dim]` tensor: dx, then dweight, then dbias. With xhat = (x - mean) * rstd and
/// g = grad * weight: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),
/// dweight = sum(grad * xhat), dbias = sum(grad).
pub(super) struct LayerNormBackward {
    pub(super) eps: f64,
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "kdmcse-layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (xs, w, g) = (cpu_f32(s1, l1, name)?, cpu_f32(s2, l2, name)?, cpu_f32(s3, l3, name)?);
        let dim = w.len();
        let rows = xs.len() / dim;
        Ok((CpuStorage::F32(layer_norm_backward_cpu(xs, w, g, self.eps)), Shape::from((rows + 2, dim))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let name = self.name();
        let (x, w, g) = (cuda::input(s1, l1, name)?, cuda::input(s2, l2, name)?, cuda::input(s3, l3, name)?);
        let dim = w.len();
        let rows = x.len() / dim;
        let device = &s1.device;
        let eps = self.eps as f32;
        let mut stats = unsafe { device.alloc::<f32>(2 * rows)? };
        let mut out = unsafe { device.alloc::<f32>((rows + 2) * dim)? };
        let (r, d) = (rows as u32, dim as u32);
        let func = crate::kernels::Kernel::load(device, crate::kernels::OPS, "layer_norm_stats")?;
        let mut args = func.args();
        args.arg(&x).arg(&mut stats).arg(&r).arg(&d).arg(&eps);
        // SAFETY: the arguments follow the kernel's signature in ops.cu; buffers hold its elements.
        unsafe { func.launch(args, cuda::rows(rows, dim))? };
        {
            let (mut dx, mut params) = out.split_at_mut(rows * dim);
            let func =
                crate::kernels::Kernel::load(device, crate::kernels::OPS, "layer_norm_backward_input")?;
            let mut args = func.args();
            args.arg(&x).arg(&w).arg(&g).arg(&mut dx).arg(&r).arg(&d).arg(&eps);
            // SAFETY: the arguments follow the kernel's signature in ops.cu; buffers hold its elements.
            unsafe { func.launch(args, cuda::rows(rows, dim))? };
            let chunks = rows.div_ceil(LAYER_NORM_CHUNK_ROWS);
            let mut partial = unsafe { device.alloc::<f32>(2 * chunks * dim)? };
            let func =
                crate::kernels::Kernel::load(device, crate::kernels::OPS, "layer_norm_backward_params")?;
            let mut args = func.args();
            let chunk_rows = LAYER_NORM_CHUNK_ROWS as u32;
            args.arg(&x).arg(&g).arg(&stats).arg(&mut partial).arg(&r).arg(&d).arg(&chunk_rows);
            // SAFETY: the arguments follow the kernel's signature in ops.cu; buffers hold its elements.
            unsafe { func.launch(args, cuda::elementwise(chunks * dim))? };
            let (mut dw, mut db) = params.split_at_mut(dim);
            let func =
                crate::kernels::Kernel::load(device, crate::kernels::OPS, "layer_norm_backward_params_sum")?;
            let mut args = func.args();
            let c = chunks as u32;
            args.arg(&partial).arg(&mut dw).arg(&mut db).arg(&c).arg(&d);
            // SAFETY: the arguments follow the kernel's signature in ops.cu; buffers hold its elements.
            unsafe { func.launch(args, cuda::elementwise(dim))? };
        }
        Ok((cuda::output(out, device), Shape::from((rows + 2, dim))))
    }
}

/// Rows per partial sum of the LayerNorm parameter gradients (CPU and CUDA alike).
pub(super) const LAYER_NORM_CHUNK_ROWS: usize = 64;

/// The LayerNorm backward as one pass over rows (recomputing mean and rstd, which is cheaper than
/// storing them through candle's graph), packed as [`LayerNormBackward`] returns it.
fn layer_norm_backward_cpu(xs: &[f32], w_v: &[f32], g_v: &[f32], eps: f64) -> Vec<f32> {
    let dim = w_v.len();
    let rows = xs.len() / dim;
    let eps = eps as f32;
    let mut out = vec![0f32; (rows + 2) * dim];
    let (dx, params) = out.split_at_mut(rows * dim);
    // Per-chunk partial sums for dweight/dbias, reduced afterwards in chunk order. The chunk size
    // is fixed, not derived from the thread count, so results do not depend on it.
    let (chunk_rows, isa) = (LAYER_NORM_CHUNK_ROWS, Isa::selected());
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(chunk_rows * dim)
        .zip(xs.par_chunks(chunk_rows * dim))
        .zip(g_v.par_chunks(chunk_rows * dim))
        .map(|((dx, xs), gs)| {
            isa.run(
                #[inline(always)]
                || {
                    let mut dw = vec![0f32; dim];
                    let mut db = vec![0f32; dim];
                    let mut xhat = vec![0f32; dim];
                    for ((dx, x), g) in dx.chunks_mut(dim).zip(xs.chunks(dim)).zip(gs.chunks(dim)) {
                        let mean = x.iter().sum::<f32>() / dim as f32;
                        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / dim as f32;
                        let rstd = 1.0 / (var + eps).sqrt();
                        let (mut sum_g, mut sum_gx) = (0f32, 0f32);
                        for i in 0..dim {
                            xhat[i] = (x[i] - mean) * rstd;
                            let gw = g[i] * w_v[i];
                            sum_g += gw;
                            sum_gx += gw * xhat[i];
                            dw[i] += g[i] * xhat[i];
                            db[i] += g[i];
                        }
                        let (mean_g, mean_gx) = (sum_g / dim as f32, sum_gx / dim as f32);
                        for i in 0..dim {
                            dx[i] = rstd * (g[i] * w_v[i] - mean_g - xhat[i] * mean_gx);
                        }
                    }
                    (dw, db)
                },
            )
        })
        .collect();
    let (dw, db) = params.split_at_mut(dim);
    for (pw, pb) in partials {
        dw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
        db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
    }
    out
}
