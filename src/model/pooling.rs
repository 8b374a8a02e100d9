//! Sentence pooling: how token states become one sentence vector, and its record in a model
//! folder (sentence-transformers' `1_Pooling/config.json`), which exports write and `eval` and
//! `encode` read.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::Tensor;

use super::bert;

/// sentence-transformers' pooling module of a model folder.
pub const POOLING_CONFIG: &str = "1_Pooling/config.json";

/// How token states become one sentence vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// The first token's last hidden state (SimCSE's `cls_before_pooler`).
    Cls,
    /// The attention-masked mean of the last hidden states.
    Avg,
}

impl Pooling {
    pub fn pool(self, hidden: &Tensor, attention_mask: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Pooling::Cls => bert::cls_pool(hidden),
            Pooling::Avg => bert::mean_pool(hidden, attention_mask),
        }
    }

    /// The gradient of the hidden states `[batch, hidden_len, hidden]` (all positions, or the
    /// first only where CLS pooling ran the last layer for it alone) from the pooled vectors'.
    pub fn backward(
        self,
        grad: &Tensor,
        attention_mask: &Tensor,
        hidden_len: usize,
    ) -> candle_core::Result<Tensor> {
        let (batch, hidden) = grad.dims2()?;
        let first = grad.unsqueeze(1)?;
        match self {
            Pooling::Cls if hidden_len == 1 => Ok(first),
            Pooling::Cls => {
                let rest = Tensor::zeros((batch, hidden_len - 1, hidden), grad.dtype(), grad.device())?;
                Tensor::cat(&[first, rest], 1)
            }
            Pooling::Avg => {
                let mask = attention_mask.to_dtype(grad.dtype())?.unsqueeze(2)?;
                first.broadcast_div(&mask.sum(1)?.unsqueeze(1)?)?.broadcast_mul(&mask)
            }
        }
    }
}

/// The `1_Pooling/config.json` of a folder whose sentence vectors have `dim` dimensions.
pub fn pooling_config(dim: usize, pooling: Pooling) -> serde_json::Value {
    serde_json::json!({
        "word_embedding_dimension": dim,
        "pooling_mode_cls_token": pooling == Pooling::Cls,
        "pooling_mode_mean_tokens": pooling == Pooling::Avg,
        "pooling_mode_max_tokens": false,
        "pooling_mode_mean_sqrt_len_tokens": false,
        "pooling_mode_weightedmean_tokens": false,
        "pooling_mode_lasttoken": false,
        "include_prompt": true
    })
}

/// The pooling a model folder states in its sentence-transformers module (`1_Pooling/config.json`),
/// if it has one.
pub fn folder_pooling(dir: &Path) -> Result<Option<Pooling>> {
    let path = dir.join(POOLING_CONFIG);
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let config: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let on = |key: &str| config[key].as_bool() == Some(true);
    match (on("pooling_mode_cls_token"), on("pooling_mode_mean_tokens")) {
        (true, false) => Ok(Some(Pooling::Cls)),
        (false, true) => Ok(Some(Pooling::Avg)),
        _ => anyhow::bail!(
            "{}: kdmcse reads CLS or mean pooling (pooling_mode_cls_token or pooling_mode_mean_tokens); \
             give --pooler to choose",
            path.display()
        ),
    }
}
