//! What a training checkpoint holds, part by part, and how a checkpoint location is opened
//! (`kdmcse train --resume`, `kdmcse export --checkpoint`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{Context, Result};
use bytes::Bytes;
use candle_core::{Device, Tensor};

use serde::{Deserialize, Serialize};

use super::{split_location, Checkpoint, CheckpointStore};
use crate::config::TrainConfig;
use crate::data::DataPosition;
use crate::model;

/// Every trainable tensor: `encoder.<Hugging Face key>` and `heads.<head>.dense.*`.
pub const MODEL: &str = "model.safetensors";
pub const ENCODER_PREFIX: &str = "encoder.";
pub const HEADS_PREFIX: &str = "heads.";
/// The optimiser's moments and step counts.
pub const OPTIMIZER: &str = "optimizer.safetensors";
/// Where the run stands ([`TrainerState`]).
pub const STATE: &str = "trainer.json";
/// The run's effective configuration.
pub const CONFIG: &str = "config.toml";
/// The student's Hugging Face `config.json`.
pub const ENCODER_CONFIG: &str = "encoder_config.json";
/// The base checkpoint's untrained pooler, carried for Hugging Face loaders.
pub const POOLER: &str = "pooler.safetensors";
/// Tokenizer files, `tokenizer/<file>`.
pub const TOKENIZER_PREFIX: &str = "tokenizer/";

/// Tokenizer files carried into checkpoints and exports when the model folder has them.
pub const TOKENIZER_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
];

/// The parts every checkpoint of a run carries unchanged, from the student's model folder: its
/// `config.json`, tokenizer files and pooler.
pub fn static_parts(model_dir: &Path, config: &model::Config) -> Result<BTreeMap<String, Bytes>> {
    let read = |path: &Path| std::fs::read(path).with_context(|| format!("cannot read {}", path.display()));
    let mut parts = BTreeMap::new();
    parts.insert(ENCODER_CONFIG.to_owned(), Bytes::from(read(&model_dir.join("config.json"))?));
    for file in TOKENIZER_FILES {
        let path = model_dir.join(file);
        if path.is_file() {
            parts.insert(format!("{TOKENIZER_PREFIX}{file}"), Bytes::from(read(&path)?));
        }
    }
    if let Some(pooler) = pooler(model_dir, config)? {
        parts.insert(POOLER.to_owned(), pooler);
    }
    Ok(parts)
}

/// The base checkpoint's pooler weights (untouched by training), for Hugging Face loaders.
fn pooler(dir: &Path, config: &model::Config) -> Result<Option<Bytes>> {
    let path = dir.join("model.safetensors");
    if !path.is_file() {
        return Ok(None);
    }
    let prefix = format!("{}.", config.checkpoint_prefix());
    let pooler: HashMap<String, Tensor> = candle_core::safetensors::load(&path, &Device::Cpu)?
        .into_iter()
        .filter_map(|(k, t)| {
            let k = k.strip_prefix(&prefix).map(str::to_owned).unwrap_or(k);
            k.starts_with("pooler.").then_some((k, t))
        })
        .collect();
    if pooler.is_empty() {
        return Ok(None);
    }
    Ok(Some(safetensors_bytes(&pooler)?))
}

/// Named tensors as a safetensors file, keys sorted (the same bytes for the same tensors).
pub fn safetensors_bytes(tensors: &HashMap<String, Tensor>) -> Result<Bytes> {
    let sorted: BTreeMap<&String, &Tensor> = tensors.iter().collect();
    Ok(Bytes::from(safetensors::serialize(sorted, None)?))
}

/// Where a run stands: saved with every checkpoint ([`STATE`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimiser steps taken.
    pub step: u64,
    #[serde(flatten)]
    pub data: DataPosition,
    pub best_score: Option<f64>,
    pub best_step: Option<u64>,
    /// The world size that wrote the checkpoint (cursors are global; see `data::sampler`).
    pub world_size: usize,
}

impl TrainerState {
    /// A run before its first step on `world_size` ranks.
    pub fn start(world_size: usize) -> Self {
        Self { step: 0, data: DataPosition::default(), best_score: None, best_step: None, world_size }
    }

    /// The state `checkpoint` was written with.
    pub fn of(checkpoint: &Checkpoint) -> Result<Self> {
        serde_json::from_slice(checkpoint.part(STATE)?)
            .with_context(|| format!("checkpoint {}: unreadable {STATE}", checkpoint.name))
    }
}

/// The configuration the run of `checkpoint` trained with (its [`CONFIG`]), read with today's
/// defaults for keys it predates.
pub fn run_config(checkpoint: &Checkpoint) -> Result<TrainConfig> {
    let text = std::str::from_utf8(checkpoint.part(CONFIG)?)
        .with_context(|| format!("checkpoint {}: {CONFIG} is not UTF-8", checkpoint.name))?;
    toml::from_str(text).with_context(|| format!("checkpoint {}: unreadable {CONFIG}", checkpoint.name))
}

/// The student's Hugging Face config that `checkpoint` carries ([`ENCODER_CONFIG`]).
pub fn encoder_config(checkpoint: &Checkpoint) -> Result<model::Config> {
    serde_json::from_slice(checkpoint.part(ENCODER_CONFIG)?)
        .with_context(|| format!("checkpoint {}: unreadable {ENCODER_CONFIG}", checkpoint.name))
}

/// A safetensors part of `checkpoint` ([`MODEL`], [`OPTIMIZER`]) as named tensors on `device`.
pub fn tensors(checkpoint: &Checkpoint, part: &str, device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load_buffer(checkpoint.part(part)?, device)
        .with_context(|| format!("checkpoint {}: unreadable {part}", checkpoint.name))
}

/// Opens the checkpoint `location` names: `<root>/checkpoints/<name>`; a bare name
/// (`step-00000100`) of the run `run`; or a run's root, whose newest checkpoint that verifies is
/// taken.
pub fn open(location: &str, run: Option<&CheckpointStore>) -> Result<Checkpoint> {
    if let Some((root, name)) = split_location(location) {
        return CheckpointStore::open_existing(root)?.load(name);
    }
    match run {
        Some(run) if !location.contains('/') => run.load(location),
        _ => CheckpointStore::open_existing(location)?
            .load_newest()?
            .with_context(|| format!("no checkpoint that verifies under {location}")),
    }
}
