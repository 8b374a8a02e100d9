//! The BERT / RoBERTa encoder, with train-mode dropout and differentiable fused ops.
//!
//! Shaped like candle-transformers' `bert.rs` (a serde `Config` that reads `config.json` as is,
//! one struct per block, weight names from `VarBuilder` prefixes that mirror the Hugging Face
//! checkpoint), plus what training needs: dropout on the embeddings, attention probabilities and
//! hidden outputs, and LayerNorm/softmax with a backward pass. RoBERTa is the same network with
//! positions offset past the padding index, so both share this file. Each block's forward also
//! returns the activations its hand-written backward (`backward.rs`) reads. Hidden states are
//! packed (`[tokens, hidden]`, the batch's real tokens only; `super::packing`) from the
//! embeddings to the output; attention alone pads them back per sentence.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;

use super::dropout::{Dropout, Site};
use super::packing::Packing;
use crate::data::TokenBatch;
use crate::ops;

mod backward;

pub use backward::EncoderTape;

/// What the attention mask adds to the scores of padding keys: exp() of it is 0 in f32.
const MASKED_KEY_BIAS: f64 = 1e9;

/// Which member of the BERT family a checkpoint is (`model_type` in `config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelType {
    Bert,
    Roberta,
    XlmRoberta,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenAct {
    /// The exact (erf) GELU that BERT and RoBERTa use.
    Gelu,
    /// The tanh approximation.
    #[serde(alias = "gelu_pytorch_tanh")]
    GeluNew,
    Relu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PositionEmbeddingType {
    Absolute,
}

fn default_position_embedding_type() -> PositionEmbeddingType {
    PositionEmbeddingType::Absolute
}

/// The Hugging Face `config.json` of a BERT or RoBERTa model (unlisted keys are ignored).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Config {
    pub model_type: ModelType,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: HiddenAct,
    pub hidden_dropout_prob: f64,
    pub attention_probs_dropout_prob: f64,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: usize,
    #[serde(default = "default_position_embedding_type")]
    pub position_embedding_type: PositionEmbeddingType,
}

impl Config {
    /// Position ids start here: RoBERTa numbers positions from `pad_token_id + 1`.
    pub fn position_offset(&self) -> usize {
        match self.model_type {
            ModelType::Bert => 0,
            ModelType::Roberta | ModelType::XlmRoberta => self.pad_token_id + 1,
        }
    }

    /// The longest input (special tokens included) the position table can hold.
    pub fn max_tokens(&self) -> usize {
        self.max_position_embeddings - self.position_offset()
    }

    /// The checkpoint prefix of task-head models (`BertForMaskedLM` stores `bert.embeddings...`).
    pub fn checkpoint_prefix(&self) -> &'static str {
        match self.model_type {
            ModelType::Bert => "bert",
            ModelType::Roberta | ModelType::XlmRoberta => "roberta",
        }
    }

    /// A tiny random-weight configuration for tests.
    pub fn tiny(model_type: ModelType) -> Self {
        Self {
            model_type,
            vocab_size: 99,
            hidden_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 37,
            hidden_act: HiddenAct::Gelu,
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            max_position_embeddings: 64,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            pad_token_id: if model_type == ModelType::Bert { 0 } else { 1 },
            position_embedding_type: PositionEmbeddingType::Absolute,
        }
    }
}

/// `x W^T + b` on the last dimension, as one 2-D matmul in the input's dtype: the weights (fp32
/// masters) are cast to it, differentiably, so a bf16 input makes a bf16 matmul whose weight
/// gradients still arrive in fp32.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        let init = candle_nn::init::DEFAULT_KAIMING_NORMAL;
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
        let bias = vb.get_with_hints(out_dim, "bias", candle_nn::Init::Const(0.))?;
        Ok(Self { weight, bias })
    }
}

impl Module for Linear {
    /// `xs` in its dtype; the backward (`backward.rs`) takes the same input.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut out_dims = xs.dims().to_vec();
        let in_dim = out_dims.pop().expect("linear input has a last dimension");
        out_dims.push(self.weight.dim(0)?);
        let flat = xs.reshape(((), in_dim))?;
        let (weight, bias) =
            (ops::to_dtype(&self.weight, xs.dtype())?, ops::to_dtype(&self.bias, xs.dtype())?);
        ops::linear(&flat, &weight, &bias)?.reshape(out_dims)
    }
}

#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.))?;
        let bias = vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.))?;
        Ok(Self { weight, bias, eps })
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        ops::layer_norm(xs, &self.weight, &self.bias, self.eps)
    }
}

struct Embeddings {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    layer_norm: LayerNorm,
    position_offset: usize,
}

impl Embeddings {
    fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let embedding = |name: &str, rows: usize| -> Result<Embedding> {
            let init = candle_nn::Init::Randn { mean: 0., stdev: 0.02 };
            let table = vb.pp(name).get_with_hints((rows, cfg.hidden_size), "weight", init)?;
            Ok(Embedding::new(table, cfg.hidden_size))
        };
        Ok(Self {
            word: embedding("word_embeddings", cfg.vocab_size)?,
            position: embedding("position_embeddings", cfg.max_position_embeddings)?,
            token_type: embedding("token_type_embeddings", cfg.type_vocab_size)?,
            layer_norm: LayerNorm::load(vb.pp("LayerNorm"), cfg.hidden_size, cfg.layer_norm_eps)?,
            position_offset: cfg.position_offset(),
        })
    }

    /// The embedded tokens `[tokens, hidden]`, and the sum the LayerNorm normalised (its
    /// backward's input).
    fn forward(&self, batch: &TokenBatch, packing: &Packing) -> Result<(Tensor, Tensor)> {
        let (ids, types, positions) = self.packed_ids(batch, packing)?;
        let xs = (self.word.forward(&ids)? + self.position.forward(&positions)?)?;
        let xs = (xs + self.token_type.forward(&types)?)?;
        Ok((packing.dropout().apply(&self.layer_norm.forward(&xs)?, Site::Embeddings)?, xs))
    }

    /// The packed tokens' word, token type and position ids (positions offset for RoBERTa).
    fn packed_ids(&self, batch: &TokenBatch, packing: &Packing) -> Result<(Tensor, Tensor, Tensor)> {
        let offset = self.position_offset as u32;
        let positions: Vec<u32> = packing.tokens().iter().map(|&(_, p)| offset + p as u32).collect();
        let positions = Tensor::from_vec(positions, packing.tokens().len(), batch.input_ids.device())?;
        Ok((packing.pack(&batch.input_ids)?, packing.pack(&batch.token_type_ids)?, positions))
    }
}

struct SelfAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    output: Linear,
    layer_norm: LayerNorm,
    num_heads: usize,
    layer: usize,
}

impl SelfAttention {
    fn load(vb: VarBuilder, cfg: &Config, layer: usize) -> Result<Self> {
        let h = cfg.hidden_size;
        if !h.is_multiple_of(cfg.num_attention_heads) {
            candle_core::bail!(
                "hidden_size {h} is not a multiple of num_attention_heads {}",
                cfg.num_attention_heads
            );
        }
        let sa = vb.pp("self");
        Ok(Self {
            query: Linear::load(sa.pp("query"), h, h)?,
            key: Linear::load(sa.pp("key"), h, h)?,
            value: Linear::load(sa.pp("value"), h, h)?,
            output: Linear::load(vb.pp("output").pp("dense"), h, h)?,
            layer_norm: LayerNorm::load(vb.pp("output").pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            num_heads: cfg.num_attention_heads,
            layer,
        })
    }

    /// Attention of the `queries` tokens (all of `keys`' tokens, or a selection of them) over
    /// all of `xs` (`keys`' packed tokens), and the activations of its backward. Matmuls run in
    /// `compute`; the mask, softmax, residual and LayerNorm in `xs`'s dtype.
    fn forward(
        &self,
        xs: &Tensor,
        keys: &Packing,
        queries: &Packing,
        mask_bias: &Tensor,
        dropout: &Dropout,
        compute: DType,
    ) -> Result<(Tensor, backward::AttentionActivations)> {
        let head_dim = xs.dim(1)? / self.num_heads;
        let xs_c = ops::to_dtype(xs, compute)?;
        let query_rows = queries.select(xs)?;
        let queries_c =
            if queries.selects_all() { xs_c.clone() } else { ops::to_dtype(&query_rows, compute)? };
        let q = self.query.forward(&queries_c)?;
        let (k, v) = (self.key.forward(&xs_c)?, self.value.forward(&xs_c)?);
        let (context, core) = if ops::packed_attention_serves(&q) {
            let attention = self.packed(keys, queries, dropout, head_dim);
            let context = ops::packed_attention(&q, &k, &v, &attention)?;
            (context, backward::AttentionCore::Packed { q, k, v, attention })
        } else {
            let (q, k, v) = (self.heads(&q, queries)?, self.heads(&k, keys)?, self.heads(&v, keys)?);
            let scores = ops::to_dtype(&ops::matmul(&q, &k.t()?)?, xs.dtype())?;
            let probs = ops::attention_softmax(&scores, 1.0 / (head_dim as f64).sqrt(), mask_bias)?;
            let kept = ops::to_dtype(&dropout.apply(&probs, Site::AttentionProbs(self.layer))?, compute)?;
            let context = queries.pack(&ops::matmul_merge_heads(&kept, &v)?)?;
            (context, backward::AttentionCore::Padded { q, k, v, probs, kept })
        };
        let out = self.output.forward(&context)?;
        let out = queries.dropout().apply(&out, Site::AttentionOutput(self.layer))?;
        let residual = ops::add(&ops::to_dtype(&out, xs.dtype())?, &query_rows)?;
        let saved = backward::AttentionActivations {
            xs: xs_c,
            queries: queries_c,
            core,
            context,
            residual: residual.clone(),
        };
        Ok((self.layer_norm.forward(&residual)?, saved))
    }

    /// The packed attention kernel's description of this layer over `keys` for `queries`.
    fn packed(
        &self,
        keys: &Packing,
        queries: &Packing,
        dropout: &Dropout,
        head_dim: usize,
    ) -> ops::PackedAttention {
        let site = Site::AttentionProbs(self.layer);
        ops::PackedAttention {
            heads: self.num_heads,
            scale: 1.0 / (head_dim as f32).sqrt(),
            rows: std::sync::Arc::new(ops::AttentionRows {
                queries: queries.example_rows(),
                keys: keys.example_rows(),
            }),
            dropout: dropout.example_masks(site).map(|(keys, p)| ops::AttentionDropout {
                keys: keys.into(),
                site: site.id(),
                p,
            }),
        }
    }

    /// Packed `[tokens, hidden]` → padded heads `[batch, heads, len, head_dim]`, a strided view
    /// the matmuls read in place.
    fn heads(&self, packed: &Tensor, packing: &Packing) -> Result<Tensor> {
        let (batch, len) = packing.padded_dims();
        let head_dim = packed.dim(1)? / self.num_heads;
        packing.pad(packed)?.reshape((batch, len, self.num_heads, head_dim))?.transpose(1, 2)
    }
}

struct FeedForward {
    intermediate: Linear,
    output: Linear,
    layer_norm: LayerNorm,
    act: HiddenAct,
    layer: usize,
}

impl FeedForward {
    fn load(vb: VarBuilder, cfg: &Config, layer: usize) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            intermediate: Linear::load(vb.pp("intermediate").pp("dense"), h, i)?,
            output: Linear::load(vb.pp("output").pp("dense"), i, h)?,
            layer_norm: LayerNorm::load(vb.pp("output").pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            act: cfg.hidden_act,
            layer,
        })
    }

    /// The block's output and the activations of its backward (`xs` packed tokens, `dropout`
    /// theirs). Matmuls and the activation run in `compute`; the residual and LayerNorm in `xs`'s
    /// dtype.
    fn forward(
        &self,
        xs: &Tensor,
        dropout: &Dropout,
        compute: DType,
    ) -> Result<(Tensor, backward::FeedForwardActivations)> {
        let xs_c = ops::to_dtype(xs, compute)?;
        let inner = self.intermediate.forward(&xs_c)?;
        let activated = match self.act {
            HiddenAct::Gelu => ops::gelu_erf(&inner)?,
            HiddenAct::GeluNew => inner.gelu()?,
            HiddenAct::Relu => inner.relu()?,
        };
        let out = dropout.apply(&self.output.forward(&activated)?, Site::FeedForwardOutput(self.layer))?;
        let residual = ops::add(&ops::to_dtype(&out, xs.dtype())?, xs)?;
        let saved =
            backward::FeedForwardActivations { xs: xs_c, inner, activated, residual: residual.clone() };
        Ok((self.layer_norm.forward(&residual)?, saved))
    }
}

struct Layer {
    attention: SelfAttention,
    feed_forward: FeedForward,
}

/// The encoder: embeddings and transformer layers, no pooler (sentence embeddings come from
/// [`super::Pooling`]).
pub struct BertModel {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    pub config: Config,
    /// The dtype of the matmuls (and GELU); see [`Self::with_compute_dtype`].
    compute_dtype: DType,
}

impl BertModel {
    /// Loads from `vb` rooted at the encoder (keys `embeddings.*`, `encoder.layer.N.*`).
    pub fn load(vb: VarBuilder, config: &Config) -> Result<Self> {
        let embeddings = Embeddings::load(vb.pp("embeddings"), config)?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let lv = vb.pp("encoder").pp("layer").pp(i);
                Ok(Layer {
                    attention: SelfAttention::load(lv.pp("attention"), config, i)?,
                    feed_forward: FeedForward::load(lv, config, i)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let compute_dtype = vb.dtype();
        Ok(Self { embeddings, layers, config: config.clone(), compute_dtype })
    }

    /// Mixed precision in the manner of PyTorch's autocast: with `BF16`, every matmul (the
    /// linear layers, and attention's scores and context) and the GELU run in bf16 on bf16 casts
    /// of the weights, while embeddings, the residual stream, LayerNorm, the mask and softmax
    /// stay in the weights' dtype (fp32), as do the pooled output and therefore the losses. The
    /// casts are differentiable, so gradients reach the fp32 master weights in fp32.
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.compute_dtype = dtype;
        self
    }

    /// The device the weights live on.
    pub fn device(&self) -> &candle_core::Device {
        self.embeddings.word.embeddings().device()
    }

    /// Last hidden states `[batch, len, hidden]` of a right-padded batch (zeros at padding).
    pub fn forward(&self, batch: &TokenBatch, dropout: &Dropout) -> Result<Tensor> {
        let pass = self.run(batch, dropout, false, None)?;
        pass.output().pad(&pass.hidden)
    }

    /// Sentence embeddings `[batch, hidden]`. For CLS pooling the last layer runs for the first
    /// position only (its keys and values still come from every token): the same vectors as
    /// pooling [`Self::forward`], for 5/6 of the work on a 6-layer model.
    pub fn embed(&self, batch: &TokenBatch, dropout: &Dropout, pooling: super::Pooling) -> Result<Tensor> {
        let pass = self.run(batch, dropout, pooling == super::Pooling::Cls, None)?;
        pooling.pool(&pass.output().pad(&pass.hidden)?, &batch.attention_mask)
    }

    /// [`Self::embed`], and the tape of activations that [`Self::backward`] turns into the
    /// weights' gradients (the training step's backward; candle's autograd of the returned
    /// tensor gives the same gradients, slower).
    pub fn embed_for_backward(
        &self,
        batch: &TokenBatch,
        dropout: &Dropout,
        pooling: super::Pooling,
    ) -> Result<(Tensor, EncoderTape)> {
        let mut layers = Vec::with_capacity(self.layers.len());
        let pass = self.run(batch, dropout, pooling == super::Pooling::Cls, Some(&mut layers))?;
        let pooled = pooling.pool(&pass.output().pad(&pass.hidden)?, &batch.attention_mask)?;
        let Pass { packing, first_tokens, embedded, .. } = pass;
        let tape = EncoderTape {
            tokens: batch.clone(),
            dropout: dropout.clone(),
            pooling,
            packing,
            first_tokens,
            embedded,
            layers,
        };
        Ok((pooled, tape))
    }

    /// The forward pass; each layer's activations go to `tape` when there is one (otherwise
    /// they are freed layer by layer).
    fn run(
        &self,
        tokens: &TokenBatch,
        dropout: &Dropout,
        last_layer_first_only: bool,
        mut tape: Option<&mut Vec<backward::LayerActivations>>,
    ) -> Result<Pass> {
        let (batch, len) = tokens.input_ids.dims2()?;
        let packing = Packing::new(&tokens.attention_mask, dropout)?;
        let (mut xs, embedded) = self.embeddings.forward(tokens, &packing)?;
        // Additive key mask: 0 for tokens, a large negative number for padding.
        let mask = tokens.attention_mask.to_dtype(xs.dtype())?;
        let mask_bias = ((mask - 1.0)? * MASKED_KEY_BIAS)?.reshape((batch, 1, 1, len))?;
        let mut first_tokens = None;
        for (i, layer) in self.layers.iter().enumerate() {
            if last_layer_first_only && i + 1 == self.layers.len() {
                first_tokens = Some(packing.first_tokens(dropout, xs.device())?);
            }
            let queries = first_tokens.as_ref().unwrap_or(&packing);
            let (attended, attention) =
                layer.attention.forward(&xs, &packing, queries, &mask_bias, dropout, self.compute_dtype)?;
            let (out, feed_forward) =
                layer.feed_forward.forward(&attended, queries.dropout(), self.compute_dtype)?;
            if let Some(tape) = tape.as_deref_mut() {
                tape.push((attention, feed_forward));
            }
            xs = out;
        }
        Ok(Pass { hidden: xs, packing, first_tokens, embedded })
    }
}

/// What a forward pass computed: the last hidden states of every token of `packing`, or of
/// `first_tokens` when the last layer ran for those alone; the embeddings' sum before their
/// LayerNorm.
struct Pass {
    hidden: Tensor,
    packing: Packing,
    first_tokens: Option<Packing>,
    embedded: Tensor,
}

impl Pass {
    /// The tokens `hidden` holds.
    fn output(&self) -> &Packing {
        self.first_tokens.as_ref().unwrap_or(&self.packing)
    }
}

/// Hidden state at the first token ([CLS] / `<s>`): `[batch, len, hidden] -> [batch, hidden]`.
pub fn cls_pool(hidden: &Tensor) -> Result<Tensor> {
    hidden.narrow(1, 0, 1)?.squeeze(1)
}

/// Attention-masked mean over tokens: `[batch, len, hidden] -> [batch, hidden]`.
pub fn mean_pool(hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
    let mask = attention_mask.to_dtype(hidden.dtype())?.unsqueeze(D::Minus1)?;
    let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
    summed.broadcast_div(&mask.sum(1)?)
}
