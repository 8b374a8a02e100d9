//! kdmcse's own tensor ops, one file each: the fused training ops and their backward (softmax
//! and attention's softmax, LayerNorm, GELU; the backward public for the encoder's written-out
//! one; L2 normalisation), elementwise sums and products (masks as constants), matrix products, row gathers
//! (packing a padded batch's tokens), the dropout mask, AdamW's in-place updates, and the
//! objective's angular cross-entropy (one term, margins, filter and softmax in one pass). The fused
//! ops run a CPU kernel here and a CUDA kernel from `src/kernels/` with the same arithmetic; the
//! matrix products, elementwise ops, gathers and softmax backward have CPU kernels only (on a
//! GPU they are candle's, which already use the device's threads). On other devices and dtypes
//! every op falls back to a composition of candle primitives (and [`vjp`]); the composed
//! versions are public so tests can check the fused kernels against them. Every CPU kernel runs
//! in the vector extensions [`Isa`] selects, each level giving the same bits. The ops autocast
//! runs in bf16 (products, GELU, sums, masks, attention) take bf16 on the CPU too, computed in f32
//! and rounded once ([`to_dtype`]'s module); bf16 products run on AMX tiles where the CPU has them.

mod adamw;
mod angular_cross_entropy;
mod attention;
mod cast;
mod constant;
mod dropout_mask;
mod gather_rows;
mod gelu;
mod isa;
mod l2_normalize;
mod layer_norm;
mod math;
mod matmul;
mod softmax;

pub(crate) use adamw::{AdamUpdate, Lerp};
pub use angular_cross_entropy::{
    angular_cross_entropy, angular_cross_entropy_serves, AngularTerm, COS_CLAMP, MASKED_LOGIT, ROW_OUTPUTS,
};
pub use attention::{
    packed_attention, packed_attention_backward, packed_attention_serves, AttentionDropout, AttentionRows,
    PackedAttention,
};
pub use cast::to_dtype;
pub use constant::{add, add_constant, mul_constant};
pub(crate) use dropout_mask::{dropout_mask, mix, origin as dropout_origin};
pub use gather_rows::{gather_rows, RowGather};
pub use gelu::{gelu_erf, gelu_erf_backward, gelu_erf_composed};
pub use isa::{Isa, ISA_ENV};
pub use l2_normalize::{l2_normalize, l2_normalize_composed};
pub use layer_norm::{layer_norm, layer_norm_backward, layer_norm_composed};
pub use matmul::{linear, matmul, matmul_merge_heads, sum_rows};
pub use softmax::{
    attention_softmax, attention_softmax_backward, softmax_last_dim, softmax_last_dim_composed,
};

use candle_core::{CpuStorage, DType, Layout, Result, Tensor, Var};

/// The vector-Jacobian product of `f` at `inputs` with the output's gradient `grad`, by candle's
/// autograd: each input's gradient (zeros where `f` ignores it). The backward of the ops (and
/// dtypes or devices) that have no kernel of their own.
pub fn vjp(
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[&Tensor],
    grad: &Tensor,
) -> Result<Vec<Tensor>> {
    let vars = inputs.iter().map(|t| Var::from_tensor(t)).collect::<Result<Vec<_>>>()?;
    let leaves: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = (f(&leaves)? * grad.detach())?.sum_all()?.backward()?;
    leaves.iter().map(|leaf| grads.get(leaf).cloned().map_or_else(|| leaf.zeros_like(), Ok)).collect()
}

/// The launch shapes of the CUDA kernels, as (blocks, threads per block); the host tests run the
/// kernels with the same shapes.
#[cfg(any(feature = "cuda", test))]
pub(crate) mod launch {
    /// Threads per block of one-thread-per-element kernels (cudarc's `for_num_elems`).
    pub(crate) const ELEMENTWISE_THREADS: usize = 1024;

    /// One thread per element of `n`.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the host harness computes its own grid
    pub(crate) fn elementwise(n: usize) -> (usize, usize) {
        (n.div_ceil(ELEMENTWISE_THREADS).max(1), ELEMENTWISE_THREADS)
    }

    /// One block per row (grid-stride beyond 2^16 rows), threads striding over the row: a power
    /// of two between 32 and 256 (ops.cu's reductions need a power of two).
    pub(crate) fn rows(rows: usize, dim: usize) -> (usize, usize) {
        (rows.clamp(1, 1 << 16), dim.next_power_of_two().clamp(32, 256))
    }
}

/// Whether the fused kernels serve `xs`: f32 on the CPU or on CUDA.
fn fused(xs: &Tensor) -> bool {
    xs.dtype() == DType::F32 && (xs.device().is_cpu() || xs.device().is_cuda())
}

/// The contiguous f32 data of a CPU custom op's input.
pub(crate) fn cpu_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    cast::cpu_slice(storage, layout, op)
}

/// A CPU kernel's output of `len` elements, in pieces of `piece` elements (the last may be
/// shorter) that `write(index, piece)` fills across threads, each piece in the selected
/// [`Isa`] (pass `write` as `#[inline(always)] |index, piece| ...`): unlike `vec![0.0; len]`, no
/// zero-fill pass over the memory first (a tenth of the training step's memory traffic).
///
/// # Safety
/// `write` must initialise every element of each piece it is given.
pub(crate) unsafe fn written_in_pieces<T: Send>(
    len: usize,
    piece: usize,
    write: impl Fn(usize, &mut [std::mem::MaybeUninit<T>]) + Sync,
) -> Vec<T> {
    use rayon::prelude::*;
    let isa = Isa::selected();
    let mut out = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len].par_chunks_mut(piece.max(1)).enumerate().for_each(|(i, p)| {
        isa.run(
            #[inline(always)]
            || write(i, p),
        )
    });
    // SAFETY: the caller's `write` initialised every piece, and the pieces cover `len` elements.
    unsafe { out.set_len(len) };
    out
}

/// [`cpu_f32`] for the tensor an in-place op writes.
pub(crate) fn cpu_f32_mut<'a>(
    storage: &'a mut CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a mut [f32]> {
    let data = match storage {
        CpuStorage::F32(data) => data,
        _ => candle_core::bail!("{op}: expected f32 input"),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&mut data[start..end]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// Launch plumbing shared by the CUDA twins of the ops.
#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig};
    use candle_core::cuda_backend::{CudaDevice, CudaStorage};
    use candle_core::{Layout, Result};

    /// The contiguous element range of a layout.
    fn range(layout: &Layout, op: &str) -> Result<std::ops::Range<usize>> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input must be contiguous")))?;
        Ok(start..end)
    }

    /// The contiguous f32 data of an op's input.
    pub(super) fn input<'a>(
        storage: &'a CudaStorage,
        layout: &Layout,
        op: &str,
    ) -> Result<CudaView<'a, f32>> {
        Ok(storage.as_cuda_slice::<f32>()?.slice(range(layout, op)?))
    }

    /// The contiguous element range of each operand of an in-place op, all of one size.
    pub(super) fn ranges<const N: usize>(
        layouts: [&Layout; N],
        op: &str,
    ) -> Result<[std::ops::Range<usize>; N]> {
        let mut out = std::array::from_fn(|_| 0..0);
        for (out, layout) in out.iter_mut().zip(layouts) {
            *out = range(layout, op)?;
        }
        if out.iter().any(|r| r.len() != out[0].len()) {
            candle_core::bail!("{op}: operands of different sizes {out:?}");
        }
        Ok(out)
    }

    pub(super) fn output<T: candle_core::cuda_backend::CudaDType>(
        slice: CudaSlice<T>,
        device: &CudaDevice,
    ) -> CudaStorage {
        CudaStorage::wrap_cuda_slice(slice, device.clone())
    }

    fn config((blocks, threads): (usize, usize)) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// One thread per element ([`super::launch::elementwise`]).
    pub(super) fn elementwise(n: usize) -> LaunchConfig {
        config(super::launch::elementwise(n))
    }

    /// One block per row ([`super::launch::rows`]).
    pub(super) fn rows(rows: usize, dim: usize) -> LaunchConfig {
        config(super::launch::rows(rows, dim))
    }
}

/// The largest absolute difference of two tensors of one shape (the ops' tests).
#[cfg(test)]
fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The fused kernels and their backward agree with the composed ops candle differentiates.
    #[test]
    fn fused_ops_match_composed_forward_and_backward() {
        let device = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 3.0, (4, 5, 48), &device).unwrap() + 0.7).unwrap())
            .unwrap();
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.2, 48, &device).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.2, 48, &device).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (4, 5, 48), &device).unwrap();
        type Op<'a> = &'a dyn Fn(&Tensor) -> Result<Tensor>;
        let ln_fused: Op = &|x| layer_norm(x, &w, &b, 1e-12);
        let ln_composed: Op = &|x| layer_norm_composed(x, &w, &b, 1e-12);
        let sm_fused: Op = &|x| softmax_last_dim(x);
        let sm_composed: Op = &|x| softmax_last_dim_composed(x);
        let gelu_fused: Op = &|x| gelu_erf(x);
        let gelu_composed: Op = &|x| gelu_erf_composed(x);
        let l2_fused: Op = &|x| l2_normalize(x);
        let l2_composed: Op = &|x| l2_normalize_composed(x);
        for (name, fused, composed) in [
            ("layer_norm", ln_fused, ln_composed),
            ("softmax", sm_fused, sm_composed),
            ("gelu", gelu_fused, gelu_composed),
            ("l2_normalize", l2_fused, l2_composed),
        ] {
            let (yf, yc) = (fused(x.as_tensor()).unwrap(), composed(x.as_tensor()).unwrap());
            assert!(max_diff(&yf, &yc) < 1e-5, "{name} forward");
            let gf = (yf * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (yc * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            for (var, what) in [(&x, "x"), (&w, "weight"), (&b, "bias")] {
                match (gf.get(var.as_tensor()), gc.get(var.as_tensor())) {
                    (Some(f), Some(c)) => {
                        assert!(max_diff(f, c) < 1e-4, "{name} d{what}: {}", max_diff(f, c))
                    }
                    (None, None) => {}
                    _ => panic!("{name} d{what}: gradient present in one version only"),
                }
            }
        }
    }
}

#[cfg(test)]
mod isa_tests {
    use std::sync::Arc;

    use super::*;
    use candle_core::Device;

    /// Every CPU kernel's outputs on fixed inputs, as bits: forward and backward of the fused
    /// ops, packed attention with dropout, the dropout mask, AdamW's updates and the angular
    /// cross-entropy.
    fn every_kernel() -> Vec<Vec<u32>> {
        let device = Device::Cpu;
        let seeded = |n: usize, seed: u64| -> Vec<f32> {
            (0..n as u64).map(|i| (mix(seed ^ i) >> 40) as f32 / (1u64 << 23) as f32 - 1.0).collect()
        };
        let tensor = |dims: &[usize], seed| {
            Tensor::from_vec(seeded(dims.iter().product(), seed), dims, &device).unwrap()
        };
        let bits = |t: &Tensor| {
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
        };
        let (x, g, w, b) = (tensor(&[6, 70], 1), tensor(&[6, 70], 2), tensor(&[70], 3), tensor(&[70], 4));
        let mut out: Vec<Vec<u32>> = vec![
            bits(&softmax_last_dim(&x).unwrap()),
            bits(
                &attention_softmax(
                    &x.reshape((2, 1, 3, 70)).unwrap(),
                    0.3,
                    &Tensor::cat(&[&w, &b], 0).unwrap().reshape((2, 1, 1, 70)).unwrap(),
                )
                .unwrap(),
            ),
            bits(&attention_softmax_backward(&x, &g, 0.3).unwrap()),
            bits(&layer_norm(&x, &w, &b, 1e-12).unwrap()),
            bits(&x.apply_op3_no_bwd(&w, &g, &layer_norm::LayerNormBackward { eps: 1e-12 }).unwrap()),
            bits(&gelu_erf(&x).unwrap()),
            bits(&gelu_erf_backward(&x, &g).unwrap()),
            bits(&l2_normalize(&x).unwrap()),
            bits(&x.apply_op2_no_bwd(&g, &l2_normalize::L2NormalizeBackward).unwrap()),
            bits(&dropout_mask(&x, &[5, 6, 7, 8, 9, 10], None, 3, 0.2).unwrap()),
        ];
        let attention = PackedAttention {
            heads: 2,
            scale: 0.25,
            rows: Arc::new(AttentionRows { queries: vec![(0, 3), (3, 5)], keys: vec![(0, 3), (3, 5)] }),
            dropout: Some(AttentionDropout { keys: Arc::from([11u64, 12]), site: 4, p: 0.2 }),
        };
        let (q, k, v, dc) =
            (tensor(&[8, 16], 5), tensor(&[8, 16], 6), tensor(&[8, 16], 7), tensor(&[8, 16], 8));
        out.push(bits(&packed_attention(&q, &k, &v, &attention).unwrap()));
        let (dq, dk, dv) = packed_attention_backward(&q, &k, &v, &dc, &attention).unwrap();
        out.extend([bits(&dq), bits(&dk), bits(&dv)]);
        let (p, m) = (x.copy().unwrap(), g.copy().unwrap());
        m.inplace_op2(&x, &Lerp { keep: 0.9, square: true }).unwrap();
        let update = AdamUpdate {
            step_size: 0.1,
            bias_correction2: 0.5,
            eps: 1e-6,
            decay_before: 0.99,
            decay_after: 1.0,
        };
        p.inplace_op3(&g, &m, &update).unwrap();
        out.extend([bits(&m), bits(&p)]);
        let term = AngularTerm {
            temp: 0.05,
            margin: 0.15,
            similarity: Some(g.clone()),
            filter: Some((w.broadcast_as((6, 70)).unwrap().contiguous().unwrap(), 0.5)),
            row_offset: 2,
        };
        let cos = candle_core::Var::from_tensor(&x).unwrap();
        let rows = angular_cross_entropy(cos.as_tensor(), &term).unwrap();
        let grads = rows.narrow(1, 0, 1).unwrap().sum_all().unwrap().backward().unwrap();
        out.extend([bits(&rows), bits(grads.get(cos.as_tensor()).unwrap())]);
        out
    }

    /// Each level of vector extensions this CPU has computes every kernel's bits exactly as the
    /// baseline build does (the levels are selected process-wide; any level is correct for the
    /// tests running beside this one).
    #[test]
    fn every_isa_computes_the_same_bits() {
        let levels: Vec<Isa> = Isa::available().collect();
        let results: Vec<_> = levels.iter().map(|&isa| (Isa::select(isa), every_kernel())).collect();
        Isa::select(Isa::from_env().unwrap());
        let (baseline, expected) = &results[0];
        assert_eq!(*baseline, Isa::Baseline);
        for (isa, got) in &results[1..] {
            for (kernel, (a, b)) in got.iter().zip(expected).enumerate() {
                assert!(a == b, "kernel {kernel} under {isa:?} differs from the baseline build");
            }
        }
        println!("levels compared: {levels:?}");
    }
}

#[cfg(test)]
mod cuda_kernel_tests {
    //! kernels/ops.cu built for the host and run with the CUDA launches' block shapes (real
    //! threads per block, a real barrier) against the CPU ops: the GPU arithmetic, its block
    //! reductions included, is checked without a GPU. The reductions sum in tree order, the CPU
    //! in row order: they agree to rounding, not bit for bit.

    use super::*;
    use crate::kernels::host::assert_close;
    use candle_core::Device;

    const MAIN: &str = r#"
// argv: mode, rows, dim, then the launch shapes: blocks and threads of the row kernels, threads
// of the elementwise ones, and the LayerNorm parameter gradients' chunk of rows.
int main(int argc, char **argv) {
    std::string mode = argv[1];
    unsigned rows = atoi(argv[2]), dim = atoi(argv[3]);
    unsigned row_grid = atoi(argv[4]), row_block = atoi(argv[5]), elem_block = atoi(argv[6]);
    unsigned chunk_rows = atoi(argv[7]);
    float eps = 1e-12f;
    size_t n = (size_t)rows * dim;
    std::vector<float> x = read(n), out(n);
    float *xp = x.data(), *op = out.data();
    if (mode == "softmax") {
        launch(row_grid, row_block, [&] { softmax_last_dim(xp, op, rows, dim); });
        print(out);
    }
    if (mode == "gelu") {
        launch(blocks_for(n, elem_block), elem_block, [&] { gelu_erf(xp, op, n); });
        print(out);
    }
    if (mode == "gelu_backward") {
        auto g = read(n);
        float *gp = g.data();
        launch(blocks_for(n, elem_block), elem_block, [&] { gelu_erf_backward(xp, gp, op, n); });
        print(out);
    }
    if (mode == "l2_normalize") {
        launch(row_grid, row_block, [&] { l2_normalize(xp, op, rows, dim); });
        print(out);
    }
    if (mode == "l2_normalize_backward") {
        auto g = read(n);
        float *gp = g.data();
        launch(row_grid, row_block, [&] { l2_normalize_backward(xp, gp, op, rows, dim); });
        print(out);
    }
    if (mode == "layer_norm") {
        auto w = read(dim), b = read(dim);
        float *wp = w.data(), *bp = b.data();
        launch(row_grid, row_block, [&] { layer_norm(xp, wp, bp, op, rows, dim, eps); });
        print(out);
    }
    if (mode == "layer_norm_backward") {
        auto w = read(dim), g = read(n);
        unsigned chunks = (rows + chunk_rows - 1) / chunk_rows;
        std::vector<float> stats(2 * rows), partial(2 * chunks * dim), dw(dim), db(dim);
        float *wp = w.data(), *gp = g.data(), *sp = stats.data(), *pp = partial.data();
        float *dwp = dw.data(), *dbp = db.data();
        launch(row_grid, row_block, [&] { layer_norm_stats(xp, sp, rows, dim, eps); });
        launch(row_grid, row_block, [&] { layer_norm_backward_input(xp, wp, gp, op, rows, dim, eps); });
        launch(blocks_for((size_t)chunks * dim, elem_block), elem_block,
               [&] { layer_norm_backward_params(xp, gp, sp, pp, rows, dim, chunk_rows); });
        launch(blocks_for(dim, elem_block), elem_block,
               [&] { layer_norm_backward_params_sum(pp, dwp, dbp, chunks, dim); });
        print(out); print(dw); print(db);
    }
}
"#;

    /// Runs `mode` on the host with the launch shapes of the CUDA ops; `row_grid` overrides the
    /// row kernels' block count (fewer blocks than rows exercise their grid-stride loops).
    fn host_run(
        exe: &std::path::Path,
        mode: &str,
        (rows, dim): (usize, usize),
        row_grid: Option<usize>,
        inputs: &[&Tensor],
    ) -> Vec<f32> {
        let input: Vec<f32> =
            inputs.iter().flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect();
        let (grid, block) = launch::rows(rows, dim);
        let args = [
            mode.to_owned(),
            rows.to_string(),
            dim.to_string(),
            row_grid.unwrap_or(grid).to_string(),
            block.to_string(),
            launch::ELEMENTWISE_THREADS.to_string(),
            layer_norm::LAYER_NORM_CHUNK_ROWS.to_string(),
        ];
        crate::kernels::host::run(exe, &args, &input)
    }

    #[test]
    fn cuda_kernels_compute_the_cpu_ops() {
        let dir = tempfile::tempdir().unwrap();
        let main = format!("#include <string>\n{MAIN}");
        let exe = crate::kernels::host::compile(dir.path(), crate::kernels::OPS, &main);
        let device = Device::Cpu;
        // 150 rows: over two chunks of the LayerNorm parameter sums; 48 wide: a 64-thread block
        // with idle threads; 300 wide: 256 threads striding over each row; 3 blocks: every block
        // takes many rows through the grid-stride loop.
        for (rows, dim, grid) in [(150, 48, None), (150, 48, Some(3)), (70, 300, None)] {
            let shape = (rows, dim);
            let what = |op: &str| format!("{op} {shape:?} grid {grid:?}");
            let x = (Tensor::randn(0f32, 3.0, shape, &device).unwrap() + 0.7).unwrap();
            let g = Tensor::randn(0f32, 1.0, shape, &device).unwrap();
            let w = Tensor::randn(1f32, 0.2, dim, &device).unwrap();
            let b = Tensor::randn(0f32, 0.2, dim, &device).unwrap();
            let host = |mode: &str, inputs: &[&Tensor]| host_run(&exe, mode, shape, grid, inputs);
            assert_close(&host("softmax", &[&x]), &softmax_last_dim(&x).unwrap(), &what("softmax"));
            assert_close(&host("gelu", &[&x]), &gelu_erf(&x).unwrap(), &what("gelu"));
            let cpu = x.apply_op2_no_bwd(&g, &gelu::GeluErfBackward).unwrap();
            assert_close(&host("gelu_backward", &[&x, &g]), &cpu, &what("gelu backward"));
            let cpu = layer_norm(&x, &w, &b, 1e-12).unwrap();
            assert_close(&host("layer_norm", &[&x, &w, &b]), &cpu, &what("layer norm"));
            assert_close(&host("l2_normalize", &[&x]), &l2_normalize(&x).unwrap(), &what("l2 normalize"));
            let cpu = x.apply_op2_no_bwd(&g, &l2_normalize::L2NormalizeBackward).unwrap();
            assert_close(&host("l2_normalize_backward", &[&x, &g]), &cpu, &what("l2 normalize backward"));
            let cpu = x.apply_op3_no_bwd(&w, &g, &layer_norm::LayerNormBackward { eps: 1e-12 }).unwrap();
            let host = host("layer_norm_backward", &[&x, &w, &g]);
            assert_close(&host, &cpu, &what("layer norm backward (dx, dweight, dbias)"));
        }
    }
}
