//! The student encoder (BERT/RoBERTa), its heads, dropout and the packing of a batch's tokens,
//! the CLIP teacher, and loading a Hugging Face model folder (`config.json`, `model.safetensors`
//! or `pytorch_model.bin`).

pub mod bert;
pub mod clip;
pub mod dropout;
pub mod heads;
pub mod packing;
pub mod pooling;

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};

pub use bert::{BertModel, Config};
pub use pooling::Pooling;

/// Reads `DIR/config.json`; an architecture other than BERT/RoBERTa is an error naming the file.
pub fn load_config(dir: &Path) -> anyhow::Result<Config> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read model config {}", path.display()))?;
    let config: Config = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: not a supported model config (kdmcse trains BERT and RoBERTa: model_type \
             \"bert\", \"roberta\" or \"xlm-roberta\", absolute positions)",
            path.display()
        )
    })?;
    Ok(config)
}

/// Loads the encoder weights of a model folder, with keys as in a bare `BertModel` checkpoint:
/// task-model prefixes (`bert.`, `roberta.`) are stripped and old `LayerNorm.gamma/beta` names
/// renamed, so `BertModel::load` sees one naming scheme whatever saved the file.
pub fn load_encoder_weights(
    dir: &Path,
    config: &Config,
    device: &Device,
) -> anyhow::Result<HashMap<String, Tensor>> {
    let safetensors = dir.join("model.safetensors");
    let pth = dir.join("pytorch_model.bin");
    let raw: Vec<(String, Tensor)> = if safetensors.exists() {
        candle_core::safetensors::load(&safetensors, device)
            .with_context(|| format!("cannot load weights from {}", safetensors.display()))?
            .into_iter()
            .collect()
    } else if pth.exists() {
        candle_core::pickle::read_all(&pth)
            .with_context(|| format!("cannot load weights from {}", pth.display()))?
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_device(device)?)))
            .collect::<candle_core::Result<_>>()?
    } else {
        bail!("no weights in {}: expected model.safetensors or pytorch_model.bin", dir.display());
    };
    let prefix = format!("{}.", config.checkpoint_prefix());
    let weights: HashMap<String, Tensor> = raw
        .into_iter()
        .filter_map(|(key, tensor)| {
            let key = key.strip_prefix(&prefix).unwrap_or(&key);
            if !(key.starts_with("embeddings.") || key.starts_with("encoder.")) {
                return None; // pooler, MLM/task heads: not part of the sentence encoder
            }
            let key = key
                .replace("LayerNorm.gamma", "LayerNorm.weight")
                .replace("LayerNorm.beta", "LayerNorm.bias");
            let tensor = tensor.to_dtype(candle_core::DType::F32);
            Some(tensor.map(|t| (key, t)))
        })
        .collect::<candle_core::Result<_>>()?;
    if !weights.contains_key("embeddings.word_embeddings.weight") {
        bail!(
            "{}: no encoder weights found (looked for embeddings.word_embeddings.weight, with or \
             without a \"{}\" prefix)",
            dir.display(),
            config.checkpoint_prefix()
        );
    }
    Ok(weights)
}

/// Adds the encoder weights of a model folder to `varmap` as trainable variables named
/// `{prefix}{key}` (keys as [`load_encoder_weights`] gives them).
pub fn load_encoder_vars(
    varmap: &candle_nn::VarMap,
    prefix: &str,
    dir: &Path,
    config: &Config,
    device: &Device,
) -> anyhow::Result<()> {
    let weights = load_encoder_weights(dir, config, device)?;
    let mut data = varmap.data().lock().expect("varmap lock");
    for (name, tensor) in weights {
        data.insert(format!("{prefix}{name}"), candle_core::Var::from_tensor(&tensor)?);
    }
    Ok(())
}

/// Loads a model folder's encoder for inference (weights as constants, no autograd graph).
pub fn load_encoder(dir: &Path, device: &Device) -> anyhow::Result<BertModel> {
    let config = load_config(dir)?;
    let weights = load_encoder_weights(dir, &config, device)?;
    let vb = candle_nn::VarBuilder::from_tensors(weights, candle_core::DType::F32, device);
    BertModel::load(vb, &config).with_context(|| format!("{}: weights do not fit config.json", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both poolings' backward, over all positions and (CLS) over the first only, against
    /// candle's autograd of the pooling; padding positions get no gradient.
    #[test]
    fn pooling_backward_matches_autograd() {
        let device = Device::Cpu;
        let hidden = Tensor::randn(0f32, 1.0, (2, 4, 3), &device).unwrap();
        let mask = Tensor::new(&[[1u32, 1, 1, 1], [1, 1, 0, 0]], &device).unwrap();
        let grad = Tensor::randn(0f32, 1.0, (2, 3), &device).unwrap();
        for pooling in [Pooling::Cls, Pooling::Avg] {
            let expected =
                crate::ops::vjp(|h| pooling.pool(&h[0], &mask), &[&hidden], &grad).unwrap().remove(0);
            let got = pooling.backward(&grad, &mask, 4).unwrap();
            let diff =
                (&expected - &got).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-6, "{pooling:?}: {diff}");
            let padding = got.get(1).unwrap().narrow(0, 2, 2).unwrap().abs().unwrap().sum_all().unwrap();
            assert_eq!(padding.to_scalar::<f32>().unwrap(), 0.0, "{pooling:?}: padding");
        }
        let first = Pooling::Cls.backward(&grad, &mask, 1).unwrap();
        assert_eq!(first.dims(), [2, 1, 3]);
    }
}
