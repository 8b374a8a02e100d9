//! The training configuration: a TOML file (through the `config` crate) layered with `KDMCSE_*`
//! environment variables and `--set key=value` overrides. Unknown keys are errors; the effective
//! configuration is logged and saved with every checkpoint.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::loss::{FilterScore, NegativeFilter, Objective};
use crate::model::Pooling;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub model: ModelConfig,
    pub data: DataConfig,
    #[serde(default)]
    pub loss: LossConfig,
    #[serde(default)]
    pub train: TrainingConfig,
    pub output: OutputConfig,
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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Text corpora, one sentence a line (like wiki1m), concatenated in order.
    pub text: Vec<PathBuf>,
    /// A paired corpus in the teacher interchange format (needed by mcse and kdmcse).
    #[serde(default)]
    pub paired: Option<PathBuf>,
    /// One paired batch every N steps; unset: the reference rule, text batches // paired batches.
    #[serde(default)]
    pub paired_every: Option<usize>,
    /// A folder laid out like ../shared/data: STS-B dev (stsb/sts-dev.csv) for model selection.
    pub eval: PathBuf,
}

/// Which objective trains the student.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjectiveKind {
    /// Text-text InfoNCE on text batches only (margin_text may be set: SimCSE + angular margin).
    Simcse,
    /// Text-text plus grounding terms on paired batches, no margins, no filter.
    Mcse,
    /// MCSE with angular margins (fixed m1, teacher-adaptive m2) and the optional filter.
    Kdmcse,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossConfig {
    pub objective: ObjectiveKind,
    pub temp: f64,
    pub temp_vl: f64,
    pub lambda: f64,
    pub margin_text: f64,
    pub margin_vl: f64,
    /// Noisy-negative filter: `"off"`, `"cosine"` or `"raw_dot"`.
    pub filter: FilterMode,
    pub filter_threshold: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FilterMode {
    Off,
    Cosine,
    RawDot,
}

impl Default for LossConfig {
    /// The reference scripts' KDMCSE settings, with the filter off.
    fn default() -> Self {
        let o = Objective::default();
        Self {
            objective: ObjectiveKind::Kdmcse,
            temp: o.temp,
            temp_vl: o.temp_vl,
            lambda: o.lambda,
            margin_text: o.margin_text,
            margin_vl: o.margin_vl,
            filter: FilterMode::Off,
            filter_threshold: 0.8,
        }
    }
}

impl LossConfig {
    pub fn objective(&self) -> Objective {
        let filter = match self.filter {
            FilterMode::Off => None,
            FilterMode::Cosine => {
                Some(NegativeFilter { score: FilterScore::Cosine, threshold: self.filter_threshold })
            }
            FilterMode::RawDot => {
                Some(NegativeFilter { score: FilterScore::RawDot, threshold: self.filter_threshold })
            }
        };
        Objective {
            temp: self.temp,
            temp_vl: self.temp_vl,
            lambda: self.lambda,
            margin_text: self.margin_text,
            margin_vl: self.margin_vl,
            filter,
        }
    }

    pub fn uses_paired_data(&self) -> bool {
        self.objective != ObjectiveKind::Simcse
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingConfig {
    pub seed: u64,
    /// Sentences per process and step.
    pub batch_size: usize,
    /// Optimiser steps; 0 means `epochs` passes over the text corpus.
    pub max_steps: usize,
    pub epochs: usize,
    pub lr: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    /// Global gradient-norm clip; 0 disables.
    pub grad_clip: f64,
    /// Micro-batches per optimiser step (each its own contrastive batch).
    pub grad_accum: usize,
    /// STS-B dev every N steps (and at the end); 0 disables.
    pub eval_steps: usize,
    /// `cpu` or `cuda:N` (`cuda` alone means this process's LOCAL_RANK).
    pub device: String,
    /// The encoder's matmul precision: `"fp32"`, or `"bf16"` (autocast-style mixed precision:
    /// bf16 matmuls, fp32 master weights, LayerNorm, softmax, losses and optimiser).
    pub precision: Precision,
    /// Let fp32 matmuls on CUDA use TF32 tensor cores (PyTorch's `allow_tf32`); no effect on CPU.
    pub tf32: bool,
    /// Time forward, backward and update separately in the metrics (`phases`); on a GPU this
    /// waits for the device between them, which costs a little.
    pub phase_timings: bool,
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

impl Default for TrainingConfig {
    /// The reference scripts' defaults (METHOD.md).
    fn default() -> Self {
        Self {
            seed: 1234,
            batch_size: 64,
            max_steps: 0,
            epochs: 3,
            lr: 3e-5,
            warmup_steps: 0,
            weight_decay: 0.0,
            betas: [0.9, 0.999],
            eps: 1e-8,
            grad_clip: 1.0,
            grad_accum: 1,
            eval_steps: 125,
            device: "cpu".into(),
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
fn default_keep() -> usize {
    2
}

impl TrainConfig {
    /// Reads `file`, then `KDMCSE_<SECTION>__<KEY>` variables (`KDMCSE_TRAIN__MAX_STEPS=10`),
    /// then `overrides` (`train.max_steps=10`); checks the result.
    pub fn load(file: &Path, overrides: &[String]) -> Result<Self> {
        // Only variables that name a section: KDMCSE_TIMEOUT and friends are not config keys.
        let sections = ["MODEL__", "DATA__", "LOSS__", "TRAIN__", "OUTPUT__"];
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

    pub fn validate(&self) -> Result<()> {
        let t = &self.train;
        if t.batch_size < 2 {
            bail!("train.batch_size must be at least 2 (in-batch negatives), got {}", t.batch_size);
        }
        if t.grad_accum == 0 {
            bail!("train.grad_accum must be at least 1");
        }
        if t.max_steps == 0 && t.epochs == 0 {
            bail!("set train.max_steps or train.epochs");
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            bail!("train.lr must be positive, got {}", t.lr);
        }
        if self.data.text.is_empty() {
            bail!("data.text lists no corpus");
        }
        let l = &self.loss;
        if l.uses_paired_data() && self.data.paired.is_none() {
            bail!("loss.objective = {:?} needs data.paired (a teacher feature folder)", l.objective);
        }
        if l.objective == ObjectiveKind::Mcse
            && (l.margin_text != 0.0 || l.margin_vl != 0.0 || l.filter != FilterMode::Off)
        {
            bail!("loss.objective = \"mcse\" has no margins and no filter; use \"kdmcse\" for loss.margin_* / loss.filter");
        }
        if self.data.paired_every == Some(0) {
            bail!("data.paired_every must be at least 1");
        }
        Ok(())
    }
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
