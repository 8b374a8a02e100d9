//! Export of a trained student as a folder that Hugging Face `AutoModel` and
//! sentence-transformers load (and `kdmcse eval` reads): the encoder under its Hugging Face key
//! names in `model.safetensors`, `config.json`, the tokenizer files, and the sentence-transformers
//! modules (Transformer + the run's pooling, cosine similarity), the run's `config.toml` and a
//! model card (`README.md`, see [`crate::model_card`]).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use bytes::Bytes;
use candle_core::{Device, Tensor};

use crate::checkpoint::layout::{
    self, TrainerState, ENCODER_CONFIG, ENCODER_PREFIX, MODEL, POOLER, TOKENIZER_PREFIX,
};
use crate::checkpoint::Checkpoint;
use crate::model::pooling::{pooling_config, POOLING_CONFIG};
use crate::model_card::{model_card, CardFacts};

/// The versions `scripts/check-export.py` last loaded an export with (it reports a mismatch with
/// the ones installed): sentence-transformers records what a folder was saved with.
const CHECKED_WITH: [(&str, &str); 3] =
    [("sentence_transformers", "6.2.0"), ("transformers", "5.24.0"), ("pytorch", "2.15.0")];

/// The files of the export of `checkpoint` (relative path -> contents).
pub fn export_files(checkpoint: &Checkpoint) -> Result<BTreeMap<String, Bytes>> {
    let config = layout::encoder_config(checkpoint)?;
    let weights = layout::tensors(checkpoint, MODEL, &Device::Cpu)?;
    let mut encoder: BTreeMap<String, Tensor> = weights
        .into_iter()
        .filter_map(|(k, t)| k.strip_prefix(ENCODER_PREFIX).map(|k| (k.to_owned(), t)))
        .collect();
    if let Some(pooler) = checkpoint.parts.get(POOLER) {
        encoder.extend(candle_core::safetensors::load_buffer(pooler, &Device::Cpu)?);
    }
    let mut files = BTreeMap::new();
    files.insert("model.safetensors".to_owned(), Bytes::from(safetensors::serialize(&encoder, None)?));
    files.insert("config.json".to_owned(), checkpoint.part(ENCODER_CONFIG)?.clone());
    for (name, data) in &checkpoint.parts {
        if let Some(file) = name.strip_prefix(TOKENIZER_PREFIX) {
            files.insert(file.to_owned(), data.clone());
        }
    }
    let json = |v: serde_json::Value| Bytes::from(serde_json::to_vec_pretty(&v).expect("JSON serialises"));
    files.insert(
        "modules.json".to_owned(),
        json(serde_json::json!([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
        ])),
    );
    // No truncation beyond the position table, as `kdmcse eval` and `kdmcse encode` do.
    files.insert(
        "sentence_bert_config.json".to_owned(),
        json(serde_json::json!({"max_seq_length": config.max_tokens(), "do_lower_case": false})),
    );
    let pooling = layout::run_config(checkpoint)?.model.pooling;
    files.insert(POOLING_CONFIG.to_owned(), json(pooling_config(config.hidden_size, pooling)));
    files.insert(
        "config_sentence_transformers.json".to_owned(),
        json(serde_json::json!({
            "model_type": "SentenceTransformer",
            "__version__": CHECKED_WITH
                .iter()
                .map(|(package, version)| (package.to_string(), serde_json::Value::from(*version)))
                .collect::<serde_json::Map<_, _>>(),
            "prompts": {},
            "default_prompt_name": null,
            "similarity_fn_name": "cosine"
        })),
    );
    files.insert(layout::CONFIG.to_owned(), checkpoint.part(layout::CONFIG)?.clone());
    files.insert("README.md".to_owned(), Bytes::from(readme(checkpoint, &[])?));
    Ok(files)
}

/// The model card of `checkpoint` (its config and trainer state), with STS results (task name,
/// Spearman x100) when the export was evaluated.
pub fn readme(checkpoint: &Checkpoint, sts: &[(String, f64)]) -> Result<String> {
    let dim = layout::encoder_config(checkpoint)?.hidden_size;
    let cfg = layout::run_config(checkpoint)?;
    let config_toml = String::from_utf8_lossy(checkpoint.part(layout::CONFIG)?).into_owned();
    let state = TrainerState::of(checkpoint)?;
    let facts = CardFacts {
        checkpoint: &checkpoint.name,
        step: state.step,
        best: state.best_score.zip(state.best_step),
        pooling: cfg.model.pooling,
        dim,
        sts,
    };
    Ok(model_card(&cfg, &config_toml, &facts))
}

/// Writes `files` under the local folder `out`.
pub fn write_dir(files: &BTreeMap<String, Bytes>, out: &Path) -> Result<()> {
    for (rel, data) in files {
        let path = out.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, data).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
