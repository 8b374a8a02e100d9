//! Differentiable fused ops for the training path.
//!
//! candle-nn's fused softmax and LayerNorm have no backward pass, so gradients silently stop at
//! them. These ops run one kernel forward and a hand-written backward, on the CPU (here) and on
//! CUDA (kernels/ops.cu, the same arithmetic); on other devices and dtypes they fall back to a
//! composition of primitives (which candle differentiates itself). The composed versions are
//! public so tests can check the fused kernels against them.

#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// Whether the fused kernels serve `xs`: f32 on the CPU or on CUDA.
fn fused(xs: &Tensor) -> bool {
    xs.dtype() == DType::F32 && (xs.device().is_cpu() || xs.device().is_cuda())
}

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

/// `xs + constant`, the constant broadcast to `xs`'s shape, with no gradient for the constant
/// (an attention mask).
pub fn add_constant(xs: &Tensor, constant: &Tensor) -> Result<Tensor> {
    xs.apply_op2(&constant.broadcast_as(xs.shape())?, WithConstant::Add)
}

/// `xs * constant`, the constant broadcast to `xs`'s shape, with no gradient for the constant
/// (a dropout mask).
pub fn mul_constant(xs: &Tensor, constant: &Tensor) -> Result<Tensor> {
    xs.apply_op2(&constant.broadcast_as(xs.shape())?, WithConstant::Mul)
}

/// A binary op whose second operand is a constant. candle's own binary ops compute, zero-fill
/// and accumulate a gradient for both operands, which for a mask is three wasted passes over
/// it per backward; here the backward only touches `xs`'s gradient. Forward: candle's kernels.
#[derive(Debug, Clone, Copy)]
enum WithConstant {
    Add,
    Mul,
}

impl WithConstant {
    fn apply<S: candle_core::backend::BackendStorage>(
        self,
        s1: &S,
        l1: &Layout,
        s2: &S,
        l2: &Layout,
    ) -> Result<(S, Shape)> {
        let out = match self {
            WithConstant::Add => s1.binary_impl::<candle_core::op::Add>(s2, l1, l2)?,
            WithConstant::Mul => s1.binary_impl::<candle_core::op::Mul>(s2, l1, l2)?,
        };
        Ok((out, l1.shape().clone()))
    }
}

impl CustomOp2 for WithConstant {
    fn name(&self) -> &'static str {
        match self {
            WithConstant::Add => "kdmcse-add-constant",
            WithConstant::Mul => "kdmcse-mul-constant",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.apply(s1, l1, s2, l2)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.apply(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        _xs: &Tensor,
        constant: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = match self {
            WithConstant::Add => grad.clone(),
            WithConstant::Mul => grad.mul(constant)?,
        };
        Ok((Some(dx), None))
    }
}

/// The contiguous f32 data of a CPU custom op's input.
pub(crate) fn cpu_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(data) => data,
        _ => candle_core::bail!("{op}: expected f32 input"),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// [`cpu_f32`] for the tensor an in-place op writes.
pub(crate) fn cpu_f32_mut<'a>(
    storage: &'a mut CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a mut [f32]> {
    let data = match storage {
        CpuStorage::F32(data) => data,
        _ => candle_core::bail!("{op}: expected f32 input"),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&mut data[start..end]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// The exact GELU, `x * Phi(x)` with `Phi` the standard normal CDF (BERT's `gelu`).
pub fn gelu_erf(xs: &Tensor) -> Result<Tensor> {
    if fused(xs) {
        xs.contiguous()?.apply_op1(GeluErf)
    } else {
        xs.gelu_erf()
    }
}

/// erf for f32 as a rational function of x (Eigen's `generic_fast_erf_float`): accurate to a few
/// ulp on [-4, 4], saturated beyond, and vectorisable, unlike libm's branchy `erff`.
#[inline]
fn fast_erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = ((((((-2.726_142_3e-10_f32 * x2 + 2.770_681_4e-8) * x2 - 2.101_024e-6) * x2 - 5.692_506_4e-5)
        * x2
        - 7.349_906_3e-4)
        * x2
        - 2.954_600_3e-3)
        * x2
        - 1.609_603_3e-2)
        * x;
    let q = (((-1.456_607_2e-5_f32 * x2 - 2.133_740_6e-4) * x2 - 1.682_827e-3) * x2 - 7.373_329_5e-3) * x2
        - 1.426_474e-2;
    p / q
}

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "kdmcse-gelu-erf"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = cpu_f32(storage, layout, self.name())?;
        let mut dst = vec![0f32; src.len()];
        dst.par_chunks_mut(4096).zip(src.par_chunks(4096)).for_each(|(dst, src)| {
            for (d, &x) in dst.iter_mut().zip(src) {
                *d = 0.5 * x * (1.0 + fast_erf(x * std::f32::consts::FRAC_1_SQRT_2));
            }
        });
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let n = layout.shape().elem_count();
        let x = cuda::input(storage, layout, self.name())?;
        let mut y = unsafe { storage.device.alloc::<f32>(n)? };
        let (func, n32) = (cuda::kernel(&storage.device, "gelu_erf")?, n as u32);
        let mut args = func.args();
        args.arg(&x).arg(&mut y).arg(&n32);
        // SAFETY: the arguments follow the kernel's signature in ops.cu; buffers hold its elements.
        unsafe { func.launch(args, cuda::elementwise(n))? };
        Ok((cuda::output(y, &storage.device), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.contiguous()?.apply_op2_no_bwd(&grad_res.contiguous()?, &GeluErfBackward)?))
    }
}

/// The GELU backward: `grad * d/dx x Phi(x)` from the input and the incoming gradient.
struct GeluErfBackward;

impl CustomOp2 for GeluErfBackward {
    fn name(&self) -> &'static str {
        "kdmcse-gelu-erf-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        // d/dx x Phi(x) = Phi(x) + x phi(x)
        let (xs, gs) = (cpu_f32(s1, l1, self.name())?, cpu_f32(s2, l2, self.name())?);
        let inv_sqrt_2pi = 0.5 * std::f32::consts::FRAC_2_SQRT_PI * std::f32::consts::FRAC_1_SQRT_2;
        let mut dx = vec![0f32; xs.len()];
        dx.par_chunks_mut(4096).zip(xs.par_chunks(4096).zip(gs.par_chunks(4096))).for_each(
            |(dx, (xs, gs))| {
                for ((d, &x), &g) in dx.iter_mut().zip(xs).zip(gs) {
                    let cdf = 0.5 * (1.0 + fast_erf(x * std::f32::consts::FRAC_1_SQRT_2));
                    let pdf = inv_sqrt_2pi * (-0.5 * x * x).exp();
                    *d = g * (cdf + x * pdf);
                }
            },
        );
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let n = l1.shape().elem_count();
        let (x, g) = (cuda::input(s1, l1, self.name())?, cuda::input(s2, l2, self.name())?);
        let mut dx = unsafe { s1.device.alloc::<f32>(n)? };
        let (func, n32) = (cuda::kernel(&s1.device, "gelu_erf_backward")?, n as u32);
        let mut args = func.args();
        args.arg(&x).arg(&g).arg(&mut dx).arg(&n32);
        // SAFETY: the arguments follow the kernel's signature in ops.cu; buffers hold its elements.
        unsafe { func.launch(args, cuda::elementwise(n))? };
        Ok((cuda::output(dx, &s1.device), l1.shape().clone()))
    }
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
        let (func, rows, dim32) =
            (cuda::kernel(&storage.device, "softmax_last_dim")?, (n / dim) as u32, dim as u32);
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
        let mut dst = vec![0f32; xs.len()];
        dst.par_chunks_mut(dim).zip(xs.par_chunks(dim)).for_each(|(dst, src)| {
            let mean = src.iter().sum::<f32>() / dim as f32;
            let var = src.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / dim as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            for (((d, x), w), b) in dst.iter_mut().zip(src).zip(weight).zip(bias) {
                *d = (x - mean) * rstd * w + b;
            }
        });
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
        let func = cuda::kernel(&s1.device, "layer_norm")?;
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
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dim = weight.dim(0)?;
        let (xs2, grad2) = (xs.reshape(((), dim))?.contiguous()?, grad.reshape(((), dim))?.contiguous()?);
        let rows = xs2.dim(0)?;
        let packed =
            xs2.apply_op3_no_bwd(&weight.contiguous()?, &grad2, &LayerNormBackward { eps: self.eps })?;
        let dx = packed.narrow(0, 0, rows)?.reshape(xs.shape())?;
        let (dw, db) = (packed.get(rows)?, packed.get(rows + 1)?);
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// The LayerNorm backward of `(xs [rows, dim], weight, grad [rows, dim])`, packed as one
/// `[rows + 2, dim]` tensor: dx, then dweight, then dbias. With xhat = (x - mean) * rstd and
/// g = grad * weight: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),
/// dweight = sum(grad * xhat), dbias = sum(grad).
struct LayerNormBackward {
    eps: f64,
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
        let func = cuda::kernel(device, "layer_norm_stats")?;
        let mut args = func.args();
        args.arg(&x).arg(&mut stats).arg(&r).arg(&d).arg(&eps);
        // SAFETY: the arguments follow the kernel's signature in ops.cu; buffers hold its elements.
        unsafe { func.launch(args, cuda::rows(rows, dim))? };
        {
            let (mut dx, mut params) = out.split_at_mut(rows * dim);
            let func = cuda::kernel(device, "layer_norm_backward_input")?;
            let mut args = func.args();
            args.arg(&x).arg(&w).arg(&g).arg(&mut dx).arg(&r).arg(&d).arg(&eps);
            // SAFETY: the arguments follow the kernel's signature in ops.cu; buffers hold its elements.
            unsafe { func.launch(args, cuda::rows(rows, dim))? };
            let chunks = rows.div_ceil(LAYER_NORM_CHUNK_ROWS);
            let mut partial = unsafe { device.alloc::<f32>(2 * chunks * dim)? };
            let func = cuda::kernel(device, "layer_norm_backward_params")?;
            let mut args = func.args();
            let chunk_rows = LAYER_NORM_CHUNK_ROWS as u32;
            args.arg(&x).arg(&g).arg(&stats).arg(&mut partial).arg(&r).arg(&d).arg(&chunk_rows);
            // SAFETY: the arguments follow the kernel's signature in ops.cu; buffers hold its elements.
            unsafe { func.launch(args, cuda::elementwise(chunks * dim))? };
            let (mut dw, mut db) = params.split_at_mut(dim);
            let func = cuda::kernel(device, "layer_norm_backward_params_sum")?;
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
const LAYER_NORM_CHUNK_ROWS: usize = 64;

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
    let chunk_rows = LAYER_NORM_CHUNK_ROWS;
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(chunk_rows * dim)
        .zip(xs.par_chunks(chunk_rows * dim))
        .zip(g_v.par_chunks(chunk_rows * dim))
        .map(|((dx, xs), gs)| {
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
        })
        .collect();
    let (dw, db) = params.split_at_mut(dim);
    for (pw, pb) in partials {
        dw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
        db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
    }
    out
}

/// Launch plumbing shared by the CUDA twins of the ops above.
#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig};
    use candle_core::cuda_backend::{CudaDevice, CudaStorage};
    use candle_core::{Layout, Result};

    /// The contiguous f32 data of an op's input.
    pub(super) fn input<'a>(
        storage: &'a CudaStorage,
        layout: &Layout,
        op: &str,
    ) -> Result<CudaView<'a, f32>> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input must be contiguous")))?;
        Ok(storage.as_cuda_slice::<f32>()?.slice(start..end))
    }

    pub(super) fn output(slice: CudaSlice<f32>, device: &CudaDevice) -> CudaStorage {
        CudaStorage::wrap_cuda_slice(slice, device.clone())
    }

    /// One thread per element.
    pub(super) fn elementwise(n: usize) -> LaunchConfig {
        LaunchConfig::for_num_elems(n as u32)
    }

    /// One block per row (grid-stride beyond 2^16 rows), threads striding over the row: a power
    /// of two between 32 and 256 (ops.cu's reductions need a power of two).
    pub(super) fn rows(rows: usize, dim: usize) -> LaunchConfig {
        let threads = dim.next_power_of_two().clamp(32, 256) as u32;
        LaunchConfig {
            grid_dim: (rows.clamp(1, 1 << 16) as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// `kernel` of ops.cu on `device`.
    pub(super) fn kernel(device: &CudaDevice, kernel: &str) -> Result<crate::kernels::Kernel> {
        crate::kernels::Kernel::load(device, crate::kernels::OPS, kernel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// The fused kernels and their backward agree with the composed ops candle differentiates.
    #[test]
    fn fused_ops_match_composed_forward_and_backward() {
        let device = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 3.0, (4, 5, 48), &device).unwrap() + 0.7).unwrap())
            .unwrap();
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.2, 48, &device).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.2, 48, &device).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (4, 5, 48), &device).unwrap();
        type Op<'a> = &'a dyn Fn(&Tensor) -> Result<Tensor>;
        let ln_fused: Op = &|x| layer_norm(x, &w, &b, 1e-12);
        let ln_composed: Op = &|x| layer_norm_composed(x, &w, &b, 1e-12);
        let sm_fused: Op = &|x| softmax_last_dim(x);
        let sm_composed: Op = &|x| softmax_last_dim_composed(x);
        let gelu_fused: Op = &|x| gelu_erf(x);
        let gelu_composed: Op = &|x| x.gelu_erf();
        for (name, fused, composed) in [
            ("layer_norm", ln_fused, ln_composed),
            ("softmax", sm_fused, sm_composed),
            ("gelu", gelu_fused, gelu_composed),
        ] {
            let (yf, yc) = (fused(x.as_tensor()).unwrap(), composed(x.as_tensor()).unwrap());
            assert!(max_diff(&yf, &yc) < 1e-5, "{name} forward");
            let gf = (yf * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (yc * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            for (var, what) in [(&x, "x"), (&w, "weight"), (&b, "bias")] {
                match (gf.get(var.as_tensor()), gc.get(var.as_tensor())) {
                    (Some(f), Some(c)) => {
                        assert!(max_diff(f, c) < 1e-4, "{name} d{what}: {}", max_diff(f, c))
                    }
                    (None, None) => {}
                    _ => panic!("{name} d{what}: gradient present in one version only"),
                }
            }
        }
    }
}

#[cfg(test)]
mod cuda_kernel_tests {
    //! kernels/ops.cu built for the host (one thread, so sums run in the CPU kernels' order)
    //! against the CPU ops: the GPU arithmetic is checked without a GPU.

    use super::*;
    use candle_core::Device;
    use std::io::Write;

    const MAIN: &str = r#"
static std::vector<float> read(size_t n) {
    std::vector<float> v(n);
    for (size_t i = 0; i < n; i++) { unsigned u; if (scanf("%u", &u) != 1) exit(3); memcpy(&v[i], &u, 4); }
    return v;
}
static void print(const std::vector<float> &xs) {
    for (float f : xs) { unsigned u; memcpy(&u, &f, 4); printf("%u\n", u); }
}
int main(int argc, char **argv) {
    std::string mode = argv[1];
    unsigned rows = atoi(argv[2]), dim = atoi(argv[3]);
    float eps = 1e-12f;
    size_t n = (size_t)rows * dim;
    std::vector<float> x = read(n), out(n);
    if (mode == "softmax") { softmax_last_dim(x.data(), out.data(), rows, dim); print(out); }
    if (mode == "gelu") { gelu_erf(x.data(), out.data(), n); print(out); }
    if (mode == "gelu_backward") { auto g = read(n); gelu_erf_backward(x.data(), g.data(), out.data(), n); print(out); }
    if (mode == "layer_norm") {
        auto w = read(dim), b = read(dim);
        layer_norm(x.data(), w.data(), b.data(), out.data(), rows, dim, eps); print(out);
    }
    if (mode == "layer_norm_backward") {
        auto w = read(dim), g = read(n);
        unsigned chunk_rows = 64, chunks = (rows + chunk_rows - 1) / chunk_rows;
        std::vector<float> stats(2 * rows), partial(2 * chunks * dim), dw(dim), db(dim);
        layer_norm_stats(x.data(), stats.data(), rows, dim, eps);
        layer_norm_backward_input(x.data(), w.data(), g.data(), out.data(), rows, dim, eps);
        layer_norm_backward_params(x.data(), g.data(), stats.data(), partial.data(), rows, dim, chunk_rows);
        layer_norm_backward_params_sum(partial.data(), dw.data(), db.data(), chunks, dim);
        print(out); print(dw); print(db);
    }
}
"#;

    fn host_run(exe: &std::path::Path, mode: &str, rows: usize, dim: usize, inputs: &[&Tensor]) -> Vec<f32> {
        let mut child = std::process::Command::new(exe)
            .args([mode, &rows.to_string(), &dim.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let text: String = inputs
            .iter()
            .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .map(|x| format!("{}\n", x.to_bits()))
            .collect();
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{mode}");
        String::from_utf8(out.stdout).unwrap().lines().map(|l| f32::from_bits(l.parse().unwrap())).collect()
    }

    fn assert_close(host: &[f32], cpu: &Tensor, what: &str) {
        let cpu = cpu.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(host.len(), cpu.len(), "{what}: length");
        for (i, (h, c)) in host.iter().zip(&cpu).enumerate() {
            assert!((h - c).abs() <= 1e-6 * c.abs().max(1.0), "{what}[{i}]: host {h} vs cpu {c}");
        }
    }

    #[test]
    fn cuda_kernels_compute_the_cpu_ops() {
        let dir = tempfile::tempdir().unwrap();
        let main = format!("#include <string>\n{MAIN}");
        let exe = crate::kernels::host::compile(dir.path(), crate::kernels::OPS, &main);
        let device = Device::Cpu;
        let (rows, dim) = (150, 48); // over two chunks of the LayerNorm parameter sums
        let x = (Tensor::randn(0f32, 3.0, (rows, dim), &device).unwrap() + 0.7).unwrap();
        let g = Tensor::randn(0f32, 1.0, (rows, dim), &device).unwrap();
        let w = Tensor::randn(1f32, 0.2, dim, &device).unwrap();
        let b = Tensor::randn(0f32, 0.2, dim, &device).unwrap();

        assert_close(&host_run(&exe, "softmax", rows, dim, &[&x]), &softmax_last_dim(&x).unwrap(), "softmax");
        assert_close(&host_run(&exe, "gelu", rows, dim, &[&x]), &gelu_erf(&x).unwrap(), "gelu");
        let cpu = x.apply_op2_no_bwd(&g, &GeluErfBackward).unwrap();
        assert_close(&host_run(&exe, "gelu_backward", rows, dim, &[&x, &g]), &cpu, "gelu backward");
        let cpu = layer_norm(&x, &w, &b, 1e-12).unwrap();
        assert_close(&host_run(&exe, "layer_norm", rows, dim, &[&x, &w, &b]), &cpu, "layer norm");
        let cpu = x.apply_op3_no_bwd(&w, &g, &LayerNormBackward { eps: 1e-12 }).unwrap();
        let host = host_run(&exe, "layer_norm_backward", rows, dim, &[&x, &w, &g]);
        assert_close(&host, &cpu, "layer norm backward (dx, dweight, dbias)");
    }
}

#[cfg(test)]
mod erf_tests {
    /// The rational erf against libm's over [-6, 6].
    #[test]
    fn fast_erf_is_accurate() {
        let worst = (-60_000..=60_000)
            .map(|i| i as f32 * 1e-4)
            .map(|x| (super::fast_erf(x) as f64 - libm_erf(x as f64)).abs())
            .fold(0.0, f64::max);
        assert!(worst < 5e-7, "max |fast_erf - erf| = {worst}");
    }

    fn libm_erf(x: f64) -> f64 {
        candle_core::cpu::erf::erf_f64(x)
    }
}
