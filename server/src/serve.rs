//! `attune serve`: load the configured models in the background, serve the API, and shut down
//! gracefully on SIGTERM/SIGINT.

use crate::api::state::AppState;
use crate::engine::{Engine, EngineConfig};
use crate::metrics::Metrics;
use anyhow::{Context, Result};
use attune_config::AttuneConfig;
use attune_models::{default_device, MissingDefault, Model};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

pub async fn serve(config: AttuneConfig) -> Result<()> {
    let metrics = Arc::new(Metrics::new());
    let state = Arc::new(AppState::new(
        config.server.clone(),
        config.models.iter().map(|m| m.id.clone()).collect(),
        metrics.clone(),
    ));
    let addr = format!("{}:{}", config.server.host, config.server.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    tracing::info!("listening on http://{}", listener.local_addr()?);

    let loader_state = state.clone();
    tokio::task::spawn_blocking(move || load_models(&config, &loader_state, metrics));

    let app = crate::api::router(state.clone());
    let grace = Duration::from_secs(state.limits.shutdown_grace_secs);
    let shutdown_state = state.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            tracing::info!("shutting down: no new requests, finishing in-flight ones");
            shutdown_state.shutting_down.store(true, Ordering::SeqCst);
            // Past the grace period, stop waiting for in-flight requests.
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                tracing::warn!("grace period over; exiting with requests still in flight");
                std::process::exit(0);
            });
        })
        .await?;
    tracing::info!("stopped");
    Ok(())
}

/// Loads each model and starts its engine; /ready turns 200 once all are up.
fn load_models(config: &AttuneConfig, state: &AppState, metrics: Arc<Metrics>) {
    let engine_config = EngineConfig {
        max_batch_size: config.server.max_batch_size,
        max_queue: config.server.max_queue,
        prefix_cache_bytes: config.server.prefix_cache_bytes,
        prefill_chunk_tokens: config.server.prefill_chunk_tokens,
    };
    for (entry, slot) in config.models.iter().zip(&state.models) {
        let loaded = (|| -> Result<Arc<Engine>> {
            let source = attune_models::source::resolve(
                entry.source(),
                &config.cache_dir(),
                MissingDefault::Fetch,
            )?;
            let model = Model::load(&source, &default_device()?)?;
            tracing::info!(model = %entry.id, source = %source.path().display(), "model loaded");
            Ok(Engine::start(
                entry.id.clone(),
                Arc::new(model),
                engine_config,
                metrics.clone(),
            )?)
        })();
        match loaded {
            Ok(engine) => {
                let _ = slot.engine.set(engine);
            }
            Err(e) => {
                tracing::error!(model = %entry.id, "cannot load model: {e:#}");
                let _ = slot.error.set(format!("{e:#}"));
            }
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
