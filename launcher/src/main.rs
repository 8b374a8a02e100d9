//! `kdmcse-launch`: starts one `kdmcse train` worker per GPU (or per CPU slot) on this node with
//! torchrun's environment contract (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`,
//! `MASTER_ADDR`, `MASTER_PORT`), streams their output with a rank prefix, forwards SIGINT and
//! SIGTERM, and when a worker dies stops the others and restarts the whole group (which resumes
//! from the newest checkpoint), up to `--max-restarts` times.
//!
//! Exit codes: 0 all workers finished; 2 bad arguments, a launch failure, or a worker that failed
//! on its configuration or input (exit 2: not restarted); 130/143 stopped by SIGINT/SIGTERM;
//! otherwise the exit code of the first worker that failed once no restart was left (1 when it
//! died from a signal).

use std::io::{BufRead, BufReader, Write};
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "kdmcse-launch",
    version,
    about = "Run kdmcse training with one worker per GPU (or CPU slot), torchrun-style",
    after_help = "Examples:\n  kdmcse-launch --gpus 8 --config configs/kdmcse-bert-base-flickr30k.toml\n  \
                  kdmcse-launch --nproc 2 -- --config configs/quickstart.toml --set train.max_steps=20"
)]
struct Args {
    /// Workers on this node, one per GPU (each sees only its GPU through CUDA_VISIBLE_DEVICES).
    #[arg(long, conflicts_with = "nproc")]
    gpus: Option<usize>,
    /// Workers on this node, on the CPU.
    #[arg(long)]
    nproc: Option<usize>,
    #[arg(long, default_value_t = 1)]
    nnodes: usize,
    /// This node's index; defaults to $JOB_COMPLETION_INDEX (Kubernetes Indexed Jobs), else 0.
    #[arg(long)]
    node_rank: Option<usize>,
    #[arg(long, default_value = "127.0.0.1")]
    master_addr: String,
    #[arg(long, default_value_t = 29500)]
    master_port: u16,
    /// Whole-group restarts after a worker failure.
    #[arg(long, default_value_t = 0)]
    max_restarts: usize,
    /// How long a stopping worker gets between SIGTERM and SIGKILL.
    #[arg(long, default_value_t = 60)]
    stop_timeout_s: u64,
    /// How long to wait for the master's address to resolve (DNS of a starting pod).
    #[arg(long, default_value_t = 300)]
    master_wait_s: u64,
    /// Short form: run `kdmcse train --config FILE`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// `kdmcse train` arguments (after `--`).
    #[arg(last = true)]
    train_args: Vec<String>,
}

static SIGNAL: AtomicUsize = AtomicUsize::new(0);

/// What `kdmcse` exits with on a configuration or input error (and what this launcher exits
/// with on its own bad arguments): never restarted.
const INPUT_ERROR: i32 = 2;

fn main() {
    let args = Args::parse();
    match run(args) {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("[launcher] error: {err:#}");
            std::process::exit(INPUT_ERROR);
        }
    }
}

/// The `kdmcse` binary: $KDMCSE_BIN, else beside this executable, else on PATH.
fn worker_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("KDMCSE_BIN") {
        return PathBuf::from(bin);
    }
    if let Ok(me) = std::env::current_exe() {
        let sibling = me.with_file_name("kdmcse");
        if sibling.is_file() {
            return sibling;
        }
    }
    PathBuf::from("kdmcse")
}

struct Plan {
    local_world: usize,
    node_rank: usize,
    world_size: usize,
    /// With `--gpus`: each local rank's `CUDA_VISIBLE_DEVICES`.
    gpus: Option<Vec<String>>,
    worker_args: Vec<String>,
}

/// The GPUs this node's workers get: the first `n` of CUDA_VISIBLE_DEVICES, else of the GPUs the
/// driver lists. Checked before any worker starts.
fn assign_gpus(n: usize) -> Result<Vec<String>> {
    let visible: Vec<String> = match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(list) => list.split(',').map(str::trim).filter(|d| !d.is_empty()).map(str::to_owned).collect(),
        Err(_) => {
            let count = std::fs::read_dir("/proc/driver/nvidia/gpus").map(|d| d.count()).unwrap_or(0);
            (0..count).map(|i| i.to_string()).collect()
        }
    };
    if visible.len() < n {
        let seen = match std::env::var("CUDA_VISIBLE_DEVICES") {
            Ok(list) => format!("CUDA_VISIBLE_DEVICES={list:?} lists {}", visible.len()),
            Err(_) => format!("the NVIDIA driver lists {} (/proc/driver/nvidia/gpus)", visible.len()),
        };
        bail!("--gpus {n} asks for {n} GPUs, but {seen}: use --nproc N for CPU workers");
    }
    Ok(visible.into_iter().take(n).collect())
}

fn plan(args: &Args) -> Result<Plan> {
    let local_world = match (args.gpus, args.nproc) {
        (Some(n), _) | (None, Some(n)) => n,
        (None, None) => bail!("say how many workers: --gpus N or --nproc N"),
    };
    if local_world == 0 || args.nnodes == 0 {
        bail!("--gpus/--nproc and --nnodes must be at least 1");
    }
    let gpus = args.gpus.map(assign_gpus).transpose()?;
    let node_rank = match args.node_rank {
        Some(k) => k,
        None => match std::env::var("JOB_COMPLETION_INDEX") {
            Ok(v) => {
                v.trim().parse().with_context(|| format!("JOB_COMPLETION_INDEX={v:?} is not a number"))?
            }
            Err(_) => 0,
        },
    };
    if node_rank >= args.nnodes {
        bail!("node rank {node_rank} is not below --nnodes {}", args.nnodes);
    }
    let mut worker_args = vec!["train".to_owned()];
    if let Some(config) = &args.config {
        worker_args.push("--config".into());
        worker_args.push(config.display().to_string());
    }
    let rest = match args.train_args.first().map(String::as_str) {
        Some("train") => &args.train_args[1..],
        _ => &args.train_args[..],
    };
    worker_args.extend(rest.iter().cloned());
    if worker_args.len() == 1 {
        bail!("nothing to run: give --config FILE or `-- <kdmcse train arguments>`");
    }
    Ok(Plan { local_world, node_rank, world_size: local_world * args.nnodes, gpus, worker_args })
}

/// `--resume auto` for restarts (replacing any other `--resume`), so the group continues from
/// the newest checkpoint; `--overwrite` goes too, or a restart would delete the run it resumes.
fn resume_auto(args: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len() + 2);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--resume" {
            it.next();
        } else if !a.starts_with("--resume=") && a != "--overwrite" {
            out.push(a.clone());
        }
    }
    out.extend(["--resume".to_owned(), "auto".to_owned()]);
    out
}

/// Waits (bounded) until the master's name resolves: in a Kubernetes Indexed Job, pod 0's DNS
/// record appears only once it is running.
fn wait_for_master(addr: &str, port: u16, wait: Duration) -> Result<()> {
    let deadline = Instant::now() + wait;
    loop {
        let resolved = (addr, port).to_socket_addrs().map(|mut a| a.next().is_some()).unwrap_or(false);
        if resolved {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("the master address {addr} did not resolve within {wait:?}");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn spawn_group(args: &Args, plan: &Plan, restart: usize, worker_args: &[String]) -> Result<Vec<Child>> {
    let bin = worker_binary();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut children = Vec::with_capacity(plan.local_world);
    for local_rank in 0..plan.local_world {
        let rank = plan.node_rank * plan.local_world + local_rank;
        let mut cmd = Command::new(&bin);
        cmd.args(worker_args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", plan.world_size.to_string())
            .env("LOCAL_RANK", local_rank.to_string())
            .env("LOCAL_WORLD_SIZE", plan.local_world.to_string())
            .env("GROUP_RANK", plan.node_rank.to_string())
            .env("MASTER_ADDR", &args.master_addr)
            .env("MASTER_PORT", args.master_port.to_string())
            .env("KDMCSE_RESTART_COUNT", restart.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(gpus) = &plan.gpus {
            cmd.env("CUDA_VISIBLE_DEVICES", &gpus[local_rank]).env("KDMCSE_LAUNCHED_GPUS", "1");
        }
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            // Share the cores instead of oversubscribing them (torchrun sets OMP_NUM_THREADS).
            cmd.env("RAYON_NUM_THREADS", (cores / plan.local_world).max(1).to_string());
        }
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(err) => {
                // Never leave the workers already started behind.
                stop_group(&mut children, Duration::from_secs(0));
                return Err(err).with_context(|| format!("cannot start {}", bin.display()));
            }
        };
        let out = child.stdout.take().expect("piped");
        let err = child.stderr.take().expect("piped");
        std::thread::spawn(move || prefix_lines(out, rank, false));
        std::thread::spawn(move || prefix_lines(err, rank, true));
        children.push(child);
    }
    Ok(children)
}

fn prefix_lines(stream: impl std::io::Read, rank: usize, to_stderr: bool) {
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        if to_stderr {
            let _ = writeln!(std::io::stderr().lock(), "[rank {rank}] {line}");
        } else {
            let _ = writeln!(std::io::stdout().lock(), "[rank {rank}] {line}");
        }
    }
}

/// Sends `signal` to every child still running (a reaped child's pid may belong to another
/// process by now).
fn signal_all(children: &mut [Child], signal: i32) {
    for child in children.iter_mut() {
        if matches!(child.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on our own, unreaped child's pid.
            unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        }
    }
}

/// SIGTERM, then SIGKILL after `grace`; reaps every child.
fn stop_group(children: &mut [Child], grace: Duration) {
    signal_all(children, libc::SIGTERM);
    let deadline = Instant::now() + grace;
    loop {
        let alive = children.iter_mut().filter_map(|c| c.try_wait().ok()).filter(Option::is_none).count();
        if alive == 0 {
            return;
        }
        if Instant::now() >= deadline {
            eprintln!("[launcher] {alive} worker(s) did not stop within {grace:?}: killing");
            for c in children.iter_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => "an unknown status".into(),
    }
}

enum GroupOutcome {
    Finished,
    Failed { rank: usize, status: ExitStatus },
    Interrupted(i32),
}

/// When each child exited, as seen by a thread per child that waits for it without reaping it
/// (so the watch loop can tell which of several failed workers went first).
fn exit_times(children: &[Child]) -> Arc<Mutex<Vec<Option<Instant>>>> {
    let times = Arc::new(Mutex::new(vec![None; children.len()]));
    for (i, child) in children.iter().enumerate() {
        let (pid, times) = (child.id(), Arc::clone(&times));
        std::thread::spawn(move || {
            // SAFETY: a zeroed siginfo_t is a valid out-parameter; waitid with WNOWAIT only
            // observes our own child's exit and leaves it to be reaped by the watch loop.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            let rc = unsafe { libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOWAIT) };
            if rc == 0 {
                times.lock().expect("exit times lock")[i] = Some(Instant::now());
            }
        });
    }
    times
}

fn watch(children: &mut [Child], node_rank: usize, stop_grace: Duration) -> GroupOutcome {
    let local_world = children.len();
    let mut done = vec![false; local_world];
    let exited = exit_times(children);
    loop {
        let signal = SIGNAL.load(Ordering::SeqCst);
        if signal != 0 {
            eprintln!("[launcher] got signal {signal}: stopping the workers (they checkpoint and exit)");
            signal_all(children, signal as i32);
            let deadline = Instant::now() + stop_grace;
            while Instant::now() < deadline && children.iter_mut().any(|c| matches!(c.try_wait(), Ok(None))) {
                std::thread::sleep(Duration::from_millis(50));
            }
            stop_group(children, Duration::from_secs(0));
            return GroupOutcome::Interrupted(signal as i32);
        }
        // The workers that exited since the last look, and of those that failed, the first.
        let times = exited.lock().expect("exit times lock").clone();
        let mut first_failure: Option<(Instant, usize, ExitStatus)> = None;
        for (local_rank, child) in children.iter_mut().enumerate() {
            let Some(at) = times[local_rank].filter(|_| !done[local_rank]) else { continue };
            done[local_rank] = true;
            match child.wait() {
                Ok(status) if status.success() => {}
                Ok(status) => {
                    if first_failure.is_none_or(|(first, _, _)| at < first) {
                        first_failure = Some((at, local_rank, status));
                    }
                }
                Err(err) => eprintln!("[launcher] cannot reap rank {local_rank}: {err}"),
            }
        }
        if let Some((_, local_rank, status)) = first_failure {
            let rank = node_rank * local_world + local_rank;
            eprintln!("[launcher] rank {rank} failed with {}: stopping the other workers", describe(status));
            stop_group(children, stop_grace);
            return GroupOutcome::Failed { rank, status };
        }
        if done.iter().all(|&d| d) {
            return GroupOutcome::Finished;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run(args: Args) -> Result<i32> {
    let plan = plan(&args)?;
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let flag = Arc::new(AtomicUsize::new(0));
        // Record which signal arrived; the watch loop forwards it.
        signal_hook::flag::register_usize(signal, Arc::clone(&flag), signal as usize)
            .context("cannot install signal handlers")?;
        std::thread::spawn(move || loop {
            let s = flag.swap(0, Ordering::SeqCst);
            if s != 0 {
                SIGNAL.store(s, Ordering::SeqCst);
            }
            std::thread::sleep(Duration::from_millis(20));
        });
    }
    if plan.node_rank > 0 {
        wait_for_master(&args.master_addr, args.master_port, Duration::from_secs(args.master_wait_s))?;
    }
    let grace = Duration::from_secs(args.stop_timeout_s);
    let mut restart = 0;
    let mut worker_args = plan.worker_args.clone();
    loop {
        eprintln!(
            "[launcher] node {}/{}: starting ranks {}..{} of {} (attempt {})",
            plan.node_rank,
            args.nnodes,
            plan.node_rank * plan.local_world,
            (plan.node_rank + 1) * plan.local_world,
            plan.world_size,
            restart + 1
        );
        let mut children = spawn_group(&args, &plan, restart, &worker_args)?;
        match watch(&mut children, plan.node_rank, grace) {
            GroupOutcome::Finished => {
                eprintln!("[launcher] all workers finished");
                return Ok(0);
            }
            GroupOutcome::Interrupted(signal) => return Ok(128 + signal),
            GroupOutcome::Failed { rank, status } => {
                if status.code() == Some(INPUT_ERROR) {
                    eprintln!(
                        "[launcher] rank {rank} failed on its configuration or input (exit {INPUT_ERROR}): \
                         restarting cannot help"
                    );
                    return Ok(INPUT_ERROR);
                }
                if restart >= args.max_restarts {
                    eprintln!(
                        "[launcher] rank {rank} failed and no restart is left (--max-restarts {})",
                        args.max_restarts
                    );
                    return Ok(status.code().filter(|&c| c != 0).unwrap_or(1));
                }
                restart += 1;
                worker_args = resume_auto(&plan.worker_args);
                eprintln!(
                    "[launcher] restarting the group ({restart}/{}), resuming from the newest checkpoint",
                    args.max_restarts
                );
            }
        }
    }
}
