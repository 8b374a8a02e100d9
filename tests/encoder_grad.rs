//! Training-path gradients of the encoder and heads on tiny random models (the transformers
//! test recipe: vocab 99, hidden 32, 2 layers, 4 heads): every parameter gets a non-zero
//! gradient, the gradients agree with central finite differences, and the written-out backward
//! the trainer runs gives candle autograd's gradients.

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::{Module, VarBuilder, VarMap};
use kdmcse::data::TokenBatch;
use kdmcse::loss::{Grounding, Objective};
use kdmcse::model::bert::{BertModel, Config, HiddenAct, ModelType};
use kdmcse::model::dropout::{example_key, Dropout};
use kdmcse::model::heads::Heads;
use kdmcse::model::Pooling;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How many seeded models the finite-difference check runs.
const FINITE_DIFFERENCE_SEEDS: u64 = 8;

fn batch(device: &Device, cfg: &Config) -> TokenBatch {
    let pad = cfg.pad_token_id as u32;
    let ids =
        Tensor::new(&[[5u32, 17, 42, 8, 3, 9], [5, 66, 12, 3, pad, pad], [5, 90, 3, pad, pad, pad]], device)
            .unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]], device).unwrap();
    TokenBatch { token_type_ids: ids.zeros_like().unwrap(), input_ids: ids, attention_mask: mask }
}

fn dropout(view: u64) -> Dropout {
    Dropout::per_example(0.1, 0.1, (0..3).map(|i| example_key(1234, 0, i, view)).collect())
}

#[test]
fn every_parameter_gets_a_nonzero_gradient() {
    for model_type in [ModelType::Bert, ModelType::Roberta] {
        let device = Device::Cpu;
        let cfg = Config::tiny(model_type);
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
        let model = BertModel::load(vb.pp("encoder"), &cfg).unwrap();
        let heads = Heads::load(vb.pp("heads"), cfg.hidden_size, 8, 12).unwrap();
        let tokens = batch(&device, &cfg);
        let h1 = model.embed(&tokens, &dropout(0), Pooling::Cls).unwrap();
        let h2 = model.embed(&tokens, &dropout(1), Pooling::Cls).unwrap();
        let img = Tensor::randn(0f32, 1.0, (3, 12), &device).unwrap();
        let cap = Tensor::randn(0f32, 1.0, (3, 12), &device).unwrap();
        let (v, t) = (heads.image.forward(&img).unwrap(), heads.caption.forward(&cap).unwrap());
        let (p1, p2) = (heads.grounding.forward(&h1).unwrap(), heads.grounding.forward(&h2).unwrap());
        let g = Grounding {
            p1: &p1,
            p2: &p2,
            v: &v,
            t: &t,
            img_rows: &img,
            cap_rows: &cap,
            img_cols: &img,
            cap_cols: &cap,
        };
        let (z1, z2) = (heads.mlp.forward(&h1).unwrap(), heads.mlp.forward(&h2).unwrap());
        let objective = Objective { lambda: 1.0, ..Objective::default() };
        let terms = objective.compute(&z1, &z2, Some(&g), 0).unwrap();
        let grads = terms.total.backward().unwrap();
        let vars = varmap.data().lock().unwrap();
        assert_eq!(vars.len(), 5 + 16 * cfg.num_hidden_layers + 8, "{model_type:?}: parameter count");
        for (name, var) in vars.iter() {
            let grad = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{model_type:?}: no gradient for {name}"));
            let max = grad.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(max > 0.0 && max.is_finite(), "{model_type:?}: gradient of {name} is {max}");
        }
    }
}

/// f64 values drawn from `rng` uniformly over `[lo, hi]`, in `shape`.
fn uniform(rng: &mut ChaCha8Rng, shape: &Shape, lo: f64, hi: f64) -> Tensor {
    let values: Vec<f64> = (0..shape.elem_count()).map(|_| rng.random_range(lo..=hi)).collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

/// The tiny BERT in f64 with weights from `seed`: each randomly initialised tensor redrawn over
/// the range candle's initialiser gave it, constant ones (LayerNorm) kept, so a failure repeats.
fn seeded_f64_model(seed: u64) -> (BertModel, Vec<(String, Var)>, ChaCha8Rng) {
    let (device, cfg) = (Device::Cpu, Config::tiny(ModelType::Bert));
    let varmap = VarMap::new();
    let model = BertModel::load(VarBuilder::from_varmap(&varmap, DType::F64, &device), &cfg).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut vars: Vec<(String, Var)> =
        varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, var) in &vars {
        let values = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let (lo, hi) = values.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        if lo < hi {
            var.set(&uniform(&mut rng, var.shape(), lo, hi)).unwrap();
        }
    }
    (model, vars, rng)
}

/// f(theta) = sum(hidden * weights) with dropout on; analytic vs central differences in f64,
/// for a few fixed seeds (weights and probe).
#[test]
fn encoder_gradients_match_finite_differences() {
    for seed in 0..FINITE_DIFFERENCE_SEEDS {
        let (device, cfg) = (Device::Cpu, Config::tiny(ModelType::Bert));
        let (model, vars, mut rng) = seeded_f64_model(seed);
        let tokens = batch(&device, &cfg);
        let drop = dropout(0);
        let probe = uniform(&mut rng, &Shape::from((3, 6, cfg.hidden_size)), -1.0, 1.0);
        let f = || -> Tensor {
            let hidden = model.forward(&tokens, &drop).unwrap();
            (hidden * &probe).unwrap().sum_all().unwrap()
        };
        let grads = f().backward().unwrap();
        let eps = 1e-6;
        let mut checked = 0;
        for (name, var) in &vars {
            let grad = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let original = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            // The element with the largest gradient and one spread-out element.
            let largest = (0..grad.len()).max_by(|&a, &b| grad[a].abs().total_cmp(&grad[b].abs())).unwrap();
            for index in [largest, (original.len() * 7 / 13) % original.len()] {
                let eval_at = |value: f64| -> f64 {
                    let mut data = original.clone();
                    data[index] = value;
                    var.set(&Tensor::from_vec(data, var.shape(), &device).unwrap()).unwrap();
                    f().to_scalar::<f64>().unwrap()
                };
                let numeric = (eval_at(original[index] + eps) - eval_at(original[index] - eps)) / (2.0 * eps);
                var.set(&Tensor::from_vec(original.clone(), var.shape(), &device).unwrap()).unwrap();
                let analytic = grad[index];
                assert!(
                    (numeric - analytic).abs() <= 1e-6 + 1e-5 * analytic.abs(),
                    "seed {seed}: {name}[{index}]: analytic {analytic} vs numeric {numeric}"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 2 * vars.len());
    }
}

/// `embed` with CLS pooling skips the last layer's other positions; with dropout on it must
/// still give the first row of the full forward pass to rounding, and the same gradients.
#[test]
fn first_token_shortcut_equals_the_full_forward() {
    let device = Device::Cpu;
    let cfg = Config::tiny(ModelType::Bert);
    let varmap = VarMap::new();
    let model = BertModel::load(VarBuilder::from_varmap(&varmap, DType::F32, &device), &cfg).unwrap();
    let tokens = batch(&device, &cfg);
    let full =
        Pooling::Cls.pool(&model.forward(&tokens, &dropout(0)).unwrap(), &tokens.attention_mask).unwrap();
    let short = model.embed(&tokens, &dropout(0), Pooling::Cls).unwrap();
    // The shortcut runs the last layer's matmuls on one row instead of all, which gemm may block
    // differently: rounding (5 ulps seen on one CI machine), where a wrong row or mask is off by O(0.1).
    let diff = (&full - &short).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = full.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff <= 1e-5 * scale.max(1.0), "CLS shortcut differs by {diff} (largest {scale})");
    let probe = Tensor::randn(0f32, 1.0, full.shape(), &device).unwrap();
    let g_full = (full * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    let g_short = (short * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let (a, b) = (g_full.get(var.as_tensor()).unwrap(), g_short.get(var.as_tensor()).unwrap());
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let scale = a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff <= 1e-5 * scale.max(1.0), "{name}: gradients differ by {diff} (largest {scale})");
    }
}

/// bf16 autocast: the same weights give nearly the fp32 embeddings and gradients, the outputs
/// and the gradients of the fp32 master weights stay fp32, and the bf16 path really runs (the
/// results are not bit-equal to fp32's).
#[test]
fn bf16_mixed_precision_tracks_fp32() {
    let device = Device::Cpu;
    let cfg = Config::tiny(ModelType::Bert);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let fp32 = BertModel::load(vb.clone(), &cfg).unwrap();
    let bf16 = BertModel::load(vb, &cfg).unwrap().with_compute_dtype(DType::BF16);
    let tokens = batch(&device, &cfg);
    let probe = Tensor::randn(0f32, 1.0, (3, cfg.hidden_size), &device).unwrap();
    let run = |model: &BertModel| {
        let pooled = model.embed(&tokens, &dropout(0), Pooling::Avg).unwrap();
        assert_eq!(pooled.dtype(), DType::F32);
        let grads = (&pooled * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let vars = varmap.all_vars();
        let flat: Vec<f32> = vars
            .iter()
            .flat_map(|var| {
                let grad = grads.get(var.as_tensor()).expect("every weight gets a gradient");
                assert_eq!(grad.dtype(), DType::F32);
                grad.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            })
            .collect();
        (pooled.flatten_all().unwrap().to_vec1::<f32>().unwrap(), flat)
    };
    let (out32, grad32) = run(&fp32);
    let (out16, grad16) = run(&bf16);
    let max_diff = out32.iter().zip(&out16).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(max_diff > 0.0, "bf16 output equals fp32 bit for bit: the bf16 path did not run");
    assert!(max_diff < 5e-2, "bf16 output differs from fp32 by {max_diff}");
    let dot: f64 = grad32.iter().zip(&grad16).map(|(a, b)| (*a as f64) * (*b as f64)).sum();
    let norm = |g: &[f32]| g.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let cosine = dot / (norm(&grad32) * norm(&grad16));
    assert!(cosine > 0.999, "cosine of bf16 and fp32 gradients {cosine}");
}

/// `BertModel::backward` (the training step's) against candle's autograd of the same forward, on
/// every path it has: BERT and RoBERTa, each activation, CLS (last layer on the first position
/// only) and mean pooling, fp32 with the fused kernels, bf16 matmuls, and f64 weights (the
/// composed fallbacks), dropout on.
#[test]
fn written_out_backward_matches_candles_autograd() {
    let device = Device::Cpu;
    let settings = [
        (ModelType::Bert, HiddenAct::Gelu, DType::F32, DType::F32),
        (ModelType::Roberta, HiddenAct::Gelu, DType::F32, DType::F32),
        (ModelType::Bert, HiddenAct::GeluNew, DType::F32, DType::F32),
        (ModelType::Bert, HiddenAct::Relu, DType::F32, DType::F32),
        (ModelType::Bert, HiddenAct::Gelu, DType::F32, DType::BF16),
        (ModelType::Bert, HiddenAct::Gelu, DType::F64, DType::F64),
    ];
    for (model_type, act, weights, compute) in settings {
        for pooling in [Pooling::Cls, Pooling::Avg] {
            let what = format!("{model_type:?} {act:?} {weights:?}/{compute:?} {pooling:?}");
            let cfg = Config { hidden_act: act, ..Config::tiny(model_type) };
            let varmap = VarMap::new();
            let model = BertModel::load(VarBuilder::from_varmap(&varmap, weights, &device), &cfg)
                .unwrap()
                .with_compute_dtype(compute);
            let tokens = batch(&device, &cfg);
            let probe =
                Tensor::randn(0f32, 1.0, (3, cfg.hidden_size), &device).unwrap().to_dtype(weights).unwrap();
            let pooled = model.embed(&tokens, &dropout(0), pooling).unwrap();
            let expected = (&pooled * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let (pooled_too, tape) = model.embed_for_backward(&tokens, &dropout(0), pooling).unwrap();
            let same = (&pooled - &pooled_too).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(
                same.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap(),
                0.0,
                "{what}: forward"
            );
            let mut got = (pooled_too.detach().sum_all().unwrap() * 0.0).unwrap().backward().unwrap();
            model.backward(tape, &probe, &mut got).unwrap();
            // bf16: a few of its ulps (2^-8), as the two round at different places.
            let tolerance = if compute == DType::BF16 { 3e-2 } else { 1e-5 };
            let max =
                |t: Tensor| t.max_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
            let vars = varmap.all_vars();
            let largest = vars
                .iter()
                .map(|v| max(expected.get(v.as_tensor()).unwrap().abs().unwrap()))
                .fold(0.0, f64::max);
            for (name, var) in varmap.data().lock().unwrap().iter() {
                let (a, b) = (expected.get(var.as_tensor()).unwrap(), got.get(var.as_tensor()));
                let b = b.unwrap_or_else(|| panic!("{what}: no gradient for {name}"));
                assert_eq!((a.dims(), a.dtype()), (b.dims(), b.dtype()), "{what}: {name}");
                let (diff, scale) = (max((a - b).unwrap().abs().unwrap()), max(a.abs().unwrap()));
                // Relative, with a floor for the key biases, whose gradient is zero but for
                // rounding (softmax ignores a shift shared by a query's scores).
                assert!(
                    diff <= tolerance * scale.max(0.2 * largest),
                    "{what}: {name} differs by {diff} (largest {scale})"
                );
            }
        }
    }
}

/// Packed, a sentence's tokens meet no other sentence's: with dropout on, each row of a padded
/// batch embeds (CLS and mean pooling, and every hidden state) as it does alone in a batch of one,
/// which has no padding and so skips the packing's gathers. To rounding: gemm may block a
/// product of other rows differently.
#[test]
fn a_sentence_embeds_as_it_does_alone() {
    let device = Device::Cpu;
    let cfg = Config::tiny(ModelType::Bert);
    let varmap = VarMap::new();
    let model = BertModel::load(VarBuilder::from_varmap(&varmap, DType::F32, &device), &cfg).unwrap();
    let tokens = batch(&device, &cfg);
    let drop = dropout(0);
    let close = |a: &Tensor, b: &Tensor, what: &str| {
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let scale = a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(scale > 0.1 && diff <= 1e-5 * scale, "{what}: differs by {diff} (largest {scale})");
    };
    let hidden = model.forward(&tokens, &drop).unwrap();
    for (row, len) in [(0usize, 6usize), (1, 4), (2, 3)] {
        let alone = TokenBatch {
            input_ids: tokens.input_ids.narrow(0, row, 1).unwrap().narrow(1, 0, len).unwrap(),
            token_type_ids: tokens.token_type_ids.narrow(0, row, 1).unwrap().narrow(1, 0, len).unwrap(),
            attention_mask: tokens.attention_mask.narrow(0, row, 1).unwrap().narrow(1, 0, len).unwrap(),
        };
        let alone_drop = drop.select_rows(&[row]);
        for pooling in [Pooling::Cls, Pooling::Avg] {
            let in_batch = model.embed(&tokens, &drop, pooling).unwrap().narrow(0, row, 1).unwrap();
            close(
                &in_batch,
                &model.embed(&alone, &alone_drop, pooling).unwrap(),
                &format!("row {row} {pooling:?}"),
            );
        }
        let in_batch = hidden.narrow(0, row, 1).unwrap().narrow(1, 0, len).unwrap();
        close(&in_batch, &model.forward(&alone, &alone_drop).unwrap(), &format!("row {row} hidden states"));
        let padding = hidden.narrow(0, row, 1).unwrap().narrow(1, len, 6 - len).unwrap();
        assert_eq!(
            padding.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(),
            0.0,
            "padding is zeros"
        );
    }
}
