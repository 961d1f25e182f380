//! Attune's configuration: the TOML file format, its defaults, and where things live on disk.
//!
//! Layering (command line > environment > file > defaults) is done by the binary; this crate
//! only knows the file format and the defaults, so every other crate can depend on it.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Model id that names the built-in default model (SmolLM2-135M-Instruct, Q4_1 GGUF).
pub const DEFAULT_MODEL_ID: &str = "smollm2-135m-instruct";

/// The whole configuration file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AttuneConfig {
    /// Where fetched models are cached. Default: `$XDG_CACHE_HOME/attune/models`
    /// (or `~/.cache/attune/models`).
    pub cache_dir: Option<PathBuf>,
    /// Compute threads; 0 = all cores.
    pub threads: usize,
    pub server: ServerConfig,
    /// Models to serve; the first is the default for requests that name none.
    pub models: Vec<ModelEntry>,
}

impl Default for AttuneConfig {
    fn default() -> Self {
        Self {
            cache_dir: None,
            threads: 0,
            server: ServerConfig::default(),
            models: vec![ModelEntry::default()],
        }
    }
}

/// HTTP server settings and request limits.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// Bearer keys accepted on every route but /health and /metrics; empty = no auth.
    pub api_keys: Vec<String>,
    /// Sequences decoded together in one step, per model.
    pub max_batch_size: usize,
    /// Most prompt tokens one sequence feeds per step; longer prompts are prefilled in pieces.
    pub prefill_chunk_tokens: usize,
    /// Requests waiting for a batch slot, per model; beyond it requests get 429.
    pub max_queue: usize,
    /// Bytes of recently prefilled prompts' KV caches kept per model, so that prompts starting
    /// with the same tokens copy them instead of computing them again; 0 turns this off.
    pub prefix_cache_bytes: usize,
    /// Most tokens one choice may generate.
    pub max_tokens_cap: usize,
    /// Most choices (`n`) per request.
    pub max_n: usize,
    /// Largest accepted request body, in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Most stop strings per request.
    pub max_stop_strings: usize,
    /// Most entries in a request's `interventions` list.
    pub max_interventions: usize,
    /// Most token ids in a request's `score_token_ids`.
    pub max_score_tokens: usize,
    /// Most images in one request (vision-language models).
    pub max_images: usize,
    /// Largest image in bytes, as sent (after base64 decoding).
    pub max_image_bytes: usize,
    /// Most pixels (width x height) of one image, checked before decoding it.
    pub max_image_pixels: u64,
    /// Longest side of one image in pixels.
    pub max_image_side: u32,
    /// URL prefixes (`https://host/path/`) that `image_url` parts may fetch from; empty: remote
    /// images are refused and only `data:` URLs are taken.
    pub image_url_prefixes: Vec<String>,
    /// Longest time one remote image may take to fetch.
    pub image_fetch_timeout_secs: u64,
    /// A request still running after this many seconds is cancelled (503).
    pub request_timeout_secs: u64,
    /// On SIGTERM/SIGINT, in-flight requests get this long to finish.
    pub shutdown_grace_secs: u64,
    /// Seconds a client is told to wait (Retry-After) when the queue is full.
    pub retry_after_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            api_keys: Vec::new(),
            max_batch_size: 16,
            prefill_chunk_tokens: 512,
            max_queue: 64,
            prefix_cache_bytes: 32 * 1024 * 1024,
            max_tokens_cap: 4096,
            max_n: 8,
            max_body_bytes: 16 * 1024 * 1024,
            max_stop_strings: 8,
            max_interventions: 8,
            max_score_tokens: 256,
            max_images: 4,
            max_image_bytes: 10 * 1024 * 1024,
            max_image_pixels: 4096 * 4096,
            max_image_side: 8192,
            image_url_prefixes: Vec::new(),
            image_fetch_timeout_secs: 10,
            request_timeout_secs: 600,
            shutdown_grace_secs: 30,
            retry_after_secs: 1,
        }
    }
}

/// One servable model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelEntry {
    /// The name clients use in the `model` field.
    pub id: String,
    /// Where the weights are: the built-in default id, a GGUF file, an HF-style directory, or an
    /// HF hub id (`ORG/NAME`) found offline in the Hugging Face cache. Defaults to `id`.
    pub source: Option<String>,
}

impl Default for ModelEntry {
    fn default() -> Self {
        Self {
            id: DEFAULT_MODEL_ID.into(),
            source: None,
        }
    }
}

impl ModelEntry {
    pub fn source(&self) -> &str {
        self.source.as_deref().unwrap_or(&self.id)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl AttuneConfig {
    pub fn from_toml_str(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_str(&text, path)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        for (name, value) in [
            ("server.max_batch_size", s.max_batch_size),
            ("server.prefill_chunk_tokens", s.prefill_chunk_tokens),
            ("server.max_tokens_cap", s.max_tokens_cap),
            ("server.max_n", s.max_n),
            ("server.max_body_bytes", s.max_body_bytes),
            ("server.max_image_bytes", s.max_image_bytes),
            ("server.max_image_pixels", s.max_image_pixels as usize),
            ("server.max_image_side", s.max_image_side as usize),
            (
                "server.request_timeout_secs",
                s.request_timeout_secs as usize,
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid(format!("`{name}` must be at least 1")));
            }
        }
        if s.max_n > s.max_batch_size {
            return Err(ConfigError::Invalid(
                "`server.max_n` cannot exceed `server.max_batch_size`".into(),
            ));
        }
        for prefix in &s.image_url_prefixes {
            let rest = prefix
                .strip_prefix("https://")
                .or_else(|| prefix.strip_prefix("http://"));
            // A path after the host keeps `https://host` from also matching `https://host.evil/`.
            let host_then_path = rest
                .and_then(|r| r.find('/'))
                .is_some_and(|slash| slash > 0);
            if !host_then_path {
                return Err(ConfigError::Invalid(format!(
                    "`server.image_url_prefixes`: `{prefix}` must look like https://host/ or \
                     https://host/path/"
                )));
            }
        }
        if self.models.is_empty() {
            return Err(ConfigError::Invalid(
                "`models` must list at least one model".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for model in &self.models {
            if model.id.trim().is_empty() {
                return Err(ConfigError::Invalid("a model has an empty `id`".into()));
            }
            if !seen.insert(model.id.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "model id `{}` is configured twice",
                    model.id
                )));
            }
        }
        Ok(())
    }

    /// The model cache directory, resolved against XDG defaults.
    pub fn cache_dir(&self) -> PathBuf {
        self.cache_dir.clone().unwrap_or_else(default_cache_dir)
    }
}

/// `$XDG_CACHE_HOME/attune/models`, falling back to `~/.cache/attune/models`.
pub fn default_cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("attune").join("models")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_default_file_matches_builtin_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("attune.toml");
        let config = AttuneConfig::load(&path).unwrap();
        assert_eq!(config, AttuneConfig::default());
    }

    #[test]
    fn unknown_keys_are_rejected_with_the_key_named() {
        let err = AttuneConfig::from_toml_str("[server]\nprot = 1\n", Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("prot"), "{err}");
    }

    #[test]
    fn image_url_prefixes_need_a_scheme_host_and_path() {
        for bad in [
            "example.com/",
            "https://example.com",
            "ftp://example.com/",
            "https:///x/",
        ] {
            let text = format!("[server]\nimage_url_prefixes = [\"{bad}\"]\n");
            let err = AttuneConfig::from_toml_str(&text, Path::new("x.toml")).unwrap_err();
            assert!(
                err.to_string().contains("image_url_prefixes"),
                "{bad}: {err}"
            );
        }
        let text = "[server]\nimage_url_prefixes = [\"https://img.example.com/public/\"]\n";
        assert!(AttuneConfig::from_toml_str(text, Path::new("x.toml")).is_ok());
    }

    #[test]
    fn duplicate_model_ids_are_rejected() {
        let text = "[[models]]\nid = \"a\"\n[[models]]\nid = \"a\"\n";
        let err = AttuneConfig::from_toml_str(text, Path::new("x.toml")).unwrap_err();
        assert!(err.to_string().contains("twice"));
    }
}
