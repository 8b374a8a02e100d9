//! Checkpoints in an object store (a local directory, `file://`, `s3://` and the other schemes
//! of `object_store`), written with a commit protocol:
//!
//! 1. every part of checkpoint `step-NNNNNNNN/` is uploaded (large ones as multipart uploads);
//! 2. `step-NNNNNNNN/manifest.json` lists each part's size and sha256;
//! 3. the `latest` pointer is replaced last.
//!
//! A reader trusts a checkpoint only when its manifest verifies, so a crash or a lost connection
//! at any point leaves at worst an unreferenced, unverifiable directory, never a corrupt resume.
//! What a training checkpoint holds, part by part, is [`layout`]'s; the rules of a saved run
//! (resume, refuse, save, export) are the [`Checkpointer`]'s.

pub mod background;
pub mod checkpointer;
pub mod layout;

pub use checkpointer::{Checkpointer, Resume, Start};

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, PutPayload, WriteMultipart};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Parts above this size go up as multipart uploads.
const MULTIPART_THRESHOLD: usize = 32 << 20;
const MULTIPART_CHUNK: usize = 16 << 20;
/// Attempts of a whole object write (each also retried inside `object_store` on transient
/// errors), with exponential backoff from `RETRY_BACKOFF` between them.
const WRITE_ATTEMPTS: u32 = 4;
const RETRY_BACKOFF: std::time::Duration = std::time::Duration::from_millis(500);

/// One part of a checkpoint as listed in its manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartInfo {
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub step: u64,
    pub parts: BTreeMap<String, PartInfo>,
}

/// A verified checkpoint's parts.
pub struct Checkpoint {
    pub name: String,
    pub step: u64,
    pub parts: BTreeMap<String, Bytes>,
}

impl Checkpoint {
    pub fn part(&self, name: &str) -> Result<&Bytes> {
        self.parts.get(name).with_context(|| format!("checkpoint {} has no part {name}", self.name))
    }
}

/// A pointer file at the store's root naming a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pointer {
    /// The newest committed checkpoint, replaced last by every save.
    Latest,
    /// The best checkpoint by STS-B dev (kept by retention, exported at the end of a run).
    Best,
}

impl Pointer {
    fn file(self) -> &'static str {
        match self {
            Pointer::Latest => "latest",
            Pointer::Best => "best",
        }
    }
}

/// Where a finished run's best model goes, under its root.
pub const BEST_MODEL: &str = "best-model";

/// Whether `location` is a URL of an object store rather than a local path.
pub fn is_remote(location: &str) -> bool {
    location.contains("://")
}

/// Checkpoints under one root of an object store.
pub struct CheckpointStore {
    store: Arc<dyn ObjectStore>,
    root: StorePath,
    url: String,
    /// The folder of a local store (plain path or `file://`).
    local_root: Option<std::path::PathBuf>,
    runtime: tokio::runtime::Runtime,
}

/// The directory name of the checkpoint after `step` optimiser steps.
pub fn checkpoint_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Splits a checkpoint location `<root>/checkpoints/<name>` into the store root and the name;
/// `None` for anything else (a run's root, or a bare name).
pub fn split_location(location: &str) -> Option<(&str, &str)> {
    location.rsplit_once("/checkpoints/").map(|(root, name)| (root, name.trim_end_matches('/')))
}

/// The object store of a remote `url`: S3 (`s3://`) and Azure Blob Storage (`az://`, `azure://`,
/// `abfs://`, `abfss://`) read their credentials and endpoints from the environment as their SDKs
/// do (`AWS_*`; `AZURE_STORAGE_*`, `AZURE_STORAGE_USE_EMULATOR` for Azurite), then `options`
/// (object_store's config keys) over them, and retry transient errors; other schemes
/// (`file://`, `memory://`) as object_store parses them. `gs://` is refused with the way that
/// works: GCS's S3-compatible API (no emulator here speaks object_store's GCS protocol, so it is
/// not built untested).
fn remote_store(url: &url::Url, options: &[(&str, &str)]) -> Result<Box<dyn ObjectStore>> {
    let retry = object_store::RetryConfig {
        max_retries: 4,
        retry_timeout: std::time::Duration::from_secs(30),
        backoff: object_store::BackoffConfig {
            init_backoff: std::time::Duration::from_millis(200),
            max_backoff: std::time::Duration::from_secs(4),
            base: 2.0,
        },
    };
    macro_rules! configured {
        ($builder:expr, $kind:literal) => {{
            let mut builder = $builder;
            for (key, value) in options {
                let key = key.parse().with_context(|| format!("unknown {} option {key}", $kind))?;
                builder = builder.with_config(key, *value);
            }
            Box::new(builder.with_url(url.as_str()).with_retry(retry).build()?) as Box<dyn ObjectStore>
        }};
    }
    Ok(match url.scheme() {
        "s3" | "s3a" => configured!(object_store::aws::AmazonS3Builder::from_env(), "S3"),
        "gs" => bail!(
            "gs:// is not built into kdmcse; use Google Cloud Storage through its S3-compatible API: \
             s3://BUCKET/PREFIX with AWS_ENDPOINT_URL=https://storage.googleapis.com and an HMAC key as \
             AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
        ),
        "az" | "azure" | "abfs" | "abfss" => {
            configured!(object_store::azure::MicrosoftAzureBuilder::from_env(), "Azure")
        }
        _ => {
            let mut all: Vec<(String, String)> = std::env::vars().collect();
            all.extend(options.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            object_store::parse_url_opts(url, all)?.0
        }
    })
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

impl CheckpointStore {
    /// Opens `location` to write to: a URL with a scheme `object_store` knows (`s3://bucket/prefix`
    /// with the standard `AWS_*` variables, `az://container/prefix` with `AZURE_STORAGE_*`,
    /// `file:///abs/path`), or a plain path
    /// (created if missing).
    pub fn open(location: &str) -> Result<Self> {
        Self::open_with_options(location, &[])
    }

    /// Opens `location` to read from: like [`Self::open`], but a local folder must exist (reading
    /// creates nothing).
    pub fn open_existing(location: &str) -> Result<Self> {
        if !is_remote(location) && !std::path::Path::new(location).is_dir() {
            bail!("no such checkpoint folder: {location}");
        }
        Self::open(location)
    }

    /// [`Self::open`] with store options (`object_store` config keys such as
    /// `aws_endpoint_url`) that take precedence over the environment.
    pub fn open_with_options(location: &str, options: &[(&str, &str)]) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (store, root): (Arc<dyn ObjectStore>, StorePath) = if is_remote(location) {
            let url = url_parse(location)?;
            let store = remote_store(&url, options).with_context(|| format!("cannot open {location}"))?;
            (Arc::from(store), StorePath::from_url_path(url.path())?)
        } else {
            std::fs::create_dir_all(location).with_context(|| format!("cannot create {location}"))?;
            let store = object_store::local::LocalFileSystem::new_with_prefix(location)
                .with_context(|| format!("cannot open {location}"))?;
            (Arc::new(store), StorePath::default())
        };
        let local_root = match url::Url::parse(location) {
            Ok(url) if url.scheme() == "file" => url.to_file_path().ok(),
            Ok(_) => None,
            Err(_) => Some(std::path::PathBuf::from(location)),
        };
        Ok(Self { store, root, url: location.to_owned(), local_root, runtime })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, rel: &str) -> StorePath {
        rel.split('/').fold(self.root.clone(), |p, part| p.child(part))
    }

    /// Writes one object, retrying the whole write with backoff on failure.
    fn put(&self, rel: &str, data: Bytes) -> Result<()> {
        let mut attempt = 1;
        loop {
            match self.put_once(rel, data.clone()) {
                Ok(()) => return Ok(()),
                Err(err) if attempt < WRITE_ATTEMPTS => {
                    let wait = RETRY_BACKOFF * 2u32.pow(attempt - 1);
                    tracing::warn!(
                        "attempt {attempt}/{WRITE_ATTEMPTS} failed, retrying in {wait:?}: {err:#}"
                    );
                    let object = format!("{}/{rel}", self.url);
                    crate::events::emit(
                        "store_retry",
                        serde_json::json!({"object": object, "attempt": attempt}),
                    );
                    std::thread::sleep(wait);
                    attempt += 1;
                }
                Err(err) => return Err(err),
            }
        }
    }

    fn put_once(&self, rel: &str, data: Bytes) -> Result<()> {
        let result = self.put_object(rel, data);
        if result.is_err() {
            self.remove_staging_files(rel);
        }
        result
    }

    /// A failed write to a local folder can leave object_store's staging file (`NAME#N`) behind,
    /// as large as the part; nothing else will remove it.
    fn remove_staging_files(&self, rel: &str) {
        let Some(root) = &self.local_root else { return };
        let target = root.join(rel);
        let (Some(dir), Some(name)) = (target.parent(), target.file_name()) else { return };
        let staging = format!("{}#", name.to_string_lossy());
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(&staging) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    fn put_object(&self, rel: &str, data: Bytes) -> Result<()> {
        let path = self.path(rel);
        self.runtime
            .block_on(async {
                if data.len() > MULTIPART_THRESHOLD {
                    let upload = self.store.put_multipart(&path).await?;
                    let mut writer = WriteMultipart::new_with_chunk_size(upload, MULTIPART_CHUNK);
                    writer.put(data);
                    writer.finish().await?;
                } else {
                    self.store.put(&path, PutPayload::from_bytes(data)).await?;
                }
                Ok::<_, object_store::Error>(())
            })
            .with_context(|| format!("cannot write {}/{rel}", self.url))
    }

    fn get(&self, rel: &str) -> Result<Option<Bytes>> {
        let path = self.path(rel);
        let result = self.runtime.block_on(async {
            match self.store.get(&path).await {
                Ok(r) => r.bytes().await.map(Some),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        });
        result.with_context(|| format!("cannot read {}/{rel}", self.url))
    }

    /// Writes checkpoint `step` (parts, then manifest, then `latest`); returns its name.
    pub fn save(&self, step: u64, parts: &BTreeMap<String, Bytes>) -> Result<String> {
        let name = checkpoint_name(step);
        let bytes: usize = parts.values().map(Bytes::len).sum();
        tracing::info!(checkpoint = %name, bytes, to = %self.url, "writing checkpoint");
        let mut manifest = Manifest { step, parts: BTreeMap::new() };
        for (part, data) in parts {
            self.put(&format!("checkpoints/{name}/{part}"), data.clone())?;
            manifest
                .parts
                .insert(part.clone(), PartInfo { size: data.len() as u64, sha256: sha256_hex(data) });
        }
        let manifest = serde_json::to_vec_pretty(&manifest)?;
        self.put(&format!("checkpoints/{name}/manifest.json"), manifest.into())?;
        self.set_pointer(Pointer::Latest, &name)?;
        Ok(name)
    }

    /// Writes plain files (an export) under `prefix/`.
    pub fn put_files(&self, prefix: &str, files: &BTreeMap<String, Bytes>) -> Result<()> {
        for (rel, data) in files {
            self.put(&format!("{prefix}/{rel}"), data.clone())?;
        }
        Ok(())
    }

    /// Writes one plain file at `rel`.
    pub fn put_file(&self, rel: &str, data: Bytes) -> Result<()> {
        self.put(rel, data)
    }

    /// The plain file at `rel`, if there is one.
    pub fn get_file(&self, rel: &str) -> Result<Option<Bytes>> {
        self.get(rel)
    }

    /// Points `pointer` at checkpoint `name`.
    pub fn set_pointer(&self, pointer: Pointer, name: &str) -> Result<()> {
        self.put(pointer.file(), Bytes::from(name.to_owned()))
    }

    /// The checkpoint `pointer` names, if set.
    pub fn pointer(&self, pointer: Pointer) -> Result<Option<String>> {
        Ok(self.get(pointer.file())?.map(|b| String::from_utf8_lossy(&b).trim().to_owned()))
    }

    /// Checkpoint names present (verified or not), oldest first.
    pub fn list(&self) -> Result<Vec<String>> {
        let prefix = self.path("checkpoints");
        let listing = self
            .runtime
            .block_on(self.store.list_with_delimiter(Some(&prefix)))
            .with_context(|| format!("cannot list {}/checkpoints", self.url))?;
        let mut names: Vec<String> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_owned))
            .filter(|n| n.starts_with("step-"))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Loads checkpoint `name` and checks every part against its manifest.
    pub fn load(&self, name: &str) -> Result<Checkpoint> {
        let Some(manifest) = self.get(&format!("checkpoints/{name}/manifest.json"))? else {
            let names = self.list()?;
            if names.iter().any(|n| n == name) {
                bail!("checkpoint {}/checkpoints/{name} has no manifest (incomplete)", self.url);
            }
            bail!(
                "no such checkpoint {name} under {} (it has {})",
                self.url,
                if names.is_empty() { "none".to_owned() } else { names.join(", ") }
            );
        };
        let manifest: Manifest = serde_json::from_slice(&manifest)
            .with_context(|| format!("checkpoint {}/checkpoints/{name}: unreadable manifest", self.url))?;
        let mut parts = BTreeMap::new();
        for (part, info) in &manifest.parts {
            let rel = format!("checkpoints/{name}/{part}");
            let data = self.get(&rel)?.with_context(|| format!("{}/{rel} is missing", self.url))?;
            if data.len() as u64 != info.size || sha256_hex(&data) != info.sha256 {
                bail!(
                    "{}/{rel} does not match its manifest ({} bytes, sha256 {}; manifest: {} bytes, {})",
                    self.url,
                    data.len(),
                    sha256_hex(&data),
                    info.size,
                    info.sha256
                );
            }
            parts.insert(part.clone(), data);
        }
        Ok(Checkpoint { name: name.to_owned(), step: manifest.step, parts })
    }

    /// The newest checkpoint that verifies: `latest` first, then older ones, newest first,
    /// warning about each one passed over. `None` when there is none.
    pub fn load_newest(&self) -> Result<Option<Checkpoint>> {
        let mut candidates = self.list()?;
        candidates.reverse();
        if let Some(latest) = self.pointer(Pointer::Latest)? {
            candidates.retain(|n| *n != latest);
            candidates.insert(0, latest);
        }
        for name in candidates {
            match self.load(&name) {
                Ok(checkpoint) => return Ok(Some(checkpoint)),
                Err(err) => tracing::warn!("skipping checkpoint {name}: {err:#}"),
            }
        }
        Ok(None)
    }

    /// Deletes all but the newest `keep` checkpoints, never the targets of `latest` or `best`.
    pub fn retain(&self, keep: usize) -> Result<Vec<String>> {
        let names = self.list()?;
        let protected = [self.pointer(Pointer::Latest)?, self.pointer(Pointer::Best)?];
        let doomed: Vec<String> = names
            .iter()
            .rev()
            .skip(keep)
            .filter(|n| !protected.iter().flatten().any(|p| p == *n))
            .cloned()
            .collect();
        for name in &doomed {
            self.delete_all(&format!("checkpoints/{name}"))?;
        }
        Ok(doomed)
    }

    /// Deletes every checkpoint, the pointers and the exported best model: the folder's run.
    pub fn clear(&self) -> Result<()> {
        for pointer in [Pointer::Latest, Pointer::Best] {
            let path = self.path(pointer.file());
            match self.runtime.block_on(self.store.delete(&path)) {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot delete {}/{}", self.url, pointer.file()))
                }
            }
        }
        for prefix in ["checkpoints", BEST_MODEL] {
            self.delete_all(prefix)?;
        }
        Ok(())
    }

    /// Deletes the objects under `rel` (manifests first: a half-deleted checkpoint must not
    /// verify), and in a local folder the directories they leave empty.
    fn delete_all(&self, rel: &str) -> Result<()> {
        let prefix = self.path(rel);
        self.runtime
            .block_on(async {
                let objects: Vec<_> = self.store.list(Some(&prefix)).try_collect().await?;
                let (manifests, rest): (Vec<_>, Vec<_>) =
                    objects.into_iter().partition(|o| o.location.filename() == Some("manifest.json"));
                for object in manifests.into_iter().chain(rest) {
                    self.store.delete(&object.location).await?;
                }
                Ok::<_, object_store::Error>(())
            })
            .with_context(|| format!("cannot delete {}/{rel}", self.url))?;
        if let Some(root) = &self.local_root {
            remove_empty_dirs(&root.join(rel));
        }
        Ok(())
    }
}

/// Removes `dir` and the directories below it that hold no file (a local store leaves them).
fn remove_empty_dirs(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_empty_dirs(&entry.path());
        }
    }
    let _ = std::fs::remove_dir(dir); // fails, as it should, where files remain
}

fn url_parse(location: &str) -> Result<url::Url> {
    url::Url::parse(location).with_context(|| format!("not a valid URL: {location}"))
}
