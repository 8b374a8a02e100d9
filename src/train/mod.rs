//! The KDMCSE training application: each micro-step takes this rank's share of a global batch
//! ([`batches`]), runs the student on both dropout views ([`student`]), computes the objective
//! over the global batch (gathered across ranks) and back-propagates; a step all-reduces the
//! gradients, clips them and updates with AdamW ([`optim`]); the loop evaluates STS-B dev,
//! records metrics ([`metrics`]) and writes checkpoints that resume exactly.
//!
//! Everything random is a function of the seed and counters kept in the checkpoint (the epoch
//! permutations, the dropout masks, the head initialisation), so a resumed run continues
//! bit-for-bit where an uninterrupted one would be.

pub mod batches;
pub mod config;
pub mod metrics;
pub mod optim;
pub mod student;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::checkpoint::background::{Job, Uploads};
use crate::checkpoint::layout::{self, ENCODER_CONFIG, MODEL, OPTIMIZER, STATE};
use crate::checkpoint::{Checkpoint, CheckpointStore, Pointer};
use crate::data::Tokenizer;
use crate::dist::{self, Communicator};
use crate::eval::{self, TaskData};
use crate::loss::Grounding;
use crate::InputError;
use batches::{BatchPlan, DataPosition, TwoViewBatch};
pub use config::{Precision, TrainConfig};
use metrics::{MetricsLog, MicroMetrics, Phases, PoolLoss, Progress, StepMetrics};
use optim::{AdamW, AdamWConfig};
use student::{Embeddings, HeadsSpec, Student};

/// Sentences per forward pass when evaluating STS-B dev.
const EVAL_BATCH: usize = 128;

/// How a run starts: where from, and what it may do to the output folder it finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    pub resume: Resume,
    /// A fresh start may delete the checkpoints already in `output.dir`.
    pub overwrite: bool,
    /// A resume may continue under a config that trains differently from the checkpoint's.
    pub allow_config_change: bool,
}

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
    #[serde(flatten)]
    pub data: DataPosition,
    pub best_score: Option<f64>,
    pub best_step: Option<u64>,
    /// The world size that wrote the checkpoint (cursors are global; see `data::sampler`).
    pub world_size: usize,
}

impl TrainerState {
    /// The state `checkpoint` was written with.
    pub fn of(checkpoint: &Checkpoint) -> Result<Self> {
        serde_json::from_slice(checkpoint.part(STATE)?)
            .with_context(|| format!("checkpoint {}: unreadable {STATE}", checkpoint.name))
    }
}

/// Set by SIGINT/SIGTERM (see [`install_stop_handler`]): finish the step, checkpoint, stop.
static STOP: AtomicBool = AtomicBool::new(false);

/// Makes SIGINT and SIGTERM stop training cleanly at the end of the current step, with a
/// checkpoint (the launcher forwards them; a pre-empted pod gets SIGTERM).
pub fn install_stop_handler() -> Result<()> {
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { signal_hook::low_level::register(signal, || STOP.store(true, Ordering::SeqCst)) }
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

/// The name of the first tensor (by name) holding an inf or NaN.
fn first_non_finite(tensors: &std::collections::HashMap<String, Tensor>) -> Result<Option<String>> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        let t = &tensors[name];
        // x - x is 0 for every finite x and NaN otherwise.
        let probe = t.sub(t)?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        if !probe.is_finite() {
            return Ok(Some(name.clone()));
        }
    }
    Ok(None)
}

/// STS-B dev, for model selection; read whole (SentEval: no truncation).
struct DevSet {
    data: TaskData,
    tokenizer: Tokenizer,
}

pub struct Trainer<'c> {
    cfg: TrainConfig,
    comm: &'c dyn Communicator,
    device: Device,
    student: Student,
    optimizer: AdamW,
    plan: BatchPlan,
    dev: DevSet,
    store: CheckpointStore,
    /// Parts every checkpoint carries unchanged (encoder config, tokenizer, pooler).
    static_parts: BTreeMap<String, Bytes>,
    metrics: MetricsLog,
    /// Rank 0's background checkpoint uploads (`output.async_checkpoint`).
    uploads: Option<Uploads>,
    pub state: TrainerState,
}

impl<'c> Trainer<'c> {
    /// A trainer on `device` (from `cfg.train.device`, shared with the communicator so that GPU
    /// collectives run on the same stream).
    pub fn new(cfg: TrainConfig, comm: &'c dyn Communicator, device: Device) -> Result<Self> {
        cfg.validate()?;
        // A Hub id is fetched into (or, offline, found in) the Hugging Face cache.
        let model_dir = &crate::hub::model_dir(&cfg.model.path, "model.path")?;
        let encoder_config = crate::model::load_config(model_dir)?;
        let t = &cfg.train;
        let pad_id = encoder_config.pad_token_id as u32;
        let tokenizer =
            Tokenizer::from_dir(model_dir, cfg.model.max_len.min(encoder_config.max_tokens()), pad_id)?;
        let dropout =
            (encoder_config.hidden_dropout_prob as f32, encoder_config.attention_probs_dropout_prob as f32);
        let plan =
            BatchPlan::new(&cfg, t.rank_batch(comm.world_size())? * comm.world_size(), tokenizer, dropout)?;
        let dev = DevSet {
            data: eval::load_stsb_dev(&cfg.data.eval)?,
            tokenizer: Tokenizer::from_dir(model_dir, encoder_config.max_tokens(), pad_id)?,
        };
        if device.is_cpu() && t.precision == Precision::Bf16 {
            tracing::warn!("train.precision = \"bf16\" on the CPU is correct but slower than fp32");
        }
        // A process-wide cuBLAS switch (a no-op without CUDA).
        candle_core::cuda::set_gemm_reduced_precision_f32(t.tf32);
        let heads = HeadsSpec {
            proj_dim: cfg.model.proj_dim,
            teacher_dim: plan.teacher_dim(),
            init: cfg.model.head_init,
            seed: t.seed,
        };
        let student =
            Student::load(model_dir, cfg.model.pooling, heads, t.precision.compute_dtype(), &device)?;
        let optimizer = AdamW::new(
            student.params(),
            AdamWConfig {
                betas: t.betas,
                eps: t.eps,
                weight_decay: t.weight_decay,
                formula: t.optimizer,
                update_idle: t.update_idle_params,
            },
        )?;
        // Identical initial weights everywhere: rank 0's.
        if comm.world_size() > 1 {
            for (_, var) in optimizer.params() {
                var.set(&comm.broadcast(var.as_tensor(), 0)?)?;
            }
        }
        let store = CheckpointStore::open(&cfg.output.dir)?;
        let static_parts = layout::static_parts(model_dir, &encoder_config)?;
        let metrics = MetricsLog::open(&cfg, comm.rank(), &store)?;
        let background = comm.rank() == 0 && cfg.output.async_checkpoint && cfg.output.save;
        let uploads = if background { Some(Uploads::open(&cfg.output.dir)?) } else { None };
        let state = TrainerState {
            step: 0,
            data: DataPosition::default(),
            best_score: None,
            best_step: None,
            world_size: comm.world_size(),
        };
        Ok(Self {
            cfg,
            comm,
            device,
            student,
            optimizer,
            plan,
            dev,
            store,
            static_parts,
            metrics,
            uploads,
            state,
        })
    }

    /// The total number of optimiser steps of this run: `max_steps`, else `epochs` epochs of
    /// `train.steps_per_epoch`'s micro-steps.
    pub fn total_steps(&self) -> u64 {
        let t = &self.cfg.train;
        if t.max_steps > 0 {
            return t.max_steps as u64;
        }
        (t.epochs * self.plan.micro_steps_per_epoch() / t.grad_accum) as u64
    }

    /// Every trainable tensor by name.
    pub fn weights(&self) -> std::collections::HashMap<String, Tensor> {
        self.student.weights()
    }

    /// Restores the run as `start` says; returns the checkpoint name used, if any. A run never
    /// mixes with another in one folder: a fresh start into a folder with checkpoints, or onto
    /// checkpoints none of which verifies, needs `overwrite` (which deletes them first); a resume
    /// with a config that would train differently needs `allow_config_change`.
    pub fn resume(&mut self, start: &Start) -> Result<Option<String>> {
        let existing = self.store.list()?;
        let fresh_start = |trainer: &mut Self, why: &str| -> Result<Option<String>> {
            if !existing.is_empty() {
                if !start.overwrite {
                    return Err(InputError::wrap(anyhow::anyhow!(
                        "{} holds checkpoints ({}{}) and {why}: resume them (--resume auto), or start over \
                         with --resume none --overwrite, which deletes them",
                        trainer.store.url(),
                        existing.last().expect("not empty"),
                        if existing.len() > 1 {
                            format!(" and {} more", existing.len() - 1)
                        } else {
                            String::new()
                        },
                    )));
                }
                if trainer.comm.rank() == 0 {
                    tracing::warn!(dir = %trainer.store.url(), checkpoints = existing.len(), "--overwrite: deleting the folder's run");
                    trainer.store.clear()?;
                    trainer.metrics.clear(&trainer.store)?;
                }
                trainer.comm.barrier()?;
            }
            tracing::info!(dir = %trainer.store.url(), "starting fresh");
            Ok(None)
        };
        let checkpoint = match &start.resume {
            Resume::None => return fresh_start(self, "--resume none starts a new run"),
            Resume::Auto => match self.store.load_newest()? {
                Some(c) => c,
                None => return fresh_start(self, "none of them verifies (see the warnings above)"),
            },
            Resume::From(location) => layout::open(location, Some(&self.store))?,
        };
        self.check_architecture(&checkpoint).map_err(InputError::wrap)?;
        if !start.allow_config_change {
            self.check_same_training(&checkpoint).map_err(InputError::wrap)?;
        }
        self.restore(&checkpoint)?;
        tracing::info!(checkpoint = %checkpoint.name, step = self.state.step, "resumed");
        crate::events::emit(
            "resumed",
            serde_json::json!({"rank": self.comm.rank(), "checkpoint": checkpoint.name, "step": self.state.step}),
        );
        if self.state.step >= self.total_steps() {
            tracing::warn!(
                step = self.state.step,
                total_steps = self.total_steps(),
                "the checkpoint is already at or past the run's last step: nothing left to train"
            );
        }
        Ok(Some(checkpoint.name))
    }

    /// Refuses a checkpoint whose config trains differently from this run's (the keys of
    /// [`config::RESULT_NEUTRAL_KEYS`] may differ).
    fn check_same_training(&self, checkpoint: &Checkpoint) -> Result<()> {
        let text = String::from_utf8_lossy(checkpoint.part(layout::CONFIG)?).into_owned();
        let theirs: toml::Table = toml::from_str(&text)
            .with_context(|| format!("checkpoint {}: unreadable {}", checkpoint.name, layout::CONFIG))?;
        let ours: toml::Table = toml::from_str(&self.cfg.to_toml()).expect("the config serialises to TOML");
        if let Some((key, was, now)) = config::training_difference(&theirs, &ours) {
            bail!(
                "checkpoint {} was trained with {key} = {was}, this run has {key} = {now}: resuming would \
                 continue another training; pass --allow-config-change to resume anyway, or start a new \
                 run elsewhere",
                checkpoint.name
            );
        }
        // Ranks may change (the data order, masks and pool are global); the pool may not, which
        // the same config gives on another number of ranks with `batch_size`.
        let state = TrainerState::of(checkpoint)?;
        let their_config: Option<TrainConfig> = toml::Value::Table(theirs.clone()).try_into().ok();
        if let Some(was) = their_config.and_then(|c| c.train.rank_batch(state.world_size).ok()) {
            let (was, now) = (was * state.world_size, self.plan.global_batch());
            if was != now {
                bail!(
                    "checkpoint {} was trained with a global batch of {was} ({} ranks), this run has {now} \
                     ({} ranks): set train.global_batch = {was} to continue the same training, or pass \
                     --allow-config-change to resume with the new pool",
                    checkpoint.name,
                    state.world_size,
                    self.comm.world_size()
                );
            }
        }
        Ok(())
    }

    /// Refuses a checkpoint of another encoder than this run's model folder.
    fn check_architecture(&self, checkpoint: &Checkpoint) -> Result<()> {
        let name = &checkpoint.name;
        let parse = |b: &Bytes| serde_json::from_slice::<crate::model::Config>(b);
        let ours = parse(self.static_parts.get(ENCODER_CONFIG).expect("a static part"))?;
        let theirs = parse(checkpoint.part(ENCODER_CONFIG)?)
            .with_context(|| format!("checkpoint {name}: unreadable encoder config"))?;
        if ours != theirs {
            bail!(
                "checkpoint {name} was trained from another architecture than {} (its {ENCODER_CONFIG} \
                 differs): point model.path at the model it was trained from",
                self.cfg.model.path.display()
            );
        }
        Ok(())
    }

    fn restore(&mut self, checkpoint: &Checkpoint) -> Result<()> {
        let name = &checkpoint.name;
        let weights = candle_core::safetensors::load_buffer(checkpoint.part(MODEL)?, &self.device)?;
        self.student.restore(&weights, &format!("checkpoint {name}"))?;
        let optimizer = candle_core::safetensors::load_buffer(checkpoint.part(OPTIMIZER)?, &self.device)?;
        self.optimizer.load_state(&optimizer).with_context(|| format!("checkpoint {name}"))?;
        let state = TrainerState::of(checkpoint)?;
        if state.world_size != self.comm.world_size() {
            tracing::info!(
                saved = state.world_size,
                now = self.comm.world_size(),
                global_batch = self.plan.global_batch(),
                "resuming on another number of ranks: the data order, dropout masks and pool are global, \
                 so the training continues as it would have"
            );
        }
        self.state = TrainerState { world_size: self.comm.world_size(), ..state };
        Ok(())
    }

    /// STS-B dev Spearman x100 (the run's pooling before the MLP head, dropout off).
    pub fn evaluate(&self) -> Result<f64> {
        let sentences = self.dev.data.sentences();
        let embeddings = crate::embed::embed_sentences(
            &self.student.encoder,
            &self.dev.tokenizer,
            self.cfg.model.pooling,
            &sentences,
            EVAL_BATCH,
            |_| {},
        )?;
        let score = eval::sts_score(&embeddings, &self.dev.data)?;
        if !score.is_finite() {
            bail!(
                "STS-B dev Spearman is {score} at step {}: the student's embeddings are not finite or all equal",
                self.state.step
            );
        }
        Ok(score)
    }

    /// The objective over the pool from this rank's embeddings (values only): this rank's rows
    /// (`z1`, `p1`, `p2`, its teacher features) against every rank's columns (`z2`, `v`, `t`,
    /// the teacher features of the whole pool), so the teacher similarities, margins and the
    /// noisy-negative filter cover the pool while each rank computes `B_local x pool` logits.
    /// Returns the global loss's metrics (the mean over ranks) and the gradient of the global
    /// loss, divided by `grad_accum`, with respect to each of this rank's embeddings.
    fn pool_objective(&self, local: &Embeddings, batch: &TwoViewBatch) -> Result<(PoolLoss, Embeddings)> {
        let comm = self.comm;
        let (rows, offset) = (batch.examples, comm.rank() * batch.examples);
        let leaf = |x: &Tensor| -> Result<Var> { Ok(Var::from_tensor(x)?) };
        let pool = |x: &Tensor| -> Result<Var> { Ok(Var::from_tensor(&comm.all_gather(x)?)?) };
        let (z1, z2) = (leaf(&local.z1)?, pool(&local.z2)?);
        let mut row_vars = vec![z1.clone()];
        let mut pool_vars = vec![z2.clone()];
        let terms = match (&local.grounding, &batch.teacher) {
            (Some(g), Some(teacher)) => {
                let (p1, p2, v, t) = (leaf(&g.p1)?, leaf(&g.p2)?, pool(&g.v)?, pool(&g.t)?);
                let img = comm.all_gather(&teacher.image)?;
                let cap = comm.all_gather(&teacher.caption)?;
                let grounding = Grounding {
                    p1: p1.as_tensor(),
                    p2: p2.as_tensor(),
                    v: v.as_tensor(),
                    t: t.as_tensor(),
                    img_rows: &teacher.image,
                    cap_rows: &teacher.caption,
                    img_cols: &img,
                    cap_cols: &cap,
                };
                let terms =
                    self.cfg.loss.compute(z1.as_tensor(), z2.as_tensor(), Some(&grounding), offset)?;
                row_vars.extend([p1, p2]);
                pool_vars.extend([v, t]);
                terms
            }
            _ => self.cfg.loss.compute(z1.as_tensor(), z2.as_tensor(), None, offset)?,
        };
        // The global loss is the mean of the ranks' (equal-sized) row means.
        let scale = 1.0 / (comm.world_size() * self.cfg.train.grad_accum) as f64;
        let grads = (&terms.total * scale)?.backward()?;
        let grad_of = |var: &Var| grads.get(var.as_tensor()).cloned().map_or_else(|| var.zeros_like(), Ok);
        let pool_grads = pool_vars.iter().map(grad_of).collect::<candle_core::Result<Vec<_>>>()?;
        let own = dist::own_rows_of_pool_grads(comm, &pool_grads, rows)?;
        let row_grads = row_vars.iter().map(grad_of).collect::<candle_core::Result<Vec<_>>>()?;
        // In the order of Embeddings: z1, z2, then p1, p2, v, t.
        let mut ordered = vec![row_grads[0].clone(), own[0].clone()];
        ordered.extend(row_grads[1..].iter().chain(&own[1..]).cloned());
        Ok((PoolLoss::mean_over_ranks(comm, &terms)?, Embeddings::from_tensors(ordered)))
    }

    /// Forward and backward of one micro-batch (one pool): plan -> student (chunk by chunk,
    /// values only, unless the rank's batch is one chunk) -> objective over the pool -> the
    /// cached embedding gradients back-propagated through each chunk (re-run, keeping its
    /// activations, unless it was the only one): `Student::backward`.
    /// Returns its metrics and this rank's gradients in the optimiser's parameter order; they are
    /// all-reduced once per optimiser step, never per chunk.
    fn micro_step(&mut self) -> Result<(MicroMetrics, Vec<Option<Tensor>>)> {
        let started = Instant::now();
        let (rank, world) = (self.comm.rank(), self.comm.world_size());
        let batch = self.plan.next(&mut self.state.data, rank, world, &self.device)?;
        let size = self.cfg.train.chunk(batch.examples);
        let starts: Vec<usize> = (0..batch.examples).step_by(size).collect();
        let chunk = |start: usize| batch.chunk(start, size.min(batch.examples - start));
        let single = starts.len() == 1;
        let mut kept = None;
        let mut values = Vec::with_capacity(starts.len());
        for &start in &starts {
            if single {
                let forward = self.student.forward_for_backward(&chunk(start)?)?;
                values.push(forward.embeddings.detach());
                kept = Some(forward);
            } else {
                values.push(self.student.forward(&chunk(start)?)?.detach());
            }
        }
        let (loss, grads) = self.pool_objective(&Embeddings::cat(&values)?, &batch)?;
        drop(values);
        let forward_s = self.phase_end(started)?;
        let backward_started = Instant::now();
        let mut total: Option<Vec<Option<Tensor>>> = None;
        for &start in &starts {
            let forward = match kept.take() {
                Some(forward) => forward,
                None => self.student.forward_for_backward(&chunk(start)?)?,
            };
            let len = forward.embeddings.z1.dim(0)?;
            let param_grads = self.student.backward(forward, &grads.narrow(start, len)?)?;
            let param_grads =
                self.optimizer.params().map(|(_, var)| param_grads.get(var.as_tensor()).cloned()).collect();
            total = Some(match total {
                None => param_grads,
                Some(acc) => optim::add_grads(acc, param_grads)?,
            });
        }
        let backward_s = self.phase_end(backward_started)?;
        let metrics = MicroMetrics {
            kind: batch.kind,
            loss: loss.total,
            loss_text: loss.text,
            loss_grounding: loss.grounding,
            masked_negatives: loss.masked_negatives,
            forward_s,
            backward_s,
        };
        Ok((metrics, total.expect("a batch has a chunk")))
    }

    /// One optimiser step (all micro-batches, all-reduce, clip, AdamW).
    fn step(&mut self) -> Result<StepMetrics> {
        let start = Instant::now();
        let comm_before = self.comm.time_in_collectives();
        let accum = self.cfg.train.grad_accum;
        let mut total: Option<Vec<Option<Tensor>>> = None;
        let mut micro = Vec::with_capacity(accum);
        for _ in 0..accum {
            let (m, grads) = self.micro_step()?;
            micro.push(m);
            total = Some(match total {
                None => grads,
                Some(acc) => optim::add_grads(acc, grads)?,
            });
        }
        let update_started = Instant::now();
        let mut grads = crate::dist::all_reduce_grads(self.comm, total.expect("grad_accum >= 1"))?;
        let grad_norm = optim::clip_global_norm(&mut grads, self.cfg.train.grad_clip)?;
        let mut out = StepMetrics::from_micro(self.state.step + 1, &micro);
        if !(out.loss.is_finite() && out.loss_text.is_finite() && grad_norm.is_finite()) {
            return Err(self.diverged(&out, grad_norm));
        }
        let t = &self.cfg.train;
        let lr = t.lr
            * optim::linear_schedule(self.state.step as usize, t.warmup_steps, self.total_steps() as usize);
        self.optimizer.step(&grads, lr)?;
        let update_s = self.phase_end(update_started)?;
        self.state.step += 1;
        if self.cfg.train.phase_timings {
            out.phases = Some(Phases {
                forward_s: micro.iter().map(|m| m.forward_s).sum(),
                backward_s: micro.iter().map(|m| m.backward_s).sum(),
                update_s,
            });
        }
        out.lr = lr;
        out.grad_norm = grad_norm;
        out.step_s = start.elapsed().as_secs_f64();
        out.sentences_per_s = (self.plan.global_batch() * accum) as f64 / out.step_s;
        out.comm_s = (self.comm.time_in_collectives() - comm_before).as_secs_f64();
        Ok(out)
    }

    /// The error of a step whose loss or gradient is not finite: nothing of it is applied, saved
    /// or exported. A checkpoint upload in flight holds an earlier, finite state: it commits first,
    /// so that the error can name it.
    fn diverged(&mut self, step: &StepMetrics, grad_norm: f64) -> anyhow::Error {
        if let Some(Err(err)) = self.uploads.as_mut().map(Uploads::wait) {
            tracing::error!("{err:#}");
        }
        let last_good = match self.store.pointer(Pointer::Latest) {
            Ok(Some(name)) => format!("the last good checkpoint is {}/checkpoints/{name}", self.store.url()),
            Ok(None) => "no checkpoint was written".to_owned(),
            Err(err) => format!("the last checkpoint is unknown ({err:#})"),
        };
        InputError::wrap(anyhow::anyhow!(
            "training diverged at step {} ({:?} batch): loss {} (text {}, grounding {:?}), gradient norm \
             {grad_norm}; the step was not applied and {last_good} (lower train.lr, keep train.grad_clip on)",
            step.step,
            step.kind,
            step.loss,
            step.loss_text,
            step.loss_grounding
        ))
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
    /// collectives (and must agree), and rank 0 copies the state into an upload job. With
    /// `output.async_checkpoint` the job runs in the background while training goes on (its
    /// failure surfaces at a later step); without, it runs now and every rank waits at a barrier.
    pub fn save_checkpoint(&mut self) -> Result<()> {
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
        if self.comm.rank() == 0 {
            let job = self.checkpoint_job()?;
            match &mut self.uploads {
                Some(uploads) => uploads.start(job)?,
                None => job(&self.store)?,
            }
        }
        if !self.cfg.output.async_checkpoint {
            self.comm.barrier()?;
        }
        Ok(())
    }

    /// The upload of a checkpoint of the current state (copied to host memory now): the commit
    /// protocol, the `best` pointer, retention (after the commit), the metrics files.
    fn checkpoint_job(&self) -> Result<Job> {
        let weights = self.student.weights();
        if let Some(bad) = first_non_finite(&weights)? {
            return Err(InputError::wrap(anyhow::anyhow!(
                "training diverged by step {}: weight {bad} is not finite; no checkpoint was written \
                 (lower train.lr, keep train.grad_clip on)",
                self.state.step
            )));
        }
        let mut parts = self.static_parts.clone();
        parts.insert(MODEL.into(), layout::safetensors_bytes(&weights)?);
        parts.insert(OPTIMIZER.into(), layout::safetensors_bytes(&self.optimizer.state()?)?);
        parts.insert(STATE.into(), Bytes::from(serde_json::to_vec_pretty(&self.state)?));
        parts.insert(layout::CONFIG.into(), Bytes::from(self.cfg.to_toml()));
        let metrics = self.metrics.snapshot()?;
        let (step, keep) = (self.state.step, self.cfg.output.keep);
        let best = self.state.best_step == Some(step);
        Ok(Box::new(move |store: &CheckpointStore| {
            crate::events::emit("checkpoint_writing", serde_json::json!({"step": step}));
            let started = Instant::now();
            let saved = store.save(step, &parts)?;
            if best {
                store.set_pointer(Pointer::Best, &saved)?;
            }
            let deleted = store.retain(keep)?;
            for (name, data) in metrics {
                store.put_file(&name, data)?;
            }
            let upload_s = started.elapsed().as_secs_f64();
            tracing::info!(checkpoint = %saved, deleted = deleted.len(), upload_s, "checkpoint saved");
            crate::events::emit(
                "checkpoint_saved",
                serde_json::json!({"checkpoint": saved, "step": step, "upload_s": upload_s}),
            );
            Ok(())
        }))
    }

    /// After a failure of a distributed run: this rank's flight record (its last collectives)
    /// under `diagnostics/round-K/rank-R.json` in the run's store, and its summary in the log.
    /// Input errors are not the collectives' business and leave no record.
    pub fn write_diagnostics(&self, round: u64, error: &anyhow::Error) {
        let rank = self.comm.rank();
        if self.comm.world_size() == 1 || crate::InputError::is(error) {
            return;
        }
        tracing::error!(rank, round, "flight recorder: {}", crate::dist::flight::summary());
        let record = serde_json::json!({
            "rank": rank,
            "round": round,
            "step": self.state.step,
            "error": format!("{error:#}"),
            "collectives": crate::dist::flight::recent(),
        });
        let name = format!("diagnostics/round-{round}/rank-{rank}.json");
        let written = serde_json::to_vec_pretty(&record)
            .map_err(anyhow::Error::from)
            .and_then(|bytes| self.store.put_file(&name, Bytes::from(bytes)));
        match written {
            Ok(()) => tracing::error!("flight record written to {}/{name}", self.store.url()),
            Err(err) => tracing::warn!("cannot write the flight record {name}: {err:#}"),
        }
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
        let local = STOP.load(Ordering::SeqCst);
        if self.comm.world_size() == 1 {
            return Ok(local);
        }
        Ok(self.comm.all_gather_bytes(&[u8::from(local)])?.iter().any(|b| b.first() == Some(&1)))
    }

    /// Evaluates when due; returns the score and whether it is a new best.
    fn evaluate_if_due(&mut self, done: bool) -> Result<Option<(f64, bool)>> {
        let every = self.cfg.train.eval_steps as u64;
        let step = self.state.step;
        if every == 0 || !(step.is_multiple_of(every) || done) {
            return Ok(None);
        }
        let score = self.evaluate_everywhere()?;
        let new_best = self.state.best_score.is_none_or(|best| score > best);
        if new_best {
            self.state.best_score = Some(score);
            self.state.best_step = Some(step);
        }
        self.metrics.evaluation(step, score)?;
        Ok(Some((score, new_best)))
    }

    /// STS-B dev of the untrained student, when a fresh run evaluates.
    fn evaluate_before_training(&mut self) -> Result<Option<f64>> {
        if self.cfg.train.eval_steps == 0 || self.state.step > 0 {
            return Ok(None);
        }
        let score = self.evaluate_everywhere()?;
        tracing::info!(stsb_dev = score, "before training");
        self.metrics.evaluation(0, score)?;
        Ok(Some(score))
    }

    /// Why training stops after this step, if it does: `--stop-after`, or a signal to any rank.
    fn stop_reason(&self, stop_after: Option<u64>) -> Result<Option<Outcome>> {
        if stop_after.is_some_and(|s| self.state.step >= s) {
            return Ok(Some(Outcome::StoppedAfter));
        }
        Ok(self.stop_requested()?.then_some(Outcome::Interrupted))
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
        let (rank, world_size) = (self.comm.rank(), self.comm.world_size());
        tracing::info!(rank, world_size, total_steps = total, start_step, "training");
        let initial_dev = self.evaluate_before_training()?;
        let mut bar = Progress::new(total, start_step, rank, self.cfg.output.log_every_s);
        let started = Instant::now();
        let (mut final_dev, mut outcome) = (None, Outcome::Finished);
        while self.state.step < total {
            crate::dist::flight::set_step(self.state.step + 1);
            if let Some(uploads) = &mut self.uploads {
                uploads.check()?;
            }
            let m = self.step()?;
            self.metrics.step(&m)?;
            let step = self.state.step;
            let done = step == total;
            let evaluated = self.evaluate_if_due(done)?;
            if let Some((score, _)) = evaluated {
                final_dev = Some(score);
                let best = self.state.best_score;
                bar.suspend(|| tracing::info!(step, stsb_dev = score, best = ?best, "evaluated"));
            }
            bar.step(&m, evaluated.map(|(score, _)| score));
            let stop = self.stop_reason(stop_after)?;
            let every = self.cfg.output.checkpoint_steps as u64;
            let new_best = evaluated.is_some_and(|(_, best)| best);
            let due = done || new_best || stop.is_some() || (every > 0 && step.is_multiple_of(every));
            if due && self.cfg.output.save {
                bar.suspend(|| self.save_checkpoint())?;
            }
            if let Some(stop) = stop {
                outcome = stop;
                bar.suspend(|| tracing::info!(step, ?outcome, "stopping"));
                break;
            }
        }
        bar.finish();
        if let Some(uploads) = &mut self.uploads {
            uploads.wait()?;
        }
        let seconds = started.elapsed().as_secs_f64();
        let steps = self.state.step - start_step;
        if rank == 0 && outcome == Outcome::Finished && self.cfg.output.save {
            self.export_best()?;
        }
        self.metrics.sync(&self.store)?;
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

    /// Exports the best checkpoint (else, or when it does not verify, the latest) to
    /// `<output.dir>/best-model/`.
    fn export_best(&self) -> Result<()> {
        let mut candidates = Vec::new();
        for pointer in [Pointer::Best, Pointer::Latest] {
            if let Some(name) = self.store.pointer(pointer)? {
                if !candidates.contains(&name) {
                    candidates.push(name);
                }
            }
        }
        let mut failures = Vec::new();
        for name in candidates {
            match self.store.load(&name) {
                Ok(checkpoint) => {
                    let files = crate::export::export_files(&checkpoint)?;
                    self.store.put_files("best-model", &files)?;
                    let to = format!("{}/best-model", self.store.url());
                    tracing::info!(checkpoint = %name, %to, "exported");
                    return Ok(());
                }
                Err(err) => {
                    tracing::warn!("cannot export checkpoint {name}, trying the next: {err:#}");
                    failures.push(format!("{name}: {err:#}"));
                }
            }
        }
        if failures.is_empty() {
            return Ok(());
        }
        bail!("cannot export the run to {}/best-model: {}", self.store.url(), failures.join("; "))
    }
}
