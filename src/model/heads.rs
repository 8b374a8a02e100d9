//! The trainable heads of KDMCSE, all of the form `tanh(W x + b)`, optionally L2-normalised:
//! the MLP head for the text-text term (hidden -> hidden), the grounding head (hidden ->
//! proj_dim) and the teacher heads mapping CLIP image and caption features into the grounding
//! space (METHOD.md, "Model").

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::bert::Linear;
use crate::ops::l2_normalize;

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

/// One head's name (its weights are `<name>.dense.weight` and `.bias`), sizes and whether its
/// output is normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadShape {
    pub name: &'static str,
    pub input: usize,
    pub output: usize,
    pub normalize: bool,
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
    /// The heads of a student with `hidden`-wide sentence vectors, a `proj_dim` grounding space
    /// and `teacher_dim` teacher features, in the order of [`Heads`]'s fields.
    pub fn shapes(hidden: usize, proj_dim: usize, teacher_dim: usize) -> [HeadShape; 4] {
        let head = |name, input, output, normalize| HeadShape { name, input, output, normalize };
        [
            head("mlp", hidden, hidden, false),
            head("grounding", hidden, proj_dim, true),
            head("image_head", teacher_dim, proj_dim, true),
            head("caption_head", teacher_dim, proj_dim, true),
        ]
    }

    pub fn load(vb: VarBuilder, hidden: usize, proj_dim: usize, teacher_dim: usize) -> Result<Self> {
        let [mlp, grounding, image, caption] = Self::shapes(hidden, proj_dim, teacher_dim)
            .map(|s| Projection::load(vb.pp(s.name), s.input, s.output, s.normalize));
        Ok(Self { mlp: mlp?, grounding: grounding?, image: image?, caption: caption? })
    }
}
