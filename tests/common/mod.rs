//! Shared test helpers: where the shared data, golden files and the MiniLM model are.
#![allow(dead_code)]

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
