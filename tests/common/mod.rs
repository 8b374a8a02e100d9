//! Shared test helpers: where the shared data, golden files and the MiniLM model are.
#![allow(dead_code)]

pub mod etcd;
pub mod process;
pub mod s3;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// `../shared` beside the checkout, or `$KDMCSE_SHARED`.
pub fn shared_dir() -> PathBuf {
    let dir = std::env::var_os("KDMCSE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    assert!(dir.join("golden").is_dir(), "shared data not found at {} (set KDMCSE_SHARED)", dir.display());
    dir
}

/// The all-MiniLM-L6-v2 folder that `scripts/fetch-minilm.sh` writes, or `$KDMCSE_MINILM`.
pub fn minilm_dir() -> PathBuf {
    let dir = std::env::var_os("KDMCSE_MINILM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2"));
    assert!(
        dir.join("model.safetensors").is_file(),
        "MiniLM not found at {}: run scripts/fetch-minilm.sh (or set KDMCSE_MINILM)",
        dir.display()
    );
    dir
}

pub fn golden(name: &str) -> HashMap<String, Tensor> {
    let path = shared_dir().join("golden").join(name);
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn golden_json(name: &str) -> serde_json::Value {
    let path = shared_dir().join("golden").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// Largest absolute elementwise difference, computed in f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}

/// Writes `DIR/config.toml`: a few quick KDMCSE steps on MiniLM and the shared data (margins
/// 0.15, cosine filter, a paired batch every 2nd step, no evaluation, a checkpoint every 2 steps,
/// metrics in `DIR/metrics.jsonl`). Tests vary the rest with `--set`.
pub fn quick_config(dir: &std::path::Path, output: &str, batch_size: usize, steps: usize) -> PathBuf {
    write_quick_config(dir, output, &format!("batch_size = {batch_size}"), steps)
}

/// [`quick_config`] with a pool of `global_batch` over all ranks, embedded `micro_batch` examples
/// at a time when given.
pub fn pool_config(
    dir: &std::path::Path,
    global_batch: usize,
    micro_batch: Option<usize>,
    steps: usize,
) -> PathBuf {
    let mut keys = format!("global_batch = {global_batch}");
    if let Some(micro) = micro_batch {
        keys += &format!("\nmicro_batch = {micro}");
    }
    write_quick_config(dir, dir.join("out").to_str().unwrap(), &keys, steps)
}

fn write_quick_config(dir: &std::path::Path, output: &str, batch_keys: &str, steps: usize) -> PathBuf {
    let shared = shared_dir().join("data");
    let text = format!(
        r#"[model]
path = "{model}"
max_len = 16
[data]
text = ["{shared}/wiki/wiki_sample_10k.txt"]
paired = "{shared}/teacher"
paired_every = 2
eval = "{shared}"
[loss]
objective = "kdmcse"
filter = "cosine"
filter_threshold = 0.45
[train]
{batch_keys}
max_steps = {steps}
eval_steps = 0
device = "cpu"
[output]
dir = "{output}"
checkpoint_steps = 2
keep = 2
metrics = "{metrics}"
"#,
        model = minilm_dir().display(),
        shared = shared.display(),
        metrics = dir.join("metrics.jsonl").display(),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The trained tensors of checkpoint `name` of a store, sorted by name.
pub fn checkpoint_weights(store: &kdmcse::checkpoint::CheckpointStore, name: &str) -> Vec<(String, Tensor)> {
    let checkpoint = store.load(name).unwrap();
    let mut weights: Vec<_> =
        candle_core::safetensors::load_buffer(checkpoint.part("model.safetensors").unwrap(), &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
    weights.sort_by(|a, b| a.0.cmp(&b.0));
    weights
}

/// The newest checkpoint's weights under a local output folder.
pub fn latest_weights(output: &std::path::Path) -> Vec<(String, Tensor)> {
    let store = kdmcse::checkpoint::CheckpointStore::open(output.to_str().unwrap()).unwrap();
    let latest = store.pointer(kdmcse::checkpoint::Pointer::Latest).unwrap().expect("a checkpoint");
    checkpoint_weights(&store, &latest)
}

/// The largest elementwise difference between two weight sets with the same names.
pub fn max_weight_diff(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|((n, x), (m, y))| {
            assert_eq!(n, m);
            max_abs_diff(x, y)
        })
        .fold(0.0, f64::max)
}

/// The losses of the step records in `DIR/metrics.jsonl`, in order.
pub fn step_losses(dir: &std::path::Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .filter_map(|record| record["loss"].as_f64())
        .collect()
}

/// The step numbers of the step records in a metrics file, in order (an interrupted and resumed
/// run appends to the same file).
pub fn step_numbers(metrics: &std::path::Path) -> Vec<u64> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .filter(|record| record.get("loss").is_some())
        .map(|record| record["step"].as_u64().unwrap())
        .collect()
}

/// After a run with `train.eval_steps = 2` and `output.keep = 1` of `steps` steps (metrics in
/// `DIR/metrics.jsonl`, output in `out`): `best` names the checkpoint with the highest logged
/// STS-B dev (the earlier of equals), retention kept it, and `best-model/` holds its weights.
pub fn assert_best_is_kept_and_exported(run: &std::path::Path, out: &std::path::Path, steps: u64) {
    let scores: Vec<(u64, f64)> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|r| Some((r["step"].as_u64()?, r.get("stsb_dev")?.as_f64()?)))
        .collect();
    let expected: Vec<u64> = (0..=steps).step_by(2).collect();
    assert_eq!(scores.iter().map(|s| s.0).collect::<Vec<_>>(), expected, "{scores:?}");
    // The first of the highest scores after training began wins (ties keep the earlier).
    let best = scores.iter().skip(1).fold(None::<(u64, f64)>, |b, &s| match b {
        Some(b) if b.1 >= s.1 => Some(b),
        _ => Some(s),
    });
    let best_name = format!("step-{:08}", best.unwrap().0);
    let store = kdmcse::checkpoint::CheckpointStore::open(out.to_str().unwrap()).unwrap();
    assert_eq!(
        store.pointer(kdmcse::checkpoint::Pointer::Best).unwrap().as_deref(),
        Some(best_name.as_str())
    );
    let kept = store.list().unwrap();
    assert!(kept.contains(&best_name) && kept.contains(&format!("step-{steps:08}")), "{kept:?}");
    let exported =
        candle_core::safetensors::load(out.join("best-model/model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let best_weights = checkpoint_weights(&store, &best_name);
    for (name, tensor) in &best_weights {
        if let Some(key) = name.strip_prefix("encoder.") {
            assert_eq!(max_abs_diff(&exported[key], tensor), 0.0, "best-model/{key}");
        }
    }
}
