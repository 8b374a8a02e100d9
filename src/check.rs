//! Self-checks of a machine: its collectives with every rank's expected results, and its device's
//! dropout masks and encoder (forward and gradients) against the CPU reference. `kdmcse check`
//! runs them (scripts/device-check.sh on a GPU, with NCCL); the tests run them on CPU over the
//! TCP backend.

use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::data::{TokenBatch, Tokenizer};
use crate::dist::{self, Communicator};
use crate::model::dropout::{example_key, Dropout, Site};
use crate::model::{self, Pooling};
use crate::train::student::{HeadsSpec, Student};

/// Head sizes of the student the encoder check builds (its heads take no part in the check).
const CHECK_PROJ_DIM: usize = 256;
const CHECK_TEACHER_DIM: usize = 768;

/// Where a check function sends each result the moment it is known.
pub type Report<'a> = &'a mut dyn FnMut(Check);

/// One check's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

impl Check {
    /// Passes when `diff` (a maximum absolute or relative difference) is at most `tolerance`.
    fn within(name: impl Into<String>, diff: f64, tolerance: f64) -> Self {
        Self {
            name: name.into(),
            passed: diff <= tolerance,
            detail: format!("max diff {diff:.3e} (tolerance {tolerance:.0e})"),
        }
    }

    /// A check that could not run: `err` says why.
    pub fn failed(name: impl Into<String>, err: &anyhow::Error) -> Self {
        Self { name: name.into(), passed: false, detail: format!("error: {err:#}") }
    }

    fn equal(name: impl Into<String>, diff: f64) -> Self {
        Self { name: name.into(), passed: diff == 0.0, detail: format!("max |diff| {diff:.3e}") }
    }
}

/// The smallest cosine between corresponding rows of two `[rows, dim]` tensors.
fn min_row_cosine(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let dot = (&a * &b)?.sum(1)?;
    let norms = (a.sqr()?.sum(1)?.sqrt()? * b.sqr()?.sum(1)?.sqrt()?)?;
    let cosines: Vec<f64> = dot.div(&norms)?.to_vec1()?;
    Ok(cosines.into_iter().fold(1.0, f64::min))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}

/// `values` as an f32 tensor of `shape` on `device`.
fn tensor(values: Vec<f32>, shape: &[usize], device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(values, shape, device)?)
}

/// Aborts the collectives as the watchdog does when a peer is lost (closing the TCP mesh,
/// `ncclCommAbort` on NCCL), then checks that a collective fails at once with the abort's verdict
/// instead of running or hanging. It leaves the group unusable: run it last.
pub fn abort(
    comm: &dyn Communicator,
    abort: &dist::watchdog::Abort,
    device: &Device,
    report: Report,
) -> Result<()> {
    let verdict = "kdmcse check: a deliberate abort";
    abort.abort(verdict.into());
    let started = std::time::Instant::now();
    let result = comm.all_reduce_sum(&Tensor::ones(4, DType::F32, device)?);
    let seconds = started.elapsed().as_secs_f64();
    let (passed, detail) = match result {
        Ok(_) => (false, "a collective still ran after the abort".to_owned()),
        Err(err) => {
            let err = format!("{err:#}");
            (err.contains(verdict) && seconds < 5.0, format!("refused in {seconds:.3} s: {err}"))
        }
    };
    report(Check { name: "abort".into(), passed, detail });
    Ok(())
}

/// Every collective of [`Communicator`] and the trainer's helpers on top of them, on tensors of
/// `device`, each compared exactly with what this rank must receive (small integers, exact in
/// f32 and bf16).
pub fn collectives(comm: &dyn Communicator, device: &Device, report: Report) -> Result<()> {
    let (rank, world) = (comm.rank(), comm.world_size());

    let local = tensor((0..6).map(|i| (rank * 6 + i) as f32).collect(), &[2, 3], device)?;
    let expected = tensor((0..6 * world).map(|i| i as f32).collect(), &[2 * world, 3], device)?;
    report(Check::equal("all_gather", max_abs_diff(&comm.all_gather(&local)?, &expected)?));

    // A few MB, so the backends move more than one packet or chunk.
    let n = 1 << 20;
    let pattern = |scale: usize| (0..n).map(move |i| (scale * (i % 7)) as f32).collect::<Vec<_>>();
    let summed = comm.all_reduce_sum(&tensor(pattern(rank + 1), &[n], device)?)?;
    let expected = tensor(pattern(world * (world + 1) / 2), &[n], device)?;
    report(Check::equal("all_reduce_sum", max_abs_diff(&summed, &expected)?));

    let bf16 = tensor(pattern(rank + 1), &[n], device)?.to_dtype(DType::BF16)?;
    let summed = comm.all_reduce_sum(&bf16)?;
    let dtype_kept = summed.dtype() == DType::BF16;
    let mut check = Check::equal("all_reduce_sum_bf16", max_abs_diff(&summed, &expected)?);
    check.passed &= dtype_kept;
    report(check);

    let mut roots = vec![0, world - 1];
    roots.dedup();
    for root in roots {
        let mine = Tensor::full(rank as f32, (4, 5), device)?;
        let got = comm.broadcast(&mine, root)?;
        let name = format!("broadcast_from_{root}");
        report(Check::equal(name, max_abs_diff(&got, &Tensor::full(root as f32, (4, 5), device)?)?));
    }

    let bytes = comm.all_gather_bytes(format!("rank {rank}").as_bytes())?;
    let expected: Vec<Vec<u8>> = (0..world).map(|r| format!("rank {r}").into_bytes()).collect();
    report(Check {
        name: "all_gather_bytes".into(),
        passed: bytes == expected,
        detail: format!("{} messages", bytes.len()),
    });

    // Gradient all-reduce: one small, one missing and one bucket-overflowing gradient.
    let big = 7 << 20;
    let grads = vec![
        Some(Tensor::full((rank + 1) as f32, (3, 4), device)?),
        None,
        Some(Tensor::full((rank + 1) as f32, big, device)?),
    ];
    let reduced = dist::all_reduce_grads(comm, grads)?;
    let total = (world * (world + 1) / 2) as f32;
    let passed = reduced[1].is_none()
        && max_abs_diff(reduced[0].as_ref().expect("kept"), &Tensor::full(total, (3, 4), device)?)? == 0.0
        && max_abs_diff(reduced[2].as_ref().expect("kept"), &Tensor::full(total, big, device)?)? == 0.0;
    report(Check { name: "all_reduce_grads".into(), passed, detail: format!("{} + {big} elements", 12) });

    // Global negatives: rank r's gradient with respect to the pool is r + 1 everywhere; each rank
    // gets the sum over ranks of its own rows.
    let pool_grad = Tensor::full((rank + 1) as f32, (2 * world, 3), device)?;
    let own = dist::own_rows_of_pool_grads(comm, &[pool_grad], 2)?;
    let expected = Tensor::full((world * (world + 1) / 2) as f32, (2, 3), device)?;
    report(Check::equal("own_rows_of_pool_grads", max_abs_diff(&own[0], &expected)?));

    report(barrier(comm)?);
    Ok(())
}

/// Rank 0 arrives at the barrier late on purpose; no rank may leave before it arrived. The
/// ranks exchange their arrival and release times afterwards (wall clock, so across nodes the
/// clocks' skew must stay well below the delay).
fn barrier(comm: &dyn Communicator) -> Result<Check> {
    const LATE: std::time::Duration = std::time::Duration::from_millis(300);
    let now_us = || -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
    };
    comm.barrier()?; // everyone is here: the clocks start together
    if comm.rank() == 0 {
        std::thread::sleep(LATE);
    }
    let arrived = now_us();
    comm.barrier()?;
    let left = now_us();
    let times: Vec<(u64, u64)> = comm
        .all_gather_bytes(&[arrived.to_le_bytes(), left.to_le_bytes()].concat())?
        .iter()
        .map(|b| {
            let word = |i: usize| u64::from_le_bytes(b[8 * i..8 * i + 8].try_into().expect("8 bytes"));
            (word(0), word(1))
        })
        .collect();
    let last_arrival = times.iter().map(|t| t.0).max().unwrap_or(0);
    let first_release = times.iter().map(|t| t.1).min().unwrap_or(0);
    Ok(Check {
        name: "barrier".into(),
        passed: first_release >= last_arrival,
        detail: format!(
            "{} ranks; rank 0 arrived {LATE:?} late; first release {:+.1} ms after the last arrival",
            times.len(),
            (first_release as f64 - last_arrival as f64) / 1e3
        ),
    })
}

/// kdmcse's CUDA kernels compile for `device` and load (on a GPU; nothing to do elsewhere), with
/// the NVRTC and driver versions in the detail.
pub fn kernels(device: &Device, report: Report) -> Result<()> {
    if let Some(detail) = crate::kernels::load_all(device)? {
        report(Check { name: "kernels".into(), passed: true, detail });
    }
    Ok(())
}

/// Dropout masks made on `device` equal the CPU's, for attention- and hidden-shaped inputs in
/// fp32 and bf16.
pub fn dropout_masks(device: &Device, report: Report) -> Result<()> {
    let keys: Vec<u64> = (0..6).map(|i| example_key(1234, 7, i, i % 2)).collect();
    let dropout = Dropout::per_example(0.1, 0.1, keys);
    for (site, shape) in
        [(Site::AttentionProbs(3), vec![6, 12, 33, 33]), (Site::FeedForwardOutput(11), vec![6, 33, 768])]
    {
        for dtype in [DType::F32, DType::BF16] {
            let ones = |d: &Device| Tensor::ones(shape.as_slice(), dtype, d);
            let on_device = dropout.apply(&ones(device)?, site)?;
            let on_cpu = dropout.apply(&ones(&Device::Cpu)?, site)?;
            let name = format!("dropout_mask_{site:?}_{dtype:?}").to_lowercase();
            report(Check::equal(name, max_abs_diff(&on_device, &on_cpu)?));
        }
    }
    Ok(())
}

/// The encoder of `dir` in training mode (dropout on) on `device` against the CPU: CLS
/// embeddings and every weight's gradient of a fixed projection of them. Both sides run the same
/// precision, so only summation order (and, for bf16, the rounding it shifts) separates them.
pub fn encoder(dir: &Path, device: &Device, compute: DType, report: Report) -> Result<()> {
    let config = model::load_config(dir)?;
    let tokenizer = Tokenizer::from_dir(dir, 32, config.pad_token_id as u32)?;
    let sentences = [
        "A man is playing a guitar on the street.",
        "Two dogs run across a snowy field.",
        "The committee postponed its decision until next spring, citing budget concerns.",
        "Hi.",
    ];
    let keys: Vec<u64> = (0..sentences.len() as u64).map(|i| example_key(1234, 0, i, 0)).collect();
    let dropout = Dropout::per_example(
        config.hidden_dropout_prob as f32,
        config.attention_probs_dropout_prob as f32,
        keys,
    );
    let probe = Tensor::randn(0f32, 1.0, (sentences.len(), config.hidden_size), &Device::Cpu)?;
    let run = |device: &Device| -> Result<(Tensor, Vec<(String, Tensor)>)> {
        let heads = HeadsSpec {
            proj_dim: CHECK_PROJ_DIM,
            teacher_dim: CHECK_TEACHER_DIM,
            init: Default::default(),
            seed: 0,
        };
        let student = Student::load(dir, Pooling::Cls, heads, compute, device)?;
        let batch: TokenBatch = tokenizer.batch(&sentences, device)?;
        let cls = student.encoder.embed(&batch, &dropout, Pooling::Cls)?;
        let grads = (&cls * probe.to_device(device)?)?.sum_all()?.backward()?;
        let mut weight_grads: Vec<(String, Tensor)> = student
            .params()
            .into_iter()
            .filter_map(|(name, var)| grads.get(var.as_tensor()).map(|g| (name, g.clone())))
            .collect();
        weight_grads.sort_by(|a, b| a.0.cmp(&b.0));
        Ok((cls, weight_grads))
    };
    let (cls_dev, grads_dev) = run(device)?;
    let (cls_cpu, grads_cpu) = run(&Device::Cpu)?;
    let tag = format!("{compute:?}").to_lowercase();
    // fp32: within 1e-4 absolute. bf16: its spacing near 2-4 is 0.016, so an absolute bound says
    // little; each embedding's direction must agree (cosine, as for the gradients below).
    report(if compute == DType::F32 {
        Check::within(format!("encoder_forward_{tag}"), max_abs_diff(&cls_dev, &cls_cpu)?, 1e-4)
    } else {
        let worst = 1.0 - min_row_cosine(&cls_dev, &cls_cpu)?;
        let mut check = Check::within(format!("encoder_forward_{tag}"), worst, 1e-3);
        check.detail = format!("1 - worst row cosine {worst:.3e} (tolerance 1e-3)");
        check
    });
    // Gradients relative to each tensor's largest CPU gradient (the worst tensor is reported),
    // and the cosine of all gradients as one vector.
    let mut worst = (0.0f64, String::new());
    let (mut dot, mut norm_dev, mut norm_cpu) = (0.0f64, 0.0f64, 0.0f64);
    for ((name, g_dev), (_, g_cpu)) in grads_dev.iter().zip(&grads_cpu) {
        let scale = g_cpu.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64;
        let rel = max_abs_diff(g_dev, g_cpu)? / scale.max(1e-12);
        if rel > worst.0 {
            worst = (rel, name.clone());
        }
        let (d, c) = (g_dev.to_device(&Device::Cpu)?.to_dtype(DType::F64)?, g_cpu.to_dtype(DType::F64)?);
        dot += (&d * &c)?.sum_all()?.to_scalar::<f64>()?;
        norm_dev += d.sqr()?.sum_all()?.to_scalar::<f64>()?;
        norm_cpu += c.sqr()?.sum_all()?.to_scalar::<f64>()?;
    }
    let cosine = dot / (norm_dev.sqrt() * norm_cpu.sqrt()).max(1e-300);
    // fp32: every tensor within 1e-3 of its scale. bf16: per-tensor differences are bf16 rounding
    // noise, large on tensors with tiny gradients, so the direction of the whole gradient is
    // checked instead.
    let mut check = if compute == DType::F32 {
        Check::within(format!("encoder_gradients_{tag}"), worst.0, 1e-3)
    } else {
        Check::within(format!("encoder_gradients_{tag}"), 1.0 - cosine, 1e-3)
    };
    check.passed &= grads_dev.len() == grads_cpu.len() && !grads_cpu.is_empty();
    check.detail = format!("{} tensors; {}; gradient cosine {cosine:.6}", grads_cpu.len(), check.detail);
    if !worst.1.is_empty() {
        check.detail += &format!(", worst tensor {} ({:.2e})", worst.1, worst.0);
    }
    report(check);
    Ok(())
}
