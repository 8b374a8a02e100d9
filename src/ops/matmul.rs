//! Matrix products, with their backward, on the CPU without what candle's matmul spends around
//! gemm: its output is zero-filled before gemm overwrites it; a batch of small products (attention
//! has batch x heads of them) runs one after another, each on every thread, where one product per
//! thread keeps all cores busy; and a linear layer's bias is a second pass over the output instead
//! of gemm's epilogue. bf16 operands are multiplied on AMX tiles where the CPU has them
//! ([`Isa::Amx`]), elsewhere widened (exactly) and multiplied in f32; either way the sums are
//! f32's, rounded once to bf16: PyTorch's bf16 matmul with fp32 accumulation. Other devices and
//! dtypes: candle's matmul.

#[cfg(target_arch = "x86_64")]
mod amx;

use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use half::bf16;
use rayon::prelude::*;

use super::cast::{convert, cpu_kernels_take as serves, Element};
use super::Isa;

#[cfg(target_arch = "x86_64")]
pub(super) use amx::usable as amx_usable;

/// `lhs [..., m, k] x rhs [..., k, n]` over equal batch dimensions; either operand may be a
/// strided view (a transpose, attention's heads split from the hidden dimension): on the CPU it is
/// read in place, elsewhere copied where candle's matmul needs it.
pub fn matmul(lhs: &Tensor, rhs: &Tensor) -> Result<Tensor> {
    if serves(lhs) && rhs.dtype() == lhs.dtype() {
        lhs.apply_op2(rhs, Matmul { merge_heads: false })
    } else {
        let batch_contiguous = |t: &Tensor| -> Result<Tensor> {
            let (dims, stride) = (t.dims(), t.stride());
            let rank = dims.len();
            let collapses =
                (0..rank.saturating_sub(3)).all(|i| dims[i] == 1 || stride[i] == stride[i + 1] * dims[i + 1]);
            if collapses {
                Ok(t.clone())
            } else {
                t.contiguous()
            }
        };
        batch_contiguous(lhs)?.matmul(&batch_contiguous(rhs)?)
    }
}

/// `lhs [batch, heads, m, k] x rhs [batch, heads, k, n]` with the heads merged into the last
/// dimension, `[batch, m, heads * n]`: attention's context (and its gradients) written straight
/// into the hidden layout, where a plain product would be followed by a transposing copy.
pub fn matmul_merge_heads(lhs: &Tensor, rhs: &Tensor) -> Result<Tensor> {
    if serves(lhs) && rhs.dtype() == lhs.dtype() {
        lhs.apply_op2(rhs, Matmul { merge_heads: true })
    } else {
        let (batch, heads, m, _) = lhs.dims4()?;
        matmul(lhs, rhs)?.transpose(1, 2)?.reshape((batch, m, heads * rhs.dim(3)?))
    }
}

/// `xs [n, in] x weight [out, in]^T + bias [out]`.
pub fn linear(xs: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if serves(xs) && weight.dtype() == xs.dtype() && bias.dtype() == xs.dtype() {
        xs.apply_op3(weight, bias, Linear)
    } else {
        xs.matmul(&weight.t()?)?.broadcast_add(bias)
    }
}

/// The sum of the rows of `xs` `[n, d]`, as the product `ones [1, n] x xs` (gemm reads the rows
/// in place on every thread; a reduction over the first dimension would stride through them on one).
pub fn sum_rows(xs: &Tensor) -> Result<Tensor> {
    let ones = Tensor::ones((1, xs.dim(0)?), xs.dtype(), xs.device())?;
    matmul(&ones, xs)?.squeeze(0)
}

/// A product, its heads merged into the last dimension of the output or not.
struct Matmul {
    merge_heads: bool,
}

impl CustomOp2 for Matmul {
    fn name(&self) -> &'static str {
        if self.merge_heads {
            "kdmcse-matmul-merge-heads"
        } else {
            "kdmcse-matmul"
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        product((s1, l1), (s2, l2), None, self.merge_heads, self.name())
    }

    fn bwd(
        &self,
        lhs: &Tensor,
        rhs: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = if self.merge_heads {
            let (batch, heads, m, _) = lhs.dims4()?;
            grad.reshape((batch, m, heads, rhs.dim(3)?))?.transpose(1, 2)?
        } else {
            grad.clone()
        };
        Ok((Some(matmul(&grad, &rhs.t()?)?), Some(matmul(&lhs.t()?, &grad)?)))
    }
}

struct Linear;

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "kdmcse-linear"
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
        let (bias, l3) = as_f32(s3, l3, name)?;
        let Some((bias_start, bias_end)) = l3.contiguous_offsets() else {
            candle_core::bail!("{name}: the bias must be contiguous")
        };
        let bias = &bias[bias_start..bias_end];
        let (out_dim, in_dim) = (l2.dims()[0], l2.dims()[1]);
        if l1.dims().len() != 2 || l2.dims().len() != 2 || l1.dims()[1] != in_dim || bias.len() != out_dim {
            candle_core::bail!("{name}: xs {:?}, weight {:?}, bias {}", l1.dims(), l2.dims(), bias.len());
        }
        product((s1, l1), (s2, &l2.transpose(0, 1)?), Some(bias), false, name)
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((Some(matmul(grad, weight)?), Some(matmul(&grad.t()?, xs)?), Some(sum_rows(grad)?)))
    }
}

/// `lhs x rhs` (+ `bias`), as [`gemm_into`] lays it out, in the operands' dtype: bf16 operands
/// on AMX tiles where [`Isa::Amx`] is selected, otherwise widened to f32, through gemm and
/// rounded.
fn product(
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    bias: Option<&[f32]>,
    merge_heads: bool,
    op: &str,
) -> Result<(CpuStorage, Shape)> {
    match (s1, s2) {
        #[cfg(target_arch = "x86_64")]
        (CpuStorage::BF16(lhs), CpuStorage::BF16(rhs)) if Isa::selected() == Isa::Amx => {
            let (out, shape) = gemm_into(lhs, l1, rhs, l2, bias, merge_heads)?;
            Ok((bf16::storage(out), shape))
        }
        _ => {
            let ((lhs, l1), (rhs, l2)) = (as_f32(s1, l1, op)?, as_f32(s2, l2, op)?);
            let (out, shape) = gemm_into(&lhs, &l1, &rhs, &l2, bias, merge_heads)?;
            Ok((in_dtype_of(s1, out), shape))
        }
    }
}

/// A product's operand as f32, with the layout to read it through: f32 as it is; bf16 widened
/// (exactly) over the elements the layout reaches, the layout moved onto the copy.
fn as_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<(Cow<'a, [f32]>, Layout)> {
    match storage {
        CpuStorage::F32(data) => Ok((Cow::Borrowed(data), layout.clone())),
        CpuStorage::BF16(data) => {
            let reach = match layout.shape().elem_count() {
                0 => 0,
                _ => 1 + layout.dims().iter().zip(layout.stride()).map(|(d, s)| (d - 1) * s).sum::<usize>(),
            };
            let start = layout.start_offset();
            let widened = convert::<bf16, f32>(&data[start..start + reach]);
            Ok((Cow::Owned(widened), Layout::new(layout.shape().clone(), layout.stride().to_vec(), 0)))
        }
        _ => candle_core::bail!("{op}: expected f32 or bf16 input, got {:?}", storage.dtype()),
    }
}

/// A product computed in f32, in the dtype of its (first) input's storage.
fn in_dtype_of(input: &CpuStorage, out: Vec<f32>) -> CpuStorage {
    match input {
        CpuStorage::BF16(_) => bf16::storage(convert::<f32, bf16>(&out)),
        _ => CpuStorage::F32(out),
    }
}

/// A matrix operand: its data from the layout's start, its batch dimensions with their strides,
/// its row and column strides.
struct Operand<'a, T> {
    data: &'a [T],
    batch: Vec<(usize, usize)>,
    row_stride: usize,
    col_stride: usize,
}

impl<'a, T> Operand<'a, T> {
    /// `data` seen through `layout` `[batch dims..., rows, cols]`, with any strides; returns the
    /// operand, its batch count, rows and columns.
    fn new(data: &'a [T], layout: &Layout, op: &str) -> Result<(Self, usize, usize, usize)> {
        let (dims, stride) = (layout.dims(), layout.stride());
        let rank = dims.len();
        if rank < 2 {
            candle_core::bail!("{op}: operand of rank {rank}");
        }
        let operand = Self {
            data: &data[layout.start_offset()..],
            batch: dims[..rank - 2].iter().copied().zip(stride[..rank - 2].iter().copied()).collect(),
            row_stride: stride[rank - 2],
            col_stride: stride[rank - 1],
        };
        Ok((operand, dims[..rank - 2].iter().product(), dims[rank - 2], dims[rank - 1]))
    }

    /// The offset of matrix `index` of the batch (row-major over the batch dimensions).
    fn offset(&self, mut index: usize) -> usize {
        let mut offset = 0;
        for &(dim, stride) in self.batch.iter().rev() {
            offset += (index % dim) * stride;
            index /= dim;
        }
        offset
    }

    /// Matrix `index` of the batch.
    fn matrix(&self, index: usize) -> Strided<T> {
        // SAFETY: the offset is within the data the layout reaches.
        let data = unsafe { self.data.as_ptr().add(self.offset(index)) };
        Strided { data, row_stride: self.row_stride, col_stride: self.col_stride }
    }
}

/// One matrix of an operand: element `(r, c)` at `data[r * row_stride + c * col_stride]`.
#[derive(Clone, Copy)]
struct Strided<T> {
    data: *const T,
    row_stride: usize,
    col_stride: usize,
}

/// Where one product goes: row `r` at `data + r * row_stride`.
#[derive(Clone, Copy)]
struct Output<T> {
    data: *mut T,
    row_stride: usize,
}

// SAFETY: a product's pointers are only read (its operands) or written in blocks no one else
// touches (its output) while the product runs.
unsafe impl<T> Send for Strided<T> {}
unsafe impl<T> Sync for Strided<T> {}
unsafe impl<T> Send for Output<T> {}
unsafe impl<T> Sync for Output<T> {}

/// An element type the products multiply, summing in f32 and writing their own type.
trait Factor: Copy + Sync {
    /// `out = a [m x k] x b [k x n] (+ bias on every row)`, on `parallelism`'s threads.
    ///
    /// # Safety
    /// `a` and `b` reach `m x k` and `k x n` readable elements, `out` `m` rows of `n` writable
    /// ones no one else touches meanwhile; `bias` has `n`.
    unsafe fn product(
        dims: (usize, usize, usize),
        a: Strided<Self>,
        b: Strided<Self>,
        out: Output<Self>,
        bias: Option<&[f32]>,
        parallelism: Parallelism,
    );
}

impl Factor for f32 {
    /// gemm, onto the bias where there is one (its epilogue has none).
    unsafe fn product(
        (m, n, k): (usize, usize, usize),
        a: Strided<f32>,
        b: Strided<f32>,
        out: Output<f32>,
        bias: Option<&[f32]>,
        parallelism: Parallelism,
    ) {
        // SAFETY: the caller's promise covers the rows filled and gemm's reads and writes.
        unsafe {
            if let Some(bias) = bias {
                for r in 0..m {
                    std::ptr::copy_nonoverlapping(bias.as_ptr(), out.data.add(r * out.row_stride), n);
                }
            }
            gemm::gemm(
                m,
                n,
                k,
                out.data,
                1,
                out.row_stride as isize,
                bias.is_some(),
                a.data,
                a.col_stride as isize,
                a.row_stride as isize,
                b.data,
                b.col_stride as isize,
                b.row_stride as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            )
        }
    }
}

/// On AMX tiles: only called where [`Isa::Amx`] is selected (or a test checked [`amx::usable`]).
#[cfg(target_arch = "x86_64")]
impl Factor for bf16 {
    unsafe fn product(
        dims: (usize, usize, usize),
        a: Strided<bf16>,
        b: Strided<bf16>,
        out: Output<bf16>,
        bias: Option<&[f32]>,
        parallelism: Parallelism,
    ) {
        let bits = |x: Strided<bf16>| Strided {
            data: x.data as *const u16,
            row_stride: x.row_stride,
            col_stride: x.col_stride,
        };
        let out = Output { data: out.data as *mut u16, row_stride: out.row_stride };
        let parallel = !matches!(parallelism, Parallelism::None);
        // SAFETY: the caller's promise, and bf16 is its bits.
        unsafe { amx::product(dims, bits(a), bits(b), out, bias, parallel) }
    }
}

/// `lhs x rhs` (+ `bias` on every row) into a new contiguous buffer `[batch dims..., m, n]`, or
/// with `merge_heads` (batch dims `[batch, heads]`) `[batch, m, heads * n]`.
fn gemm_into<T: Factor>(
    lhs: &[T],
    lhs_layout: &Layout,
    rhs: &[T],
    rhs_layout: &Layout,
    bias: Option<&[f32]>,
    merge_heads: bool,
) -> Result<(Vec<T>, Shape)> {
    let op = "kdmcse-matmul";
    let (a, batch, m, k) = Operand::new(lhs, lhs_layout, op)?;
    let (b, rhs_batch, k2, n) = Operand::new(rhs, rhs_layout, op)?;
    let batch_dims = &lhs_layout.dims()[..lhs_layout.dims().len() - 2];
    if k != k2 || batch != rhs_batch || batch_dims != &rhs_layout.dims()[..rhs_layout.dims().len() - 2] {
        candle_core::bail!("{op}: shapes {:?} x {:?}", lhs_layout.dims(), rhs_layout.dims());
    }
    let mut out: Vec<T> = Vec::with_capacity(batch * m * n);
    let dst_address = out.spare_capacity_mut().as_mut_ptr() as usize;
    let heads = match batch_dims {
        [_, heads] if merge_heads => *heads,
        _ if merge_heads => {
            candle_core::bail!("{op}: merging heads needs [batch, heads, m, k], got {batch_dims:?}")
        }
        _ => 1,
    };
    // Product `index` = (example, head) starts at example * m * heads * n + head * n, rows
    // heads * n apart; without merging, heads is 1: products one after another.
    let dst_offset = |index: usize| (index / heads) * m * heads * n + (index % heads) * n;
    let dst_row_stride = heads * n;
    let threads = rayon::current_num_threads();
    let product = |index: usize, dst: usize, parallelism: Parallelism| {
        // SAFETY: the operands' strides and extents come from their layouts, which candle checked
        // against their storage; `dst` holds `batch * m * n` elements, of which each product
        // writes its own `m x n` block.
        unsafe {
            let out = Output { data: (dst as *mut T).add(dst_offset(index)), row_stride: dst_row_stride };
            T::product((m, n, k), a.matrix(index), b.matrix(index), out, bias, parallelism)
        }
    };
    if batch >= threads && threads > 1 {
        (0..batch).into_par_iter().for_each(|i| product(i, dst_address, Parallelism::None));
    } else {
        let parallelism = if threads > 1 { Parallelism::Rayon(threads) } else { Parallelism::None };
        (0..batch).for_each(|i| product(i, dst_address, parallelism));
    }
    // SAFETY: the products wrote every one of the `batch * m * n` elements.
    unsafe { out.set_len(batch * m * n) };
    let dims = match batch_dims {
        [examples, heads] if merge_heads => vec![*examples, m, heads * n],
        _ => batch_dims.iter().copied().chain([m, n]).collect(),
    };
    Ok((out, Shape::from(dims)))
}

#[cfg(test)]
mod tests {
    use super::super::max_diff;
    use super::*;
    use candle_core::{Device, Var};

    /// The products, plain and through transposed views, one matrix and batches (one product per
    /// thread), with their gradients, against candle's matmul.
    #[test]
    fn products_and_gradients_match_candle() {
        let device = Device::Cpu;
        let randn = |dims: &[usize]| Tensor::randn(0f32, 1.0, dims, &device).unwrap();
        for (lhs_dims, rhs_dims, transpose_rhs) in [
            (vec![7, 5], vec![5, 3], false),
            (vec![7, 5], vec![3, 5], true),
            (vec![2, 3, 4, 6], vec![2, 3, 6, 5], false),
            (vec![2, 3, 4, 6], vec![2, 3, 4, 6], true),
        ] {
            let (lhs, rhs) =
                (Var::from_tensor(&randn(&lhs_dims)).unwrap(), Var::from_tensor(&randn(&rhs_dims)).unwrap());
            let rank = rhs_dims.len();
            let rhs_view = if transpose_rhs { rhs.t().unwrap() } else { rhs.as_tensor().clone() };
            let (ours, theirs) = (matmul(&lhs, &rhs_view).unwrap(), lhs.matmul(&rhs_view).unwrap());
            assert_eq!(ours.dims(), theirs.dims());
            assert!(
                max_diff(&ours, &theirs) < 1e-5,
                "{lhs_dims:?} x {rhs_dims:?} (transposed: {transpose_rhs})"
            );
            let probe = randn(ours.dims());
            let g_ours = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g_theirs = (theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            for var in [&lhs, &rhs] {
                let (a, b) = (g_ours.get(var).unwrap(), g_theirs.get(var).unwrap());
                assert!(max_diff(a, b) < 1e-5, "gradient, {lhs_dims:?} x {rhs_dims:?} (rank {rank})");
            }
        }
        // Heads split from the hidden dimension: batch dimensions that do not collapse.
        let split = Var::from_tensor(&randn(&[2, 4, 3, 6])).unwrap();
        let heads = split.transpose(1, 2).unwrap();
        let rhs = randn(&[2, 3, 6, 5]);
        let (ours, theirs) =
            (matmul(&heads, &rhs).unwrap(), heads.contiguous().unwrap().matmul(&rhs).unwrap());
        assert!(max_diff(&ours, &theirs) < 1e-5, "split heads");
        let g_ours = ours.sum_all().unwrap().backward().unwrap();
        let g_theirs = theirs.sum_all().unwrap().backward().unwrap();
        assert!(
            max_diff(g_ours.get(&split).unwrap(), g_theirs.get(&split).unwrap()) < 1e-5,
            "split heads gradient"
        );
        let theirs = heads.contiguous().unwrap().matmul(&rhs).unwrap().transpose(1, 2).unwrap();
        let (ours, theirs) = (matmul_merge_heads(&heads, &rhs).unwrap(), theirs.reshape((2, 4, 15)).unwrap());
        assert!(max_diff(&ours, &theirs) < 1e-5, "merged heads");
        let probe = randn(&[2, 4, 15]);
        let g_ours = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let g_theirs = (theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(
            max_diff(g_ours.get(&split).unwrap(), g_theirs.get(&split).unwrap()) < 1e-5,
            "merged heads gradient"
        );
        let (xs, weight, bias) = (randn(&[9, 6]), randn(&[4, 6]), randn(&[4]));
        let expected = xs.matmul(&weight.t().unwrap()).unwrap().broadcast_add(&bias).unwrap();
        assert!(max_diff(&linear(&xs, &weight, &bias).unwrap(), &expected) < 1e-5, "linear");
    }

    /// `lhs x rhs` (bf16 tensors, any views) on AMX tiles and widened through gemm.
    #[cfg(target_arch = "x86_64")]
    fn on_tiles_and_widened(
        lhs: &Tensor,
        rhs: &Tensor,
        bias: Option<&[f32]>,
        merge_heads: bool,
    ) -> [Vec<f32>; 2] {
        use candle_core::Storage;
        let ((lhs, l1), (rhs, l2)) = (lhs.storage_and_layout(), rhs.storage_and_layout());
        let (Storage::Cpu(s1), Storage::Cpu(s2)) = (&*lhs, &*rhs) else { panic!("CPU tensors") };
        let (CpuStorage::BF16(a), CpuStorage::BF16(b)) = (s1, s2) else { panic!("bf16 tensors") };
        let tiles = gemm_into(a, l1, b, l2, bias, merge_heads).unwrap().0;
        let ((a, l1), (b, l2)) = (as_f32(s1, l1, "test").unwrap(), as_f32(s2, l2, "test").unwrap());
        let widened = gemm_into(&a, &l1, &b, &l2, bias, merge_heads).unwrap().0;
        [
            tiles.iter().map(|x| x.to_f32()).collect(),
            convert::<f32, bf16>(&widened).iter().map(|x| x.to_f32()).collect(),
        ]
    }

    /// bf16 products on AMX tiles equal the widened f32 products rounded: exactly on small
    /// integers (any order of summing them is exact, so every element must land where it
    /// belongs), to a bf16 rounding on random values; every edge of the 16 x 32 tiles and
    /// 32 x 32 blocks, transposed operands, a bias, one product on all threads and batches of one
    /// per thread (plain, heads split from the hidden dimension, heads merged into it).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn amx_products_equal_the_widened_products() {
        if !amx::usable() {
            println!("this CPU has no AMX tiles: nothing to compare");
            return;
        }
        let device = Device::Cpu;
        let small_ints = |dims: &[usize], seed: usize| {
            let n: usize = dims.iter().product();
            let values: Vec<f32> = (0..n).map(|i| ((i * 7919 + seed * 104729) % 9) as f32 - 4.0).collect();
            Tensor::from_vec(values, dims, &device).unwrap().to_dtype(candle_core::DType::BF16).unwrap()
        };
        let randn = |dims: &[usize], _seed: usize| {
            Tensor::randn(0f32, 1.0, dims, &device).unwrap().to_dtype(candle_core::DType::BF16).unwrap()
        };
        let check = |[tiles, widened]: [Vec<f32>; 2], exact: bool, what: &str| {
            assert_eq!(tiles.len(), widened.len(), "{what}");
            let scale = widened.iter().fold(1f32, |m, x| m.max(x.abs()));
            for (i, (t, w)) in tiles.iter().zip(&widened).enumerate() {
                // Sums that differ in f32's last bits may round to neighbouring bf16 values.
                let ok = if exact {
                    t.to_bits() == w.to_bits()
                } else {
                    (t - w).abs() <= w.abs() / 128.0 + 1e-5 * scale
                };
                assert!(ok, "{what}: element {i}: tiles {t}, widened {w}");
            }
        };
        for (exact, values) in [(true, &small_ints as &dyn Fn(&[usize], usize) -> Tensor), (false, &randn)] {
            for (m, n, k) in
                [(1, 1, 1), (16, 16, 32), (17, 15, 31), (33, 47, 70), (100, 32, 33), (64, 70, 384)]
            {
                let (a, b, bt) = (values(&[m, k], 1), values(&[k, n], 2), values(&[n, k], 3));
                let at = values(&[k, m], 4);
                let what = format!("{m} x {k} x {n} (exact: {exact})");
                check(on_tiles_and_widened(&a, &b, None, false), exact, &what);
                check(
                    on_tiles_and_widened(&a, &bt.t().unwrap(), None, false),
                    exact,
                    &format!("{what}, rhs^T"),
                );
                check(
                    on_tiles_and_widened(&at.t().unwrap(), &b, None, false),
                    exact,
                    &format!("{what}, lhs^T"),
                );
                let bias: Vec<f32> = (0..n).map(|j| j as f32 - 3.0).collect();
                let linear = on_tiles_and_widened(&a, &bt.t().unwrap(), Some(&bias), false);
                check(linear, exact, &format!("{what}, bias"));
            }
            let (lhs, rhs) = (values(&[2, 3, 20, 40], 5), values(&[2, 3, 40, 18], 6));
            check(on_tiles_and_widened(&lhs, &rhs, None, false), exact, "batched");
            check(on_tiles_and_widened(&lhs, &rhs, None, true), exact, "merged heads");
            let split = values(&[2, 20, 3, 40], 7).transpose(1, 2).unwrap();
            check(on_tiles_and_widened(&split, &rhs, None, true), exact, "split heads, merged");
        }
    }
}
