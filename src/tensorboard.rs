//! TensorBoard event files: scalars as TensorFlow `Event` protobufs in TFRecord framing, the
//! format TensorBoard, W&B (`sync_tensorboard`) and MLflow read.
//!
//! A TFRecord is `length: u64, masked_crc32c(length): u32, data, masked_crc32c(data): u32`
//! (little endian). Each run (a start or a resume) writes a file of its own that begins with
//! `Event { file_version: "brain.Event:2" }` and `SessionLog { status: START }` at the run's first
//! step, which makes TensorBoard drop what earlier files recorded from that step on: the steps a
//! crashed run took after its last checkpoint, or a whole run that `--overwrite` replaced.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use prost::Message;

/// `tensorflow/core/util/event.proto`, the fields kdmcse writes.
#[derive(Clone, PartialEq, Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(string, optional, tag = "3")]
    file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    summary: Option<Summary>,
    #[prost(message, optional, tag = "7")]
    session_log: Option<SessionLog>,
}

/// `tensorflow/core/framework/summary.proto`: scalars only.
#[derive(Clone, PartialEq, Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

#[derive(Clone, PartialEq, Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
}

#[derive(Clone, PartialEq, Message)]
struct SessionLog {
    /// 1 = START.
    #[prost(int32, tag = "1")]
    status: i32,
}

const SESSION_START: i32 = 1;

/// TFRecord's checksum: CRC32C, rotated and offset so that a CRC of data holding CRCs stays
/// well distributed.
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One event file being appended to.
pub struct EventWriter {
    file: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// A new event file in `dir`, named as TensorFlow names them so that TensorBoard finds it and
    /// orders it after earlier ones; `first_step` is the step of the first record to come.
    pub fn create(dir: &Path, first_step: u64) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let host = host.trim();
        let name = format!(
            "events.out.tfevents.{:010}.{}.{}.{}",
            now.as_secs(),
            if host.is_empty() { "kdmcse" } else { host },
            std::process::id(),
            now.subsec_nanos()
        );
        let path = dir.join(name);
        let file = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut writer = Self { file: BufWriter::new(file), path };
        writer.record(&Event { file_version: Some("brain.Event:2".into()), ..Self::event(0) })?;
        let start =
            Event { session_log: Some(SessionLog { status: SESSION_START }), ..Self::event(first_step) };
        writer.record(&start)?;
        writer.flush()?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn event(step: u64) -> Event {
        let wall_time = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        Event { wall_time, step: step as i64, file_version: None, summary: None, session_log: None }
    }

    /// The scalars of one step (tag, value), as one event.
    pub fn scalars(&mut self, step: u64, scalars: &[(&str, f64)]) -> Result<()> {
        let value = scalars
            .iter()
            .map(|&(tag, v)| SummaryValue { tag: tag.into(), simple_value: Some(v as f32) })
            .collect();
        self.record(&Event { summary: Some(Summary { value }), ..Self::event(step) })?;
        self.flush()
    }

    fn record(&mut self, event: &Event) -> Result<()> {
        let data = event.encode_to_vec();
        let len = (data.len() as u64).to_le_bytes();
        let frame = [&len[..], &masked_crc(&len).to_le_bytes(), &data, &masked_crc(&data).to_le_bytes()];
        for part in frame {
            self.file.write_all(part).with_context(|| format!("cannot write {}", self.path.display()))?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        self.file.flush().with_context(|| format!("cannot write {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CRC32C's check value (RFC 3720), and masked CRCs as TensorBoard's own reader computes them
    /// (`tensorboard.compat.tensorflow_stub.pywrap_tensorflow.masked_crc32c`, tensorboard 2.21).
    #[test]
    fn checksums_are_tfrecords() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(masked_crc(&0u64.to_le_bytes()), 0x0798_0329);
        assert_eq!(masked_crc(b"kdmcse"), 0x8381_e2cc);
    }
}
