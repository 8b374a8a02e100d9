//! `kdmcse train` and `kdmcse export` end to end, through the binary users run, on MiniLM and the
//! shared data with a small batch: determinism, stop-and-resume, export, and bad input.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};

fn kdmcse(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kdmcse"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run kdmcse")
}

/// Six quick steps with output under `DIR/out`.
fn quick(dir: &Path) -> PathBuf {
    common::quick_config(dir, dir.join("out").to_str().unwrap(), 8, 6)
}

fn train(config: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train", "--config", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    kdmcse(&args)
}

fn assert_ok(out: &Output) {
    assert!(out.status.success(), "kdmcse failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

fn assert_fails_with(out: &Output, needles: &[&str]) {
    assert!(!out.status.success(), "expected failure");
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in needles {
        assert!(err.contains(needle), "error should mention {needle:?}:\n{err}");
    }
    assert!(!err.contains("panicked"), "a panic is not an error message:\n{err}");
}

#[test]
fn same_seed_same_weights_and_resume_equals_uninterrupted() {
    let (a, b, c) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for dir in [&a, &b] {
        assert_ok(&train(&quick(dir.path()), &[]));
    }
    let straight = common::latest_weights(&a.path().join("out"));
    assert_eq!(common::max_weight_diff(&straight, &common::latest_weights(&b.path().join("out"))), 0.0);
    // Stop after 3 of 6 steps (as a pre-empted job), then resume from the newest checkpoint.
    let config = quick(c.path());
    assert_ok(&train(&config, &["--stop-after", "3"]));
    assert_eq!(std::fs::read_to_string(c.path().join("out/latest")).unwrap().trim(), "step-00000003");
    assert_ok(&train(&config, &["--resume", "auto"]));
    assert_eq!(common::max_weight_diff(&straight, &common::latest_weights(&c.path().join("out"))), 0.0);
    // The untrained student would differ: training did change the weights.
    let metrics = std::fs::read_to_string(a.path().join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().filter(|l| l.contains("\"kind\":\"paired\"")).count(), 3);
}

/// The losses in a run's metrics file, one per step.
fn step_losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .filter_map(|record| record["loss"].as_f64())
        .collect()
}

/// `train.precision = "bf16"` trains the same run as fp32 up to bf16 rounding: the same
/// batches and masks, losses within a few percent, the weights moved alike.
#[test]
fn bf16_training_tracks_fp32() {
    let (fp32, bf16) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // The fp32 run also times its phases.
    assert_ok(&train(
        &quick(fp32.path()),
        &["--set", "train.max_steps=2", "--set", "train.phase_timings=true"],
    ));
    assert_ok(&train(&quick(bf16.path()), &["--set", "train.max_steps=2", "--set", "train.precision=bf16"]));
    let (l32, l16) = (step_losses(fp32.path()), step_losses(bf16.path()));
    assert_eq!((l32.len(), l16.len()), (2, 2));
    for (a, b) in l32.iter().zip(&l16) {
        assert!(b.is_finite() && (a - b).abs() < 0.05 * a.abs().max(1.0), "fp32 loss {a}, bf16 loss {b}");
    }
    assert_ne!(l32, l16, "bf16 losses equal fp32's bit for bit: the bf16 path did not run");
    let metrics = std::fs::read_to_string(fp32.path().join("metrics.jsonl")).unwrap();
    for line in metrics.lines().filter(|l| l.contains("\"loss\"")) {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        let phase = |k: &str| record["phases"][k].as_f64().unwrap_or_else(|| panic!("no phases.{k}: {line}"));
        let sum = phase("forward_s") + phase("backward_s") + phase("update_s");
        assert!(phase("backward_s") > 0.0 && sum <= record["step_s"].as_f64().unwrap(), "{line}");
    }
    let (w32, w16) =
        (common::latest_weights(&fp32.path().join("out")), common::latest_weights(&bf16.path().join("out")));
    // Two AdamW steps at lr 3e-5 move a weight by at most ~6e-5; bf16 gradients change the
    // direction of some updates, never their size.
    let diff = common::max_weight_diff(&w32, &w16);
    assert!(diff > 0.0 && diff < 1.5e-4, "fp32 and bf16 weights differ by {diff} after 2 steps");
}

#[test]
fn export_is_a_hugging_face_folder_that_kdmcse_reads() {
    let run = tempfile::tempdir().unwrap();
    assert_ok(&train(&quick(run.path()), &["--set", "train.max_steps=2"]));
    let out = run.path().join("export");
    let exported = kdmcse(&[
        "export",
        "--checkpoint",
        run.path().join("out").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_ok(&exported);
    // Same tensor names and shapes as the Hugging Face checkpoint the student came from.
    let base =
        candle_core::safetensors::load(common::minilm_dir().join("model.safetensors"), &Device::Cpu).unwrap();
    let ours = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut base_keys: Vec<_> = base.iter().map(|(k, t)| (k.clone(), t.dims().to_vec())).collect();
    let mut our_keys: Vec<_> = ours.iter().map(|(k, t)| (k.clone(), t.dims().to_vec())).collect();
    base_keys.sort();
    our_keys.sort();
    assert_eq!(our_keys, base_keys);
    for file in [
        "config.json",
        "tokenizer.json",
        "modules.json",
        "sentence_bert_config.json",
        "1_Pooling/config.json",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let pooling: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("1_Pooling/config.json")).unwrap()).unwrap();
    assert_eq!(pooling["pooling_mode_cls_token"], true);
    // The export's encoder is the trained one: kdmcse reads it, and it differs from the base.
    let diff = common::max_abs_diff(
        &ours["encoder.layer.0.attention.self.query.weight"],
        &base["encoder.layer.0.attention.self.query.weight"],
    );
    assert!(diff > 0.0, "export carries untrained weights");
    let auto_export = run.path().join("out/best-model/model.safetensors");
    assert!(auto_export.is_file(), "the run exports its best checkpoint");
    let eval = kdmcse(&[
        "eval",
        "--model",
        out.to_str().unwrap(),
        "--data",
        common::shared_dir().join("data").to_str().unwrap(),
        "--tasks",
        "STS16",
        "--json",
    ]);
    assert_ok(&eval);
}

#[test]
fn bad_config_and_data_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = quick(dir.path());
    assert_fails_with(&train(&config, &["--set", "train.bogus=1"]), &["bogus"]);
    assert_fails_with(&train(&config, &["--set", "loss.objective=mcse"]), &["mcse"]);

    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n\n").unwrap();
    let set = format!("data.text=[\"{}\"]", empty.display());
    assert_fails_with(&train(&config, &["--set", &set]), &[empty.to_str().unwrap(), "no sentences"]);

    // A teacher folder whose captions.txt has a row fewer than its features.
    let teacher = dir.path().join("teacher");
    std::fs::create_dir_all(&teacher).unwrap();
    let src = common::shared_dir().join("data/teacher");
    std::fs::copy(src.join("teacher.safetensors"), teacher.join("teacher.safetensors")).unwrap();
    std::fs::copy(src.join("images.txt"), teacher.join("images.txt")).unwrap();
    let captions = std::fs::read_to_string(src.join("captions.txt")).unwrap();
    let short: Vec<&str> = captions.lines().skip(1).collect();
    std::fs::write(teacher.join("captions.txt"), short.join("\n") + "\n").unwrap();
    let set = format!("data.paired=\"{}\"", teacher.display());
    assert_fails_with(&train(&config, &["--set", &set]), &["captions.txt", "25013 lines", "25014"]);

    // NaN in the image features: the error names the row.
    let mut tensors = candle_core::safetensors::load(src.join("teacher.safetensors"), &Device::Cpu).unwrap();
    let img = tensors["image_features"].to_dtype(candle_core::DType::F32).unwrap();
    let mut rows = img.to_vec2::<f32>().unwrap();
    rows[17][3] = f32::NAN;
    let bad = Tensor::new(rows, &Device::Cpu).unwrap().to_dtype(candle_core::DType::F16).unwrap();
    tensors.insert("image_features".into(), bad);
    candle_core::safetensors::save(&tensors, teacher.join("teacher.safetensors")).unwrap();
    std::fs::copy(src.join("captions.txt"), teacher.join("captions.txt")).unwrap();
    assert_fails_with(&train(&config, &["--set", &set]), &["image_features row 17", "NaN"]);
}

#[test]
fn resuming_a_checkpoint_of_another_architecture_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = quick(dir.path());
    assert_ok(&train(&config, &["--set", "train.max_steps=1"]));
    // The same run folder, now with a model of another shape (MiniLM with 3 layers).
    let other = dir.path().join("other-model");
    std::fs::create_dir_all(&other).unwrap();
    for entry in std::fs::read_dir(common::minilm_dir()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), other.join(entry.file_name())).unwrap();
        }
    }
    let cfg = other.join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"num_hidden_layers\": 6", "\"num_hidden_layers\": 3");
    std::fs::write(&cfg, text).unwrap();
    let set = format!("model.path=\"{}\"", other.display());
    assert_fails_with(
        &train(&config, &["--set", &set, "--set", "train.max_steps=2"]),
        &["step-00000001", "another architecture"],
    );
}
