//! What each micro-step trains on: the corpora and their samplers, the rule that mixes text and
//! paired batches, each rank's share of the global batch, the dropout keys of its examples, and
//! the two-view token batch the student reads.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::config::{StepsPerEpoch, TrainConfig};
use crate::data::{
    sampler, CorpusDigest, DataPosition, Encoded, PairedCorpus, Sampler, TextCorpus, TokenBatch, Tokenizer,
};
use crate::model::dropout::{example_key, Dropout};

/// Paired examples take dropout keys from here on, apart from the text examples' (0..).
const PAIRED_KEY_BASE: u64 = 1 << 40;
/// Sampler streams: one seed draws the orders of both corpora, apart.
const TEXT_STREAM: u64 = 0;
const PAIRED_STREAM: u64 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchKind {
    Text,
    Paired,
}

/// Raw teacher features of a paired batch's examples, `[B, dim]` each.
#[derive(Clone)]
pub struct TeacherFeatures {
    pub image: Tensor,
    pub caption: Tensor,
}

/// This rank's examples of one global batch, tokenised with both dropout views: rows `0..B` of
/// `tokens` are view 0, rows `B..2B` view 1.
#[derive(Clone)]
pub struct TwoViewBatch {
    pub kind: BatchKind,
    pub examples: usize,
    pub tokens: TokenBatch,
    pub dropout: Dropout,
    pub teacher: Option<TeacherFeatures>,
}

impl TwoViewBatch {
    /// Examples `start..start + len` with both views, as a batch of its own, padded to its own
    /// longest sentence (dropout masks follow the examples' keys and coordinates, so they are the
    /// ones the whole batch would use).
    pub fn chunk(&self, start: usize, len: usize) -> Result<TwoViewBatch> {
        if start == 0 && len == self.examples {
            return Ok(self.clone());
        }
        let rows: Vec<usize> =
            (start..start + len).chain(self.examples + start..self.examples + start + len).collect();
        let index = Tensor::from_vec(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            rows.len(),
            self.tokens.input_ids.device(),
        )?;
        let select = |t: &Tensor| t.index_select(&index, 0);
        let attention_mask = select(&self.tokens.attention_mask)?;
        let longest = attention_mask.sum(1)?.max(0)?.to_scalar::<u32>()? as usize;
        let trim = |t: Tensor| t.narrow(1, 0, longest);
        let tokens = TokenBatch {
            input_ids: trim(select(&self.tokens.input_ids)?)?,
            token_type_ids: trim(select(&self.tokens.token_type_ids)?)?,
            attention_mask: trim(attention_mask)?,
        };
        let teacher = match &self.teacher {
            Some(t) => Some(TeacherFeatures {
                image: t.image.narrow(0, start, len)?,
                caption: t.caption.narrow(0, start, len)?,
            }),
            None => None,
        };
        Ok(TwoViewBatch {
            kind: self.kind,
            examples: len,
            tokens,
            dropout: self.dropout.select_rows(&rows),
            teacher,
        })
    }
}

pub struct BatchPlan {
    text: TextCorpus,
    paired: Option<PairedCorpus>,
    text_sampler: Sampler,
    paired_sampler: Option<Sampler>,
    /// One paired batch every this many micro-steps (none without a paired corpus).
    paired_every: Option<u64>,
    /// Micro-steps per epoch when paired steps are counted from 0 in each epoch (`text+paired`);
    /// `None`: one count over the whole run (`text`).
    epoch_of: Option<u64>,
    global_batch: usize,
    tokenizer: Tokenizer,
    seed: u64,
    /// Dropout probabilities of hidden states and of attention probabilities.
    dropout: (f32, f32),
}

impl BatchPlan {
    /// The plan of `cfg` for global batches of `global_batch` examples, tokenised by `tokenizer`,
    /// with the encoder's dropout probabilities.
    pub fn new(
        cfg: &TrainConfig,
        global_batch: usize,
        tokenizer: Tokenizer,
        dropout: (f32, f32),
    ) -> Result<Self> {
        let text = TextCorpus::load(&cfg.data.text, &cfg.data.text_field)?;
        let paired = match (&cfg.data.paired, cfg.loss.uses_paired_data()) {
            (Some(dir), true) => Some(PairedCorpus::load(dir)?),
            _ => None,
        };
        let seed = cfg.train.seed;
        let text_sampler = Sampler::new(text.len(), seed, TEXT_STREAM);
        if text.len() < global_batch {
            bail!(
                "the text corpus has {} sentences, fewer than one global batch ({global_batch})",
                text.len()
            );
        }
        let paired_every = match &paired {
            None => None,
            Some(p) if p.len() < global_batch => bail!(
                "the paired corpus has {} captions, fewer than one global batch ({global_batch})",
                p.len()
            ),
            Some(p) => Some(match cfg.data.paired_every {
                Some(every) => every as u64,
                None => reference_mixing(&text_sampler, p.len(), global_batch)?,
            }),
        };
        let paired_sampler = paired.as_ref().map(|p| Sampler::new(p.len(), seed, PAIRED_STREAM));
        let text_batches = text_sampler.batches_per_epoch(global_batch);
        let paired_batches = paired_sampler.as_ref().map_or(0, |p| p.batches_per_epoch(global_batch));
        let epoch_of = match cfg.train.steps_per_epoch {
            StepsPerEpoch::Text => None,
            StepsPerEpoch::TextPlusPaired => Some((text_batches + paired_batches) as u64),
        };
        Ok(Self {
            text,
            paired,
            text_sampler,
            paired_sampler,
            paired_every,
            epoch_of,
            global_batch,
            tokenizer,
            seed,
            dropout,
        })
    }

    /// The corpora by content: the text corpus, and the paired one where the objective reads it.
    pub fn corpus_digests(&self) -> (CorpusDigest, Option<CorpusDigest>) {
        (self.text.digest(), self.paired.as_ref().map(PairedCorpus::digest))
    }

    /// The teacher features' dimension (768, CLIP ViT-L/14's, without a paired corpus: the heads
    /// that read them then never train).
    pub fn teacher_dim(&self) -> usize {
        const DEFAULT_TEACHER_DIM: usize = 768;
        self.paired.as_ref().map_or(DEFAULT_TEACHER_DIM, PairedCorpus::dim)
    }

    /// Examples per micro-step over all ranks (the pool).
    pub fn global_batch(&self) -> usize {
        self.global_batch
    }

    /// Micro-steps in one epoch: the text corpus's batches (`text`), or those and the paired
    /// corpus's (`text+paired`).
    pub fn micro_steps_per_epoch(&self) -> usize {
        match self.epoch_of {
            Some(n) => n as usize,
            None => self.text_sampler.batches_per_epoch(self.global_batch),
        }
    }

    /// Text or paired at `micro_step`: with `text`, the last of every `paired_every` steps of the
    /// run; with `text+paired`, the official code's rule, every step of an epoch (counted from 0)
    /// divisible by `paired_every`.
    pub fn kind_at(&self, micro_step: u64) -> BatchKind {
        kind_at(micro_step, self.paired_every, self.epoch_of)
    }

    /// This rank's share of the next global batch, advancing `position` by one micro-step.
    pub fn next(
        &mut self,
        position: &mut DataPosition,
        rank: usize,
        world: usize,
        device: &Device,
    ) -> Result<TwoViewBatch> {
        let kind = self.kind_at(position.micro_step);
        let (global, key_base) = match kind {
            BatchKind::Paired => {
                let sampler = self.paired_sampler.as_mut().expect("a paired corpus has a sampler");
                (sampler.next_batch(&mut position.paired_cursor, self.global_batch), PAIRED_KEY_BASE)
            }
            BatchKind::Text => {
                (self.text_sampler.next_batch(&mut position.text_cursor, self.global_batch), 0)
            }
        };
        let local = sampler::rank_slice(&global, rank, world);
        let keys = (0..2u64)
            .flat_map(|view| local.iter().map(move |&i| (view, i)))
            .map(|(view, i)| example_key(self.seed, position.micro_step, key_base + i as u64, view))
            .collect();
        position.micro_step += 1;
        let (sentences, teacher): (Vec<&str>, _) = match kind {
            BatchKind::Paired => {
                let batch =
                    self.paired.as_ref().expect("paired batches need the corpus").batch(local, device)?;
                let teacher =
                    TeacherFeatures { image: batch.image_features, caption: batch.caption_features };
                (batch.captions, Some(teacher))
            }
            BatchKind::Text => {
                (local.iter().map(|&i| self.text.sentences[i as usize].as_str()).collect(), None)
            }
        };
        let encoded = self.tokenizer.encode(&sentences)?;
        let rows: Vec<&Encoded> = encoded.iter().chain(&encoded).collect();
        let tokens = TokenBatch::pad(&rows, self.tokenizer.pad_id(), device)?;
        let dropout = Dropout::per_example(self.dropout.0, self.dropout.1, keys);
        Ok(TwoViewBatch { kind, examples: local.len(), tokens, dropout, teacher })
    }
}

/// The batch kind at `micro_step` with a paired batch every `paired_every` micro-steps, counted
/// over the run, or from 0 in each epoch of `epoch` micro-steps.
fn kind_at(micro_step: u64, paired_every: Option<u64>, epoch: Option<u64>) -> BatchKind {
    let paired = match (paired_every, epoch) {
        (None, _) => false,
        (Some(every), None) => micro_step % every == every - 1,
        (Some(every), Some(epoch)) => (micro_step % epoch).is_multiple_of(every),
    };
    if paired {
        BatchKind::Paired
    } else {
        BatchKind::Text
    }
}

/// The reference's mixing rule: one paired batch every `text batches // paired batches`.
fn reference_mixing(text: &Sampler, paired_len: usize, global_batch: usize) -> Result<u64> {
    let every = text.batches_per_epoch(global_batch) / (paired_len / global_batch).max(1);
    if every == 0 {
        bail!("the reference mixing rule (text batches // paired batches) gives 0 for this data: set data.paired_every");
    }
    Ok(every as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `text+paired` against the official loop (train_mix.py): an epoch of text batches + paired
    /// batches steps, `paired_sample_step = text // paired`, a paired batch where
    /// `step % paired_sample_step == 0` with `step` counted from 0 in each epoch. A corpus of 1000
    /// sentences and 300 captions in batches of 50 (whole batches: the official loaders keep a
    /// last partial batch, kdmcse drops it): 20 + 6 = 26 steps an epoch, every 3rd from 0 paired.
    #[test]
    fn text_plus_paired_places_paired_steps_as_the_official_loop() {
        let sampler = Sampler::new(1000, 1, TEXT_STREAM);
        let every = reference_mixing(&sampler, 300, 50).unwrap();
        assert_eq!(every, 20 / 6);
        let (text, paired) = (20u64, 6u64);
        let mut official = Vec::new();
        for _epoch in 0..3 {
            for step in 0..text + paired {
                official.push(step % every == 0);
            }
        }
        let ours: Vec<bool> = (0..official.len() as u64)
            .map(|s| kind_at(s, Some(every), Some(text + paired)) == BatchKind::Paired)
            .collect();
        assert_eq!(ours, official);
        // 9 of an epoch's 26 steps are paired (0, 3, ..., 24), not 6: the official loop's count.
        assert_eq!(official[..26].iter().filter(|&&p| p).count(), 9);
        // `text`: the last of every `every` steps, never reset.
        let text_rule: Vec<u64> =
            (0..12).filter(|&s| kind_at(s, Some(3), None) == BatchKind::Paired).collect();
        assert_eq!(text_rule, [2, 5, 8, 11]);
        assert!((0..10).all(|s| kind_at(s, None, Some(26)) == BatchKind::Text));
    }
}
