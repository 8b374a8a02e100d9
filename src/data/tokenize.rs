//! Tokenisation with the model's own `tokenizer.json`: special tokens added, truncation to a
//! maximum length (special tokens included), right padding to the longest row of a batch.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use candle_core::{Device, Tensor};

/// One tokenised sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

/// A padded batch: `input_ids`, `token_type_ids`, `attention_mask`, each u32 `[batch, len]`.
#[derive(Clone)]
pub struct TokenBatch {
    pub input_ids: Tensor,
    pub token_type_ids: Tensor,
    pub attention_mask: Tensor,
}

impl TokenBatch {
    /// Right-pads `rows` to the longest with `pad_id` (type id 0, mask 0).
    pub fn pad(rows: &[&Encoded], pad_id: u32, device: &Device) -> candle_core::Result<Self> {
        let len = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
        let n = rows.len();
        let (mut ids, mut types, mut mask) =
            (vec![pad_id; n * len], vec![0u32; n * len], vec![0u32; n * len]);
        for (i, row) in rows.iter().enumerate() {
            let at = i * len;
            ids[at..at + row.ids.len()].copy_from_slice(&row.ids);
            types[at..at + row.type_ids.len()].copy_from_slice(&row.type_ids);
            mask[at..at + row.ids.len()].fill(1);
        }
        Ok(Self {
            input_ids: Tensor::from_vec(ids, (n, len), device)?,
            token_type_ids: Tensor::from_vec(types, (n, len), device)?,
            attention_mask: Tensor::from_vec(mask, (n, len), device)?,
        })
    }
}

/// The model's tokenizer with kdmcse's truncation and padding policy.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pad_id: u32,
}

impl Tokenizer {
    /// Loads `DIR/tokenizer.json`; sequences are cut to `max_len` tokens including specials.
    pub fn from_dir(dir: &Path, max_len: usize, pad_id: u32) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let mut inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("cannot load tokenizer {}", path.display()))?;
        // Files often carry their own fixed padding/truncation (MiniLM: pad to 128); batches
        // are padded here instead, to the longest row.
        inner.with_padding(None);
        inner
            .with_truncation(Some(tokenizers::TruncationParams { max_length: max_len, ..Default::default() }))
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
        Ok(Self { inner, pad_id })
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Tokenises sentences (in parallel), adding the model's special tokens.
    pub fn encode(&self, sentences: &[&str]) -> Result<Vec<Encoded>> {
        let encodings =
            self.inner.encode_batch(sentences.to_vec(), true).map_err(|e| anyhow!("tokenizer: {e}"))?;
        Ok(encodings
            .into_iter()
            .map(|e| Encoded { ids: e.get_ids().to_vec(), type_ids: e.get_type_ids().to_vec() })
            .collect())
    }

    /// Tokenises and pads one batch.
    pub fn batch(&self, sentences: &[&str], device: &Device) -> Result<TokenBatch> {
        let encoded = self.encode(sentences)?;
        Ok(TokenBatch::pad(&encoded.iter().collect::<Vec<_>>(), self.pad_id, device)?)
    }
}
