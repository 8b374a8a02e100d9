//! Rows divided by their L2 norm, clamped away from zero as `torch.nn.functional.normalize`
//! does, in one pass each way (the composed version makes five temporaries forward and about a
//! dozen backward; the objective normalises every pool-sized input).

#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, D};

#[cfg(feature = "cuda")]
use super::cuda;
use super::{cpu_f32, fused};

/// The smallest norm a row is divided by.
const EPS: f32 = 1e-12;

/// `xs / max(|xs|, 1e-12)` over the last dimension.
pub fn l2_normalize(xs: &Tensor) -> Result<Tensor> {
    if fused(xs) {
        xs.contiguous()?.apply_op1(L2Normalize)
    } else {
        l2_normalize_composed(xs)
    }
}

/// [`l2_normalize`] from candle's primitives, the reference for the fused kernels.
pub fn l2_normalize_composed(xs: &Tensor) -> Result<Tensor> {
    let norm = xs.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(EPS as f64, f64::INFINITY)?;
    xs.broadcast_div(&norm)
}

/// A row's norm as the kernels compute it: squares summed in 16 lanes (element `k` in lane
/// `k % 16`), the lanes in order.
#[inline(always)]
fn norm(row: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut lanes = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        lanes.iter_mut().zip(chunk).for_each(|(l, &x)| *l += x * x);
    }
    lanes.iter_mut().zip(rest).for_each(|(l, &x)| *l += x * x);
    lanes.iter().sum::<f32>().sqrt()
}

/// The last dimension of a layout (the row length), refusing rank 0.
fn row_len(layout: &Layout, op: &str) -> Result<usize> {
    match layout.dims().last() {
        Some(&dim) if dim > 0 => Ok(dim),
        _ => candle_core::bail!("{op}: rows of shape {:?}", layout.dims()),
    }
}

struct L2Normalize;

impl CustomOp1 for L2Normalize {
    fn name(&self) -> &'static str {
        "kdmcse-l2-normalize"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let xs = cpu_f32(storage, layout, self.name())?;
        let dim = row_len(layout, self.name())?;
        // SAFETY: each piece is one row, written whole.
        let ys = unsafe {
            super::written_in_pieces(
                xs.len(),
                dim,
                #[inline(always)]
                |row, dst| {
                    let src = &xs[row * dim..][..dim];
                    let n = norm(src).max(EPS);
                    for (d, &x) in dst.iter_mut().zip(src) {
                        d.write(x / n);
                    }
                },
            )
        };
        Ok((CpuStorage::F32(ys), layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, dim) = (layout.shape().elem_count(), row_len(layout, self.name())?);
        let x = cuda::input(storage, layout, self.name())?;
        let mut y = unsafe { storage.device.alloc::<f32>(n)? };
        let func = crate::kernels::Kernel::load(&storage.device, crate::kernels::OPS, "l2_normalize")?;
        let (rows, dim32) = ((n / dim) as u32, dim as u32);
        let mut args = func.args();
        args.arg(&x).arg(&mut y).arg(&rows).arg(&dim32);
        // SAFETY: the arguments follow the kernel's signature in ops.cu; buffers hold its elements.
        unsafe { func.launch(args, cuda::rows(n / dim, dim))? };
        Ok((cuda::output(y, &storage.device), layout.shape().clone()))
    }

    fn bwd(&self, xs: &Tensor, _ys: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(xs.apply_op2_no_bwd(&grad.contiguous()?, &L2NormalizeBackward)?))
    }
}

/// `dx = (g - y (g . y)) / |x|` per row (`g / eps` where the norm was clamped), from the input
/// and the output's gradient.
pub(super) struct L2NormalizeBackward;

impl CustomOp2 for L2NormalizeBackward {
    fn name(&self) -> &'static str {
        "kdmcse-l2-normalize-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (xs, gs) = (cpu_f32(s1, l1, self.name())?, cpu_f32(s2, l2, self.name())?);
        let dim = row_len(l1, self.name())?;
        if xs.len() != gs.len() {
            candle_core::bail!("{}: {} inputs, {} gradients", self.name(), xs.len(), gs.len());
        }
        // SAFETY: each piece is one row, written whole.
        let dx = unsafe {
            super::written_in_pieces(
                xs.len(),
                dim,
                #[inline(always)]
                |row, dst| {
                    let (x, g) = (&xs[row * dim..][..dim], &gs[row * dim..][..dim]);
                    let raw = norm(x);
                    let n = raw.max(EPS);
                    // The clamp passes no gradient to the norm.
                    let dot = if raw >= EPS {
                        x.iter().zip(g).map(|(&x, &g)| g * (x / n)).sum::<f32>()
                    } else {
                        0.0
                    };
                    for ((d, &x), &g) in dst.iter_mut().zip(x).zip(g) {
                        d.write((g - x / n * dot) / n);
                    }
                },
            )
        };
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
        let (n, dim) = (l1.shape().elem_count(), row_len(l1, self.name())?);
        let (x, g) = (cuda::input(s1, l1, self.name())?, cuda::input(s2, l2, self.name())?);
        let mut dx = unsafe { s1.device.alloc::<f32>(n)? };
        let func = crate::kernels::Kernel::load(&s1.device, crate::kernels::OPS, "l2_normalize_backward")?;
        let (rows, dim32) = ((n / dim) as u32, dim as u32);
        let mut args = func.args();
        args.arg(&x).arg(&g).arg(&mut dx).arg(&rows).arg(&dim32);
        // SAFETY: the arguments follow the kernel's signature in ops.cu; buffers hold its elements.
        unsafe { func.launch(args, cuda::rows(n / dim, dim))? };
        Ok((cuda::output(dx, &s1.device), l1.shape().clone()))
    }
}
