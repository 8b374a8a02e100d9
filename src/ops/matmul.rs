//! Matrix products, with their backward, on the CPU without what candle's matmul spends around
//! gemm: its output is zero-filled before gemm overwrites it; a batch of small products (attention
//! has batch x heads of them) runs one after another, each on every thread, where one product per
//! thread keeps all cores busy; and a linear layer's bias is a second pass over the output instead
//! of gemm's epilogue. Other devices and dtypes: candle's matmul.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::fused;

/// `lhs [..., m, k] x rhs [..., k, n]` over equal batch dimensions; either operand may be a
/// strided view (a transpose, attention's heads split from the hidden dimension): on the CPU it is
/// read in place, elsewhere copied where candle's matmul needs it.
pub fn matmul(lhs: &Tensor, rhs: &Tensor) -> Result<Tensor> {
    if fused(lhs) && lhs.device().is_cpu() && rhs.dtype() == lhs.dtype() {
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
    if fused(lhs) && lhs.device().is_cpu() && rhs.dtype() == lhs.dtype() {
        lhs.apply_op2(rhs, Matmul { merge_heads: true })
    } else {
        let (batch, heads, m, _) = lhs.dims4()?;
        matmul(lhs, rhs)?.transpose(1, 2)?.reshape((batch, m, heads * rhs.dim(3)?))
    }
}

/// `xs [n, in] x weight [out, in]^T + bias [out]`.
pub fn linear(xs: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if fused(xs) && xs.device().is_cpu() && weight.dtype() == xs.dtype() && bias.dtype() == xs.dtype() {
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
        let (lhs, rhs) = (f32_data(s1, self.name())?, f32_data(s2, self.name())?);
        let (out, shape) = gemm_f32(lhs, l1, rhs, l2, None, self.merge_heads)?;
        Ok((CpuStorage::F32(out), shape))
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
        let (xs, weight) = (f32_data(s1, name)?, f32_data(s2, name)?);
        let bias = super::cpu_f32(s3, l3, name)?;
        let (out_dim, in_dim) = (l2.dims()[0], l2.dims()[1]);
        if l1.dims().len() != 2 || l2.dims().len() != 2 || l1.dims()[1] != in_dim || bias.len() != out_dim {
            candle_core::bail!("{name}: xs {:?}, weight {:?}, bias {}", l1.dims(), l2.dims(), bias.len());
        }
        let weight_t = l2.transpose(0, 1)?;
        let (out, shape) = gemm_f32(xs, l1, weight, &weight_t, Some(bias), false)?;
        Ok((CpuStorage::F32(out), shape))
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

fn f32_data<'a>(storage: &'a CpuStorage, op: &str) -> Result<&'a [f32]> {
    match storage {
        CpuStorage::F32(data) => Ok(data),
        _ => candle_core::bail!("{op}: expected f32 input"),
    }
}

/// A matrix operand: its data from the layout's start, its batch dimensions with their strides,
/// its row and column strides.
struct Operand<'a> {
    data: &'a [f32],
    batch: Vec<(usize, usize)>,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Operand<'a> {
    /// `data` seen through `layout` `[batch dims..., rows, cols]`, with any strides; returns the
    /// operand, its batch count, rows and columns.
    fn new(data: &'a [f32], layout: &Layout, op: &str) -> Result<(Self, usize, usize, usize)> {
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
}

/// `lhs x rhs` (+ `bias` on every row) into a new contiguous buffer `[batch dims..., m, n]`, or
/// with `merge_heads` (batch dims `[batch, heads]`) `[batch, m, heads * n]`.
fn gemm_f32(
    lhs: &[f32],
    lhs_layout: &Layout,
    rhs: &[f32],
    rhs_layout: &Layout,
    bias: Option<&[f32]>,
    merge_heads: bool,
) -> Result<(Vec<f32>, Shape)> {
    let op = "kdmcse-matmul";
    let (a, batch, m, k) = Operand::new(lhs, lhs_layout, op)?;
    let (b, rhs_batch, k2, n) = Operand::new(rhs, rhs_layout, op)?;
    let batch_dims = &lhs_layout.dims()[..lhs_layout.dims().len() - 2];
    if k != k2 || batch != rhs_batch || batch_dims != &rhs_layout.dims()[..rhs_layout.dims().len() - 2] {
        candle_core::bail!("{op}: shapes {:?} x {:?}", lhs_layout.dims(), rhs_layout.dims());
    }
    let mut out: Vec<f32> = Vec::with_capacity(batch * m * n);
    if let Some(bias) = bias {
        (0..batch * m).for_each(|_| out.extend_from_slice(bias));
    }
    let dst_address = match bias {
        Some(_) => out.as_mut_ptr() as usize,
        None => out.spare_capacity_mut().as_mut_ptr() as usize,
    };
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
    let dst_row_stride = (heads * n) as isize;
    let threads = rayon::current_num_threads();
    let product = |index: usize, dst: usize, parallelism: Parallelism| {
        // SAFETY: the operands' strides and extents come from their layouts, which candle checked
        // against their storage; `dst` holds `batch * m * n` elements, of which each product
        // writes its own `m x n` block (reading it only when a bias is there, which filled it).
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                (dst as *mut f32).add(dst_offset(index)),
                1,
                dst_row_stride,
                bias.is_some(),
                a.data.as_ptr().add(a.offset(index)),
                a.col_stride as isize,
                a.row_stride as isize,
                b.data.as_ptr().add(b.offset(index)),
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
    };
    if batch >= threads && threads > 1 {
        (0..batch).into_par_iter().for_each(|i| product(i, dst_address, Parallelism::None));
    } else {
        let parallelism = if threads > 1 { Parallelism::Rayon(threads) } else { Parallelism::None };
        (0..batch).for_each(|i| product(i, dst_address, parallelism));
    }
    // SAFETY: gemm wrote every one of the `batch * m * n` elements.
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
}
