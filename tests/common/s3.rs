//! A real S3-compatible server for tests: s3s-fs (installed by scripts/install-test-deps.sh)
//! as a child process on loopback, and the settings that point kdmcse at it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use kdmcse::checkpoint::CheckpointStore;

pub const BUCKET: &str = "kdmcse-test";

/// An s3s-fs process serving a temporary folder; killed on drop.
pub struct S3Server {
    child: Child,
    pub port: u16,
    _root: tempfile::TempDir,
}

impl S3Server {
    pub fn start() -> Self {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join(BUCKET)).unwrap(); // a bucket is a folder
                                                                    // Port 0: the server binds a free port and logs it, so parallel tests never collide.
        let mut child = Command::new("s3s-fs")
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--access-key",
                "test",
                "--secret-key",
                "testsecret",
            ])
            .arg(root.path())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("s3s-fs not found: run scripts/install-test-deps.sh");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        const RUNNING_AT: &str = "server is running at http://127.0.0.1:";
        let port = loop {
            let line = lines.next().expect("s3s-fs exited before it served").unwrap();
            if let Some(at) = line.find(RUNNING_AT) {
                break line[at + RUNNING_AT.len()..].trim().parse::<u16>().expect("a port");
            }
        };
        // Keep draining its log so that it never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Self { child, port, _root: root }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Points a kdmcse process at the server on `port` (directly or through a proxy).
pub fn s3_env(cmd: &mut Command, port: u16) -> &mut Command {
    cmd.env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"))
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "testsecret")
        .env("AWS_REGION", "us-east-1")
        .env("RUST_BACKTRACE", "0")
        .env("KDMCSE_TIMEOUT", "120")
}

/// The test's own view of the bucket (the same settings as the child processes' environment).
pub fn open_store(url: &str, port: u16) -> CheckpointStore {
    let endpoint = format!("http://127.0.0.1:{port}");
    let options = [
        ("aws_endpoint_url", endpoint.as_str()),
        ("aws_allow_http", "true"),
        ("aws_access_key_id", "test"),
        ("aws_secret_access_key", "testsecret"),
        ("aws_region", "us-east-1"),
    ];
    CheckpointStore::open_with_options(url, &options).unwrap()
}
