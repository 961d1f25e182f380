//! Finding a model's files from what a user names: the built-in default id, a GGUF file, an
//! HF-style directory, or an HF hub id already in the local Hugging Face cache (offline).

use crate::fetch;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Gguf(PathBuf),
    /// A directory with `config.json`, safetensors weights and `tokenizer.json`.
    HfDir(PathBuf),
}

impl ModelSource {
    pub fn path(&self) -> &Path {
        match self {
            Self::Gguf(p) | Self::HfDir(p) => p,
        }
    }
}

/// What to do when the default model is not in the cache yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingDefault {
    Fetch,
    Fail,
}

pub fn resolve(source: &str, cache_dir: &Path, missing: MissingDefault) -> Result<ModelSource> {
    if source == attune_config::DEFAULT_MODEL_ID {
        let path = fetch::default_model_path(cache_dir);
        if path.exists() {
            return Ok(ModelSource::Gguf(path));
        }
        return match missing {
            MissingDefault::Fetch => Ok(ModelSource::Gguf(fetch::fetch_default_model(cache_dir)?)),
            MissingDefault::Fail => bail!(
                "the default model is not in {} yet; run `attune models fetch`",
                cache_dir.display()
            ),
        };
    }
    let path = Path::new(source);
    if path.is_file() {
        return Ok(ModelSource::Gguf(path.to_path_buf()));
    }
    if path.is_dir() {
        return from_dir(path);
    }
    if let Some((org, name)) = source.split_once('/') {
        if !org.is_empty() && !name.is_empty() && !name.contains('/') {
            let snapshot = hf_cache_snapshot(&hf_hub_cache(), org, name)?;
            return from_dir(&snapshot);
        }
    }
    bail!(
        "model `{source}` not found: it is not `{}`, an existing file or directory, or an \
         ORG/NAME id in the Hugging Face cache",
        attune_config::DEFAULT_MODEL_ID
    )
}

fn from_dir(dir: &Path) -> Result<ModelSource> {
    if dir.join("config.json").exists() {
        return Ok(ModelSource::HfDir(dir.to_path_buf()));
    }
    let ggufs: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    match ggufs.as_slice() {
        [one] => Ok(ModelSource::Gguf(one.clone())),
        [] => bail!("{} has neither config.json nor a .gguf file", dir.display()),
        _ => bail!("{} has several .gguf files; name one", dir.display()),
    }
}

/// The Hugging Face hub cache: `$HF_HUB_CACHE`, `$HF_HOME/hub`, or `~/.cache/huggingface/hub`.
pub fn hf_hub_cache() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("HF_HUB_CACHE")
        .or_else(|| env("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| env("XDG_CACHE_HOME").map(|c| c.join("huggingface").join("hub")))
        .or_else(|| env("HOME").map(|h| h.join(".cache").join("huggingface").join("hub")))
        .unwrap_or_else(|| PathBuf::from(".cache/huggingface/hub"))
}

/// `models--ORG--NAME/snapshots/REV` for the revision `refs/main` points at, or the newest.
pub fn hf_cache_snapshot(hub: &Path, org: &str, name: &str) -> Result<PathBuf> {
    let repo = hub.join(format!("models--{org}--{name}"));
    let snapshots = repo.join("snapshots");
    if !snapshots.is_dir() {
        bail!(
            "model `{org}/{name}` is not in the Hugging Face cache ({} does not exist); Attune \
             loads hub models offline only",
            snapshots.display()
        );
    }
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs").join("main")) {
        let dir = snapshots.join(rev.trim());
        if dir.is_dir() {
            return Ok(dir);
        }
    }
    let newest = std::fs::read_dir(&snapshots)?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .with_context(|| format!("{} has no snapshot", snapshots.display()))?;
    Ok(newest.path())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_snapshot_refs_main_points_at() {
        let hub = tempfile::tempdir().unwrap();
        let repo = hub.path().join("models--org--tiny");
        for rev in ["aaa", "bbb"] {
            std::fs::create_dir_all(repo.join("snapshots").join(rev)).unwrap();
        }
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "aaa\n").unwrap();
        let found = hf_cache_snapshot(hub.path(), "org", "tiny").unwrap();
        assert_eq!(found, repo.join("snapshots/aaa"));
        let err = hf_cache_snapshot(hub.path(), "org", "absent").unwrap_err();
        assert!(err.to_string().contains("not in the Hugging Face cache"));
    }

    #[test]
    fn unknown_names_are_a_clear_error() {
        let cache = tempfile::tempdir().unwrap();
        let err = resolve("no-such-model", cache.path(), MissingDefault::Fail).unwrap_err();
        assert!(err.to_string().contains("not found"), "{err}");
        let err = resolve(
            attune_config::DEFAULT_MODEL_ID,
            cache.path(),
            MissingDefault::Fail,
        )
        .unwrap_err();
        assert!(err.to_string().contains("attune models fetch"), "{err}");
    }
}
