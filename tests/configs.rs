//! Every configuration the project ships parses and validates (`configs/`, the Kubernetes
//! ConfigMap's `train.toml`), every key is documented, and the paper configs train.

mod common;

use std::path::{Path, PathBuf};

use kdmcse::config::TrainConfig;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn every_shipped_config_loads_and_validates() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("configs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "{files:?}");
    files.push(root().join("k8s/config/train.toml"));
    for file in &files {
        let config = TrainConfig::load(file, &[]).unwrap_or_else(|e| panic!("{}: {e:#}", file.display()));
        // What the config says survives the round trip through the effective config.
        let again: TrainConfig = toml::from_str(&config.to_toml()).unwrap();
        assert_eq!(again, config, "{}", file.display());
    }
}

/// A model folder of the paper configs' architecture (`model_type` bert or roberta: token types,
/// position offsets, padding id) with small random weights (hidden 32, 2 layers) and MiniLM's
/// uncased tokenizer and vocabulary.
fn tiny_model(dir: &Path, model_type: &str) -> PathBuf {
    use candle_core::{DType, Device};
    let out = dir.join(format!("tiny-{model_type}"));
    std::fs::create_dir_all(&out).unwrap();
    let (pad, type_vocab) = if model_type == "roberta" { (1, 1) } else { (0, 2) };
    let config = serde_json::json!({
        "model_type": model_type, "vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 37, "max_position_embeddings": 64,
        "type_vocab_size": type_vocab, "pad_token_id": pad, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "layer_norm_eps": 1e-12,
    });
    std::fs::write(out.join("config.json"), config.to_string()).unwrap();
    // The encoder's own loader asks for every tensor; the VarMap draws them at random.
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    kdmcse::model::BertModel::load(vb, &serde_json::from_value(config).unwrap()).unwrap();
    varmap.save(out.join("model.safetensors")).unwrap();
    std::fs::copy(common::minilm_dir().join("tokenizer.json"), out.join("tokenizer.json")).unwrap();
    out
}

/// Each paper config trains two steps on a model of its architecture with small random weights
/// and the shared data (paths overridden; `data.paired_every = 2`, as the official `//` rule gives
/// 0 on it), so a config that no longer parses or runs fails here. Its schedule is the official
/// one: 3 epochs of text + paired batches (342 + 390 of 64), and the epoch's step 0 is paired.
#[test]
fn the_paper_configs_train_two_steps_on_the_official_schedule() {
    let shared = common::shared_dir().join("data");
    for (name, model_type) in
        [("kdmcse-bert-base-flickr30k", "bert"), ("kdmcse-roberta-base-flickr30k", "roberta")]
    {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny_model(dir.path(), model_type);
        let sets = [
            format!("model.path={:?}", model.to_str().unwrap()),
            format!(
                "data.text=[{:?}, {:?}]",
                shared.join("wiki/wiki1m_head_11913.txt").to_str().unwrap(),
                shared.join("wiki/wiki_sample_10k.txt").to_str().unwrap()
            ),
            format!("data.paired={:?}", shared.join("teacher").to_str().unwrap()),
            format!("data.eval={:?}", shared.to_str().unwrap()),
            "data.paired_every=2".into(),
            "train.device=cpu".into(),
            format!("output.dir={:?}", dir.path().join("out").to_str().unwrap()),
            format!("output.metrics={:?}", dir.path().join("metrics.jsonl").to_str().unwrap()),
        ];
        let mut args = vec!["--stop-after", "2"];
        for set in &sets {
            args.extend(["--set", set.as_str()]);
        }
        let out = common::process::train(&root().join("configs").join(format!("{name}.toml")), &args);
        common::process::assert_ok(&out);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("total_steps={}", 3 * (21913 / 64 + 25014 / 64))), "{name}:\n{err}");
        let kinds: Vec<String> = std::fs::read_to_string(dir.path().join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["kind"].as_str().map(String::from)
            })
            .collect();
        assert_eq!(kinds, ["paired", "text"], "{name}");
    }
}

/// docs/configuration.md documents every key of the configuration: each `section.key` of a
/// config serialised as JSON (which keeps unset options as null) appears there.
#[test]
fn every_config_key_is_documented() {
    let config = TrainConfig::load(&root().join("configs/quickstart.toml"), &[]).unwrap();
    let doc = std::fs::read_to_string(root().join("docs/configuration.md")).unwrap();
    let serde_json::Value::Object(sections) = serde_json::to_value(&config).unwrap() else { panic!() };
    let mut missing = Vec::new();
    for (section, keys) in sections {
        for key in keys.as_object().unwrap().keys() {
            if !doc.contains(&format!("`{section}.{key}`")) {
                missing.push(format!("{section}.{key}"));
            }
        }
    }
    assert!(missing.is_empty(), "docs/configuration.md lacks {missing:?}");
}
