//! Running the project's binaries as users do: `kdmcse` and `kdmcse-launch` as child processes,
//! their exit status, and the JSON events `kdmcse` writes on standard output.

use std::path::PathBuf;
use std::process::{Command, Output};

pub fn kdmcse_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kdmcse"))
}

/// The launcher is the workspace's other binary, built beside `kdmcse`.
pub fn launcher_bin() -> PathBuf {
    let path = kdmcse_bin().with_file_name("kdmcse-launch");
    assert!(
        path.is_file(),
        "{} not built: cargo build --workspace --release (scripts/test.sh does)",
        path.display()
    );
    path
}

/// A `kdmcse` command without backtraces in its errors.
pub fn kdmcse_command() -> Command {
    let mut cmd = Command::new(kdmcse_bin());
    cmd.env("RUST_BACKTRACE", "0");
    cmd
}

/// Runs `kdmcse ARGS` to completion.
pub fn kdmcse(args: &[&str]) -> Output {
    kdmcse_command().args(args).output().expect("run kdmcse")
}

/// Runs `kdmcse train --config CONFIG EXTRA...` to completion.
pub fn train(config: &std::path::Path, extra: &[&str]) -> Output {
    let mut args = vec!["train", "--config", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    kdmcse(&args)
}

/// A `kdmcse-launch` command that starts this build's `kdmcse`.
pub fn launcher(args: &[&str]) -> Command {
    let mut cmd = Command::new(launcher_bin());
    cmd.args(args).env("KDMCSE_BIN", kdmcse_bin()).env("RUST_BACKTRACE", "0").env("KDMCSE_TIMEOUT", "60");
    cmd
}

pub fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "failed ({:?}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The process failed, and its error names every one of `needles` (and is no panic).
pub fn assert_fails_with(out: &Output, needles: &[&str]) {
    assert!(!out.status.success(), "expected failure");
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in needles {
        assert!(err.contains(needle), "error should mention {needle:?}:\n{err}");
    }
    assert!(!err.contains("panicked"), "a panic is not an error message:\n{err}");
}

/// A port that was free a moment ago (for servers that cannot report the port they bound).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Sends `signal` to process `pid` (negative: a process group) that the test started.
pub fn kill(pid: i32, signal: i32) {
    extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    // SAFETY: kill(2) on a process (group) this test started.
    assert_eq!(unsafe { kill(pid, signal) }, 0, "kill({pid}, {signal})");
}

/// The event on one line of `kdmcse`'s standard output (under the launcher, after its
/// `[rank N] ` prefix), if the line is one.
pub fn event(line: &str) -> Option<serde_json::Value> {
    let json = &line[line.find("{\"event\"")?..];
    serde_json::from_str(json).ok()
}

/// Every event of a run's standard output named `name`.
pub fn events(stdout: &[u8], name: &str) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stdout).lines().filter_map(event).filter(|e| e["event"] == name).collect()
}
