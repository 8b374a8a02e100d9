//! The KDMCSE training loop: two dropout views per sentence, text batches mixed with paired
//! batches, the objective over the global batch (gathered across ranks), gradient all-reduce,
//! AdamW with a linear schedule and global clipping, STS-B dev model selection, metrics, and
//! checkpoints that resume exactly.
//!
//! Everything random is a function of the seed and counters kept in the checkpoint (the epoch
//! permutations, the dropout masks, the head initialisation), so a resumed run continues
//! bit-for-bit where an uninterrupted one would be.

pub mod config;
pub mod optim;

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Module, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{Checkpoint, CheckpointStore};
use crate::data::{sampler, Cursor, Encoded, PairedCorpus, Sampler, TextCorpus, TokenBatch, Tokenizer};
use crate::dist::{gather_with_local_grad, Communicator};
use crate::eval::{self, TaskData};
use crate::loss::{Grounding, Objective};
use crate::model::dropout::{example_key, Dropout};
use crate::model::heads::Heads;
use crate::model::{self, BertModel};
pub use config::{Precision, TrainConfig};
use optim::{AdamW, AdamWConfig};

/// Names of a checkpoint's parts.
pub mod parts {
    /// Every trainable tensor: `encoder.<Hugging Face key>` and `heads.<head>.dense.*`.
    pub const MODEL: &str = "model.safetensors";
    pub const ENCODER_PREFIX: &str = "encoder.";
    pub const OPTIMIZER: &str = "optimizer.safetensors";
    pub const STATE: &str = "trainer.json";
    pub const CONFIG: &str = "config.toml";
    /// The student's Hugging Face `config.json`.
    pub const ENCODER_CONFIG: &str = "encoder_config.json";
    /// The base checkpoint's untrained pooler, carried for Hugging Face loaders.
    pub const POOLER: &str = "pooler.safetensors";
    /// Tokenizer files, `tokenizer/<file>`.
    pub const TOKENIZER_PREFIX: &str = "tokenizer/";
}

/// Tokenizer files carried into checkpoints and exports when the model folder has them.
const TOKENIZER_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
];

/// Which checkpoint a run starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// From the base model, even if the output folder has checkpoints.
    None,
    /// The newest checkpoint under `output.dir` that verifies, if any.
    Auto,
    /// A checkpoint name under `output.dir` (`step-00000100`) or a location
    /// `<root>/checkpoints/<name>`.
    From(String),
}

impl std::str::FromStr for Resume {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "none" => Resume::None,
            "auto" => Resume::Auto,
            other => Resume::From(other.to_owned()),
        })
    }
}

/// What a run has done so far: saved with every checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimiser steps taken.
    pub step: u64,
    /// Micro-batches taken (`step * grad_accum`); decides text vs paired batches and dropout.
    pub micro_step: u64,
    pub text_cursor: Cursor,
    pub paired_cursor: Cursor,
    pub best_score: Option<f64>,
    pub best_step: Option<u64>,
    /// The world size that wrote the checkpoint (cursors are global; see `data::sampler`).
    pub world_size: usize,
}

/// Set by SIGINT/SIGTERM (see [`install_stop_handler`]): finish the step, checkpoint, stop.
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes SIGINT and SIGTERM stop training cleanly at the end of the current step, with a
/// checkpoint (the launcher forwards them; a pre-empted pod gets SIGTERM).
pub fn install_stop_handler() -> Result<()> {
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe {
            signal_hook::low_level::register(signal, || STOP.store(true, std::sync::atomic::Ordering::SeqCst))
        }
        .context("cannot install signal handlers")?;
    }
    Ok(())
}

/// Why [`Trainer::train`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// All configured steps are done.
    Finished,
    /// `--stop-after` was reached.
    StoppedAfter,
    /// A signal asked to stop.
    Interrupted,
}

/// The outcome of [`Trainer::train`].
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub outcome: Outcome,
    pub steps: u64,
    pub initial_dev: Option<f64>,
    pub final_dev: Option<f64>,
    pub best_dev: Option<f64>,
    pub best_step: Option<u64>,
    pub seconds: f64,
    pub seconds_per_step: f64,
}

/// One step's numbers, as written to the metrics file.
#[derive(Debug, Clone, Serialize)]
struct StepMetrics {
    step: u64,
    kind: &'static str,
    loss: f64,
    loss_text: f64,
    loss_grounding: Option<f64>,
    lr: f64,
    grad_norm: f64,
    masked_negatives: usize,
    sentences_per_s: f64,
    step_s: f64,
    /// Seconds of the step spent in collectives (gathers, gradient all-reduce).
    comm_s: f64,
    /// Where the step's time went, with `train.phase_timings` on.
    #[serde(skip_serializing_if = "Option::is_none")]
    phases: Option<Phases>,
}

/// Seconds of one step by phase: forward (tokenising included), backward, and the update
/// (gradient all-reduce, clipping, AdamW); each ends with a device synchronisation.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Phases {
    forward_s: f64,
    backward_s: f64,
    update_s: f64,
}

pub struct Trainer<'c> {
    cfg: TrainConfig,
    comm: &'c dyn Communicator,
    device: Device,
    varmap: VarMap,
    encoder: BertModel,
    heads: Heads,
    tokenizer: Tokenizer,
    /// Evaluation reads whole sentences (SentEval: no truncation).
    eval_tokenizer: Tokenizer,
    optimizer: AdamW,
    objective: Objective,
    text: TextCorpus,
    paired: Option<PairedCorpus>,
    text_sampler: Sampler,
    paired_sampler: Option<Sampler>,
    paired_every: Option<u64>,
    dev: TaskData,
    store: CheckpointStore,
    /// Parts every checkpoint carries unchanged (encoder config, tokenizer, pooler).
    static_parts: BTreeMap<String, Bytes>,
    metrics: Option<std::fs::File>,
    pub state: TrainerState,
}

/// The device of this process: `cuda` alone means this worker's GPU.
pub fn device_for(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            // The launcher pins each worker to one GPU through CUDA_VISIBLE_DEVICES; otherwise
            // the worker's GPU is its LOCAL_RANK.
            let pinned = std::env::var("CUDA_VISIBLE_DEVICES").is_ok_and(|v| !v.contains(','));
            let local_rank = std::env::var("LOCAL_RANK").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
            Ok(Device::new_cuda(if pinned { 0 } else { local_rank })?)
        }
        s => match s.strip_prefix("cuda:").map(str::parse) {
            Some(Ok(ordinal)) => Ok(Device::new_cuda(ordinal)?),
            _ => bail!("unknown device {spec:?}: expected cpu, cuda or cuda:N"),
        },
    }
}

/// Normal(0, 0.02) weights and zero biases for the heads (BERT's initialisation, which SimCSE
/// and MCSE apply to their heads), drawn from the seed so that every rank and every run agree.
fn init_heads(varmap: &VarMap, seed: u64, dims: &[(&str, usize, usize)], device: &Device) -> Result<()> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x4845_4144_5321);
    let mut data = varmap.data().lock().expect("varmap lock");
    for &(name, input, output) in dims {
        let weights: Vec<f32> = (0..input * output)
            .map(|_| {
                // Box-Muller.
                let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
                ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * 0.02) as f32
            })
            .collect();
        let weight = Tensor::from_vec(weights, (output, input), device)?;
        data.insert(format!("heads.{name}.dense.weight"), Var::from_tensor(&weight)?);
        data.insert(format!("heads.{name}.dense.bias"), Var::zeros(output, DType::F32, device)?);
    }
    Ok(())
}

fn safetensors_bytes(tensors: &HashMap<String, Tensor>) -> Result<Bytes> {
    let sorted: BTreeMap<&String, &Tensor> = tensors.iter().collect();
    Ok(Bytes::from(safetensors::serialize(sorted, None)?))
}

impl<'c> Trainer<'c> {
    /// A trainer on `device` (from [`device_for`]`(cfg.train.device)`, shared with the
    /// communicator so that GPU collectives run on the same stream).
    pub fn new(cfg: TrainConfig, comm: &'c dyn Communicator, device: Device) -> Result<Self> {
        cfg.validate()?;
        let model_dir = &cfg.model.path;
        let encoder_config = model::load_config(model_dir)?;
        let text = TextCorpus::load(&cfg.data.text)?;
        let paired = match (&cfg.data.paired, cfg.loss.uses_paired_data()) {
            (Some(dir), true) => Some(PairedCorpus::load(dir)?),
            _ => None,
        };
        let dev = eval::load_stsb_dev(&cfg.data.eval)?;
        let teacher_dim = paired.as_ref().map_or(768, PairedCorpus::dim);

        // Trainable variables: the pretrained encoder and freshly initialised heads.
        let varmap = VarMap::new();
        model::load_encoder_vars(&varmap, parts::ENCODER_PREFIX, model_dir, &encoder_config, &device)?;
        let (h, k) = (encoder_config.hidden_size, cfg.model.proj_dim);
        init_heads(
            &varmap,
            cfg.train.seed,
            &[
                ("mlp", h, h),
                ("grounding", h, k),
                ("image_head", teacher_dim, k),
                ("caption_head", teacher_dim, k),
            ],
            &device,
        )?;
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
        let encoder = BertModel::load(vb.pp("encoder"), &encoder_config)
            .with_context(|| format!("{}: weights do not fit config.json", model_dir.display()))?
            .with_compute_dtype(cfg.train.precision.compute_dtype());
        if device.is_cpu() && cfg.train.precision == Precision::Bf16 {
            tracing::warn!("train.precision = \"bf16\" on the CPU is correct but slower than fp32");
        }
        // A process-wide cuBLAS switch (a no-op without CUDA).
        candle_core::cuda::set_gemm_reduced_precision_f32(cfg.train.tf32);
        let heads = Heads::load(vb.pp("heads"), h, k, teacher_dim)?;
        let max_len = cfg.model.max_len.min(encoder_config.max_tokens());
        let pad_id = encoder_config.pad_token_id as u32;
        let tokenizer = Tokenizer::from_dir(model_dir, max_len, pad_id)?;
        let eval_tokenizer = Tokenizer::from_dir(model_dir, encoder_config.max_tokens(), pad_id)?;

        let params: Vec<(String, Var)> =
            varmap.data().lock().expect("varmap lock").iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let t = &cfg.train;
        let optimizer =
            AdamW::new(params, AdamWConfig { betas: t.betas, eps: t.eps, weight_decay: t.weight_decay })?;
        // Identical initial weights everywhere: rank 0's.
        if comm.world_size() > 1 {
            for (_, var) in optimizer.params() {
                var.set(&comm.broadcast(var.as_tensor(), 0)?)?;
            }
        }

        let global_batch = t.batch_size * comm.world_size();
        if text.len() < global_batch {
            bail!(
                "the text corpus has {} sentences, fewer than one global batch ({global_batch})",
                text.len()
            );
        }
        let text_sampler = Sampler::new(text.len(), t.seed, 0);
        let paired_sampler = paired.as_ref().map(|p| Sampler::new(p.len(), t.seed, 1));
        let paired_every = match (&paired, cfg.data.paired_every) {
            (None, _) => None,
            (Some(_), Some(every)) => Some(every as u64),
            (Some(p), None) => {
                // The reference: one paired batch every len(text batches) // len(paired batches).
                let every = text_sampler.batches_per_epoch(global_batch) / (p.len() / global_batch).max(1);
                if every == 0 {
                    bail!(
                        "the reference mixing rule (text batches // paired batches) gives 0 for this data: \
                         set data.paired_every"
                    );
                }
                Some(every as u64)
            }
        };
        if let Some(p) = &paired {
            if p.len() < global_batch {
                bail!(
                    "the paired corpus has {} captions, fewer than one global batch ({global_batch})",
                    p.len()
                );
            }
        }

        let store = CheckpointStore::open(&cfg.output.dir)?;
        let mut static_parts = BTreeMap::new();
        static_parts.insert(
            parts::ENCODER_CONFIG.to_owned(),
            Bytes::from(std::fs::read(model_dir.join("config.json"))?),
        );
        for file in TOKENIZER_FILES {
            let path = model_dir.join(file);
            if path.is_file() {
                let data = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
                static_parts.insert(format!("{}{file}", parts::TOKENIZER_PREFIX), Bytes::from(data));
            }
        }
        if let Some(pooler) = load_pooler(model_dir, &encoder_config)? {
            static_parts.insert(parts::POOLER.to_owned(), pooler);
        }
        let metrics = if comm.rank() == 0 { Some(open_metrics(&cfg)?) } else { None };
        let state = TrainerState {
            step: 0,
            micro_step: 0,
            text_cursor: Cursor::default(),
            paired_cursor: Cursor::default(),
            best_score: None,
            best_step: None,
            world_size: comm.world_size(),
        };
        let objective = cfg.loss.objective();
        Ok(Self {
            cfg,
            comm,
            device,
            varmap,
            encoder,
            heads,
            tokenizer,
            eval_tokenizer,
            optimizer,
            objective,
            text,
            paired,
            text_sampler,
            paired_sampler,
            paired_every,
            dev,
            store,
            static_parts,
            metrics,
            state,
        })
    }

    /// The total number of optimiser steps of this run.
    pub fn total_steps(&self) -> u64 {
        let t = &self.cfg.train;
        if t.max_steps > 0 {
            return t.max_steps as u64;
        }
        let global = t.batch_size * self.comm.world_size();
        (t.epochs * self.text_sampler.batches_per_epoch(global) / t.grad_accum) as u64
    }

    /// Every trainable tensor by name.
    pub fn weights(&self) -> HashMap<String, Tensor> {
        self.varmap
            .data()
            .lock()
            .expect("varmap lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// Restores the run as `resume` says; returns the checkpoint name used, if any.
    pub fn resume(&mut self, resume: &Resume) -> Result<Option<String>> {
        let checkpoint = match resume {
            Resume::None => return Ok(None),
            Resume::Auto => match self.store.load_newest()? {
                Some(c) => c,
                None => {
                    tracing::info!(dir = %self.store.url(), "no checkpoint to resume from; starting fresh");
                    return Ok(None);
                }
            },
            Resume::From(location) => match crate::checkpoint::split_location(location) {
                Some((root, name)) => CheckpointStore::open(root)?.load(name)?,
                None => self.store.load(location)?,
            },
        };
        self.restore(&checkpoint)?;
        tracing::info!(checkpoint = %checkpoint.name, step = self.state.step, "resumed");
        Ok(Some(checkpoint.name))
    }

    fn restore(&mut self, checkpoint: &Checkpoint) -> Result<()> {
        let name = &checkpoint.name;
        let ours = self.static_parts.get(parts::ENCODER_CONFIG).expect("set in new");
        let theirs = checkpoint.part(parts::ENCODER_CONFIG)?;
        let parse = |b: &Bytes| serde_json::from_slice::<model::Config>(b);
        if parse(ours)?
            != parse(theirs).with_context(|| format!("checkpoint {name}: unreadable encoder config"))?
        {
            bail!(
                "checkpoint {name} was trained from another architecture than {} (its {} differs): \
                 point model.path at the model it was trained from",
                self.cfg.model.path.display(),
                parts::ENCODER_CONFIG
            );
        }
        let weights = candle_core::safetensors::load_buffer(checkpoint.part(parts::MODEL)?, &self.device)?;
        let vars = self.varmap.data().lock().expect("varmap lock");
        for (key, var) in vars.iter() {
            let saved = weights.get(key).with_context(|| format!("checkpoint {name} has no tensor {key}"))?;
            if saved.dims() != var.dims() {
                bail!("checkpoint {name}: {key} has shape {:?}, the model {:?}", saved.dims(), var.dims());
            }
            var.set(saved)?;
        }
        drop(vars);
        let optimizer =
            candle_core::safetensors::load_buffer(checkpoint.part(parts::OPTIMIZER)?, &self.device)?;
        self.optimizer.load_state(&optimizer).with_context(|| format!("checkpoint {name}"))?;
        let state: TrainerState = serde_json::from_slice(checkpoint.part(parts::STATE)?)
            .with_context(|| format!("checkpoint {name}: unreadable {}", parts::STATE))?;
        if state.world_size != self.comm.world_size() {
            tracing::warn!(
                saved = state.world_size,
                now = self.comm.world_size(),
                "resuming with another world size: the data continues from the same example of the \
                 global order, in global batches of the new size"
            );
        }
        self.state = TrainerState { world_size: self.comm.world_size(), ..state };
        Ok(())
    }

    /// STS-B dev Spearman x100 (CLS before the MLP head, dropout off).
    pub fn evaluate(&self) -> Result<f64> {
        let sentences = self.dev.sentences();
        let embeddings = crate::embed::embed_sentences(
            &self.encoder,
            &self.eval_tokenizer,
            self.cfg.model.pooling,
            &sentences,
            128,
            |_| {},
        )?;
        eval::sts_score(&embeddings, &self.dev)
    }

    fn is_paired_micro_step(&self, micro_step: u64) -> bool {
        self.paired_every.is_some_and(|every| micro_step % every == every - 1)
    }

    /// Forward and backward of one micro-batch; returns the loss terms and the gradients in the
    /// optimiser's parameter order (already divided by `grad_accum`).
    fn micro_step(&mut self) -> Result<(StepMetrics, Vec<Option<Tensor>>)> {
        let started = Instant::now();
        let t = &self.cfg.train;
        let (rank, world) = (self.comm.rank(), self.comm.world_size());
        let micro = self.state.micro_step;
        let paired = self.is_paired_micro_step(micro);
        let global_batch = t.batch_size * world;
        // Dataset indices of this rank's rows; paired examples get their own key space.
        let (indices, key_base) = if paired {
            let sampler = self.paired_sampler.as_mut().expect("paired sampler");
            (sampler.next_batch(&mut self.state.paired_cursor, global_batch), 1u64 << 40)
        } else {
            (self.text_sampler.next_batch(&mut self.state.text_cursor, global_batch), 0)
        };
        let local = sampler::rank_slice(&indices, rank, world).to_vec();
        let paired_batch = match (&self.paired, paired) {
            (Some(corpus), true) => Some(corpus.batch(&local, &self.device)?),
            _ => None,
        };
        let sentences: Vec<&str> = match &paired_batch {
            Some(b) => b.captions.clone(),
            None => local.iter().map(|&i| self.text.sentences[i as usize].as_str()).collect(),
        };
        let encoded = self.tokenizer.encode(&sentences)?;
        // Both views in one pass: rows 0..B are view 0, rows B..2B view 1.
        let rows: Vec<&Encoded> = encoded.iter().chain(&encoded).collect();
        let batch = TokenBatch::pad(&rows, self.tokenizer.pad_id(), &self.device)?;
        let keys = (0..2u64)
            .flat_map(|view| local.iter().map(move |&i| (view, i)))
            .map(|(view, i)| example_key(t.seed, micro, key_base + i as u64, view))
            .collect();
        let cfg = &self.encoder.config;
        let dropout = Dropout::per_example(
            cfg.hidden_dropout_prob as f32,
            cfg.attention_probs_dropout_prob as f32,
            keys,
        );
        let b = local.len();
        let h = self.encoder.embed(
            &batch.input_ids,
            &batch.token_type_ids,
            &batch.attention_mask,
            &dropout,
            self.cfg.model.pooling,
        )?;
        let z = self.heads.mlp.forward(&h)?;
        let comm = self.comm;
        let gather = |x: &Tensor| gather_with_local_grad(comm, x);
        let (z1, z2) = (gather(&z.narrow(0, 0, b)?)?, gather(&z.narrow(0, b, b)?)?);
        let terms = match &paired_batch {
            None => self.objective.compute(&z1, &z2, None, 0)?,
            Some(pb) => {
                let p = self.heads.grounding.forward(&h)?;
                let (p1, p2) = (gather(&p.narrow(0, 0, b)?)?, gather(&p.narrow(0, b, b)?)?);
                let v = gather(&self.heads.image.forward(&pb.image_features)?)?;
                let tt = gather(&self.heads.caption.forward(&pb.caption_features)?)?;
                let img = comm.all_gather(&pb.image_features)?;
                let cap = comm.all_gather(&pb.caption_features)?;
                let g = Grounding {
                    p1: &p1,
                    p2: &p2,
                    v: &v,
                    t: &tt,
                    img_rows: &img,
                    cap_rows: &cap,
                    img_cols: &img,
                    cap_cols: &cap,
                };
                self.objective.compute(&z1, &z2, Some(&g), 0)?
            }
        };
        let forward_s = self.phase_end(started)?;
        let backward_started = Instant::now();
        let scaled = (&terms.total / t.grad_accum as f64)?;
        let grads = scaled.backward()?;
        let backward_s = self.phase_end(backward_started)?;
        let grads = self.optimizer.params().map(|(_, var)| grads.get(var.as_tensor()).cloned()).collect();
        self.state.micro_step += 1;
        let metrics = StepMetrics {
            step: self.state.step + 1,
            kind: if paired { "paired" } else { "text" },
            loss: crate::loss::scalar(&terms.total)?,
            loss_text: crate::loss::scalar(&terms.intra)?,
            loss_grounding: terms.inter.as_ref().map(crate::loss::scalar).transpose()?,
            lr: 0.0,
            grad_norm: 0.0,
            masked_negatives: terms.masked_negatives,
            sentences_per_s: 0.0,
            step_s: 0.0,
            comm_s: 0.0,
            phases: self.cfg.train.phase_timings.then_some(Phases { forward_s, backward_s, update_s: 0.0 }),
        };
        Ok((metrics, grads))
    }

    /// One optimiser step (all micro-batches, all-reduce, clip, AdamW).
    fn step(&mut self) -> Result<StepMetrics> {
        let start = Instant::now();
        let comm_before = self.comm.time_in_collectives();
        let accum = self.cfg.train.grad_accum;
        let mut total: Option<Vec<Option<Tensor>>> = None;
        let mut metrics = Vec::with_capacity(accum);
        for _ in 0..accum {
            let (m, grads) = self.micro_step()?;
            metrics.push(m);
            total = Some(match total {
                None => grads,
                Some(acc) => acc
                    .into_iter()
                    .zip(grads)
                    .map(|(a, g)| match (a, g) {
                        (Some(a), Some(g)) => Ok(Some((a + g)?)),
                        (a, g) => Ok(a.or(g)),
                    })
                    .collect::<Result<_>>()?,
            });
        }
        let update_started = Instant::now();
        let mut grads = crate::dist::all_reduce_grads(self.comm, total.expect("grad_accum >= 1"))?;
        let grad_norm = optim::clip_global_norm(&mut grads, self.cfg.train.grad_clip)?;
        let lr = self.cfg.train.lr
            * optim::linear_schedule(
                self.state.step as usize,
                self.cfg.train.warmup_steps,
                self.total_steps() as usize,
            );
        self.optimizer.step(&grads, lr)?;
        let update_s = self.phase_end(update_started)?;
        self.state.step += 1;
        // With accumulation, the mean of the micro-batches' losses (the kind is the first's).
        let n = metrics.len() as f64;
        let grounding: Vec<f64> = metrics.iter().filter_map(|m| m.loss_grounding).collect();
        let mut out = metrics[0].clone();
        out.loss = metrics.iter().map(|m| m.loss).sum::<f64>() / n;
        out.loss_text = metrics.iter().map(|m| m.loss_text).sum::<f64>() / n;
        out.loss_grounding =
            (!grounding.is_empty()).then(|| grounding.iter().sum::<f64>() / grounding.len() as f64);
        out.masked_negatives = metrics.iter().map(|m| m.masked_negatives).sum();
        out.phases = out.phases.map(|_| {
            let mut total = Phases { update_s, ..Phases::default() };
            for p in metrics.iter().filter_map(|m| m.phases) {
                total.forward_s += p.forward_s;
                total.backward_s += p.backward_s;
            }
            total
        });
        out.lr = lr;
        out.grad_norm = grad_norm;
        let sentences = (self.cfg.train.batch_size * accum * self.comm.world_size()) as f64;
        out.step_s = start.elapsed().as_secs_f64();
        out.sentences_per_s = sentences / out.step_s;
        out.comm_s = (self.comm.time_in_collectives() - comm_before).as_secs_f64();
        Ok(out)
    }

    /// Seconds since `start`, after waiting for the device when phases are timed (GPU work is
    /// asynchronous); 0 when they are not.
    fn phase_end(&self, start: Instant) -> Result<f64> {
        if !self.cfg.train.phase_timings {
            return Ok(0.0);
        }
        self.device.synchronize()?;
        Ok(start.elapsed().as_secs_f64())
    }

    /// Writes a checkpoint of the current state: every rank's state reaches rank 0 through the
    /// collectives (and must agree), rank 0 writes, and everyone waits at a barrier so nobody
    /// races ahead of a half-written checkpoint.
    pub fn save_checkpoint(&self) -> Result<Option<String>> {
        let mine = serde_json::to_vec(&self.state)?;
        let states = self.comm.all_gather_bytes(&mine)?;
        if let Some(rank) = states.iter().position(|s| *s != mine) {
            bail!(
                "rank {rank}'s trainer state differs from rank {}'s at step {}: {} vs {}",
                self.comm.rank(),
                self.state.step,
                String::from_utf8_lossy(&states[rank]),
                String::from_utf8_lossy(&mine)
            );
        }
        let mut name = None;
        if self.comm.rank() == 0 {
            let mut all = self.static_parts.clone();
            all.insert(parts::MODEL.into(), safetensors_bytes(&self.weights())?);
            all.insert(parts::OPTIMIZER.into(), safetensors_bytes(&self.optimizer.state()?)?);
            all.insert(parts::STATE.into(), Bytes::from(serde_json::to_vec_pretty(&self.state)?));
            all.insert(parts::CONFIG.into(), Bytes::from(self.cfg.to_toml()));
            let saved = self.store.save(self.state.step, &all)?;
            if self.state.best_step == Some(self.state.step) {
                self.store.set_best(&saved)?;
            }
            let deleted = self.store.retain(self.cfg.output.keep)?;
            tracing::info!(checkpoint = %saved, deleted = deleted.len(), "checkpoint saved");
            name = Some(saved);
        }
        self.comm.barrier()?;
        Ok(name)
    }

    fn log_metrics<T: Serialize>(&mut self, record: &T) -> Result<()> {
        if let Some(file) = &mut self.metrics {
            serde_json::to_writer(&mut *file, record)?;
            file.write_all(b"\n")?;
            file.flush()?;
        }
        Ok(())
    }

    /// STS-B dev on rank 0, the score broadcast to all ranks so they decide alike.
    fn evaluate_everywhere(&self) -> Result<f64> {
        let score = if self.comm.rank() == 0 { self.evaluate()? } else { 0.0 };
        if self.comm.world_size() == 1 {
            return Ok(score);
        }
        let shared = self.comm.broadcast(&Tensor::new(&[score as f32], &Device::Cpu)?, 0)?;
        // Scores are rounded to 2 decimals: f32 carries them exactly enough to compare.
        Ok(eval::round2(shared.to_vec1::<f32>()?[0] as f64))
    }

    /// Whether any rank was asked to stop (all ranks must stop at the same step).
    fn stop_requested(&self) -> Result<bool> {
        let local = STOP.load(std::sync::atomic::Ordering::SeqCst);
        if self.comm.world_size() == 1 {
            return Ok(local);
        }
        Ok(self.comm.all_gather_bytes(&[u8::from(local)])?.iter().any(|b| b.first() == Some(&1)))
    }

    /// Trains to the configured number of steps (or `stop_after`, or a stop signal) from
    /// wherever `state` stands, evaluating and checkpointing on the way; a finished run exports
    /// its best checkpoint.
    pub fn train(&mut self, stop_after: Option<u64>) -> Result<Summary> {
        let total = self.total_steps();
        let start_step = self.state.step;
        if self.comm.rank() == 0 {
            tracing::info!("effective config:\n{}", self.cfg.to_toml());
        }
        tracing::info!(
            rank = self.comm.rank(),
            world_size = self.comm.world_size(),
            total_steps = total,
            start_step,
            "training"
        );
        let eval_steps = self.cfg.train.eval_steps as u64;
        let mut initial_dev = None;
        if eval_steps > 0 && start_step == 0 {
            let score = self.evaluate_everywhere()?;
            tracing::info!(stsb_dev = score, "before training");
            self.log_metrics(&serde_json::json!({"step": 0, "stsb_dev": score}))?;
            initial_dev = Some(score);
        }
        let bar = progress_bar(total, start_step, self.comm.rank());
        let started = Instant::now();
        let mut final_dev = None;
        let mut outcome = Outcome::Finished;
        while self.state.step < total {
            let m = self.step()?;
            self.log_metrics(&m)?;
            bar.set_position(self.state.step);
            bar.set_message(format!("loss {:.4} lr {:.2e}", m.loss, m.lr));
            let step = self.state.step;
            let done = step == total;
            let mut new_best = false;
            if eval_steps > 0 && (step.is_multiple_of(eval_steps) || done) {
                let score = self.evaluate_everywhere()?;
                final_dev = Some(score);
                new_best = self.state.best_score.is_none_or(|best| score > best);
                if new_best {
                    self.state.best_score = Some(score);
                    self.state.best_step = Some(step);
                }
                bar.suspend(
                    || tracing::info!(step, stsb_dev = score, best = ?self.state.best_score, "evaluated"),
                );
                self.log_metrics(&serde_json::json!({"step": step, "stsb_dev": score}))?;
            }
            let stop = if stop_after.is_some_and(|s| step >= s) {
                Some(Outcome::StoppedAfter)
            } else if self.stop_requested()? {
                Some(Outcome::Interrupted)
            } else {
                None
            };
            let every = self.cfg.output.checkpoint_steps as u64;
            if done || new_best || stop.is_some() || (every > 0 && step.is_multiple_of(every)) {
                bar.suspend(|| self.save_checkpoint())?;
            }
            if let Some(stop) = stop {
                outcome = stop;
                bar.suspend(|| tracing::info!(step, ?outcome, "stopping"));
                break;
            }
        }
        bar.finish_and_clear();
        let seconds = started.elapsed().as_secs_f64();
        let steps = self.state.step - start_step;
        if self.comm.rank() == 0 && outcome == Outcome::Finished {
            self.export_best()?;
        }
        Ok(Summary {
            outcome,
            steps: self.state.step,
            initial_dev,
            final_dev,
            best_dev: self.state.best_score,
            best_step: self.state.best_step,
            seconds,
            seconds_per_step: if steps > 0 { seconds / steps as f64 } else { 0.0 },
        })
    }

    /// Exports the best checkpoint (else the latest) to `<output.dir>/best-model/`.
    fn export_best(&self) -> Result<()> {
        let Some(name) = self.store.pointer("best")?.or(self.store.pointer("latest")?) else { return Ok(()) };
        let checkpoint = self.store.load(&name)?;
        let files = crate::export::export_files(&checkpoint)?;
        self.store.put_files("best-model", &files)?;
        tracing::info!(checkpoint = %name, to = %format!("{}/best-model", self.store.url()), "exported");
        Ok(())
    }
}

/// The base checkpoint's pooler weights (untouched by training), for Hugging Face loaders.
fn load_pooler(dir: &Path, config: &model::Config) -> Result<Option<Bytes>> {
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

fn open_metrics(cfg: &TrainConfig) -> Result<std::fs::File> {
    let path = match &cfg.output.metrics {
        Some(p) => p.clone(),
        None if !cfg.output.dir.contains("://") => PathBuf::from(&cfg.output.dir).join("metrics.jsonl"),
        None => bail!("output.dir {} is not local: set output.metrics to a local file", cfg.output.dir),
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open metrics file {}", path.display()))
}

fn progress_bar(total: u64, position: u64, rank: usize) -> indicatif::ProgressBar {
    if rank != 0 || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total).with_position(position);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "train {bar:30} {pos}/{len} {msg} [{elapsed}<{eta}, {per_sec}]",
        )
        .expect("valid template"),
    );
    bar
}
