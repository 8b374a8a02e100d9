//! The `kdmcse` command line: evaluate and encode with a model folder.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Args, Parser, Subcommand};
use kdmcse::embed::SentenceEncoder;
use kdmcse::eval::{self, Task};
use kdmcse::model::Pooling;

#[global_allocator]
static GLOBAL: kdmcse::Allocator = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "kdmcse", version, about = "KDMCSE multimodal sentence embeddings")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// STS evaluation with the SentEval protocol (cosine similarity, Spearman x100).
    Eval(EvalArgs),
    /// Embeds one sentence a line into a safetensors file (tensor `embeddings`).
    Encode(EncodeArgs),
}

#[derive(Args)]
struct ModelArgs {
    /// A Hugging Face model folder (config.json, model.safetensors or pytorch_model.bin, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Sentence vector: first-token state (SimCSE's cls_before_pooler) or masked mean.
    #[arg(long, value_enum, default_value = "cls")]
    pooler: Pooling,
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A folder laid out like ../shared/data (stsb/, sick/, STS1x-en-test/ here or one level down).
    #[arg(long)]
    data: PathBuf,
    /// Tasks to run (default: all seven).
    #[arg(long, value_enum, num_args = 1..)]
    tasks: Vec<Task>,
    /// Print one JSON object with the scores as the last line of standard output.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct EncodeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// One sentence a line.
    #[arg(long)]
    input: PathBuf,
    /// A safetensors file with an `embeddings` tensor `[lines, hidden]`.
    #[arg(long)]
    output: PathBuf,
    /// Cut inputs to this many tokens (special tokens included); default: the model's maximum.
    #[arg(long)]
    max_len: Option<usize>,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    kdmcse::keep_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Eval(args) => run_eval(args),
        Command::Encode(args) => run_encode(args),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s.starts_with("cuda") => {
            let ordinal =
                s.strip_prefix("cuda:").map_or(Ok(0), str::parse).context("device: expected cuda:N")?;
            Ok(Device::new_cuda(ordinal)?)
        }
        other => bail!("unknown device {other:?}: expected cpu or cuda:N"),
    }
}

/// A progress bar on a terminal; hidden otherwise.
fn progress(total: usize, what: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} [{elapsed}<{eta}, {per_sec}]")
            .expect("valid template"),
    );
    bar.set_message(what.to_owned());
    bar
}

fn run_eval(args: EvalArgs) -> Result<()> {
    let device = device(&args.model.device)?;
    let tasks = if args.tasks.is_empty() { Task::ALL.to_vec() } else { args.tasks };
    // Read (and validate) every task's files before spending time on the model.
    let mut loaded = Vec::new();
    let mut missing = Vec::new();
    for task in tasks {
        match eval::load_task(&args.data, task)? {
            Some(data) => loaded.push((task, data)),
            None => {
                println!("{:<16} missing (no files under {})", task.name(), args.data.display());
                missing.push(task.name());
            }
        }
    }
    let encoder = SentenceEncoder::load(&args.model.model, args.model.pooler, None, &device)?;
    let mut scores = serde_json::Map::new();
    for (task, data) in loaded {
        let sentences: Vec<&str> = data.first.iter().chain(&data.second).map(String::as_str).collect();
        let bar = progress(sentences.len(), task.name());
        let embeddings = encoder.encode(&sentences, args.model.batch_size, |n| bar.inc(n as u64))?;
        bar.finish_and_clear();
        let n = data.len();
        let cosines = cosine_rows(&embeddings.narrow(0, 0, n)?, &embeddings.narrow(0, n, n)?)?;
        let score = round2(eval::spearman(&cosines, &data.gold) * 100.0);
        println!("{:<16} {score:6.2}  ({n} pairs)", task.name());
        scores.insert(task.name().to_owned(), score.into());
    }
    let present: Vec<f64> = scores.values().filter_map(|v| v.as_f64()).collect();
    let avg = match present.len() {
        0 => serde_json::Value::Null,
        n => round2(present.iter().sum::<f64>() / n as f64).into(),
    };
    println!("{:<16} {avg}", "avg");
    if args.json {
        scores.insert("avg".into(), avg);
        scores.insert("missing".into(), missing.into());
        println!("{}", serde_json::Value::Object(scores));
    }
    Ok(())
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Row-wise cosine similarity of two `[n, d]` matrices.
fn cosine_rows(a: &Tensor, b: &Tensor) -> Result<Vec<f64>> {
    let dot = (a * b)?.sum(1)?;
    let norms = (a.sqr()?.sum(1)?.sqrt()? * b.sqr()?.sum(1)?.sqrt()?)?;
    Ok(dot.div(&norms)?.to_dtype(DType::F64)?.to_vec1()?)
}

fn run_encode(args: EncodeArgs) -> Result<()> {
    let device = device(&args.model.device)?;
    let text = std::fs::read_to_string(&args.input)
        .with_context(|| format!("cannot read {}", args.input.display()))?;
    let sentences: Vec<&str> = text.lines().collect();
    let encoder = SentenceEncoder::load(&args.model.model, args.model.pooler, args.max_len, &device)?;
    let bar = progress(sentences.len(), "encode");
    let embeddings = encoder.encode(&sentences, args.model.batch_size, |n| bar.inc(n as u64))?;
    bar.finish_and_clear();
    embeddings
        .save_safetensors("embeddings", &args.output)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    tracing::info!(sentences = sentences.len(), output = %args.output.display(), "encoded");
    Ok(())
}
