//! The `kdmcse` binary as users run it: the reference STS figures with MiniLM, `encode` against
//! the golden vectors, and clear errors for bad input.

mod common;

use std::path::Path;
use std::process::Output;

use common::process::{assert_fails_with, kdmcse};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The `--json` object (last line of standard output).
fn json_scores(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "kdmcse failed: {}", stderr(out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().expect("output")).expect("last line is JSON")
}

fn eval(model: &Path, data: &Path, extra: &[&str]) -> Output {
    let mut args =
        vec!["eval", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    kdmcse(&args)
}

#[test]
fn minilm_reproduces_the_pytorch_sts_figures() {
    let (model, data) = (common::minilm_dir(), common::shared_dir().join("data"));
    let tasks = ["--tasks", "STSBenchmark", "SICKRelatedness"];
    for (pooler, stsb, sick) in [("cls", 73.50, 70.47), ("avg", 82.03, 77.15)] {
        let mut extra = vec!["--pooler", pooler];
        extra.extend_from_slice(&tasks);
        let scores = json_scores(&eval(&model, &data, &extra));
        let got = (scores["STSBenchmark"].as_f64().unwrap(), scores["SICKRelatedness"].as_f64().unwrap());
        assert!((got.0 - stsb).abs() <= 0.05, "{pooler} STS-B {} vs {stsb}", got.0);
        assert!((got.1 - sick).abs() <= 0.05, "{pooler} SICK-R {} vs {sick}", got.1);
        assert!((scores["avg"].as_f64().unwrap() - (got.0 + got.1) / 2.0).abs() < 0.006);
    }
}

#[test]
fn absent_tasks_are_reported_missing() {
    let data = tempfile::tempdir().unwrap();
    let sts12 = data.path().join("samples/STS12-en-test");
    std::fs::create_dir_all(&sts12).unwrap();
    let src = common::shared_dir().join("data/sts-samples/STS12-en-test");
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), sts12.join(entry.file_name())).unwrap();
    }
    let scores = json_scores(&eval(&common::minilm_dir(), data.path(), &[]));
    assert!(scores["STS12"].as_f64().unwrap() > 30.0, "STS12 found one level down: {scores}");
    assert_eq!(scores["avg"], scores["STS12"]);
    let missing: Vec<&str> =
        scores["missing"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(missing, ["STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICKRelatedness"]);
}

#[test]
fn encode_writes_the_golden_embeddings() {
    let meta = common::golden_json("bert_minilm.json");
    let golden = common::golden("bert_minilm.safetensors");
    let sentences: Vec<&str> =
        meta["sentences"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    // One sentence a line: leave out the golden sentence that contains a newline.
    let keep: Vec<usize> = (0..sentences.len()).filter(|&i| !sentences[i].contains('\n')).collect();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.txt");
    let output = dir.path().join("out.safetensors");
    let lines: Vec<&str> = keep.iter().map(|&i| sentences[i]).collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    // MiniLM's folder states mean pooling (1_Pooling/config.json): encode follows it unless told.
    let minilm = common::minilm_dir();
    for (pooler, golden_key) in [(None, "full/mean"), (Some("cls"), "full/cls")] {
        let mut args = vec![
            "encode",
            "--model",
            minilm.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
            "--batch-size",
            "3",
        ];
        args.extend(pooler.iter().flat_map(|p| ["--pooler", p]));
        let out = kdmcse(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        let written = candle_core::safetensors::load(&output, &candle_core::Device::Cpu).unwrap();
        let index = candle_core::Tensor::new(
            keep.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let expected = golden[golden_key].index_select(&index, 0).unwrap();
        let diff = common::max_abs_diff(&written["embeddings"], &expected);
        assert!(diff < 1e-4, "encode (--pooler {pooler:?}) vs golden {golden_key}: {diff}");
    }
}

fn copy_model_without(dir: &Path, skip: &str) {
    for entry in std::fs::read_dir(common::minilm_dir()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() && entry.file_name() != skip {
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
    }
}

#[test]
fn missing_weights_name_the_folder() {
    let model = tempfile::tempdir().unwrap();
    copy_model_without(model.path(), "model.safetensors");
    let out = eval(model.path(), &common::shared_dir().join("data"), &["--tasks", "STS16"]);
    assert_fails_with(&out, &[model.path().to_str().unwrap(), "model.safetensors or pytorch_model.bin"]);
}

#[test]
fn unknown_architecture_names_the_config() {
    let model = tempfile::tempdir().unwrap();
    copy_model_without(model.path(), "model.safetensors");
    let config = model.path().join("config.json");
    let text = std::fs::read_to_string(&config).unwrap().replace("\"bert\"", "\"gpt2\"");
    std::fs::write(&config, text).unwrap();
    let out = eval(model.path(), &common::shared_dir().join("data"), &["--tasks", "STS16"]);
    assert_fails_with(&out, &[config.to_str().unwrap(), "gpt2"]);
}

#[test]
fn malformed_sts_line_names_file_and_line() {
    let data = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(data.path().join("stsb")).unwrap();
    let path = data.path().join("stsb/sts-test.csv");
    std::fs::write(
        &path,
        "g\tMSRvid\t2012test\t1\t2.5\ta girl .\ta girl !\ng\tMSRvid\t2012\t2\t3.0\tonly one sentence\n",
    )
    .unwrap();
    let out = eval(&common::minilm_dir(), data.path(), &["--tasks", "STSBenchmark"]);
    assert_fails_with(&out, &[&format!("{}:2", path.display()), "columns"]);
}

#[test]
fn short_gold_file_names_both_files() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("STS16-en-test");
    std::fs::create_dir_all(&dir).unwrap();
    let src = common::shared_dir().join("data/sts-samples/STS16-en-test");
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    let gold = dir.join("STS.gs.headlines.txt");
    let lines: Vec<String> = std::fs::read_to_string(&gold).unwrap().lines().map(str::to_owned).collect();
    std::fs::write(&gold, lines[..lines.len() - 3].join("\n") + "\n").unwrap();
    let out = eval(&common::minilm_dir(), data.path(), &["--tasks", "STS16"]);
    assert_fails_with(&out, &[gold.to_str().unwrap(), "STS.input.headlines.txt"]);
}

/// `--version` of both binaries says the version, the git revision they were built from (this
/// checkout's HEAD) and that this is a CPU build.
#[test]
fn version_names_the_revision_and_the_kind_of_build() {
    let git = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output();
    let revision = match git {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        _ => "unknown".to_owned(),
    };
    for (name, bin) in
        [("kdmcse", common::process::kdmcse_bin()), ("kdmcse-launch", common::process::launcher_bin())]
    {
        let out = std::process::Command::new(bin).arg("--version").output().unwrap();
        let expected = format!("{name} {} (git {revision}, CPU build)\n", env!("CARGO_PKG_VERSION"));
        assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
    }
}

/// A `KDMCSE_ISA` that names no level is refused before any work, naming the variable and the
/// levels it accepts (exit 2: a restart cannot cure it); every level the variable names is
/// accepted, also above this CPU's (it is a cap), and the run is the same.
#[test]
fn kernel_levels_are_chosen_by_kdmcse_isa() {
    let (model, data) = (common::minilm_dir(), common::shared_dir().join("data"));
    let run = |isa: &str| {
        common::process::kdmcse_command()
            .env("KDMCSE_ISA", isa)
            .args(["eval", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap()])
            .args(["--json", "--tasks", "SICKRelatedness"])
            .output()
            .unwrap()
    };
    let out = run("avx1024");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_fails_with(&out, &["KDMCSE_ISA=\"avx1024\"", "baseline, avx2, avx512 or amx"]);
    let scores: Vec<f64> = ["baseline", "avx2", "avx512"]
        .map(|isa| json_scores(&run(isa))["SICKRelatedness"].as_f64().unwrap())
        .into();
    assert!(scores.iter().all(|s| *s == scores[0]), "SICK-R by level: {scores:?}");
}
