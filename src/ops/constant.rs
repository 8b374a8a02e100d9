//! Binary ops whose second operand is a constant (attention and dropout masks): no gradient work
//! for the constant.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

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
