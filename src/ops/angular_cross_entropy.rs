//! One InfoNCE term of the objective as one pass over its cosine matrix each way: angular margin
//! (fixed, or teacher-adaptive from a similarity matrix), temperature, the noisy-negative filter
//! and the cross-entropy with the diagonal target, per row. Only the cosines and the teacher's
//! matrices the term reads are kept for the backward, which recomputes each logit (the composed
//! version keeps about a dozen pool-sized intermediates per term). The arithmetic is
//! `crate::loss::angular_infonce_composed`'s operation for operation, but for `exp`, sine and
//! cosine (`ops::math`'s polynomials, so that the row loops vectorise) and the order of the row
//! sums; `kernels/ops.cu` has the CUDA twin.

#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::math::{exp, sin_cos};
use super::{cpu_f32, Isa};

/// What [`angular_cross_entropy`] writes per row: the row's loss, the negatives the filter
/// removed, the row's largest logit and its sum of `exp(logit - max)` (the backward's softmax).
pub const ROW_OUTPUTS: usize = 4;

/// One term of the objective over `cos` `[rows, cols]`, whose row `i` is positive with column
/// `row_offset + i`.
#[derive(Debug, Clone)]
pub struct AngularTerm {
    pub temp: f64,
    /// The angular margin of negatives beyond it (0: plain InfoNCE): `m`, or with `similarity`
    /// the base of `m_ij = (1 - s_ij) * m`.
    pub margin: f64,
    /// The teacher's similarity `s` `[rows, cols]` of the adaptive margin (no gradient).
    pub similarity: Option<Tensor>,
    /// The filter's scores `[rows, cols]` and its threshold: negatives scored above it leave
    /// the softmax (no gradient).
    pub filter: Option<(Tensor, f64)>,
    pub row_offset: usize,
}

/// Cosines are clamped to this distance from +-1 before the angle is taken (acos has an infinite
/// derivative at +-1).
pub const COS_CLAMP: f64 = 1e-6;
/// What the reference adds to a filtered negative's logit: it drops out of the softmax.
pub const MASKED_LOGIT: f64 = -99999.99;

/// Whether [`angular_cross_entropy`] has a kernel for `cos` and the term's matrices: f32 on the
/// CPU or on CUDA.
pub fn angular_cross_entropy_serves(cos: &Tensor, term: &AngularTerm) -> bool {
    let on_device = |t: &Tensor| t.dtype() == DType::F32 && t.device().same_device(cos.device());
    (cos.device().is_cpu() || cos.device().is_cuda())
        && on_device(cos)
        && term.similarity.iter().chain(term.filter.iter().map(|(s, _)| s)).all(on_device)
}

/// The term's [`ROW_OUTPUTS`] per row, `[rows, 4]`: differentiable in `cos` through the loss
/// column.
pub fn angular_cross_entropy(cos: &Tensor, term: &AngularTerm) -> Result<Tensor> {
    let contiguous = |t: &Option<Tensor>| t.as_ref().map(Tensor::contiguous).transpose();
    let term = AngularTerm {
        similarity: contiguous(&term.similarity)?,
        filter: match &term.filter {
            Some((scores, threshold)) => Some((scores.contiguous()?, *threshold)),
            None => None,
        },
        ..term.clone()
    };
    cos.contiguous()?.apply_op1(Forward(term))
}

/// The scalars of a term as the kernels read them (`AngularTermParams` in `kernels/ops.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Params {
    rows: u32,
    cols: u32,
    row_offset: u32,
    adaptive: u32,
    filtered: u32,
    inv_temp: f32,
    lo: f32,
    hi: f32,
    /// Negatives whose cosine is below it get the margin (`cos(m)`; -2, below every clamped
    /// cosine, when the margin is 0).
    gate_below: f32,
    base: f32,
    cos_m: f32,
    sin_m: f32,
    threshold: f32,
    masked_logit: f32,
}

#[cfg(feature = "cuda")]
// SAFETY: a `#[repr(C)]` struct of 4-byte scalars, passed by value as the kernel's struct.
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for Params {}

impl Params {
    fn new(term: &AngularTerm, cos: &Layout) -> Result<Self> {
        let (rows, cols) = cos.shape().dims2()?;
        if term.row_offset + rows > cols {
            candle_core::bail!(
                "angular cross-entropy: {rows} rows from column {} of {cols}",
                term.row_offset
            );
        }
        for (what, t) in
            [("similarity", &term.similarity), ("filter scores", &term.filter.as_ref().map(|f| f.0.clone()))]
        {
            if let Some(t) = t {
                if t.dims() != [rows, cols] {
                    candle_core::bail!(
                        "angular cross-entropy: {what} {:?} for cosines {:?}",
                        t.dims(),
                        [rows, cols]
                    );
                }
            }
        }
        let margin = term.margin;
        Ok(Self {
            rows: rows as u32,
            cols: cols as u32,
            row_offset: term.row_offset as u32,
            adaptive: (term.similarity.is_some() && margin != 0.0) as u32,
            filtered: term.filter.is_some() as u32,
            inv_temp: (1.0 / term.temp) as f32,
            lo: (-1.0 + COS_CLAMP) as f32,
            hi: (1.0 - COS_CLAMP) as f32,
            gate_below: if margin == 0.0 { -2.0 } else { margin.cos() as f32 },
            base: margin as f32,
            cos_m: margin.cos() as f32,
            sin_m: margin.sin() as f32,
            threshold: term.filter.as_ref().map_or(0.0, |f| f.1 as f32),
            masked_logit: MASKED_LOGIT as f32,
        })
    }

    /// The logit of cosine `c` (its similarity `s`, filter score `score`) and its derivative in
    /// `c`; `positive` at the row's target column. Branch-free (selects, no calls), so that the
    /// loops over a row vectorise; `ADAPTIVE` is `self.adaptive`, fixed per loop so that a fixed
    /// margin computes no sines.
    #[inline(always)]
    fn logit<const ADAPTIVE: bool>(&self, c: f32, s: f32, score: f32, positive: bool) -> (f32, f32) {
        // torch.clamp: a bound takes no gradient.
        let inside = c >= self.lo && c <= self.hi;
        let c = c.max(self.lo).min(self.hi);
        let (sin_m, cos_m) = if ADAPTIVE { sin_cos((1.0 - s) * self.base) } else { (self.sin_m, self.cos_m) };
        // theta > m  <=>  cos(theta) < cos(m); cos(theta - m) = cos cos(m) + sin sin(m).
        let gated = !positive && c < self.gate_below;
        let sin_theta = (1.0 - c * c).sqrt();
        let shifted = c + (c * cos_m + sin_theta * sin_m - c);
        let d_shifted = cos_m - c / sin_theta * sin_m;
        let logit = if gated { shifted } else { c } * self.inv_temp;
        let slope = if inside { self.inv_temp } else { 0.0 } * if gated { d_shifted } else { 1.0 };
        let removed = self.filtered != 0 && !positive && score > self.threshold;
        (if removed { logit + self.masked_logit } else { logit }, slope)
    }

    /// Row `i` into `out`: `f(logit, slope, positive)` for each column; returns how many
    /// negatives the filter removed. Absent matrices read the cosines in their place (unused).
    #[inline(always)]
    fn row<T>(
        &self,
        i: usize,
        matrices: [&[f32]; 3],
        out: &mut [T],
        f: impl Fn(f32, f32, bool) -> T,
    ) -> usize {
        match self.adaptive != 0 {
            true => self.row_with::<true, T>(i, matrices, out, f),
            false => self.row_with::<false, T>(i, matrices, out, f),
        }
    }

    #[inline(always)]
    fn row_with<const ADAPTIVE: bool, T>(
        &self,
        i: usize,
        [cos, s, scores]: [&[f32]; 3],
        out: &mut [T],
        f: impl Fn(f32, f32, bool) -> T,
    ) -> usize {
        let (cols, target) = (self.cols as usize, self.row_offset as usize + i);
        let cos = &cos[i * cols..][..cols];
        let (s, scores) = (row_of(s, i, cols).unwrap_or(cos), row_of(scores, i, cols).unwrap_or(cos));
        let mut removed = 0u32;
        for (j, (out, ((&c, &s), &score))) in out.iter_mut().zip(cos.iter().zip(s).zip(scores)).enumerate() {
            let positive = j == target;
            let (logit, slope) = self.logit::<ADAPTIVE>(c, s, score, positive);
            removed += (self.filtered != 0 && !positive && score > self.threshold) as u32;
            *out = f(logit, slope, positive);
        }
        removed as usize
    }
}

/// Lanes of the kernels' row reductions: partial maxima and sums kept per lane, in a fixed order,
/// so that they vectorise and every vector width adds in the same order.
const LANES: usize = 16;

/// The largest of `xs` and the sum of `exp(x - largest)`; element `k` goes to lane `k % LANES`.
#[inline(always)]
fn max_and_sum_exp(xs: &[f32]) -> (f32, f32) {
    let (chunks, rest) = (xs.chunks_exact(LANES), xs.chunks_exact(LANES).remainder());
    let mut lanes = [f32::NEG_INFINITY; LANES];
    for chunk in chunks.clone() {
        lanes.iter_mut().zip(chunk).for_each(|(l, &x)| *l = l.max(x));
    }
    lanes.iter_mut().zip(rest).for_each(|(l, &x)| *l = l.max(x));
    let max = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sums = [0f32; LANES];
    for chunk in chunks {
        sums.iter_mut().zip(chunk).for_each(|(s, &x)| *s += exp(x - max));
    }
    sums.iter_mut().zip(rest).for_each(|(s, &x)| *s += exp(x - max));
    (max, sums.iter().sum())
}

/// Row `i` of a `[rows, cols]` matrix, `None` for an absent (empty) one.
#[inline(always)]
fn row_of(matrix: &[f32], i: usize, cols: usize) -> Option<&[f32]> {
    (!matrix.is_empty()).then(|| &matrix[i * cols..][..cols])
}

/// A teacher matrix of a term, read-locked for a kernel.
type Locked<'a> = Option<(candle_core::StorageRef<'a>, &'a Layout)>;

/// The term's similarity and filter scores, read-locked (absent ones `None`).
fn lock(term: &AngularTerm) -> [Locked<'_>; 2] {
    [term.similarity.as_ref(), term.filter.as_ref().map(|f| &f.0)].map(|t| t.map(Tensor::storage_and_layout))
}

/// A locked matrix's CPU data (empty when absent).
fn cpu_data<'b>(locked: &'b Locked<'_>, op: &str) -> Result<&'b [f32]> {
    match locked {
        None => Ok(&[]),
        Some((storage, layout)) => match &**storage {
            Storage::Cpu(storage) => cpu_f32(storage, layout, op),
            _ => candle_core::bail!("{op}: a teacher matrix on another device"),
        },
    }
}

/// A locked matrix's CUDA data, or `cos` in its place when absent (never read: the flags say so).
#[cfg(feature = "cuda")]
fn cuda_data<'b>(
    locked: &'b Locked<'_>,
    cos: &candle_core::cuda_backend::cudarc::driver::CudaView<'b, f32>,
    op: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'b, f32>> {
    match locked {
        None => Ok(cos.slice(..)),
        Some((storage, layout)) => match &**storage {
            Storage::Cuda(storage) => super::cuda::input(storage, layout, op),
            _ => candle_core::bail!("{op}: a teacher matrix on another device"),
        },
    }
}

struct Forward(AngularTerm);

impl CustomOp1 for Forward {
    fn name(&self) -> &'static str {
        "kdmcse-angular-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let params = Params::new(&self.0, layout)?;
        let cos = cpu_f32(storage, layout, self.name())?;
        let locked = lock(&self.0);
        let [s, scores] = [cpu_data(&locked[0], self.name())?, cpu_data(&locked[1], self.name())?];
        let cols = params.cols as usize;
        let (mut out, isa) = (vec![0f32; params.rows as usize * ROW_OUTPUTS], Isa::selected());
        out.par_chunks_mut(ROW_OUTPUTS).enumerate().for_each_init(
            || vec![0f32; cols],
            |logits, (i, out)| {
                isa.run(
                    #[inline(always)]
                    || {
                        let removed = params.row(i, [cos, s, scores], logits, |logit, _, _| logit);
                        let (max, sum) = max_and_sum_exp(logits);
                        // candle-nn's log_softmax, then the negative log-likelihood of the target.
                        let target = params.row_offset as usize + i;
                        out.copy_from_slice(&[
                            -((logits[target] - max) - sum.ln()),
                            removed as f32,
                            max,
                            sum,
                        ]);
                    },
                )
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((params.rows as usize, ROW_OUTPUTS))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let params = Params::new(&self.0, layout)?;
        let (rows, cols) = (params.rows as usize, params.cols as usize);
        let cos = super::cuda::input(storage, layout, self.name())?;
        let locked = lock(&self.0);
        let (s, scores) =
            (cuda_data(&locked[0], &cos, self.name())?, cuda_data(&locked[1], &cos, self.name())?);
        let mut out = unsafe { storage.device.alloc::<f32>(rows * ROW_OUTPUTS)? };
        let func =
            crate::kernels::Kernel::load(&storage.device, crate::kernels::OPS, "angular_cross_entropy")?;
        let mut args = func.args();
        args.arg(&cos).arg(&s).arg(&scores).arg(&mut out).arg(&params);
        // SAFETY: the arguments follow the kernel's signature in ops.cu; buffers hold its elements.
        unsafe { func.launch(args, super::cuda::rows(rows, cols))? };
        Ok((super::cuda::output(out, &storage.device), Shape::from((rows, ROW_OUTPUTS))))
    }

    fn bwd(&self, cos: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(cos.apply_op3_no_bwd(res, &grad.contiguous()?, &Backward(self.0.clone()))?))
    }
}

/// The cosines' gradient: `(cos, forward output, its gradient)` in, `[rows, cols]` out. Only
/// the loss column's gradient counts (the others are counts and softmax statistics).
struct Backward(AngularTerm);

impl CustomOp3 for Backward {
    fn name(&self) -> &'static str {
        "kdmcse-angular-cross-entropy-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let params = Params::new(&self.0, l1)?;
        let (cos, forward, grad) = (cpu_f32(s1, l1, name)?, cpu_f32(s2, l2, name)?, cpu_f32(s3, l3, name)?);
        let locked = lock(&self.0);
        let [s, scores] = [cpu_data(&locked[0], name)?, cpu_data(&locked[1], name)?];
        // SAFETY: `row` writes every column of the row.
        let out = unsafe {
            super::written_in_pieces(
                cos.len(),
                params.cols as usize,
                #[inline(always)]
                |i: usize, dst: &mut [std::mem::MaybeUninit<f32>]| {
                    let [_, _, max, sum] = forward[i * ROW_OUTPUTS..][..ROW_OUTPUTS] else { unreachable!() };
                    let (g, inv_sum) = (grad[i * ROW_OUTPUTS], 1.0 / sum);
                    params.row(i, [cos, s, scores], dst, |logit, slope, positive| {
                        let p = exp(logit - max) * inv_sum;
                        std::mem::MaybeUninit::new(g * (p - positive as u32 as f32) * slope)
                    });
                },
            )
        };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let name = self.name();
        let params = Params::new(&self.0, l1)?;
        let (rows, cols) = (params.rows as usize, params.cols as usize);
        let cos = super::cuda::input(s1, l1, name)?;
        let (forward, grad) = (super::cuda::input(s2, l2, name)?, super::cuda::input(s3, l3, name)?);
        let locked = lock(&self.0);
        let (s, scores) = (cuda_data(&locked[0], &cos, name)?, cuda_data(&locked[1], &cos, name)?);
        let mut out = unsafe { s1.device.alloc::<f32>(rows * cols)? };
        let func =
            crate::kernels::Kernel::load(&s1.device, crate::kernels::OPS, "angular_cross_entropy_backward")?;
        let mut args = func.args();
        args.arg(&cos).arg(&s).arg(&scores).arg(&forward).arg(&grad).arg(&mut out).arg(&params);
        // SAFETY: the arguments follow the kernel's signature in ops.cu; buffers hold its elements.
        unsafe { func.launch(args, super::cuda::rows(rows, cols))? };
        Ok((super::cuda::output(out, &s1.device), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    //! The kernels against `crate::loss::angular_infonce_composed` live in `loss.rs`; here, the
    //! CUDA twins (kernels/ops.cu built for the host, run with the launches' block shapes)
    //! against the CPU kernels.

    use super::*;
    use crate::kernels::host::assert_close;
    use candle_core::Device;

    const MAIN: &str = r#"
// argv: grid, block; stdin: the params, cos, similarity, scores, the loss rows' gradient.
int main(int argc, char **argv) {
    unsigned grid = atoi(argv[1]), block = atoi(argv[2]);
    AngularTermParams p;
    auto raw = read(sizeof p / 4);
    memcpy(&p, raw.data(), sizeof p);
    size_t n = (size_t)p.rows * p.cols;
    auto cos = read(n), s = read(n), scores = read(n), grad = read((size_t)p.rows * 4);
    std::vector<float> out((size_t)p.rows * 4), dcos(n);
    const float *c = cos.data(), *sp = s.data(), *scp = scores.data(), *g = grad.data();
    float *o = out.data(), *d = dcos.data();
    launch(grid, block, [&] { angular_cross_entropy(c, sp, scp, o, p); });
    launch(grid, block, [&] { angular_cross_entropy_backward(c, sp, scp, o, g, d, p); });
    print(out); print(dcos);
}
"#;

    /// Both CUDA kernels compute what the CPU kernels do: fixed and adaptive margins, with and
    /// without the filter, rows from an offset; 40 columns (a 64-thread block with idle threads)
    /// and 300 (256 threads striding over each row); two blocks for seven rows (grid-stride).
    #[test]
    fn cuda_kernels_compute_the_cpu_kernels() {
        let dir = tempfile::tempdir().unwrap();
        let exe = crate::kernels::host::compile(dir.path(), crate::kernels::OPS, MAIN);
        let device = Device::Cpu;
        for (cols, adaptive, filtered, grid) in
            [(40, true, true, None), (300, false, false, None), (300, true, true, Some(2))]
        {
            let rows = 7;
            let what = format!("{cols} columns, adaptive {adaptive}, filtered {filtered}, grid {grid:?}");
            let uniform = |lo: f32, hi: f32| Tensor::rand(lo, hi, (rows, cols), &device).unwrap();
            let (cos, s, scores) = (uniform(-1.0, 1.0), uniform(-1.0, 1.0), uniform(0.0, 1.0));
            let term = AngularTerm {
                temp: 0.05,
                margin: 0.15,
                similarity: adaptive.then(|| s.clone()),
                filter: filtered.then(|| (scores.clone(), 0.7)),
                row_offset: 3,
            };
            let forward = cos.apply_op1_no_bwd(&Forward(term.clone())).unwrap();
            let grad = Tensor::rand(-1f32, 1.0, (rows, ROW_OUTPUTS), &device).unwrap();
            let backward = cos.apply_op3_no_bwd(&forward, &grad, &Backward(term.clone())).unwrap();
            let params = Params::new(&term, cos.layout()).unwrap();
            // SAFETY: `Params` is 14 four-byte scalars; their bits travel as f32s.
            let mut input = unsafe { std::mem::transmute::<Params, [f32; 14]>(params) }.to_vec();
            for t in [&cos, &s, &scores, &grad] {
                input.extend(t.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            }
            let (blocks, threads) = crate::ops::launch::rows(rows, cols);
            let args = [grid.unwrap_or(blocks).to_string(), threads.to_string()];
            let host = crate::kernels::host::run(&exe, &args, &input);
            let (host_forward, host_backward) = host.split_at(rows * ROW_OUTPUTS);
            assert_close(host_forward, &forward, &format!("forward, {what}"));
            assert_close(host_backward, &backward, &format!("backward, {what}"));
        }
    }
}
