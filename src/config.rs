//! The training configuration: a TOML file (through the `config` crate) layered with `KDMCSE_*`
//! environment variables and `--set key=value` overrides. Unknown keys are errors; the effective
//! configuration is logged and saved with every checkpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::device::DeviceSpec;
use crate::loss::{Objective, ObjectiveKind};
use crate::model::Pooling;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub model: ModelConfig,
    pub data: DataConfig,
    #[serde(default)]
    pub loss: Objective,
    #[serde(default)]
    pub train: TrainingConfig,
    pub output: OutputConfig,
    #[serde(default)]
    pub dist: DistConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The student: a Hugging Face BERT/RoBERTa folder.
    pub path: PathBuf,
    /// Sentence vector for the losses and for evaluation (the reference: CLS).
    #[serde(default = "default_pooling")]
    pub pooling: Pooling,
    /// Grounding-space dimension.
    #[serde(default = "default_proj_dim")]
    pub proj_dim: usize,
    /// Tokens per training sentence, special tokens included.
    #[serde(default = "default_max_len")]
    pub max_len: usize,
    /// How the four heads start: `"all_normal"` (each N(0, 0.02), bias 0) or `"mlp_normal"` (the
    /// MLP head so, the grounding, image and caption heads as PyTorch's `nn.Linear`: the official
    /// code's).
    #[serde(default)]
    pub head_init: HeadInit,
}

/// The heads' initialisation (`model.head_init`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadInit {
    #[default]
    AllNormal,
    MlpNormal,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Text corpora, concatenated in order, each read by its extension: `.txt` (one sentence a
    /// line, like wiki1m), `.jsonl`, `.csv`, `.tsv` or `.parquet` (the field or column
    /// `text_field`).
    pub text: Vec<PathBuf>,
    /// The JSON field or the CSV/TSV/Parquet column holding the sentences.
    #[serde(default = "default_text_field")]
    pub text_field: String,
    /// A paired corpus in the teacher interchange format (needed by mcse and kdmcse).
    #[serde(default)]
    pub paired: Option<PathBuf>,
    /// One paired batch every N steps; unset: the reference rule, text batches // paired batches.
    #[serde(default)]
    pub paired_every: Option<usize>,
    /// A folder laid out like ../shared/data: STS-B dev (stsb/sts-dev.csv) for model selection.
    pub eval: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingConfig {
    pub seed: u64,
    /// Examples per optimiser step over all ranks: the negative pool. Each rank takes
    /// `global_batch / world`, so one config trains the same model on any number of workers.
    /// Default (neither this nor `batch_size` set): 64.
    pub global_batch: Option<usize>,
    /// Examples per process and step (the pool is then `world x batch_size`); kept for older
    /// configs, exclusive with `global_batch`.
    pub batch_size: Option<usize>,
    /// Examples per forward chunk on a rank: smaller than the rank's batch, the step embeds the
    /// batch chunk by chunk without keeping activations, computes the loss over the whole pool,
    /// then re-runs each chunk and back-propagates the cached embedding gradients (the gradient
    /// cache), so the pool is not bounded by activation memory. Default: the whole rank batch.
    pub micro_batch: Option<usize>,
    /// Optimiser steps; 0 means `epochs` passes over the text corpus.
    pub max_steps: usize,
    pub epochs: usize,
    pub lr: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    /// `"adamw"` (`torch.optim.AdamW`) or `"transformers_adamw"` (`transformers.AdamW` of
    /// transformers 4.x, the official code's: eps added to sqrt(v), the bias corrections folded
    /// into the step size, weight decay after the update).
    pub optimizer: Optimizer,
    /// What an epoch is, for `epochs`, the schedule and the paired steps: `"text"` (one pass
    /// over the text corpus, paired steps among them) or `"text+paired"` (text batches plus
    /// paired batches, the official code's: a paired step at every step of the epoch divisible
    /// by text batches // paired batches, counted from 0 in each epoch).
    pub steps_per_epoch: StepsPerEpoch,
    /// Update parameters that got no gradient in a step (the grounding, image and caption heads on
    /// text steps) as if it were zero, once they have had one: PyTorch 1.7's `zero_grad()` left
    /// zeros, so the official code's AdamW moved them on every step.
    pub update_idle_params: bool,
    /// Global gradient-norm clip; 0 disables.
    pub grad_clip: f64,
    /// Micro-batches per optimiser step (each its own contrastive batch).
    pub grad_accum: usize,
    /// STS-B dev every N steps (and at the end); 0 disables.
    pub eval_steps: usize,
    /// `cpu`, `cuda` (this worker's GPU) or `cuda:N`.
    pub device: DeviceSpec,
    /// The encoder's matmul precision: `"fp32"`, or `"bf16"` (autocast-style mixed precision:
    /// bf16 matmuls, fp32 master weights, LayerNorm, softmax, losses and optimiser).
    pub precision: Precision,
    /// Let fp32 matmuls on CUDA use TF32 tensor cores (PyTorch's `allow_tf32`); no effect on CPU.
    pub tf32: bool,
    /// Time forward, backward and update separately in the metrics (`phases`); on a GPU this
    /// waits for the device between them, which costs a little.
    pub phase_timings: bool,
}

/// The optimiser's update formula (`train.optimizer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Optimizer {
    #[default]
    Adamw,
    TransformersAdamw,
}

/// What an epoch of training is (`train.steps_per_epoch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum StepsPerEpoch {
    #[default]
    #[serde(rename = "text")]
    Text,
    #[serde(rename = "text+paired")]
    TextPlusPaired,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    Bf16,
}

impl Precision {
    /// The dtype the encoder's matmuls run in.
    pub fn compute_dtype(self) -> candle_core::DType {
        match self {
            Precision::Fp32 => candle_core::DType::F32,
            Precision::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// The global batch when a config sets neither `global_batch` nor `batch_size` (the reference's).
pub const DEFAULT_GLOBAL_BATCH: usize = 64;

impl TrainingConfig {
    /// Examples per optimiser step on each of `world` ranks.
    pub fn rank_batch(&self, world: usize) -> Result<usize> {
        if let Some(per_rank) = self.batch_size {
            return Ok(per_rank);
        }
        let global = self.global_batch.unwrap_or(DEFAULT_GLOBAL_BATCH);
        if !global.is_multiple_of(world) {
            bail!(
                "train.global_batch = {global} does not divide over {world} ranks: use a multiple of {world}"
            );
        }
        Ok(global / world)
    }

    /// Examples per forward chunk for a rank batch of `rank_batch`.
    pub fn chunk(&self, rank_batch: usize) -> usize {
        self.micro_batch.map_or(rank_batch, |m| m.min(rank_batch))
    }
}

impl Default for TrainingConfig {
    /// The reference scripts' defaults (METHOD.md).
    fn default() -> Self {
        Self {
            seed: 1234,
            global_batch: None,
            batch_size: None,
            micro_batch: None,
            max_steps: 0,
            epochs: 3,
            lr: 3e-5,
            warmup_steps: 0,
            weight_decay: 0.0,
            betas: [0.9, 0.999],
            eps: 1e-8,
            optimizer: Optimizer::Adamw,
            steps_per_epoch: StepsPerEpoch::Text,
            update_idle_params: false,
            grad_clip: 1.0,
            grad_accum: 1,
            eval_steps: 125,
            device: DeviceSpec::Cpu,
            precision: Precision::Fp32,
            tf32: false,
            phase_timings: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// Path or URL (file://, s3://, ...) under which checkpoints and exports go.
    pub dir: String,
    /// Checkpoint every N steps (and at the end); 0: only at the end.
    #[serde(default = "default_checkpoint_steps")]
    pub checkpoint_steps: usize,
    /// Checkpoints kept besides `latest` and `best`.
    #[serde(default = "default_keep")]
    pub keep: usize,
    /// Local metrics file (JSON lines); default `<dir>/metrics.jsonl` for a local `dir`.
    #[serde(default)]
    pub metrics: Option<PathBuf>,
    /// Write checkpoints and export the best model; off only for throughput measurements.
    #[serde(default = "default_true")]
    pub save: bool,
    /// Off a terminal, rank 0 logs a progress line this often (seconds; 0: every step).
    #[serde(default = "default_log_every_s")]
    pub log_every_s: f64,
    /// Upload checkpoints in the background while training goes on (rank 0 copies the state to
    /// host memory at the step; one upload in flight); off: every rank waits for the upload.
    #[serde(default = "default_true")]
    pub async_checkpoint: bool,
}

/// Liveness of the ranks of a distributed run (see `dist::watchdog`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistConfig {
    /// Seconds between a rank's heartbeats to the rendezvous store.
    #[serde(default = "default_heartbeat_s")]
    pub heartbeat_s: f64,
    /// Seconds without a peer's heartbeat before the peer is declared lost and the run ends.
    #[serde(default = "default_peer_timeout_s")]
    pub peer_timeout_s: f64,
}

impl Default for DistConfig {
    fn default() -> Self {
        Self { heartbeat_s: default_heartbeat_s(), peer_timeout_s: default_peer_timeout_s() }
    }
}

impl DistConfig {
    pub fn liveness(&self) -> crate::dist::watchdog::Liveness {
        crate::dist::watchdog::Liveness {
            heartbeat: std::time::Duration::from_secs_f64(self.heartbeat_s),
            peer_timeout: std::time::Duration::from_secs_f64(self.peer_timeout_s),
        }
    }
}

fn default_heartbeat_s() -> f64 {
    crate::dist::watchdog::Liveness::default().heartbeat.as_secs_f64()
}
fn default_peer_timeout_s() -> f64 {
    crate::dist::watchdog::Liveness::default().peer_timeout.as_secs_f64()
}

fn default_text_field() -> String {
    "text".into()
}
fn default_pooling() -> Pooling {
    Pooling::Cls
}
fn default_proj_dim() -> usize {
    256
}
fn default_max_len() -> usize {
    32
}
fn default_checkpoint_steps() -> usize {
    100
}
fn default_log_every_s() -> f64 {
    30.0
}
fn default_keep() -> usize {
    2
}
fn default_true() -> bool {
    true
}

impl TrainConfig {
    /// Reads `file`, then `KDMCSE_<SECTION>__<KEY>` variables (`KDMCSE_TRAIN__MAX_STEPS=10`),
    /// then `overrides` (`train.max_steps=10`); checks the result.
    pub fn load(file: &Path, overrides: &[String]) -> Result<Self> {
        // Only variables that name a section: KDMCSE_TIMEOUT and friends are not config keys.
        let sections: Vec<String> =
            Self::sections().iter().map(|s| format!("{}__", s.to_uppercase())).collect();
        let env: std::collections::HashMap<String, String> = std::env::vars()
            .filter(|(k, _)| {
                k.strip_prefix("KDMCSE_").is_some_and(|rest| sections.iter().any(|s| rest.starts_with(s)))
            })
            .collect();
        let mut builder = config::Config::builder()
            .add_source(config::File::from(file).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("KDMCSE")
                    .prefix_separator("_")
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(env)),
            );
        for item in overrides {
            let (key, value) =
                item.split_once('=').with_context(|| format!("--set {item:?}: expected KEY=VALUE"))?;
            builder = builder.set_override(key.trim(), parse_value(value.trim()))?;
        }
        let raw = builder.build().with_context(|| format!("cannot read config {}", file.display()))?;
        let config: TrainConfig = raw
            .try_deserialize()
            .with_context(|| format!("invalid config {} (with overrides)", file.display()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("the config serialises")
    }

    /// Checks every value against its meaning: ranges (naming the key, the value and what is
    /// allowed), paths that must be given, and combinations that cannot work.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        self.data.validate()?;
        self.loss.validate(self.data.paired.is_some())?;
        self.train.validate()?;
        self.output.validate()?;
        self.dist.validate()
    }

    /// The config's sections (`model`, `data`, ...), as its type declares them: the prefixes of
    /// `KDMCSE_<SECTION>__<KEY>` variables.
    pub fn sections() -> &'static [&'static str] {
        struct_fields::<Self>()
    }
}

impl ModelConfig {
    fn validate(&self) -> Result<()> {
        path_given("model.path", &self.path)?;
        in_range("model.proj_dim", self.proj_dim, 1..)?;
        // [CLS] sentence [SEP]: fewer tokens leave no room for the sentence.
        in_range("model.max_len", self.max_len, 3..)
    }
}

impl DataConfig {
    fn validate(&self) -> Result<()> {
        if self.text.is_empty() {
            bail!("data.text lists no corpus");
        }
        for (i, path) in self.text.iter().enumerate() {
            path_given(&format!("data.text[{i}]"), path)?;
        }
        if let Some(paired) = &self.paired {
            path_given("data.paired", paired)?;
        }
        path_given("data.eval", &self.eval)?;
        if let Some(every) = self.paired_every {
            in_range("data.paired_every", every, 1..)?;
        }
        Ok(())
    }
}

impl Objective {
    /// The `[loss]` section's checks; `paired_data`: whether `data.paired` is set.
    fn validate(&self, paired_data: bool) -> Result<()> {
        positive("loss.temp", self.temp)?;
        positive("loss.temp_vl", self.temp_vl)?;
        non_negative("loss.lambda", self.lambda)?;
        // An angular margin beyond pi/2 turns every negative's cosine around.
        in_range("loss.margin_text", self.margin_text, 0.0..=std::f64::consts::FRAC_PI_2)?;
        in_range("loss.margin_vl", self.margin_vl, 0.0..=std::f64::consts::FRAC_PI_2)?;
        match self.filter {
            Some(crate::loss::FilterScore::Cosine) => {
                in_range("loss.filter_threshold", self.filter_threshold, -1.0..=1.0)?
            }
            _ => finite("loss.filter_threshold", self.filter_threshold)?,
        }
        if self.uses_paired_data() && !paired_data {
            bail!("loss.objective = {:?} needs data.paired (a teacher feature folder)", self.kind);
        }
        let margins_or_filter = self.margin_text != 0.0 || self.margin_vl != 0.0 || self.filter.is_some();
        if self.kind == ObjectiveKind::Mcse && margins_or_filter {
            bail!("loss.objective = \"mcse\" has no margins and no filter; use \"kdmcse\" for loss.margin_* / loss.filter");
        }
        Ok(())
    }
}

impl TrainingConfig {
    fn validate(&self) -> Result<()> {
        // In-batch negatives need a second example.
        match (self.global_batch, self.batch_size) {
            (Some(_), Some(_)) => bail!(
                "set train.global_batch (examples per step over all ranks) or train.batch_size (per \
                 process), not both"
            ),
            (Some(global), None) => in_range("train.global_batch", global, 2..)?,
            (None, Some(per_rank)) => in_range("train.batch_size", per_rank, 2..)?,
            (None, None) => {}
        }
        if let Some(micro) = self.micro_batch {
            in_range("train.micro_batch", micro, 1..)?;
        }
        in_range("train.grad_accum", self.grad_accum, 1..)?;
        if self.max_steps == 0 && self.epochs == 0 {
            bail!("set train.max_steps or train.epochs (both are 0)");
        }
        positive("train.lr", self.lr)?;
        non_negative("train.weight_decay", self.weight_decay)?;
        for (i, beta) in self.betas.iter().enumerate() {
            in_range(&format!("train.betas[{i}]"), *beta, 0.0..1.0)?;
        }
        positive("train.eps", self.eps)?;
        non_negative("train.grad_clip", self.grad_clip)
    }
}

impl OutputConfig {
    fn validate(&self) -> Result<()> {
        if self.dir.trim().is_empty() {
            bail!("output.dir is empty: give a folder or a URL for checkpoints");
        }
        non_negative("output.log_every_s", self.log_every_s)?;
        if let Some(metrics) = &self.metrics {
            path_given("output.metrics", metrics)?;
        }
        Ok(())
    }
}

impl DistConfig {
    fn validate(&self) -> Result<()> {
        positive("dist.heartbeat_s", self.heartbeat_s)?;
        // A peer gets at least two heartbeats before it can be declared lost.
        finite("dist.peer_timeout_s", self.peer_timeout_s)?;
        if self.peer_timeout_s < 2.0 * self.heartbeat_s {
            bail!(
                "dist.peer_timeout_s = {} must be at least twice dist.heartbeat_s = {}",
                self.peer_timeout_s,
                self.heartbeat_s
            );
        }
        Ok(())
    }
}

/// The field names serde reads for struct `T` (asked of its `Deserialize` impl, which names them
/// to the deserializer before it reads anything).
fn struct_fields<T: serde::de::DeserializeOwned>() -> &'static [&'static str] {
    struct Probe<'a>(&'a mut &'static [&'static str]);
    impl<'de> serde::Deserializer<'de> for Probe<'_> {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(serde::de::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(serde::de::Error::custom("fields read"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
            unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

/// Keys a resumed run may change: they decide where and how often things are written and
/// evaluated, not the weights a step computes (`model.path` may move; the architecture is checked
/// on its own).
pub const RESULT_NEUTRAL_KEYS: [&str; 12] = [
    "dist.heartbeat_s",
    "dist.peer_timeout_s",
    "model.path",
    "output.async_checkpoint",
    "output.dir",
    "output.keep",
    "output.checkpoint_steps",
    "output.metrics",
    "output.save",
    "output.log_every_s",
    "train.eval_steps",
    "train.phase_timings",
];

/// Keys that name the training data. Where the data itself is compared (by the digests of
/// [`crate::checkpoint::layout::InputDigests`]) they may differ: files may move between a run and
/// its resume.
pub const DATA_PATH_KEYS: [&str; 2] = ["data.text", "data.paired"];

/// Keys that say where files are, which may differ between nodes (their mounts): the ranks
/// compare the files instead (the data and model folder by content, the output store by the
/// checkpoints it lists; the dev set and the metrics file are rank 0's alone). Every other key
/// must be the same on every rank, those deciding when ranks meet in collectives (evaluations,
/// checkpoints) included.
pub const NODE_PATH_KEYS: [&str; 6] =
    ["data.eval", "data.paired", "data.text", "model.path", "output.dir", "output.metrics"];

/// The first key (in sorted order, neutral keys left out, and with `data_by_content` the
/// [`DATA_PATH_KEYS`]) whose value differs between a checkpoint's config and this run's, with
/// both values.
pub fn training_difference(
    checkpoint: &TrainConfig,
    run: &TrainConfig,
    data_by_content: bool,
) -> Option<(String, String, String)> {
    let mut except = RESULT_NEUTRAL_KEYS.to_vec();
    if data_by_content {
        except.extend(DATA_PATH_KEYS);
    }
    first_difference(&keys_except(checkpoint, &except), &keys_except(run, &except))
}

/// `section.key` -> value (as TOML text) of every key of `cfg` but those of `except`.
pub fn keys_except(cfg: &TrainConfig, except: &[&str]) -> BTreeMap<String, String> {
    let table = toml::from_str::<toml::Table>(&cfg.to_toml()).expect("the config serialises to TOML");
    let mut keys = flatten(&table);
    keys.retain(|k, _| !except.contains(&k.as_str()));
    keys
}

/// The first key (in sorted order) whose value differs between `a` and `b` ([`keys_except`]),
/// with its value in each.
pub fn first_difference(
    a: &BTreeMap<String, String>,
    b: &BTreeMap<String, String>,
) -> Option<(String, String, String)> {
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "(unset)".into());
    keys.into_iter().find_map(|key| {
        let (x, y) = (a.get(key), b.get(key));
        (x != y).then(|| (key.clone(), show(x), show(y)))
    })
}

/// `section.key` -> the value as TOML text.
fn flatten(table: &toml::Table) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (section, value) in table {
        match value {
            toml::Value::Table(keys) => {
                for (key, v) in keys {
                    out.insert(format!("{section}.{key}"), v.to_string());
                }
            }
            other => {
                out.insert(section.clone(), other.to_string());
            }
        }
    }
    out
}

/// `key`'s `value` lies in `range`, else an error naming all three.
pub fn in_range<T, R>(key: &str, value: T, range: R) -> Result<()>
where
    T: PartialOrd + std::fmt::Display,
    R: std::ops::RangeBounds<T> + std::fmt::Debug,
{
    if !range.contains(&value) {
        bail!("{key} = {value} is out of range: allowed {range:?}");
    }
    Ok(())
}

fn finite(key: &str, value: f64) -> Result<()> {
    if !value.is_finite() {
        bail!("{key} = {value} must be a finite number");
    }
    Ok(())
}

fn positive(key: &str, value: f64) -> Result<()> {
    finite(key, value)?;
    if value <= 0.0 {
        bail!("{key} = {value} is out of range: allowed > 0");
    }
    Ok(())
}

fn non_negative(key: &str, value: f64) -> Result<()> {
    finite(key, value)?;
    in_range(key, value, 0.0..)
}

fn path_given(key: &str, path: &Path) -> Result<()> {
    if path.as_os_str().is_empty() {
        bail!("{key} is empty: give a path");
    }
    Ok(())
}

/// `--set` values: TOML scalars and arrays (`3e-5`, `true`, `"s"`, `[1, 2]`), else a string.
fn parse_value(text: &str) -> config::Value {
    match toml::from_str::<toml::Table>(&format!("v = {text}")) {
        Ok(table) => toml_to_config(&table["v"]),
        Err(_) => config::Value::from(text),
    }
}

fn toml_to_config(value: &toml::Value) -> config::Value {
    match value {
        toml::Value::String(s) => s.clone().into(),
        toml::Value::Integer(i) => (*i).into(),
        toml::Value::Float(f) => (*f).into(),
        toml::Value::Boolean(b) => (*b).into(),
        toml::Value::Array(items) => items.iter().map(toml_to_config).collect::<Vec<_>>().into(),
        other => other.to_string().into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sections the environment may override are the config's own, a new one included.
    #[test]
    fn the_sections_are_the_configs_tables() {
        let cfg: TrainConfig = toml::from_str(
            "[model]\npath = \"m\"\n[data]\ntext = [\"t\"]\neval = \"e\"\n[output]\ndir = \"o\"",
        )
        .unwrap();
        let tables: toml::Table = toml::from_str(&cfg.to_toml()).unwrap();
        let mut sections: Vec<&str> = TrainConfig::sections().to_vec();
        let mut expected: Vec<&str> = tables.keys().map(String::as_str).collect();
        sections.sort();
        expected.sort();
        assert_eq!(sections, expected);
    }
}
