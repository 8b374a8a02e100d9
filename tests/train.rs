//! `kdmcse train` and `kdmcse export` end to end, through the binary users run, on MiniLM and the
//! shared data with a small batch: determinism, stop-and-resume, export, and bad input.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::process::{assert_fails_with, assert_ok, kdmcse, train};

/// Six quick steps with output under `DIR/out`.
fn quick(dir: &Path) -> PathBuf {
    common::quick_config(dir, dir.join("out").to_str().unwrap(), 8, 6)
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
    let resumed = train(&config, &["--resume", "auto"]);
    assert_ok(&resumed);
    assert_eq!(common::max_weight_diff(&straight, &common::latest_weights(&c.path().join("out"))), 0.0);
    // It really resumed (a fresh run would end in the same bits): from step 3, taking steps 4-6.
    let events = common::process::events(&resumed.stdout, "resumed");
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!((&events[0]["checkpoint"], &events[0]["step"]), (&"step-00000003".into(), &3.into()));
    assert_eq!(common::step_numbers(&c.path().join("metrics.jsonl")), [1, 2, 3, 4, 5, 6]);
    // Training changed the weights, and mixed paired batches in every second step.
    let base =
        candle_core::safetensors::load(common::minilm_dir().join("model.safetensors"), &Device::Cpu).unwrap();
    let (name, trained) =
        straight.iter().find(|(n, _)| n.ends_with("layer.0.attention.self.query.weight")).unwrap();
    let initial = base.iter().find(|(k, _)| name.ends_with(k.as_str())).map(|(_, t)| t).unwrap();
    assert!(common::max_abs_diff(trained, initial) > 0.0, "{name} did not move");
    let metrics = std::fs::read_to_string(a.path().join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().filter(|l| l.contains("\"kind\":\"paired\"")).count(), 3);
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
    let (l32, l16) = (common::step_losses(fp32.path()), common::step_losses(bf16.path()));
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
    // The run's config and a model card in sentence-transformers' shape come along.
    let checkpoint = run.path().join("out/checkpoints/step-00000002");
    assert_eq!(
        std::fs::read(out.join("config.toml")).unwrap(),
        std::fs::read(checkpoint.join("config.toml")).unwrap()
    );
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    let (front, body) =
        card.strip_prefix("---\n").and_then(|c| c.split_once("\n---\n")).expect("front matter");
    for line in [
        "library_name: sentence-transformers",
        "pipeline_tag: sentence-similarity",
        "base_model: \"all-MiniLM-L6-v2\"",
    ] {
        assert!(front.lines().any(|l| l == line), "{line} in:\n{front}");
    }
    assert!(front.contains("- \"wiki_sample_10k.txt\"") && front.contains("- \"teacher\""), "{front}");
    let origin = format!("checkpoint `step-00000002` of the run at `{}`", run.path().join("out").display());
    for needle in [
        "Objective: kdmcse",
        "filter: cosine, threshold 0.45",
        "Steps: 2,",
        origin.as_str(),
        "batch 8 per process",
        "cls pooling",
        "SentenceTransformer(",
        "max_steps = 2",
    ] {
        assert!(body.contains(needle), "{needle} in:\n{body}");
    }
    // The export's encoder is the checkpoint's, tensor for tensor, and kdmcse reads it...
    let trained = common::latest_weights(&run.path().join("out"));
    let encoder: Vec<_> =
        trained.iter().filter_map(|(n, t)| Some((n.strip_prefix("encoder.")?, t))).collect();
    let pooler = ours.keys().filter(|k| k.starts_with("pooler.")).count();
    assert_eq!(encoder.len() + pooler, ours.len(), "every encoder tensor and the base model's pooler");
    for (key, tensor) in encoder {
        assert_eq!(common::max_abs_diff(&ours[key], tensor), 0.0, "exported {key}");
    }
    // ...and it differs from the base.
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
    let last = String::from_utf8_lossy(&eval.stdout).lines().last().unwrap().to_owned();
    let scores: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert!(scores["STS16"].as_f64().unwrap() > 50.0, "{scores}");
    // `export --eval DATA` evaluates the export on the STS tasks DATA holds (here STS16 alone)
    // and its model card states the results, the same as `kdmcse eval` gives.
    let data = run.path().join("sts16-only");
    std::fs::create_dir_all(&data).unwrap();
    let sts16 = common::shared_dir().join("data/sts-samples/STS16-en-test");
    std::os::unix::fs::symlink(sts16, data.join("STS16-en-test")).unwrap();
    let evaluated = run.path().join("export-evaluated");
    let out = kdmcse(&[
        "export",
        "--checkpoint",
        run.path().join("out").to_str().unwrap(),
        "--out",
        evaluated.to_str().unwrap(),
        "--eval",
        data.to_str().unwrap(),
    ]);
    assert_ok(&out);
    let card = std::fs::read_to_string(evaluated.join("README.md")).unwrap();
    let row = format!("| STS16 | {:.2} |", scores["STS16"].as_f64().unwrap());
    assert!(card.contains("## Evaluation") && card.contains(&row), "{row} in:\n{card}");
    run_the_cards_kdmcse_lines(&card, &evaluated, &data);
}

/// Runs every `kdmcse ...` command of a model card's usage section as written, with the export's
/// folder, the STS data and a file of sentences where the card puts their placeholders.
fn run_the_cards_kdmcse_lines(card: &str, export: &std::path::Path, sts_data: &std::path::Path) {
    let usage = card.split("## Usage").nth(1).expect("a usage section");
    let usage = usage.split("\n## ").next().unwrap();
    let commands: Vec<&str> =
        usage.split('`').skip(1).step_by(2).filter(|span| span.starts_with("kdmcse ")).collect();
    assert!(commands.len() >= 2, "the card gives eval and encode lines:\n{usage}");
    let cwd = tempfile::tempdir().unwrap();
    std::fs::write(cwd.path().join("sentences.txt"), "A man is playing a guitar.\nSomeone plays music.\n")
        .unwrap();
    for command in commands {
        assert!(!command.contains(['"', '\'', '$']), "a plain command line: {command}");
        let line = command
            .replace("path/to/this/folder", export.to_str().unwrap())
            .replace("SENTEVAL_DATA", sts_data.to_str().unwrap());
        let args: Vec<&str> = line.split_whitespace().skip(1).collect();
        let out = common::process::kdmcse_command().args(&args).current_dir(cwd.path()).output().unwrap();
        assert!(
            out.status.success(),
            "the card's `{command}` fails:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let embeddings = std::fs::read_dir(cwd.path()).unwrap().filter_map(Result::ok);
    assert!(
        embeddings.into_iter().any(|e| e.path().extension().is_some_and(|x| x == "safetensors")),
        "the card's encode line writes its embeddings"
    );
}

/// The export states the pooling the run trained with (here mean pooling), and `kdmcse encode` on
/// the exported folder uses it unless `--pooler` says otherwise.
#[test]
fn export_states_the_runs_pooling_and_encode_follows_it() {
    let run = tempfile::tempdir().unwrap();
    assert_ok(&train(&quick(run.path()), &["--set", "train.max_steps=2", "--set", "model.pooling=\"avg\""]));
    let out = run.path().join("export");
    let checkpoint = run.path().join("out");
    assert_ok(&kdmcse(&[
        "export",
        "--checkpoint",
        checkpoint.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    for folder in [out.clone(), checkpoint.join("best-model")] {
        let text = std::fs::read_to_string(folder.join("1_Pooling/config.json")).unwrap();
        let pooling: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            (&pooling["pooling_mode_mean_tokens"], &pooling["pooling_mode_cls_token"]),
            (&serde_json::json!(true), &serde_json::json!(false)),
            "{}: {text}",
            folder.display()
        );
    }
    let input = run.path().join("sentences.txt");
    std::fs::write(&input, "A man is playing a guitar.\nTwo dogs run through a field.\nhello\n").unwrap();
    let encode = |pooler: Option<&str>| {
        let output = run.path().join(format!("{}.safetensors", pooler.unwrap_or("default")));
        let mut args = vec!["encode", "--model", out.to_str().unwrap(), "--input", input.to_str().unwrap()];
        args.extend(["--output", output.to_str().unwrap()]);
        if let Some(p) = pooler {
            args.extend(["--pooler", p]);
        }
        assert_ok(&kdmcse(&args));
        candle_core::safetensors::load(&output, &Device::Cpu).unwrap().remove("embeddings").unwrap()
    };
    let (stated, avg, cls) = (encode(None), encode(Some("avg")), encode(Some("cls")));
    assert_eq!(common::max_abs_diff(&stated, &avg), 0.0, "encode ignores the folder's pooling");
    assert!(common::max_abs_diff(&stated, &cls) > 1e-3, "mean and CLS pooling give the same vectors");
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

/// Model selection during training: `best` names the checkpoint with the highest STS-B dev the
/// run logged, retention (`keep = 1`) never deletes it, and `best-model/` holds its weights.
#[test]
fn the_best_checkpoint_by_dev_score_is_kept_and_exported() {
    let run = tempfile::tempdir().unwrap();
    let out = run.path().join("out");
    let config = quick(run.path());
    assert_ok(&train(
        &config,
        &["--set", "train.eval_steps=2", "--set", "output.keep=1", "--set", "train.lr=5e-4"],
    ));
    common::assert_best_is_kept_and_exported(run.path(), &out, 6);
}

/// `--resume <name>` restarts from that checkpoint, not the newest: from step 2 of a 4-step run,
/// training the same steps 3 and 4 again ends in the same bits.
#[test]
fn resume_from_a_named_checkpoint() {
    let run = tempfile::tempdir().unwrap();
    let config = common::quick_config(run.path(), run.path().join("out").to_str().unwrap(), 8, 4);
    assert_ok(&train(&config, &["--set", "output.keep=3"]));
    let four = common::latest_weights(&run.path().join("out"));
    let again = train(&config, &["--resume", "step-00000002", "--set", "output.keep=3"]);
    assert_ok(&again);
    let events = common::process::events(&again.stdout, "resumed");
    assert_eq!((&events[0]["checkpoint"], &events[0]["step"]), (&"step-00000002".into(), &2.into()));
    assert_eq!(common::max_weight_diff(&four, &common::latest_weights(&run.path().join("out"))), 0.0);
    // A location names a checkpoint of another folder.
    let elsewhere = tempfile::tempdir().unwrap();
    let location = format!("{}/checkpoints/step-00000002", run.path().join("out").display());
    let out_dir = elsewhere.path().join("out");
    let set = format!("output.dir=\"{}\"", out_dir.display());
    let copied = train(&config, &["--resume", &location, "--set", &set, "--set", "output.keep=3"]);
    assert_ok(&copied);
    assert_eq!(common::max_weight_diff(&four, &common::latest_weights(&out_dir)), 0.0);
}

/// With `grad_accum = 2` a step takes two micro-batches (each its own contrastive batch, text
/// then paired with `paired_every = 2`), and the data cursors count them.
#[test]
fn gradient_accumulation_takes_several_micro_batches_per_step() {
    let run = tempfile::tempdir().unwrap();
    let config = common::quick_config(run.path(), run.path().join("out").to_str().unwrap(), 8, 3);
    assert_ok(&train(&config, &["--set", "train.grad_accum=2"]));
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(run.path().join("out/checkpoints/step-00000003/trainer.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["micro_step"], 6, "{state}");
    assert_eq!(
        (&state["text_cursor"]["offset"], &state["paired_cursor"]["offset"]),
        (&24.into(), &24.into())
    );
    let records: Vec<serde_json::Value> = std::fs::read_to_string(run.path().join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 3);
    // Every step saw a paired micro-batch, whose grounding loss is the step's.
    assert!(records.iter().all(|r| r["loss_grounding"].as_f64().is_some_and(f64::is_finite)), "{records:?}");
}

/// Off a terminal (the test captures stderr) rank 0 logs progress lines: the first step, then
/// every `output.log_every_s`, and the last step, with the ETA.
#[test]
fn progress_is_logged_off_a_terminal() {
    let run = tempfile::tempdir().unwrap();
    let config = common::quick_config(run.path(), run.path().join("out").to_str().unwrap(), 8, 3);
    let out = train(&config, &["--set", "output.log_every_s=3600"]);
    assert_ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.contains(" sentences/s, ")).collect();
    assert_eq!(lines.len(), 2, "the first and the last step within the hour:\n{err}");
    assert!(lines[0].contains("step 1/3 loss ") && lines[0].contains("eta "), "{}", lines[0]);
    assert!(lines[1].contains("step 3/3 loss ") && lines[1].contains("eta 0s"), "{}", lines[1]);
    let out = train(&config, &["--resume", "none", "--overwrite", "--set", "output.log_every_s=-1"]);
    assert_fails_with(&out, &["output.log_every_s = -1"]);
}

/// TensorBoard's own reader (Python `tensorboard`, installed by scripts/install-test-deps.sh)
/// reads the run's event files beside `metrics.jsonl`, and every scalar equals the metrics file's
/// value (as f32). A run resumed from an earlier checkpoint writes a new event file whose start
/// marker makes TensorBoard drop the steps it takes again: each step appears once.
#[test]
fn tensorboard_reads_the_scalars_of_metrics_jsonl_and_a_resume_replaces_retaken_steps() {
    let run = tempfile::tempdir().unwrap();
    let config = common::quick_config(run.path(), run.path().join("out").to_str().unwrap(), 8, 4);
    assert_ok(&train(&config, &["--set", "train.eval_steps=4"]));
    assert_ok(&train(&config, &["--set", "train.eval_steps=4", "--resume", "step-00000002"]));
    let events = std::fs::read_dir(run.path())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("events.out.tfevents."))
        .count();
    assert_eq!(events, 2, "one event file per run");

    const READ: &str = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
print(json.dumps({tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}))
"#;
    let out = std::process::Command::new("python3").args(["-c", READ]).arg(run.path()).output().unwrap();
    assert_ok(&out);
    let scalars: std::collections::BTreeMap<String, Vec<(u64, f32)>> =
        serde_json::from_slice(&out.stdout).unwrap();

    // The metrics file's last record of each step (the resumed run appended steps 3 and 4 again).
    let mut records: std::collections::BTreeMap<(u64, bool), serde_json::Value> = Default::default();
    for line in std::fs::read_to_string(run.path().join("metrics.jsonl")).unwrap().lines() {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        let step = record["step"].as_u64().unwrap();
        records.insert((step, record.get("stsb_dev").is_some()), record);
    }
    let expected = |key: &str, eval: bool| -> Vec<(u64, f32)> {
        records
            .iter()
            .filter(|((_, e), r)| *e == eval && r.get(key).is_some_and(|v| !v.is_null()))
            .map(|((step, _), r)| (*step, r[key].as_f64().unwrap() as f32))
            .collect()
    };
    let share =
        |r: &serde_json::Value| (r["comm_s"].as_f64().unwrap() / r["step_s"].as_f64().unwrap()) as f32;
    for (tag, key) in [
        ("train/loss", "loss"),
        ("train/loss_text", "loss_text"),
        ("train/loss_grounding", "loss_grounding"),
        ("train/lr", "lr"),
        ("train/grad_norm", "grad_norm"),
        ("train/sentences_per_s", "sentences_per_s"),
    ] {
        assert_eq!(scalars[tag], expected(key, false), "{tag}");
    }
    let shares: Vec<(u64, f32)> =
        records.iter().filter(|((_, e), _)| !e).map(|((s, _), r)| (*s, share(r))).collect();
    assert_eq!(scalars["train/comm_share"], shares);
    assert_eq!(scalars["train/loss"].iter().map(|s| s.0).collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert_eq!(scalars["eval/stsb_dev"], expected("stsb_dev", true));
    assert_eq!(scalars["eval/stsb_dev"].iter().map(|s| s.0).collect::<Vec<_>>(), [0, 4]);
}
