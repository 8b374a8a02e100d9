//! The KDMCSE objective as plain functions of tensors (METHOD.md, "Angular similarity",
//! "Noisy-negative filter", "Loss").
//!
//! One design throughout: every function takes `rows` (the anchors a caller computes the loss
//! of) and `cols` (the whole batch: the negative pool) plus `row_offset`, the index in `cols` of
//! the first row: row `i` is positive with column `row_offset + i`. Rows may be any contiguous
//! slice of the batch -- a rank's own examples against columns gathered from every rank (open_clip's
//! `ClipLoss`), which is what the trainer passes, so each rank's cost falls as ranks are added --
//! or all of it (offset 0). The golden tests check both uses.
//! SimCSE and MCSE are this objective with margins 0 and, for SimCSE, no grounding term.

use candle_core::{DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::model::heads::l2_normalize;

/// Cosines are clamped to this distance from +-1 before the angle is taken (acos has an infinite
/// derivative at +-1).
const COS_CLAMP: f64 = 1e-6;
/// What the reference adds to a filtered negative's logit: it drops out of the softmax.
const MASKED_LOGIT: f64 = -99999.99;

/// Cosine similarity matrix `[rows, cols]`.
pub fn cosine_matrix(rows: &Tensor, cols: &Tensor) -> Result<Tensor> {
    l2_normalize(rows)?.matmul(&l2_normalize(cols)?.t()?)
}

/// 1 off the diagonal, 0 at `(i, row_offset + i)`, as f32 `[rows, cols]`.
fn off_diagonal(rows: usize, cols: usize, row_offset: usize, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> =
        (0..rows).flat_map(|i| (0..cols).map(move |j| if j == row_offset + i { 0.0 } else { 1.0 })).collect();
    Tensor::from_vec(data, (rows, cols), device)
}

/// The angular margin of the negatives.
#[derive(Debug, Clone, Copy)]
pub enum Margin<'a> {
    /// `m_ij = m` (the text-text term).
    Fixed(f64),
    /// `m_ij = (1 - s_ij) * m` with `s` the teacher's similarity of items i and j.
    Adaptive { base: f64, teacher_similarity: &'a Tensor },
}

impl Margin<'_> {
    fn base(&self) -> f64 {
        match *self {
            Margin::Fixed(m) | Margin::Adaptive { base: m, .. } => m,
        }
    }
}

/// `cos(theta'_ij)`: negatives whose angle exceeds the base margin have it reduced by `m_ij`;
/// positives and negatives within the margin keep their (clamped) cosine.
pub fn angular_logits(cos: &Tensor, margin: Margin, row_offset: usize) -> Result<Tensor> {
    let (lo, hi) = (-1.0 + COS_CLAMP, 1.0 - COS_CLAMP);
    // torch.clamp semantics: entries beyond the bounds take the bound and get no gradient.
    let inside = cos.ge(lo)?.mul(&cos.le(hi)?)?;
    let c = inside.where_cond(cos, &cos.clamp(lo, hi)?.detach())?;
    let base = margin.base();
    if base == 0.0 {
        return Ok(c);
    }
    let (rows, cols) = c.dims2()?;
    // theta > m  <=>  cos(theta) < cos(m); never on the diagonal.
    let gate = c.detach().lt(base.cos())?.to_dtype(DType::F32)?.mul(&off_diagonal(
        rows,
        cols,
        row_offset,
        c.device(),
    )?)?;
    // cos(theta - m) = cos(theta) cos(m) + sin(theta) sin(m), sin(theta) = sqrt(1 - cos^2) >= 0.
    let sin_theta = (1.0 - c.sqr()?)?.sqrt()?;
    let shifted = match margin {
        Margin::Fixed(m) => ((&c * m.cos())? + (sin_theta * m.sin())?)?,
        Margin::Adaptive { base, teacher_similarity } => {
            let m = ((1.0 - teacher_similarity.detach())? * base)?;
            (c.mul(&m.cos()?)? + sin_theta.mul(&m.sin()?)?)?
        }
    };
    &c + gate.mul(&(shifted - &c)?)?
}

/// Cross-entropy with target `row_offset + i` for row `i`, mean over rows.
pub fn cross_entropy_diagonal(logits: &Tensor, row_offset: usize) -> Result<Tensor> {
    let rows = logits.dim(0)?;
    let targets = Tensor::arange(row_offset as u32, (row_offset + rows) as u32, logits.device())?;
    candle_nn::loss::cross_entropy(logits, &targets)
}

/// How the noisy-negative filter scores an (item, item) pair with teacher features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum FilterScore {
    /// Dot product of the raw, unnormalised features (the reference code).
    RawDot,
    /// Cosine of the features.
    Cosine,
}

/// Removes negatives the teacher scores above `threshold` from the softmax.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NegativeFilter {
    pub score: FilterScore,
    pub threshold: f64,
}

impl NegativeFilter {
    /// f32 `[rows, cols]`, 1 where the negative (row item, column item) is removed: the score of
    /// `row_features[i]` against `col_features[j]` exceeds the threshold and `j != row_offset + i`.
    pub fn mask(&self, row_features: &Tensor, col_features: &Tensor, row_offset: usize) -> Result<Tensor> {
        let scores = match self.score {
            FilterScore::RawDot => row_features.matmul(&col_features.t()?)?,
            FilterScore::Cosine => cosine_matrix(row_features, col_features)?,
        };
        let (rows, cols) = scores.dims2()?;
        scores.gt(self.threshold)?.to_dtype(DType::F32)?.mul(&off_diagonal(
            rows,
            cols,
            row_offset,
            scores.device(),
        )?)
    }
}

/// Which objective trains the student.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjectiveKind {
    /// Text-text InfoNCE on text batches only (margin_text may be set: SimCSE + angular margin).
    Simcse,
    /// Text-text plus grounding terms on paired batches, no margins, no filter.
    Mcse,
    /// MCSE with angular margins (fixed m1, teacher-adaptive m2) and the optional filter.
    Kdmcse,
}

/// The objective and its hyper-parameters: the `[loss]` section of a training config. SimCSE:
/// `margin_text = 0` and text batches only; MCSE: both margins 0, no filter; KDMCSE: margins
/// (paper 0.15) and optionally the filter.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Objective {
    #[serde(rename = "objective")]
    pub kind: ObjectiveKind,
    /// tau of the text-text term.
    pub temp: f64,
    /// tau of the cross-modal terms.
    pub temp_vl: f64,
    /// Weight of the cross-modal terms.
    pub lambda: f64,
    /// m1: fixed angular margin of the text-text term.
    pub margin_text: f64,
    /// m2: base of the adaptive margin of the cross-modal terms.
    pub margin_vl: f64,
    /// The noisy-negative filter's score: `"off"`, `"cosine"` or `"raw_dot"`.
    #[serde(with = "filter_setting")]
    pub filter: Option<FilterScore>,
    pub filter_threshold: f64,
}

impl Default for Objective {
    /// The reference scripts' KDMCSE settings (filter off).
    fn default() -> Self {
        Self {
            kind: ObjectiveKind::Kdmcse,
            temp: 0.05,
            temp_vl: 0.05,
            lambda: 0.01,
            margin_text: 0.15,
            margin_vl: 0.15,
            filter: None,
            filter_threshold: 0.8,
        }
    }
}

/// `filter = "off" | "cosine" | "raw_dot"` as an `Option<FilterScore>`.
mod filter_setting {
    use super::FilterScore;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Setting {
        Off,
        Cosine,
        RawDot,
    }

    pub fn serialize<S: Serializer>(filter: &Option<FilterScore>, s: S) -> Result<S::Ok, S::Error> {
        match filter {
            None => Setting::Off,
            Some(FilterScore::Cosine) => Setting::Cosine,
            Some(FilterScore::RawDot) => Setting::RawDot,
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<FilterScore>, D::Error> {
        Ok(match Setting::deserialize(d)? {
            Setting::Off => None,
            Setting::Cosine => Some(FilterScore::Cosine),
            Setting::RawDot => Some(FilterScore::RawDot),
        })
    }
}

/// The grounding side of a paired batch: student projections of both views for the local rows,
/// teacher-head outputs and raw teacher features for the local rows and the global columns.
pub struct Grounding<'a> {
    /// Grounding projections of view 1 and view 2 (local rows, normalised).
    pub p1: &'a Tensor,
    pub p2: &'a Tensor,
    /// Image / caption head outputs of the global batch (columns, normalised).
    pub v: &'a Tensor,
    pub t: &'a Tensor,
    /// Raw teacher image / caption features of the local rows and of the global batch.
    pub img_rows: &'a Tensor,
    pub cap_rows: &'a Tensor,
    pub img_cols: &'a Tensor,
    pub cap_cols: &'a Tensor,
}

/// The loss terms of one batch (scalar tensors) and what the filter removed.
pub struct LossTerms {
    /// `L_tt`, the text-text term.
    pub text: Tensor,
    /// `L_img + L_cap`, the grounding term of a paired batch.
    pub grounding: Option<Tensor>,
    pub total: Tensor,
    /// Negatives removed by the filter, image term plus caption term.
    pub masked_negatives: usize,
}

/// How a reported number of several batches (a step's micro-batches, the ranks' rows) becomes
/// one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combine {
    /// The mean over the batches that report it.
    Mean,
    Sum,
}

/// One number the objective reports for a batch, by its metrics name (`metrics.jsonl`'s key,
/// TensorBoard's `train/<name>`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reported {
    pub name: &'static str,
    pub value: f64,
    pub combine: Combine,
}

impl LossTerms {
    /// Every number the batch reports: the total (`loss`), each term, what the filter removed.
    pub fn reported(&self) -> Result<Vec<Reported>> {
        let mean = |name, t: &Tensor| -> Result<Reported> {
            Ok(Reported { name, value: scalar(t)?, combine: Combine::Mean })
        };
        let mut out = vec![mean("loss", &self.total)?, mean("loss_text", &self.text)?];
        if let Some(grounding) = &self.grounding {
            out.push(mean("loss_grounding", grounding)?);
        }
        let masked = self.masked_negatives as f64;
        out.push(Reported { name: "masked_negatives", value: masked, combine: Combine::Sum });
        Ok(out)
    }
}

/// The numbers of several batches as one list, each name once (in the order it first appears),
/// combined as it says; sums run in batch order, so every rank gets the same bits.
pub fn combine(batches: &[Vec<Reported>]) -> Vec<Reported> {
    let mut out: Vec<(Reported, usize)> = Vec::new();
    for reported in batches.iter().flatten() {
        match out.iter_mut().find(|(r, _)| r.name == reported.name) {
            Some((r, count)) => {
                r.value += reported.value;
                *count += 1;
            }
            None => out.push((*reported, 1)),
        }
    }
    out.into_iter()
        .map(|(r, count)| match r.combine {
            Combine::Mean => Reported { value: r.value / count as f64, ..r },
            Combine::Sum => r,
        })
        .collect()
}

impl Objective {
    /// Whether the objective reads paired batches (captions with teacher features).
    pub fn uses_paired_data(&self) -> bool {
        self.kind != ObjectiveKind::Simcse
    }

    /// The noisy-negative filter, if on.
    pub fn negative_filter(&self) -> Option<NegativeFilter> {
        self.filter.map(|score| NegativeFilter { score, threshold: self.filter_threshold })
    }

    /// `L_tt`: InfoNCE over angular logits of view 1 (rows) against view 2 (columns).
    pub fn text_term(&self, z1_rows: &Tensor, z2_cols: &Tensor, row_offset: usize) -> Result<Tensor> {
        let cos = cosine_matrix(z1_rows, z2_cols)?;
        let logits = angular_logits(&cos, Margin::Fixed(self.margin_text), row_offset)?;
        cross_entropy_diagonal(&(logits / self.temp)?, row_offset)
    }

    /// `L_img + L_cap`, each the mean of the two views' terms; and the count of filtered negatives.
    pub fn grounding_term(&self, g: &Grounding, row_offset: usize) -> Result<(Tensor, usize)> {
        let vv = cosine_matrix(g.img_rows, g.img_cols)?;
        let cc = cosine_matrix(g.cap_rows, g.cap_cols)?;
        // Image term: row i (caption i) vs image j; caption term: row i (image i) vs caption j.
        let (mask_pv, mask_pt) = match self.negative_filter() {
            Some(f) => (
                Some(f.mask(g.cap_rows, g.img_cols, row_offset)?),
                Some(f.mask(g.img_rows, g.cap_cols, row_offset)?),
            ),
            None => (None, None),
        };
        let term = |cols: &Tensor, similarity: &Tensor, mask: &Option<Tensor>| -> Result<Tensor> {
            let margin = Margin::Adaptive { base: self.margin_vl, teacher_similarity: similarity };
            let view = |p: &Tensor| -> Result<Tensor> {
                let logits = (angular_logits(&cosine_matrix(p, cols)?, margin, row_offset)? / self.temp_vl)?;
                let logits = match mask {
                    Some(mask) => (logits + (mask * MASKED_LOGIT)?)?,
                    None => logits,
                };
                cross_entropy_diagonal(&logits, row_offset)
            };
            (view(g.p1)? + view(g.p2)?)? / 2.0
        };
        let grounding = (term(g.v, &vv, &mask_pv)? + term(g.t, &cc, &mask_pt)?)?;
        let count = |m: &Option<Tensor>| -> Result<usize> {
            match m {
                Some(m) => Ok(m.sum_all()?.to_scalar::<f32>()? as usize),
                None => Ok(0),
            }
        };
        Ok((grounding, count(&mask_pv)? + count(&mask_pt)?))
    }

    /// `L_tt` for a text batch; `L_tt + lambda * (L_img + L_cap)` for a paired batch.
    pub fn compute(
        &self,
        z1_rows: &Tensor,
        z2_cols: &Tensor,
        grounding: Option<&Grounding>,
        row_offset: usize,
    ) -> Result<LossTerms> {
        let text = self.text_term(z1_rows, z2_cols, row_offset)?;
        match grounding {
            None => Ok(LossTerms { total: text.clone(), text, grounding: None, masked_negatives: 0 }),
            Some(g) => {
                let (grounding, masked_negatives) = self.grounding_term(g, row_offset)?;
                let total = (&text + (&grounding * self.lambda)?)?;
                Ok(LossTerms { text, grounding: Some(grounding), total, masked_negatives })
            }
        }
    }
}

/// Reads a scalar loss tensor (rank 0 or `[1]`) as f64.
pub fn scalar(t: &Tensor) -> Result<f64> {
    t.to_dtype(DType::F64)?.flatten_all()?.get(0)?.to_scalar::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reported(name: &'static str, value: f64, combine: Combine) -> Reported {
        Reported { name, value, combine }
    }

    /// Means over the batches that report a number, sums as sums, names in first-seen order.
    #[test]
    fn reported_numbers_combine_by_name() {
        let text =
            vec![reported("loss", 1.0, Combine::Mean), reported("masked_negatives", 0.0, Combine::Sum)];
        let paired = vec![
            reported("loss", 3.0, Combine::Mean),
            reported("loss_grounding", 5.0, Combine::Mean),
            reported("masked_negatives", 4.0, Combine::Sum),
        ];
        let combined = combine(&[text, paired]);
        let got: Vec<(&str, f64)> = combined.iter().map(|r| (r.name, r.value)).collect();
        assert_eq!(got, [("loss", 2.0), ("masked_negatives", 4.0), ("loss_grounding", 5.0)]);
    }
}
