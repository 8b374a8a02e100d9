//! Model folders from the Hugging Face Hub. Wherever kdmcse takes a model folder (`model.path`,
//! `--model`, `--clip`) it also takes a Hub id, `org/name` or `org/name@revision`: the files a
//! model needs are fetched (through the `hf-hub` crate) into the standard cache, whose snapshot
//! folder is then read like any local folder. A path that exists locally is always the local
//! folder. Honoured: `HF_HOME` / `HF_HUB_CACHE` (where the cache is), `HF_ENDPOINT` (a mirror or
//! a private hub), `HF_TOKEN` (gated or private models) and `HF_HUB_OFFLINE=1` (the cache alone,
//! no network).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use hf_hub::{Cache, Repo, RepoType};

/// Files a model folder may need; each group is satisfied by its first file the repository has.
/// Groups marked required fail the resolution when none of their files exists.
const MODEL_FILES: &[(&[&str], bool)] = &[
    (&["config.json"], true),
    (&["tokenizer.json"], true),
    (&["model.safetensors", "pytorch_model.bin"], true),
    // sentence-transformers' pooling (kdmcse eval and encode follow it) and CLIP's image
    // preprocessing, where a repository has them.
    (&["1_Pooling/config.json"], false),
    (&["preprocessor_config.json"], false),
];

/// A Hub id with its revision (`main` unless `@revision` is given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    pub repo: String,
    pub revision: String,
}

impl HubId {
    /// `org/name` or `org/name@revision` (or a bare `name`): at most one `/`, no path-like
    /// start, only the characters Hub ids use.
    pub fn parse(text: &str) -> Option<Self> {
        let (repo, revision) = match text.split_once('@') {
            Some((repo, revision)) if !revision.is_empty() => (repo, revision),
            Some(_) => return None,
            None => (text, "main"),
        };
        let valid_part = |p: &str| {
            !p.is_empty()
                && !p.starts_with(['.', '-'])
                && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        let parts: Vec<&str> = repo.split('/').collect();
        (parts.len() <= 2 && parts.iter().all(|p| valid_part(p)))
            .then(|| Self { repo: repo.to_owned(), revision: revision.to_owned() })
    }
}

impl std::fmt::Display for HubId {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{}@{}", self.repo, self.revision)
    }
}

/// The Hub id `location` names, when it is no local path.
pub fn hub_id(location: &Path) -> Option<HubId> {
    if location.exists() {
        return None;
    }
    location.to_str().and_then(HubId::parse)
}

/// The local folder of the model at `location`: `location` itself when it exists, else the Hub
/// id's snapshot in the cache (fetched unless `HF_HUB_OFFLINE=1`). `what` names the setting in
/// errors (`model.path`, `--model`).
pub fn model_dir(location: &Path, what: &str) -> Result<PathBuf> {
    let Some(id) = hub_id(location) else {
        return Ok(location.to_owned());
    };
    resolve(&id).with_context(|| {
        format!(
            "{what} = {}: no such folder here, and the Hugging Face Hub model {id} could not be had",
            location.display()
        )
    })
}

fn cache() -> Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(dir) => Cache::new(dir.into()),
        None => Cache::from_env(),
    }
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"))
}

/// Every file of [`MODEL_FILES`] the repository has, in one snapshot folder of the cache.
fn resolve(id: &HubId) -> Result<PathBuf> {
    let repo = Repo::with_revision(id.repo.clone(), RepoType::Model, id.revision.clone());
    let cached = cache().repo(repo.clone());
    let api = if offline() {
        None
    } else {
        let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(cache()).with_progress(false);
        if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
            builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_owned());
        }
        if let Ok(token) = std::env::var("HF_TOKEN") {
            builder = builder.with_token(Some(token));
        }
        Some(builder.build().context("cannot set up the Hub client")?.repo(repo))
    };
    let mut folder: Option<PathBuf> = None;
    for (alternatives, required) in MODEL_FILES {
        let mut found = None;
        let mut errors = Vec::new();
        for file in *alternatives {
            let got = match &api {
                None => cached.get(file).ok_or_else(|| anyhow::anyhow!("{file} is not in the cache")),
                Some(api) => api.get(file).map_err(anyhow::Error::from),
            };
            match got {
                Ok(path) => {
                    found = Some(path);
                    break;
                }
                Err(err) => errors.push(format!("{file}: {err}")),
            }
        }
        match found {
            Some(path) => {
                let depth = Path::new(alternatives[0]).components().count();
                let dir = path.ancestors().nth(depth).expect("a cached file sits in its snapshot folder");
                if folder.as_deref().is_some_and(|f| f != dir) {
                    bail!("{} and another file of {id} belong to different snapshots: retry", path.display());
                }
                folder = Some(dir.to_owned());
            }
            None if *required => {
                let mode = if offline() { " (HF_HUB_OFFLINE=1: the cache alone)" } else { "" };
                bail!("{}{mode}", errors.join("; "));
            }
            None => {}
        }
    }
    let folder = folder.expect("a required file was found");
    tracing::info!(model = %id, folder = %folder.display(), "model from the Hugging Face Hub");
    Ok(folder)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_and_paths_are_told_apart() {
        let id = |s: &str| HubId::parse(s);
        assert_eq!(
            id("sentence-transformers/all-MiniLM-L6-v2"),
            Some(HubId { repo: "sentence-transformers/all-MiniLM-L6-v2".into(), revision: "main".into() })
        );
        assert_eq!(id("bert-base-uncased@v1.0").unwrap().revision, "v1.0");
        for not_an_id in ["./models/x", "/abs/path", "a/b/c", "org/", "org/name@", "../up", "with space/x"] {
            assert_eq!(id(not_an_id), None, "{not_an_id}");
        }
        // An existing folder is always the folder, whatever it looks like.
        assert_eq!(hub_id(Path::new("src")), None);
    }
}
