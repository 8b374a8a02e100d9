//! Data-parallel training through `kdmcse-launch` with real worker processes on loopback:
//! 2 ranks x B equal 1 rank x 2B (losses and weights), two single-worker "nodes" equal
//! `--nproc 2`, a killed worker is restarted and the run ends where an uninterrupted one does,
//! rendezvous failures name the missing rank, and `kdmcse check`'s collective checks pass on 2
//! ranks and on a launched world of one (the checks scripts/device-check.sh runs over NCCL).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::Tensor;

fn kdmcse_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kdmcse"))
}

/// The launcher is the workspace's other binary, built beside `kdmcse`.
fn launcher_bin() -> PathBuf {
    let path = kdmcse_bin().with_file_name("kdmcse-launch");
    assert!(
        path.is_file(),
        "{} not built: cargo build --workspace --release (scripts/test.sh does)",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// KDMCSE with margins, the cosine filter and dropout; output under `DIR/out`.
fn write_config(dir: &Path, batch_size: usize, steps: usize) -> PathBuf {
    common::quick_config(dir, dir.join("out").to_str().unwrap(), batch_size, steps)
}

fn final_weights(run: &Path) -> Vec<(String, Tensor)> {
    common::latest_weights(&run.join("out"))
}

fn launcher(args: &[&str]) -> Command {
    let mut cmd = Command::new(launcher_bin());
    cmd.args(args).env("KDMCSE_BIN", kdmcse_bin()).env("RUST_BACKTRACE", "0").env("KDMCSE_TIMEOUT", "60");
    cmd
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "failed ({:?}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| v["loss"].as_f64())
        .collect()
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
    let port = free_port().to_string();
    let out = launcher(&["--nproc", "2", "--master-port", &port, "--", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_ok(&out);
    let stdout = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("[rank 1]"), "worker output is prefixed with its rank");

    let (a, b) = (losses(single.path()), losses(double.path()));
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
    assert_eq!(losses(nodes.path()), b, "two nodes log the losses of --nproc 2");
    assert_eq!(common::max_weight_diff(&final_weights(nodes.path()), &final_weights(double.path())), 0.0);
}

/// Reads the launcher's stderr until `pred` matches a line; returns the line.
fn wait_for_line(
    lines: &mut impl Iterator<Item = String>,
    what: &str,
    pred: impl Fn(&str) -> bool,
) -> String {
    for line in lines.by_ref() {
        if pred(&line) {
            return line;
        }
    }
    panic!("launcher output ended before {what}");
}

#[test]
fn a_killed_worker_is_restarted_and_the_run_ends_as_if_uninterrupted() {
    let (straight, faulty) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let steps = 10;
    let cfg = write_config(straight.path(), 8, steps);
    let port = free_port().to_string();
    assert_ok(
        &launcher(&["--nproc", "2", "--master-port", &port, "--config", cfg.to_str().unwrap()])
            .output()
            .unwrap(),
    );

    let cfg = write_config(faulty.path(), 8, steps);
    let port = free_port().to_string();
    let mut child: Child = launcher(&[
        "--nproc",
        "2",
        "--max-restarts",
        "1",
        "--master-port",
        &port,
        "--config",
        cfg.to_str().unwrap(),
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines().map_while(Result::ok);
    let joined = wait_for_line(&mut lines, "rank 1 joining", |l| {
        l.starts_with("[rank 1]") && l.contains("joined the job")
    });
    let pid: i32 =
        joined.split("pid=").nth(1).and_then(|s| s.split_whitespace().next()).unwrap().parse().unwrap();
    wait_for_line(&mut lines, "the step-4 checkpoint", |l| {
        l.contains("checkpoint saved") && l.contains("step-00000004")
    });
    // SAFETY: signalling a worker process this test started (through the launcher).
    assert_eq!(unsafe { libc_kill(pid, 9) }, 0);
    let rest: Vec<String> = lines.collect();
    let status = child.wait().unwrap();
    assert!(status.success(), "launcher failed after the restart:\n{}", rest.join("\n"));
    assert!(rest.iter().any(|l| l.contains("restarting the group")), "{}", rest.join("\n"));
    assert!(rest.iter().any(|l| l.contains("resumed")), "the restarted group resumes from a checkpoint");
    assert_eq!(common::max_weight_diff(&final_weights(straight.path()), &final_weights(faulty.path())), 0.0);
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
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
    assert!(err.contains("rank(s) [1] never arrived"), "{err}");
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
            let checks: Vec<serde_json::Value> =
                stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
            for name in
                ["all_gather", "all_reduce_sum", "all_reduce_grads", "gather_with_local_grad", "barrier"]
            {
                assert!(
                    checks.iter().any(|c| c["name"] == name && c["passed"] == true),
                    "{name} on rank {rank}: {stdout}"
                );
            }
            assert!(checks.iter().all(|c| c["rank"] == rank), "{stdout}");
            let encoder_checks =
                checks.iter().filter(|c| c["name"].as_str().unwrap().starts_with("encoder_")).count();
            assert_eq!(encoder_checks, if extra.is_empty() { 0 } else { 4 }, "{stdout}");
            let joined = String::from_utf8_lossy(&out.stderr);
            assert!(
                joined.contains("joined the job") && joined.contains(&format!("world_size={world}")),
                "{joined}"
            );
        }
    }
}
