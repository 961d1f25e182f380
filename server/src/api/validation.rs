//! All request checks in one place: each request is turned into engine work or a 400 that
//! names the field. Handlers never look at raw request fields themselves.

use crate::api::error::ApiError;
use crate::api::images;
use crate::api::state::AppState;
use crate::api::types::{
    ChatCompletionRequest, ChatMessage, CompletionRequest, ContentPart, DetokenizeRequest,
    MessageContent, PromptSpec, SamplingFields, StopSpec, TokenizeRequest,
};
use crate::engine::{BranchSpec, ChoiceSpec, Engine};
use crate::sampling::SamplingParams;
use crate::sequence::GenerationParams;
use attune_interventions::{BranchPrompt, Intervention, ModelKind, ModelShape};
use attune_models::vision::RgbImage;
use attune_models::Model;
use candle_core::Tensor;
use serde_json::{json, Value};
use std::sync::Arc;

/// Most alternatives per token in `top_logprobs` / completions `logprobs`.
pub const MAX_TOP_LOGPROBS: u64 = 20;
/// OpenAI's default `max_tokens` for the completions endpoint.
const COMPLETIONS_DEFAULT_MAX_TOKENS: usize = 16;

/// A request that passed every check.
pub struct ValidatedRequest {
    pub engine: Arc<Engine>,
    pub choices: Vec<ChoiceSpec>,
    pub interventions: Arc<Vec<Box<dyn Intervention>>>,
    /// The interventions with every default filled in, echoed in the response.
    pub resolved_interventions: Vec<Value>,
    pub stream: bool,
    pub include_usage: bool,
    /// Alternatives per token when log-probabilities were asked for.
    pub logprobs: Option<usize>,
    /// Prompt tokens, each distinct prompt counted once.
    pub prompt_tokens: usize,
}

pub fn chat(state: &AppState, req: ChatCompletionRequest) -> Result<ValidatedRequest, ApiError> {
    let engine = state.engine(req.model.as_deref())?;
    let model = &engine.model;
    if req.tools.is_some() {
        return Err(ApiError::invalid(
            "tools",
            "Tool calling is not supported by this server",
        ));
    }
    if let Some(format) = &req.response_format {
        if format.get("type").and_then(Value::as_str) != Some("text") {
            return Err(ApiError::invalid(
                "response_format",
                "Only {\"type\": \"text\"} is supported",
            ));
        }
    }
    let (messages, images) = chat_messages(state, model, &req.messages, req.model.as_deref())?;
    let prompt = chat_tokens(model, &messages, images.len())
        .map_err(|e| ApiError::invalid("messages", e))?;
    let logprobs = match (req.logprobs, req.top_logprobs) {
        (false, Some(_)) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "requires `logprobs` to be true",
            ))
        }
        (false, None) => None,
        (true, top) => {
            Some(bounded("top_logprobs", top.unwrap_or(0), 0, MAX_TOP_LOGPROBS)? as usize)
        }
    };
    let max_tokens = match (req.max_completion_tokens, req.max_tokens) {
        (Some(m), _) => Some((m, "max_completion_tokens")),
        (None, Some(m)) => Some((m, "max_tokens")),
        (None, None) => None,
    };
    let prompts = vec![(prompt, PromptSource::Chat(messages))];
    let base = Common {
        state,
        model,
        sampling: &req.sampling,
        max_tokens,
        default_max_tokens: None,
        logprobs,
        score_token_ids: &req.score_token_ids,
        prompt_param: "messages",
        images,
    };
    finish(
        base,
        engine.clone(),
        prompts,
        &req.interventions,
        req.stream,
        req.stream_options.map(|o| o.include_usage),
    )
}

pub fn completion(state: &AppState, req: CompletionRequest) -> Result<ValidatedRequest, ApiError> {
    let engine = state.engine(req.model.as_deref())?;
    let model = &engine.model;
    if req.echo {
        return Err(ApiError::invalid("echo", "`echo` is not supported"));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix", "`suffix` is not supported"));
    }
    if let Some(best_of) = req.best_of {
        if best_of != req.sampling.n.unwrap_or(1) {
            return Err(ApiError::invalid(
                "best_of",
                "`best_of` must equal `n` (no re-ranking)",
            ));
        }
    }
    let prompts = completion_prompts(model, req.prompt.as_ref())?;
    let logprobs = req
        .logprobs
        .map(|n| bounded("logprobs", n, 0, MAX_TOP_LOGPROBS).map(|n| n as usize))
        .transpose()?;
    let base = Common {
        state,
        model,
        sampling: &req.sampling,
        max_tokens: req.max_tokens.map(|m| (m, "max_tokens")),
        default_max_tokens: Some(COMPLETIONS_DEFAULT_MAX_TOKENS),
        logprobs,
        score_token_ids: &req.score_token_ids,
        prompt_param: "prompt",
        images: Vec::new(),
    };
    finish(
        base,
        engine.clone(),
        prompts,
        &req.interventions,
        req.stream,
        req.stream_options.map(|o| o.include_usage),
    )
}

/// A request image as decoded and as the processor's pixel values.
type RequestImage = (Arc<RgbImage>, Tensor);

/// The parts both endpoints check the same way.
struct Common<'a> {
    state: &'a AppState,
    model: &'a Model,
    sampling: &'a SamplingFields,
    max_tokens: Option<(u64, &'static str)>,
    /// `None`: as many as fit in the context (up to the cap).
    default_max_tokens: Option<usize>,
    logprobs: Option<usize>,
    score_token_ids: &'a [u32],
    prompt_param: &'static str,
    /// The request's images, in prompt order.
    images: Vec<RequestImage>,
}

/// What a prompt was made from, so that contrast branches can be made from it too.
enum PromptSource {
    Chat(Vec<Value>),
    Text(String),
    Tokens,
}

fn finish(
    c: Common,
    engine: Arc<Engine>,
    prompts: Vec<(Vec<u32>, PromptSource)>,
    interventions: &[Value],
    stream: bool,
    include_usage: Option<bool>,
) -> Result<ValidatedRequest, ApiError> {
    if include_usage.is_some() && !stream {
        return Err(ApiError::invalid(
            "stream_options",
            "is only allowed with `stream: true`",
        ));
    }
    let limits = &c.state.limits;
    let (sampling, stop, n) = sampling(c.state, c.model, c.sampling)?;
    let context = c.model.decoder.config().max_position_embeddings;
    let score_tokens = score_tokens(c.state, c.model, c.score_token_ids)?;
    let (parsed, other_models) = parse_interventions(c.state, c.model, interventions)?;
    for (i, intervention) in parsed.iter().enumerate() {
        let range = intervention.images();
        let name = intervention.name();
        let problem = match c.images.len() {
            n if range.contains(&n) => continue,
            0 => format!("`{name}` works on the request's image, and this request has none"),
            n => format!(
                "`{name}` takes at most {} image(s); this request has {n}",
                range.end()
            ),
        };
        return Err(ApiError::invalid(format!("interventions[{i}]"), problem));
    }
    if !c.images.is_empty() && !other_models.is_empty() {
        return Err(ApiError::invalid(
            "interventions",
            "Contrast with another model is not supported on requests with images",
        ));
    }
    let (raw_images, pixels): (Vec<Arc<RgbImage>>, Vec<Tensor>) = c.images.into_iter().unzip();
    let images = pixels.len();
    let mut choices = Vec::new();
    let mut prompt_tokens = 0;
    for (prompt, source) in prompts {
        if prompt.is_empty() {
            return Err(ApiError::invalid(c.prompt_param, "The prompt is empty"));
        }
        if prompt.len() >= context {
            return Err(ApiError::context_length(
                c.prompt_param,
                format!(
                    "This model's maximum context length is {context} tokens. However, your \
                     prompt has {} tokens, which leaves no room to generate.",
                    prompt.len()
                ),
            ));
        }
        let room = context - prompt.len();
        let max_tokens = match c.max_tokens {
            Some((m, field)) => {
                let m = bounded(field, m, 1, limits.max_tokens_cap as u64)? as usize;
                if m > room {
                    return Err(ApiError::context_length(
                        field,
                        format!(
                            "This model's maximum context length is {context} tokens. However, \
                             you requested {} tokens ({} in the prompt, {m} for the completion).",
                            prompt.len() + m,
                            prompt.len()
                        ),
                    ));
                }
                m
            }
            None => c
                .default_max_tokens
                .unwrap_or(usize::MAX)
                .min(limits.max_tokens_cap)
                .min(room),
        };
        prompt_tokens += prompt.len();
        let branches = branches(
            c.model,
            &parsed,
            &other_models,
            &source,
            &prompt,
            &pixels,
            max_tokens,
        )?;
        let variants = prompt_variants(c.model, &parsed, &source, &prompt, images, max_tokens)?;
        for i in 0..n {
            let mut sampling = sampling.clone();
            sampling.seed = sampling.seed.map(|s| s.wrapping_add(i as u64));
            choices.push(ChoiceSpec {
                prompt: prompt.clone(),
                images: pixels.clone(),
                raw_images: raw_images.clone(),
                variants: variants.clone(),
                params: GenerationParams {
                    max_tokens,
                    stop: stop.clone(),
                    sampling,
                    logprobs: c.logprobs,
                    score_tokens: score_tokens.clone(),
                },
                branches: branches.clone(),
            });
        }
    }
    if choices.len() > limits.max_batch_size {
        return Err(ApiError::invalid(
            "n",
            format!(
                "{} choices in total exceed the batch limit of {}",
                choices.len(),
                limits.max_batch_size
            ),
        ));
    }
    let resolved_interventions = parsed
        .iter()
        .map(|i| {
            let mut v = json!({"type": i.name()});
            if let (Some(obj), Value::Object(params)) = (v.as_object_mut(), i.resolved()) {
                obj.extend(params);
            }
            v
        })
        .collect();
    Ok(ValidatedRequest {
        engine,
        choices,
        interventions: Arc::new(parsed),
        resolved_interventions,
        stream,
        include_usage: include_usage.unwrap_or(false),
        logprobs: c.logprobs,
        prompt_tokens,
    })
}

/// `score_token_ids`: distinct ids in the vocabulary, at most the configured number.
fn score_tokens(state: &AppState, model: &Model, ids: &[u32]) -> Result<Vec<u32>, ApiError> {
    let limit = state.limits.max_score_tokens;
    if ids.len() > limit {
        return Err(ApiError::invalid(
            "score_token_ids",
            format!("At most {limit} token ids (got {})", ids.len()),
        ));
    }
    let vocab = model.decoder.config().vocab_size;
    if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::invalid(
            "score_token_ids",
            format!("Token id {bad} is not below the vocabulary size {vocab}"),
        ));
    }
    let mut distinct = ids.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.len() != ids.len() {
        return Err(ApiError::invalid(
            "score_token_ids",
            "Token ids must not repeat",
        ));
    }
    Ok(ids.to_vec())
}

/// `POST /tokenize`: the prompt's token ids (chat messages through the chat template).
pub fn tokenize(
    state: &AppState,
    req: TokenizeRequest,
) -> Result<(Arc<Engine>, Vec<u32>), ApiError> {
    let engine = state.engine(req.model.as_deref())?;
    let model = &engine.model;
    let tokens = match (&req.prompt, &req.messages) {
        (Some(prompt), None) => model
            .tokenizer
            .encode(prompt, req.add_special_tokens)
            .map_err(|e| ApiError::invalid("prompt", format!("{e:#}")))?,
        (None, Some(messages)) => {
            let (messages, images) = chat_messages(state, model, messages, req.model.as_deref())?;
            chat_tokens(model, &messages, images.len())
                .map_err(|e| ApiError::invalid("messages", e))?
        }
        _ => {
            return Err(ApiError::invalid(
                "prompt",
                "Give exactly one of `prompt` or `messages`",
            ))
        }
    };
    Ok((engine, tokens))
}

/// `POST /detokenize`: the text of token ids.
pub fn detokenize(state: &AppState, req: DetokenizeRequest) -> Result<String, ApiError> {
    let engine = state.engine(req.model.as_deref())?;
    let model = &engine.model;
    let vocab = model.decoder.config().vocab_size;
    if let Some(bad) = req.tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::invalid(
            "tokens",
            format!("Token id {bad} is not below the vocabulary size {vocab}"),
        ));
    }
    model
        .tokenizer
        .decode(&req.tokens, false)
        .map_err(|e| ApiError::invalid("tokens", format!("{e:#}")))
}

/// Other served models the interventions read, by id (checked once per request).
type OtherModels = Vec<(String, Arc<Model>)>;

fn parse_interventions(
    state: &AppState,
    model: &Model,
    specs: &[Value],
) -> Result<(Vec<Box<dyn Intervention>>, OtherModels), ApiError> {
    if specs.len() > state.limits.max_interventions {
        return Err(ApiError::invalid(
            "interventions",
            format!(
                "At most {} interventions per request",
                state.limits.max_interventions
            ),
        ));
    }
    let cfg = model.decoder.config();
    let kind = match model.vision {
        Some(_) => ModelKind::Vlm,
        None => ModelKind::Llm,
    };
    let shape = ModelShape::of(cfg, kind);
    let parsed = attune_interventions::parse_all(specs, &shape)
        .map_err(|e| ApiError::invalid(e.field.clone(), e.to_string()))?;
    let mut others = Vec::new();
    for (i, intervention) in parsed.iter().enumerate() {
        for id in intervention.other_models() {
            let other = other_model(state, model, &id, i)?;
            others.push((id, other));
        }
    }
    Ok((parsed, others))
}

/// Another served model an intervention reads (contrastive decoding's amateur): it must be
/// loaded and share `model`'s vocabulary.
fn other_model(
    state: &AppState,
    model: &Model,
    id: &str,
    index: usize,
) -> Result<Arc<Model>, ApiError> {
    let field = format!("interventions[{index}].amateur_model");
    let engine = state.engine(Some(id)).map_err(|e| match e.status {
        axum::http::StatusCode::NOT_FOUND => ApiError::invalid(
            &field,
            format!(
                "`{id}` is not a served model (served: {})",
                state.model_ids().join(", ")
            ),
        ),
        _ => e,
    })?;
    let other = engine.model.clone();
    if !std::ptr::eq(&*other, model) && !other.tokenizer.same_vocabulary(&model.tokenizer) {
        return Err(ApiError::invalid(
            &field,
            format!("`{id}` has a different tokenizer vocabulary than the request's model"),
        ));
    }
    Ok(other)
}

/// Sampling settings, stop strings and `n`.
fn sampling(
    state: &AppState,
    model: &Model,
    s: &SamplingFields,
) -> Result<(SamplingParams, Vec<String>, usize), ApiError> {
    let range =
        |field: &str, v: Option<f64>, lo: f64, hi: f64, default: f64| -> Result<f32, ApiError> {
            let v = v.unwrap_or(default);
            if !(lo..=hi).contains(&v) {
                return Err(ApiError::invalid(
                    field,
                    format!("must be between {lo} and {hi} (got {v})"),
                ));
            }
            Ok(v as f32)
        };
    let top_p = range("top_p", s.top_p, 0.0, 1.0, 1.0)?;
    if top_p == 0.0 {
        return Err(ApiError::invalid("top_p", "must be greater than 0"));
    }
    let repetition_penalty = range("repetition_penalty", s.repetition_penalty, 0.0, 10.0, 1.0)?;
    if repetition_penalty == 0.0 {
        return Err(ApiError::invalid(
            "repetition_penalty",
            "must be greater than 0",
        ));
    }
    let top_k = match s.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(ApiError::invalid(
                "top_k",
                format!("must be -1, 0 (off) or positive (got {k})"),
            ))
        }
    };
    let vocab = model.decoder.config().vocab_size;
    let mut logit_bias = Vec::new();
    for (token, bias) in s.logit_bias.iter().flatten() {
        let id: u32 = token
            .parse()
            .ok()
            .filter(|&id| (id as usize) < vocab)
            .ok_or_else(|| {
                ApiError::invalid(
                    "logit_bias",
                    format!("`{token}` is not a token id below {vocab}"),
                )
            })?;
        let bias = range("logit_bias", Some(*bias), -100.0, 100.0, 0.0)?;
        logit_bias.push((id, bias));
    }
    let params = SamplingParams {
        temperature: range("temperature", s.temperature, 0.0, 2.0, 1.0)?,
        top_p,
        top_k,
        min_p: range("min_p", s.min_p, 0.0, 1.0, 0.0)?,
        repetition_penalty,
        presence_penalty: range("presence_penalty", s.presence_penalty, -2.0, 2.0, 0.0)?,
        frequency_penalty: range("frequency_penalty", s.frequency_penalty, -2.0, 2.0, 0.0)?,
        seed: s.seed.map(|v| v as u64),
        logit_bias,
    };
    let stop = match &s.stop {
        None => Vec::new(),
        Some(StopSpec::One(one)) => vec![one.clone()],
        Some(StopSpec::Many(many)) => many.clone(),
    };
    if stop.len() > state.limits.max_stop_strings {
        return Err(ApiError::invalid(
            "stop",
            format!("At most {} stop strings", state.limits.max_stop_strings),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop", "Stop strings cannot be empty"));
    }
    let n = bounded("n", s.n.unwrap_or(1), 1, state.limits.max_n as u64)? as usize;
    Ok((params, stop, n))
}

fn bounded(field: &str, v: u64, lo: u64, hi: u64) -> Result<u64, ApiError> {
    if (lo..=hi).contains(&v) {
        Ok(v)
    } else {
        Err(ApiError::invalid(
            field,
            format!("must be between {lo} and {hi} (got {v})"),
        ))
    }
}

/// Messages as the chat template sees them, and the request's images as pixel values. Text
/// models get each message's text parts joined; vision-language models get content parts
/// (`{"type": "text", "text"}` and `{"type": "image"}`, as HF processors' templates expect).
fn chat_messages(
    state: &AppState,
    model: &Model,
    messages: &[ChatMessage],
    model_id: Option<&str>,
) -> Result<(Vec<Value>, Vec<RequestImage>), ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "At least one message is required",
        ));
    }
    let limits = &state.limits;
    let mut images = Vec::new();
    let mut rendered = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].role"),
                    format!(
                        "Unsupported role `{other}` (use system, developer, user or assistant)"
                    ),
                ))
            }
        };
        let parts: Vec<ContentPart> = match &m.content {
            None if role == "assistant" => Vec::new(),
            None => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].content"),
                    "is required",
                ))
            }
            Some(MessageContent::Text(t)) => vec![ContentPart::Text { text: t.clone() }],
            Some(MessageContent::Parts(parts)) => parts.clone(),
        };
        let mut texts = Vec::with_capacity(parts.len());
        let mut content = Vec::with_capacity(parts.len());
        for (j, part) in parts.iter().enumerate() {
            let field = format!("messages[{i}].content[{j}]");
            match part {
                ContentPart::Text { text } => {
                    texts.push(text.as_str());
                    content.push(json!({"type": "text", "text": text}));
                }
                ContentPart::ImageUrl { image_url } => {
                    let Some(vision) = &model.vision else {
                        return Err(ApiError::invalid(
                            field,
                            format!(
                                "The model `{}` is text-only and cannot take image inputs",
                                model_id.unwrap_or("default")
                            ),
                        ));
                    };
                    if images.len() == limits.max_images {
                        return Err(ApiError::invalid(
                            field,
                            format!("At most {} images per request", limits.max_images),
                        ));
                    }
                    images.push(images::load(image_url, &field, vision, limits)?);
                    content.push(json!({"type": "image"}));
                }
            }
        }
        let content = match model.vision {
            Some(_) => Value::Array(content),
            None => Value::String(texts.join("\n")),
        };
        rendered.push(json!({"role": role, "content": content}));
    }
    Ok((rendered, images))
}

fn completion_prompts(
    model: &Model,
    prompt: Option<&PromptSpec>,
) -> Result<Vec<(Vec<u32>, PromptSource)>, ApiError> {
    let encode = |text: &str| {
        model
            .completion_prompt(text)
            .map_err(|e| ApiError::invalid("prompt", format!("{e:#}")))
    };
    let vocab = model.decoder.config().vocab_size;
    let check_ids = |ids: &Vec<u32>| match ids.iter().find(|&&t| t as usize >= vocab) {
        Some(bad) => Err(ApiError::invalid(
            "prompt",
            format!("Token id {bad} is not below the vocabulary size {vocab}"),
        )),
        None => Ok(ids.clone()),
    };
    let prompts = match prompt {
        None => return Err(ApiError::invalid("prompt", "is required")),
        Some(PromptSpec::Text(t)) => vec![(encode(t)?, PromptSource::Text(t.clone()))],
        Some(PromptSpec::Texts(ts)) => ts
            .iter()
            .map(|t| Ok((encode(t)?, PromptSource::Text(t.clone()))))
            .collect::<Result<_, ApiError>>()?,
        Some(PromptSpec::Tokens(ids)) => vec![(check_ids(ids)?, PromptSource::Tokens)],
        Some(PromptSpec::TokenLists(lists)) => lists
            .iter()
            .map(|ids| Ok((check_ids(ids)?, PromptSource::Tokens)))
            .collect::<Result<_, ApiError>>()?,
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid("prompt", "The prompt list is empty"));
    }
    Ok(prompts)
}

/// The interventions' contrast branches for one request prompt: their token prompts and the
/// models they run on.
fn branches(
    model: &Model,
    interventions: &[Box<dyn Intervention>],
    other_models: &OtherModels,
    source: &PromptSource,
    prompt: &[u32],
    images: &[Tensor],
    max_tokens: usize,
) -> Result<Vec<BranchSpec>, ApiError> {
    let mut out = Vec::new();
    for (i, intervention) in interventions.iter().enumerate() {
        let param = format!("interventions[{i}]");
        for branch in intervention.branches() {
            let tokens = branch_tokens(model, source, prompt, images.len(), &branch.prompt)
                .map_err(|e| ApiError::invalid(&param, e))?;
            // A branch shows the images its prompt has room for (noised for VCD).
            let branch_images = match (&model.vision, branch.image_noise) {
                (Some(vision), _) if vision.count_images(&tokens) == 0 => Vec::new(),
                (_, Some(noise)) => images
                    .iter()
                    .map(|p| noise.apply(p))
                    .collect::<candle_core::Result<_>>()
                    .map_err(|e| ApiError::internal(format!("image noise failed: {e}")))?,
                _ => images.to_vec(),
            };
            if tokens.is_empty() {
                return Err(ApiError::invalid(&param, "The contrast prompt is empty"));
            }
            let runs_on = match &branch.model {
                None => None,
                Some(id) => Some(
                    other_models
                        .iter()
                        .find(|(known, _)| known == id)
                        .map(|(_, m)| m.clone())
                        .ok_or_else(|| {
                            ApiError::internal(format!(
                                "interventions[{i}] runs a branch on `{id}` without naming it \
                                 among its other models"
                            ))
                        })?,
                ),
            };
            let context = runs_on
                .as_deref()
                .unwrap_or(model)
                .decoder
                .config()
                .max_position_embeddings;
            if tokens.len() + max_tokens > context {
                return Err(ApiError::context_length(
                    &param,
                    format!(
                        "The contrast branch's prompt has {} tokens; with {max_tokens} to \
                         generate it exceeds its model's context of {context}",
                        tokens.len()
                    ),
                ));
            }
            out.push(BranchSpec {
                prompt: tokens,
                model: runs_on,
                images: branch_images,
            });
        }
    }
    Ok(out)
}

/// Each intervention's prompt variants (CARVE's runs), rendered to tokens; checked against the
/// context like the prompt.
fn prompt_variants(
    model: &Model,
    interventions: &[Box<dyn Intervention>],
    source: &PromptSource,
    prompt: &[u32],
    images: usize,
    max_tokens: usize,
) -> Result<Vec<Vec<Vec<u32>>>, ApiError> {
    let context = model.decoder.config().max_position_embeddings;
    interventions
        .iter()
        .enumerate()
        .map(|(i, intervention)| {
            let param = format!("interventions[{i}]");
            intervention
                .prompt_variants()
                .iter()
                .map(|variant| {
                    let tokens = match (variant.repeat_images, source) {
                        (true, PromptSource::Chat(messages)) => {
                            let doubled = with_images_repeated(messages);
                            branch_tokens(
                                model,
                                &PromptSource::Chat(doubled),
                                prompt,
                                2 * images,
                                &variant.prompt,
                            )
                        }
                        _ => branch_tokens(model, source, prompt, images, &variant.prompt),
                    }
                    .map_err(|e| ApiError::invalid(&param, e))?;
                    if tokens.len() + max_tokens > context {
                        return Err(ApiError::context_length(
                            &param,
                            format!(
                                "The method's prompt has {} tokens; with {max_tokens} to \
                                 generate it exceeds the model's context of {context}",
                                tokens.len()
                            ),
                        ));
                    }
                    Ok(tokens)
                })
                .collect()
        })
        .collect()
}

/// Chat messages with every image part shown twice in a row.
fn with_images_repeated(messages: &[Value]) -> Vec<Value> {
    messages
        .iter()
        .map(|m| {
            let mut m = m.clone();
            if let Value::Array(parts) = &mut m["content"] {
                *parts = parts
                    .iter()
                    .flat_map(|p| {
                        let copies = if p["type"] == "image" { 2 } else { 1 };
                        std::iter::repeat_n(p.clone(), copies)
                    })
                    .collect();
            }
            m
        })
        .collect()
}

/// A branch's prompt tokens, derived from the request's prompt.
fn branch_tokens(
    model: &Model,
    source: &PromptSource,
    prompt: &[u32],
    images: usize,
    branch: &BranchPrompt,
) -> Result<Vec<u32>, String> {
    let rendered = match (branch, source) {
        (BranchPrompt::Same, _) => return Ok(prompt.to_vec()),
        (BranchPrompt::LastToken, _) => return Ok(prompt[prompt.len() - 1..].to_vec()),
        (BranchPrompt::Replace(text), PromptSource::Chat(messages)) => {
            return with_last_user(model, messages, images, |_| text.clone())
        }
        (BranchPrompt::Prefix(prefix), PromptSource::Chat(messages)) => {
            return with_last_user(model, messages, images, |content| {
                format!("{prefix}{content}")
            })
        }
        (BranchPrompt::Suffix(suffix), PromptSource::Chat(messages)) => {
            return with_last_user(model, messages, images, |content| {
                format!("{content}{suffix}")
            })
        }
        (BranchPrompt::Suffix(suffix), PromptSource::Text(text)) => {
            model.completion_prompt(&format!("{text}{suffix}"))
        }
        (BranchPrompt::Suffix(suffix), PromptSource::Tokens) => {
            model.tokenizer.encode(suffix, false).map(|ids| {
                let mut all = prompt.to_vec();
                all.extend(ids);
                all
            })
        }
        (BranchPrompt::Replace(text), PromptSource::Text(_) | PromptSource::Tokens) => {
            model.completion_prompt(text)
        }
        (BranchPrompt::Prefix(prefix), PromptSource::Text(text)) => {
            model.completion_prompt(&format!("{prefix}{text}"))
        }
        (BranchPrompt::Prefix(prefix), PromptSource::Tokens) => {
            model.tokenizer.encode(prefix, true).map(|mut ids| {
                ids.extend_from_slice(prompt);
                ids
            })
        }
    };
    rendered.map_err(|e| format!("{e:#}"))
}

/// The chat prompt with the last user message's text rewritten (its images stay).
fn with_last_user(
    model: &Model,
    messages: &[Value],
    images: usize,
    rewrite: impl FnOnce(&str) -> String,
) -> Result<Vec<u32>, String> {
    let mut messages = messages.to_vec();
    let last_user = messages
        .iter_mut()
        .rev()
        .find(|m| m["role"] == "user")
        .ok_or("A contrast prompt needs a user message to change")?;
    match &mut last_user["content"] {
        Value::Array(parts) => {
            let text: Vec<&str> = parts.iter().filter_map(|p| p["text"].as_str()).collect();
            let rewritten = rewrite(&text.join("\n"));
            parts.retain(|p| p["type"] != "text");
            parts.push(json!({"type": "text", "text": rewritten}));
        }
        content => *content = Value::String(rewrite(content.as_str().unwrap_or_default())),
    }
    chat_tokens(model, &messages, images)
}

/// Token ids of chat messages; on a VLM each image's token is repeated once per embedding row
/// of the image, after checking that the template placed one per image.
fn chat_tokens(model: &Model, messages: &[Value], images: usize) -> Result<Vec<u32>, String> {
    let tokens = model.chat_prompt(messages).map_err(|e| format!("{e:#}"))?;
    let Some(vision) = &model.vision else {
        return Ok(tokens);
    };
    let placed = vision.count_images(&tokens);
    if placed != images {
        return Err(format!(
            "The chat template placed {placed} image tokens for {images} images"
        ));
    }
    Ok(vision.expand_image_tokens(&tokens))
}
