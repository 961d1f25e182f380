//! The OpenAI-compatible HTTP API.

pub mod error;
mod handlers;
mod images;
pub mod openapi;
pub mod state;
pub mod types;
pub mod validation;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use state::AppState;
use std::sync::Arc;

pub fn router(state: Arc<AppState>) -> Router {
    let body_limit = state.limits.max_body_bytes;
    Router::new()
        .route("/health", get(handlers::health))
        .route("/ready", get(handlers::ready))
        .route("/metrics", get(handlers::metrics))
        .route("/v1/models", get(handlers::list_models))
        .route("/v1/models/{id}", get(handlers::get_model))
        .route("/v1/interventions", get(handlers::interventions))
        .route("/openapi.json", get(handlers::openapi))
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/completions", post(handlers::completions))
        .route("/tokenize", post(handlers::tokenize))
        .route("/detokenize", post(handlers::detokenize))
        .fallback(handlers::not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            handlers::authorize,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            handlers::shape_errors,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            handlers::track,
        ))
        .with_state(state)
}
