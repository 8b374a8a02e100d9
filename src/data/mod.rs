//! Turning data into model inputs: corpora (text, and captions paired with teacher features),
//! the epoch sampler with its cursor and sharding, and tokenisation.

pub mod corpus;
pub mod sampler;
pub mod tokenize;

pub use corpus::{PairedBatch, PairedCorpus, TextCorpus};
pub use sampler::{Cursor, Sampler};
pub use tokenize::{Encoded, TokenBatch, Tokenizer};
