//! The encoder's backward, written out: from the gradient of the pooled sentence vectors to every
//! weight's gradient, each computed once from the activations the forward kept (the training
//! step's backward). candle's autograd of the same forward gives the same gradients, but it
//! zero-fills and accumulates a buffer for every operand of every op and differentiates through
//! every view and cast; here each gradient is one matmul or one fused kernel, written once.
//! `tests/encoder_grad.rs` checks it against candle's autograd.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor};
use candle_nn::Embedding;

use super::{BertModel, Embeddings, FeedForward, HiddenAct, LayerNorm, Linear, SelfAttention};
use crate::data::TokenBatch;
use crate::model::dropout::{Dropout, Site};
use crate::model::packing::Packing;
use crate::model::Pooling;
use crate::ops;

/// What attention's backward reads: the inputs of its matmuls (in the compute dtype), its core's
/// activations, and the residual sum the LayerNorm normalised.
pub(super) struct AttentionActivations {
    pub(super) xs: Tensor,
    pub(super) queries: Tensor,
    pub(super) core: AttentionCore,
    pub(super) context: Tensor,
    pub(super) residual: Tensor,
}

/// Softmax attention from the projections to the context, as it ran: the packed kernel (CPU,
/// f32; it recomputes the probabilities in its backward) or padded products, whose backward
/// reads the softmax output before and after dropout.
pub(super) enum AttentionCore {
    Packed { q: Tensor, k: Tensor, v: Tensor, attention: ops::PackedAttention },
    Padded { q: Tensor, k: Tensor, v: Tensor, probs: Tensor, kept: Tensor },
}

/// What the feed-forward block's backward reads.
pub(super) struct FeedForwardActivations {
    pub(super) xs: Tensor,
    pub(super) inner: Tensor,
    pub(super) activated: Tensor,
    pub(super) residual: Tensor,
}

pub(super) type LayerActivations = (AttentionActivations, FeedForwardActivations);

/// One forward's activations, from [`BertModel::embed_for_backward`].
pub struct EncoderTape {
    pub(super) tokens: TokenBatch,
    pub(super) dropout: Dropout,
    pub(super) pooling: Pooling,
    pub(super) packing: Packing,
    /// The tokens the last layer ran for when not all of them.
    pub(super) first_tokens: Option<Packing>,
    /// The embeddings' sum before their LayerNorm.
    pub(super) embedded: Tensor,
    pub(super) layers: Vec<LayerActivations>,
}

impl BertModel {
    /// Adds the gradient of every encoder weight to `grads` (keyed by the weights' variables),
    /// given the gradient of the pooled vectors `tape`'s forward returned. Dropout masks are
    /// recomputed from their keys rather than kept.
    pub fn backward(&self, tape: EncoderTape, grad_pooled: &Tensor, grads: &mut GradStore) -> Result<()> {
        let EncoderTape { tokens, dropout, pooling, packing, first_tokens, embedded, mut layers } = tape;
        let output = first_tokens.as_ref().unwrap_or(&packing);
        let hidden_len = output.padded_dims().1;
        let mut grad = output.pack(&pooling.backward(grad_pooled, &tokens.attention_mask, hidden_len)?)?;
        // Last layer first, each layer's activations freed as soon as they are used.
        for (i, layer) in self.layers.iter().enumerate().rev() {
            let (attention, feed_forward) = layers.pop().expect("one activation set per layer");
            let queries = if i + 1 == self.layers.len() { output } else { &packing };
            grad = layer.feed_forward.backward(&feed_forward, &grad, queries.dropout(), grads)?;
            grad = layer.attention.backward(&attention, &grad, &packing, queries, &dropout, grads)?;
        }
        self.embeddings.backward(&tokens, &packing, &embedded, &grad, grads)
    }
}

impl Linear {
    /// Given the forward's input (in the matmul's dtype) and the output's gradient: the weight
    /// and bias gradients (in the weights' dtype) into `grads`; returns the input's gradient.
    /// The matmuls read transposes as strided views, never copies.
    fn backward(&self, input: &Tensor, grad_out: &Tensor, grads: &mut GradStore) -> Result<Tensor> {
        let (out_dim, in_dim) = self.weight.dims2()?;
        let x = input.reshape(((), in_dim))?;
        let g = ops::to_dtype(grad_out, x.dtype())?.reshape(((), out_dim))?;
        grads.insert(&self.weight, ops::to_dtype(&ops::matmul(&g.t()?, &x)?, self.weight.dtype())?);
        // Summed in the bias's dtype: a bf16 sum over thousands of rows would lose the gradient.
        grads.insert(&self.bias, ops::sum_rows(&ops::to_dtype(&g, self.bias.dtype())?)?);
        let mut dims = grad_out.dims().to_vec();
        *dims.last_mut().expect("a linear output has a last dimension") = in_dim;
        ops::matmul(&g, &ops::to_dtype(&self.weight, x.dtype())?)?.reshape(dims)
    }
}

impl LayerNorm {
    /// The weight and bias gradients into `grads`; returns the input's gradient.
    fn backward(&self, xs: &Tensor, grad: &Tensor, grads: &mut GradStore) -> Result<Tensor> {
        let (dx, dw, db) = ops::layer_norm_backward(xs, &self.weight, &self.bias, grad, self.eps)?;
        grads.insert(&self.weight, dw);
        grads.insert(&self.bias, db);
        Ok(dx)
    }
}

impl Embeddings {
    /// The gradients of the three tables and the LayerNorm, from the gradient of the block's
    /// output (packed tokens): each table's rows get the sum of the gradients of the tokens that
    /// read them.
    fn backward(
        &self,
        tokens: &TokenBatch,
        packing: &Packing,
        embedded: &Tensor,
        grad: &Tensor,
        grads: &mut GradStore,
    ) -> Result<()> {
        let grad = packing.dropout().apply(grad, Site::Embeddings)?;
        let grad = self.layer_norm.backward(embedded, &grad, grads)?;
        let (ids, types, positions) = self.packed_ids(tokens, packing)?;
        let scatter = |table: &Embedding, ids: &Tensor| -> Result<Tensor> {
            table.embeddings().zeros_like()?.index_add(ids, &grad, 0)
        };
        grads.insert(self.word.embeddings(), scatter(&self.word, &ids)?);
        grads.insert(self.token_type.embeddings(), scatter(&self.token_type, &types)?);
        grads.insert(self.position.embeddings(), scatter(&self.position, &positions)?);
        Ok(())
    }
}

impl SelfAttention {
    /// The gradient of `xs` (every token of `keys`) from the gradient of the block's output,
    /// which covers the `queries` tokens only; `dropout` is the batch's (one key per example).
    fn backward(
        &self,
        saved: &AttentionActivations,
        grad: &Tensor,
        keys: &Packing,
        queries: &Packing,
        dropout: &Dropout,
        grads: &mut GradStore,
    ) -> Result<Tensor> {
        let a = saved;
        let head_dim = a.xs.dim(1)? / self.num_heads;
        let compute = a.xs.dtype();
        let d_residual = self.layer_norm.backward(&a.residual, grad, grads)?;
        let d_out = ops::to_dtype(&d_residual, compute)?;
        let d_out = queries.dropout().apply(&d_out, Site::AttentionOutput(self.layer))?;
        let d_context = self.output.backward(&a.context, &d_out, grads)?;
        let (d_q, d_k, d_v) = match &a.core {
            AttentionCore::Packed { q, k, v, attention } => {
                ops::packed_attention_backward(q, k, v, &d_context, attention)?
            }
            AttentionCore::Padded { q, k, v, probs, kept } => {
                let d_context = self.heads(&d_context, queries)?;
                let d_kept = ops::to_dtype(&ops::matmul(&d_context, &v.t()?)?, probs.dtype())?;
                let d_v = keys.pack(&ops::matmul_merge_heads(&kept.t()?, &d_context)?)?;
                let d_probs = dropout.apply(&d_kept, Site::AttentionProbs(self.layer))?;
                let scale = 1.0 / (head_dim as f64).sqrt();
                let d_scores =
                    ops::to_dtype(&ops::attention_softmax_backward(probs, &d_probs, scale)?, compute)?;
                let d_q = queries.pack(&ops::matmul_merge_heads(&d_scores, k)?)?;
                (d_q, keys.pack(&ops::matmul_merge_heads(&d_scores.t()?, q)?)?, d_v)
            }
        };
        let d_queries = self.query.backward(&a.queries, &d_q, grads)?;
        let d_keys = self.key.backward(&a.xs, &d_k, grads)?;
        let d_values = self.value.backward(&a.xs, &d_v, grads)?;
        let d_queries = ops::add(&ops::to_dtype(&d_queries, grad.dtype())?, &d_residual)?;
        let d_xs = ops::to_dtype(&ops::add(&d_keys, &d_values)?, grad.dtype())?;
        ops::add(&d_xs, &queries.unselect(&d_queries)?)
    }
}

impl FeedForward {
    /// The gradient of the block's input from the gradient of its output.
    fn backward(
        &self,
        saved: &FeedForwardActivations,
        grad: &Tensor,
        dropout: &Dropout,
        grads: &mut GradStore,
    ) -> Result<Tensor> {
        let d_residual = self.layer_norm.backward(&saved.residual, grad, grads)?;
        let d_out = dropout
            .apply(&ops::to_dtype(&d_residual, saved.xs.dtype())?, Site::FeedForwardOutput(self.layer))?;
        let d_activated = self.output.backward(&saved.activated, &d_out, grads)?;
        let d_inner = match self.act {
            HiddenAct::Gelu => ops::gelu_erf_backward(&saved.inner, &d_activated)?,
            HiddenAct::GeluNew => ops::vjp(|x| x[0].gelu(), &[&saved.inner], &d_activated)?.remove(0),
            HiddenAct::Relu => ops::vjp(|x| x[0].relu(), &[&saved.inner], &d_activated)?.remove(0),
        };
        let d_xs = self.intermediate.backward(&saved.xs, &d_inner, grads)?;
        ops::add(&ops::to_dtype(&d_xs, d_residual.dtype())?, &d_residual)
    }
}
