//! Prometheus metrics, all prefixed `attune_`, with bounded label sets (endpoint names, status
//! codes, configured model ids and intervention method names).

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub time_to_first_token: HistogramVec,
    pub inter_token_latency: HistogramVec,
    pub prompt_tokens: IntCounterVec,
    pub prompt_cached_tokens: IntCounterVec,
    pub generated_tokens: IntCounterVec,
    pub queue_depth: IntGaugeVec,
    pub running_sequences: IntGaugeVec,
    pub batch_size: HistogramVec,
    pub kv_cache_bytes: IntGaugeVec,
    pub prefix_cache_bytes: IntGaugeVec,
    pub intervention_requests: IntCounterVec,
    pub intervention_hook_seconds: prometheus::CounterVec,
    pub step_duration: Histogram,
    pub image_encode_duration: Histogram,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
                .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let latency = || LATENCY_BUCKETS.to_vec();
        let hook_seconds = prometheus::CounterVec::new(
            Opts::new(
                "attune_intervention_hook_seconds_total",
                "Time spent inside intervention hooks, by method.",
            ),
            &["model", "intervention"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(hook_seconds.clone()))
            .expect("unique metric");
        let step_duration = Histogram::with_opts(
            HistogramOpts::new(
                "attune_engine_step_seconds",
                "Duration of one batched decoder step.",
            )
            .buckets(latency()),
        )
        .expect("valid metric");
        registry
            .register(Box::new(step_duration.clone()))
            .expect("unique metric");
        let image_encode_duration = Histogram::with_opts(
            HistogramOpts::new(
                "attune_image_encode_seconds",
                "Time the vision tower and projector take for one sequence's images.",
            )
            .buckets(latency()),
        )
        .expect("valid metric");
        registry
            .register(Box::new(image_encode_duration.clone()))
            .expect("unique metric");
        Self {
            requests: counter(
                "attune_requests_total",
                "HTTP requests by endpoint and status code.",
                &["endpoint", "status"],
            ),
            request_duration: histogram(
                "attune_request_duration_seconds",
                "HTTP request duration, by endpoint.",
                &["endpoint"],
                latency(),
            ),
            time_to_first_token: histogram(
                "attune_time_to_first_token_seconds",
                "Time from a request's arrival to its first generated token.",
                &["model"],
                latency(),
            ),
            inter_token_latency: histogram(
                "attune_inter_token_latency_seconds",
                "Time between consecutive generated tokens of one sequence.",
                &["model"],
                latency(),
            ),
            prompt_tokens: counter(
                "attune_prompt_tokens_total",
                "Prompt tokens processed.",
                &["model"],
            ),
            prompt_cached_tokens: counter(
                "attune_prompt_cached_tokens_total",
                "Prompt tokens whose keys and values were copied from the prefix cache.",
                &["model"],
            ),
            generated_tokens: counter(
                "attune_generated_tokens_total",
                "Tokens generated.",
                &["model"],
            ),
            queue_depth: gauge(
                "attune_queue_depth",
                "Requests waiting for a batch slot.",
                &["model"],
            ),
            running_sequences: gauge(
                "attune_running_sequences",
                "Sequences in the running batch.",
                &["model"],
            ),
            batch_size: histogram(
                "attune_batch_size",
                "Sequences per decoder step.",
                &["model"],
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0],
            ),
            kv_cache_bytes: gauge(
                "attune_kv_cache_bytes",
                "Bytes held by the KV caches of running sequences.",
                &["model"],
            ),
            prefix_cache_bytes: gauge(
                "attune_prefix_cache_bytes",
                "Bytes held by the prefix cache's kept prompt caches.",
                &["model"],
            ),
            intervention_requests: counter(
                "attune_intervention_requests_total",
                "Requests that switched an intervention on, by method.",
                &["intervention"],
            ),
            intervention_hook_seconds: hook_seconds,
            step_duration,
            image_encode_duration,
            registry,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("metrics are UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
