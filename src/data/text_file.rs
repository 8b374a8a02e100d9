//! Sentences from one text-corpus file, by its extension: `.txt` (a sentence a line), `.jsonl`
//! (a string field of each line's object), `.csv` and `.tsv` (a column named in the header row),
//! `.parquet` (a string column). The field or column is `data.text_field`. Every error names the
//! file and the line (or, in Parquet, the row); blank sentences are skipped and counted.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// The sentences of `path` (blank ones left out) and how many were blank.
pub fn read_sentences(path: &Path, field: &str) -> Result<(Vec<String>, usize)> {
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let all = match extension.as_str() {
        "jsonl" => jsonl(path, field)?,
        "csv" => delimited(path, field, b',')?,
        "tsv" => delimited(path, field, b'\t')?,
        "parquet" => parquet(path, field)?,
        _ => super::read_lines(path)?,
    };
    let total = all.len();
    let sentences: Vec<String> = all.into_iter().filter(|s| !s.trim().is_empty()).collect();
    let blank = total - sentences.len();
    Ok((sentences, blank))
}

fn jsonl(path: &Path, field: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (n, line) in super::read_lines(path)?.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), n + 1);
        let record: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}: not a JSON object", at()))?;
        match record.get(field) {
            Some(serde_json::Value::String(text)) => out.push(text.clone()),
            Some(other) => bail!("{}: field {field:?} is {other}, not a string", at()),
            None => bail!("{}: no field {field:?} (set data.text_field to the sentences' field)", at()),
        }
    }
    Ok(out)
}

fn delimited(path: &Path, field: &str, delimiter: u8) -> Result<Vec<String>> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .flexible(false)
        .from_path(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let headers = reader.headers().with_context(|| format!("{}:1: unreadable header row", path.display()))?;
    let Some(column) = headers.iter().position(|h| h.trim() == field) else {
        bail!(
            "{}:1: no column {field:?} in the header ({}): set data.text_field to the sentences' column",
            path.display(),
            headers.iter().collect::<Vec<_>>().join(", ")
        );
    };
    let mut out = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| {
            let line = e.position().map_or(0, |p| p.line());
            anyhow::anyhow!("{}:{line}: {e}", path.display())
        })?;
        out.push(record.get(column).expect("rows have the header's width (flexible is off)").to_owned());
    }
    Ok(out)
}

fn parquet(path: &Path, field: &str) -> Result<Vec<String>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;
    let file = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let reader =
        SerializedFileReader::new(file).with_context(|| format!("{}: not a Parquet file", path.display()))?;
    let schema = reader.metadata().file_metadata().schema_descr();
    if !schema.columns().iter().any(|c| c.name() == field) {
        let names: Vec<&str> = schema.columns().iter().map(|c| c.name()).collect();
        bail!(
            "{}: no column {field:?} ({}): set data.text_field to the sentences' column",
            path.display(),
            names.join(", ")
        );
    }
    let projection = parquet::schema::types::Type::group_type_builder(schema.root_schema().name())
        .with_fields(
            schema.root_schema().get_fields().iter().filter(|f| f.name() == field).cloned().collect(),
        )
        .build()?;
    let rows = reader
        .get_row_iter(Some(projection))
        .with_context(|| format!("{}: cannot read column {field:?}", path.display()))?;
    let mut out = Vec::new();
    for (row, record) in rows.enumerate() {
        let record = record.with_context(|| format!("{}: row {}", path.display(), row + 1))?;
        match record.get_column_iter().next().map(|(_, value)| value) {
            Some(Field::Str(text)) => out.push(text.clone()),
            Some(Field::Null) | None => out.push(String::new()),
            Some(other) => {
                bail!("{}: row {}: column {field:?} is {other}, not a string", path.display(), row + 1)
            }
        }
    }
    Ok(out)
}
