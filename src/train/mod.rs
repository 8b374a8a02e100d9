//! The KDMCSE training application: each micro-step takes this rank's share of a global batch
//! ([`batches`]), runs the student on both dropout views ([`student`]), computes the objective
//! over the global batch (gathered across ranks) and back-propagates; a step all-reduces the
//! gradients, clips them and updates with AdamW ([`optim`]); the loop evaluates STS-B dev,
//! records metrics ([`metrics`]) and saves the run through its [`Checkpointer`], which resumes
//! exactly.
//!
//! Everything random is a function of the seed and counters kept in the checkpoint (the epoch
//! permutations, the dropout masks, the head initialisation), so a resumed run continues
//! bit-for-bit where an uninterrupted one would be.

pub mod batches;
pub mod metrics;
pub mod optim;
pub mod student;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::checkpoint::checkpointer::{Checkpointer, ResumePoint, Snapshot, Start};
use crate::checkpoint::layout::{self, InputDigests, TrainerState, INPUTS, MODEL, OPTIMIZER};
use crate::checkpoint::Checkpoint;
use crate::config::{Precision, TrainConfig};
use crate::data::Tokenizer;
use crate::dist::{self, Communicator};
use crate::eval::{self, TaskData};
use crate::loss::{Grounding, Reported};
use crate::InputError;
use batches::{BatchPlan, TwoViewBatch};
use metrics::{MetricsLog, MicroMetrics, Phases, Progress, StepMetrics};
use optim::{AdamW, AdamWConfig};
use student::{Embeddings, HeadsSpec, Output, Student};

/// Sentences per forward pass when evaluating STS-B dev.
const EVAL_BATCH: usize = 128;

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

/// STS-B dev, for model selection; read whole (SentEval: no truncation).
struct DevSet {
    data: TaskData,
    tokenizer: Tokenizer,
}

/// What a run reads from the files its config names: the student (model folder), the batches
/// (corpora, tokenizer), the dev set and the parts every checkpoint carries.
struct Inputs {
    student: Student,
    plan: BatchPlan,
    dev: DevSet,
    static_parts: BTreeMap<String, Bytes>,
    digests: InputDigests,
}

impl Inputs {
    fn load(cfg: &TrainConfig, world_size: usize, device: &Device) -> Result<Self> {
        cfg.validate()?;
        // A Hub id is fetched into (or, offline, found in) the Hugging Face cache.
        let model_dir: &Path = &crate::hub::model_dir(&cfg.model.path, "model.path")?;
        let encoder_config = crate::model::load_config(model_dir)?;
        let t = &cfg.train;
        let pad_id = encoder_config.pad_token_id as u32;
        let max_len = cfg.model.max_len.min(encoder_config.max_tokens());
        let tokenizer = Tokenizer::from_dir(model_dir, max_len, pad_id)?;
        let dropout =
            (encoder_config.hidden_dropout_prob as f32, encoder_config.attention_probs_dropout_prob as f32);
        let plan = BatchPlan::new(cfg, t.rank_batch(world_size)? * world_size, tokenizer, dropout)?;
        let dev = DevSet {
            data: eval::load_stsb_dev(&cfg.data.eval)?,
            tokenizer: Tokenizer::from_dir(model_dir, encoder_config.max_tokens(), pad_id)?,
        };
        let heads = HeadsSpec {
            proj_dim: cfg.model.proj_dim,
            teacher_dim: plan.teacher_dim(),
            init: cfg.model.head_init,
            seed: t.seed,
        };
        let student =
            Student::load(model_dir, cfg.model.pooling, heads, t.precision.compute_dtype(), device)?;
        let mut static_parts = layout::static_parts(model_dir, &encoder_config)?;
        let (text, paired) = plan.corpus_digests();
        let digests = InputDigests::new(text, paired, &static_parts);
        static_parts.insert(INPUTS.to_owned(), Bytes::from(serde_json::to_vec(&digests)?));
        Ok(Self { student, plan, dev, static_parts, digests })
    }
}

/// Refuses to train unless every rank was started with the same config (all keys but
/// [`crate::config::NODE_PATH_KEYS`]) on the same inputs (by content): a node started with
/// another config (a ConfigMap changed between pod starts) or another copy of the data would
/// otherwise train a mixture of runs without any error, and one that evaluates or checkpoints at
/// other steps would meet the others in the wrong collectives.
fn same_run_on_every_rank(comm: &dyn Communicator, cfg: &TrainConfig, inputs: InputDigests) -> Result<()> {
    #[derive(Serialize, Deserialize)]
    struct RankRun {
        config: BTreeMap<String, String>,
        inputs: InputDigests,
    }
    let mine = RankRun { config: crate::config::keys_except(cfg, &crate::config::NODE_PATH_KEYS), inputs };
    let runs = comm.all_gather_bytes(&serde_json::to_vec(&mine)?)?;
    let first: RankRun = serde_json::from_slice(&runs[0]).context("rank 0's run is unreadable")?;
    for (rank, bytes) in runs.iter().enumerate().skip(1) {
        let theirs: RankRun =
            serde_json::from_slice(bytes).with_context(|| format!("rank {rank}'s run is unreadable"))?;
        let differs = if let Some((key, zero, other)) =
            crate::config::first_difference(&first.config, &theirs.config)
        {
            format!(
                "rank {rank} was started with {key} = {other}, rank 0 with {key} = {zero}: every node must \
                 start its workers with the same config file, --set flags and KDMCSE_* variables"
            )
        } else if let Some((what, zero, other)) = first.inputs.difference(&theirs.inputs) {
            format!(
                "rank {rank} reads {what} as {other}, rank 0 as {zero}: every node must read the same \
                 files (is one node's copy stale or incomplete?)"
            )
        } else {
            continue;
        };
        return Err(InputError::wrap(anyhow::anyhow!("{differs}")));
    }
    Ok(())
}

pub struct Trainer<'c> {
    cfg: TrainConfig,
    comm: &'c dyn Communicator,
    device: Device,
    student: Student,
    optimizer: AdamW,
    plan: BatchPlan,
    dev: DevSet,
    checkpoints: Checkpointer,
    metrics: MetricsLog,
    pub state: TrainerState,
}

impl<'c> Trainer<'c> {
    /// A trainer on `device` (from `cfg.train.device`, shared with the communicator so that GPU
    /// collectives run on the same stream). What the config names is the user's input, and a
    /// fault there an [`InputError`]; the collectives and the store are not: a lost peer or a
    /// store that is down fails as a runtime error, which a restart may cure.
    pub fn new(cfg: TrainConfig, comm: &'c dyn Communicator, device: Device) -> Result<Self> {
        let Inputs { student, plan, dev, static_parts, digests } =
            Inputs::load(&cfg, comm.world_size(), &device).map_err(InputError::wrap)?;
        same_run_on_every_rank(comm, &cfg, digests)?;
        let t = &cfg.train;
        if device.is_cpu() && t.precision == Precision::Bf16 {
            // Without AMX the products widen bf16 operands to f32 (ops::matmul).
            if crate::ops::Isa::selected() < crate::ops::Isa::Amx {
                tracing::warn!(
                    "train.precision = \"bf16\" on a CPU without AMX (or with KDMCSE_ISA below amx) rounds \
                     like bf16 but multiplies in f32: about fp32's speed, not faster"
                );
            }
        }
        // A process-wide cuBLAS switch (a no-op without CUDA).
        candle_core::cuda::set_gemm_reduced_precision_f32(t.tf32);
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
        let (rank, world_size) = (comm.rank(), comm.world_size());
        let checkpoints =
            Checkpointer::open(&cfg, static_parts, rank, world_size).map_err(InputError::wrap)?;
        let metrics = MetricsLog::open(&cfg, rank, checkpoints.store())?;
        let state = TrainerState::start(world_size);
        Ok(Self { cfg, comm, device, student, optimizer, plan, dev, checkpoints, metrics, state })
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

    /// Restores the run as `start` says ([`Checkpointer::resume_point`]); returns the checkpoint
    /// name used, if any.
    pub fn resume(&mut self, start: &Start) -> Result<Option<String>> {
        let checkpoint = match self.checkpoints.resume_point(start, self.comm)? {
            ResumePoint::Fresh { cleared } => {
                if cleared {
                    self.metrics.clear(self.checkpoints.store())?;
                }
                return Ok(None);
            }
            ResumePoint::Checkpoint(checkpoint) => checkpoint,
        };
        self.restore(&checkpoint)?;
        tracing::info!(checkpoint = %checkpoint.name, step = self.state.step, "resumed");
        crate::events::emit(
            "resumed",
            serde_json::json!({
                "rank": self.comm.rank(), "world_size": self.comm.world_size(),
                "checkpoint": checkpoint.name, "step": self.state.step,
            }),
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

    fn restore(&mut self, checkpoint: &Checkpoint) -> Result<()> {
        let weights = layout::tensors(checkpoint, MODEL, &self.device)?;
        self.student.restore(&weights, &format!("checkpoint {}", checkpoint.name))?;
        let optimizer = layout::tensors(checkpoint, OPTIMIZER, &self.device)?;
        self.optimizer.load_state(&optimizer)?;
        let state = TrainerState::of(checkpoint)?;
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
    /// (`z1`, `p1`, `p2`, its teacher features) against every rank's columns (`z2`, the image
    /// and caption heads' outputs, the teacher features of the whole pool), so the teacher
    /// similarities, margins and the noisy-negative filter cover the pool while each rank
    /// computes `B_local x pool` logits. Returns the global loss's numbers (the mean over ranks)
    /// and the gradient of the global loss, divided by `grad_accum`, with respect to each of this
    /// rank's embeddings.
    fn pool_objective(
        &self,
        local: &Embeddings,
        batch: &TwoViewBatch,
    ) -> Result<(Vec<Reported>, Embeddings)> {
        let comm = self.comm;
        let (rows, offset) = (batch.examples, comm.rank() * batch.examples);
        // The objective's leaves: this rank's rows, and the pool's columns from every rank.
        let mut leaves = BTreeMap::new();
        for (output, x) in local.iter() {
            let x = if output.is_pool_column() { comm.all_gather(x)? } else { x.clone() };
            leaves.insert(output, Var::from_tensor(&x)?);
        }
        let leaf = |output: Output| leaves.get(&output).map(Var::as_tensor);
        let teacher_cols = match &batch.teacher {
            Some(teacher) => Some((comm.all_gather(&teacher.image)?, comm.all_gather(&teacher.caption)?)),
            None => None,
        };
        let grounding = match (&batch.teacher, &teacher_cols, leaf(Output::P1)) {
            (Some(teacher), Some((img, cap)), Some(p1)) => Some(Grounding {
                p1,
                p2: leaf(Output::P2).expect("a paired batch's outputs"),
                v: leaf(Output::Image).expect("a paired batch's outputs"),
                t: leaf(Output::Caption).expect("a paired batch's outputs"),
                img_rows: &teacher.image,
                cap_rows: &teacher.caption,
                img_cols: img,
                cap_cols: cap,
            }),
            _ => None,
        };
        let (z1, z2) = (leaf(Output::Z1).expect("z1"), leaf(Output::Z2).expect("z2"));
        let terms = self.cfg.loss.compute(z1, z2, grounding.as_ref(), offset)?;
        // The global loss is the mean of the ranks' (equal-sized) row means.
        let scale = 1.0 / (comm.world_size() * self.cfg.train.grad_accum) as f64;
        let grads = (&terms.total * scale)?.backward()?;
        let grad_of = |var: &Var| grads.get(var.as_tensor()).cloned().map_or_else(|| var.zeros_like(), Ok);
        let (columns, row_leaves): (Vec<_>, Vec<_>) = leaves.iter().partition(|(o, _)| o.is_pool_column());
        let column_grads =
            columns.iter().map(|(_, v)| grad_of(v)).collect::<candle_core::Result<Vec<_>>>()?;
        let own = dist::own_rows_of_pool_grads(comm, &column_grads, rows)?;
        let mut out = Vec::with_capacity(leaves.len());
        for (output, var) in row_leaves {
            out.push((*output, grad_of(var)?));
        }
        out.extend(columns.iter().map(|(o, _)| **o).zip(own));
        let reported = metrics::over_ranks(comm, &terms.reported()?)?;
        Ok((reported, Embeddings::new(out)))
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
        let (reported, grads) = self.pool_objective(&Embeddings::cat(&values)?, &batch)?;
        drop(values);
        let forward_s = self.phase_end(started)?;
        let backward_started = Instant::now();
        let mut total: Option<Vec<Option<Tensor>>> = None;
        for &start in &starts {
            let forward = match kept.take() {
                Some(forward) => forward,
                None => self.student.forward_for_backward(&chunk(start)?)?,
            };
            let len = forward.embeddings.examples()?;
            let param_grads = self.student.backward(forward, &grads.narrow(start, len)?)?;
            let param_grads =
                self.optimizer.params().map(|(_, var)| param_grads.get(var.as_tensor()).cloned()).collect();
            total = Some(match total {
                None => param_grads,
                Some(acc) => optim::add_grads(acc, param_grads)?,
            });
        }
        let backward_s = self.phase_end(backward_started)?;
        let metrics = MicroMetrics { kind: batch.kind, reported, forward_s, backward_s };
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
        if !(out.reported.values().all(|v| v.is_finite()) && grad_norm.is_finite()) {
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
    /// or exported.
    fn diverged(&mut self, step: &StepMetrics, grad_norm: f64) -> anyhow::Error {
        let last_good = self.checkpoints.last_good();
        let reported: Vec<String> =
            step.reported.iter().map(|(name, value)| format!("{name} {value}")).collect();
        InputError::wrap(anyhow::anyhow!(
            "training diverged at step {} ({:?} batch): {}, gradient norm {grad_norm}; the step was not \
             applied and {last_good} (lower train.lr, keep train.grad_clip on)",
            step.step,
            step.kind,
            reported.join(", ")
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

    /// Writes a checkpoint of the current state ([`Checkpointer::save`]).
    pub fn save_checkpoint(&mut self) -> Result<()> {
        let (student, optimizer, metrics) = (&self.student, &self.optimizer, &self.metrics);
        self.checkpoints.save(self.comm, &self.state, || {
            Ok(Snapshot {
                weights: student.weights(),
                optimizer: optimizer.state()?,
                metrics: metrics.snapshot()?,
            })
        })
    }

    /// After a failure of a distributed run: this rank's flight record in the run's store
    /// ([`Checkpointer::write_flight_record`]).
    pub fn write_diagnostics(&self, round: u64, error: &anyhow::Error) {
        self.checkpoints.write_flight_record(round, self.state.step, error);
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
            self.checkpoints.check_upload()?;
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
            let new_best = evaluated.is_some_and(|(_, best)| best);
            if self.checkpoints.is_due(step, done, new_best, stop.is_some()) {
                bar.suspend(|| self.save_checkpoint())?;
            }
            if let Some(stop) = stop {
                outcome = stop;
                bar.suspend(|| tracing::info!(step, ?outcome, "stopping"));
                break;
            }
        }
        bar.finish();
        self.checkpoints.finish_upload()?;
        let seconds = started.elapsed().as_secs_f64();
        let steps = self.state.step - start_step;
        if rank == 0 && outcome == Outcome::Finished && self.cfg.output.save {
            self.checkpoints.export_best(crate::export::export_files)?;
        }
        self.metrics.sync(self.checkpoints.store())?;
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
}
