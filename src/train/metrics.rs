//! What a run records: one JSON line per step and per evaluation in `metrics.jsonl`, the same
//! scalars in a TensorBoard event file beside it, and progress (a bar on a terminal, log lines
//! elsewhere).

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use serde::Serialize;

use super::batches::BatchKind;
use crate::checkpoint::{is_remote, CheckpointStore};
use crate::config::TrainConfig;
use crate::dist::Communicator;
use crate::loss::{combine, Reported};
use crate::tensorboard::EventWriter;

/// One step's numbers, as written to the metrics file.
#[derive(Debug, Clone, Serialize)]
pub struct StepMetrics {
    pub step: u64,
    pub kind: BatchKind,
    /// What the objective reports (`loss`, its terms, ...; see `loss::LossTerms::reported`).
    #[serde(flatten)]
    pub reported: BTreeMap<&'static str, f64>,
    pub lr: f64,
    pub grad_norm: f64,
    pub sentences_per_s: f64,
    pub step_s: f64,
    /// Seconds of the step spent in collectives (gathers, gradient all-reduce).
    pub comm_s: f64,
    /// Where the step's time went, with `train.phase_timings` on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phases: Option<Phases>,
}

/// Seconds of one step by phase: forward (tokenising included), backward, and the update
/// (gradient all-reduce, clipping, AdamW); each ends with a device synchronisation.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Phases {
    pub forward_s: f64,
    pub backward_s: f64,
    pub update_s: f64,
}

/// The global loss's numbers from each rank's (those of its own rows): combined in rank order,
/// so every rank holds the same ones.
pub fn over_ranks(comm: &dyn Communicator, mine: &[Reported]) -> Result<Vec<Reported>> {
    let bytes: Vec<u8> = mine.iter().flat_map(|r| r.value.to_le_bytes()).collect();
    let mut ranks = Vec::with_capacity(comm.world_size());
    for (rank, theirs) in comm.all_gather_bytes(&bytes)?.into_iter().enumerate() {
        if theirs.len() != bytes.len() {
            bail!("rank {rank} reports {} loss numbers, this rank {}", theirs.len() / 8, mine.len());
        }
        let values = theirs.chunks_exact(8).map(|w| f64::from_le_bytes(w.try_into().expect("8 bytes")));
        ranks.push(mine.iter().zip(values).map(|(r, value)| Reported { value, ..*r }).collect());
    }
    Ok(combine(&ranks))
}

/// The loss side of one micro-step.
#[derive(Debug, Clone)]
pub struct MicroMetrics {
    pub kind: BatchKind,
    pub reported: Vec<Reported>,
    pub forward_s: f64,
    pub backward_s: f64,
}

impl StepMetrics {
    /// The step's record from its micro-steps: with accumulation, their numbers combined (losses
    /// averaged; the kind is the first's). Timings and the update's numbers are filled in by the
    /// caller.
    pub fn from_micro(step: u64, micro: &[MicroMetrics]) -> Self {
        let reported = micro.iter().map(|m| m.reported.clone()).collect::<Vec<_>>();
        Self {
            step,
            kind: micro[0].kind,
            reported: combine(&reported).into_iter().map(|r| (r.name, r.value)).collect(),
            lr: 0.0,
            grad_norm: 0.0,
            sentences_per_s: 0.0,
            step_s: 0.0,
            comm_s: 0.0,
            phases: None,
        }
    }

    /// The step's loss (the objective's total).
    pub fn loss(&self) -> f64 {
        self.reported.get("loss").copied().unwrap_or(f64::NAN)
    }
}

/// The metrics file's name under `output.dir`.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// What a run records (rank 0 only; other ranks hold a closed log): `metrics.jsonl` and a
/// TensorBoard event file beside it, both written locally. Under a remote `output.dir` without
/// `output.metrics` the local files are copies: synced to `<output.dir>/` at every checkpoint and
/// at the end, and a resumed run continues the store's `metrics.jsonl` (and starts an event file
/// of its own).
pub struct MetricsLog {
    file: Option<std::fs::File>,
    path: PathBuf,
    /// Opened at the first record, whose step marks where this run's events start.
    events: Option<EventWriter>,
    synced: bool,
}

impl MetricsLog {
    /// `output.metrics`, else `<output.dir>/metrics.jsonl` for a local `output.dir`, else a local
    /// copy (in the temporary folder) of the remote one; appended to.
    pub fn open(cfg: &TrainConfig, rank: usize, store: &CheckpointStore) -> Result<Self> {
        let remote = is_remote(&cfg.output.dir);
        // Under a remote folder without a named local file, the local file is a copy of the store's.
        let synced = remote && cfg.output.metrics.is_none();
        let path = match &cfg.output.metrics {
            Some(p) => p.clone(),
            None if !remote => PathBuf::from(&cfg.output.dir).join(METRICS_FILE),
            None => {
                let folder: String =
                    store.url().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
                std::env::temp_dir().join("kdmcse-metrics").join(folder).join(METRICS_FILE)
            }
        };
        if rank != 0 {
            return Ok(Self { file: None, path, events: None, synced: false });
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        }
        if synced {
            // The local copy starts as the store's (a resumed run's history), else empty.
            let history = store.get_file(METRICS_FILE)?.unwrap_or_default();
            std::fs::write(&path, &history).with_context(|| format!("cannot write {}", path.display()))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open metrics file {}", path.display()))?;
        Ok(Self { file: Some(file), path, events: None, synced })
    }

    /// The files to copy to the run's store now (name under `output.dir`, contents): the metrics
    /// and this run's event file when `output.dir` is remote, else none.
    pub fn snapshot(&self) -> Result<Vec<(String, Bytes)>> {
        if self.file.is_none() || !self.synced {
            return Ok(Vec::new());
        }
        let mut files = vec![self.path.as_path()];
        files.extend(self.events.as_ref().map(EventWriter::path));
        files
            .into_iter()
            .map(|path| {
                let name = path.file_name().expect("a file").to_string_lossy().into_owned();
                let data = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
                Ok((name, Bytes::from(data)))
            })
            .collect()
    }

    /// Copies the files to the run's store when `output.dir` is remote.
    pub fn sync(&self, store: &CheckpointStore) -> Result<()> {
        for (name, data) in self.snapshot()? {
            store.put_file(&name, data)?;
        }
        Ok(())
    }

    /// Empties the metrics file (a fresh start over a deleted run; the new event file's first
    /// record makes TensorBoard drop the old ones' steps).
    pub fn clear(&mut self, store: &CheckpointStore) -> Result<()> {
        if let Some(file) = &mut self.file {
            file.set_len(0).context("cannot empty the metrics file")?;
        }
        self.sync(store)
    }

    /// One step's record.
    pub fn step(&mut self, m: &StepMetrics) -> Result<()> {
        self.write(m)?;
        let mut scalars: Vec<(String, f64)> =
            m.reported.iter().map(|(name, value)| (format!("train/{name}"), *value)).collect();
        scalars.extend([
            ("train/lr".into(), m.lr),
            ("train/grad_norm".into(), m.grad_norm),
            ("train/sentences_per_s".into(), m.sentences_per_s),
            ("train/comm_share".into(), m.comm_s / m.step_s.max(f64::MIN_POSITIVE)),
        ]);
        let scalars: Vec<(&str, f64)> = scalars.iter().map(|(tag, v)| (tag.as_str(), *v)).collect();
        self.scalars(m.step, &scalars)
    }

    /// STS-B dev after `step` steps.
    pub fn evaluation(&mut self, step: u64, stsb_dev: f64) -> Result<()> {
        self.write(&serde_json::json!({"step": step, "stsb_dev": stsb_dev}))?;
        self.scalars(step, &[("eval/stsb_dev", stsb_dev)])
    }

    fn write<T: Serialize>(&mut self, record: &T) -> Result<()> {
        if let Some(file) = &mut self.file {
            serde_json::to_writer(&mut *file, record)?;
            file.write_all(b"\n")?;
            file.flush()?;
        }
        Ok(())
    }

    fn scalars(&mut self, step: u64, scalars: &[(&str, f64)]) -> Result<()> {
        if self.file.is_none() {
            return Ok(());
        }
        let events = match &mut self.events {
            Some(events) => events,
            None => {
                let dir = self.path.parent().unwrap_or(std::path::Path::new("."));
                self.events.insert(EventWriter::create(dir, step)?)
            }
        };
        events.scalars(step, scalars)
    }
}

/// Training progress on rank 0: a bar on a terminal; elsewhere (under `kdmcse-launch`, in a pod)
/// one log line every `log_every_s` seconds, at every evaluation and at the last step. Other ranks
/// show nothing.
pub enum Progress {
    Bar(indicatif::ProgressBar),
    Lines { every: Duration, last: Option<Instant>, started: Instant, start_step: u64, total: u64 },
    Hidden,
}

impl Progress {
    pub fn new(total: u64, position: u64, rank: usize, log_every_s: f64) -> Self {
        if rank != 0 {
            return Self::Hidden;
        }
        if !std::io::stderr().is_terminal() {
            let every = Duration::from_secs_f64(log_every_s);
            return Self::Lines { every, last: None, started: Instant::now(), start_step: position, total };
        }
        let bar = indicatif::ProgressBar::new(total).with_position(position);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "train {bar:30} {pos}/{len} {msg} [{elapsed}<{eta}, {per_sec}]",
            )
            .expect("valid template"),
        );
        Self::Bar(bar)
    }

    /// After step `m` (and its evaluation, if it had one: a line is always logged then).
    pub fn step(&mut self, m: &StepMetrics, stsb_dev: Option<f64>) {
        let dev = stsb_dev.map_or_else(String::new, |d| format!(", STS-B dev {d:.2}"));
        match self {
            Self::Bar(bar) => {
                bar.set_position(m.step);
                bar.set_message(format!("loss {:.4} lr {:.2e}{dev}", m.loss(), m.lr));
            }
            Self::Lines { every, last, started, start_step, total } => {
                let due =
                    m.step == *total || stsb_dev.is_some() || last.is_none_or(|at| at.elapsed() >= *every);
                if !due {
                    return;
                }
                *last = Some(Instant::now());
                let per_step = started.elapsed().as_secs_f64() / (m.step - *start_step).max(1) as f64;
                let eta = per_step * total.saturating_sub(m.step) as f64;
                tracing::info!(
                    "step {}/{} loss {:.4} lr {:.2e} {:.1} sentences/s, {:.0}% in collectives, eta {}{dev}",
                    m.step,
                    total,
                    m.loss(),
                    m.lr,
                    m.sentences_per_s,
                    100.0 * m.comm_s / m.step_s.max(f64::MIN_POSITIVE),
                    human_duration(eta)
                );
            }
            Self::Hidden => {}
        }
    }

    /// Runs `f` with the bar out of the way of its output.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        match self {
            Self::Bar(bar) => bar.suspend(f),
            _ => f(),
        }
    }

    pub fn finish(&self) {
        if let Self::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

/// `1h02m`, `4m05s`, `12s`.
fn human_duration(seconds: f64) -> String {
    let s = seconds.round() as u64;
    match (s / 3600, s % 3600 / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}
