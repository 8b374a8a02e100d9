//! Softmax attention over packed tokens on the CPU, in one pass each way per example and head:
//! scores, softmax, dropout of the probabilities and the context in one kernel, and a backward
//! that recomputes the probabilities (as FlashAttention does) rather than storing them. Each
//! example attends over its own tokens only: no padding to mask, copy or compute. The padded
//! products (`matmul`, `attention_softmax`) serve other devices and dtypes.

use std::mem::MaybeUninit;
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::dropout_mask::{mask_run, mix, threshold_and_scale, MaskRun};
use super::math::exp;
use super::{cpu_f32, to_dtype, Isa};

/// Which rows of the packed queries and keys each example owns: `(first row, rows)` each, in row
/// order, the queries at positions `0..rows` of their example and the keys likewise.
#[derive(Debug, Clone)]
pub struct AttentionRows {
    pub queries: Vec<(usize, usize)>,
    pub keys: Vec<(usize, usize)>,
}

/// Dropout of the attention probabilities: one key per example, the mask of site `site` at
/// coordinates (head, query position, key position) as `dropout_mask` draws it for the padded
/// `[batch, heads, queries, keys]` probabilities.
#[derive(Debug, Clone)]
pub struct AttentionDropout {
    pub keys: Arc<[u64]>,
    pub site: u64,
    pub p: f32,
}

/// The attention of one layer: `heads` heads, scores scaled by `scale`.
#[derive(Debug, Clone)]
pub struct PackedAttention {
    pub heads: usize,
    pub scale: f32,
    pub rows: Arc<AttentionRows>,
    pub dropout: Option<AttentionDropout>,
}

/// Whether [`packed_attention`] has a kernel for `xs`'s dtype and device: f32 on the CPU, and
/// bf16 there, whose scores, softmax and context the kernel computes in f32 (autocast would
/// round the scores and the probabilities to bf16 between its products) and rounds once.
pub fn packed_attention_serves(xs: &Tensor) -> bool {
    super::cast::cpu_kernels_take(xs)
}

/// The context `[queries, hidden]` of packed queries `q` over packed keys `k` and values `v`
/// (`[keys, hidden]`, heads in column blocks), in their dtype. Differentiable.
pub fn packed_attention(q: &Tensor, k: &Tensor, v: &Tensor, attention: &PackedAttention) -> Result<Tensor> {
    let f32 = |t: &Tensor| to_dtype(t, DType::F32)?.contiguous();
    let context = f32(q)?.apply_op3(&f32(k)?, &f32(v)?, attention.clone())?;
    to_dtype(&context, q.dtype())
}

/// The gradients of `q`, `k` and `v` from the context's.
pub fn packed_attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    grad: &Tensor,
    attention: &PackedAttention,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (queries, keys) = (q.dim(0)?, k.dim(0)?);
    let inputs = to_dtype(&Tensor::cat(&[q, k, v], 0)?, DType::F32)?;
    let grad = to_dtype(grad, DType::F32)?.contiguous()?;
    let all = to_dtype(&inputs.apply_op2_no_bwd(&grad, &Backward(attention.clone()))?, q.dtype())?;
    Ok((all.narrow(0, 0, queries)?, all.narrow(0, queries, keys)?, all.narrow(0, queries + keys, keys)?))
}

/// One example's rows of one packed tensor.
struct Rows<'a> {
    data: &'a [f32],
    width: usize,
}

impl Rows<'_> {
    /// Row `row`'s block of head `head` (`dim` wide).
    fn head(&self, row: usize, head: usize, dim: usize) -> &[f32] {
        &self.data[row * self.width + head * dim..][..dim]
    }
}

/// `rows` split into each example's rows (each `(first, count)` in order, covering all).
fn split_rows<'a, T>(mut data: &'a mut [T], rows: &[(usize, usize)], width: usize) -> Vec<&'a mut [T]> {
    rows.iter()
        .map(|&(_, count)| {
            let (mine, rest) = std::mem::take(&mut data).split_at_mut(count * width);
            data = rest;
            mine
        })
        .collect()
}

impl PackedAttention {
    /// The row width of `q`, `k` and `v` once their shapes and the example rows agree.
    fn check(&self, q: &Layout, k: &Layout, v: &Layout) -> Result<usize> {
        let (queries, width) = q.shape().dims2()?;
        let keys = k.shape().dims2()?.0;
        let covers = |rows: &[(usize, usize)], total: usize| {
            let mut next = 0;
            rows.iter().all(|&(first, count)| std::mem::replace(&mut next, first + count) == first)
                && next == total
        };
        if k.dims() != [keys, width] || v.dims() != [keys, width] || !width.is_multiple_of(self.heads) {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?}, {} heads",
                q.dims(),
                k.dims(),
                v.dims(),
                self.heads
            );
        }
        if !covers(&self.rows.queries, queries) || !covers(&self.rows.keys, keys) {
            candle_core::bail!(
                "attention: example rows do not cover {queries} queries and {keys} keys in order"
            );
        }
        if self.rows.queries.len() != self.rows.keys.len()
            || self.dropout.as_ref().is_some_and(|d| d.keys.len() != self.rows.keys.len())
        {
            candle_core::bail!("attention: one query span, key span and dropout key per example");
        }
        Ok(width)
    }

    /// Example `example`'s probabilities of query `i` at head `head` into `probs` (one per key,
    /// then zeros up to a whole number of vectors: `keys_t`'s row stride), and their dropout
    /// factors into `kept` (one per key; 1 without dropout).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn probabilities(
        &self,
        example: usize,
        head: usize,
        i: usize,
        query: &[f32],
        keys_t: &[f32],
        probs: &mut [f32],
        kept: &mut [MaybeUninit<f32>],
    ) {
        let (keys, stride) = (kept.len(), probs.len());
        probs.fill(0.0);
        for (d, &qd) in query.iter().enumerate() {
            for (s, &kt) in probs.iter_mut().zip(&keys_t[d * stride..][..stride]) {
                *s += qd * kt;
            }
        }
        let (scores, padding) = probs.split_at_mut(keys);
        let mut max = f32::NEG_INFINITY;
        for s in scores.iter_mut() {
            *s *= self.scale;
            max = max.max(*s);
        }
        scores.iter_mut().for_each(|s| *s = exp(*s - max));
        let sum: f32 = scores.iter().sum();
        let inv = 1.0 / sum;
        scores.iter_mut().for_each(|s| *s *= inv);
        padding.fill(0.0);
        match &self.dropout {
            Some(dropout) => {
                let (threshold, scale) = threshold_and_scale(dropout.p);
                let row_key = mix(dropout.keys[example] ^ mix(dropout.site));
                let first = ((head as u64) << 40) | ((i as u64) << 20);
                mask_run(kept, MaskRun { row_key, first, threshold, scale });
            }
            None => kept.iter_mut().for_each(|m| _ = m.write(1.0)),
        }
    }

    /// One example's context rows (`out`, zeroed), all heads.
    #[inline(always)]
    fn forward_example(&self, example: usize, q: &Rows, k: &Rows, v: &Rows, out: &mut [f32]) {
        let (keys, dim) = (self.rows.keys[example].1, q.width / self.heads);
        let stride = keys.next_multiple_of(LANES);
        let (mut keys_t, mut probs) = (vec![0f32; dim * stride], vec![0f32; stride]);
        let mut kept = vec![MaybeUninit::uninit(); keys];
        for head in 0..self.heads {
            transpose_head(k, head, dim, stride, &mut keys_t);
            for i in 0..self.rows.queries[example].1 {
                self.probabilities(example, head, i, q.head(i, head, dim), &keys_t, &mut probs, &mut kept);
                let context = &mut out[i * q.width + head * dim..][..dim];
                for (j, (&p, m)) in probs.iter().zip(&kept).enumerate() {
                    // SAFETY: `probabilities` wrote every dropout factor.
                    let weight = p * unsafe { m.assume_init() };
                    for (c, &value) in context.iter_mut().zip(v.head(j, head, dim)) {
                        *c += weight * value;
                    }
                }
            }
        }
    }

    /// One example's gradients of its query rows (`dq`) and key and value rows (`dk`, `dv`),
    /// all zeroed, from its context rows' gradient `grad`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn backward_example(
        &self,
        example: usize,
        [q, k, v, grad]: [&Rows; 4],
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
    ) {
        let (keys, dim, width) = (self.rows.keys[example].1, q.width / self.heads, q.width);
        let stride = keys.next_multiple_of(LANES);
        let (mut keys_t, mut values_t) = (vec![0f32; dim * stride], vec![0f32; dim * stride]);
        let (mut probs, mut d_probs) = (vec![0f32; stride], vec![0f32; stride]);
        let mut kept = vec![MaybeUninit::uninit(); keys];
        for head in 0..self.heads {
            transpose_head(k, head, dim, stride, &mut keys_t);
            transpose_head(v, head, dim, stride, &mut values_t);
            for i in 0..self.rows.queries[example].1 {
                let query = q.head(i, head, dim);
                self.probabilities(example, head, i, query, &keys_t, &mut probs, &mut kept);
                // SAFETY: `probabilities` wrote every dropout factor.
                let kept = unsafe { kept.assume_init_mut() };
                let d_context = grad.head(i, head, dim);
                // d kept probs = dcontext . v_j; dv_j += kept prob * dcontext.
                d_probs.fill(0.0);
                for (d, &g) in d_context.iter().enumerate() {
                    for (dp, &vt) in d_probs.iter_mut().zip(&values_t[d * stride..][..stride]) {
                        *dp += g * vt;
                    }
                }
                for (j, (&p, &m)) in probs.iter().zip(kept.iter()).enumerate() {
                    let weight = p * m;
                    for (acc, &g) in dv[j * width + head * dim..][..dim].iter_mut().zip(d_context) {
                        *acc += weight * g;
                    }
                }
                // Through the dropout and the softmax: ds = scale * p * (dp - p . dp).
                let mut dot = 0f32;
                for ((dp, &m), &p) in d_probs.iter_mut().zip(kept.iter()).zip(&probs) {
                    *dp *= m;
                    dot += p * *dp;
                }
                for (dp, &p) in d_probs[..keys].iter_mut().zip(&probs) {
                    *dp = self.scale * (p * (*dp - dot));
                }
                // dq_i = sum_j ds_j k_j; dk_j += ds_j q_i.
                let dq_row = &mut dq[i * width + head * dim..][..dim];
                for (j, &ds) in d_probs[..keys].iter().enumerate() {
                    for (acc, &kv) in dq_row.iter_mut().zip(k.head(j, head, dim)) {
                        *acc += ds * kv;
                    }
                    for (acc, &qv) in dk[j * width + head * dim..][..dim].iter_mut().zip(query) {
                        *acc += ds * qv;
                    }
                }
            }
        }
    }
}

/// Keys at a time in the kernels' vector loops (one AVX-512 register of f32, two of AVX2): score
/// rows are padded with zeros to a multiple, so those loops have no remainder.
const LANES: usize = 16;

/// Head `head` of an example's rows, transposed into `out` (`[dim, stride]`, columns past the
/// rows left as they are: zeros), so that a query's scores are one pass over contiguous rows.
#[inline(always)]
fn transpose_head(rows: &Rows, head: usize, dim: usize, stride: usize, out: &mut [f32]) {
    for j in 0..rows.data.len() / rows.width {
        for (d, &x) in rows.head(j, head, dim).iter().enumerate() {
            out[d * stride + j] = x;
        }
    }
}

impl CustomOp3 for PackedAttention {
    fn name(&self) -> &'static str {
        "kdmcse-packed-attention"
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
        let width = self.check(l1, l2, l3)?;
        let [q, k, v] = [(s1, l1), (s2, l2), (s3, l3)].map(|(s, l)| cpu_f32(s, l, "attention"));
        let (q, k, v) = (q?, k?, v?);
        let mut out = vec![0f32; q.len()];
        let chunks = split_rows(&mut out, &self.rows.queries, width);
        let isa = Isa::selected();
        chunks.into_par_iter().enumerate().for_each(|(e, out)| {
            let (qf, kf) = (self.rows.queries[e].0, self.rows.keys[e]);
            let q = Rows { data: &q[qf * width..], width };
            let k = Rows { data: &k[kf.0 * width..][..kf.1 * width], width };
            let v = Rows { data: &v[kf.0 * width..][..kf.1 * width], width };
            isa.run(
                #[inline(always)]
                || self.forward_example(e, &q, &k, &v, out),
            );
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = packed_attention_backward(q, k, v, grad, self)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// The backward as an op: `[q; k; v]` stacked and the context's gradient in, `[dq; dk; dv]`
/// stacked out.
struct Backward(PackedAttention);

impl candle_core::CustomOp2 for Backward {
    fn name(&self) -> &'static str {
        "kdmcse-packed-attention-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let attention = &self.0;
        let (inputs, grad) = (cpu_f32(s1, l1, self.name())?, cpu_f32(s2, l2, self.name())?);
        let (queries, width) = l2.shape().dims2()?;
        let keys = (l1.dims()[0] - queries) / 2;
        let (q, kv) = inputs.split_at(queries * width);
        let (k, v) = kv.split_at(keys * width);
        let layout = |rows: usize| Layout::contiguous((rows, width));
        attention.check(&layout(queries), &layout(keys), &layout(keys))?;
        let mut out = vec![0f32; inputs.len()];
        let (dq, dkv) = out.split_at_mut(queries * width);
        let (dk, dv) = dkv.split_at_mut(keys * width);
        let rows = &attention.rows;
        let items: Vec<_> = split_rows(dq, &rows.queries, width)
            .into_iter()
            .zip(split_rows(dk, &rows.keys, width))
            .zip(split_rows(dv, &rows.keys, width))
            .collect();
        let isa = Isa::selected();
        items.into_par_iter().enumerate().for_each(|(e, ((dq, dk), dv))| {
            let (qf, (kf, kn)) = (rows.queries[e].0, rows.keys[e]);
            let q = Rows { data: &q[qf * width..], width };
            let grad = Rows { data: &grad[qf * width..], width };
            let k = Rows { data: &k[kf * width..][..kn * width], width };
            let v = Rows { data: &v[kf * width..][..kn * width], width };
            isa.run(
                #[inline(always)]
                || attention.backward_example(e, [&q, &k, &v, &grad], dq, dk, dv),
            );
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{attention_softmax, matmul, matmul_merge_heads, max_diff};
    use super::*;
    use crate::model::dropout::{example_key, Dropout, Site};
    use crate::model::packing::Packing;
    use candle_core::{Device, Var};

    /// The packed kernel against the padded products it replaces (scores, masked softmax,
    /// dropout, context), forward and the gradients of q, k and v: every query, and the first
    /// query of each example only (CLS pooling's last layer); dropout on and off.
    #[test]
    fn packed_attention_matches_the_padded_products() {
        let device = Device::Cpu;
        let (heads, dim, len) = (3usize, 8usize, 5usize);
        let width = heads * dim;
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], &device).unwrap();
        let bias =
            ((mask.to_dtype(DType::F32).unwrap() - 1.0).unwrap() * 1e9).unwrap().reshape((3, 1, 1, len));
        let bias = bias.unwrap();
        let keys: Vec<u64> = (0..3).map(|i| example_key(5, 1, i, 0)).collect();
        for (p, first_only) in [(0.0f32, false), (0.3, false), (0.3, true)] {
            let dropout = Dropout::per_example(0.1, p, keys.clone());
            let packing = Packing::new(&mask, &dropout).unwrap();
            let first = packing.first_tokens(&dropout, &device).unwrap();
            let queries = if first_only { &first } else { &packing };
            let tokens = packing.tokens().len();
            let randn =
                |rows: usize| Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, width), &device).unwrap());
            let (q, k, v) =
                (randn(queries.tokens().len()).unwrap(), randn(tokens).unwrap(), randn(tokens).unwrap());
            let site = Site::AttentionProbs(2);
            let attention = PackedAttention {
                heads,
                scale: 1.0 / (dim as f32).sqrt(),
                rows: Arc::new(AttentionRows {
                    queries: queries.example_rows(),
                    keys: packing.example_rows(),
                }),
                dropout: dropout.example_masks(site).map(|(keys, p)| AttentionDropout {
                    keys: keys.into(),
                    site: site.id(),
                    p,
                }),
            };
            let ours = packed_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &attention).unwrap();
            let heads_of = |t: &Tensor, packing: &Packing| {
                let (batch, len) = packing.padded_dims();
                packing.pad(t).unwrap().reshape((batch, len, heads, dim)).unwrap().transpose(1, 2).unwrap()
            };
            let (qh, kh, vh) = (
                heads_of(q.as_tensor(), queries),
                heads_of(k.as_tensor(), &packing),
                heads_of(v.as_tensor(), &packing),
            );
            let scores = matmul(&qh, &kh.t().unwrap()).unwrap();
            let probs = attention_softmax(&scores, 1.0 / (dim as f64).sqrt(), &bias).unwrap();
            let kept = dropout.apply(&probs, site).unwrap();
            let padded = queries.pack(&matmul_merge_heads(&kept, &vh).unwrap()).unwrap();
            assert!(max_diff(&ours, &padded) < 1e-5, "p {p}, first only {first_only}: context");
            let probe = Tensor::randn(0f32, 1.0, ours.shape(), &device).unwrap();
            let g_ours = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g_padded = (padded * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            for (var, name) in [(&q, "q"), (&k, "k"), (&v, "v")] {
                let (a, b) = (g_ours.get(var.as_tensor()).unwrap(), g_padded.get(var.as_tensor()).unwrap());
                assert!(
                    max_diff(a, b) < 1e-5,
                    "p {p}, first only {first_only}: d{name} differs by {}",
                    max_diff(a, b)
                );
                assert!(max_diff(b, &b.zeros_like().unwrap()) > 1e-3, "d{name} is degenerate");
            }
        }
    }
}
