//! kdmcse: multimodal sentence embeddings trained with KDMCSE.
//!
//! The library holds the method (model, losses, data, evaluation); the `kdmcse` binary and the
//! launcher build the training application on top of it.

pub mod data;
pub mod embed;
pub mod eval;
pub mod loss;
pub mod model;
