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

use crate::ops::{
    angular_cross_entropy, angular_cross_entropy_serves, l2_normalize, AngularTerm, COS_CLAMP, MASKED_LOGIT,
};

/// Cosine similarity matrix `[rows, cols]`.
pub fn cosine_matrix(rows: &Tensor, cols: &Tensor) -> Result<Tensor> {
    unit_products(&l2_normalize(rows)?, &l2_normalize(cols)?)
}

/// `rows x cols^T` of unit vectors: their cosine matrix.
fn unit_products(rows: &Tensor, cols: &Tensor) -> Result<Tensor> {
    crate::ops::matmul(rows, &cols.t()?)
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

/// One InfoNCE term over the cosines `cos` `[rows, cols]`: the mean over rows of the
/// cross-entropy of `angular_logits / temp` with target `row_offset + i`, the negatives whose
/// `filter` score (scores `[rows, cols]`, threshold) exceeds the threshold left out of the
/// softmax; and with a filter, how many it left out (an f64 scalar, read with [`removed_count`], so a
/// caller reads it once, on the host). One fused pass each way where a kernel serves (f32 on the
/// CPU or CUDA), [`angular_infonce_composed`] elsewhere.
pub fn angular_infonce(
    cos: &Tensor,
    margin: Margin,
    filter: Option<(&Tensor, f64)>,
    temp: f64,
    row_offset: usize,
) -> Result<(Tensor, Option<Tensor>)> {
    let term = AngularTerm {
        temp,
        margin: margin.base(),
        similarity: match margin {
            Margin::Fixed(_) => None,
            Margin::Adaptive { teacher_similarity, .. } => Some(teacher_similarity.detach()),
        },
        filter: filter.map(|(scores, threshold)| (scores.detach(), threshold)),
        row_offset,
    };
    if !angular_cross_entropy_serves(cos, &term) {
        return angular_infonce_composed(cos, margin, filter, temp, row_offset);
    }
    let per_row = angular_cross_entropy(cos, &term)?;
    // Summed in f64: a pool's count can pass f32's exact integers.
    let removed = filter.map(|_| per_row.narrow(1, 1, 1)?.to_dtype(DType::F64)?.sum_all()).transpose()?;
    Ok((per_row.narrow(1, 0, 1)?.mean_all()?, removed))
}

/// The count of removed negatives [`angular_infonce`] returned (0 without a filter).
pub fn removed_count(removed: Option<&Tensor>) -> Result<usize> {
    removed.map_or(Ok(0), |r| Ok(r.to_scalar::<f64>()? as usize))
}

/// [`angular_infonce`] from candle's primitives, the reference for the fused kernel.
pub fn angular_infonce_composed(
    cos: &Tensor,
    margin: Margin,
    filter: Option<(&Tensor, f64)>,
    temp: f64,
    row_offset: usize,
) -> Result<(Tensor, Option<Tensor>)> {
    let logits = (angular_logits(cos, margin, row_offset)? / temp)?;
    let Some((scores, threshold)) = filter else {
        return Ok((cross_entropy_diagonal(&logits, row_offset)?, None));
    };
    let mask = filter_mask(scores, threshold, row_offset)?;
    let removed = mask.to_dtype(DType::F64)?.sum_all()?;
    Ok((cross_entropy_diagonal(&(logits + (mask * MASKED_LOGIT)?)?, row_offset)?, Some(removed)))
}

/// f32 `[rows, cols]`, 1 where `scores` exceeds `threshold` off the diagonal.
fn filter_mask(scores: &Tensor, threshold: f64, row_offset: usize) -> Result<Tensor> {
    let (rows, cols) = scores.dims2()?;
    scores.gt(threshold)?.to_dtype(DType::F32)?.mul(&off_diagonal(rows, cols, row_offset, scores.device())?)
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
    /// f32 `[rows, cols]`: the score of `row_features[i]` against `col_features[j]`.
    pub fn scores(&self, row_features: &Tensor, col_features: &Tensor) -> Result<Tensor> {
        match self.score {
            FilterScore::RawDot => crate::ops::matmul(row_features, &col_features.t()?),
            FilterScore::Cosine => cosine_matrix(row_features, col_features),
        }
    }

    /// f32 `[rows, cols]`, 1 where the negative (row item, column item) is removed: its score
    /// exceeds the threshold and `j != row_offset + i`.
    pub fn mask(&self, row_features: &Tensor, col_features: &Tensor, row_offset: usize) -> Result<Tensor> {
        filter_mask(&self.scores(row_features, col_features)?, self.threshold, row_offset)
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
        Ok(angular_infonce(&cos, Margin::Fixed(self.margin_text), None, self.temp, row_offset)?.0)
    }

    /// `L_img + L_cap`, each the mean of the two views' terms; and the count of filtered negatives.
    pub fn grounding_term(&self, g: &Grounding, row_offset: usize) -> Result<(Tensor, usize)> {
        // Each input normalised once, though it enters two cosine matrices.
        let [p1, p2, v, t, img_rows, img_cols, cap_rows, cap_cols] =
            [g.p1, g.p2, g.v, g.t, g.img_rows, g.img_cols, g.cap_rows, g.cap_cols].map(l2_normalize);
        let (p1, p2, v, t) = (p1?, p2?, v?, t?);
        let (vv, cc) = (unit_products(&img_rows?, &img_cols?)?, unit_products(&cap_rows?, &cap_cols?)?);
        // Image term: row i (caption i) vs image j; caption term: row i (image i) vs caption j.
        let (scores_pv, scores_pt) = match self.negative_filter() {
            Some(f) => (Some(f.scores(g.cap_rows, g.img_cols)?), Some(f.scores(g.img_rows, g.cap_cols)?)),
            None => (None, None),
        };
        let term = |cols: &Tensor,
                    similarity: &Tensor,
                    scores: Option<&Tensor>|
         -> Result<(Tensor, Option<Tensor>)> {
            let margin = Margin::Adaptive { base: self.margin_vl, teacher_similarity: similarity };
            let filter = scores.map(|s| (s, self.filter_threshold));
            let view = |p: &Tensor| {
                angular_infonce(&unit_products(p, cols)?, margin, filter, self.temp_vl, row_offset)
            };
            // Both views share the teacher's scores: the removed negatives are counted once.
            let ((view1, removed), (view2, _)) = (view(&p1)?, view(&p2)?);
            Ok((((view1 + view2)? / 2.0)?, removed))
        };
        let (image, removed_pv) = term(&v, &vv, scores_pv.as_ref())?;
        let (caption, removed_pt) = term(&t, &cc, scores_pt.as_ref())?;
        // One read of the two counts: each read waits for the device.
        let removed = match (removed_pv, removed_pt) {
            (Some(pv), Some(pt)) => Some((pv + pt)?),
            _ => None,
        };
        Ok(((image + caption)?, removed_count(removed.as_ref())?))
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

    /// The fused term against the composed one on the CPU: loss, removed negatives and the
    /// cosines' gradient (to 1e-5, relative above 1), for margins 0, fixed and adaptive, with and
    /// without the filter, rows from an offset, and cosines at, beyond and inside the clamp
    /// (a positive at 1 included).
    #[test]
    fn fused_term_matches_composed() {
        let device = Device::Cpu;
        let (rows, cols, offset) = (6, 11, 3);
        let uniform = |lo: f32, hi: f32| Tensor::rand(lo, hi, (rows, cols), &device).unwrap();
        let mut data = uniform(-0.99, 0.99).flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (at, value) in [(offset, 1.0), (1, -1.0), (cols + 2, 1.000_000_1), (2 * cols + 7, 0.999_999_9)] {
            data[at] = value;
        }
        let cos = candle_core::Var::from_vec(data, (rows, cols), &device).unwrap();
        let (similarity, scores) = (uniform(-1.0, 1.0), uniform(0.0, 1.0));
        for (margin, filter) in [
            (Margin::Fixed(0.0), None),
            (Margin::Fixed(0.15), None),
            (Margin::Adaptive { base: 0.15, teacher_similarity: &similarity }, Some((&scores, 0.6))),
            (Margin::Adaptive { base: 0.5, teacher_similarity: &similarity }, None),
            (Margin::Adaptive { base: 0.0, teacher_similarity: &similarity }, Some((&scores, 0.3))),
        ] {
            let what = format!("{margin:?}, filter {}", filter.is_some());
            let (fused, removed) = angular_infonce(cos.as_tensor(), margin, filter, 0.05, offset).unwrap();
            let (composed, expected) =
                angular_infonce_composed(cos.as_tensor(), margin, filter, 0.05, offset).unwrap();
            let (removed, expected) =
                (removed_count(removed.as_ref()).unwrap(), removed_count(expected.as_ref()).unwrap());
            assert_eq!(removed, expected, "{what}: removed");
            assert!(filter.is_none() || removed > 0, "{what}: the filter removed nothing");
            let (f, c) = (scalar(&fused).unwrap(), scalar(&composed).unwrap());
            assert!((f - c).abs() <= 1e-5 * c.abs().max(1.0), "{what}: loss {f} vs {c}");
            let (gf, gc) = (fused.backward().unwrap(), composed.backward().unwrap());
            let flat = |g: &candle_core::backprop::GradStore| {
                g.get(cos.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
            };
            let (gf, gc) = (flat(&gf), flat(&gc));
            for (i, (a, b)) in gf.iter().zip(&gc).enumerate() {
                assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{what}: dcos[{i}] {a} vs {b}");
            }
            assert_eq!(gf[offset], 0.0, "{what}: a clamped cosine takes no gradient");
            assert!(gc.iter().any(|g| g.abs() > 1e-3), "{what}: degenerate gradient");
        }
    }

    /// Cosines and teacher matrices of different shapes, or a row offset past the columns, are
    /// refused with both shapes named.
    #[test]
    fn mismatched_shapes_are_refused() {
        let device = Device::Cpu;
        let cos = Tensor::zeros((4, 6), DType::F32, &device).unwrap();
        let similarity = Tensor::zeros((4, 5), DType::F32, &device).unwrap();
        let margin = Margin::Adaptive { base: 0.15, teacher_similarity: &similarity };
        let err = angular_infonce(&cos, margin, None, 0.05, 0).unwrap_err().to_string();
        assert!(err.contains("[4, 5]") && err.contains("[4, 6]"), "{err}");
        let err = angular_infonce(&cos, Margin::Fixed(0.1), None, 0.05, 3).unwrap_err().to_string();
        assert!(err.contains("4 rows from column 3 of 6"), "{err}");
    }

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
