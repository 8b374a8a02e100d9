//! What a training checkpoint holds, part by part, and how a checkpoint location is opened
//! (`kdmcse train --resume`, `kdmcse export --checkpoint`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{Context, Result};
use bytes::Bytes;
use candle_core::{Device, Tensor};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{split_location, Checkpoint, CheckpointStore};
use crate::config::TrainConfig;
use crate::data::{CorpusDigest, DataPosition};
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
/// What the run read, by content ([`InputDigests`]).
pub const INPUTS: &str = "inputs.json";

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

/// What a run reads, by content: a resume onto other data (or another tokenizer), or ranks that
/// read different files, would train a mixture without any error, so both are refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputDigests {
    /// `data.text`.
    pub text: CorpusDigest,
    /// `data.paired`, when the objective reads it.
    pub paired: Option<CorpusDigest>,
    /// The SHA-256 of the model folder's [`static_parts`] (its `config.json`, tokenizer, pooler).
    pub model_files: String,
}

impl InputDigests {
    /// The digests of a run's corpora and the model folder's `static_parts`.
    pub fn new(
        text: CorpusDigest,
        paired: Option<CorpusDigest>,
        static_parts: &BTreeMap<String, Bytes>,
    ) -> Self {
        let mut hash = Sha256::new();
        for (name, bytes) in static_parts {
            hash.update((name.len() as u64).to_le_bytes());
            hash.update(name.as_bytes());
            hash.update((bytes.len() as u64).to_le_bytes());
            hash.update(bytes);
        }
        Self { text, paired, model_files: hex::encode(hash.finalize()) }
    }

    /// What the checkpoint (or the run) named `whose` read, from its `parts` ([`INPUTS`]); `None`
    /// for a checkpoint written before kdmcse saved it.
    pub fn of(parts: &BTreeMap<String, Bytes>, whose: &str) -> Result<Option<Self>> {
        let Some(bytes) = parts.get(INPUTS) else { return Ok(None) };
        let digests =
            serde_json::from_slice(bytes).with_context(|| format!("{whose}: unreadable {INPUTS}"))?;
        Ok(Some(digests))
    }

    /// The first input that differs from `other`'s: what it is (with its key), and each side's
    /// digest.
    pub fn difference(&self, other: &Self) -> Option<(&'static str, String, String)> {
        if self.text != other.text {
            let (a, b) = (self.text.describe("sentences"), other.text.describe("sentences"));
            return Some(("the text corpus (data.text)", a, b));
        }
        if self.paired != other.paired {
            let show =
                |d: &Option<CorpusDigest>| d.as_ref().map_or("(none)".into(), |d| d.describe("captions"));
            return Some(("the paired corpus (data.paired)", show(&self.paired), show(&other.paired)));
        }
        let short = |s: &str| format!("sha256 {}", &s[..s.len().min(16)]);
        (self.model_files != other.model_files).then(|| {
            (
                "the model folder's config.json and tokenizer (model.path)",
                short(&self.model_files),
                short(&other.model_files),
            )
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(rows: usize, sha256: &str) -> CorpusDigest {
        CorpusDigest { rows, sha256: sha256.into() }
    }

    /// The corpora are compared before the model files, and the model files by every byte of
    /// every part, where a part's bytes cannot pass for its name's.
    #[test]
    fn the_first_input_that_differs_is_named_with_both_digests() {
        let parts = |tokenizer: &'static [u8]| {
            BTreeMap::from([
                (ENCODER_CONFIG.to_owned(), Bytes::from_static(b"{}")),
                (format!("{TOKENIZER_PREFIX}tokenizer.json"), Bytes::from_static(tokenizer)),
            ])
        };
        let run = |text: &str, tokenizer| InputDigests::new(digest(10, text), None, &parts(tokenizer));
        let ours = run("aa", b"{\"v\":1}");
        assert_eq!(ours.difference(&run("aa", b"{\"v\":1}")), None);
        let (what, was, now) = ours.difference(&run("bb", b"{\"v\":2}")).unwrap();
        assert_eq!(
            (what, was.as_str(), now.as_str()),
            ("the text corpus (data.text)", "10 sentences (sha256 aa)", "10 sentences (sha256 bb)")
        );
        let (what, ..) = ours.difference(&run("aa", b"{\"v\":2}")).unwrap();
        assert!(what.contains("model.path"), "{what}");
        let paired = InputDigests { paired: Some(digest(5, "cc")), ..ours.clone() };
        let (what, was, now) = ours.difference(&paired).unwrap();
        assert_eq!(
            (what, was.as_str(), now.as_str()),
            ("the paired corpus (data.paired)", "(none)", "5 captions (sha256 cc)")
        );
        // The same bytes split otherwise between a part's name and its contents.
        let moved = BTreeMap::from([(format!("{ENCODER_CONFIG}{{"), Bytes::from_static(b"}"))]);
        let whole = BTreeMap::from([(ENCODER_CONFIG.to_owned(), Bytes::from_static(b"{}"))]);
        assert_ne!(
            InputDigests::new(digest(1, "a"), None, &moved),
            InputDigests::new(digest(1, "a"), None, &whole)
        );
    }
}
