//! Differentiable fused ops for the training path.
//!
//! candle-nn's fused softmax and LayerNorm have no backward pass, so gradients silently stop at
//! them. These ops run one CPU kernel forward and a hand-written backward; on other devices they
//! fall back to a composition of primitives (which candle differentiates itself). The composed
//! versions are public so tests can check the fused kernels against them.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
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

/// The contiguous f32 data of a CPU custom op's input.
pub(crate) fn cpu_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(data) => data,
        _ => candle_core::bail!("{op}: expected f32 input"),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
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

/// The exact GELU, `x * Phi(x)` with `Phi` the standard normal CDF (BERT's `gelu`).
pub fn gelu_erf(xs: &Tensor) -> Result<Tensor> {
    if xs.device().is_cpu() && xs.dtype() == DType::F32 {
        xs.contiguous()?.apply_op1(GeluErf)
    } else {
        xs.gelu_erf()
    }
}

/// erf for f32 as a rational function of x (Eigen's `generic_fast_erf_float`): accurate to a few
/// ulp on [-4, 4], saturated beyond, and vectorisable, unlike libm's branchy `erff`.
#[inline]
fn fast_erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = ((((((-2.726_142_3e-10_f32 * x2 + 2.770_681_4e-8) * x2 - 2.101_024e-6) * x2 - 5.692_506_4e-5)
        * x2
        - 7.349_906_3e-4)
        * x2
        - 2.954_600_3e-3)
        * x2
        - 1.609_603_3e-2)
        * x;
    let q = (((-1.456_607_2e-5_f32 * x2 - 2.133_740_6e-4) * x2 - 1.682_827e-3) * x2 - 7.373_329_5e-3) * x2
        - 1.426_474e-2;
    p / q
}

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "kdmcse-gelu-erf"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = cpu_f32(storage, layout, self.name())?;
        let mut dst = vec![0f32; src.len()];
        dst.par_chunks_mut(4096).zip(src.par_chunks(4096)).for_each(|(dst, src)| {
            for (d, &x) in dst.iter_mut().zip(src) {
                *d = 0.5 * x * (1.0 + fast_erf(x * std::f32::consts::FRAC_1_SQRT_2));
            }
        });
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // d/dx x Phi(x) = Phi(x) + x phi(x)
        let xs = arg.flatten_all()?.to_vec1::<f32>()?;
        let gs = grad_res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let inv_sqrt_2pi = 0.5 * std::f32::consts::FRAC_2_SQRT_PI * std::f32::consts::FRAC_1_SQRT_2;
        let mut dx = vec![0f32; xs.len()];
        dx.par_chunks_mut(4096).zip(xs.par_chunks(4096).zip(gs.par_chunks(4096))).for_each(
            |(dx, (xs, gs))| {
                for ((d, &x), &g) in dx.iter_mut().zip(xs).zip(gs) {
                    let cdf = 0.5 * (1.0 + fast_erf(x * std::f32::consts::FRAC_1_SQRT_2));
                    let pdf = inv_sqrt_2pi * (-0.5 * x * x).exp();
                    *d = g * (cdf + x * pdf);
                }
            },
        );
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
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
        dst.par_chunks_mut(dim).zip(src.par_chunks(dim)).for_each(|(dst, src)| {
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
        dst.par_chunks_mut(dim).zip(xs.par_chunks(dim)).for_each(|(dst, src)| {
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
    // Per-chunk partial sums for dweight/dbias, reduced afterwards in chunk order. The chunk size
    // is fixed, not derived from the thread count, so results do not depend on it.
    let chunk_rows = 64;
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
        let gelu_composed: Op = &|x| x.gelu_erf();
        for (name, fused, composed) in [
            ("layer_norm", ln_fused, ln_composed),
            ("softmax", sm_fused, sm_composed),
            ("gelu", gelu_fused, gelu_composed),
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
mod erf_tests {
    /// The rational erf against libm's over [-6, 6].
    #[test]
    fn fast_erf_is_accurate() {
        let worst = (-60_000..=60_000)
            .map(|i| i as f32 * 1e-4)
            .map(|x| (super::fast_erf(x) as f64 - libm_erf(x as f64)).abs())
            .fold(0.0, f64::max);
        assert!(worst < 5e-7, "max |fast_erf - erf| = {worst}");
    }

    fn libm_erf(x: f64) -> f64 {
        candle_core::cpu::erf::erf_f64(x)
    }
}
