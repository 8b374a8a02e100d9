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

use crate::checkpoint::layout::{self, ENCODER_CONFIG, ENCODER_PREFIX, MODEL, POOLER, TOKENIZER_PREFIX};
use crate::checkpoint::Checkpoint;
use crate::model::{Config, Pooling};
use crate::model_card::{model_card, CardFacts};
use crate::train::{TrainConfig, TrainerState};

/// The versions `scripts/check-export.py` last loaded an export with (it reports a mismatch with
/// the ones installed): sentence-transformers records what a folder was saved with.
const CHECKED_WITH: [(&str, &str); 3] =
    [("sentence_transformers", "6.2.0"), ("transformers", "5.24.0"), ("pytorch", "2.15.0")];

/// sentence-transformers' pooling module of an export.
const POOLING_CONFIG: &str = "1_Pooling/config.json";

/// The files of the export of `checkpoint` (relative path -> contents).
pub fn export_files(checkpoint: &Checkpoint) -> Result<BTreeMap<String, Bytes>> {
    let config = encoder_config(checkpoint)?;
    let weights = candle_core::safetensors::load_buffer(checkpoint.part(MODEL)?, &Device::Cpu)?;
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
    let pooling = layout::pooling(checkpoint)?;
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

/// The encoder's Hugging Face config that `checkpoint` carries.
fn encoder_config(checkpoint: &Checkpoint) -> Result<Config> {
    serde_json::from_slice(checkpoint.part(ENCODER_CONFIG)?)
        .with_context(|| format!("checkpoint {}: unreadable {ENCODER_CONFIG}", checkpoint.name))
}

/// The model card of `checkpoint` (its config and trainer state), with STS results (task name,
/// Spearman x100) when the export was evaluated.
pub fn readme(checkpoint: &Checkpoint, sts: &[(String, f64)]) -> Result<String> {
    let name = &checkpoint.name;
    let dim = encoder_config(checkpoint)?.hidden_size;
    let pooling = layout::pooling(checkpoint)?;
    let config_toml = String::from_utf8_lossy(checkpoint.part(layout::CONFIG)?).into_owned();
    let cfg: TrainConfig = toml::from_str(&config_toml)
        .with_context(|| format!("checkpoint {name}: unreadable {}", layout::CONFIG))?;
    let state = TrainerState::of(checkpoint)?;
    let facts = CardFacts {
        checkpoint: name,
        step: state.step,
        best: state.best_score.zip(state.best_step),
        pooling,
        dim,
        sts,
    };
    Ok(model_card(&cfg, &config_toml, &facts))
}

fn pooling_config(dim: usize, pooling: Pooling) -> serde_json::Value {
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
