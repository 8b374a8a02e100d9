//! `kdmcse-launch`: the agent of one node. It starts one `kdmcse train` worker per GPU (or per
//! CPU slot) with torchrun's environment contract (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), streams their output with a rank prefix and
//! forwards SIGINT and SIGTERM. The launchers of all nodes meet in rounds ([`rendezvous`]) on the
//! rendezvous store: the `static` one the node-0 launcher hosts, or an etcd cluster
//! (`--rdzv-backend etcd`), which no node hosts. A failure on any node ends the round on every
//! node, each stops its workers and joins the next round, whose workers resume from the newest
//! checkpoint, up to `--max-restarts` failures for the whole job; with `--nnodes MIN:MAX` a round
//! may start with fewer nodes, and a node that comes back joins at the next round.
//!
//! Exit codes: 0 all workers finished; 2 bad arguments, a launch failure, or a worker that failed
//! on its configuration or input (exit 2: not restarted, on any node); 130/143 stopped by
//! SIGINT/SIGTERM; otherwise the exit code of the failure that ended the last round (1 when a
//! worker died from a signal or the rendezvous failed).

mod rendezvous;

use std::io::{BufRead, BufReader, Write};
use std::net::ToSocketAddrs;
use std::ops::ControlFlow;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use kdmcse::dist::contract::{env as worker_env, exit};
use kdmcse::dist::store::{parse_endpoints, StoreAddress, StoreServer};
use rendezvous::{Ending, Joined, NodeRange, Rendezvous, Round};

#[derive(Parser, Debug)]
#[command(
    name = "kdmcse-launch",
    version = kdmcse::VERSION,
    about = "Run kdmcse training with one worker per GPU (or CPU slot), torchrun-style",
    after_help = "Examples:\n  kdmcse-launch --gpus 8 --config configs/kdmcse-bert-base-flickr30k.toml\n  \
                  kdmcse-launch --nproc 2 -- --config configs/quickstart.toml --set train.max_steps=20"
)]
struct Args {
    /// Workers on this node, one per GPU (each sees only its GPU through CUDA_VISIBLE_DEVICES).
    #[arg(long, env = "KDMCSE_GPUS", conflicts_with = "nproc")]
    gpus: Option<usize>,
    /// Workers on this node, on the CPU.
    #[arg(long, env = "KDMCSE_NPROC")]
    nproc: Option<usize>,
    /// Nodes: N, or MIN:MAX for an elastic job (a round starts with MAX, or with at least MIN
    /// after --rdzv-last-call; needs train.global_batch, so the pool does not change with them).
    #[arg(long, env = "KDMCSE_NNODES", default_value = "1")]
    nnodes: String,
    /// This node's id, below MAX; defaults to $JOB_COMPLETION_INDEX (Kubernetes Indexed Jobs),
    /// else 0. Ranks follow the ids of the nodes in a round.
    #[arg(long)]
    node_rank: Option<usize>,
    /// Where the launchers meet: `static` (node 0's launcher hosts the store at --master-addr) or
    /// `etcd` (the cluster at --rdzv-endpoint; any node may die).
    #[arg(long, env = "KDMCSE_RDZV_BACKEND", value_enum, default_value_t = Backend::Static)]
    rdzv_backend: Backend,
    /// The etcd client endpoints, HOST:PORT[,HOST:PORT...].
    #[arg(long, env = "KDMCSE_RDZV_ENDPOINT", required_if_eq("rdzv_backend", "etcd"))]
    rdzv_endpoint: Option<String>,
    /// Seconds a round waits for more nodes than MIN once MIN have joined (--nnodes MIN:MAX).
    #[arg(long, env = "KDMCSE_RDZV_LAST_CALL", default_value_t = 30)]
    rdzv_last_call: u64,
    /// Where node 0's launcher hosts the static rendezvous store.
    #[arg(long, default_value = "127.0.0.1", conflicts_with = "standalone")]
    master_addr: String,
    #[arg(long, default_value_t = 29500, conflicts_with = "standalone")]
    master_port: u16,
    /// One node on a port of its own (picked free and logged): jobs side by side on one host.
    #[arg(long, conflicts_with_all = ["nnodes", "node_rank"])]
    standalone: bool,
    /// The run's id: every rendezvous key is prefixed by it (and by the round).
    #[arg(long, env = "KDMCSE_RDZV_ID", default_value = "kdmcse")]
    rdzv_id: String,
    /// Restarts for the whole job: each failure anywhere ends a round (a membership change does
    /// not count).
    #[arg(long, default_value_t = 0)]
    max_restarts: u64,
    /// How long a stopping worker gets between SIGTERM and SIGKILL.
    #[arg(long, default_value_t = 60)]
    stop_timeout_s: u64,
    /// How long to wait for the master's address to resolve (DNS of a starting pod).
    #[arg(long, default_value_t = 300)]
    master_wait_s: u64,
    /// Also write each worker's output (stdout and stderr, unprefixed) to
    /// `DIR/round-K/rank-R.log`, as torchrun's `--log-dir` with `--tee 3`.
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Short form: run `kdmcse train --config FILE`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// `kdmcse train` arguments (after `--`).
    #[arg(last = true)]
    train_args: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Backend {
    Static,
    Etcd,
}

static SIGNAL: AtomicUsize = AtomicUsize::new(0);

fn main() {
    let args = Args::parse();
    match run(args) {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("[launcher] error: {err:#}");
            // Its own bad arguments, like a worker's bad input: never restarted.
            std::process::exit(exit::INPUT_ERROR);
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
    /// This node's id.
    node: usize,
    nodes: NodeRange,
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
    if local_world == 0 {
        bail!("--gpus/--nproc must be at least 1");
    }
    // A launcher whose round ended comes back once its workers stopped: within their grace, and
    // a few seconds to see the end and join.
    let rejoin = Duration::from_secs(args.stop_timeout_s.saturating_add(10));
    let nodes = NodeRange::parse(&args.nnodes, Duration::from_secs(args.rdzv_last_call), rejoin)?;
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
    if node_rank >= nodes.max {
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
    Ok(Plan { local_world, node: node_rank, nodes, gpus, worker_args })
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

/// Where the workers find the rendezvous store, and which round they belong to.
struct GroupEnv<'a> {
    store: &'a StoreAddress,
    run_id: &'a str,
    round: &'a Round,
    log_dir: Option<&'a Path>,
}

/// A worker's log file, shared by the threads that copy its two streams.
type LogFile = Arc<Mutex<std::fs::File>>;

/// `DIR/round-K/rank-R.log` (appended: a restarted round keeps what came before).
fn open_log(dir: &Path, round: u64, rank: usize) -> Result<LogFile> {
    let dir = dir.join(format!("round-{round}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(format!("rank-{rank}.log"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    Ok(Arc::new(Mutex::new(file)))
}

fn spawn_group(plan: &Plan, env: &GroupEnv, worker_args: &[String]) -> Result<Vec<Child>> {
    let bin = worker_binary();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut children = Vec::with_capacity(plan.local_world);
    let (group_rank, world_size) =
        (env.round.position(plan.node), env.round.members.len() * plan.local_world);
    for local_rank in 0..plan.local_world {
        let rank = group_rank * plan.local_world + local_rank;
        let mut cmd = Command::new(&bin);
        cmd.args(worker_args)
            .env(worker_env::RANK, rank.to_string())
            .env(worker_env::WORLD_SIZE, world_size.to_string())
            .env(worker_env::LOCAL_RANK, local_rank.to_string())
            .env(worker_env::LOCAL_WORLD_SIZE, plan.local_world.to_string())
            .env(worker_env::GROUP_RANK, group_rank.to_string())
            .envs(env.store.to_env())
            .env(worker_env::RUN_ID, env.run_id)
            .env(worker_env::ROUND, env.round.number.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if plan.nodes.is_elastic() {
            cmd.env(worker_env::ELASTIC, "1");
        }
        if let Some(gpus) = &plan.gpus {
            cmd.env("CUDA_VISIBLE_DEVICES", &gpus[local_rank]).env(worker_env::LAUNCHED_GPUS, "1");
        }
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            // Share the cores instead of oversubscribing them (torchrun sets OMP_NUM_THREADS).
            cmd.env("RAYON_NUM_THREADS", (cores / plan.local_world).max(1).to_string());
        }
        // SAFETY: prctl is async-signal-safe. A launcher killed with SIGKILL takes its workers
        // with it, so its peers' collectives fail at once and no orphan holds the GPU.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let log = match env.log_dir.map(|dir| open_log(dir, env.round.number, rank)).transpose() {
            Ok(log) => log,
            Err(err) => {
                stop_group(&mut children, Duration::from_secs(0));
                return Err(err);
            }
        };
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
        let out_log = log.clone();
        std::thread::spawn(move || prefix_lines(out, rank, false, out_log));
        std::thread::spawn(move || prefix_lines(err, rank, true, log));
        children.push(child);
    }
    Ok(children)
}

/// Copies a worker's stream line by line to ours with a rank prefix, and to its log file.
fn prefix_lines(stream: impl std::io::Read, rank: usize, to_stderr: bool, log: Option<LogFile>) {
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        if let Some(log) = &log {
            let _ = writeln!(log.lock().expect("log lock"), "{line}");
        }
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

/// SIGTERM (and SIGCONT, so a stopped worker can act on it), then SIGKILL after `grace`; reaps
/// every child.
fn stop_group(children: &mut [Child], grace: Duration) {
    signal_all(children, libc::SIGTERM);
    signal_all(children, libc::SIGCONT);
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
    Failed {
        rank: usize,
        status: ExitStatus,
    },
    Interrupted(i32),
    /// Another node ended the round.
    RoundEnded(Ending),
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

/// Watches this node's workers until they all finish, one fails, a signal comes or
/// `round_ended` reports that another node ended the round. A signal stops the workers here; after
/// a failure or another node's ending the others still run: the caller stops them, once it has
/// told the other nodes.
fn watch(
    children: &mut [Child],
    first_rank: usize,
    stop_grace: Duration,
    round_ended: &mut dyn FnMut() -> Option<Ending>,
) -> GroupOutcome {
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
            let rank = first_rank + local_rank;
            eprintln!(
                "[launcher] rank {rank} failed with {}: ending the round, then stopping the other workers",
                describe(status)
            );
            return GroupOutcome::Failed { rank, status };
        }
        if done.iter().all(|&d| d) {
            return GroupOutcome::Finished;
        }
        if let Some(ending) = round_ended() {
            return GroupOutcome::RoundEnded(ending);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run(args: Args) -> Result<i32> {
    let plan = plan(&args)?;
    forward_signals()?;
    let (server, address) = start_store(&args, &plan)?;
    let timeout = kdmcse::dist::timeout_from_env()?;
    let job = Job { args: &args, plan: &plan, address: &address, hosts_store: server.is_some() };
    // The store may be down or the other nodes late: a restart can help (exit 1, not 2).
    let code = match Rendezvous::connect(&address, &args.rdzv_id, plan.node, plan.nodes, timeout)
        .and_then(|mut rdzv| job.run(&mut rdzv))
    {
        Ok(code) => code,
        Err(err) => {
            eprintln!("[launcher] node {}: rendezvous failed ({address}): {err:#}", plan.node);
            exit::FAILURE
        }
    };
    drop(server);
    Ok(code)
}

/// Records which signal arrived (SIGINT, SIGTERM); the watch loop forwards it to the workers.
fn forward_signals() -> Result<()> {
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let flag = Arc::new(AtomicUsize::new(0));
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
    Ok(())
}

/// This node's part of the job: the rounds it takes part in.
struct Job<'a> {
    args: &'a Args,
    plan: &'a Plan,
    address: &'a StoreAddress,
    /// Whether this launcher hosts the static store (node 0's).
    hosts_store: bool,
}

impl Job<'_> {
    /// Joins round after round until the job ends: every worker finished, a stop signal, an input
    /// error, or a failure with no restart left. Returns the launcher's exit code; an error is a
    /// rendezvous that failed.
    fn run(&self, rdzv: &mut Rendezvous) -> Result<i32> {
        let max_restarts = self.args.max_restarts;
        let mut next = 0;
        loop {
            let round = match rdzv.join(next)? {
                Joined::Round(round) => round,
                Joined::JobOver(ending) if ending.is_input_error() => {
                    eprintln!(
                        "[launcher] node {}: the job ended on a configuration or input error ({}): nothing to join",
                        self.plan.node, ending.reason
                    );
                    return Ok(exit::INPUT_ERROR);
                }
                Joined::JobOver(_) => {
                    eprintln!("[launcher] node {}: the job has finished: nothing to join", self.plan.node);
                    return Ok(0);
                }
            };
            let restarts = rdzv.failures_before(round.number)?;
            if restarts > max_restarts {
                eprintln!(
                    "[launcher] the job is at round {} after {restarts} failures: no restart is left (--max-restarts {max_restarts})",
                    round.number
                );
                return Ok(exit::FAILURE);
            }
            let ending = match self.round(rdzv, &round)? {
                ControlFlow::Break(code) => return Ok(code),
                ControlFlow::Continue(ending) => ending,
            };
            // Decided on the last word: another node's input error may still replace the ending.
            let ending = rdzv
                .settle(&round)
                .unwrap_or_else(|err| {
                    eprintln!("[launcher] round {}: cannot hear the other nodes out: {err:#}", round.number);
                    None
                })
                .unwrap_or(ending);
            if let Ok(Some(lost)) = rdzv.lost(round.number) {
                eprintln!("[launcher] round {}: {lost}", round.number);
            }
            if ending.is_input_error() {
                eprintln!(
                    "[launcher] round {} ended on a configuration or input error (exit {}, {}): \
                     restarting cannot help",
                    round.number,
                    exit::INPUT_ERROR,
                    ending.reason
                );
                return Ok(exit::INPUT_ERROR);
            }
            if ending.is_failure() && restarts >= max_restarts {
                eprintln!(
                    "[launcher] round {} ended ({}) and no restart is left (--max-restarts {max_restarts})",
                    round.number, ending.reason
                );
                return Ok(ending.code);
            }
            next = round.number + 1;
            let why = if ending.is_failure() { "restarting" } else { "changing the nodes" };
            eprintln!(
                "[launcher] round {} ended ({}): {why} in round {next} ({restarts} of at most {max_restarts} restarts used before), resuming from the newest checkpoint",
                round.number, ending.reason,
            );
        }
    }

    /// Starts this node's workers for `round` and watches them: `Break` with the job's exit code
    /// when the job ends with the round (it finished, a signal stopped it, the workers could not
    /// start), else `Continue` with why the round ended.
    fn round(&self, rdzv: &mut Rendezvous, round: &Round) -> Result<ControlFlow<i32, Ending>> {
        let plan = self.plan;
        let first_rank = round.position(plan.node) * plan.local_world;
        eprintln!(
            "[launcher] node {}: round {}: starting ranks {first_rank}..{} of {} (nodes {:?})",
            plan.node,
            round.number,
            first_rank + plan.local_world,
            round.members.len() * plan.local_world,
            round.members,
        );
        // Every round after the first continues the run from its newest checkpoint.
        let worker_args =
            if round.number == 0 { plan.worker_args.clone() } else { resume_auto(&plan.worker_args) };
        let env = GroupEnv {
            store: self.address,
            run_id: &self.args.rdzv_id,
            round,
            log_dir: self.args.log_dir.as_deref(),
        };
        let mut children = match spawn_group(plan, &env, &worker_args) {
            Ok(children) => children,
            Err(err) => {
                eprintln!("[launcher] error: {err:#}");
                let reason = format!("node {} could not start its workers", plan.node);
                let _ = rdzv.end(round.number, &Ending::failure(exit::INPUT_ERROR, reason));
                return Ok(ControlFlow::Break(exit::INPUT_ERROR));
            }
        };
        let mut round_ended = || match rdzv.watch(round) {
            Ok(Some(ending)) => {
                eprintln!(
                    "[launcher] the round ended on another node ({}): stopping the workers",
                    ending.reason
                );
                Some(ending)
            }
            Ok(None) => None,
            Err(err) => {
                let reason = format!("lost the rendezvous store: {err:#}");
                eprintln!("[launcher] {reason}: stopping the workers");
                Some(Ending::failure(exit::FAILURE, reason))
            }
        };
        let grace = Duration::from_secs(self.args.stop_timeout_s);
        Ok(match watch(&mut children, first_rank, grace, &mut round_ended) {
            GroupOutcome::Finished => match rdzv.finish(round) {
                Ok(None) => ControlFlow::Break(0),
                Ok(Some(ending)) => ControlFlow::Continue(ending),
                // The launcher hosting the static store must outlast every node's finish; any
                // other (every one on etcd) is done once its workers are, store or no store.
                Err(err) if !self.hosts_store => {
                    eprintln!("[launcher] {err:#}");
                    ControlFlow::Break(0)
                }
                Err(err) => return Err(err),
            },
            GroupOutcome::Interrupted(signal) => {
                let code = exit::stopped_by(signal);
                let reason = format!("node {}'s launcher got signal {signal}", plan.node);
                let _ = rdzv.end(round.number, &Ending::failure(code, reason));
                ControlFlow::Break(code)
            }
            GroupOutcome::Failed { rank, status } => {
                // The other nodes first: they stop their workers while this one stops its own.
                let ending = rdzv.fail(round.number, &worker_failure(rank, status));
                stop_group(&mut children, grace);
                ControlFlow::Continue(outranked(rdzv, round, &mut children, first_rank, ending?))
            }
            GroupOutcome::RoundEnded(ending) => {
                stop_group(&mut children, grace);
                ControlFlow::Continue(outranked(rdzv, round, &mut children, first_rank, ending))
            }
        })
    }
}

/// The ending a worker's failure gives its round: the worker's exit code (1 for a signal).
fn worker_failure(rank: usize, status: ExitStatus) -> Ending {
    let code = status.code().filter(|&c| c != 0).unwrap_or(exit::FAILURE);
    Ending::failure(code, format!("rank {rank} failed with {}", describe(status)))
}

/// `ending`, unless one of this node's stopped workers exited with an input error (as its round
/// ended elsewhere, or as it was stopped: a last checkpoint that finds the weights diverged),
/// which replaces it for every node: restarting cannot help.
fn outranked(
    rdzv: &mut Rendezvous,
    round: &Round,
    children: &mut [Child],
    first_rank: usize,
    ending: Ending,
) -> Ending {
    if ending.is_input_error() {
        return ending;
    }
    let input_error = children.iter_mut().enumerate().find_map(|(local_rank, child)| {
        let status = child.try_wait().ok().flatten()?;
        (status.code() == Some(exit::INPUT_ERROR)).then(|| (first_rank + local_rank, status))
    });
    let Some((rank, status)) = input_error else { return ending };
    let own = worker_failure(rank, status);
    eprintln!("[launcher] {}: the round ends on it, not on {}", own.reason, ending.reason);
    rdzv.end(round.number, &own).unwrap_or(own)
}

/// With the static backend node 0 hosts the rendezvous store (on a free loopback port with
/// `--standalone`) and the other nodes wait until node 0's address resolves; with etcd nobody
/// hosts it. Returns the store this launcher hosts, if any, and where everyone reaches it.
fn start_store(args: &Args, plan: &Plan) -> Result<(Option<StoreServer>, StoreAddress)> {
    if args.standalone {
        if args.rdzv_backend == Backend::Etcd {
            bail!("--standalone hosts its own store: it cannot be combined with --rdzv-backend etcd");
        }
        let store = StoreServer::start("127.0.0.1:0")?;
        let port = store.addr.port();
        eprintln!("[launcher] standalone: rendezvous store at 127.0.0.1:{port}");
        return Ok((Some(store), StoreAddress::Tcp(format!("127.0.0.1:{port}"))));
    }
    if args.rdzv_backend == Backend::Etcd {
        let endpoints = parse_endpoints(args.rdzv_endpoint.as_deref().unwrap_or_default())?;
        return Ok((None, StoreAddress::Etcd(endpoints)));
    }
    let store = if plan.node == 0 {
        let bind = format!("0.0.0.0:{}", args.master_port);
        let store = StoreServer::start(&bind).with_context(|| {
            format!("is another job using port {}? give --master-port or --standalone", args.master_port)
        })?;
        Some(store)
    } else {
        wait_for_master(&args.master_addr, args.master_port, Duration::from_secs(args.master_wait_s))?;
        None
    };
    Ok((store, StoreAddress::Tcp(format!("{}:{}", args.master_addr, args.master_port))))
}
