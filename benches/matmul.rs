//! The encoder's matrix products alone: each linear layer's three products (forward `xs W^T + b`,
//! the input's gradient `g W`, the weight's `g^T xs`) at MiniLM's and BERT-base's widths for the
//! packed tokens of a 64 x 2 batch (2048 rows), in fp32 and in bf16 at every vector level this
//! CPU has (bf16 is widened to f32 below AMX, on its tiles at `amx`). GFLOP/s per product and for
//! the three together. Run with `cargo bench --bench matmul`.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use kdmcse::ops::{linear, matmul, Isa};

#[global_allocator]
static GLOBAL: kdmcse::Allocator = mimalloc::MiMalloc;

const TOKENS: usize = 2048;

/// Seconds per call of `f`, the median of `runs` after one warm-up call.
fn seconds(runs: usize, mut f: impl FnMut() -> candle_core::Result<Tensor>) -> candle_core::Result<f64> {
    f()?;
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f().map(|_| start.elapsed().as_secs_f64())
        })
        .collect::<candle_core::Result<_>>()?;
    times.sort_by(f64::total_cmp);
    Ok(times[runs / 2])
}

fn main() -> candle_core::Result<()> {
    kdmcse::keep_freed_memory();
    let device = Device::Cpu;
    println!("threads {}, rows {TOKENS}, detected {:?}", rayon::current_num_threads(), Isa::detected());
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>10}",
        "layer (in -> out), kernels", "xs W^T+b", "g W", "g^T xs", "all three"
    );
    for (model, shapes) in [
        ("MiniLM", [(384, 384), (384, 1536), (1536, 384)]),
        ("BERT-base", [(768, 768), (768, 3072), (3072, 768)]),
    ] {
        for (inputs, outputs) in shapes {
            let xs = Tensor::randn(0f32, 1.0, (TOKENS, inputs), &device)?;
            let weight = Tensor::randn(0f32, 0.05, (outputs, inputs), &device)?;
            let bias = Tensor::randn(0f32, 0.05, outputs, &device)?;
            let grad = Tensor::randn(0f32, 1.0, (TOKENS, outputs), &device)?;
            let flops = 2.0 * (TOKENS * inputs * outputs) as f64;
            let levels = Isa::available().filter(|&isa| isa >= Isa::Avx2);
            let runs =
                [(DType::F32, Isa::detected())].into_iter().chain(levels.map(|isa| (DType::BF16, isa)));
            for (dtype, isa) in runs {
                Isa::select(isa);
                let [xs, weight, bias, grad] = [&xs, &weight, &bias, &grad].map(|t| t.to_dtype(dtype));
                let (xs, weight, bias, grad) = (xs?, weight?, bias?, grad?);
                let gflops = |secs: f64| flops / secs / 1e9;
                let forward = seconds(5, || linear(&xs, &weight, &bias))?;
                let input_grad = seconds(5, || matmul(&grad, &weight))?;
                let weight_grad = seconds(5, || matmul(&grad.t()?, &xs))?;
                println!(
                    "{:<28} {:>10.0} {:>10.0} {:>10.0} {:>10.0}",
                    format!("{model} {inputs} -> {outputs}, {dtype:?} {}", isa.name()),
                    gflops(forward),
                    gflops(input_grad),
                    gflops(weight_grad),
                    3.0 * flops / (forward + input_grad + weight_grad) / 1e9,
                );
            }
        }
    }
    Isa::select(Isa::detected());
    Ok(())
}
