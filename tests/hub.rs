//! Hugging Face Hub ids as model locations: `kdmcse eval --model org/name` and `model.path =
//! "org/name"` fetch the model through `HF_ENDPOINT` (a Hub-shaped HTTP server on loopback that
//! serves MiniLM's files, its sentence-transformers pooling too) into `HF_HOME`'s cache and score and train exactly as the local folder
//! does; with `HF_HUB_OFFLINE=1` they resolve from that cache alone, and a model that is in
//! neither is a clear error.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::process::{assert_ok, kdmcse_command};

const REPO: &str = "kdmcse-test/tiny-minilm";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Serves `GET /{REPO}/resolve/main/{file}` (whole or a `Range`) with the headers the Hub sends:
/// the commit, an etag, the content range; 404 for anything else. Counts the files it served.
struct HubServer {
    port: u16,
    served: Arc<AtomicUsize>,
}

impl HubServer {
    fn start(files: HashMap<String, Vec<u8>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let served = Arc::new(AtomicUsize::new(0));
        let (files, count) = (Arc::new(files), Arc::clone(&served));
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let (files, count) = (Arc::clone(&files), Arc::clone(&count));
                std::thread::spawn(move || respond(stream, &files, &count));
            }
        });
        Self { port, served }
    }
}

fn respond(mut stream: TcpStream, files: &HashMap<String, Vec<u8>>, served: &AtomicUsize) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request = String::new();
    reader.read_line(&mut request).unwrap();
    let mut range = None;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("range") {
                range = value.trim().strip_prefix("bytes=").map(String::from);
            }
        }
    }
    let path = request.split_whitespace().nth(1).unwrap_or("");
    let file = path.strip_prefix(&format!("/{REPO}/resolve/main/")).and_then(|f| files.get(f));
    let Some(data) = file else {
        let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    };
    let (start, end) = match range.as_deref().and_then(|r| r.split_once('-')) {
        Some((a, b)) => (a.parse().unwrap_or(0), b.parse().unwrap_or(data.len() - 1).min(data.len() - 1)),
        None => (0, data.len() - 1),
    };
    if end + 1 == data.len() {
        served.fetch_add(1, Ordering::SeqCst);
    }
    let head = format!(
        "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{end}/{}\r\n\
         x-repo-commit: {COMMIT}\r\nETag: \"{:x}-{}\"\r\nConnection: close\r\n\r\n",
        end + 1 - start,
        data.len(),
        data.len(),
        path.len()
    );
    let _ = stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(&data[start..=end]));
}

fn stsb_score(out: &Output) -> f64 {
    assert_ok(out);
    let last = String::from_utf8_lossy(&out.stdout).lines().last().unwrap().to_owned();
    serde_json::from_str::<serde_json::Value>(&last).unwrap()["STSBenchmark"].as_f64().unwrap()
}

fn eval(model: &str, hf_home: &Path, env: &[(&str, String)]) -> Output {
    let data = common::shared_dir().join("data");
    kdmcse_command()
        .args([
            "eval",
            "--model",
            model,
            "--data",
            data.to_str().unwrap(),
            "--tasks",
            "STSBenchmark",
            "--json",
        ])
        .env("HF_HOME", hf_home)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap()
}

#[test]
fn hub_ids_resolve_through_the_endpoint_and_offline_through_the_cache() {
    let minilm = common::minilm_dir();
    let files: HashMap<String, Vec<u8>> =
        ["config.json", "tokenizer.json", "model.safetensors", "1_Pooling/config.json"]
            .iter()
            .map(|f| (f.to_string(), std::fs::read(minilm.join(f)).unwrap()))
            .collect();
    let server = HubServer::start(files);
    let endpoint = format!("http://127.0.0.1:{}", server.port);
    let (home, empty) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let local = stsb_score(&eval(minilm.to_str().unwrap(), empty.path(), &[]));

    // Online: fetched through HF_ENDPOINT into HF_HOME, scored as the local folder.
    let online = eval(REPO, home.path(), &[("HF_ENDPOINT", endpoint.clone())]);
    assert_eq!(stsb_score(&online), local);
    assert_eq!(server.served.load(Ordering::SeqCst), 4, "config, tokenizer, weights, pooling");
    let snapshot = home.path().join(format!("hub/models--kdmcse-test--tiny-minilm/snapshots/{COMMIT}"));
    assert!(snapshot.join("model.safetensors").is_file(), "the standard cache layout");

    // Training from the Hub id: the same losses as from the folder, and the card names the id.
    let losses = |model: &str, dir: &Path| {
        let config = common::quick_config(dir, dir.join("out").to_str().unwrap(), 8, 2);
        let set = format!("model.path={model:?}");
        let out = kdmcse_command()
            .args(["train", "--config", config.to_str().unwrap(), "--set", &set])
            .env("HF_HOME", home.path())
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        assert_ok(&out);
        common::step_losses(dir)
    };
    let (from_folder, from_hub) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    assert_eq!(losses(REPO, from_hub.path()), losses(minilm.to_str().unwrap(), from_folder.path()));
    let card = std::fs::read_to_string(from_hub.path().join("out/best-model/README.md")).unwrap();
    assert!(card.contains(&format!("base_model: \"{REPO}\"")), "{card}");

    // Offline: the cache alone (no request reaches the server), and a clear error without it.
    let before = server.served.load(Ordering::SeqCst);
    let offline =
        eval(REPO, home.path(), &[("HF_HUB_OFFLINE", "1".into()), ("HF_ENDPOINT", endpoint.clone())]);
    assert_eq!(stsb_score(&offline), local);
    assert_eq!(server.served.load(Ordering::SeqCst), before);
    let missing = eval(REPO, empty.path(), &[("HF_HUB_OFFLINE", "1".into())]);
    common::process::assert_fails_with(
        &missing,
        &["--model = kdmcse-test/tiny-minilm", "config.json is not in the cache", "HF_HUB_OFFLINE=1"],
    );
    // Online, a repository the Hub does not have names the file it could not get.
    let absent = eval("kdmcse-test/absent", empty.path(), &[("HF_ENDPOINT", endpoint)]);
    common::process::assert_fails_with(&absent, &["kdmcse-test/absent@main", "config.json", "404"]);
}
