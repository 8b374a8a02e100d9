//! The exact (erf) GELU with its backward, on a rational erf that vectorises.

#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use half::bf16;

use super::cast::{cpu_kernels_take, cpu_slice, Element};
#[cfg(feature = "cuda")]
use super::cuda;
use super::fused;
use super::math::exp;

/// The exact GELU, `x * Phi(x)` with `Phi` the standard normal CDF (BERT's `gelu`); f32, and
/// bf16 on the CPU (computed in f32).
pub fn gelu_erf(xs: &Tensor) -> Result<Tensor> {
    if fused(xs) || cpu_kernels_take(xs) {
        xs.contiguous()?.apply_op1(GeluErf)
    } else {
        gelu_erf_unfused(xs)
    }
}

/// The GELU of the dtypes the fused kernels do not take: candle's, but exact in f64.
fn gelu_erf_unfused(xs: &Tensor) -> Result<Tensor> {
    if xs.dtype() == DType::F64 {
        gelu_erf_composed(xs)
    } else {
        xs.gelu_erf()
    }
}

/// `x * Phi(x)` from candle's elementwise ops, exact in every dtype, forward and backward; the
/// f64 reference path. candle's own `gelu_erf` backward rounds 1/sqrt(2 pi) to 0.398942 (7e-7
/// relative), below what half precisions resolve, not what an f64 gradient check does.
pub fn gelu_erf_composed(xs: &Tensor) -> Result<Tensor> {
    let cdf = (((xs * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5)?;
    xs * cdf
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
        let out = match storage {
            CpuStorage::BF16(_) => bf16::storage(gelu_cpu::<bf16>(cpu_slice(storage, layout, self.name())?)),
            _ => f32::storage(gelu_cpu::<f32>(cpu_slice(storage, layout, self.name())?)),
        };
        Ok((out, layout.shape().clone()))
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
        let (func, n32) =
            (crate::kernels::Kernel::load(&storage.device, crate::kernels::OPS, "gelu_erf")?, n as u32);
        let mut args = func.args();
        args.arg(&x).arg(&mut y).arg(&n32);
        // SAFETY: the arguments follow the kernel's signature in ops.cu; buffers hold its elements.
        unsafe { func.launch(args, cuda::elementwise(n))? };
        Ok((cuda::output(y, &storage.device), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(gelu_erf_backward(arg, grad_res)?))
    }
}

fn gelu_cpu<T: Element>(src: &[T]) -> Vec<T> {
    // SAFETY: `write` writes each element of its piece from the input element beside it.
    unsafe {
        super::written_in_pieces(
            src.len(),
            4096,
            #[inline(always)]
            |piece: usize, dst: &mut [std::mem::MaybeUninit<T>]| {
                for (d, &x) in dst.iter_mut().zip(&src[piece * 4096..]) {
                    let x = x.to_f32();
                    d.write(T::from_f32(0.5 * x * (1.0 + fast_erf(x * std::f32::consts::FRAC_1_SQRT_2))));
                }
            },
        )
    }
}

/// The GELU's input gradient from its input and the output's gradient.
pub fn gelu_erf_backward(xs: &Tensor, grad: &Tensor) -> Result<Tensor> {
    if (fused(xs) || cpu_kernels_take(xs)) && grad.dtype() == xs.dtype() {
        xs.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &GeluErfBackward)
    } else {
        Ok(super::vjp(|x| gelu_erf_unfused(&x[0]), &[xs], grad)?.remove(0))
    }
}

/// The GELU backward: `grad * d/dx x Phi(x)` from the input and the incoming gradient.
pub(super) struct GeluErfBackward;

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
        let name = self.name();
        let dx = match s1 {
            CpuStorage::BF16(_) => bf16::storage(gelu_backward_cpu::<bf16>(
                cpu_slice(s1, l1, name)?,
                cpu_slice(s2, l2, name)?,
                name,
            )?),
            _ => f32::storage(gelu_backward_cpu::<f32>(
                cpu_slice(s1, l1, name)?,
                cpu_slice(s2, l2, name)?,
                name,
            )?),
        };
        Ok((dx, l1.shape().clone()))
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
        let (func, n32) =
            (crate::kernels::Kernel::load(&s1.device, crate::kernels::OPS, "gelu_erf_backward")?, n as u32);
        let mut args = func.args();
        args.arg(&x).arg(&g).arg(&mut dx).arg(&n32);
        // SAFETY: the arguments follow the kernel's signature in ops.cu; buffers hold its elements.
        unsafe { func.launch(args, cuda::elementwise(n))? };
        Ok((cuda::output(dx, &s1.device), l1.shape().clone()))
    }
}

/// `grad * d/dx x Phi(x)`, with d/dx x Phi(x) = Phi(x) + x phi(x).
fn gelu_backward_cpu<T: Element>(xs: &[T], gs: &[T], op: &str) -> Result<Vec<T>> {
    let inv_sqrt_2pi = 0.5 * std::f32::consts::FRAC_2_SQRT_PI * std::f32::consts::FRAC_1_SQRT_2;
    if xs.len() != gs.len() {
        candle_core::bail!("{op}: {} inputs, {} gradients", xs.len(), gs.len());
    }
    // SAFETY: inputs and gradients are as long as the output; each element is written.
    Ok(unsafe {
        super::written_in_pieces(
            xs.len(),
            4096,
            #[inline(always)]
            |piece: usize, dx: &mut [std::mem::MaybeUninit<T>]| {
                let (xs, gs) = (&xs[piece * 4096..], &gs[piece * 4096..]);
                for ((d, &x), &g) in dx.iter_mut().zip(xs).zip(gs) {
                    let x = x.to_f32();
                    let cdf = 0.5 * (1.0 + fast_erf(x * std::f32::consts::FRAC_1_SQRT_2));
                    let pdf = inv_sqrt_2pi * exp(-0.5 * x * x);
                    d.write(T::from_f32(g.to_f32() * (cdf + x * pdf)));
                }
            },
        )
    })
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
