//! A padded batch's real tokens, packed row after row: the encoder's per-token work (every linear
//! layer, LayerNorm, GELU, dropout, residual) runs on these alone, and attention pads them back
//! into `[batch, len]` for its per-sentence products. On sentences of mixed length, padding is
//! often a third of a batch; packed, it costs nothing but attention's share.

use candle_core::{Device, Result, Tensor};

use super::dropout::Dropout;
use crate::ops::{gather_rows, RowGather};

/// Where each token of a padded `[batch, len]` batch sits among the packed tokens.
pub struct Packing {
    batch: usize,
    len: usize,
    /// Each token's (example, position), in packed order.
    tokens: Vec<(usize, usize)>,
    /// Padded rows to packed tokens and back; none when no position is padding.
    gathers: Option<(RowGather, RowGather)>,
    /// These tokens' rows among the tokens of the packing they were taken from, if any.
    within: Option<RowGather>,
    /// Dropout of the tokens' hidden states (each token its position's mask).
    dropout: Dropout,
}

impl Packing {
    /// The tokens of a batch whose `attention_mask` (`[batch, len]`, u32) marks them with 1;
    /// `dropout` is the batch's (one key per example).
    pub fn new(attention_mask: &Tensor, dropout: &Dropout) -> Result<Self> {
        let mask = attention_mask.to_vec2::<u32>()?;
        let (batch, len) = attention_mask.dims2()?;
        let right_padded = |row: &Vec<u32>| {
            let tokens = row.iter().take_while(|&&m| m == 1).count();
            tokens > 0 && row[tokens..].iter().all(|&m| m == 0)
        };
        if let Some(row) = mask.iter().position(|row| !right_padded(row)) {
            candle_core::bail!(
                "batch row {row}: attention masks must be right-padded (1 for each token from the first \
                 position, then 0 for padding), got {:?}",
                mask[row]
            );
        }
        let mut tokens = Vec::with_capacity(batch * len);
        let mut token_of_slot = Vec::with_capacity(batch * len);
        for (example, row) in mask.iter().enumerate() {
            for (position, &real) in row.iter().enumerate() {
                token_of_slot.push((real != 0).then_some(tokens.len()));
                if real != 0 {
                    tokens.push((example, position));
                }
            }
        }
        let gathers = if tokens.len() == batch * len {
            None
        } else {
            let pad = RowGather::new(&token_of_slot, tokens.len(), attention_mask.device())?;
            Some((pad.transposed()?, pad))
        };
        let dropout = dropout.of_tokens(&tokens);
        Ok(Self { batch, len, tokens, gathers, within: None, dropout })
    }

    /// The first token of each example, as a `[batch, 1]` packing taken from this one's tokens
    /// (the only position CLS pooling reads); `dropout` is the batch's.
    pub fn first_tokens(&self, dropout: &Dropout, device: &Device) -> Result<Self> {
        let tokens: Vec<(usize, usize)> = (0..self.batch).map(|example| (example, 0)).collect();
        let mut rows = vec![None; self.batch];
        for (token, &(example, position)) in self.tokens.iter().enumerate() {
            if position == 0 {
                rows[example] = Some(token);
            }
        }
        let within = RowGather::new(&rows, self.tokens.len(), device)?;
        let dropout = dropout.of_tokens(&tokens);
        Ok(Self { batch: self.batch, len: 1, tokens, gathers: None, within: Some(within), dropout })
    }

    /// Each example's `(first row, rows)` among the packed tokens, in order.
    pub fn example_rows(&self) -> Vec<(usize, usize)> {
        let mut rows = vec![(0, 0); self.batch];
        for (token, &(example, _)) in self.tokens.iter().enumerate().rev() {
            rows[example] = (token, rows[example].1 + 1);
        }
        rows
    }

    /// `(batch, len)` of the padded layout.
    pub fn padded_dims(&self) -> (usize, usize) {
        (self.batch, self.len)
    }

    /// Each token's (example, position), in packed order.
    pub fn tokens(&self) -> &[(usize, usize)] {
        &self.tokens
    }

    /// The dropout of the packed tokens' hidden states.
    pub fn dropout(&self) -> &Dropout {
        &self.dropout
    }

    /// `[batch, len, ...]` → `[tokens, ...]`: the real tokens' rows.
    pub fn pack(&self, padded: &Tensor) -> Result<Tensor> {
        let mut dims = padded.dims()[1..].to_vec();
        dims[0] = self.batch * self.len;
        let rows = padded.reshape(dims)?;
        match &self.gathers {
            Some((pack, _)) => gather_rows(&rows, pack),
            None => Ok(rows),
        }
    }

    /// `[tokens, ...]` → `[batch, len, ...]`, zeros at padding.
    pub fn pad(&self, packed: &Tensor) -> Result<Tensor> {
        let rows = match &self.gathers {
            Some((_, pad)) => gather_rows(packed, pad)?,
            None => packed.clone(),
        };
        let mut dims = vec![self.batch, self.len];
        dims.extend_from_slice(&packed.dims()[1..]);
        rows.reshape(dims)
    }

    /// These tokens' rows of `xs`, the packed tokens this packing was taken from (all of them
    /// when it was not taken from another).
    pub fn select(&self, xs: &Tensor) -> Result<Tensor> {
        match &self.within {
            Some(within) => gather_rows(xs, within),
            None => Ok(xs.clone()),
        }
    }

    /// The transpose of [`Self::select`]: `rows` put back in their places, zeros elsewhere.
    pub fn unselect(&self, rows: &Tensor) -> Result<Tensor> {
        match &self.within {
            Some(within) => gather_rows(rows, &within.transposed()?),
            None => Ok(rows.clone()),
        }
    }

    /// Whether [`Self::select`] takes every token.
    pub fn selects_all(&self) -> bool {
        self.within.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_and_pads_a_right_padded_batch() {
        let device = Device::Cpu;
        let mask = Tensor::new(&[[1u32, 1, 1], [1, 0, 0], [1, 1, 0]], &device).unwrap();
        let packing = Packing::new(&mask, &Dropout::disabled()).unwrap();
        assert_eq!(packing.tokens(), [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0), (2, 1)]);
        let padded = Tensor::arange(0f32, 9.0, &device).unwrap().reshape((3, 3, 1)).unwrap();
        let packed = packing.pack(&padded).unwrap();
        assert_eq!(packed.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [0., 1., 2., 3., 6., 7.]);
        let repadded = packing.pad(&packed).unwrap();
        assert_eq!(repadded.dims(), [3, 3, 1]);
        let expected = [0f32, 1., 2., 3., 0., 0., 6., 7., 0.];
        assert_eq!(repadded.flatten_all().unwrap().to_vec1::<f32>().unwrap(), expected);
        let first = packing.first_tokens(&Dropout::disabled(), &device).unwrap();
        let selected = first.select(&packed).unwrap();
        assert_eq!(selected.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [0., 3., 6.]);
        let back = first.unselect(&selected).unwrap();
        assert_eq!(back.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [0., 0., 0., 3., 6., 0.]);
    }

    /// Packed tokens get the dropout masks their padded rows get (so packing changes no run).
    #[test]
    fn packed_tokens_get_the_padded_batchs_masks() {
        use crate::model::dropout::{example_key, Site};
        let device = Device::Cpu;
        let mask = Tensor::new(&[[1u32, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], &device).unwrap();
        let dropout = Dropout::per_example(0.5, 0.5, (0..3).map(|i| example_key(9, 2, i, 1)).collect());
        let packing = Packing::new(&mask, &dropout).unwrap();
        let padded = Tensor::ones((3, 4, 40), candle_core::DType::F32, &device).unwrap();
        let packed = packing.pack(&padded).unwrap();
        for site in [Site::Embeddings, Site::AttentionOutput(1), Site::FeedForwardOutput(2)] {
            let expected = packing.pack(&dropout.apply(&padded, site).unwrap()).unwrap();
            let ours = packing.dropout().apply(&packed, site).unwrap();
            assert_eq!(ours.to_vec2::<f32>().unwrap(), expected.to_vec2::<f32>().unwrap(), "{site:?}");
        }
        let first = packing.first_tokens(&dropout, &device).unwrap();
        let expected = dropout.apply(&padded, Site::AttentionOutput(0)).unwrap().narrow(1, 0, 1).unwrap();
        let ours = first.dropout().apply(&first.select(&packed).unwrap(), Site::AttentionOutput(0)).unwrap();
        assert_eq!(ours.to_vec2::<f32>().unwrap(), expected.squeeze(1).unwrap().to_vec2::<f32>().unwrap());
    }

    #[test]
    fn a_row_starting_with_padding_is_an_error() {
        let mask = Tensor::new(&[[1u32, 1], [0, 1]], &Device::Cpu).unwrap();
        let err = Packing::new(&mask, &Dropout::disabled()).err().expect("an error");
        assert!(err.to_string().contains("row 1"), "{err}");
    }
}
