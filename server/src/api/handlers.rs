//! HTTP handlers: parse, validate, hand to the engine, answer (whole or streamed).

use crate::api::error::ApiError;
use crate::api::state::{unix_now, AppState};
use crate::api::types::{
    ChatCompletionRequest, ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, CompletionRequest,
    DetokenizeRequest, TokenizeRequest, TopLogprob, Usage,
};
use crate::api::validation::{self, ValidatedRequest};
use crate::engine::{EngineEvent, GenerationRequest, SubmitError};
use crate::sequence::{FinishReason, StepOutput, TokenLogprob};
use attune_models::TextTokenizer;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use rand::Rng;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

type Shared = State<Arc<AppState>>;

/// Which API shape a generation answers in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completion,
}

pub async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub async fn ready(State(state): Shared) -> Response {
    if state.ready() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        ApiError::unavailable("Models are still loading").into_response()
    }
}

pub async fn metrics(State(state): Shared) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

fn model_object(state: &AppState, id: &str) -> Value {
    json!({"id": id, "object": "model", "created": state.started, "owned_by": "attune"})
}

pub async fn list_models(State(state): Shared) -> Json<Value> {
    let data: Vec<Value> = state
        .models
        .iter()
        .map(|m| model_object(&state, &m.id))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

pub async fn get_model(State(state): Shared, Path(id): Path<String>) -> Response {
    match state.models.iter().find(|m| m.id == id) {
        Some(m) => Json(model_object(&state, &m.id)).into_response(),
        None => ApiError::model_not_found(&id, &state.model_ids()).into_response(),
    }
}

pub async fn interventions() -> Json<Value> {
    Json(json!({"object": "list", "data": attune_interventions::catalogue()}))
}

pub async fn openapi() -> Json<Value> {
    Json(crate::api::openapi::document())
}

pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::route_not_found(uri.path())
}

/// Parses a JSON body; the error names the field that did not fit.
fn parse_body<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::invalid("", format!("The body is not valid JSON: {inner}"))
        } else if path == "." {
            ApiError::invalid("", format!("Invalid request: {inner}"))
        } else {
            ApiError::invalid(path.clone(), format!("Invalid value for `{path}`: {inner}"))
        }
    })
}

pub async fn chat_completions(State(state): Shared, body: Bytes) -> Result<Response, ApiError> {
    let req: ChatCompletionRequest = parse_body(&body)?;
    let validated = off_runtime(&state, move |s| validation::chat(s, req)).await?;
    run(state, validated, Endpoint::Chat).await
}

/// Runs a check that may decode and preprocess images on the blocking pool, so that CPU work
/// never stalls the async workers serving other connections.
async fn off_runtime<T: Send + 'static>(
    state: &Arc<AppState>,
    check: impl FnOnce(&AppState) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || check(&state))
        .await
        .map_err(|e| ApiError::internal(format!("request validation failed: {e}")))?
}

pub async fn completions(State(state): Shared, body: Bytes) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse_body(&body)?;
    let validated = validation::completion(&state, req)?;
    run(state, validated, Endpoint::Completion).await
}

/// vLLM's `/tokenize`: token ids of a prompt or of chat messages (through the chat template).
pub async fn tokenize(State(state): Shared, body: Bytes) -> Result<Json<Value>, ApiError> {
    let req: TokenizeRequest = parse_body(&body)?;
    let (engine, tokens) = off_runtime(&state, move |s| validation::tokenize(s, req)).await?;
    let context = engine.model.decoder.config().max_position_embeddings;
    Ok(Json(
        json!({"tokens": tokens, "count": tokens.len(), "max_model_len": context}),
    ))
}

/// vLLM's `/detokenize`: the text of token ids.
pub async fn detokenize(State(state): Shared, body: Bytes) -> Result<Json<Value>, ApiError> {
    let req: DetokenizeRequest = parse_body(&body)?;
    Ok(Json(
        json!({"prompt": validation::detokenize(&state, req)?}),
    ))
}

/// Submits a validated request and answers it whole or as a stream.
async fn run(
    state: Arc<AppState>,
    v: ValidatedRequest,
    endpoint: Endpoint,
) -> Result<Response, ApiError> {
    let ValidatedRequest {
        engine,
        choices,
        interventions,
        resolved_interventions,
        stream: streamed,
        include_usage,
        logprobs,
        prompt_tokens,
    } = v;
    let reply = Reply {
        id: match endpoint {
            Endpoint::Chat => format!("chatcmpl-{}", random_id()),
            Endpoint::Completion => format!("cmpl-{}", random_id()),
        },
        created: unix_now(),
        model: engine.model_id.clone(),
        endpoint,
        interventions: resolved_interventions,
        logprobs,
        prompt_tokens,
        choices: choices.len(),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    engine
        .submit(GenerationRequest {
            choices,
            interventions,
            events: tx,
            arrived: Instant::now(),
        })
        .map_err(|e| match e {
            SubmitError::QueueFull => ApiError::queue_full(state.limits.retry_after_secs),
            SubmitError::Stopped => ApiError::unavailable("The model's engine has stopped"),
        })?;
    tracing::info!(id = %reply.id, model = %reply.model, choices = reply.choices, prompt_tokens, streamed, "request accepted");
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(state.limits.request_timeout_secs);
    let model = engine.model.clone();
    if streamed {
        Ok(stream(reply, rx, deadline, include_usage, model).into_response())
    } else {
        collect(reply, rx, deadline, &model.tokenizer)
            .await
            .map(|body| Json(body).into_response())
    }
}

fn random_id() -> String {
    let mut rng = rand::rng();
    (0..24)
        .map(|_| format!("{:x}", rng.random_range(0..16u8)))
        .collect()
}

/// What every response of one request shares.
struct Reply {
    id: String,
    created: u64,
    model: String,
    endpoint: Endpoint,
    interventions: Vec<Value>,
    logprobs: Option<usize>,
    prompt_tokens: usize,
    choices: usize,
}

/// One choice's accumulated output.
#[derive(Default)]
struct ChoiceState {
    text: String,
    tokens: usize,
    finish: Option<FinishReason>,
    logprobs: Vec<TokenLogprob>,
    token_scores: Option<Vec<(u32, f32)>>,
    intervention_report: Option<Value>,
    /// The prompt it ran on, when an intervention replaced the request's.
    prompt_tokens: Option<usize>,
}

impl ChoiceState {
    fn add(&mut self, out: &StepOutput) {
        self.prompt_tokens = self.prompt_tokens.or(out.prompt_tokens);
        if out.intervention_report.is_some() {
            self.intervention_report = out.intervention_report.clone();
        }
        if out.token_scores.is_some() {
            self.token_scores = out.token_scores.clone();
        }
        self.text.push_str(&out.text);
        self.tokens += 1;
        self.finish = out.finished;
        self.logprobs.extend(out.logprob.clone());
    }
}

async fn next_event(
    rx: &mut mpsc::UnboundedReceiver<EngineEvent>,
    deadline: tokio::time::Instant,
) -> Result<EngineEvent, ApiError> {
    match tokio::time::timeout_at(deadline, rx.recv()).await {
        Err(_) => Err(ApiError::unavailable("The request timed out")),
        Ok(None) => Err(ApiError::internal("The engine dropped the request")),
        Ok(Some(EngineEvent::Failed { message })) => {
            Err(ApiError::internal(format!("Generation failed: {message}")))
        }
        Ok(Some(event)) => Ok(event),
    }
}

async fn collect(
    reply: Reply,
    mut rx: mpsc::UnboundedReceiver<EngineEvent>,
    deadline: tokio::time::Instant,
    tokenizer: &TextTokenizer,
) -> Result<Value, ApiError> {
    let mut choices: Vec<ChoiceState> =
        (0..reply.choices).map(|_| ChoiceState::default()).collect();
    while choices.iter().any(|c| c.finish.is_none()) {
        if let EngineEvent::Step { choice, output } = next_event(&mut rx, deadline).await? {
            choices[choice].add(&output);
        }
    }
    let completion_tokens = choices.iter().map(|c| c.tokens).sum();
    // A replaced prompt (the same for every choice of a prompt) counts instead of the request's.
    let prompt_tokens = choices
        .iter()
        .filter_map(|c| c.prompt_tokens)
        .max()
        .unwrap_or(reply.prompt_tokens);
    tracing::info!(id = %reply.id, completion_tokens, "request finished");
    let body_choices: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(index, c)| {
            let mut choice = match reply.endpoint {
                Endpoint::Chat => json!({
                    "index": index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": reply.logprobs.map(|_| chat_logprobs(tokenizer, &c.logprobs)),
                    "finish_reason": c.finish,
                }),
                Endpoint::Completion => json!({
                    "index": index,
                    "text": c.text,
                    "logprobs": reply.logprobs.map(|_| completion_logprobs(tokenizer, &c.logprobs)),
                    "finish_reason": c.finish,
                }),
            };
            if let Some(report) = &c.intervention_report {
                choice["intervention_report"] = report.clone();
            }
            if let Some(scores) = &c.token_scores {
                choice["token_scores"] = token_scores(tokenizer, scores);
            }
            choice
        })
        .collect();
    Ok(json!({
        "id": reply.id,
        "object": match reply.endpoint { Endpoint::Chat => "chat.completion", Endpoint::Completion => "text_completion" },
        "created": reply.created,
        "model": reply.model,
        "choices": body_choices,
        "usage": usage(prompt_tokens, completion_tokens),
        "interventions": reply.interventions,
    }))
}

fn usage(prompt_tokens: usize, completion_tokens: usize) -> Usage {
    Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens + completion_tokens,
    }
}

fn token_string(tokenizer: &TextTokenizer, id: u32) -> (String, Vec<u8>) {
    let bytes = tokenizer.token_bytes(id);
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

/// `token_scores`: each requested token with its log-probability at the answer position.
fn token_scores(tokenizer: &TextTokenizer, scores: &[(u32, f32)]) -> Value {
    scores
        .iter()
        .map(|&(id, logprob)| {
            json!({"token_id": id, "token": token_string(tokenizer, id).0, "logprob": logprob})
        })
        .collect()
}

fn chat_logprobs(tokenizer: &TextTokenizer, steps: &[TokenLogprob]) -> ChatLogprobs {
    ChatLogprobs {
        content: steps
            .iter()
            .map(|s| {
                let (token, bytes) = token_string(tokenizer, s.token);
                ChatTokenLogprob {
                    token,
                    logprob: s.logprob,
                    bytes,
                    top_logprobs: s
                        .top
                        .iter()
                        .map(|&(id, logprob)| {
                            let (token, bytes) = token_string(tokenizer, id);
                            TopLogprob {
                                token,
                                logprob,
                                bytes,
                            }
                        })
                        .collect(),
                }
            })
            .collect(),
    }
}

fn completion_logprobs(tokenizer: &TextTokenizer, steps: &[TokenLogprob]) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    let mut offset = 0;
    for s in steps {
        let (token, _) = token_string(tokenizer, s.token);
        out.text_offset.push(offset);
        offset += token.len();
        out.tokens.push(token);
        out.token_logprobs.push(s.logprob);
        out.top_logprobs.push(
            s.top
                .iter()
                .map(|&(id, lp)| (token_string(tokenizer, id).0, lp))
                .collect(),
        );
    }
    out
}

/// Server-sent events: a chunk per step, then (optionally) usage, then `[DONE]`.
fn stream(
    reply: Reply,
    mut rx: mpsc::UnboundedReceiver<EngineEvent>,
    deadline: tokio::time::Instant,
    include_usage: bool,
    model: Arc<attune_models::Model>,
) -> impl IntoResponse {
    let (out, events) = mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(async move {
        let send = |value: Value| {
            let out = out.clone();
            async move {
                out.send(Ok(Event::default().data(value.to_string())))
                    .await
                    .is_ok()
            }
        };
        let tokenizer = &model.tokenizer;
        let object = match reply.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completion => "text_completion",
        };
        let mut first_chunk = true;
        let mut chunk = |choices: Value, usage: Option<Usage>| {
            let mut c = json!({
                "id": reply.id, "object": object, "created": reply.created,
                "model": reply.model, "choices": choices,
            });
            if include_usage {
                c["usage"] = json!(usage);
            }
            // The resolved interventions ride on the first chunk only.
            if std::mem::take(&mut first_chunk) {
                c["interventions"] = json!(reply.interventions);
            }
            c
        };
        if reply.endpoint == Endpoint::Chat {
            let first: Vec<Value> = (0..reply.choices)
                .map(|i| json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}))
                .collect();
            if !send(chunk(Value::Array(first), None)).await {
                return;
            }
        }
        let mut finished = vec![false; reply.choices];
        let mut completion_tokens = 0;
        let mut prompt_tokens = reply.prompt_tokens;
        while finished.iter().any(|f| !f) {
            let (choice, output) = match next_event(&mut rx, deadline).await {
                Ok(EngineEvent::Step { choice, output }) => (choice, output),
                Ok(EngineEvent::Failed { .. }) => {
                    unreachable!("next_event turns failures into errors")
                }
                Err(e) => {
                    // Headers are sent already: report in-band, as OpenAI does.
                    let _ = send(e.body()).await;
                    break;
                }
            };
            completion_tokens += 1;
            prompt_tokens = output.prompt_tokens.unwrap_or(prompt_tokens);
            finished[choice] = output.finished.is_some();
            let logprobs = reply.logprobs.map(|_| {
                let steps: Vec<TokenLogprob> = output.logprob.iter().cloned().collect();
                match reply.endpoint {
                    Endpoint::Chat => json!(chat_logprobs(tokenizer, &steps)),
                    Endpoint::Completion => json!(completion_logprobs(tokenizer, &steps)),
                }
            });
            if output.text.is_empty()
                && output.finished.is_none()
                && logprobs.is_none()
                && output.intervention_report.is_none()
                && output.token_scores.is_none()
            {
                continue;
            }
            let mut body = match reply.endpoint {
                Endpoint::Chat => {
                    let delta = if output.text.is_empty() {
                        json!({})
                    } else {
                        json!({"content": output.text})
                    };
                    json!({"index": choice, "delta": delta, "logprobs": logprobs, "finish_reason": output.finished})
                }
                Endpoint::Completion => {
                    json!({"index": choice, "text": output.text, "logprobs": logprobs, "finish_reason": output.finished})
                }
            };
            if let Some(report) = output.intervention_report {
                body["intervention_report"] = report;
            }
            if let Some(scores) = &output.token_scores {
                body["token_scores"] = token_scores(tokenizer, scores);
            }
            if !send(chunk(json!([body]), None)).await {
                return; // client gone: dropping rx cancels the sequences
            }
        }
        if include_usage {
            let _ = send(chunk(
                json!([]),
                Some(usage(prompt_tokens, completion_tokens)),
            ))
            .await;
        }
        let _ = out.send(Ok(Event::default().data("[DONE]"))).await;
    });
    Sse::new(ReceiverStream::new(events)).keep_alive(KeepAlive::default())
}

/// Counts and times every request by endpoint and status.
pub async fn track(
    State(state): Shared,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let endpoint = endpoint_label(request.uri().path());
    let start = Instant::now();
    let response = next.run(request).await;
    state
        .metrics
        .requests
        .with_label_values(&[endpoint, response.status().as_str()])
        .inc();
    state
        .metrics
        .request_duration
        .with_label_values(&[endpoint])
        .observe(start.elapsed().as_secs_f64());
    response
}

/// A bounded label: known routes by name, everything else as "other".
fn endpoint_label(path: &str) -> &'static str {
    match path {
        "/v1/chat/completions" => "chat_completions",
        "/v1/completions" => "completions",
        "/tokenize" => "tokenize",
        "/detokenize" => "detokenize",
        "/v1/models" => "models",
        "/v1/interventions" => "interventions",
        "/health" => "health",
        "/ready" => "ready",
        "/metrics" => "metrics",
        "/openapi.json" => "openapi",
        p if p.starts_with("/v1/models/") => "model",
        _ => "other",
    }
}

/// Bearer-key check for every route but /health and /metrics.
pub async fn authorize(
    State(state): Shared,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let open = matches!(request.uri().path(), "/health" | "/metrics");
    if open || state.limits.api_keys.is_empty() {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        None => ApiError::unauthorized("Missing API key: send `Authorization: Bearer <key>`")
            .into_response(),
        Some(key) if state.limits.api_keys.iter().any(|k| k == key) => next.run(request).await,
        Some(_) => ApiError::unauthorized("Invalid API key").into_response(),
    }
}

/// Turns axum's own rejections (body too large, wrong method) into our error shape.
pub async fn shape_errors(
    State(state): Shared,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let response = next.run(request).await;
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json || response.status().is_success() {
        return response;
    }
    match response.status() {
        StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::payload_too_large(state.limits.max_body_bytes).into_response()
        }
        StatusCode::METHOD_NOT_ALLOWED => ApiError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            ..ApiError::invalid("", "Method not allowed on this route")
        }
        .into_response(),
        _ => response,
    }
}
