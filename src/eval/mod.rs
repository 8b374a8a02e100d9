//! Sentence-similarity evaluation with the SentEval protocol (METHOD.md, "Evaluation protocol"):
//! STS12-16 scored "all" over their concatenated subsets, STS-B and SICK-R test sets, cosine of
//! the two embeddings, Spearman x100.

pub mod spearman;
pub mod sts;

pub use spearman::spearman;
pub use sts::{load_task, Task, TaskData};
