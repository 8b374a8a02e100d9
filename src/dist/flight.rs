//! The flight recorder: each process keeps its last [`CAPACITY`] collectives (name, training step,
//! bytes, start and end), so that when a job fails every live rank can say what it was doing and
//! which collective never completed (the role of PyTorch's NCCL flight recorder).

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Collectives kept.
pub const CAPACITY: usize = 64;

/// One collective as this rank saw it.
#[derive(Debug, Clone, Serialize)]
pub struct Collective {
    pub name: &'static str,
    pub step: u64,
    /// This rank's bytes in.
    pub bytes: usize,
    /// Unix time in milliseconds.
    pub start_ms: u64,
    /// `None` while it is in flight (or when it never completed).
    pub end_ms: Option<u64>,
    /// Its error, when it failed.
    pub error: Option<String>,
}

static STEP: AtomicU64 = AtomicU64::new(0);
static RECENT: Mutex<VecDeque<Collective>> = Mutex::new(VecDeque::new());

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The training step the next collectives belong to (the trainer sets it before each step).
pub fn set_step(step: u64) {
    STEP.store(step, Ordering::Relaxed);
}

pub fn step() -> u64 {
    STEP.load(Ordering::Relaxed)
}

/// Records `name` as started (until [`finish`]).
pub fn start(name: &'static str, bytes: usize) {
    let mut recent = RECENT.lock().expect("flight recorder lock");
    if recent.len() == CAPACITY {
        recent.pop_front();
    }
    let start_ms = now_ms();
    recent.push_back(Collective { name, step: step(), bytes, start_ms, end_ms: None, error: None });
}

/// Records the end of the newest collective (collectives of one process do not overlap).
pub fn finish(error: Option<String>) {
    if let Some(last) = RECENT.lock().expect("flight recorder lock").back_mut() {
        last.end_ms = Some(now_ms());
        last.error = error;
    }
}

/// Runs the collective `name` of `bytes` bytes in the record (started now, finished with its
/// error), adding its wall time to `busy`: what every backend's collective does around its
/// transfer.
pub fn record<T>(
    name: &'static str,
    bytes: usize,
    busy: &Cell<Duration>,
    collective: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let started = Instant::now();
    start(name, bytes);
    let result = collective();
    finish(result.as_ref().err().map(|e| format!("{e:#}")));
    busy.set(busy.get() + started.elapsed());
    result
}

/// The recorded collectives, oldest first.
pub fn recent() -> Vec<Collective> {
    RECENT.lock().expect("flight recorder lock").iter().cloned().collect()
}

/// One line for the log: the newest collective, and whether it completed.
pub fn summary() -> String {
    match recent().last() {
        None => "no collective ran".into(),
        Some(c) => {
            let state = match (&c.end_ms, &c.error) {
                (Some(_), None) => "completed".to_owned(),
                (Some(end), Some(err)) => {
                    format!("failed after {:.1} s: {err}", (end - c.start_ms) as f64 / 1e3)
                }
                (None, _) => format!("in flight for {:.1} s", (now_ms() - c.start_ms) as f64 / 1e3),
            };
            format!("last collective {} at step {} ({} bytes) {state}", c.name, c.step, c.bytes)
        }
    }
}
