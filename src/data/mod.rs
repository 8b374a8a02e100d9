//! Turning text into model inputs. (Corpora, the paired teacher corpus and sharding join here
//! with the training issues.)

pub mod tokenize;

pub use tokenize::{Encoded, TokenBatch, Tokenizer};
