//! Checkpoints in a real S3-compatible server (s3s-fs, a separate process on loopback, installed
//! by scripts/install-test-deps.sh): save, list, resume, retention and export over HTTP;
//! connections dropped in the middle of an upload; an outage that outlasts the retries; corrupted
//! objects; stop-and-resume with two ranks through S3.

mod common;

use common::process::{assert_ok, event, kdmcse_command as kdmcse, launcher_bin};
use common::s3::{open_store, s3_env, S3Server, BUCKET};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::Tensor;
use kdmcse::checkpoint::{CheckpointStore, Pointer};

/// A TCP forwarder in front of the server whose connections the test can cut, and whose uploads
/// it can slow to `rate` bytes a second per connection.
struct Proxy {
    port: u16,
    down: Arc<AtomicBool>,
    live: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(upstream: u16) -> Self {
        Self::throttled(upstream, None)
    }

    fn throttled(upstream: u16, rate: Option<usize>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let down = Arc::new(AtomicBool::new(false));
        let live: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (d, l) = (down.clone(), live.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if d.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else { continue };
                l.lock().unwrap().extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                for (mut from, mut to, rate) in
                    [(client.try_clone().unwrap(), server.try_clone().unwrap(), rate), (server, client, None)]
                {
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 1 << 16];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            if let Some(rate) = rate {
                                std::thread::sleep(std::time::Duration::from_secs_f64(
                                    n as f64 / rate as f64,
                                ));
                            }
                        }
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Self { port, down, live }
    }

    /// Drops every open connection and refuses new ones until `restore`.
    fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        for s in self.live.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

/// Runs a local (filesystem) reference of `steps` steps and returns its final weights.
fn local_reference(steps: usize) -> Vec<(String, Tensor)> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let cfg = common::quick_config(dir.path(), out.to_str().unwrap(), 8, steps);
    assert_ok(&kdmcse().args(["train", "--config", cfg.to_str().unwrap()]).output().unwrap());
    let store = CheckpointStore::open(out.to_str().unwrap()).unwrap();
    let latest = store.pointer(Pointer::Latest).unwrap().unwrap();
    common::checkpoint_weights(&store, &latest)
}

#[test]
fn save_list_resume_retention_and_export_over_s3() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("s3://{BUCKET}/runs/basic");
    let cfg = common::quick_config(dir.path(), &url, 8, 4);
    assert_ok(
        &s3_env(&mut kdmcse(), server.port)
            .args(["train", "--config", cfg.to_str().unwrap(), "--set", "output.keep=1"])
            .output()
            .unwrap(),
    );
    let store = open_store(&url, server.port);
    // keep = 1: only the newest checkpoint (which `latest` points to) remains.
    assert_eq!(store.list().unwrap(), ["step-00000004"]);
    assert_eq!(store.pointer(Pointer::Latest).unwrap().as_deref(), Some("step-00000004"));
    let four = common::checkpoint_weights(&store, "step-00000004");
    // Resume from S3 and train 2 more steps.
    let out = s3_env(&mut kdmcse(), server.port)
        .args([
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--set",
            "train.max_steps=6",
            "--set",
            "output.keep=1",
            "--allow-config-change",
        ])
        .output()
        .unwrap();
    assert_ok(&out);
    let resumed = common::process::events(&out.stdout, "resumed");
    assert_eq!(resumed.len(), 1, "{resumed:?}");
    assert_eq!((&resumed[0]["checkpoint"], &resumed[0]["step"]), (&"step-00000004".into(), &4.into()));
    let steps: Vec<u64> = common::step_numbers(&dir.path().join("metrics.jsonl"));
    assert_eq!(steps, [1, 2, 3, 4, 5, 6], "the resumed run took steps 5 and 6 only");
    assert_eq!(store.list().unwrap(), ["step-00000006"]);
    assert_ne!(
        common::max_abs_diff(&four[0].1, &common::checkpoint_weights(&store, "step-00000006")[0].1),
        0.0
    );
    // Export straight from the bucket.
    let export = dir.path().join("export");
    let out = s3_env(&mut kdmcse(), server.port)
        .args(["export", "--checkpoint", &url, "--out", export.to_str().unwrap()])
        .output()
        .unwrap();
    assert_ok(&out);
    assert!(export.join("model.safetensors").is_file() && export.join("modules.json").is_file());
}

/// Without `output.metrics`, a run into a bucket keeps `metrics.jsonl` there (synced at every
/// checkpoint and at the end), and a resumed run continues it.
#[test]
fn metrics_live_in_the_bucket_and_a_resume_continues_them() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("s3://{BUCKET}/runs/metrics");
    let cfg = common::quick_config(dir.path(), &url, 8, 2);
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text: String =
        text.lines().filter(|l| !l.starts_with("metrics =")).map(|l| format!("{l}\n")).collect();
    std::fs::write(&cfg, text).unwrap();
    let run = |steps: &str| {
        s3_env(&mut kdmcse(), server.port)
            .args(["train", "--config", cfg.to_str().unwrap(), "--set", steps, "--allow-config-change"])
            .output()
            .unwrap()
    };
    let steps_in_bucket = || -> Vec<u64> {
        let bytes = open_store(&url, server.port).get_file("metrics.jsonl").unwrap().expect("metrics.jsonl");
        let file = dir.path().join("from-bucket.jsonl");
        std::fs::write(&file, bytes).unwrap();
        common::step_numbers(&file)
    };
    assert_ok(&run("train.max_steps=2"));
    assert_eq!(steps_in_bucket(), [1, 2]);
    assert_ok(&run("train.max_steps=4"));
    assert_eq!(steps_in_bucket(), [1, 2, 3, 4], "the resumed run appends to the bucket's history");
}

#[test]
fn dropped_connections_mid_upload_are_retried_and_an_outage_never_corrupts_latest() {
    let reference = local_reference(6);
    let server = S3Server::start();
    let proxy = Proxy::start(server.port);
    let dir = tempfile::tempdir().unwrap();
    let url = format!("s3://{BUCKET}/runs/flaky");
    let cfg = common::quick_config(dir.path(), &url, 8, 6);

    // 1. Connections dropped for a moment while step 2's checkpoint uploads: retried, run goes on.
    // 2. From step 4's (background) upload the server stays unreachable: the run fails at a later
    //    step with the upload's error, and `latest` still names step 2.
    let mut child = s3_env(&mut kdmcse(), proxy.port)
        .args(["train", "--config", cfg.to_str().unwrap()])
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let reader = {
        let log = log.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                log.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let mut events =
        BufReader::new(child.stdout.take().unwrap()).lines().map_while(Result::ok).filter_map(|l| event(&l));
    // The events in order: each wait consumes the stream up to the event it waits for, so the
    // retry must come after step 2's upload began and before it was committed.
    let mut wait_for = |what: &str, pred: &dyn Fn(&serde_json::Value) -> bool| {
        let found = events.by_ref().find(|e| pred(e));
        found.unwrap_or_else(|| panic!("never saw {what}:\n{}", log.lock().unwrap()))
    };
    let step =
        |name: &'static str, step: u64| move |e: &serde_json::Value| e["event"] == name && e["step"] == step;
    wait_for("step 2's upload", &step("checkpoint_writing", 2));
    proxy.cut();
    let retry = wait_for("a retry inside step 2's upload", &|e| {
        e["event"] == "store_retry" || (e["event"] == "checkpoint_saved" && e["step"] == 2)
    });
    assert_eq!(retry["event"], "store_retry", "step 2 was committed without a retry");
    assert!(retry["object"].as_str().unwrap().contains("step-00000002"), "{retry}");
    proxy.restore();
    wait_for("step 2's commit", &step("checkpoint_saved", 2));
    wait_for("step 4's upload", &step("checkpoint_writing", 4));
    proxy.cut();
    let cut = std::time::Instant::now();
    let status = child.wait().unwrap();
    reader.join().unwrap();
    let log = log.lock().unwrap().clone();
    assert!(!status.success(), "the run must fail when storage stays down:\n{log}");
    // Within the retry budget (4 attempts of object_store's retries): under a minute here.
    assert!(cut.elapsed() < std::time::Duration::from_secs(90), "failed after {:?}", cut.elapsed());
    assert!(
        log.contains("background checkpoint upload") && log.contains("cannot write"),
        "the failure says the upload failed and what could not be written:\n{log}"
    );

    let store = open_store(&url, server.port);
    assert_eq!(store.pointer(Pointer::Latest).unwrap().as_deref(), Some("step-00000002"));
    assert_eq!(store.load_newest().unwrap().unwrap().name, "step-00000002");

    // Storage is back: resume picks the last good checkpoint and ends where a clean run does.
    proxy.restore();
    assert_ok(
        &s3_env(&mut kdmcse(), proxy.port)
            .args(["train", "--config", cfg.to_str().unwrap()])
            .output()
            .unwrap(),
    );
    assert_eq!(store.pointer(Pointer::Latest).unwrap().as_deref(), Some("step-00000006"));
    assert_eq!(
        common::max_weight_diff(&common::checkpoint_weights(&store, "step-00000006"), &reference),
        0.0
    );
}

/// kill -9 while a background upload is in flight (slowed by a throttling proxy, with training
/// going on meanwhile): `latest` names the last committed checkpoint, and the resume from it ends
/// bitwise where an uninterrupted run does.
#[test]
fn a_kill_during_a_background_upload_resumes_from_the_last_committed_checkpoint() {
    let reference = local_reference(6);
    let server = S3Server::start();
    // A MiniLM checkpoint (weights and Adam moments, ~270 MB) takes ~10 s at 24 MB/s.
    let proxy = Proxy::throttled(server.port, Some(24 << 20));
    let dir = tempfile::tempdir().unwrap();
    let url = format!("s3://{BUCKET}/runs/killed");
    let cfg = common::quick_config(dir.path(), &url, 8, 6);
    let mut child = s3_env(&mut kdmcse(), proxy.port)
        .args(["train", "--config", cfg.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for e in BufReader::new(stdout).lines().map_while(Result::ok).filter_map(|l| event(&l)) {
            let _ = tx.send(e);
        }
    });
    let mut seen = Vec::new();
    let mut wait_for = |name: &str, step: u64| loop {
        let e = rx.recv_timeout(std::time::Duration::from_secs(120)).expect("the run went quiet");
        let found = e["event"] == name && e["step"] == step;
        seen.push(e);
        if found {
            break;
        }
    };
    wait_for("checkpoint_saved", 2);
    wait_for("checkpoint_writing", 4);
    // Training goes on while step 4 uploads: wait for step 5 in the metrics, then kill.
    let metrics = dir.path().join("metrics.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !common::step_numbers(&metrics).contains(&5) {
        assert!(std::time::Instant::now() < deadline, "step 5 never came");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    common::process::kill(child.id() as i32, 9);
    child.wait().unwrap();
    seen.extend(rx.try_iter());
    assert!(
        !seen.iter().any(|e| e["event"] == "checkpoint_saved" && e["step"] == 4),
        "step 4 committed before the kill (the throttle is too weak): {seen:?}"
    );
    let store = open_store(&url, server.port);
    assert_eq!(store.pointer(Pointer::Latest).unwrap().as_deref(), Some("step-00000002"));

    let out = s3_env(&mut kdmcse(), server.port)
        .args(["train", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_ok(&out);
    let resumed = common::process::events(&out.stdout, "resumed");
    assert_eq!(resumed[0]["checkpoint"], "step-00000002", "{resumed:?}");
    assert_eq!(
        common::max_weight_diff(&common::checkpoint_weights(&store, "step-00000006"), &reference),
        0.0
    );
}

#[test]
fn corrupted_weights_fail_the_manifest_check_and_resume_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let cfg = common::quick_config(dir.path(), out.to_str().unwrap(), 8, 4);
    assert_ok(
        &kdmcse()
            .args(["train", "--config", cfg.to_str().unwrap(), "--set", "output.keep=3"])
            .output()
            .unwrap(),
    );
    let weights = out.join("checkpoints/step-00000004/model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xFF;
    std::fs::write(&weights, bytes).unwrap();
    let store = CheckpointStore::open(out.to_str().unwrap()).unwrap();
    let err = store.load("step-00000004").err().expect("corruption detected").to_string();
    assert!(err.contains("model.safetensors") && err.contains("does not match its manifest"), "{err}");
    assert_eq!(store.load_newest().unwrap().unwrap().name, "step-00000002");
}

#[test]
fn two_ranks_stop_and_resume_through_s3_equal_an_uninterrupted_run() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let launcher = launcher_bin();
    let run = |url: &str, extra: &[&str]| {
        let cfg = common::quick_config(dir.path(), url, 8, 6);
        let mut cmd = Command::new(&launcher);
        s3_env(&mut cmd, server.port)
            .env("KDMCSE_BIN", env!("CARGO_BIN_EXE_kdmcse"))
            .args(["--nproc", "2", "--standalone", "--", "--config", cfg.to_str().unwrap()])
            .args(extra);
        let out = cmd.output().unwrap();
        assert_ok(&out);
        out
    };
    let straight = format!("s3://{BUCKET}/runs/straight");
    let resumed = format!("s3://{BUCKET}/runs/resumed");
    run(&straight, &[]);
    run(&resumed, &["--stop-after", "3"]);
    let store = open_store(&resumed, server.port);
    assert_eq!(store.pointer(Pointer::Latest).unwrap().as_deref(), Some("step-00000003"));
    let out = run(&resumed, &[]);
    // Both ranks resumed at step 3 (a run that silently started over would end in the same bits).
    let events = common::process::events(&out.stdout, "resumed");
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(events.iter().all(|e| e["checkpoint"] == "step-00000003"), "{events:?}");
    let a = common::checkpoint_weights(&open_store(&straight, server.port), "step-00000006");
    assert_eq!(common::max_weight_diff(&a, &common::checkpoint_weights(&store, "step-00000006")), 0.0);
}

/// A store that is down while the workers start up is a runtime failure (exit 1), which a
/// restart may cure, not an input error (exit 2, never restarted): under `--max-restarts 1` the
/// launcher restarts the group once the first fails, and it trains to the end with the store back.
#[test]
fn a_store_down_at_start_up_is_restarted_and_the_job_finishes() {
    let server = S3Server::start();
    let proxy = Proxy::start(server.port);
    proxy.cut();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("s3://{BUCKET}/runs/store-down-at-start");
    let cfg = common::quick_config(dir.path(), &url, 8, 2);
    // Metrics in the bucket: the trainer reads their history while it starts up.
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text: Vec<&str> = text.lines().filter(|l| !l.starts_with("metrics = ")).collect();
    std::fs::write(&cfg, text.join("\n")).unwrap();
    let mut cmd = Command::new(launcher_bin());
    s3_env(&mut cmd, proxy.port)
        .env("KDMCSE_BIN", env!("CARGO_BIN_EXE_kdmcse"))
        .args([
            "--nproc",
            "1",
            "--standalone",
            "--max-restarts",
            "1",
            "--",
            "--config",
            cfg.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut log = String::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines().map_while(Result::ok) {
        if line.contains("restarting in round 1") {
            proxy.restore();
        }
        log.push_str(&line);
        log.push('\n');
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "the restarted job finishes:\n{log}");
    assert!(log.contains("rank 0 failed with exit code 1") && log.contains("metrics.jsonl"), "{log}");
    let store = open_store(&url, server.port);
    assert_eq!(store.pointer(Pointer::Latest).unwrap().as_deref(), Some("step-00000002"));
}
