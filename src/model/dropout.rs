//! Train-mode dropout whose masks are a pure function of a per-example key.
//!
//! Every batch row carries a 64-bit key (derived from the seed, the step, the example's global
//! index and the view); the mask of an element at dropout site `s` is a hash of (key, s, the
//! element's coordinates within its row). Coordinates, not flat offsets, so that the padded
//! length of a batch changes no mask. Masks thus do not depend on how a global batch is split
//! across ranks or padded, nor on RNG state that would have to be checkpointed; the two SimCSE
//! views differ only through their keys.

use candle_core::{Result, Tensor};
use rayon::prelude::*;

/// Dropout for one encoder forward: off (evaluation) or on with one key per batch row.
#[derive(Debug, Clone)]
pub struct Dropout {
    hidden_p: f32,
    attention_p: f32,
    row_keys: Option<Vec<u64>>,
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
    fn id(self) -> u64 {
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
        Self { hidden_p: 0.0, attention_p: 0.0, row_keys: None }
    }

    /// Dropout with probability `hidden_p` on hidden states and `attention_p` on attention
    /// probabilities, one mask key per batch row.
    pub fn per_example(hidden_p: f32, attention_p: f32, row_keys: Vec<u64>) -> Self {
        Self { hidden_p, attention_p, row_keys: Some(row_keys) }
    }

    /// Applies the mask of `site` to `xs`, whose first dimension is the batch.
    pub fn apply(&self, xs: &Tensor, site: Site) -> Result<Tensor> {
        let p = if site.is_attention() { self.attention_p } else { self.hidden_p };
        let Some(keys) = self.row_keys.as_ref().filter(|_| p > 0.0) else {
            return Ok(xs.clone());
        };
        let rows = xs.dim(0)?;
        if keys.len() != rows {
            candle_core::bail!("dropout: {} row keys for a batch of {rows}", keys.len());
        }
        let mask = mask_values(keys, site.id(), &xs.dims()[1..], p);
        let mask = Tensor::from_vec(mask, xs.shape(), xs.device())?.to_dtype(xs.dtype())?;
        xs.mul(&mask)
    }
}

/// Inverted-dropout mask values (0 or 1/(1-p)) for rows of shape `row_dims`, one key per row.
fn mask_values(keys: &[u64], site: u64, row_dims: &[usize], p: f32) -> Vec<f32> {
    assert!(row_dims.len() <= 3 && row_dims.iter().all(|&d| d < 1 << 20), "dropout: row shape {row_dims:?}");
    let per_row: usize = row_dims.iter().product();
    let scale = 1.0 / (1.0 - p);
    // Keep an element when its 24-bit uniform draw is at least p.
    let threshold = (p as f64 * (1u64 << 24) as f64).round() as u64;
    let mut mask = vec![0f32; keys.len() * per_row];
    mask.par_chunks_mut(per_row.max(1)).zip(keys.par_iter()).for_each(|(row, &key)| {
        let row_key = mix(key ^ mix(site));
        // Coordinates packed 20 bits each (innermost lowest): the same element gets the same
        // draw whatever the extent of the other dimensions.
        let mut dims = [1usize; 3];
        dims[3 - row_dims.len()..].copy_from_slice(row_dims);
        let mut out = row.iter_mut();
        for a in 0..dims[0] as u64 {
            for b in 0..dims[1] as u64 {
                let outer = (a << 40) | (b << 20);
                for c in 0..dims[2] as u64 {
                    let draw =
                        mix(row_key.wrapping_add((outer | c).wrapping_mul(0x9E37_79B9_7F4A_7C15))) >> 40;
                    *out.next().expect("mask row sized by its dims") =
                        if draw >= threshold { scale } else { 0.0 };
                }
            }
        }
    });
    mask
}

/// splitmix64's finaliser: a bijective 64-bit mix with good avalanche.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_rate_and_scale() {
        let keys: Vec<u64> = (0..8).map(|i| example_key(1234, 0, i, 0)).collect();
        let mask = mask_values(&keys, Site::Embeddings.id(), &[10_000], 0.1);
        let dropped = mask.iter().filter(|&&m| m == 0.0).count() as f64 / mask.len() as f64;
        assert!((dropped - 0.1).abs() < 0.005, "drop rate {dropped}");
        let kept = mask.iter().find(|&&m| m != 0.0).unwrap();
        assert!((kept - 1.0 / 0.9).abs() < 1e-6);
    }

    #[test]
    fn masks_depend_only_on_the_row_key() {
        let keys: Vec<u64> = (0..4).map(|i| example_key(7, 3, i, 1)).collect();
        let all = mask_values(&keys, 5, &[64], 0.1);
        let last_alone = mask_values(&keys[3..], 5, &[64], 0.1);
        assert_eq!(&all[3 * 64..], &last_alone[..]);
        let other_view = mask_values(&[example_key(7, 3, 3, 0)], 5, &[64], 0.1);
        assert_ne!(last_alone, other_view);
    }

    #[test]
    fn padding_changes_no_mask() {
        // Attention probabilities [heads, queries, keys] padded from 5 to 9 positions.
        let keys = [example_key(1, 2, 3, 0)];
        let short = mask_values(&keys, 9, &[2, 5, 5], 0.5);
        let long = mask_values(&keys, 9, &[2, 9, 9], 0.5);
        for (h, q, k) in (0..2).flat_map(|h| (0..5).flat_map(move |q| (0..5).map(move |k| (h, q, k)))) {
            assert_eq!(short[(h * 5 + q) * 5 + k], long[(h * 9 + q) * 9 + k], "({h}, {q}, {k})");
        }
    }
}
