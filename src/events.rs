//! Structured events: one JSON object a line on standard output (`{"event": "...", ...}`), for
//! the tools and tests that follow a run. Human-readable logs go to standard error (tracing).

use std::io::Write;

/// Writes `{"event": name, ...fields}` as one line on standard output.
pub fn emit(name: &str, fields: serde_json::Value) {
    let mut record = serde_json::Map::new();
    record.insert("event".into(), name.into());
    if let serde_json::Value::Object(fields) = fields {
        record.extend(fields);
    }
    let line = serde_json::Value::Object(record).to_string();
    let mut out = std::io::stdout().lock();
    // An event nobody reads (a closed pipe) must not stop training.
    let _ = writeln!(out, "{line}").and_then(|_| out.flush());
}
