//! Checkpoints in Azure Blob Storage (`az://`) against Azurite, Microsoft's emulator (installed
//! from npm by scripts/install-test-deps.sh), started by the test on loopback: a run stopped after
//! 2 of 4 steps and resumed from the container ends bitwise where a local run does; `gs://` is
//! refused with the S3-compatible way to reach Google Cloud Storage.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use common::process::{assert_fails_with, assert_ok, events, kdmcse_command};
use kdmcse::checkpoint::{CheckpointStore, Pointer};

/// Azurite's well-known development account.
const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
const CONTAINER: &str = "kdmcse";

/// An Azurite blob service with the container `kdmcse`; killed on drop.
struct Azurite {
    child: Child,
    url: String,
    _root: tempfile::TempDir,
}

impl Azurite {
    fn start() -> Self {
        let root = tempfile::tempdir().unwrap();
        let port = common::process::free_port();
        let mut child = Command::new("azurite-blob")
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string(), "--silent"])
            .args(["--skipApiVersionCheck", "--disableTelemetry", "--location"])
            .arg(root.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("azurite-blob not found: run scripts/install-test-deps.sh");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        while !lines
            .next()
            .expect("Azurite exited before it served")
            .unwrap()
            .contains("successfully listens")
        {}
        std::thread::spawn(move || lines.for_each(drop));
        let url = format!("http://127.0.0.1:{port}");
        // object_store creates no containers; Azure's own client does.
        let create = format!(
            "from azure.storage.blob import BlobServiceClient as C\n\
             C.from_connection_string('DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;\
             AccountKey={ACCOUNT_KEY};BlobEndpoint={url}/devstoreaccount1;').create_container('{CONTAINER}')"
        );
        assert_ok(&Command::new("python3").args(["-c", &create]).output().unwrap());
        Self { child, url, _root: root }
    }

    fn env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env("AZURE_STORAGE_USE_EMULATOR", "true").env("AZURITE_BLOB_STORAGE_URL", &self.url)
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn checkpoints_round_trip_through_azure_blob_storage_and_resume_exactly() {
    let azurite = Azurite::start();
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local");
    let cfg = common::quick_config(dir.path(), local.to_str().unwrap(), 8, 4);
    assert_ok(&common::process::train(&cfg, &[]));

    let url = format!("az://{CONTAINER}/runs/resumed");
    let run = |extra: &[&str]| {
        let mut cmd = kdmcse_command();
        azurite.env(&mut cmd).args(["train", "--config", cfg.to_str().unwrap(), "--set"]);
        cmd.arg(format!("output.dir={url:?}")).args(extra).output().unwrap()
    };
    assert_ok(&run(&["--stop-after", "2"]));
    let out = run(&[]);
    assert_ok(&out);
    let resumed = events(&out.stdout, "resumed");
    assert_eq!(resumed[0]["checkpoint"], "step-00000002", "{resumed:?}");

    // The test's own view of the container, as the child processes saw it. SAFETY: this binary's
    // only test; no other thread reads the environment while it is set.
    unsafe {
        std::env::set_var("AZURE_STORAGE_USE_EMULATOR", "true");
        std::env::set_var("AZURITE_BLOB_STORAGE_URL", &azurite.url);
    }
    let store = CheckpointStore::open(&url).unwrap();
    assert_eq!(store.pointer(Pointer::Latest).unwrap().as_deref(), Some("step-00000004"));
    let ours = common::checkpoint_weights(&store, "step-00000004");
    assert_eq!(common::max_weight_diff(&ours, &common::latest_weights(&local)), 0.0);

    let gs = kdmcse_command()
        .args(["train", "--config", cfg.to_str().unwrap(), "--set", "output.dir=\"gs://bucket/run\""])
        .output()
        .unwrap();
    assert_fails_with(&gs, &["gs:// is not built", "AWS_ENDPOINT_URL=https://storage.googleapis.com"]);
}
