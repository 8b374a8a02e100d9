//! The `kdmcse` command line: evaluate, encode, train, export, precompute teacher features, and
//! check a machine.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::{Args, Parser, Subcommand};
use kdmcse::checkpoint::{Resume, Start};
use kdmcse::config::{in_range, TrainConfig};
use kdmcse::device::DeviceSpec;
use kdmcse::dist::{contract, Nccl};
use kdmcse::embed::SentenceEncoder;
use kdmcse::eval::{self, Task};
use kdmcse::model::Pooling;
use kdmcse::ops::Isa;
use kdmcse::train::{Outcome, Trainer};
use kdmcse::InputError;

#[global_allocator]
static GLOBAL: kdmcse::Allocator = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "kdmcse", version = kdmcse::VERSION, about = "KDMCSE multimodal sentence embeddings")]
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
    /// Trains a student (resuming from the newest checkpoint under output.dir by default).
    Train(TrainArgs),
    /// Writes a checkpoint as a Hugging Face / sentence-transformers model folder.
    Export(ExportArgs),
    /// Teacher features from a CLIP model for captions and their images, in the interchange
    /// format that training reads (data.paired).
    Precompute(PrecomputeArgs),
    /// Checks this machine: the collectives of the job it joins (under kdmcse-launch, or with
    /// WORLD_SIZE/RANK/MASTER_ADDR/MASTER_PORT set), and the device's dropout masks and encoder
    /// against the CPU. Prints one JSON line per check; exits 1 if any fails.
    Check(CheckArgs),
}

#[derive(Args)]
struct CheckArgs {
    /// `cpu`, `cuda` (this worker's GPU) or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Also compare the encoder of this model folder (forward and gradients) with the CPU, in
    /// fp32 and bf16.
    #[arg(long)]
    model: Option<PathBuf>,
}

#[derive(Args)]
struct PrecomputeArgs {
    /// A Hugging Face CLIPModel folder (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    clip: PathBuf,
    /// COCO-style captions JSON (`images`, `annotations`), or a text file of
    /// `IMAGE_FILE<TAB>CAPTION` lines.
    #[arg(long)]
    captions: PathBuf,
    /// The folder of the image files.
    #[arg(long)]
    images: PathBuf,
    /// The output folder (teacher.safetensors, captions.txt, images.txt).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
}

#[derive(Args)]
struct TrainArgs {
    /// A TOML config (see configs/); KDMCSE_SECTION__KEY variables override it.
    #[arg(long)]
    config: PathBuf,
    /// Overrides a config key, e.g. --set train.max_steps=100 (repeatable; applied last).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// `auto` (newest checkpoint that verifies, if any), `none`, or a checkpoint
    /// (`step-00000100` under output.dir, or `<root>/checkpoints/<name>`).
    #[arg(long, default_value = "auto")]
    resume: Resume,
    /// Stop (with a checkpoint) once this many optimiser steps are done, as a pre-empted job
    /// would; `--resume auto` continues the same run.
    #[arg(long, value_name = "STEP")]
    stop_after: Option<u64>,
    /// With a fresh start (`--resume none`, or no checkpoint that verifies): delete the
    /// checkpoints already under output.dir first, instead of refusing to mix two runs.
    #[arg(long)]
    overwrite: bool,
    /// Resume even though the config differs from the checkpoint's in a key that changes the
    /// training (batch size, seed, learning rate, objective, ...).
    #[arg(long)]
    allow_config_change: bool,
}

#[derive(Args)]
struct ExportArgs {
    /// A run's output.dir (its newest checkpoint) or a checkpoint `<root>/checkpoints/<name>`.
    #[arg(long)]
    checkpoint: String,
    /// The folder to write.
    #[arg(long)]
    out: PathBuf,
    /// Evaluate the export on the SentEval STS tasks under this folder (laid out as for
    /// `kdmcse eval --data`) and state the results in its model card.
    #[arg(long, value_name = "DATA")]
    eval: Option<PathBuf>,
}

#[derive(Args)]
struct ModelArgs {
    /// A Hugging Face model folder (config.json, model.safetensors or pytorch_model.bin, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Sentence vector: first-token state (SimCSE's cls_before_pooler) or masked mean; default:
    /// what the folder's 1_Pooling/config.json states (a kdmcse or sentence-transformers export),
    /// else cls.
    #[arg(long, value_enum)]
    pooler: Option<Pooling>,
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
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
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    kdmcse::keep_freed_memory();
    let cli = Cli::parse();
    // A bad KDMCSE_ISA is refused before any kernel runs (they would panic on it).
    let isa = match Isa::from_env() {
        Ok(isa) => Isa::select(isa),
        Err(err) => {
            eprintln!("error: {err}");
            std::process::exit(contract::exit::INPUT_ERROR);
        }
    };
    if matches!(cli.command, Command::Train(_)) {
        tracing::info!(isa = isa.name(), detected = Isa::detected().name(), "CPU kernels");
    }
    let result = match cli.command {
        Command::Eval(args) => run_eval(args),
        Command::Encode(args) => run_encode(args),
        Command::Train(args) => run_train(args),
        Command::Export(args) => run_export(args),
        Command::Precompute(args) => run_precompute(args),
        Command::Check(args) => run_check(args),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        let code = if InputError::is(&err) { contract::exit::INPUT_ERROR } else { contract::exit::FAILURE };
        std::process::exit(code);
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
    let device = args.model.device.device()?;
    in_range("--batch-size", args.model.batch_size, 1..)?;
    let model = &args.model;
    let StsScores { scores, missing } =
        sts_scores(&model.model, model.pooler, &args.data, &args.tasks, model.batch_size, &device)?;
    let mut json = serde_json::Map::new();
    for (task, score) in &scores {
        json.insert(task.name().to_owned(), (*score).into());
    }
    let avg = match scores.len() {
        0 => serde_json::Value::Null,
        n => eval::round2(scores.iter().map(|(_, s)| s).sum::<f64>() / n as f64).into(),
    };
    println!("{:<16} {avg}", "avg");
    if args.json {
        json.insert("avg".into(), avg);
        json.insert("missing".into(), missing.into());
        println!("{}", serde_json::Value::Object(json));
    }
    Ok(())
}

/// The STS tasks scored (Spearman x100) and the names of those whose files were not there.
struct StsScores {
    scores: Vec<(Task, f64)>,
    missing: Vec<&'static str>,
}

/// SentEval STS scores of the model folder `model` on the tasks under `data` (`tasks`, else every
/// task whose files are there), printed as they come.
fn sts_scores(
    model: &std::path::Path,
    pooler: Option<Pooling>,
    data: &std::path::Path,
    tasks: &[Task],
    batch_size: usize,
    device: &candle_core::Device,
) -> Result<StsScores> {
    let asked = !tasks.is_empty();
    let tasks = if asked { tasks.to_vec() } else { Task::ALL.to_vec() };
    // Read (and validate) every task's files before spending time on the model.
    if !data.is_dir() {
        bail!("--data {}: no such folder", data.display());
    }
    let mut loaded = Vec::new();
    let mut missing = Vec::new();
    for task in tasks {
        match eval::load_task(data, task)? {
            Some(task_data) => loaded.push((task, task_data)),
            None if asked => bail!("{}: no files of {} (asked for by --tasks)", data.display(), task.name()),
            None => {
                println!("{:<16} missing (no files under {})", task.name(), data.display());
                missing.push(task.name());
            }
        }
    }
    if loaded.is_empty() {
        bail!("{}: none of the STS tasks is there (expected stsb/, sick/, STS1x-en-test/)", data.display());
    }
    let encoder = SentenceEncoder::load(&kdmcse::hub::model_dir(model, "--model")?, pooler, None, device)?;
    let mut scores = Vec::new();
    for (task, task_data) in loaded {
        let sentences = task_data.sentences();
        let bar = progress(sentences.len(), task.name());
        let embeddings = encoder.encode(&sentences, batch_size, |n| bar.inc(n as u64))?;
        bar.finish_and_clear();
        let score = eval::sts_score(&embeddings, &task_data)?;
        println!("{:<16} {score:6.2}  ({} pairs)", task.name(), task_data.len());
        scores.push((task, score));
    }
    Ok(StsScores { scores, missing })
}

fn run_encode(args: EncodeArgs) -> Result<()> {
    in_range("--batch-size", args.model.batch_size, 1..)?;
    if let Some(max_len) = args.max_len {
        // [CLS] sentence [SEP]: fewer tokens leave no room for the sentence.
        in_range("--max-len", max_len, 3..)?;
    }
    let device = args.model.device.device()?;
    let lines = kdmcse::data::read_lines(&args.input)?;
    let sentences: Vec<&str> = lines.iter().map(String::as_str).collect();
    let model = kdmcse::hub::model_dir(&args.model.model, "--model")?;
    let encoder = SentenceEncoder::load(&model, args.model.pooler, args.max_len, &device)?;
    let bar = progress(sentences.len(), "encode");
    let embeddings = encoder.encode(&sentences, args.model.batch_size, |n| bar.inc(n as u64))?;
    bar.finish_and_clear();
    embeddings
        .save_safetensors("embeddings", &args.output)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    tracing::info!(sentences = sentences.len(), output = %args.output.display(), "encoded");
    Ok(())
}

fn run_train(args: TrainArgs) -> Result<()> {
    let config = TrainConfig::load(&args.config, &args.overrides).map_err(InputError::wrap)?;
    if std::env::var_os(contract::env::LAUNCHED_GPUS).is_some() && !config.train.device.is_gpu() {
        return Err(InputError::wrap(anyhow::anyhow!(
            "kdmcse-launch --gpus gave this worker a GPU, but train.device = {}: set train.device = \"cuda\" \
             or launch CPU workers with --nproc",
            config.train.device
        )));
    }
    if let (Some(per_rank), Some(_)) = (config.train.batch_size, std::env::var_os(contract::env::ELASTIC)) {
        return Err(InputError::wrap(anyhow::anyhow!(
            "kdmcse-launch --nnodes MIN:MAX may change the number of ranks between rounds, but \
             train.batch_size = {per_rank} fixes the batch of each rank, so the negative pool would change \
             with them: set train.global_batch instead (split over whatever ranks a round has)"
        )));
    }
    let device = config.train.device.device()?;
    // Until training starts a signal just ends the process (nothing to save; a worker waiting in
    // rendezvous must not hold its launcher for the grace period).
    let group = kdmcse::dist::init_from_env(&device, Nccl::WhenNeeded, config.dist.liveness())?;
    // Loading the model, corpora and dev set reads only what the config names.
    let mut trainer = Trainer::new(config, group.comm.as_ref(), device)?;
    let start = Start {
        resume: args.resume,
        overwrite: args.overwrite,
        allow_config_change: args.allow_config_change,
    };
    let trained = trainer.resume(&start).and_then(|_| {
        kdmcse::train::install_stop_handler()?;
        trainer.train(args.stop_after)
    });
    let summary = match trained {
        Ok(summary) => summary,
        Err(err) => {
            // A collective the watchdog aborted may fail with a device error that does not say why.
            let err = match group.abort.verdict() {
                Some(verdict) if !format!("{err:#}").contains(verdict) => err.context(verdict.to_owned()),
                _ => err,
            };
            trainer.write_diagnostics(group.round, &err);
            return Err(err);
        }
    };
    tracing::info!(?summary, "done");
    if group.comm.rank() == 0 {
        kdmcse::events::emit("summary", serde_json::to_value(&summary)?);
    }
    if summary.outcome == Outcome::Interrupted {
        drop(trainer);
        // Its watchdog's last heartbeat says this rank is done.
        drop(group);
        // Stopped by a signal, checkpoint written: not finished.
        std::process::exit(contract::exit::stopped_by(signal_hook::consts::SIGTERM));
    }
    Ok(())
}

/// Runs every check, printing each result as a JSON line as soon as it is known: one that fails,
/// or cannot run at all, is recorded and the others still run.
fn run_check(args: CheckArgs) -> Result<()> {
    let device = args.device.device()?;
    let mut failed = Vec::new();
    let mut total = 0;
    let mut report = |check: kdmcse::check::Check, rank: usize| {
        let mut line = serde_json::to_value(&check).expect("a check serialises");
        line["rank"] = rank.into();
        println!("{line}");
        total += 1;
        if !check.passed {
            failed.push(check.name);
        }
    };
    let nccl_group = if device.is_cuda() {
        Some(kdmcse::dist::init_from_env(&device, Nccl::Always, Default::default()))
    } else {
        None
    };
    let group = match nccl_group {
        Some(Ok(group)) => group,
        Some(Err(err)) => {
            report(kdmcse::check::Check::failed("nccl_init", &err), 0);
            // The other checks still run, over the TCP mesh.
            kdmcse::dist::init_from_env(&device, Nccl::WhenNeeded, Default::default())?
        }
        None => kdmcse::dist::init_from_env(&device, Nccl::WhenNeeded, Default::default())?,
    };
    let rank = group.comm.rank();
    let mut stage = |name: &str, run: &mut dyn FnMut(kdmcse::check::Report) -> Result<()>| {
        if let Err(err) = run(&mut |check| report(check, rank)) {
            report(kdmcse::check::Check::failed(name, &err), rank);
        }
    };
    stage("kernels", &mut |r| kdmcse::check::kernels(&device, r));
    stage("collectives", &mut |r| kdmcse::check::collectives(group.comm.as_ref(), &device, r));
    stage("dropout_masks", &mut |r| kdmcse::check::dropout_masks(&device, r));
    if let Some(model) = &args.model {
        let model = &kdmcse::hub::model_dir(model, "--model")?;
        for dtype in [candle_core::DType::F32, candle_core::DType::BF16] {
            let name = format!("encoder_{dtype:?}").to_lowercase();
            stage(&name, &mut |r| kdmcse::check::encoder(model, &device, dtype, r));
        }
    }
    stage("abort", &mut |r| kdmcse::check::abort(group.comm.as_ref(), &group.abort, &device, r));
    if !failed.is_empty() {
        bail!("rank {rank}: {} of {total} checks failed: {}", failed.len(), failed.join(", "));
    }
    Ok(())
}

fn run_export(args: ExportArgs) -> Result<()> {
    let checkpoint = kdmcse::checkpoint::layout::open(&args.checkpoint, None)?;
    let files = kdmcse::export::export_files(&checkpoint)?;
    kdmcse::export::write_dir(&files, &args.out)?;
    tracing::info!(checkpoint = %checkpoint.name, out = %args.out.display(), "exported");
    if let Some(data) = &args.eval {
        // The export as users load it (its own pooling), then its card with the results.
        let device = candle_core::Device::Cpu;
        let scores = sts_scores(&args.out, None, data, &[], 128, &device)?.scores;
        let results: Vec<(String, f64)> = scores.iter().map(|(t, s)| (t.name().to_owned(), *s)).collect();
        let card = kdmcse::export::readme(&checkpoint, &results)?;
        std::fs::write(args.out.join("README.md"), card)
            .with_context(|| format!("cannot write {}", args.out.join("README.md").display()))?;
        tracing::info!(tasks = results.len(), "the model card states the STS results");
    }
    Ok(())
}

fn run_precompute(args: PrecomputeArgs) -> Result<()> {
    in_range("--batch-size", args.batch_size, 1..)?;
    let device = args.device.device()?;
    let teacher =
        kdmcse::model::clip::ClipTeacher::load(&kdmcse::hub::model_dir(&args.clip, "--clip")?, &device)?;
    let grouped = kdmcse::data::captions::read_captions(&args.captions, &args.images)?;
    if grouped.is_empty() {
        bail!("no captioned images: {} against {}", args.captions.display(), args.images.display());
    }
    let image_names: Vec<String> = grouped.iter().map(|(n, _, _)| n.clone()).collect();
    let image_files: Vec<&std::path::Path> = grouped.iter().map(|(_, f, _)| f.as_path()).collect();
    let (captions, caption_image): (Vec<String>, Vec<u32>) = grouped
        .iter()
        .enumerate()
        .flat_map(|(i, (_, _, cs))| cs.iter().map(move |c| (c.clone(), i as u32)))
        .unzip();
    let batch = args.batch_size.max(1);
    let bar = progress(image_files.len() + captions.len(), "precompute");
    let mut image_features = Vec::new();
    for chunk in image_files.chunks(batch) {
        image_features.push(teacher.embed_images(chunk)?);
        bar.inc(chunk.len() as u64);
    }
    let caption_refs: Vec<&str> = captions.iter().map(String::as_str).collect();
    let mut caption_features = Vec::new();
    for chunk in caption_refs.chunks(batch) {
        caption_features.push(teacher.embed_texts(chunk)?);
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let to_cpu =
        |parts: Vec<Tensor>| -> Result<Tensor> { Ok(Tensor::cat(&parts, 0)?.to_device(&Device::Cpu)?) };
    let dim = teacher.projection_dim.to_string();
    kdmcse::data::corpus::write_paired(
        &args.out,
        &captions,
        &to_cpu(caption_features)?,
        &image_names,
        &to_cpu(image_features)?,
        &caption_image,
        &[("teacher", args.clip.display().to_string()), ("kind", "clip".into()), ("dim", dim)],
    )?;
    tracing::info!(images = image_names.len(), captions = captions.len(), out = %args.out.display(), "teacher features written");
    Ok(())
}
