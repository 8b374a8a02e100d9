//! The KDMCSE objective alone on synthetic embeddings: a pool of 4096 (dim 768, teacher features
//! 768, margins and the cosine filter on), forward and backward, for the rows one rank computes
//! when the pool is spread over 1, 2, 4 or 8 ranks (`B_local x pool` logits). Time and peak
//! resident memory per rank; the collectives are not included. Run with `cargo bench --bench
//! objective` (scripts/bench-pool runs it after the training runs).

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use kdmcse::loss::{FilterScore, Grounding, Objective};

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
    println!("pool {POOL}, dim {DIM}, threads {}", rayon::current_num_threads());
    // Fewest rows first, so each case's peak is its own (freed memory may stay mapped).
    for world in [8usize, 4, 2, 1] {
        let rows = POOL / world;
        let (z1, p1, p2) = (
            Var::from_tensor(&randn(rows)?)?,
            Var::from_tensor(&randn(rows)?)?,
            Var::from_tensor(&randn(rows)?)?,
        );
        let base = peak_rss_mib(true);
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
        println!(
            "{world} rank(s): {rows} x {POOL} rows per rank: {:.3} s forward + backward, peak +{:.0} MiB",
            times[1],
            peak_rss_mib(false) - base
        );
    }
    Ok(())
}
