//! The student: the pretrained encoder and the four KDMCSE heads as one set of trainable
//! variables, its seeded head initialisation, and the forward of a two-view batch to the
//! embeddings the objective reads.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};

use super::batches::TwoViewBatch;
use crate::checkpoint::layout::{ENCODER_PREFIX, HEADS_PREFIX};
use crate::config::HeadInit;
use crate::model::bert::EncoderTape;
use crate::model::heads::{HeadShape, Heads};
use crate::model::{self, BertModel, Pooling};

/// Mixed into the seed for the heads' initialisation, so it draws apart from the data order.
const HEAD_SEED_SALT: u64 = 0x4845_4144_5321; // "HEADS!"
/// The standard deviation of BERT's initialisation, which SimCSE and MCSE give their MLP head.
const HEAD_INIT_STD: f64 = 0.02;

/// One of the student's outputs that the objective reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Output {
    /// MLP-head outputs of view 1 and view 2, `[B, hidden]`.
    Z1,
    Z2,
    /// On paired batches: grounding projections of both views, and the image and caption heads'
    /// outputs of the batch's teacher features; all normalised, `[B, proj_dim]`.
    P1,
    P2,
    Image,
    Caption,
}

impl Output {
    /// Whether the objective reads it as columns of the pool (gathered from every rank) rather
    /// than as this rank's rows.
    pub fn is_pool_column(self) -> bool {
        matches!(self, Output::Z2 | Output::Image | Output::Caption)
    }
}

/// The student's outputs for a two-view batch of B examples (or their gradients), by name.
pub struct Embeddings(BTreeMap<Output, Tensor>);

impl Embeddings {
    pub fn new(outputs: impl IntoIterator<Item = (Output, Tensor)>) -> Self {
        Self(outputs.into_iter().collect())
    }

    pub fn get(&self, output: Output) -> Option<&Tensor> {
        self.0.get(&output)
    }

    pub fn iter(&self) -> impl Iterator<Item = (Output, &Tensor)> {
        self.0.iter().map(|(o, t)| (*o, t))
    }

    /// Examples (rows of each output).
    pub fn examples(&self) -> Result<usize> {
        Ok(self.0.values().next().context("no outputs")?.dim(0)?)
    }

    fn map(&self, f: impl Fn(&Tensor) -> candle_core::Result<Tensor>) -> Result<Self> {
        let mapped = self.iter().map(|(o, t)| Ok((o, f(t)?))).collect::<candle_core::Result<_>>()?;
        Ok(Self(mapped))
    }

    /// The same values without a graph.
    pub fn detach(&self) -> Self {
        self.map(|t| Ok(t.detach())).expect("detach cannot fail")
    }

    /// Rows `start..start + len` of every output.
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        self.map(|t| t.narrow(0, start, len))
    }

    /// The chunks' rows one after another.
    pub fn cat(chunks: &[Embeddings]) -> Result<Self> {
        let outputs = chunks[0].0.keys().map(|&output| {
            let parts = chunks
                .iter()
                .map(|c| c.get(output).context("chunks of one batch"))
                .collect::<Result<Vec<_>>>()?;
            Ok((output, Tensor::cat(&parts, 0)?))
        });
        Ok(Self(outputs.collect::<Result<_>>()?))
    }

    /// `sum(e * g)` over every embedding `e` and its gradient `g` from `grads`: its gradient with
    /// respect to `e` is exactly `g`, so its backward carries cached embedding gradients into the
    /// heads.
    fn surrogate(&self, grads: &Embeddings) -> Result<Tensor> {
        let terms = self
            .iter()
            .map(|(output, e)| {
                let g = grads.get(output).with_context(|| format!("no gradient of {output:?}"))?;
                Ok(e.mul(g)?.sum_all()?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&terms, 0)?.sum_all()?)
    }
}

/// A forward of the student kept for its backward: the embeddings, whose graph reaches back to
/// the sentence vectors (a leaf), and the encoder's activations.
pub struct TrainingForward {
    pub embeddings: Embeddings,
    sentences: Var,
    tape: EncoderTape,
}

pub struct Student {
    varmap: VarMap,
    pub encoder: BertModel,
    heads: Heads,
    pooling: Pooling,
}

/// The heads a student starts with.
#[derive(Debug, Clone, Copy)]
pub struct HeadsSpec {
    /// The grounding space's dimension.
    pub proj_dim: usize,
    /// The teacher features' dimension.
    pub teacher_dim: usize,
    /// Their initialisation and its seed.
    pub init: HeadInit,
    pub seed: u64,
}

impl Student {
    /// The encoder of `model_dir` (every tensor its config.json asks for must be there) and
    /// freshly initialised `heads`, matmuls in `compute`.
    pub fn load(
        model_dir: &Path,
        pooling: Pooling,
        heads: HeadsSpec,
        compute: DType,
        device: &Device,
    ) -> Result<Self> {
        let config = model::load_config(model_dir)?;
        let varmap = VarMap::new();
        model::load_encoder_vars(&varmap, ENCODER_PREFIX, model_dir, &config, device)?;
        let loaded: BTreeSet<String> = varmap.data().lock().expect("varmap lock").keys().cloned().collect();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let encoder = BertModel::load(vb.pp("encoder"), &config)
            .with_context(|| format!("{}: weights do not fit config.json", model_dir.display()))?
            .with_compute_dtype(compute);
        // The VarBuilder creates what the file lacks: a folder that does not cover its config.
        let created: BTreeSet<String> = varmap
            .data()
            .lock()
            .expect("varmap lock")
            .keys()
            .filter(|k| !loaded.contains(*k))
            .cloned()
            .collect();
        if let Some(first) = created.first() {
            bail!(
                "{}: the weights lack {} (and {} more) that config.json asks for (num_hidden_layers {}, \
                 hidden_size {}): a truncated or mismatched model.safetensors",
                model_dir.display(),
                first.strip_prefix(ENCODER_PREFIX).unwrap_or(first),
                created.len() - 1,
                config.num_hidden_layers,
                config.hidden_size
            );
        }
        let shapes = Heads::shapes(config.hidden_size, heads.proj_dim, heads.teacher_dim);
        init_heads(&varmap, heads.seed, &shapes, heads.init, device)?;
        let heads = Heads::load(vb.pp("heads"), config.hidden_size, heads.proj_dim, heads.teacher_dim)?;
        Ok(Self { varmap, encoder, heads, pooling })
    }

    /// The embeddings of `batch`'s two views (and of its teacher features on a paired batch).
    pub fn forward(&self, batch: &TwoViewBatch) -> Result<Embeddings> {
        self.heads_forward(&self.encoder.embed(&batch.tokens, &batch.dropout, self.pooling)?, batch)
    }

    /// [`Self::forward`], kept for [`Self::backward`].
    pub fn forward_for_backward(&self, batch: &TwoViewBatch) -> Result<TrainingForward> {
        let (sentences, tape) =
            self.encoder.embed_for_backward(&batch.tokens, &batch.dropout, self.pooling)?;
        let sentences = Var::from_tensor(&sentences.detach())?;
        let embeddings = self.heads_forward(sentences.as_tensor(), batch)?;
        Ok(TrainingForward { embeddings, sentences, tape })
    }

    /// The gradient of every trainable variable given the gradients of `forward`'s embeddings:
    /// candle's autograd through the heads down to the sentence vectors, then the encoder's
    /// written-out backward.
    pub fn backward(&self, forward: TrainingForward, grads: &Embeddings) -> Result<GradStore> {
        let TrainingForward { embeddings, sentences, tape } = forward;
        let mut store = embeddings.surrogate(grads)?.backward()?;
        let grad_sentences =
            store.remove(sentences.as_tensor()).context("the heads read the sentence vectors")?;
        self.encoder.backward(tape, &grad_sentences, &mut store)?;
        Ok(store)
    }

    /// The heads' outputs from the sentence vectors `h` of `batch`'s two views.
    fn heads_forward(&self, h: &Tensor, batch: &TwoViewBatch) -> Result<Embeddings> {
        let b = batch.examples;
        let z = self.heads.mlp.forward(h)?;
        let mut outputs = vec![(Output::Z1, z.narrow(0, 0, b)?), (Output::Z2, z.narrow(0, b, b)?)];
        if let Some(teacher) = &batch.teacher {
            let p = self.heads.grounding.forward(h)?;
            outputs.extend([
                (Output::P1, p.narrow(0, 0, b)?),
                (Output::P2, p.narrow(0, b, b)?),
                (Output::Image, self.heads.image.forward(&teacher.image)?),
                (Output::Caption, self.heads.caption.forward(&teacher.caption)?),
            ]);
        }
        Ok(Embeddings::new(outputs))
    }

    /// Every trainable variable by name (`encoder.*`, `heads.*`).
    pub fn params(&self) -> Vec<(String, Var)> {
        self.varmap.data().lock().expect("varmap lock").iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Every trainable tensor by name.
    pub fn weights(&self) -> HashMap<String, Tensor> {
        self.params().into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect()
    }

    /// Sets every variable from `weights` (a checkpoint's `what`), which must hold each one with
    /// its shape.
    pub fn restore(&self, weights: &HashMap<String, Tensor>, what: &str) -> Result<()> {
        for (key, var) in self.params() {
            let saved = weights.get(&key).with_context(|| format!("{what} has no tensor {key}"))?;
            if saved.dims() != var.dims() {
                bail!("{what}: {key} has shape {:?}, the model {:?}", saved.dims(), var.dims());
            }
            var.set(saved)?;
        }
        Ok(())
    }
}

/// The heads' initial weights, drawn from the seed so that every rank and every run agree:
/// Normal(0, 0.02) weights and zero biases (SimCSE's MLP head), or with `MlpNormal` only the MLP
/// head so and the others as PyTorch's `nn.Linear` (weight and bias uniform in
/// +-1/sqrt(fan_in): `kaiming_uniform_(a=sqrt(5))`), as the official code leaves them.
fn init_heads(
    varmap: &VarMap,
    seed: u64,
    shapes: &[HeadShape],
    init: HeadInit,
    device: &Device,
) -> Result<()> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ HEAD_SEED_SALT);
    let mut data = varmap.data().lock().expect("varmap lock");
    for shape in shapes {
        let count = shape.input * shape.output;
        let (weights, bias): (Vec<f32>, Vec<f32>) = if init == HeadInit::AllNormal || shape.name == "mlp" {
            let normal = |rng: &mut rand_chacha::ChaCha8Rng| {
                // Box-Muller.
                let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
                ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * HEAD_INIT_STD) as f32
            };
            ((0..count).map(|_| normal(&mut rng)).collect(), vec![0.0; shape.output])
        } else {
            let bound = 1.0 / (shape.input as f64).sqrt();
            let mut uniform =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-bound..bound) as f32).collect() };
            (uniform(count), uniform(shape.output))
        };
        let prefix = format!("{HEADS_PREFIX}{}.dense", shape.name);
        let weight = Tensor::from_vec(weights, (shape.output, shape.input), device)?;
        data.insert(format!("{prefix}.weight"), Var::from_tensor(&weight)?);
        data.insert(
            format!("{prefix}.bias"),
            Var::from_tensor(&Tensor::from_vec(bias, shape.output, device)?)?,
        );
    }
    tracing::info!(
        heads = ?shapes.iter().map(|s| s.name).collect::<Vec<_>>(),
        ?init,
        "initialised the heads; every other parameter comes from the model folder"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `mlp_normal`: the MLP head N(0, 0.02) with zero bias, the others within nn.Linear's bounds
    /// (+-1/sqrt(fan_in), weight and bias) and spread over them as a uniform draw is (std
    /// bound / sqrt(3)); `all_normal`: every head N(0, 0.02), zero bias.
    #[test]
    fn head_initialisations_follow_their_distributions() {
        let shapes = Heads::shapes(64, 32, 48);
        let stats = |init: HeadInit| {
            let varmap = VarMap::new();
            init_heads(&varmap, 7, &shapes, init, &Device::Cpu).unwrap();
            let data = varmap.data().lock().unwrap();
            shapes
                .iter()
                .map(|s| {
                    let get = |part: &str| {
                        data[&format!("{HEADS_PREFIX}{}.dense.{part}", s.name)]
                            .as_tensor()
                            .flatten_all()
                            .unwrap()
                            .to_vec1::<f32>()
                            .unwrap()
                    };
                    let (w, b) = (get("weight"), get("bias"));
                    let std = (w.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
                    let max = w.iter().chain(&b).fold(0f64, |m, x| m.max(x.abs() as f64));
                    (s.name, s.input, std, max, b.iter().all(|x| *x == 0.0))
                })
                .collect::<Vec<_>>()
        };
        for (name, _, std, _, zero_bias) in stats(HeadInit::AllNormal) {
            assert!((std - 0.02).abs() < 0.002 && zero_bias, "{name}: std {std}");
        }
        for (name, fan_in, std, max, zero_bias) in stats(HeadInit::MlpNormal) {
            if name == "mlp" {
                assert!((std - 0.02).abs() < 0.002 && zero_bias, "{name}: std {std}");
            } else {
                let bound = 1.0 / (fan_in as f64).sqrt();
                assert!(max <= bound && max > 0.95 * bound, "{name}: max {max}, bound {bound}");
                assert!((std - bound / 3f64.sqrt()).abs() < 0.05 * bound, "{name}: std {std}");
                assert!(!zero_bias, "{name}: nn.Linear draws its bias");
            }
        }
    }
}
