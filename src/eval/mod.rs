//! Sentence-similarity evaluation with the SentEval protocol (METHOD.md, "Evaluation protocol"):
//! STS12-16 scored "all" over their concatenated subsets, STS-B and SICK-R test sets, cosine of
//! the two embeddings, Spearman x100.

pub mod spearman;
pub mod sts;

pub use spearman::spearman;
pub use sts::{load_stsb_dev, load_task, Task, TaskData};

use candle_core::{DType, Tensor};

/// Spearman x100 (rounded to 2 decimals) between the gold scores and the cosines of the rows of
/// `embeddings`: the first `n` rows embed `data.first`, the next `n` rows `data.second`.
pub fn sts_score(embeddings: &Tensor, data: &TaskData) -> anyhow::Result<f64> {
    let n = data.len();
    let (a, b) = (embeddings.narrow(0, 0, n)?, embeddings.narrow(0, n, n)?);
    let dot = (&a * &b)?.sum(1)?;
    let norms = (a.sqr()?.sum(1)?.sqrt()? * b.sqr()?.sum(1)?.sqrt()?)?;
    let cosines: Vec<f64> = dot.div(&norms)?.to_dtype(DType::F64)?.to_vec1()?;
    Ok(round2(spearman(&cosines, &data.gold) * 100.0))
}

/// Rounds to 2 decimals, as scores are reported.
pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

impl TaskData {
    /// Both sides' sentences, first then second (the row order [`sts_score`] expects).
    pub fn sentences(&self) -> Vec<&str> {
        self.first.iter().chain(&self.second).map(String::as_str).collect()
    }
}
