//! Train-mode dropout whose masks are a pure function of a per-example key (the mask itself is
//! `ops::dropout_mask`).
//!
//! Every batch row carries a 64-bit key (derived from the seed, the step, the example's global
//! index and the view); the mask of an element at dropout site `s` is a hash of (key, s, the
//! element's coordinates within its row). Coordinates, not flat offsets, so that the padded
//! length of a batch changes no mask, nor does packing its tokens (a token row carries its
//! position as the origin of its coordinates). Masks thus do not depend on how a global batch is split
//! across ranks or padded, nor on RNG state that would have to be checkpointed; the two SimCSE
//! views differ only through their keys.

use candle_core::{Result, Tensor};

use crate::ops::{dropout_mask, dropout_origin, mix, mul_constant};

/// Dropout for one encoder forward: off (evaluation) or on with one key per batch row.
#[derive(Debug, Clone)]
pub struct Dropout {
    hidden_p: f32,
    attention_p: f32,
    row_keys: Option<Vec<u64>>,
    /// Each row's coordinate origin within its example (token rows); none: whole examples.
    row_origins: Option<Vec<u64>>,
}

/// Where in the encoder a mask is applied; part of the mask's hash input.
#[derive(Debug, Clone, Copy)]
pub enum Site {
    Embeddings,
    AttentionProbs(usize),
    AttentionOutput(usize),
    FeedForwardOutput(usize),
}

impl Site {
    pub(crate) fn id(self) -> u64 {
        match self {
            Site::Embeddings => 1,
            Site::AttentionProbs(layer) => 2 + 4 * layer as u64,
            Site::AttentionOutput(layer) => 3 + 4 * layer as u64,
            Site::FeedForwardOutput(layer) => 4 + 4 * layer as u64,
        }
    }

    fn is_attention(self) -> bool {
        matches!(self, Site::AttentionProbs(_))
    }
}

/// The key of one example's dropout masks: the seed, the optimiser step, the example's index in
/// the global batch order, and the view (0 or 1).
pub fn example_key(seed: u64, step: u64, example: u64, view: u64) -> u64 {
    mix(mix(mix(mix(seed) ^ step) ^ example) ^ view)
}

impl Dropout {
    /// No dropout: the deterministic evaluation mode.
    pub fn disabled() -> Self {
        Self { hidden_p: 0.0, attention_p: 0.0, row_keys: None, row_origins: None }
    }

    /// Dropout with probability `hidden_p` on hidden states and `attention_p` on attention
    /// probabilities, one mask key per batch row.
    pub fn per_example(hidden_p: f32, attention_p: f32, row_keys: Vec<u64>) -> Self {
        Self { hidden_p, attention_p, row_keys: Some(row_keys), row_origins: None }
    }

    /// The dropout of token rows `(example, position)` of this batch of examples: each gets the
    /// mask of its position in its example's rows, so a batch's hidden states get the same masks
    /// packed as padded.
    pub fn of_tokens(&self, tokens: &[(usize, usize)]) -> Self {
        let row_keys = self.row_keys.as_ref().map(|keys| tokens.iter().map(|&(e, _)| keys[e]).collect());
        let row_origins = Some(tokens.iter().map(|&(_, position)| dropout_origin(1, position)).collect());
        Self { row_keys, row_origins, ..self.clone() }
    }

    /// The dropout of the batch rows `rows` (in that order), as a batch of their own: the same
    /// masks, since they follow the rows' keys.
    pub fn select_rows(&self, rows: &[usize]) -> Self {
        let pick = |values: &Vec<u64>| rows.iter().map(|&r| values[r]).collect();
        Self {
            row_keys: self.row_keys.as_ref().map(pick),
            row_origins: self.row_origins.as_ref().map(pick),
            ..*self
        }
    }

    /// The example keys and drop probability of `site`'s masks, when it drops anything (a
    /// kernel that draws the masks itself; `Dropout` of examples, not tokens).
    pub(crate) fn example_masks(&self, site: Site) -> Option<(&[u64], f32)> {
        let p = if site.is_attention() { self.attention_p } else { self.hidden_p };
        let keys = self.row_keys.as_deref().filter(|_| p > 0.0 && self.row_origins.is_none())?;
        Some((keys, p))
    }

    /// Applies the mask of `site` to `xs`, whose first dimension is the batch. The mask is made
    /// where `xs` lives (a CUDA kernel on GPUs), identical on every device.
    pub fn apply(&self, xs: &Tensor, site: Site) -> Result<Tensor> {
        let p = if site.is_attention() { self.attention_p } else { self.hidden_p };
        let Some(keys) = self.row_keys.as_ref().filter(|_| p > 0.0) else {
            return Ok(xs.clone());
        };
        mul_constant(xs, &dropout_mask(xs, keys, self.row_origins.as_deref(), site.id(), p)?)
    }
}
