//! Encoder throughput with MiniLM: encoding the STS-B test sentences (batch 128) and one training
//! step (forward + backward of both dropout views, batch 64 x 2, max_len 32, SimCSE loss), its
//! backward both ways: candle's autograd of the whole graph, and the trainer's (autograd through
//! the heads, then the encoder's written-out backward). For each, the tensors the step creates:
//! every candle op, view or copy makes one (and all but views launch a kernel on a GPU), read off
//! candle's tensor id counter. Run with `scripts/bench-encode` (or `cargo bench --bench encoder`).

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use kdmcse::data::{TokenBatch, Tokenizer};
use kdmcse::embed::SentenceEncoder;
use kdmcse::eval::{load_task, Task};
use kdmcse::loss::Objective;
use kdmcse::model::{dropout::example_key, dropout::Dropout, Pooling};
use kdmcse::train::batches::{BatchKind, TwoViewBatch};
use kdmcse::train::student::{Embeddings, HeadsSpec, Output, Student};

#[global_allocator]
static GLOBAL: kdmcse::Allocator = mimalloc::MiMalloc;

/// How many tensors candle has created so far (its ids count up from 1; this call makes one).
fn tensors_created() -> usize {
    let id = format!("{:?}", Tensor::zeros((), DType::F32, &Device::Cpu).expect("a scalar").id());
    id.trim_start_matches("TensorId(").trim_end_matches(')').parse().expect("TensorId(n)")
}

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
    let len = batch.tokens.input_ids.dim(1)?;
    for written_out in [false, true] {
        // (seconds, tensors created) of the forward and of the backward of one step.
        type Phases = [(f64, usize); 2];
        let mut step = |s: u64| -> anyhow::Result<Phases> {
            let keys = (0..128u64).map(|i| example_key(1234, s, i % 64, i / 64)).collect();
            batch.dropout = Dropout::per_example(0.1, 0.1, keys);
            let (start, tensors) = (Instant::now(), tensors_created());
            let mark = |from: (Instant, usize)| {
                (
                    (from.0.elapsed().as_secs_f64(), tensors_created() - from.1 - 1),
                    (Instant::now(), tensors_created()),
                )
            };
            let (forward, backward) = if written_out {
                let forward = student.forward_for_backward(&batch)?;
                let values = forward.embeddings.detach();
                let output = |o: Output| Var::from_tensor(values.get(o).expect("text outputs"));
                let (z1, z2) = (output(Output::Z1)?, output(Output::Z2)?);
                let terms = objective.compute(z1.as_tensor(), z2.as_tensor(), None, 0)?;
                let (forward_phase, backward_start) = mark((start, tensors));
                let loss_grads = terms.total.backward()?;
                let grad_of =
                    |var: &Var| loss_grads.get(var.as_tensor()).cloned().expect("the loss reads z1, z2");
                let embedding_grads =
                    Embeddings::new([(Output::Z1, grad_of(&z1)), (Output::Z2, grad_of(&z2))]);
                std::hint::black_box(student.backward(forward, &embedding_grads)?);
                (forward_phase, mark(backward_start).0)
            } else {
                let embeddings = student.forward(&batch)?;
                let output = |o: Output| embeddings.get(o).expect("text outputs");
                let terms = objective.compute(output(Output::Z1), output(Output::Z2), None, 0)?;
                let (forward_phase, backward_start) = mark((start, tensors));
                std::hint::black_box(terms.total.backward()?);
                (forward_phase, mark(backward_start).0)
            };
            Ok([forward, backward])
        };
        step(0)?; // warm-up
        let steps = 5;
        let runs = (1..=steps).map(&mut step).collect::<anyhow::Result<Vec<_>>>()?;
        let mean = |phase: usize| runs.iter().map(|r| r[phase].0).sum::<f64>() / steps as f64;
        let (forward, backward) = (mean(0), mean(1));
        let how = if written_out { "written-out encoder backward" } else { "candle autograd" };
        println!(
            "train step, {how} (64 x 2 views, max_len 32, padded to {len}): {:.3} s = {:.0} sentences/s; \
             forward {forward:.3} s, backward {backward:.3} s ({:.2}x forward); tensors created: forward {}, \
             backward {}",
            forward + backward,
            64.0 / (forward + backward),
            backward / forward,
            runs[0][0].1,
            runs[0][1].1
        );
    }
    Ok(())
}
