//! Encoder throughput with MiniLM: encoding the STS-B test sentences (batch 128) and one training
//! step (forward + backward of both dropout views, batch 64 x 2, max_len 32, SimCSE loss).
//! Run with `scripts/bench-encode` (or `cargo bench --bench encoder`).

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device};
use kdmcse::data::{TokenBatch, Tokenizer};
use kdmcse::embed::SentenceEncoder;
use kdmcse::eval::{load_task, Task};
use kdmcse::loss::Objective;
use kdmcse::model::{dropout::example_key, dropout::Dropout, Pooling};
use kdmcse::train::batches::{BatchKind, TwoViewBatch};
use kdmcse::train::student::{HeadsSpec, Student};

#[global_allocator]
static GLOBAL: kdmcse::Allocator = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    kdmcse::keep_freed_memory();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model_dir =
        std::env::var_os("KDMCSE_MINILM").map(PathBuf::from).unwrap_or(root.join("models/all-MiniLM-L6-v2"));
    let shared = std::env::var_os("KDMCSE_SHARED").map(PathBuf::from).unwrap_or(root.join("../shared"));
    let device = Device::Cpu;
    println!("threads: {}", rayon::current_num_threads());

    // Encoding: all 2 x 1379 STS-B test sentences, batch 128, CLS, no truncation.
    let stsb =
        load_task(&shared.join("data"), Task::StsBenchmark)?.expect("STS-B test under shared/data/stsb");
    let sentences: Vec<&str> = stsb.first.iter().chain(&stsb.second).map(String::as_str).collect();
    let encoder = SentenceEncoder::load(&model_dir, Some(Pooling::Cls), None, &device)?;
    encoder.encode(&sentences[..256], 128, |_| {})?; // warm-up
    let runs = 3;
    let start = Instant::now();
    for _ in 0..runs {
        encoder.encode(&sentences, 128, |_| {})?;
    }
    let secs = start.elapsed().as_secs_f64() / runs as f64;
    println!(
        "encode: {} sentences in {secs:.2} s = {:.0} sentences/s",
        sentences.len(),
        sentences.len() as f64 / secs
    );

    // One training step: wiki sentences, 64 x 2 views, max_len 32, SimCSE loss, fwd + bwd.
    let wiki = std::fs::read_to_string(shared.join("data/wiki/wiki1m_head_11913.txt"))?;
    let batch_sentences: Vec<&str> = wiki.lines().take(64).collect();
    let student = Student::load(
        &model_dir,
        Pooling::Cls,
        HeadsSpec { proj_dim: 256, teacher_dim: 768, init: Default::default(), seed: 1234 },
        DType::F32,
        &device,
    )?;
    let tokenizer = Tokenizer::from_dir(&model_dir, 32, 0)?;
    let encoded = tokenizer.encode(&batch_sentences)?;
    // Both views in one forward pass: rows 0..64 view 0, rows 64..128 view 1.
    let rows: Vec<_> = encoded.iter().chain(&encoded).collect();
    let tokens = TokenBatch::pad(&rows, 0, &device)?;
    let objective = Objective { margin_text: 0.0, ..Objective::default() };
    let mut batch = TwoViewBatch {
        kind: BatchKind::Text,
        examples: 64,
        tokens,
        dropout: Dropout::disabled(),
        teacher: None,
    };
    let mut step = |s: u64| -> anyhow::Result<f64> {
        let keys = (0..128u64).map(|i| example_key(1234, s, i % 64, i / 64)).collect();
        batch.dropout = Dropout::per_example(0.1, 0.1, keys);
        let start = Instant::now();
        let embeddings = student.forward(&batch)?;
        let terms = objective.compute(&embeddings.z1, &embeddings.z2, None, 0)?;
        let grads = terms.total.backward()?;
        std::hint::black_box(grads);
        Ok(start.elapsed().as_secs_f64())
    };
    step(0)?; // warm-up
    let steps = 5;
    let total: f64 = (1..=steps).map(&mut step).sum::<anyhow::Result<f64>>()?;
    let per_step = total / steps as f64;
    let len = batch.tokens.input_ids.dim(1)?;
    println!("train step (fwd+bwd, 64 x 2 views, max_len 32, padded to {len}): {per_step:.3} s = {:.0} sentences/s", 64.0 / per_step);
    Ok(())
}
