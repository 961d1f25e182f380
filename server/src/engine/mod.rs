//! The engine: one scheduler thread per model running continuous batching.
//!
//! Requests join the running batch at step boundaries (as long as the batch has room) and leave
//! it when they finish or their client goes away. Each sequence carries its own sampling
//! settings and intervention hooks, so requests with different interventions share one decoder
//! step. Compute runs on this dedicated thread, never on the async runtime.

mod prefix_cache;
mod sample;
mod step;
mod timed_hooks;

use crate::metrics::Metrics;
use crate::sequence::{GenerationParams, Sequence, StepOutput};
use attune_interventions::{Intervention, LogitsProcessor, PromptView, VisionRequest};
use attune_models::vision::RgbImage;
use attune_models::{HookStack, KvCache, Model, SequenceHooks};
use candle_core::{Result as CandleResult, Tensor, TensorId};
use prefix_cache::PrefixCache;
use sample::choose_all;
use serde_json::Value;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;
use step::{apply_processors, forward};
use tokio::sync::mpsc::UnboundedSender;

/// One choice of a request: its prompt and settings (`n` > 1 or a list of prompts gives several).
pub struct ChoiceSpec {
    pub prompt: Vec<u32>,
    /// The prompt's images as pixel values, in order (VLMs).
    pub images: Vec<Tensor>,
    /// The same images as decoded (for methods that edit them: CARVE).
    pub raw_images: Vec<Arc<RgbImage>>,
    /// Per intervention, its prompt variants as tokens.
    pub variants: Vec<Vec<Vec<u32>>>,
    pub params: GenerationParams,
    /// The interventions' contrast branches, in intervention order.
    pub branches: Vec<BranchSpec>,
}

/// A contrast branch ready to run: its prompt tokens and the model it runs on.
#[derive(Clone)]
pub struct BranchSpec {
    pub prompt: Vec<u32>,
    /// Another served model (contrastive decoding's amateur); `None`: the request's model.
    pub model: Option<Arc<Model>>,
    /// The images of its prompt as pixel values (VCD's are noised).
    pub images: Vec<Tensor>,
}

pub struct GenerationRequest {
    pub choices: Vec<ChoiceSpec>,
    pub interventions: Arc<Vec<Box<dyn Intervention>>>,
    pub events: UnboundedSender<EngineEvent>,
    pub arrived: Instant,
}

#[derive(Debug)]
pub enum EngineEvent {
    Step { choice: usize, output: StepOutput },
    Failed { message: String },
}

#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    pub max_batch_size: usize,
    pub max_queue: usize,
    /// KV bytes of prefilled prompts kept for reuse (the `prefix_cache` module); 0: none.
    pub prefix_cache_bytes: usize,
    /// Most prompt tokens a sequence feeds per step; longer prompts are prefilled over several
    /// steps (bounding the attention's chunk x context score matrices).
    pub prefill_chunk_tokens: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("the request queue is full")]
    QueueFull,
    #[error("the engine has stopped")]
    Stopped,
}

/// Handle to a model's scheduler.
pub struct Engine {
    pub model_id: String,
    pub model: Arc<Model>,
    submit: mpsc::Sender<GenerationRequest>,
    queued: Arc<AtomicUsize>,
    config: EngineConfig,
    metrics: Arc<Metrics>,
}

impl Engine {
    pub fn start(
        model_id: String,
        model: Arc<Model>,
        config: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Arc<Self>> {
        let (submit, requests) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let scheduler = Scheduler {
            model_id: model_id.clone(),
            model: model.clone(),
            requests,
            queued: queued.clone(),
            config,
            metrics: metrics.clone(),
            running: Vec::new(),
            waiting: None,
            prefix_cache: PrefixCache::new(config.prefix_cache_bytes),
        };
        std::thread::Builder::new()
            .name(format!("attune-engine-{model_id}"))
            .spawn(move || scheduler.run())?;
        Ok(Arc::new(Self {
            model_id,
            model,
            submit,
            queued,
            config,
            metrics,
        }))
    }

    /// Queues a request; its events arrive on `request.events`.
    pub fn submit(&self, request: GenerationRequest) -> Result<(), SubmitError> {
        if self.queued.fetch_add(1, Ordering::SeqCst) >= self.config.max_queue {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull);
        }
        for i in request.interventions.iter() {
            self.metrics
                .intervention_requests
                .with_label_values(&[i.name()])
                .inc();
        }
        self.submit.send(request).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            SubmitError::Stopped
        })?;
        self.metrics
            .queue_depth
            .with_label_values(&[&self.model_id])
            .set(self.queued.load(Ordering::SeqCst) as i64);
        Ok(())
    }
}

/// A contrast branch: another sequence that receives every token its main sequence generates,
/// run in the same step (in the same batch when it runs on the same model).
struct Branch {
    prompt: Vec<u32>,
    /// Input embeddings of a prompt with images.
    embeddings: Option<Tensor>,
    model: Option<Arc<Model>>,
    cache: KvCache,
}

/// Image features already computed for a request, by the pixel tensors they came from.
#[derive(Default)]
struct ImageFeatures(Vec<(Vec<TensorId>, Tensor)>);

/// A sequence in the running batch.
struct Running {
    choice: usize,
    seq: Sequence,
    /// Input embeddings of a prompt with images (image features merged in).
    prompt_embeddings: Option<Tensor>,
    hooks: Option<HookStack>,
    branches: Vec<Branch>,
    /// Steps the prompts (the sequence's and its branches') are prefilled over, and how many
    /// of them are done.
    prefill_pieces: usize,
    prefilled_pieces: usize,
    /// Leading prompt tokens whose keys and values came from the prefix cache (not fed).
    reused_prompt: usize,
    /// Whether the prompt's cache goes into the prefix cache once prefilled (no hooks, no
    /// images, no branches).
    shares_prefix: bool,
    /// Logits rewriters (contrastive decoding) with the range of `branches` each one reads,
    /// applied in request order before sampling.
    processors: Vec<(Box<dyn LogitsProcessor>, std::ops::Range<usize>)>,
    hook_time: Vec<(&'static str, Arc<AtomicU64>)>,
    /// What the interventions chose for this sequence, sent with its first token.
    report: Option<Value>,
    /// The length of the prompt an intervention put in place of the request's, sent likewise.
    replaced_prompt: Option<usize>,
    events: UnboundedSender<EngineEvent>,
    arrived: Instant,
    last_token: Option<Instant>,
}

struct Scheduler {
    model_id: String,
    model: Arc<Model>,
    requests: mpsc::Receiver<GenerationRequest>,
    queued: Arc<AtomicUsize>,
    config: EngineConfig,
    metrics: Arc<Metrics>,
    running: Vec<Running>,
    /// A request that did not fit into the batch yet; it goes first next time.
    waiting: Option<GenerationRequest>,
    prefix_cache: PrefixCache,
}

impl Scheduler {
    fn run(mut self) {
        loop {
            if self.running.is_empty() && self.waiting.is_none() {
                match self.requests.recv() {
                    Ok(r) => self.waiting = Some(r),
                    Err(_) => return, // every handle is gone: shut down
                }
            }
            self.admit();
            // A closed channel means the client went away: free its slot now.
            self.running.retain(|r| !r.events.is_closed());
            self.update_gauges();
            if !self.running.is_empty() {
                self.step();
            }
        }
    }

    fn admit(&mut self) {
        loop {
            let request = match self.waiting.take() {
                Some(r) => r,
                None => match self.requests.try_recv() {
                    Ok(r) => r,
                    Err(_) => return,
                },
            };
            if request.events.is_closed() {
                self.queued.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
            let fits = self.running.len() + request.choices.len() <= self.config.max_batch_size;
            if !fits && !self.running.is_empty() {
                self.waiting = Some(request);
                return;
            }
            self.queued.fetch_sub(1, Ordering::SeqCst);
            self.start_request(request);
        }
    }

    fn start_request(&mut self, mut request: GenerationRequest) {
        let choices = std::mem::take(&mut request.choices);
        // The choices of a request (and their branches) share image tensors: encode each set once.
        let mut encoded = ImageFeatures::default();
        for (choice, spec) in choices.into_iter().enumerate() {
            self.metrics
                .prompt_tokens
                .with_label_values(&[&self.model_id])
                .inc_by(spec.prompt.len() as u64);
            match self.start_choice(choice, spec, &request, &mut encoded) {
                Ok(running) => self.running.push(running),
                Err(e) => {
                    let message = format!("installing the interventions failed: {e}");
                    tracing::error!(model = %self.model_id, "{message}");
                    let _ = request.events.send(EngineEvent::Failed { message });
                }
            }
        }
    }

    /// Installs the interventions on one choice (running any extra passes they need first).
    fn start_choice(
        &mut self,
        choice: usize,
        mut spec: ChoiceSpec,
        request: &GenerationRequest,
        encoded: &mut ImageFeatures,
    ) -> CandleResult<Running> {
        let decoder = &self.model.decoder;
        let mut prompt_embeddings = self.prompt_embeddings(&spec.prompt, &spec.images, encoded)?;
        let image_spans = match &self.model.vision {
            Some(vision) if !spec.images.is_empty() => vision.image_spans(&spec.prompt),
            _ => Vec::new(),
        };
        let stop_ids = self.model.tokenizer.stop_ids();
        let mut hook_time = Vec::new();
        let mut hooks = Vec::new();
        let mut processors = Vec::new();
        let mut reports = serde_json::Map::new();
        let mut first_branch = 0;
        let mut new_prompt = None;
        for (index, intervention) in request.interventions.iter().enumerate() {
            let prompt = PromptView {
                tokens: &spec.prompt,
                embeddings: prompt_embeddings.as_ref(),
                image_spans: &image_spans,
                request: self.model.vision.as_ref().map(|vision| VisionRequest {
                    vision,
                    images: &spec.raw_images,
                    variants: spec.variants.get(index).map_or(&[], Vec::as_slice),
                    stop_ids,
                }),
            };
            let mut installed = intervention.install_for(decoder, &prompt)?;
            new_prompt = installed.prompt.take().or(new_prompt);
            if let Some(inner) = installed.hooks {
                let spent = Arc::new(AtomicU64::new(0));
                hook_time.push((intervention.name(), spent.clone()));
                hooks.push(Box::new(timed_hooks::TimedHooks {
                    inner,
                    spent_nanos: spent,
                }) as Box<dyn SequenceHooks>);
            }
            let branch_count = intervention.branches().len();
            if let Some(p) = installed.processor {
                processors.push((p, first_branch..first_branch + branch_count));
            }
            if let Some(report) = installed.report {
                reports.insert(intervention.name().to_string(), report);
            }
            first_branch += branch_count;
        }
        let replaced_prompt = new_prompt.map(|replacement| {
            spec.prompt = replacement.tokens;
            prompt_embeddings = Some(replacement.embeddings);
            spec.prompt.len()
        });
        let shares_prefix =
            hooks.is_empty() && prompt_embeddings.is_none() && spec.branches.is_empty();
        let kept = if shares_prefix {
            self.prefix_cache.lookup(&spec.prompt)?
        } else {
            None
        };
        let (cache, reused_prompt) = kept.unwrap_or_else(|| (decoder.new_cache(), 0));
        if reused_prompt > 0 {
            self.metrics
                .prompt_cached_tokens
                .with_label_values(&[&self.model_id])
                .inc_by(reused_prompt as u64);
        }
        let longest = spec
            .branches
            .iter()
            .map(|b| b.prompt.len())
            .chain([spec.prompt.len() - reused_prompt])
            .max()
            .unwrap_or(1);
        let prefill_pieces = longest.div_ceil(self.config.prefill_chunk_tokens.max(1));
        let branches = spec
            .branches
            .into_iter()
            .map(|b| {
                Ok(Branch {
                    cache: b.model.as_ref().map_or(decoder, |m| &m.decoder).new_cache(),
                    embeddings: self.prompt_embeddings(&b.prompt, &b.images, encoded)?,
                    prompt: b.prompt,
                    model: b.model,
                })
            })
            .collect::<CandleResult<_>>()?;
        let seq = Sequence::new(
            spec.prompt,
            spec.params,
            cache,
            self.model.tokenizer.stop_ids().clone(),
            decoder.config().max_position_embeddings,
        );
        Ok(Running {
            choice,
            seq,
            prompt_embeddings,
            hooks: (!hooks.is_empty()).then(|| HookStack(hooks)),
            branches,
            prefill_pieces,
            prefilled_pieces: 0,
            reused_prompt,
            shares_prefix,
            processors,
            hook_time,
            report: (!reports.is_empty()).then_some(Value::Object(reports)),
            replaced_prompt,
            events: request.events.clone(),
            arrived: request.arrived,
            last_token: None,
        })
    }

    /// Input embeddings of a prompt with images: the vision tower's features in the image
    /// tokens' rows. `None` for a text prompt.
    fn prompt_embeddings(
        &self,
        prompt: &[u32],
        images: &[Tensor],
        encoded: &mut ImageFeatures,
    ) -> CandleResult<Option<Tensor>> {
        let Some(vision) = self.model.vision.as_ref().filter(|_| !images.is_empty()) else {
            return Ok(None);
        };
        let decoder = &self.model.decoder;
        let ids: Vec<TensorId> = images.iter().map(Tensor::id).collect();
        let features = match encoded.0.iter().find(|(known, _)| *known == ids) {
            Some((_, features)) => features.clone(),
            None => {
                let start = Instant::now();
                let features = vision.encode(images, decoder.device())?;
                self.metrics
                    .image_encode_duration
                    .observe(start.elapsed().as_secs_f64());
                encoded.0.push((ids, features.clone()));
                features
            }
        };
        vision.merge(decoder, prompt, &features).map(Some)
    }

    /// One decoder step for the whole batch, then sampling and events per sequence.
    fn step(&mut self) {
        let start = Instant::now();
        let batch = self.running.len();
        let sequences = batch + self.running.iter().map(|r| r.branches.len()).sum::<usize>();
        let result = forward(&self.model, &mut self.running);
        self.metrics
            .step_duration
            .observe(start.elapsed().as_secs_f64());
        self.metrics
            .batch_size
            .with_label_values(&[&self.model_id])
            .observe(sequences as f64);
        let logits = match result {
            Ok(logits) => logits.into_iter().map(Ok).collect::<Vec<_>>(),
            // The caches only advance after a whole step succeeds, so each sequence can be
            // retried alone: only the one that fails by itself is dropped.
            Err(e) if batch > 1 => {
                tracing::warn!(model = %self.model_id, "batched step failed ({e}); retrying one by one");
                self.running
                    .iter_mut()
                    .map(|r| forward(&self.model, std::slice::from_mut(r)).map(|mut l| l.remove(0)))
                    .collect()
            }
            Err(e) => vec![Err(e)],
        };
        let now = Instant::now();
        let mut still_running = Vec::with_capacity(batch);
        // Each sequence with logits: the row its sampler reads, or why it failed.
        let mut sampled = Vec::with_capacity(batch);
        for (mut r, logits) in std::mem::take(&mut self.running).into_iter().zip(logits) {
            let row = match logits {
                // Still prefilling a long prompt: nothing to sample yet.
                Ok(None) => {
                    still_running.push(r);
                    continue;
                }
                Ok(Some(logits)) => {
                    // The prompt just finished prefilling: keep its cache for later prompts.
                    if r.shares_prefix && r.seq.generated().is_empty() {
                        if let Err(e) = self.prefix_cache.insert(r.seq.prompt(), r.seq.cache()) {
                            tracing::warn!(model = %self.model_id, "keeping a prompt's cache failed: {e}");
                        }
                    }
                    apply_processors(&self.model, &mut r, logits).map_err(|e| e.to_string())
                }
                Err(e) => Err(e.to_string()),
            };
            sampled.push((r, row));
        }
        let choices = choose_all(&mut sampled);
        for ((mut r, _), choice) in sampled.into_iter().zip(choices) {
            let mut output = choice.and_then(|choice| {
                r.seq
                    .accept(choice, &self.model.tokenizer)
                    .map_err(|e| e.to_string())
            });
            if let Ok(output) = &mut output {
                output.intervention_report = r.report.take();
                output.prompt_tokens = r.replaced_prompt.take();
            }
            match output {
                Ok(output) => {
                    match r.last_token {
                        None => self
                            .metrics
                            .time_to_first_token
                            .with_label_values(&[&self.model_id])
                            .observe(now.duration_since(r.arrived).as_secs_f64()),
                        Some(t) => self
                            .metrics
                            .inter_token_latency
                            .with_label_values(&[&self.model_id])
                            .observe(now.duration_since(t).as_secs_f64()),
                    }
                    r.last_token = Some(now);
                    self.metrics
                        .generated_tokens
                        .with_label_values(&[&self.model_id])
                        .inc();
                    let finished = output.finished.is_some();
                    if finished {
                        // Before the last event, so a client that got its answer sees it counted.
                        self.record_hook_time(&r);
                    }
                    let _ = r.events.send(EngineEvent::Step {
                        choice: r.choice,
                        output,
                    });
                    if !finished {
                        still_running.push(r);
                    }
                }
                Err(message) => {
                    tracing::error!(model = %self.model_id, "sequence failed: {message}");
                    let _ = r.events.send(EngineEvent::Failed { message });
                }
            }
        }
        self.running = still_running;
    }

    fn record_hook_time(&self, r: &Running) {
        for (name, nanos) in &r.hook_time {
            self.metrics
                .intervention_hook_seconds
                .with_label_values(&[self.model_id.as_str(), name])
                .inc_by(nanos.load(Ordering::Relaxed) as f64 / 1e9);
        }
    }

    fn update_gauges(&self) {
        let id = &[self.model_id.as_str()];
        self.metrics
            .queue_depth
            .with_label_values(id)
            .set(self.queued.load(Ordering::SeqCst) as i64);
        self.metrics
            .running_sequences
            .with_label_values(id)
            .set(self.running.len() as i64);
        let kv: usize = self
            .running
            .iter()
            .map(|r| {
                r.seq.cache_bytes() + r.branches.iter().map(|b| b.cache.bytes()).sum::<usize>()
            })
            .sum();
        self.metrics
            .kv_cache_bytes
            .with_label_values(id)
            .set(kv as i64);
        self.metrics
            .prefix_cache_bytes
            .with_label_values(id)
            .set(self.prefix_cache.bytes() as i64);
    }
}
