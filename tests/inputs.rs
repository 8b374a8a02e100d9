//! Nothing bad gets in silently, by class: values out of their range, model folders that do not
//! cover their config, training that diverges, two runs in one folder, data changed under a
//! resume, and exits that leave something behind. Each case runs the binaries as users do and
//! checks the exit status and that the message names the key, file or line.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::process::{
    assert_fails_with, assert_ok, events, free_port, kdmcse, kdmcse_command, launcher, train,
};
use kdmcse::checkpoint::{CheckpointStore, Pointer};

fn quick(dir: &Path, steps: usize) -> PathBuf {
    common::quick_config(dir, dir.join("out").to_str().unwrap(), 8, steps)
}

#[test]
fn every_value_is_checked_against_its_range() {
    let dir = tempfile::tempdir().unwrap();
    let config = quick(dir.path(), 2);
    for (set, needles) in [
        ("model.max_len=0", &["model.max_len = 0", "out of range"][..]),
        ("model.max_len=1", &["model.max_len = 1"]),
        ("model.proj_dim=0", &["model.proj_dim = 0"]),
        ("loss.temp=0", &["loss.temp = 0", "> 0"]),
        ("loss.temp_vl=-1", &["loss.temp_vl = -1"]),
        ("loss.margin_text=2.5", &["loss.margin_text = 2.5"]),
        ("loss.filter_threshold=nan", &["loss.filter_threshold = NaN"]),
        ("loss.filter_threshold=1.5", &["loss.filter_threshold = 1.5"]),
        ("train.betas=[1.0, 1.0]", &["train.betas[0] = 1"]),
        ("train.grad_clip=-1", &["train.grad_clip = -1"]),
        ("train.eps=0", &["train.eps = 0"]),
        ("train.lr=inf", &["train.lr = inf", "finite"]),
        ("train.batch_size=1", &["train.batch_size = 1"]),
        ("train.grad_accum=0", &["train.grad_accum = 0"]),
        ("data.paired_every=0", &["data.paired_every = 0"]),
        ("data.paired=\"\"", &["data.paired is empty"]),
        ("train.device=\"gpu\"", &["gpu", "cpu, cuda or cuda:N"]),
    ] {
        let out = train(&config, &["--set", set]);
        assert_fails_with(&out, needles);
    }
    // The environment is checked the same way.
    let out = kdmcse_command()
        .args(["train", "--config", config.to_str().unwrap()])
        .env("KDMCSE_LOSS__TEMP", "-0.5")
        .output()
        .unwrap();
    assert_fails_with(&out, &["loss.temp = -0.5"]);
    // So are the command-line flags.
    let input = dir.path().join("in.txt");
    std::fs::write(&input, "a sentence\n").unwrap();
    let minilm = common::minilm_dir();
    let (model, input) = (minilm.to_str().unwrap(), input.to_str().unwrap());
    let output = dir.path().join("out.safetensors");
    let out = kdmcse(&[
        "encode",
        "--model",
        model,
        "--input",
        input,
        "--output",
        output.to_str().unwrap(),
        "--max-len",
        "1",
    ]);
    assert_fails_with(&out, &["--max-len = 1"]);
    let data = common::shared_dir().join("data");
    let out = kdmcse(&["eval", "--model", model, "--data", data.to_str().unwrap(), "--batch-size", "0"]);
    assert_fails_with(&out, &["--batch-size = 0"]);
    assert!(!output.exists());
}

/// A copy of MiniLM whose config.json or weights are changed by `edit`.
fn model_copy(dir: &Path, edit: impl FnOnce(&Path)) -> PathBuf {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for entry in std::fs::read_dir(common::minilm_dir()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), model.join(entry.file_name())).unwrap();
        }
    }
    edit(&model);
    model
}

#[test]
fn a_model_folder_that_does_not_cover_its_config_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = quick(dir.path(), 1);
    let eight_layers = model_copy(&dir.path().join("a"), |m| {
        let path = m.join("config.json");
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("\"num_hidden_layers\": 6", "\"num_hidden_layers\": 8");
        std::fs::write(path, text).unwrap();
    });
    let missing_tensor = model_copy(&dir.path().join("b"), |m| {
        let path = m.join("model.safetensors");
        let mut tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
        let key =
            tensors.keys().find(|k| k.ends_with("layer.2.attention.self.query.weight")).unwrap().clone();
        tensors.remove(&key);
        candle_core::safetensors::save(&tensors, &path).unwrap();
    });
    for (model, needle) in [
        (&eight_layers, "encoder.layer.6."),
        (&missing_tensor, "encoder.layer.2.attention.self.query.weight"),
    ] {
        let set = format!("model.path=\"{}\"", model.display());
        let out = train(&config, &["--set", &set]);
        assert_fails_with(&out, &[model.to_str().unwrap(), needle, "config.json"]);
        assert!(!dir.path().join("out/latest").exists(), "{}: a run started", model.display());
    }
    // The one complete folder trains, and the log says which parameters are new.
    let out = train(&config, &[]);
    assert_ok(&out);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("initialised the heads")
            && log.contains("every other parameter comes from the model folder")
    );
}

/// All weights of a checkpoint are finite.
fn finite_weights(weights: &[(String, candle_core::Tensor)]) -> bool {
    weights
        .iter()
        .all(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|x| x.is_finite()))
}

#[test]
fn a_diverging_run_stops_at_its_first_non_finite_step_and_keeps_finite_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let config = quick(dir.path(), 6);
    let out = train(
        &config,
        &["--set", "train.lr=1e30", "--set", "train.grad_clip=0", "--set", "output.checkpoint_steps=1"],
    );
    assert!(!out.status.success(), "a diverged run must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    let step: u64 = err
        .split("training diverged at step ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no divergence message:\n{err}"))
        .parse()
        .unwrap();
    assert!(
        err.contains("loss") && err.contains("gradient norm") && err.contains("last good checkpoint"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let store = CheckpointStore::open(dir.path().join("out").to_str().unwrap()).unwrap();
    let names = store.list().unwrap();
    assert!(
        names.iter().all(|n| n.as_str() < format!("step-{step:08}").as_str()),
        "{names:?} after step {step}"
    );
    if let Some(latest) = store.pointer(Pointer::Latest).unwrap() {
        assert!(err.contains(&latest), "{err}");
        assert!(
            finite_weights(&common::checkpoint_weights(&store, &latest)),
            "latest {latest} is not finite"
        );
    }
    assert!(!dir.path().join("out/best-model").exists(), "a diverged run was exported");
    assert!(events(&out.stdout, "summary").is_empty(), "a diverged run reported a summary");
}

#[test]
fn an_unusable_dev_set_is_an_input_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = quick(dir.path(), 1);
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("stsb")).unwrap();
    std::fs::write(data.join("stsb/sts-dev.csv"), "").unwrap();
    let set = format!("data.eval=\"{}\"", data.display());
    assert_fails_with(&train(&config, &["--set", &set]), &["sts-dev.csv", "0 scored sentence pairs"]);
    let line = "main-captions\tMSRvid\t2012test\t0001\t2.5\tA man.\tA woman.\n";
    std::fs::write(data.join("stsb/sts-dev.csv"), line.repeat(3)).unwrap();
    assert_fails_with(&train(&config, &["--set", &set]), &["sts-dev.csv", "all with the same score"]);
}

#[test]
fn runs_never_mix_in_one_folder() {
    let dir = tempfile::tempdir().unwrap();
    let config = quick(dir.path(), 2);
    let out_dir = dir.path().join("out");
    assert_ok(&train(&config, &[]));
    // A fresh start into the folder is refused, and names what is there and what to do.
    let out = train(&config, &["--resume", "none"]);
    assert_fails_with(&out, &["step-00000002", "--overwrite"]);
    // A resume that would train differently is refused with the key and both values...
    for (set, needles) in [
        ("train.batch_size=4", &["train.batch_size = 8", "train.batch_size = 4"][..]),
        ("train.seed=7", &["train.seed = 1234", "train.seed = 7"]),
        ("loss.margin_text=0.1", &["loss.margin_text = 0.15", "loss.margin_text = 0.1"]),
        ("train.max_steps=3", &["train.max_steps = 2", "--allow-config-change"]),
    ] {
        assert_fails_with(&train(&config, &["--set", set]), needles);
    }
    // ...while keys that cannot change the weights may differ, and the override is explicit.
    let out = train(&config, &["--set", "output.keep=5", "--set", "train.eval_steps=0"]);
    assert_ok(&out);
    let out = train(&config, &["--set", "train.max_steps=3", "--allow-config-change"]);
    assert_ok(&out);
    assert_eq!(events(&out.stdout, "resumed")[0]["step"], 2);
    // --overwrite starts over: the old run's checkpoints and metrics are gone.
    let out = train(&config, &["--resume", "none", "--overwrite", "--set", "train.max_steps=1"]);
    assert_ok(&out);
    let store = CheckpointStore::open(out_dir.to_str().unwrap()).unwrap();
    assert_eq!(store.list().unwrap(), ["step-00000001"]);
    assert_eq!(common::step_numbers(&dir.path().join("metrics.jsonl")), [1]);
    // A folder whose every checkpoint is corrupt is not trained over silently.
    let weights = out_dir.join("checkpoints/step-00000001/model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    bytes[1000] ^= 0xFF;
    std::fs::write(&weights, bytes).unwrap();
    let out = train(&config, &["--set", "train.max_steps=1"]);
    assert_fails_with(&out, &["none of them verifies", "--overwrite"]);
}

#[test]
fn failed_lookups_create_nothing_and_retention_leaves_no_empty_folders() {
    let dir = tempfile::tempdir().unwrap();
    let config = quick(dir.path(), 3);
    let out_dir = dir.path().join("out");
    assert_ok(&train(&config, &["--set", "output.checkpoint_steps=1", "--set", "output.keep=1"]));
    let left: Vec<String> = std::fs::read_dir(out_dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["step-00000003"], "retention left folders behind");
    let out = train(&config, &["--resume", "step-00000077"]);
    assert_fails_with(&out, &["no such checkpoint step-00000077", "step-00000003"]);
    assert!(!out_dir.join("checkpoints/step-00000077").exists());
    let missing = dir.path().join("nope");
    let export = dir.path().join("export");
    let out =
        kdmcse(&["export", "--checkpoint", missing.to_str().unwrap(), "--out", export.to_str().unwrap()]);
    assert_fails_with(&out, &["no such checkpoint folder", missing.to_str().unwrap()]);
    assert!(!missing.exists() && !export.exists(), "a failed export created folders");
    // A run already past its last step says so.
    let out = train(&config, &["--set", "train.max_steps=2", "--allow-config-change"]);
    assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already at or past the run's last step"));
}

#[test]
fn when_best_does_not_verify_the_export_falls_back_to_latest() {
    let dir = tempfile::tempdir().unwrap();
    let config = quick(dir.path(), 2);
    let out_dir = dir.path().join("out");
    assert_ok(&train(&config, &["--set", "output.checkpoint_steps=1", "--set", "output.keep=3"]));
    std::fs::write(out_dir.join("best"), "step-00000001").unwrap();
    let weights = out_dir.join("checkpoints/step-00000001/model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    bytes[1000] ^= 0xFF;
    std::fs::write(&weights, bytes).unwrap();
    std::fs::remove_dir_all(out_dir.join("best-model")).unwrap();
    let out =
        train(&config, &["--set", "train.max_steps=3", "--allow-config-change", "--set", "output.keep=3"]);
    assert_ok(&out);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("cannot export checkpoint step-00000001"), "{log}");
    assert!(out_dir.join("best-model/model.safetensors").is_file());
}

#[test]
fn bad_data_and_eval_folders_name_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = quick(dir.path(), 1);
    let corpus = dir.path().join("corpus.txt");
    let mut bytes = b"a fine line\nanother one\n".to_vec();
    bytes.extend_from_slice(b"broken \xff\xfe line\n");
    std::fs::write(&corpus, bytes).unwrap();
    let set = format!("data.text=[\"{}\"]", corpus.display());
    assert_fails_with(&train(&config, &["--set", &set]), &[&format!("{}:3", corpus.display()), "UTF-8"]);
    let minilm = common::minilm_dir();
    let out = kdmcse(&["eval", "--model", minilm.to_str().unwrap(), "--data", "/nope"]);
    assert_fails_with(&out, &["/nope", "no such folder"]);
    let empty = tempfile::tempdir().unwrap();
    let out =
        kdmcse(&["eval", "--model", minilm.to_str().unwrap(), "--data", empty.path().to_str().unwrap()]);
    assert_fails_with(&out, &["none of the STS tasks"]);
    // A folder with STS-B only, asked for STS12 as well.
    std::fs::create_dir_all(empty.path().join("stsb")).unwrap();
    let stsb = common::shared_dir().join("data/stsb/sts-test.csv");
    std::fs::copy(stsb, empty.path().join("stsb/sts-test.csv")).unwrap();
    let data = empty.path().to_str().unwrap();
    let minilm = minilm.to_str().unwrap();
    let out = kdmcse(&["eval", "--model", minilm, "--data", data, "--tasks", "STSBenchmark", "STS12"]);
    assert_fails_with(&out, &["STS12", "asked for by --tasks"]);
}

#[test]
fn a_worker_waiting_in_rendezvous_stops_at_once_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let config = quick(dir.path(), 1);
    let mut child = kdmcse_command()
        .args(["train", "--config", config.to_str().unwrap()])
        .envs([
            ("WORLD_SIZE", "2"),
            ("RANK", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", &free_port().to_string()),
            ("KDMCSE_TIMEOUT", "120"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(child.try_wait().unwrap().is_none(), "the worker should still be waiting for rank 0");
    let sent = Instant::now();
    common::process::kill(child.id() as i32, 15);
    let status = child.wait().unwrap();
    assert!(sent.elapsed() < Duration::from_secs(3), "took {:?} to stop", sent.elapsed());
    assert!(!status.success());
}

#[test]
fn the_launcher_checks_its_gpus_before_starting_anyone() {
    let dir = tempfile::tempdir().unwrap();
    let config = quick(dir.path(), 1);
    for (visible, needle) in
        [(Some("0"), "CUDA_VISIBLE_DEVICES=\"0\" lists 1"), (None, "--gpus 8 asks for 8 GPUs")]
    {
        let mut cmd = launcher(&["--gpus", if visible.is_some() { "2" } else { "8" }, "--standalone"]);
        cmd.args(["--config", config.to_str().unwrap()]);
        match visible {
            Some(v) => cmd.env("CUDA_VISIBLE_DEVICES", v),
            None => cmd.env_remove("CUDA_VISIBLE_DEVICES"),
        };
        if visible.is_none() && Path::new("/proc/driver/nvidia/gpus").is_dir() {
            continue; // a GPU machine: the count is real
        }
        let started = Instant::now();
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(needle),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(!String::from_utf8_lossy(&out.stdout).contains("[rank"), "a worker was started");
    }
}

/// A configuration error is exit code 2 from the worker, which the launcher does not restart:
/// it exits 2 at once, whatever `--max-restarts` says (Kubernetes' podFailurePolicy then fails
/// the Job instead of retrying it).
#[test]
fn a_config_error_is_exit_2_and_never_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let config = quick(dir.path(), 2);
    let out = train(&config, &["--set", "loss.temp=0"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let started = Instant::now();
    let out = launcher(&["--nproc", "2", "--max-restarts", "3", "--standalone", "--"])
        .args(["--config", config.to_str().unwrap(), "--set", "loss.temp=0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("restarting cannot help") && !err.contains("restarting the group"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    // A run that diverges would diverge again after a restart: also 2.
    let out = train(
        &config,
        &["--set", "train.lr=1e30", "--set", "train.grad_clip=0", "--set", "train.max_steps=6"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Writes `sentences` as a Parquet file with the columns `id` and `text` (strings, or to be
/// wrong, numbers).
fn write_parquet(path: &Path, sentences: &[String], text_as_numbers: bool) {
    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::writer::SerializedFileWriter;
    let text = if text_as_numbers { "INT64 text" } else { "BYTE_ARRAY text (UTF8)" };
    let schema = format!("message corpus {{ REQUIRED INT64 id; REQUIRED {text}; }}");
    let schema = std::sync::Arc::new(parquet::schema::parser::parse_message_type(&schema).unwrap());
    let file = std::fs::File::create(path).unwrap();
    let mut writer = SerializedFileWriter::new(file, schema, Default::default()).unwrap();
    let mut group = writer.next_row_group().unwrap();
    let ids: Vec<i64> = (0..sentences.len() as i64).collect();
    let mut column = group.next_column().unwrap().unwrap();
    column.typed::<Int64Type>().write_batch(&ids, None, None).unwrap();
    column.close().unwrap();
    let mut column = group.next_column().unwrap().unwrap();
    if text_as_numbers {
        column.typed::<Int64Type>().write_batch(&ids, None, None).unwrap();
    } else {
        let values: Vec<ByteArray> = sentences.iter().map(|s| ByteArray::from(s.as_str())).collect();
        column.typed::<ByteArrayType>().write_batch(&values, None, None).unwrap();
    }
    column.close().unwrap();
    group.close().unwrap();
    writer.close().unwrap();
}

/// The same 64 sentences as `.txt`, `.jsonl`, `.csv`, `.tsv` and `.parquet` train two steps each
/// with the same losses (the same sentences in the same order), and a malformed row of each
/// format stops the run with the file and the line or row.
#[test]
fn every_corpus_format_trains_the_same_and_names_a_malformed_row() {
    let dir = tempfile::tempdir().unwrap();
    let shared = common::shared_dir().join("data/wiki/wiki_sample_10k.txt");
    let mut sentences: Vec<String> =
        std::fs::read_to_string(shared).unwrap().lines().take(64).map(String::from).collect();
    // Quotes, commas and tabs in a sentence: each format must carry them.
    sentences[1] = "He said \"no\", then\tleft, quietly.".into();
    let file = |name: &str| dir.path().join(name);
    std::fs::write(file("corpus.txt"), sentences.iter().map(|s| format!("{s}\n")).collect::<String>())
        .unwrap();
    let jsonl: String = sentences
        .iter()
        .enumerate()
        .map(|(i, s)| format!("{}\n", serde_json::json!({"id": i, "text": s})))
        .collect();
    std::fs::write(file("corpus.jsonl"), &jsonl).unwrap();
    for (name, delimiter) in [("corpus.csv", b','), ("corpus.tsv", b'\t')] {
        let mut writer = csv::WriterBuilder::new().delimiter(delimiter).from_path(file(name)).unwrap();
        writer.write_record(["id", "text"]).unwrap();
        for (i, s) in sentences.iter().enumerate() {
            writer.write_record([i.to_string().as_str(), s]).unwrap();
        }
        writer.flush().unwrap();
    }
    write_parquet(&file("corpus.parquet"), &sentences, false);

    let losses = |corpus: &str| {
        let run = dir.path().join(format!("run-{corpus}"));
        std::fs::create_dir_all(&run).unwrap();
        let config = quick(&run, 2);
        let text = format!("data.text=[{:?}]", file(corpus).to_str().unwrap());
        assert_ok(&train(&config, &["--set", &text]));
        common::step_losses(&run)
    };
    let reference = losses("corpus.txt");
    assert_eq!(reference.len(), 2);
    for corpus in ["corpus.jsonl", "corpus.csv", "corpus.tsv", "corpus.parquet"] {
        assert_eq!(losses(corpus), reference, "{corpus} trains on other sentences than corpus.txt");
    }

    // Malformed: line 3 of the JSON lines is not JSON, line 5 lacks the field; row 4 of the CSV
    // (line 5: the header is line 1) has a column too many; the Parquet column is numbers; the
    // field is missing from the CSV header.
    let mut broken = jsonl.lines().map(String::from).collect::<Vec<_>>();
    broken[2] = "{\"id\": 2, \"text\": ".into();
    std::fs::write(file("bad.jsonl"), broken.join("\n")).unwrap();
    broken[2] = jsonl.lines().nth(2).unwrap().into();
    broken[4] = "{\"id\": 4, \"sentence\": \"elsewhere\"}".into();
    std::fs::write(file("nofield.jsonl"), broken.join("\n")).unwrap();
    let mut csv_lines: Vec<String> =
        std::fs::read_to_string(file("corpus.csv")).unwrap().lines().map(String::from).collect();
    csv_lines[4] += ",extra";
    std::fs::write(file("bad.csv"), csv_lines.join("\n")).unwrap();
    write_parquet(&file("numbers.parquet"), &sentences, true);
    let config = quick(dir.path(), 2);
    for (corpus, extra, needles) in [
        ("bad.jsonl", None, vec!["bad.jsonl:3", "not a JSON object"]),
        ("nofield.jsonl", None, vec!["nofield.jsonl:5", "no field \"text\"", "data.text_field"]),
        ("bad.csv", None, vec!["bad.csv:5"]),
        ("numbers.parquet", None, vec!["numbers.parquet: row 1", "not a string"]),
        (
            "corpus.csv",
            Some("data.text_field=\"sentence\""),
            vec!["corpus.csv:1", "no column \"sentence\"", "id, text"],
        ),
    ] {
        let text = format!("data.text=[{:?}]", file(corpus).to_str().unwrap());
        let mut args = vec!["--set", text.as_str()];
        if let Some(extra) = extra {
            args.extend(["--set", extra]);
        }
        let out = train(&config, &args);
        assert_fails_with(&out, &needles);
        assert_eq!(out.status.code(), Some(2), "{corpus}: an input error");
    }
}

/// A resume compares its data by content, not by path: the same files with a sentence or a
/// caption changed would continue another training, so the resume is refused with what changed
/// (unless `--allow-config-change`); the same sentences at another path, with blank lines (which
/// the corpus skips) between them, resume.
#[test]
fn a_resume_onto_changed_data_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = quick(dir.path(), 4);
    let shared = common::shared_dir().join("data");
    let wiki = std::fs::read_to_string(shared.join("wiki/wiki_sample_10k.txt")).unwrap();
    let sentences: Vec<&str> = wiki.lines().take(200).collect();
    let corpus = dir.path().join("corpus.txt");
    std::fs::write(&corpus, sentences.join("\n") + "\n").unwrap();
    let teacher = dir.path().join("teacher");
    std::fs::create_dir_all(&teacher).unwrap();
    for file in ["teacher.safetensors", "captions.txt", "images.txt"] {
        std::fs::copy(shared.join("teacher").join(file), teacher.join(file)).unwrap();
    }
    let text = format!("data.text=[\"{}\"]", corpus.display());
    let paired = format!("data.paired=\"{}\"", teacher.display());
    let run = |extra: &[&str]| train(&config, &[&["--set", &text, "--set", &paired], extra].concat());
    assert_ok(&run(&["--stop-after", "2"]));
    // The same sentences moved elsewhere, with blank lines between them, are the same data.
    let moved = dir.path().join("moved.txt");
    std::fs::write(&moved, sentences.join("\n\n") + "\n\n").unwrap();
    let set = format!("data.text=[\"{}\"]", moved.display());
    let out = train(&config, &["--set", &set, "--set", &paired, "--stop-after", "3"]);
    assert_ok(&out);
    assert_eq!(events(&out.stdout, "resumed")[0]["step"], 2);
    let mut edited = sentences.clone();
    edited[17] = "a sentence that was not there";
    std::fs::write(&corpus, edited.join("\n") + "\n").unwrap();
    assert_fails_with(
        &run(&[]),
        &["step-00000003", "the text corpus (data.text)", "200 sentences", "--allow-config-change"],
    );
    std::fs::write(&corpus, sentences.join("\n") + "\n").unwrap();
    let captions = std::fs::read_to_string(teacher.join("captions.txt")).unwrap();
    std::fs::write(teacher.join("captions.txt"), captions.replacen('a', "the", 1)).unwrap();
    assert_fails_with(&run(&[]), &["the paired corpus (data.paired)", "other data"]);
    let out = run(&["--allow-config-change"]);
    assert_ok(&out);
    assert_eq!(events(&out.stdout, "resumed")[0]["step"], 3);
}
