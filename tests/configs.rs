//! Every configuration the project ships parses and validates (`configs/`, the Kubernetes
//! ConfigMap's `train.toml`), and the JobSet example is a well-formed JobSet whose pods resume.

mod common;

use std::path::{Path, PathBuf};

use kdmcse::train::TrainConfig;

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
    files.push(root().join("k8s/base/train.toml"));
    for file in &files {
        let config = TrainConfig::load(file, &[]).unwrap_or_else(|e| panic!("{}: {e:#}", file.display()));
        // What the config says survives the round trip through the effective config.
        let again: TrainConfig = toml::from_str(&config.to_toml()).unwrap();
        assert_eq!(again, config, "{}", file.display());
    }
}

#[test]
fn the_jobset_example_is_a_jobset_whose_pods_resume() {
    let path = root().join("k8s/jobset/jobset.yaml");
    let doc: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(doc["apiVersion"].as_str(), Some("jobset.x-k8s.io/v1alpha2"));
    assert_eq!(doc["kind"].as_str(), Some("JobSet"));
    let jobs = doc["spec"]["replicatedJobs"].as_sequence().unwrap();
    let pod = &jobs[0]["template"]["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let args: Vec<&str> =
        container["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert!(args.windows(2).any(|w| w == ["--resume", "auto"]), "{args:?}");
    let nodes = jobs[0]["replicas"].as_u64().unwrap().to_string();
    assert!(args.windows(2).any(|w| w == ["--nnodes", nodes.as_str()]), "{args:?} vs {nodes} replicas");
    assert_eq!(container["command"][0].as_str(), Some("kdmcse-launch"));
    assert!(Path::new(&root()).join("k8s/base/train.toml").is_file());
}
