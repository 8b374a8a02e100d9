//! The KDMCSE objective alone on synthetic embeddings: a pool of 4096 (dim 768, teacher features
//! 768, margins and the cosine filter on), forward and backward, for the rows one rank computes
//! when the pool is spread over 1, 2, 4 or 8 ranks (`B_local x pool` logits). Time and peak
//! resident memory per rank, beside the time of the objective's matrix products alone (the same
//! 19 products: 9 forward -- 5 student cosine matrices, 2 teacher similarities, 2 filter scores --
//! and 2 per student matrix backward) and their ratio; the collectives are not included. Run with
//! `cargo bench --bench objective` (scripts/bench-pool runs it after the training runs).

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use kdmcse::loss::{FilterScore, Grounding, Objective};
use kdmcse::ops::{matmul, Isa};

// The trainer's allocator, as in training (freed pool-sized matrices are reused, not faulted in
// again).
#[global_allocator]
static GLOBAL: kdmcse::Allocator = mimalloc::MiMalloc;

const POOL: usize = 4096;
const DIM: usize = 768;

/// Peak resident memory since the last reset, in MiB (Linux: VmHWM, reset through clear_refs).
fn peak_rss_mib(reset: bool) -> f64 {
    if reset {
        let _ = std::fs::write("/proc/self/clear_refs", "5");
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(f64::NAN);
    kib / 1024.0
}

fn main() -> anyhow::Result<()> {
    kdmcse::keep_freed_memory();
    let device = Device::Cpu;
    let randn = |rows: usize| Tensor::randn(0f32, 1.0, (rows, DIM), &device);
    let objective =
        Objective { filter: Some(FilterScore::Cosine), filter_threshold: 0.45, ..Objective::default() };
    let (z2, v, t) = (
        Var::from_tensor(&randn(POOL)?)?,
        Var::from_tensor(&randn(POOL)?)?,
        Var::from_tensor(&randn(POOL)?)?,
    );
    let (img, cap) = (randn(POOL)?, randn(POOL)?);
    println!(
        "pool {POOL}, dim {DIM}, threads {}, kernels {:?}",
        rayon::current_num_threads(),
        Isa::selected()
    );
    // Peaks are counted from the resident memory before the first case, fewest rows first: the
    // allocator keeps freed memory mapped for reuse, so a case's peak above that base is its own
    // (each needs more than the one before).
    let base = peak_rss_mib(true);
    for world in [8usize, 4, 2, 1] {
        let rows = POOL / world;
        let (z1, p1, p2) = (
            Var::from_tensor(&randn(rows)?)?,
            Var::from_tensor(&randn(rows)?)?,
            Var::from_tensor(&randn(rows)?)?,
        );
        peak_rss_mib(true);
        let mut times = Vec::new();
        for _ in 0..3 {
            let start = Instant::now();
            let grounding = Grounding {
                p1: p1.as_tensor(),
                p2: p2.as_tensor(),
                v: v.as_tensor(),
                t: t.as_tensor(),
                img_rows: &img.narrow(0, 0, rows)?,
                cap_rows: &cap.narrow(0, 0, rows)?,
                img_cols: &img,
                cap_cols: &cap,
            };
            let terms = objective.compute(z1.as_tensor(), z2.as_tensor(), Some(&grounding), 0)?;
            let grads = terms.total.backward()?;
            let norm = grads.get(z2.as_tensor()).expect("z2 gets a gradient").sqr()?.sum_all()?;
            assert!(norm.to_dtype(DType::F32)?.to_scalar::<f32>()?.is_finite());
            times.push(start.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let peak = peak_rss_mib(false) - base;
        let products = matmul_seconds(&z1, &z2)?;
        let gflop = 19.0 * 2.0 * (rows * POOL * DIM) as f64 / 1e9;
        println!(
            "{world} rank(s): {rows} x {POOL} rows per rank: {:.3} s forward + backward, peak +{peak:.0} MiB; \
             its 19 products alone {products:.3} s ({:.0} GFLOP/s): {:.2}x",
            times[1],
            gflop / products,
            times[1] / products
        );
    }
    Ok(())
}

/// The median time of the objective's 19 products for `rows` against the pool: 9 of `[rows,
/// dim] x [dim, pool]`, then for each of the 5 student matrices `[rows, pool] x [pool, dim]` and
/// `[pool, rows] x [rows, dim]`.
fn matmul_seconds(rows: &Tensor, pool: &Tensor) -> anyhow::Result<f64> {
    let cos = matmul(rows, &pool.t()?)?;
    let mut times = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        for _ in 0..9 {
            matmul(rows, &pool.t()?)?;
        }
        for _ in 0..5 {
            matmul(&cos, pool)?;
            matmul(&cos.t()?, rows)?;
        }
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[1])
}
