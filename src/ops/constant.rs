//! Elementwise sums and products: with a constant second operand (attention and dropout masks),
//! no gradient work for it; on the CPU, f32 and bf16 operands of one shape are split across
//! threads (candle's binary ops run on one).

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::cast::{cpu_slice, Element};

/// `lhs + rhs`, operands of one shape.
pub fn add(lhs: &Tensor, rhs: &Tensor) -> Result<Tensor> {
    if lhs.shape() == rhs.shape() {
        lhs.apply_op2(rhs, Elementwise::Add)
    } else {
        candle_core::bail!("add: shapes {:?} and {:?}", lhs.dims(), rhs.dims())
    }
}

/// `xs + constant`, the constant broadcast to `xs`'s shape, with no gradient for the constant
/// (an attention mask).
pub fn add_constant(xs: &Tensor, constant: &Tensor) -> Result<Tensor> {
    xs.apply_op2(&constant.broadcast_as(xs.shape())?, Elementwise::AddConstant)
}

/// `xs * constant`, the constant broadcast to `xs`'s shape, with no gradient for the constant
/// (a dropout mask).
pub fn mul_constant(xs: &Tensor, constant: &Tensor) -> Result<Tensor> {
    xs.apply_op2(&constant.broadcast_as(xs.shape())?, Elementwise::MulConstant)
}

/// An elementwise sum or product. With a constant second operand the backward only touches the
/// first one's gradient (candle's own binary ops compute, zero-fill and accumulate a gradient for
/// both, three wasted passes over a mask per backward). Forward: candle's kernels, or on the CPU
/// a pass split across threads for contiguous f32 operands.
#[derive(Debug, Clone, Copy)]
enum Elementwise {
    Add,
    AddConstant,
    MulConstant,
}

impl Elementwise {
    fn is_add(self) -> bool {
        !matches!(self, Elementwise::MulConstant)
    }

    fn apply<S: candle_core::backend::BackendStorage>(
        self,
        s1: &S,
        l1: &Layout,
        s2: &S,
        l2: &Layout,
    ) -> Result<(S, Shape)> {
        let out = if self.is_add() {
            s1.binary_impl::<candle_core::op::Add>(s2, l1, l2)?
        } else {
            s1.binary_impl::<candle_core::op::Mul>(s2, l1, l2)?
        };
        Ok((out, l1.shape().clone()))
    }

    /// The op over contiguous operands of one element type, across threads.
    fn cpu<T: Element>(
        self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (cpu_slice::<T>(s1, l1, self.name())?, cpu_slice::<T>(s2, l2, self.name())?);
        let mut out = Vec::new();
        let pairs = a.par_iter().zip(b.par_iter()).with_min_len(1 << 14);
        if self.is_add() {
            pairs.map(|(a, b)| T::from_f32(a.to_f32() + b.to_f32())).collect_into_vec(&mut out);
        } else {
            pairs.map(|(a, b)| T::from_f32(a.to_f32() * b.to_f32())).collect_into_vec(&mut out);
        }
        Ok((T::storage(out), l1.shape().clone()))
    }
}

impl CustomOp2 for Elementwise {
    fn name(&self) -> &'static str {
        match self {
            Elementwise::Add => "kdmcse-add",
            Elementwise::AddConstant => "kdmcse-add-constant",
            Elementwise::MulConstant => "kdmcse-mul-constant",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let contiguous = |l: &Layout| l.contiguous_offsets().is_some();
        if !(contiguous(l1) && contiguous(l2)) {
            return self.apply(s1, l1, s2, l2);
        }
        match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => self.cpu::<f32>(s1, l1, s2, l2),
            (CpuStorage::BF16(_), CpuStorage::BF16(_)) => self.cpu::<bf16>(s1, l1, s2, l2),
            _ => self.apply(s1, l1, s2, l2),
        }
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
        _lhs: &Tensor,
        rhs: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok(match self {
            Elementwise::Add => (Some(grad.clone()), Some(grad.clone())),
            Elementwise::AddConstant => (Some(grad.clone()), None),
            Elementwise::MulConstant => (Some(mul_constant(grad, rhs)?), None),
        })
    }
}
