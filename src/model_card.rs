//! The `README.md` of an export, in sentence-transformers' model-card shape: YAML front matter the
//! Hugging Face Hub reads (library, pipeline, tags, base model, datasets, metrics), then what the
//! model is, how it was trained (objective, data, steps, batch, the STS-B dev best, pooling), how
//! to load it, and the run's whole `config.toml`.

use std::fmt::Write;
use std::path::Path;

use crate::config::{TrainConfig, DEFAULT_GLOBAL_BATCH};
use crate::model::Pooling;

/// What a card states about its checkpoint besides the config.
pub struct CardFacts<'a> {
    pub checkpoint: &'a str,
    pub step: u64,
    pub best: Option<(f64, u64)>,
    pub pooling: Pooling,
    pub dim: usize,
    /// SentEval STS results of the export (task, Spearman x100), when it was evaluated.
    pub sts: &'a [(String, f64)],
}

/// A folder's or file's name: what a card can say of a local path.
fn name_of(path: &Path) -> String {
    path.file_name().map_or_else(|| path.to_string_lossy().into_owned(), |n| n.to_string_lossy().into_owned())
}

/// A config value as the config file writes it (`kdmcse`, `cls`, `cosine`).
fn config_name<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".into(),
    }
}

/// YAML's double-quoted string.
fn quoted(text: &str) -> String {
    serde_json::to_string(text).expect("a string serialises")
}

/// The card of an export of a run with config `cfg` (as TOML text `config_toml`).
pub fn model_card(cfg: &TrainConfig, config_toml: &str, facts: &CardFacts) -> String {
    // A Hub id is the base model's name on the Hub; of a local folder only its name says anything.
    let base = crate::hub::hub_id(&cfg.model.path).map_or_else(|| name_of(&cfg.model.path), |id| id.repo);
    let mut card = String::new();
    front_matter(&mut card, cfg, &base);
    // Writing to a String cannot fail.
    let _ = writeln!(
        card,
        "# {base} fine-tuned with {}\n\nA sentence-embedding model ({} dimensions, {} pooling, cosine \
         similarity) trained by kdmcse from `{base}`: contrastive \
         learning on two dropout views of each sentence, grounded in a frozen CLIP teacher's image and \
         caption features that set adaptive angular margins and filter noisy negatives.\n",
        config_name(&cfg.loss.kind),
        facts.dim,
        config_name(&facts.pooling)
    );
    training(&mut card, cfg, facts);
    evaluation(&mut card, facts.sts);
    let _ =
        writeln!(card, "\n## Usage\n\n```python\n{}```\n\nWith kdmcse: {}.\n", PYTHON_USAGE, kdmcse_usage());
    let _ = writeln!(
        card,
        "## Configuration\n\nThe run's `config.toml` (also in this folder):\n\n```toml\n{}\n```",
        config_toml.trim_end()
    );
    card
}

/// The YAML front matter the Hub reads.
fn front_matter(w: &mut String, cfg: &TrainConfig, base: &str) {
    let mut datasets: Vec<String> = cfg.data.text.iter().map(|p| name_of(p)).collect();
    datasets.extend(cfg.data.paired.iter().map(|p| name_of(p)));
    let _ = writeln!(w, "---\nlibrary_name: sentence-transformers\npipeline_tag: sentence-similarity");
    let _ =
        writeln!(w, "tags:\n- sentence-transformers\n- sentence-similarity\n- feature-extraction\n- kdmcse");
    let _ = writeln!(w, "base_model: {}", quoted(base));
    let _ = writeln!(w, "datasets:");
    for d in &datasets {
        let _ = writeln!(w, "- {}", quoted(d));
    }
    let _ = writeln!(w, "metrics:\n- spearman_cosine\n---\n");
}

/// How the model was trained: objective, data, steps and batch, the STS-B dev best.
fn training(w: &mut String, cfg: &TrainConfig, facts: &CardFacts) {
    let l = &cfg.loss;
    let _ = writeln!(w, "## Training\n");
    let _ = writeln!(
        w,
        "- Objective: {}, temperature {} (vision-language {}), lambda {}",
        config_name(&l.kind),
        l.temp,
        l.temp_vl,
        l.lambda
    );
    let filter = match l.filter {
        Some(f) => format!("{}, threshold {}", config_name(&f), l.filter_threshold),
        None => "off".into(),
    };
    let _ = writeln!(
        w,
        "- Angular margins: text {}, vision-language {}; noisy-negative filter: {filter}",
        l.margin_text, l.margin_vl
    );
    let text: Vec<String> = cfg.data.text.iter().map(|p| format!("`{}`", p.display())).collect();
    let _ = writeln!(w, "- Text data: {}", text.join(", "));
    if let Some(paired) = &cfg.data.paired {
        let _ = writeln!(w, "- Paired data (teacher features): `{}`", paired.display());
    }
    let t = &cfg.train;
    let batch = match (t.global_batch, t.batch_size) {
        (_, Some(per_rank)) => format!("{per_rank} per process"),
        (global, None) => format!("{} over all workers", global.unwrap_or(DEFAULT_GLOBAL_BATCH)),
    };
    let _ = writeln!(w, "- Steps: {}, batch {batch}, learning rate {}, seed {}", facts.step, t.lr, t.seed);
    let _ =
        writeln!(w, "- Exported from checkpoint `{}` of the run at `{}`", facts.checkpoint, cfg.output.dir);
    let _ = match facts.best {
        Some((score, step)) => writeln!(
            w,
            "- STS-B dev (Spearman x100, evaluated during training): best {score:.2} at step {step}"
        ),
        None => writeln!(w, "- STS-B dev: not evaluated during training"),
    };
}

/// The STS results of the export, when it was evaluated.
fn evaluation(w: &mut String, sts: &[(String, f64)]) {
    if sts.is_empty() {
        return;
    }
    let _ = writeln!(
        w,
        "\n## Evaluation\n\nSentEval's STS tasks (cosine similarity, Spearman x100; STS12-16 over all their \
         subsets), evaluated on this export by `kdmcse export --eval`:\n\n| task | Spearman x100 |\n|---|---|"
    );
    for (task, score) in sts {
        let _ = writeln!(w, "| {task} | {score:.2} |");
    }
    let mean = sts.iter().map(|(_, s)| s).sum::<f64>() / sts.len() as f64;
    let _ = writeln!(w, "| mean | {mean:.2} |");
}

/// Where the card's usage lines name the export; a user (and the test that runs them) puts the
/// folder's path there.
pub const FOLDER_PLACEHOLDER: &str = "path/to/this/folder";

const PYTHON_USAGE: &str = "from sentence_transformers import SentenceTransformer\n\nmodel = \
    SentenceTransformer(\"path/to/this/folder\")\nembeddings = model.encode([\"A man is playing a guitar.\", \
    \"Someone plays an instrument.\"])\nprint(model.similarity(embeddings, embeddings))\n";

/// The kdmcse commands the card gives, as shell lines (the SentEval STS tasks; embeddings of a
/// file of sentences).
pub const KDMCSE_USAGE: [&str; 2] = [
    "kdmcse eval --model path/to/this/folder --data SENTEVAL_DATA",
    "kdmcse encode --model path/to/this/folder --input sentences.txt --output embeddings.safetensors",
];

fn kdmcse_usage() -> String {
    format!("`{}` (the SentEval STS tasks) or `{}`", KDMCSE_USAGE[0], KDMCSE_USAGE[1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_models_and_data() {
        assert_eq!(name_of(Path::new("models/all-MiniLM-L6-v2")), "all-MiniLM-L6-v2");
        assert_eq!(name_of(Path::new("/data/models/bert-base-uncased/")), "bert-base-uncased");
        assert_eq!(config_name(&Pooling::Cls), "cls");
    }
}
