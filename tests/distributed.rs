//! Data-parallel training through `kdmcse-launch` with real worker processes on loopback:
//! 2 ranks x B equal 1 rank x 2B (losses and weights), two single-worker "nodes" equal
//! `--nproc 2`, a killed worker is restarted and the run ends where an uninterrupted one does,
//! a stopped worker is found by its missing heartbeat and a vanished node is replaced, with both
//! nodes restarting in the next round, rendezvous failures name the missing node or rank,
//! `--standalone` jobs run side by side, and `kdmcse check`'s collective checks pass on 2 ranks and
//! on a launched world of one (the checks scripts/device-check.sh runs over NCCL).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use common::process::{assert_ok, event, free_port, kdmcse_bin, kill, launcher};
use kdmcse::dist::contract::RoundKeys;
use kdmcse::dist::etcd::EtcdStore;
use kdmcse::dist::store::Store;

/// KDMCSE with margins, the cosine filter and dropout; output under `DIR/out`.
fn write_config(dir: &Path, batch_size: usize, steps: usize) -> PathBuf {
    common::quick_config(dir, dir.join("out").to_str().unwrap(), batch_size, steps)
}

fn final_weights(run: &Path) -> Vec<(String, Tensor)> {
    common::latest_weights(&run.join("out"))
}

const STEPS: usize = 20;

#[test]
fn two_ranks_train_the_model_of_one_rank_with_twice_the_batch() {
    let (single, double, nodes) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cfg = write_config(single.path(), 16, STEPS);
    let out = Command::new(kdmcse_bin()).args(["train", "--config", cfg.to_str().unwrap()]).output().unwrap();
    assert_ok(&out);

    let cfg = write_config(double.path(), 8, STEPS);
    let out = launcher(&["--nproc", "2", "--standalone", "--", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_ok(&out);
    let stdout = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("[rank 1]"), "worker output is prefixed with its rank");

    let (a, b) = (common::step_losses(single.path()), common::step_losses(double.path()));
    assert_eq!(a.len(), STEPS);
    assert_eq!(b.len(), STEPS);
    for (step, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x - y).abs() < 1e-5, "step {}: loss {x} (1 x 16) vs {y} (2 x 8)", step + 1);
    }
    let diff = common::max_weight_diff(&final_weights(single.path()), &final_weights(double.path()));
    assert!(diff < 1e-5, "weights after {STEPS} steps differ by {diff}");

    // Two launchers as two nodes of one worker each, on loopback.
    let cfg = write_config(nodes.path(), 8, STEPS);
    let port = free_port().to_string();
    let node = |rank: &str| {
        launcher(&[
            "--nproc",
            "1",
            "--nnodes",
            "2",
            "--node-rank",
            rank,
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            &port,
            "--config",
            cfg.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
    };
    let (n0, n1) = (node("0"), node("1"));
    assert_ok(&n0.wait_with_output().unwrap());
    assert_ok(&n1.wait_with_output().unwrap());
    assert_eq!(common::step_losses(nodes.path()), b, "two nodes log the losses of --nproc 2");
    assert_eq!(common::max_weight_diff(&final_weights(nodes.path()), &final_weights(double.path())), 0.0);
}

/// Reads events from the launcher's standard output until `pred` matches one; returns it.
fn wait_for_event(
    lines: &mut impl Iterator<Item = String>,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    for line in lines.by_ref() {
        if let Some(e) = event(&line).filter(|e| pred(e)) {
            return e;
        }
    }
    panic!("launcher output ended before {what}");
}

#[test]
fn a_killed_worker_is_restarted_and_the_run_ends_as_if_uninterrupted() {
    let (straight, faulty) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let steps = 10;
    let cfg = write_config(straight.path(), 8, steps);
    run_two_ranks(&cfg);

    let cfg = write_config(faulty.path(), 8, steps);
    let mut child: Child =
        launcher(&["--nproc", "2", "--max-restarts", "1", "--standalone", "--config", cfg.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
    let stderr = child.stderr.take().unwrap();
    let log =
        std::thread::spawn(move || BufReader::new(stderr).lines().map_while(Result::ok).collect::<Vec<_>>());
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines().map_while(Result::ok);
    let joined = wait_for_event(&mut lines, "rank 1 joining", |e| e["event"] == "joined" && e["rank"] == 1);
    let pid = joined["pid"].as_i64().unwrap() as i32;
    wait_for_event(&mut lines, "the step-4 checkpoint", |e| {
        e["event"] == "checkpoint_saved" && e["step"] == 4
    });
    kill(pid, 9);
    let resumed: Vec<serde_json::Value> =
        lines.filter_map(|l| event(&l)).filter(|e| e["event"] == "resumed").collect();
    let status = child.wait().unwrap();
    let log = log.join().unwrap();
    assert!(status.success(), "launcher failed after the restart:\n{}", log.join("\n"));
    assert!(log.iter().any(|l| l.contains("restarting in round 1")), "{}", log.join("\n"));
    // Rank 0 fails too (its peer is gone), but the launcher names the rank that failed first.
    assert!(log.iter().any(|l| l.contains("rank 1 failed with signal 9")), "{}", log.join("\n"));
    assert_eq!(resumed.len(), 2, "both ranks of the restarted group resume: {resumed:?}");
    assert!(resumed
        .iter()
        .all(|e| e["step"].as_u64().unwrap() >= 4 && e["checkpoint"] == resumed[0]["checkpoint"]));
    assert_eq!(common::max_weight_diff(&final_weights(straight.path()), &final_weights(faulty.path())), 0.0);
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .filter(|c| String::from_utf8_lossy(c).contains(needle))
        .count()
}

#[test]
fn rendezvous_failures_name_the_missing_rank_and_leave_no_process() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), 8, 4);
    let port = free_port().to_string();
    // Node 0 of two; node 1 never comes.
    let start = Instant::now();
    let out = launcher(&[
        "--nproc",
        "1",
        "--nnodes",
        "2",
        "--node-rank",
        "0",
        "--master-port",
        &port,
        "--config",
        cfg.to_str().unwrap(),
    ])
    .env("KDMCSE_TIMEOUT", "5")
    .output()
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rendezvous of round 0 timed out") && err.contains("node(s) [1] never joined"),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(60));
    assert_eq!(processes_mentioning(cfg.to_str().unwrap()), 0, "a worker outlived its launcher");

    // A worker whose master is not there.
    let out = Command::new(kdmcse_bin())
        .args(["train", "--config", cfg.to_str().unwrap()])
        .envs([
            ("WORLD_SIZE", "2"),
            ("RANK", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", &free_port().to_string()),
            ("KDMCSE_TIMEOUT", "3"),
            ("RUST_BACKTRACE", "0"),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rank 1: cannot join the job") && err.contains("cannot reach the master"), "{err}");
}

/// `kdmcse check` on `world` ranks joined through the rendezvous store (TCP collectives), with
/// `extra` arguments.
fn check_ranks(world: usize, extra: &[&str]) -> Vec<Output> {
    let port = free_port().to_string();
    let children: Vec<Child> = (0..world)
        .map(|rank| {
            Command::new(kdmcse_bin())
                .args(["check", "--device", "cpu"])
                .args(extra)
                .envs([
                    ("WORLD_SIZE", world.to_string().as_str()),
                    ("RANK", rank.to_string().as_str()),
                    ("MASTER_ADDR", "127.0.0.1"),
                    ("MASTER_PORT", port.as_str()),
                    ("KDMCSE_TIMEOUT", "60"),
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children.into_iter().map(|c| c.wait_with_output().unwrap()).collect()
}

#[test]
fn collective_checks_pass_on_two_ranks_and_on_a_launched_world_of_one() {
    // `kdmcse check` fails (exit 1) if any check fails; the world of one also compares the
    // encoder (trivially, CPU against CPU: this covers the command's path).
    let minilm = common::minilm_dir();
    for (world, extra) in [(2, vec![]), (1, vec!["--model", minilm.to_str().unwrap()])] {
        for (rank, out) in check_ranks(world, &extra).iter().enumerate() {
            assert_ok(out);
            let stdout = String::from_utf8_lossy(&out.stdout);
            let (events, checks): (Vec<serde_json::Value>, Vec<serde_json::Value>) = stdout
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .partition(|v: &serde_json::Value| v.get("event").is_some());
            for name in [
                "all_gather",
                "all_reduce_sum",
                "all_reduce_grads",
                "own_rows_of_pool_grads",
                "barrier",
                "abort",
            ] {
                assert!(
                    checks.iter().any(|c| c["name"] == name && c["passed"] == true),
                    "{name} on rank {rank}: {stdout}"
                );
            }
            assert!(checks.iter().all(|c| c["rank"] == rank), "{stdout}");
            let encoder_checks =
                checks.iter().filter(|c| c["name"].as_str().unwrap().starts_with("encoder_")).count();
            assert_eq!(encoder_checks, if extra.is_empty() { 0 } else { 4 }, "{stdout}");
            let joined: Vec<_> = events.iter().filter(|e| e["event"] == "joined").collect();
            assert_eq!(joined.len(), 1, "{stdout}");
            assert_eq!(
                (&joined[0]["rank"], &joined[0]["world_size"]),
                (&rank.into(), &world.into()),
                "{stdout}"
            );
        }
    }
}

/// Pre-emption: SIGTERM to `kdmcse-launch` in the middle of a run. The ranks agree on a step,
/// checkpoint it and exit; the launcher exits 143 (128 + SIGTERM) within its grace period;
/// `latest` is the interrupted step, and resuming ends bitwise where an uninterrupted run ends.
#[test]
fn sigterm_to_the_launcher_stops_every_rank_at_one_step_and_the_resume_is_exact() {
    let (straight, stopped) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let steps = 8;
    let cfg = write_config(straight.path(), 8, steps);
    run_two_ranks(&cfg);

    let cfg = write_config(stopped.path(), 8, steps);
    let args = ["--nproc", "2", "--standalone", "--stop-timeout-s", "30", "--config", cfg.to_str().unwrap()];
    let mut child = launcher(&args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines().map_while(Result::ok);
    wait_for_event(&mut lines, "the step-2 checkpoint", |e| {
        e["event"] == "checkpoint_saved" && e["step"] == 2
    });
    let sent = Instant::now();
    kill(child.id() as i32, 15);
    let rest: Vec<serde_json::Value> = lines.filter_map(|l| event(&l)).collect();
    let status = child.wait().unwrap();
    assert!(sent.elapsed() < Duration::from_secs(30), "stopping took {:?}", sent.elapsed());
    assert_eq!(status.code(), Some(143), "{rest:?}");
    let summary =
        rest.iter().find(|e| e["event"] == "summary").unwrap_or_else(|| panic!("no summary: {rest:?}"));
    assert_eq!(summary["outcome"], "interrupted");
    let at = summary["steps"].as_u64().unwrap();
    assert!((2..steps as u64).contains(&at), "stopped at step {at}");
    let latest = std::fs::read_to_string(stopped.path().join("out/latest")).unwrap();
    assert_eq!(latest.trim(), format!("step-{at:08}"), "latest is the interrupted step");

    let resumed = launcher(&args).output().unwrap();
    assert_ok(&resumed);
    let events = common::process::events(&resumed.stdout, "resumed");
    assert!(events.len() == 2 && events.iter().all(|e| e["step"] == at), "{events:?}");
    assert_eq!(common::max_weight_diff(&final_weights(straight.path()), &final_weights(stopped.path())), 0.0);
}

/// Model selection on 2 ranks: rank 0 evaluates, every rank agrees on the best step, and the
/// best checkpoint survives retention and is exported.
#[test]
fn two_ranks_keep_and_export_the_best_checkpoint_with_progress_and_rank_logs() {
    let run = tempfile::tempdir().unwrap();
    let cfg = write_config(run.path(), 4, 6);
    let logs = run.path().join("logs");
    let args = ["--nproc", "2", "--standalone", "--log-dir", logs.to_str().unwrap()];
    let sets = ["--set", "train.eval_steps=2", "--set", "output.keep=1", "--set", "train.lr=5e-4"];
    let out = launcher(&args).args(["--", "--config", cfg.to_str().unwrap()]).args(sets).output().unwrap();
    assert_ok(&out);
    common::assert_best_is_kept_and_exported(run.path(), &run.path().join("out"), 6);
    // Rank 0's progress lines come through the launcher (no terminal), and each rank's output is
    // in its own file too, unprefixed.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.lines().any(|l| l.starts_with("[rank 0]") && l.contains("step 6/6 loss ")), "{err}");
    for rank in [0, 1] {
        let log = std::fs::read_to_string(logs.join(format!("round-0/rank-{rank}.log"))).unwrap();
        let joined = format!("\"event\":\"joined\",\"rank\":{rank}");
        assert!(log.lines().any(|l| l.contains(&joined)), "rank {rank}'s log:\n{log}");
        assert!(!log.contains("[rank "), "the file is unprefixed:\n{log}");
    }
}

/// One line of a node's output (its launcher's and its workers'), when it came.
struct Line {
    node: usize,
    at: Instant,
    text: String,
}

/// Node `node` of a two-node job (one worker each) on loopback; its output goes to `lines`
/// labelled `label`. Heartbeats every second, a peer lost after 5 s.
fn start_node(node: usize, label: usize, port: &str, cfg: &Path, lines: &mpsc::Sender<Line>) -> Child {
    let node = node.to_string();
    spawn_node(label, &["--nnodes", "2", "--node-rank", &node, "--master-port", port], cfg, lines)
}

/// A launcher of one worker with `args`, its output on `lines` labelled `label`; at most 2
/// restarts, heartbeats every second, a peer lost after 5 s.
fn spawn_node(label: usize, args: &[&str], cfg: &Path, lines: &mpsc::Sender<Line>) -> Child {
    let mut child = launcher(&["--nproc", "1"])
        .args(args)
        .args(["--max-restarts", "2", "--stop-timeout-s", "10", "--config", cfg.to_str().unwrap(), "--"])
        .args(["--set", "dist.heartbeat_s=1", "--set", "dist.peer_timeout_s=5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let forward = |stream: Box<dyn std::io::Read + Send>| {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for text in BufReader::new(stream).lines().map_while(Result::ok) {
                let _ = lines.send(Line { node: label, at: Instant::now(), text });
            }
        });
    };
    forward(Box::new(child.stdout.take().unwrap()));
    forward(Box::new(child.stderr.take().unwrap()));
    child
}

/// Waits for an event on `lines` that `pred` accepts, keeping every line in `seen`.
fn wait_for_line_event(
    lines: &mpsc::Receiver<Line>,
    seen: &mut Vec<Line>,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    loop {
        let line = lines.recv_timeout(Duration::from_secs(300)).expect("the run went quiet");
        let found = event(&line.text).filter(|e| pred(e));
        seen.push(line);
        if let Some(e) = found {
            return e;
        }
    }
}

fn wait_ok(child: &mut Child) {
    let status = child.wait().unwrap();
    assert!(status.success(), "a launcher failed: {status:?}");
}

/// The uninterrupted reference: `cfg` on two ranks of one standalone launcher, which must succeed.
fn run_two_ranks(cfg: &Path) {
    assert_ok(
        &launcher(&["--nproc", "2", "--standalone", "--config", cfg.to_str().unwrap()]).output().unwrap(),
    );
}

/// The first of `seen` from `node` whose text has every one of `needles`, and when it came.
fn first_line<'a>(seen: &'a [Line], node: usize, needles: &[&str]) -> Option<&'a Line> {
    seen.iter().find(|l| l.node == node && needles.iter().all(|n| l.text.contains(n)))
}

fn dump(seen: &[Line]) -> String {
    seen.iter().map(|l| format!("node {}: {}", l.node, l.text)).collect::<Vec<_>>().join("\n")
}

/// Two nodes, one worker each. SIGSTOP node 1's worker mid-run: rank 0's watchdog declares it
/// lost within `peer_timeout_s + 10` s, every launcher names it, both nodes restart in round 1
/// (node 1's launcher stops its own frozen worker), rank 0 leaves a flight record, and the run
/// ends bitwise where an uninterrupted one does. Then kill -9 node 1's launcher and worker and
/// start a replacement launcher: both nodes continue in the next round and end there too.
#[test]
fn a_frozen_or_vanished_node_ends_the_round_everywhere_and_the_run_ends_as_if_uninterrupted() {
    let (straight, frozen, vanished) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let steps = 10;
    let cfg = write_config(straight.path(), 8, steps);
    run_two_ranks(&cfg);
    let expected = final_weights(straight.path());
    let is_checkpoint_4 = |e: &serde_json::Value| e["event"] == "checkpoint_saved" && e["step"] == 4;
    let is_rank_1 = |e: &serde_json::Value| e["event"] == "joined" && e["rank"] == 1;

    // SIGSTOP.
    let cfg = write_config(frozen.path(), 8, steps);
    let port = free_port().to_string();
    let (tx, rx) = mpsc::channel();
    let mut nodes = [start_node(0, 0, &port, &cfg, &tx), start_node(1, 1, &port, &cfg, &tx)];
    drop(tx);
    let mut seen = Vec::new();
    let worker = wait_for_line_event(&rx, &mut seen, is_rank_1)["pid"].as_i64().unwrap() as i32;
    wait_for_line_event(&rx, &mut seen, is_checkpoint_4);
    kill(worker, 19);
    let stopped = Instant::now();
    nodes.iter_mut().for_each(wait_ok);
    seen.extend(rx.iter());
    let log = dump(&seen);
    for (node, who) in [(0, "[rank 0]"), (0, "[launcher]"), (1, "[launcher]")] {
        let line = first_line(&seen, node, &[who, "rank 1 was lost: no heartbeat for"])
            .unwrap_or_else(|| panic!("node {node}'s {who} does not name the stopped rank:\n{log}"));
        let after = line.at.duration_since(stopped);
        assert!(after < Duration::from_secs(15), "node {node}'s {who} took {after:?}:\n{log}");
        assert!(after > Duration::from_secs(4), "node {node}'s {who} reported after {after:?}: too soon");
    }
    for node in [0, 1] {
        assert!(first_line(&seen, node, &["[launcher]", "round 1: starting"]).is_some(), "{log}");
    }
    let record =
        std::fs::read(frozen.path().join("out/diagnostics/round-0/rank-0.json")).expect("a flight record");
    let record: serde_json::Value = serde_json::from_slice(&record).unwrap();
    assert!(record["error"].as_str().unwrap().contains("rank 1 was lost"), "{record}");
    let last = record["collectives"].as_array().unwrap().last().unwrap().clone();
    assert!(last["error"].as_str().is_some_and(|e| e.contains("aborted")), "{record}");
    assert_eq!(common::max_weight_diff(&expected, &final_weights(frozen.path())), 0.0);

    // kill -9 of node 1's launcher and worker, then a replacement launcher for node 1.
    let cfg = write_config(vanished.path(), 8, steps);
    let port = free_port().to_string();
    let (tx, rx) = mpsc::channel();
    let [mut zero, mut one] = [start_node(0, 0, &port, &cfg, &tx), start_node(1, 1, &port, &cfg, &tx)];
    let mut seen = Vec::new();
    let worker = wait_for_line_event(&rx, &mut seen, is_rank_1)["pid"].as_i64().unwrap() as i32;
    wait_for_line_event(&rx, &mut seen, is_checkpoint_4);
    kill(worker, 9);
    kill(one.id() as i32, 9);
    let _ = one.wait();
    let mut replacement = start_node(1, 2, &port, &cfg, &tx);
    drop(tx);
    wait_ok(&mut zero);
    wait_ok(&mut replacement);
    seen.extend(rx.iter());
    let log = dump(&seen);
    assert!(first_line(&seen, 0, &["[launcher]", "round 1: starting"]).is_some(), "{log}");
    assert!(first_line(&seen, 2, &["[launcher]", "round 1: starting"]).is_some(), "{log}");
    assert_eq!(common::max_weight_diff(&expected, &final_weights(vanished.path())), 0.0);
}

/// `--standalone` jobs on one host each get a store port of their own.
#[test]
fn standalone_jobs_run_side_by_side() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let jobs: Vec<Child> = dirs
        .iter()
        .map(|dir| {
            let cfg = write_config(dir.path(), 4, 3);
            launcher(&["--nproc", "2", "--standalone", "--config", cfg.to_str().unwrap()])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut ports = Vec::new();
    for job in jobs {
        let out = job.wait_with_output().unwrap();
        assert_ok(&out);
        let err = String::from_utf8_lossy(&out.stderr);
        let port = err.split("rendezvous store at 127.0.0.1:").nth(1).expect("the store's port is logged");
        ports.push(port.split_whitespace().next().unwrap().to_owned());
    }
    assert_ne!(ports[0], ports[1]);
    for dir in &dirs {
        assert_eq!(common::step_losses(dir.path()).len(), 3);
    }
}

/// Node `node` of `nnodes` (`N` or `MIN:MAX`) of run `run` on the etcd cluster at `endpoints`.
fn etcd_node(
    node: usize,
    label: usize,
    nnodes: &str,
    endpoints: &str,
    cfg: &Path,
    lines: &mpsc::Sender<Line>,
) -> Child {
    let node = node.to_string();
    let args =
        ["--nnodes", nnodes, "--node-rank", &node, "--rdzv-backend", "etcd", "--rdzv-endpoint", endpoints];
    spawn_node(label, &[&args[..], &["--rdzv-id", "job", "--rdzv-last-call", "3"]].concat(), cfg, lines)
}

/// Two launchers meet on a 3-member etcd cluster and train bitwise as `--nproc 2` on the static
/// store does, although an etcd member is killed mid-run: the round goes on.
#[test]
fn two_launchers_on_etcd_train_as_on_the_static_store_and_outlive_an_etcd_member() {
    let (straight, on_etcd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let steps = 10;
    let cfg = write_config(straight.path(), 8, steps);
    run_two_ranks(&cfg);
    let mut etcd = common::etcd::EtcdCluster::start(3);
    let cfg = write_config(on_etcd.path(), 8, steps);
    let (tx, rx) = mpsc::channel();
    let mut nodes = [0, 1].map(|n| etcd_node(n, n, "2", &etcd.endpoints(), &cfg, &tx));
    drop(tx);
    let mut seen = Vec::new();
    wait_for_line_event(&rx, &mut seen, |e| e["event"] == "checkpoint_saved" && e["step"] == 4);
    // Each rank's collective address lives as long as the rank, not its start-up: a peer may
    // read it after the writer joined (rank 0 once waited for a key that rank 1's finished
    // start-up had taken with it).
    let endpoints: Vec<String> = etcd.endpoints().split(',').map(String::from).collect();
    let mut store = EtcdStore::connect(&endpoints, Duration::from_secs(10)).unwrap();
    for rank in 0..2 {
        let key = RoundKeys::new("job", 0).tcp_address(rank);
        assert!(store.check(&key).unwrap().is_some(), "{key} vanished while rank {rank} trains");
    }
    etcd.kill(0);
    nodes.iter_mut().for_each(wait_ok);
    seen.extend(rx.iter());
    let log = dump(&seen);
    for node in [0, 1] {
        assert!(first_line(&seen, node, &["[launcher]", "round 0: starting ranks"]).is_some(), "{log}");
        assert!(first_line(&seen, node, &["[launcher]", "round 1"]).is_none(), "a round ended:\n{log}");
    }
    assert_eq!(common::step_losses(on_etcd.path()), common::step_losses(straight.path()));
    assert_eq!(common::max_weight_diff(&final_weights(straight.path()), &final_weights(on_etcd.path())), 0.0);
}

/// `--nnodes 1:2` on etcd. kill -9 node 0's launcher and worker mid-run: node 1 ends the round
/// within `peer_timeout_s + 10` s, trains alone (1 rank with the same global batch) from the
/// newest checkpoint, and when node 0 comes back both nodes continue in the next round. The
/// final weights are those of an uninterrupted 2-rank run (to 1e-5: the world size changed).
#[test]
fn node_0_lost_on_etcd_leaves_node_1_training_alone_until_it_comes_back() {
    let (straight, elastic) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let steps = 24;
    let cfg = common::pool_config(straight.path(), 16, None, steps);
    run_two_ranks(&cfg);
    let etcd = common::etcd::EtcdCluster::start(1);
    let cfg = common::pool_config(elastic.path(), 16, None, steps);
    let (tx, rx) = mpsc::channel();
    let [mut zero, mut one] = [0, 1].map(|n| etcd_node(n, n, "1:2", &etcd.endpoints(), &cfg, &tx));
    let mut seen = Vec::new();
    // Under load node 1 may join after the last call: then round 0 is node 0's alone and both
    // nodes meet in round 1. The kill comes in the first round with both.
    let rank_0 = wait_for_line_event(&rx, &mut seen, |e| {
        e["event"] == "joined" && e["rank"] == 0 && e["world_size"] == 2
    });
    let both = rank_0["round"].as_u64().unwrap();
    wait_for_line_event(&rx, &mut seen, |e| e["event"] == "checkpoint_saved" && e["step"] == 4);
    kill(zero.id() as i32, 9);
    kill(rank_0["pid"].as_i64().unwrap() as i32, 9);
    let killed = Instant::now();
    let _ = zero.wait();
    let alone = wait_for_line_event(&rx, &mut seen, |e| e["event"] == "resumed" && e["world_size"] == 1);
    let noticed =
        first_line(&seen, 1, &["[launcher]", &format!("round {both} ended")]).expect("node 1 ends the round");
    assert!(noticed.at.duration_since(killed) < Duration::from_secs(15), "{}", dump(&seen));
    let step = alone["step"].as_u64().unwrap();
    wait_for_line_event(&rx, &mut seen, |e| {
        e["event"] == "checkpoint_saved" && e["step"].as_u64() > Some(step)
    });

    zero = etcd_node(0, 2, "1:2", &etcd.endpoints(), &cfg, &tx);
    drop(tx);
    wait_ok(&mut zero);
    wait_ok(&mut one);
    seen.extend(rx.iter());
    let log = dump(&seen);
    let solo = both + 1;
    let solo_start = format!("round {solo}: starting ranks 0..1 of 1 (nodes [1])");
    assert!(first_line(&seen, 1, &["[launcher]", &solo_start]).is_some(), "{log}");
    let change = format!("changing the nodes in round {}", solo + 1);
    assert!(first_line(&seen, 1, &["node 0 is waiting to join", &change]).is_some(), "{log}");
    // Both nodes then start the next round together: node 0 waits for node 1 to stop its worker
    // however long past the last call that takes.
    let together = format!("round {}: starting", solo + 1);
    for node in [1, 2] {
        assert!(
            first_line(&seen, node, &["[launcher]", &together, "of 2 (nodes [0, 1])"]).is_some(),
            "{log}"
        );
    }
    let diff = common::max_weight_diff(&final_weights(straight.path()), &final_weights(elastic.path()));
    assert!(diff < 1e-5, "weights differ by {diff} from the uninterrupted run:\n{log}");
}

/// A stand-in for `kdmcse train` (the launcher runs it through $KDMCSE_BIN): a shell script.
fn stand_in_worker(dir: &Path, script: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("worker.sh");
    std::fs::write(&path, format!("#!/bin/sh\n{script}")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Runs the two launchers of a 2-node job on the static store with `nproc` stand-in workers each
/// (`worker`, with `env` set) and `args` before the workers' arguments; returns how each ended.
fn run_two_stand_in_nodes(nproc: &str, worker: &Path, args: &[&str], env: &[(&str, &Path)]) -> [Output; 2] {
    let port = free_port().to_string();
    let nodes = ["0", "1"].map(|node| {
        launcher(&["--nproc", nproc, "--nnodes", "2", "--node-rank", node, "--master-port", &port])
            .args(args)
            .args(["--", "--config", "unread.toml"])
            .env("KDMCSE_BIN", worker)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    });
    nodes.map(|node| node.wait_with_output().unwrap())
}

/// A launcher's log (its stderr).
fn log(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Every rank must train the same run: a rank started with another config, one that reads another
/// copy of the data at the same path, and ranks whose node-local `output.dir` holds different
/// checkpoints are each refused before the first step (exit 2, naming what differs), while a rank
/// that cannot read the checkpoint rank 0 resumes fails as a restart may cure (exit 1); the same
/// sentences at another path, with blank lines, are the same data. The two nodes are two
/// folders: each rank works in its own (`node-$RANK`), where the config's relative paths resolve.
#[test]
fn ranks_that_differ_in_config_data_or_checkpoints_are_refused_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::quick_config(dir.path(), "out", 4, 2);
    let wiki = std::fs::read_to_string(common::shared_dir().join("data/wiki/wiki_sample_10k.txt")).unwrap();
    let sentences: Vec<&str> = wiki.lines().take(100).collect();
    let write_corpus = |node: usize, file: &str, sentences: &[&str], separator: &str| {
        let folder = dir.path().join(format!("node-{node}"));
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(folder.join(file), sentences.join(separator) + "\n").unwrap();
    };
    let worker = stand_in_worker(
        dir.path(),
        "cd \"$NODES/node-$RANK\" || exit 1\n\
         if [ \"$RANK\" = 1 ]; then exec \"$KDMCSE\" \"$@\" $RANK_1_ARGS; else exec \"$KDMCSE\" \"$@\"; fi\n",
    );
    let launch = |rank_1_args: &str| {
        let cfg = config.to_str().unwrap();
        launcher(&[
            "--nproc",
            "2",
            "--standalone",
            "--config",
            cfg,
            "--",
            "--set",
            "data.text=[\"corpus.txt\"]",
        ])
        .env("KDMCSE_BIN", &worker)
        .env("KDMCSE", kdmcse_bin())
        .env("NODES", dir.path())
        .env("RANK_1_ARGS", rank_1_args)
        .output()
        .unwrap()
    };
    let refused = |out: &Output, needles: &[&str]| {
        assert_eq!(out.status.code(), Some(2), "{}", log(out));
        assert!(!log(out).contains("step 1/"), "a step was taken:\n{}", log(out));
        for needle in needles {
            assert!(log(out).contains(needle), "no {needle:?} in:\n{}", log(out));
        }
    };
    write_corpus(0, "corpus.txt", &sentences, "\n");
    write_corpus(1, "corpus.txt", &sentences, "\n");
    refused(
        &launch("--set train.lr=1e-4"),
        &["rank 1 was started with train.lr = 0.0001, rank 0 with train.lr ="],
    );
    // A key a resume may change, but which decides when the ranks meet in collectives.
    refused(
        &launch("--set output.checkpoint_steps=1"),
        &["rank 1 was started with output.checkpoint_steps = 1, rank 0 with output.checkpoint_steps = 2"],
    );
    let mut edited = sentences.clone();
    edited[50] = "a sentence only node 1 has";
    write_corpus(1, "corpus.txt", &edited, "\n");
    refused(
        &launch(""),
        &["rank 1 reads the text corpus (data.text) as 100 sentences", "rank 0 as 100 sentences"],
    );
    // The same sentences at another path, with blank lines between them: the same data.
    write_corpus(1, "copy.txt", &sentences, "\n\n");
    let copy = "--set data.text=[\"copy.txt\"]";
    assert_ok(&launch(copy));
    assert!(dir.path().join("node-0/out/checkpoints/step-00000002").is_dir());
    refused(
        &launch(copy),
        &["rank 0 resumes from step-00000002 and rank 1 from (no checkpoint)", "node-local output.dir"],
    );
    // Rank 1's store lists rank 0's checkpoint but cannot read it: a failure a restart may cure.
    let (local_0, local_1) = (dir.path().join("node-0/out"), dir.path().join("node-1/out"));
    assert!(Command::new("cp").arg("-rT").args([&local_0, &local_1]).status().unwrap().success());
    let weights = local_1.join("checkpoints/step-00000002/model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    bytes[1000] ^= 0xFF;
    std::fs::write(&weights, bytes).unwrap();
    let out = launch(copy);
    assert_eq!(out.status.code(), Some(1), "{}", log(&out));
    assert!(log(&out).contains("rank 1 could not read what rank 0 did"), "{}", log(&out));
}

/// A worker that fails ends the round for every node before its launcher stops the node's other
/// workers: node 0's rank 1 stops only once node 1's workers got their SIGTERM, which node 1's
/// launcher sends when it sees the round end. Had node 0 stopped its own workers first, it would
/// have waited out `--stop-timeout-s` and killed rank 1.
#[test]
fn a_failed_worker_ends_the_round_everywhere_before_its_node_stops_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let signalled = dir.path().join("node-1-signalled");
    let worker = stand_in_worker(
        dir.path(),
        "case \"$RANK\" in\n\
         0) sleep 1; exit 1 ;;\n\
         1) trap '' TERM; while [ ! -e \"$SIGNALLED\" ]; do sleep 0.1; done ;;\n\
         *) trap 'touch \"$SIGNALLED\"; exit 143' TERM; while :; do sleep 0.1; done ;;\n\
         esac\n",
    );
    let [zero, one] =
        run_two_stand_in_nodes("2", &worker, &["--stop-timeout-s", "60"], &[("SIGNALLED", &signalled)]);
    assert_eq!(zero.status.code(), Some(1), "{}", log(&zero));
    assert!(!log(&zero).contains("did not stop within"), "node 0 stopped its workers first:\n{}", log(&zero));
    assert_eq!(one.status.code(), Some(1), "{}", log(&one));
    assert!(log(&one).contains("(rank 0 failed with exit code 1)"), "{}", log(&one));
}

/// An input error outranks the failure written first: node 0's rank fails (exit 1, worth a
/// restart) and ends the round; node 1's worker then exits 2 as it is stopped (as a last
/// checkpoint that finds the weights diverged does). Neither node restarts, though a restart is
/// left, and both exit 2.
#[test]
fn an_input_error_found_while_stopping_ends_the_job_on_every_node() {
    let dir = tempfile::tempdir().unwrap();
    let worker = stand_in_worker(
        dir.path(),
        "case \"$RANK\" in\n\
         0) sleep 1; exit 1 ;;\n\
         *) trap 'sleep 0.3; exit 2' TERM; while :; do sleep 0.1; done ;;\n\
         esac\n",
    );
    let args = ["--max-restarts", "1", "--stop-timeout-s", "10"];
    for out in &run_two_stand_in_nodes("1", &worker, &args, &[]) {
        assert_eq!(out.status.code(), Some(2), "{}", log(out));
        assert!(!log(out).contains("round 1"), "a round was restarted:\n{}", log(out));
        assert!(log(out).contains("rank 1 failed with exit code 2"), "{}", log(out));
    }
}

/// On etcd no launcher hosts the store. The only member dies after node 0's worker finished, while
/// node 0 waits for node 1's: node 0's part is done (exit 0, the store's error logged); node 1,
/// whose worker still ran, has failed (exit 1: a restart may help).
#[test]
fn a_node_whose_workers_finished_is_done_though_etcd_dies() {
    let dir = tempfile::tempdir().unwrap();
    // Rank 0 finishes at once, rank 1 runs on.
    let worker = stand_in_worker(dir.path(), "[ \"$RANK\" = 0 ] && exit 0\nexec sleep 120\n");
    let mut etcd = common::etcd::EtcdCluster::start(1);
    let endpoints = etcd.endpoints();
    let nodes = ["0", "1"].map(|node| {
        launcher(&["--nproc", "1", "--nnodes", "2", "--node-rank", node, "--rdzv-backend", "etcd"])
            .args([
                "--rdzv-endpoint",
                &endpoints,
                "--rdzv-id",
                "job",
                "--stop-timeout-s",
                "2",
                "--",
                "--config",
                "unread.toml",
            ])
            .env("KDMCSE_BIN", &worker)
            .env("KDMCSE_TIMEOUT", "5")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    });
    let mut store = EtcdStore::connect(std::slice::from_ref(&endpoints), Duration::from_secs(10)).unwrap();
    let started = Instant::now();
    while store.check(&RoundKeys::new("job", 0).node_done(0)).unwrap().is_none() {
        assert!(started.elapsed() < Duration::from_secs(60), "node 0's worker never finished");
        std::thread::sleep(Duration::from_millis(50));
    }
    etcd.kill(0);
    let [zero, one] = nodes.map(|node| node.wait_with_output().unwrap());
    assert_eq!(zero.status.code(), Some(0), "{}", log(&zero));
    assert!(log(&zero).contains("recording that this node's workers finished"), "{}", log(&zero));
    assert_eq!(one.status.code(), Some(1), "{}", log(&one));
    assert!(log(&one).contains("lost the rendezvous store"), "{}", log(&one));
}

/// An etcd that does not answer is a rendezvous failure a restart may cure (exit 1) that names
/// the endpoints; an elastic job refuses a per-rank batch size (exit 2) and names the key to use.
#[test]
fn unreachable_etcd_and_per_rank_batches_under_elastic_ranges_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), 8, 4);
    let endpoints = format!("127.0.0.1:{},127.0.0.1:{}", free_port(), free_port());
    let out = launcher(&["--nproc", "1", "--rdzv-backend", "etcd", "--rdzv-endpoint", &endpoints])
        .args(["--config", cfg.to_str().unwrap()])
        .env("KDMCSE_TIMEOUT", "3")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    common::process::assert_fails_with(&out, &[&format!("cannot reach etcd at {endpoints}")]);

    let port = free_port().to_string();
    let out = launcher(&["--nproc", "1", "--nnodes", "1:2", "--rdzv-last-call", "0", "--master-port", &port])
        .args(["--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    common::process::assert_fails_with(&out, &["train.batch_size = 8", "set train.global_batch"]);
}
