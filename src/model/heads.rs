//! The trainable heads of KDMCSE, all of the form `tanh(W x + b)`, optionally L2-normalised:
//! the MLP head for the text-text term (hidden -> hidden), the grounding head (hidden ->
//! proj_dim) and the teacher heads mapping CLIP image and caption features into the grounding
//! space (METHOD.md, "Model").

use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::bert::Linear;

/// `tanh(W x + b)`, L2-normalised along the last dimension when `normalize` is set.
#[derive(Debug, Clone)]
pub struct Projection {
    dense: Linear,
    normalize: bool,
}

impl Projection {
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, normalize: bool) -> Result<Self> {
        Ok(Self { dense: Linear::load(vb.pp("dense"), in_dim, out_dim)?, normalize })
    }
}

impl Module for Projection {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = self.dense.forward(xs)?.tanh()?;
        if self.normalize {
            l2_normalize(&ys)
        } else {
            Ok(ys)
        }
    }
}

/// Rows divided by their L2 norm (clamped away from zero, as `torch.nn.functional.normalize`).
pub fn l2_normalize(xs: &Tensor) -> Result<Tensor> {
    let norm = xs.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::INFINITY)?;
    xs.broadcast_div(&norm)
}

/// The four KDMCSE heads, under `mlp.`, `grounding.`, `image_head.`, `caption_head.`.
#[derive(Debug, Clone)]
pub struct Heads {
    pub mlp: Projection,
    pub grounding: Projection,
    pub image: Projection,
    pub caption: Projection,
}

impl Heads {
    pub fn load(vb: VarBuilder, hidden: usize, proj_dim: usize, teacher_dim: usize) -> Result<Self> {
        Ok(Self {
            mlp: Projection::load(vb.pp("mlp"), hidden, hidden, false)?,
            grounding: Projection::load(vb.pp("grounding"), hidden, proj_dim, true)?,
            image: Projection::load(vb.pp("image_head"), teacher_dim, proj_dim, true)?,
            caption: Projection::load(vb.pp("caption_head"), teacher_dim, proj_dim, true)?,
        })
    }
}
