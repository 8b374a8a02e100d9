//! Turning data into model inputs: corpora (text, and captions paired with teacher features),
//! the epoch sampler with its cursor and sharding, tokenisation, and the captioned-image lists
//! `kdmcse precompute` reads.

pub mod captions;
pub mod corpus;
pub mod sampler;
pub mod text_file;
pub mod tokenize;

pub use corpus::{CorpusDigest, PairedBatch, PairedCorpus, TextCorpus};
pub use sampler::{Cursor, DataPosition, Sampler};
pub use tokenize::{Encoded, TokenBatch, Tokenizer};

use std::path::Path;

use anyhow::{bail, Context, Result};

/// The lines of a text file (without their `\n` or `\r\n`); a line that is not UTF-8 is an
/// error naming the file and the line.
pub fn read_lines(path: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut lines = Vec::new();
    for (n, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        match std::str::from_utf8(raw) {
            Ok(line) => lines.push(line.to_owned()),
            Err(e) => bail!(
                "{}:{}: not UTF-8 text (invalid byte at column {})",
                path.display(),
                n + 1,
                e.valid_up_to() + 1
            ),
        }
    }
    if bytes.ends_with(b"\n") {
        lines.pop(); // the final newline ends the last line; it does not start another
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    #[test]
    fn lines_keep_their_numbers_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("corpus.txt");
        std::fs::write(&path, b"one\r\ntwo\n\nfour\n").unwrap();
        assert_eq!(super::read_lines(&path).unwrap(), ["one", "two", "", "four"]);
        std::fs::write(&path, b"fine\nalso fine\nbad \xff byte\n").unwrap();
        let err = super::read_lines(&path).unwrap_err().to_string();
        assert!(err.contains(&format!("{}:3", path.display())) && err.contains("column 5"), "{err}");
    }
}
