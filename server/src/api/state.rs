//! What every handler shares: limits, the models (loaded in the background), metrics.

use crate::api::error::ApiError;
use crate::engine::Engine;
use crate::metrics::Metrics;
use attune_config::ServerConfig;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// A configured model: loading until `engine` is set, or failed with `error`.
pub struct ModelSlot {
    pub id: String,
    pub engine: OnceLock<Arc<Engine>>,
    pub error: OnceLock<String>,
}

pub struct AppState {
    pub limits: ServerConfig,
    pub models: Vec<ModelSlot>,
    pub metrics: Arc<Metrics>,
    pub shutting_down: AtomicBool,
    /// Unix time the server started (the `created` of every model).
    pub started: u64,
}

impl AppState {
    pub fn new(limits: ServerConfig, model_ids: Vec<String>, metrics: Arc<Metrics>) -> Self {
        Self {
            limits,
            models: model_ids
                .into_iter()
                .map(|id| ModelSlot {
                    id,
                    engine: OnceLock::new(),
                    error: OnceLock::new(),
                })
                .collect(),
            metrics,
            shutting_down: AtomicBool::new(false),
            started: unix_now(),
        }
    }

    pub fn model_ids(&self) -> Vec<String> {
        self.models.iter().map(|m| m.id.clone()).collect()
    }

    pub fn ready(&self) -> bool {
        self.models.iter().all(|m| m.engine.get().is_some())
    }

    /// The engine for a request's `model` (the first configured model when it names none).
    pub fn engine(&self, requested: Option<&str>) -> Result<Arc<Engine>, ApiError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ApiError::unavailable("The server is shutting down"));
        }
        let slot = match requested {
            None => &self.models[0],
            Some(id) => self
                .models
                .iter()
                .find(|m| m.id == id)
                .ok_or_else(|| ApiError::model_not_found(id, &self.model_ids()))?,
        };
        if let Some(engine) = slot.engine.get() {
            return Ok(engine.clone());
        }
        Err(match slot.error.get() {
            Some(e) => ApiError::unavailable(format!("Model `{}` failed to load: {e}", slot.id)),
            None => ApiError::unavailable(format!("Model `{}` is still loading", slot.id)),
        })
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
