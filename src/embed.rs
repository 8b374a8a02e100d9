//! Sentence embeddings from a model folder: tokenizer + encoder + pooling, batched by length.

use std::path::Path;

use anyhow::Result;
use candle_core::{Device, Tensor};

use crate::data::{TokenBatch, Tokenizer};
use crate::model::{self, dropout::Dropout, BertModel, Pooling};

/// Encodes sentences with a frozen encoder in evaluation mode.
pub struct SentenceEncoder {
    pub model: BertModel,
    pub tokenizer: Tokenizer,
    pub pooling: Pooling,
}

impl SentenceEncoder {
    /// Loads a Hugging Face model folder. `pooling`: the given one, else what the folder states
    /// (an export's `1_Pooling/config.json`), else CLS. `max_len` cuts inputs (special tokens
    /// included); `None` means no truncation beyond what the position table holds.
    pub fn load(
        dir: &Path,
        pooling: Option<Pooling>,
        max_len: Option<usize>,
        device: &Device,
    ) -> Result<Self> {
        let pooling = match pooling {
            Some(p) => p,
            None => model::pooling::folder_pooling(dir)?.unwrap_or(Pooling::Cls),
        };
        let model = model::load_encoder(dir, device)?;
        let max_len = max_len.unwrap_or(model.config.max_tokens()).min(model.config.max_tokens());
        let tokenizer = Tokenizer::from_dir(dir, max_len, model.config.pad_token_id as u32)?;
        Ok(Self { model, tokenizer, pooling })
    }

    /// Embeddings `[n, hidden]` (f32, not normalised), in input order; see [`embed_sentences`].
    pub fn encode(
        &self,
        sentences: &[&str],
        batch_size: usize,
        on_batch: impl FnMut(usize),
    ) -> Result<Tensor> {
        embed_sentences(&self.model, &self.tokenizer, self.pooling, sentences, batch_size, on_batch)
    }
}

/// Sentence embeddings `[n, hidden]` in input order, dropout off, batched by token length so
/// little padding is computed; `on_batch` is called with each batch's size. Each batch's result
/// is detached, so a model made of training variables keeps no graph alive across batches.
pub fn embed_sentences(
    model: &BertModel,
    tokenizer: &Tokenizer,
    pooling: Pooling,
    sentences: &[&str],
    batch_size: usize,
    mut on_batch: impl FnMut(usize),
) -> Result<Tensor> {
    let encoded = tokenizer.encode(sentences)?;
    let mut order: Vec<usize> = (0..encoded.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(encoded[i].ids.len()));
    let device = model.device();
    let mut pooled = Vec::with_capacity(order.len().div_ceil(batch_size.max(1)));
    for chunk in order.chunks(batch_size.max(1)) {
        let rows: Vec<_> = chunk.iter().map(|&i| &encoded[i]).collect();
        let batch = TokenBatch::pad(&rows, tokenizer.pad_id(), device)?;
        let embedded = model.embed(&batch, &Dropout::disabled(), pooling)?;
        pooled.push(embedded.detach());
        on_batch(chunk.len());
    }
    if pooled.is_empty() {
        return Ok(Tensor::zeros((0, model.config.hidden_size), candle_core::DType::F32, device)?);
    }
    let sorted = Tensor::cat(&pooled, 0)?.contiguous()?;
    // Undo the length sort.
    let mut inverse = vec![0u32; order.len()];
    for (position, &i) in order.iter().enumerate() {
        inverse[i] = position as u32;
    }
    let inverse = Tensor::from_vec(inverse, order.len(), device)?;
    Ok(sorted.index_select(&inverse, 0)?)
}
