//! The effective configuration: command line > `ATTUNE_*` environment > config file > defaults.
//! clap reads the environment for each flag, so here only file < flags remains to merge.

use anyhow::Result;
use attune_config::{AttuneConfig, ModelEntry};
use clap::Args;
use std::path::PathBuf;

/// Options every subcommand takes.
#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// TOML configuration file (see config/attune.toml).
    #[arg(long, global = true, env = "ATTUNE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Model cache directory.
    #[arg(long, global = true, env = "ATTUNE_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Compute threads (0 = all cores).
    #[arg(long, global = true, env = "ATTUNE_THREADS")]
    pub threads: Option<usize>,
    /// Model to use: the default id, a GGUF file, an HF directory or an HF cache id.
    #[arg(long, global = true, env = "ATTUNE_MODEL")]
    pub model: Option<String>,
}

impl GlobalArgs {
    pub fn resolve(&self) -> Result<AttuneConfig> {
        let mut config = match &self.config {
            Some(path) => AttuneConfig::load(path)?,
            None => AttuneConfig::default(),
        };
        if let Some(dir) = &self.cache_dir {
            config.cache_dir = Some(dir.clone());
        }
        if let Some(threads) = self.threads {
            config.threads = threads;
        }
        if let Some(model) = &self.model {
            // A model named on the command line replaces the configured list.
            config.models = vec![ModelEntry {
                id: model_id(model),
                source: Some(model.clone()),
            }];
        }
        config.validate()?;
        Ok(config)
    }
}

/// The name clients use for a model given by path: its file or directory name.
fn model_id(source: &str) -> String {
    let path = std::path::Path::new(source);
    if path.exists() {
        if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
            return stem.to_string();
        }
    }
    source.to_string()
}

/// Sets the thread count for candle's CPU kernels; must run before any of them.
pub fn apply_threads(threads: usize) -> usize {
    let threads = if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        threads
    };
    // candle sizes its GEMM parallelism and rayon its pool from this variable; nothing has
    // started a thread yet, so setting it here is safe.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    threads
}
