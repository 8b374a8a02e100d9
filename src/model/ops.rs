//! Differentiable fused ops for the training path.
//!
//! candle-nn's fused softmax and LayerNorm have no backward pass, so gradients silently stop at
//! them. These ops run one CPU kernel forward and a hand-written backward; on other devices they
//! fall back to a composition of primitives (which candle differentiates itself). The composed
//! versions are public so tests can check the fused kernels against them.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor, D,
};
use rayon::prelude::*;

/// Softmax over the last dimension.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if xs.device().is_cpu() && xs.dtype() == DType::F32 {
        xs.contiguous()?.apply_op1(SoftmaxLastDim)
    } else {
        softmax_last_dim_composed(xs)
    }
}

/// Softmax from primitives (exp, sum, div), the reference for the fused kernel.
pub fn softmax_last_dim_composed(xs: &Tensor) -> Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let exp = xs.broadcast_sub(&max)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

/// LayerNorm over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`.
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if xs.device().is_cpu() && xs.dtype() == DType::F32 {
        xs.contiguous()?.apply_op3(weight, bias, LayerNorm { eps })
    } else {
        layer_norm_composed(xs, weight, bias, eps)
    }
}

/// LayerNorm from primitives, the reference for the fused kernel.
pub fn layer_norm_composed(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = xs.mean_keepdim(D::Minus1)?;
    let centered = xs.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(weight)?.broadcast_add(bias)
}

fn cpu_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(data) => data,
        _ => candle_core::bail!("{op}: expected f32 input"),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

struct SoftmaxLastDim;

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "kdmcse-softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = cpu_f32(storage, layout, self.name())?;
        let dim = layout.dims()[layout.dims().len() - 1];
        let mut dst = vec![0f32; src.len()];
        dst.par_chunks_mut(dim)
            .zip(src.par_chunks(dim))
            .for_each(|(dst, src)| {
                let max = src.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = (s - max).exp();
                    sum += *d;
                }
                let inv = 1.0 / sum;
                dst.iter_mut().for_each(|d| *d *= inv);
            });
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // dx = y * (g - sum(g * y))
        let dot = (grad_res * res)?.sum_keepdim(D::Minus1)?;
        Ok(Some(res.mul(&grad_res.broadcast_sub(&dot)?)?))
    }
}

struct LayerNorm {
    eps: f64,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "kdmcse-layer-norm"
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
        let xs = cpu_f32(s1, l1, self.name())?;
        let weight = cpu_f32(s2, l2, self.name())?;
        let bias = cpu_f32(s3, l3, self.name())?;
        let dim = weight.len();
        if bias.len() != dim || l1.dims()[l1.dims().len() - 1] != dim {
            candle_core::bail!("layer-norm: weight/bias size {dim} does not match input {l1:?}");
        }
        let eps = self.eps as f32;
        let mut dst = vec![0f32; xs.len()];
        dst.par_chunks_mut(dim)
            .zip(xs.par_chunks(dim))
            .for_each(|(dst, src)| {
                let mean = src.iter().sum::<f32>() / dim as f32;
                let var = src.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / dim as f32;
                let rstd = 1.0 / (var + eps).sqrt();
                for (((d, x), w), b) in dst.iter_mut().zip(src).zip(weight).zip(bias) {
                    *d = (x - mean) * rstd * w + b;
                }
            });
        Ok((CpuStorage::F32(dst), l1.shape().clone()))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // With xhat = (x - mean) * rstd and g = grad * weight:
        // dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), dweight = sum(grad * xhat), dbias = sum(grad).
        let dim = weight.dim(0)?;
        let (xs2, grad2) = (xs.reshape(((), dim))?, grad.reshape(((), dim))?);
        let (dx, dw, db) = layer_norm_backward_cpu(&xs2, weight, &grad2, self.eps)?;
        Ok((Some(dx.reshape(xs.shape())?), Some(dw), Some(db)))
    }
}

/// The LayerNorm backward as one pass over rows (recomputing mean and rstd, which is cheaper than
/// storing them through candle's graph).
fn layer_norm_backward_cpu(
    xs: &Tensor,
    weight: &Tensor,
    grad: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (rows, dim) = xs.dims2()?;
    let xs_v = xs.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let g_v = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let w_v = weight.to_vec1::<f32>()?;
    let eps = eps as f32;
    let mut dx = vec![0f32; rows * dim];
    // Per-chunk partial sums for dweight/dbias, reduced afterwards.
    let chunk_rows = rows.div_ceil(rayon::current_num_threads().max(1) * 4).max(1);
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(chunk_rows * dim)
        .zip(xs_v.par_chunks(chunk_rows * dim))
        .zip(g_v.par_chunks(chunk_rows * dim))
        .map(|((dx, xs), gs)| {
            let mut dw = vec![0f32; dim];
            let mut db = vec![0f32; dim];
            let mut xhat = vec![0f32; dim];
            for ((dx, x), g) in dx.chunks_mut(dim).zip(xs.chunks(dim)).zip(gs.chunks(dim)) {
                let mean = x.iter().sum::<f32>() / dim as f32;
                let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / dim as f32;
                let rstd = 1.0 / (var + eps).sqrt();
                let (mut sum_g, mut sum_gx) = (0f32, 0f32);
                for i in 0..dim {
                    xhat[i] = (x[i] - mean) * rstd;
                    let gw = g[i] * w_v[i];
                    sum_g += gw;
                    sum_gx += gw * xhat[i];
                    dw[i] += g[i] * xhat[i];
                    db[i] += g[i];
                }
                let (mean_g, mean_gx) = (sum_g / dim as f32, sum_gx / dim as f32);
                for i in 0..dim {
                    dx[i] = rstd * (g[i] * w_v[i] - mean_g - xhat[i] * mean_gx);
                }
            }
            (dw, db)
        })
        .collect();
    let mut dw = vec![0f32; dim];
    let mut db = vec![0f32; dim];
    for (pw, pb) in partials {
        dw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
        db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
    }
    let device = xs.device();
    Ok((
        Tensor::from_vec(dx, (rows, dim), device)?,
        Tensor::from_vec(dw, dim, device)?,
        Tensor::from_vec(db, dim, device)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// The fused kernels and their backward agree with the composed ops candle differentiates.
    #[test]
    fn fused_ops_match_composed_forward_and_backward() {
        let device = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 3.0, (4, 5, 48), &device).unwrap() + 0.7).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.2, 48, &device).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.2, 48, &device).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (4, 5, 48), &device).unwrap();
        type Op<'a> = &'a dyn Fn(&Tensor) -> Result<Tensor>;
        let ln_fused: Op = &|x| layer_norm(x, &w, &b, 1e-12);
        let ln_composed: Op = &|x| layer_norm_composed(x, &w, &b, 1e-12);
        let sm_fused: Op = &|x| softmax_last_dim(x);
        let sm_composed: Op = &|x| softmax_last_dim_composed(x);
        for (name, fused, composed) in [("layer_norm", ln_fused, ln_composed), ("softmax", sm_fused, sm_composed)] {
            let (yf, yc) = (fused(x.as_tensor()).unwrap(), composed(x.as_tensor()).unwrap());
            assert!(max_diff(&yf, &yc) < 1e-5, "{name} forward");
            let gf = (yf * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (yc * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            for (var, what) in [(&x, "x"), (&w, "weight"), (&b, "bias")] {
                match (gf.get(var.as_tensor()), gc.get(var.as_tensor())) {
                    (Some(f), Some(c)) => assert!(max_diff(f, c) < 1e-4, "{name} d{what}: {}", max_diff(f, c)),
                    (None, None) => {}
                    _ => panic!("{name} d{what}: gradient present in one version only"),
                }
            }
        }
    }
}
