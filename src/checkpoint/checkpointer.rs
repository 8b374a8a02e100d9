//! The saved run: its rules, apart from the training loop. Which checkpoint a run resumes and
//! what a resume must refuse (a config that trains differently, other data, another pool,
//! another architecture, ranks that found different checkpoints), when a step saves, what a
//! checkpoint is made of, the `best` and `latest` pointers, retention, the background upload, the
//! export of the best model at the end, and the flight records of a failed run. The trainer
//! calls [`Checkpointer`] in a few lines.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use anyhow::{bail, Result};
use bytes::Bytes;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::background::{Job, Uploads};
use super::layout::{
    self, InputDigests, TrainerState, CONFIG, ENCODER_CONFIG, INPUTS, MODEL, OPTIMIZER, STATE,
};
use super::{Checkpoint, CheckpointStore, Pointer, BEST_MODEL};
use crate::config::{training_difference, OutputConfig, TrainConfig};
use crate::dist::Communicator;
use crate::InputError;

/// What a rank found in the output store at the start ([`Checkpointer::resume_point`]).
#[derive(Serialize, Deserialize)]
struct Found {
    /// The checkpoint it would resume.
    resumes: Option<String>,
    /// Every checkpoint the store lists.
    listed: Vec<String>,
}

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

/// Where [`Checkpointer::resume_point`] starts a run.
pub enum ResumePoint {
    /// From the base model; `cleared`: the folder's earlier run was deleted (`--overwrite`).
    Fresh { cleared: bool },
    /// From a verified checkpoint that fits the run.
    Checkpoint(Checkpoint),
}

/// What a checkpoint saves of the run besides the parts every checkpoint carries: copies in host
/// memory, so training can go on while they upload.
pub struct Snapshot {
    pub weights: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
    /// The run's metrics files to copy to a remote `output.dir` (name, contents).
    pub metrics: Vec<(String, Bytes)>,
}

/// The saved run of one training job, on every rank; rank 0 writes.
pub struct Checkpointer {
    store: CheckpointStore,
    /// Rank 0's background uploads (`output.async_checkpoint`).
    uploads: Option<Uploads>,
    /// Parts every checkpoint carries unchanged (encoder config, tokenizer, pooler).
    static_parts: BTreeMap<String, Bytes>,
    config: TrainConfig,
    rank: usize,
    world_size: usize,
}

impl Checkpointer {
    /// The saved run of `config` under `output.dir`, on `rank` of `world_size`; `static_parts`
    /// from the student's model folder ([`layout::static_parts`]).
    pub fn open(
        config: &TrainConfig,
        static_parts: BTreeMap<String, Bytes>,
        rank: usize,
        world_size: usize,
    ) -> Result<Self> {
        let output = &config.output;
        let store = CheckpointStore::open(&output.dir)?;
        let background = rank == 0 && output.async_checkpoint && output.save;
        let uploads = if background { Some(Uploads::open(&output.dir)?) } else { None };
        Ok(Self { store, uploads, static_parts, config: config.clone(), rank, world_size })
    }

    /// The run's store (`output.dir`), for its other files (metrics).
    pub fn store(&self) -> &CheckpointStore {
        &self.store
    }

    fn output(&self) -> &OutputConfig {
        &self.config.output
    }

    /// Where the run starts, as `start` says. A run never mixes with another in one folder: a
    /// fresh start into a folder with checkpoints, or onto checkpoints none of which verifies,
    /// needs `overwrite` (which deletes them first, on rank 0, while the others wait); a resume
    /// must fit the run ([`Self::check_fits`]). Every rank must find the same checkpoint.
    pub fn resume_point(&self, start: &Start, comm: &dyn Communicator) -> Result<ResumePoint> {
        let found = match &start.resume {
            Resume::None => None,
            Resume::Auto => self.store.load_newest()?,
            Resume::From(location) => Some(layout::open(location, Some(&self.store))?),
        };
        self.same_on_every_rank(found.as_ref(), comm)?;
        let Some(checkpoint) = found else {
            let why = match start.resume {
                Resume::None => "--resume none starts a new run",
                _ => "none of them verifies (see the warnings above)",
            };
            return self.fresh_start(start, why, comm);
        };
        self.check_fits(&checkpoint, start.allow_config_change).map_err(InputError::wrap)?;
        let saved = TrainerState::of(&checkpoint)?.world_size;
        if saved != self.world_size {
            tracing::info!(
                saved,
                now = self.world_size,
                "resuming on another number of ranks: the data order, dropout masks and pool are global, \
                 so the training continues as it would have"
            );
        }
        tracing::info!(checkpoint = %checkpoint.name, "resuming");
        Ok(ResumePoint::Checkpoint(checkpoint))
    }

    /// Refuses a start where ranks found different checkpoints (or some none). Where rank 0's
    /// is missing from another rank's store, their `output.dir` is not one store (a node-local
    /// path on several nodes): an input error. Where it is there, that rank could not read it,
    /// which a restart may cure.
    fn same_on_every_rank(&self, found: Option<&Checkpoint>, comm: &dyn Communicator) -> Result<()> {
        let mine = Found { resumes: found.map(|c| c.name.clone()), listed: self.store.list()? };
        let all = comm
            .all_gather_bytes(&serde_json::to_vec(&mine)?)?
            .iter()
            .map(|bytes| serde_json::from_slice(bytes))
            .collect::<Result<Vec<Found>, _>>()?;
        let zero = &all[0];
        let Some((rank, theirs)) = all.iter().enumerate().find(|(_, f)| f.resumes != zero.resumes) else {
            return Ok(());
        };
        let (url, name) =
            (self.store.url(), |f: &Found| f.resumes.clone().unwrap_or("(no checkpoint)".into()));
        let differ =
            format!("rank 0 resumes from {} and rank {rank} from {} in {url}", name(zero), name(theirs));
        let one_store = match &zero.resumes {
            Some(checkpoint) => theirs.listed.contains(checkpoint),
            None => theirs.listed.iter().all(|c| zero.listed.contains(c)),
        };
        if one_store {
            bail!("{differ}: rank {rank} could not read what rank 0 did (its warnings say why)");
        }
        Err(InputError::wrap(anyhow::anyhow!(
            "{differ}, which holds other checkpoints for each: every rank must see one store, which a \
             node-local output.dir on several nodes is not (use s3://, az:// or a shared filesystem)"
        )))
    }

    fn fresh_start(&self, start: &Start, why: &str, comm: &dyn Communicator) -> Result<ResumePoint> {
        let existing = self.store.list()?;
        if existing.is_empty() {
            tracing::info!(dir = %self.store.url(), "starting fresh");
            return Ok(ResumePoint::Fresh { cleared: false });
        }
        if !start.overwrite {
            let more = match existing.len() {
                1 => String::new(),
                n => format!(" and {} more", n - 1),
            };
            return Err(InputError::wrap(anyhow::anyhow!(
                "{} holds checkpoints ({}{more}) and {why}: resume them (--resume auto), or start over \
                 with --resume none --overwrite, which deletes them",
                self.store.url(),
                existing.last().expect("not empty"),
            )));
        }
        if self.rank == 0 {
            tracing::warn!(dir = %self.store.url(), checkpoints = existing.len(), "--overwrite: deleting the folder's run");
            self.store.clear()?;
        }
        comm.barrier()?;
        tracing::info!(dir = %self.store.url(), "starting fresh");
        Ok(ResumePoint::Fresh { cleared: true })
    }

    /// Refuses a checkpoint this run cannot continue: another encoder than the model folder's,
    /// and unless `allow_config_change`, a config that trains differently (the keys of
    /// [`crate::config::RESULT_NEUTRAL_KEYS`] may differ), other data ([`InputDigests`]) or
    /// another pool (another number of ranks may resume it, the global batch must stay).
    pub fn check_fits(&self, checkpoint: &Checkpoint, allow_config_change: bool) -> Result<()> {
        let name = &checkpoint.name;
        let ours: crate::model::Config =
            serde_json::from_slice(self.static_parts.get(ENCODER_CONFIG).expect("a static part"))?;
        if layout::encoder_config(checkpoint)? != ours {
            bail!(
                "checkpoint {name} was trained from another architecture than {} (its {ENCODER_CONFIG} \
                 differs): point model.path at the model it was trained from",
                self.config.model.path.display()
            );
        }
        if allow_config_change {
            return Ok(());
        }
        let theirs = layout::run_config(checkpoint)?;
        let inputs = InputDigests::of(&checkpoint.parts, &format!("checkpoint {name}"))?;
        if let Some((key, was, now)) = training_difference(&theirs, &self.config, inputs.is_some()) {
            bail!(
                "checkpoint {name} was trained with {key} = {was}, this run has {key} = {now}: resuming would \
                 continue another training; pass --allow-config-change to resume anyway, or start a new \
                 run elsewhere"
            );
        }
        self.check_same_inputs(name, inputs)?;
        // The same config gives another pool on another number of ranks with `batch_size`.
        let saved_world = TrainerState::of(checkpoint)?.world_size;
        let was = theirs.train.rank_batch(saved_world)? * saved_world;
        let now = self.config.train.rank_batch(self.world_size)? * self.world_size;
        if was != now {
            bail!(
                "checkpoint {name} was trained with a global batch of {was} ({saved_world} ranks), this run \
                 has {now} ({} ranks): set train.global_batch = {was} to continue the same training, or pass \
                 --allow-config-change to resume with the new pool",
                self.world_size
            );
        }
        Ok(())
    }

    /// Refuses checkpoint `name`, trained on the inputs `was`, where this run reads other data;
    /// one written before checkpoints held [`INPUTS`] (`was` is `None`) is not compared.
    fn check_same_inputs(&self, name: &str, was: Option<InputDigests>) -> Result<()> {
        let Some(was) = was else {
            tracing::info!(checkpoint = %name, "the checkpoint predates {INPUTS}: its data is not compared");
            return Ok(());
        };
        let now = InputDigests::of(&self.static_parts, "this run")?;
        if let Some((what, was, now)) = now.and_then(|now| was.difference(&now)) {
            bail!(
                "checkpoint {name} was trained on {what}: {was}, this run reads {now}: resuming would \
                 continue the training on other data; pass --allow-config-change to resume anyway, or \
                 start a new run elsewhere"
            );
        }
        Ok(())
    }

    /// Whether the step just taken saves: the last step, a new best, a stop, or every
    /// `output.checkpoint_steps`; never without `output.save`.
    pub fn is_due(&self, step: u64, last: bool, new_best: bool, stopping: bool) -> bool {
        let every = self.output().checkpoint_steps as u64;
        let periodic = every > 0 && step.is_multiple_of(every);
        self.output().save && (last || new_best || stopping || periodic)
    }

    /// Writes a checkpoint of `state`: every rank's state must agree (they reach rank 0 through
    /// the collectives), and rank 0 copies the run into an upload job (`snapshot`, called on rank
    /// 0 only). With `output.async_checkpoint` the job runs in the background while training
    /// goes on (its failure surfaces at a later step); without, it runs now and every rank waits.
    pub fn save(
        &mut self,
        comm: &dyn Communicator,
        state: &TrainerState,
        snapshot: impl FnOnce() -> Result<Snapshot>,
    ) -> Result<()> {
        let mine = serde_json::to_vec(state)?;
        let states = comm.all_gather_bytes(&mine)?;
        if let Some(rank) = states.iter().position(|s| *s != mine) {
            bail!(
                "rank {rank}'s trainer state differs from rank {}'s at step {}: {} vs {}",
                self.rank,
                state.step,
                String::from_utf8_lossy(&states[rank]),
                String::from_utf8_lossy(&mine)
            );
        }
        if self.rank == 0 {
            let job = self.job(state, snapshot()?)?;
            match &mut self.uploads {
                Some(uploads) => uploads.start(job)?,
                None => job(&self.store)?,
            }
        }
        if !self.output().async_checkpoint {
            comm.barrier()?;
        }
        Ok(())
    }

    /// The upload of one checkpoint: the commit protocol, `best` when the step is the best so
    /// far, retention (after the commit), the metrics files. Weights that are not finite are
    /// never written.
    fn job(&self, state: &TrainerState, snapshot: Snapshot) -> Result<Job> {
        if let Some(bad) = first_non_finite(&snapshot.weights)? {
            return Err(InputError::wrap(anyhow::anyhow!(
                "training diverged by step {}: weight {bad} is not finite; no checkpoint was written \
                 (lower train.lr, keep train.grad_clip on)",
                state.step
            )));
        }
        let mut parts = self.static_parts.clone();
        parts.insert(MODEL.into(), layout::safetensors_bytes(&snapshot.weights)?);
        parts.insert(OPTIMIZER.into(), layout::safetensors_bytes(&snapshot.optimizer)?);
        parts.insert(STATE.into(), Bytes::from(serde_json::to_vec_pretty(state)?));
        parts.insert(CONFIG.into(), Bytes::from(self.config.to_toml()));
        let (step, keep, metrics) = (state.step, self.output().keep, snapshot.metrics);
        let best = state.best_step == Some(step);
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

    /// The error of the background upload, if it has failed by now.
    pub fn check_upload(&mut self) -> Result<()> {
        self.uploads.as_mut().map_or(Ok(()), Uploads::check)
    }

    /// Waits for the background upload in flight; its error, if it failed.
    pub fn finish_upload(&mut self) -> Result<()> {
        self.uploads.as_mut().map_or(Ok(()), Uploads::wait)
    }

    /// Which checkpoint a failed run can resume, in words. An upload in flight holds an earlier,
    /// good state: it commits first, so that the answer names it.
    pub fn last_good(&mut self) -> String {
        if let Err(err) = self.finish_upload() {
            tracing::error!("{err:#}");
        }
        match self.store.pointer(Pointer::Latest) {
            Ok(Some(name)) => format!("the last good checkpoint is {}/checkpoints/{name}", self.store.url()),
            Ok(None) => "no checkpoint was written".to_owned(),
            Err(err) => format!("the last checkpoint is unknown ({err:#})"),
        }
    }

    /// Writes the best checkpoint (else, or when it does not verify, the latest) as
    /// `<output.dir>/best-model/`, the files `export` makes of it.
    pub fn export_best(&self, export: impl Fn(&Checkpoint) -> Result<BTreeMap<String, Bytes>>) -> Result<()> {
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
                    self.store.put_files(BEST_MODEL, &export(&checkpoint)?)?;
                    let to = format!("{}/{BEST_MODEL}", self.store.url());
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
        bail!("cannot export the run to {}/{BEST_MODEL}: {}", self.store.url(), failures.join("; "))
    }

    /// After a failure of a distributed run: this rank's flight record (its last collectives)
    /// under `diagnostics/round-K/rank-R.json`, and its summary in the log. Input errors are not
    /// the collectives' business and leave no record.
    pub fn write_flight_record(&self, round: u64, step: u64, error: &anyhow::Error) {
        let rank = self.rank;
        if self.world_size == 1 || InputError::is(error) {
            return;
        }
        tracing::error!(rank, round, "flight recorder: {}", crate::dist::flight::summary());
        let record = serde_json::json!({
            "rank": rank,
            "round": round,
            "step": step,
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
}

/// The name of the first tensor (by name) holding an inf or NaN.
fn first_non_finite(tensors: &HashMap<String, Tensor>) -> Result<Option<String>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::SingleProcess;

    const ENCODER: &str = r#"{"model_type": "bert", "vocab_size": 99, "hidden_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": 64, "type_vocab_size": 2, "layer_norm_eps": 1e-12}"#;

    /// A run's config under `dir` (nothing it names is read here), with `extra` TOML lines.
    fn config(dir: &std::path::Path, extra: &str) -> TrainConfig {
        let text = format!(
            "[model]\npath = \"models/m\"\n[data]\ntext = [\"t.txt\"]\neval = \"sts\"\n[output]\ndir = {:?}\n{extra}",
            dir.display().to_string()
        );
        toml::from_str(&text).unwrap()
    }

    fn parts(encoder: &str) -> BTreeMap<String, Bytes> {
        BTreeMap::from([(ENCODER_CONFIG.to_owned(), Bytes::from(encoder.to_owned()))])
    }

    /// A checkpointer of `cfg` on one of `world` ranks.
    fn checkpointer(cfg: &TrainConfig, world: usize) -> Checkpointer {
        Checkpointer::open(cfg, parts(ENCODER), 0, world).unwrap()
    }

    fn snapshot() -> Result<Snapshot> {
        let weights =
            HashMap::from([("w".to_owned(), Tensor::new(&[1f32, 2.0], &candle_core::Device::Cpu)?)]);
        Ok(Snapshot { weights, optimizer: HashMap::new(), metrics: Vec::new() })
    }

    /// Saves a checkpoint at `step` (the best so far when `best`) and waits for its upload.
    fn save(checkpoints: &mut Checkpointer, step: u64, best: bool) {
        let state = TrainerState {
            step,
            best_step: best.then_some(step),
            ..TrainerState::start(checkpoints.world_size)
        };
        checkpoints.save(&SingleProcess, &state, snapshot).unwrap();
        checkpoints.finish_upload().unwrap();
    }

    fn start(resume: Resume, overwrite: bool) -> Start {
        Start { resume, overwrite, allow_config_change: false }
    }

    #[test]
    fn a_resume_takes_the_newest_good_checkpoint_and_a_fresh_start_never_mixes_runs() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), "");
        let mut checkpoints = checkpointer(&cfg, 1);
        let fresh = checkpoints.resume_point(&start(Resume::Auto, false), &SingleProcess).unwrap();
        assert!(matches!(fresh, ResumePoint::Fresh { cleared: false }));
        save(&mut checkpoints, 2, true);
        save(&mut checkpoints, 4, false);
        let newest =
            |c: &Checkpointer| match c.resume_point(&start(Resume::Auto, false), &SingleProcess).unwrap() {
                ResumePoint::Checkpoint(c) => c.name,
                ResumePoint::Fresh { .. } => panic!("started fresh over checkpoints"),
            };
        assert_eq!(newest(&checkpoints), "step-00000004");
        // A damaged newest checkpoint is passed over for the one before it.
        std::fs::write(dir.path().join("checkpoints/step-00000004").join(MODEL), b"torn").unwrap();
        assert_eq!(newest(&checkpoints), "step-00000002");
        let refused = checkpoints.resume_point(&start(Resume::None, false), &SingleProcess).err().unwrap();
        assert!(InputError::is(&refused) && format!("{refused:#}").contains("--overwrite"), "{refused:#}");
        let cleared = checkpoints.resume_point(&start(Resume::None, true), &SingleProcess).unwrap();
        assert!(matches!(cleared, ResumePoint::Fresh { cleared: true }));
        assert!(checkpoints.store().list().unwrap().is_empty());
    }

    #[test]
    fn a_resume_refuses_another_training_pool_or_architecture() {
        let dir = tempfile::tempdir().unwrap();
        let mut checkpoints = checkpointer(&config(dir.path(), "[train]\nbatch_size = 8\nlr = 3e-5"), 1);
        save(&mut checkpoints, 2, false);
        let checkpoint = checkpoints.store().load("step-00000002").unwrap();
        let refusal = |cfg: &TrainConfig, world: usize, encoder: &str| {
            let other = Checkpointer::open(cfg, parts(encoder), 0, world).unwrap();
            other.check_fits(&checkpoint, false).err().map(|e| format!("{e:#}"))
        };
        let same = config(dir.path(), "[train]\nbatch_size = 8\nlr = 3e-5");
        assert_eq!(refusal(&same, 1, ENCODER), None);
        // Where and how often a run writes may change; what it trains may not.
        let neutral = config(
            dir.path(),
            "[train]\nbatch_size = 8\nlr = 3e-5\neval_steps = 7\n[dist]\nheartbeat_s = 2.0",
        );
        assert_eq!(refusal(&neutral, 1, ENCODER), None);
        let lr = config(dir.path(), "[train]\nbatch_size = 8\nlr = 1e-4");
        assert!(refusal(&lr, 1, ENCODER)
            .unwrap()
            .contains("train.lr = 0.00003, this run has train.lr = 0.0001"));
        // batch_size is per rank: on two ranks the pool doubles.
        assert!(refusal(&same, 2, ENCODER).unwrap().contains("global batch of 8 (1 ranks), this run has 16"));
        let global = config(dir.path(), "[train]\nglobal_batch = 8\nlr = 3e-5");
        let wider = Checkpointer::open(&global, parts(ENCODER), 0, 2).unwrap();
        assert!(wider.check_fits(&checkpoint, true).is_ok(), "--allow-config-change lets it resume");
        let bigger = ENCODER.replace("\"hidden_size\": 32", "\"hidden_size\": 64");
        assert!(refusal(&same, 1, &bigger).unwrap().contains("another architecture"));
        let other = Checkpointer::open(&same, parts(&bigger), 0, 1).unwrap();
        assert!(other.check_fits(&checkpoint, true).is_err(), "no flag makes another architecture fit");
    }

    #[test]
    fn steps_save_at_the_end_at_a_best_at_a_stop_and_periodically() {
        let dir = tempfile::tempdir().unwrap();
        let checkpoints = checkpointer(&config(dir.path(), "checkpoint_steps = 5"), 1);
        let due = |step, last, best, stop| checkpoints.is_due(step, last, best, stop);
        assert!(!due(3, false, false, false));
        assert!(due(5, false, false, false) && due(10, false, false, false));
        assert!(due(3, true, false, false) && due(3, false, true, false) && due(3, false, false, true));
        let never = checkpointer(&config(dir.path(), "checkpoint_steps = 5\nsave = false"), 1);
        assert!(!never.is_due(5, true, true, true));
    }

    #[test]
    fn the_best_checkpoint_is_exported_kept_and_the_latest_stands_in_when_it_is_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let mut checkpoints = checkpointer(&config(dir.path(), "keep = 1"), 1);
        save(&mut checkpoints, 1, true);
        save(&mut checkpoints, 2, false);
        save(&mut checkpoints, 3, false);
        // Retention keeps the newest and what a pointer names.
        assert_eq!(checkpoints.store().list().unwrap(), ["step-00000001", "step-00000003"]);
        let exported =
            |c: &Checkpoint| Ok(BTreeMap::from([("from".to_owned(), Bytes::from(c.name.clone()))]));
        checkpoints.export_best(exported).unwrap();
        let from = || std::fs::read_to_string(dir.path().join(BEST_MODEL).join("from")).unwrap();
        assert_eq!(from(), "step-00000001");
        std::fs::write(dir.path().join("checkpoints/step-00000001").join(STATE), b"{}").unwrap();
        checkpoints.export_best(exported).unwrap();
        assert_eq!(from(), "step-00000003");
    }

    #[test]
    fn weights_that_are_not_finite_are_never_saved() {
        let dir = tempfile::tempdir().unwrap();
        let mut checkpoints = checkpointer(&config(dir.path(), ""), 1);
        let nan = || {
            let weights =
                HashMap::from([("w".to_owned(), Tensor::new(&[f32::NAN], &candle_core::Device::Cpu)?)]);
            Ok(Snapshot { weights, optimizer: HashMap::new(), metrics: Vec::new() })
        };
        let err = checkpoints.save(&SingleProcess, &TrainerState::start(1), nan).unwrap_err();
        assert!(InputError::is(&err) && format!("{err}").contains("weight w is not finite"), "{err:#}");
        checkpoints.finish_upload().unwrap();
        assert!(checkpoints.store().list().unwrap().is_empty());
        assert_eq!(checkpoints.last_good(), "no checkpoint was written");
    }
}
