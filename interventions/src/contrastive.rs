//! Contrastive decoding (spec §4), one intervention with a `mode`:
//! - `dola` (Chuang et al., ICLR 2024): the final layer against a premature layer of the same
//!   pass, chosen per step by Jensen-Shannon divergence; score = log p_final - lambda * log
//!   p_premature on the plausible tokens (p_final >= alpha * max p_final), -inf elsewhere; then
//!   the repetition penalty on those scores, as HF's `_dola_decoding` orders it.
//! - `prompt`: the same model on a contrasting prompt, run as a branch sequence beside the main
//!   one (CD's same-model amateur with a prefix, or LQCD's leading query), combined by the
//!   spec's unified step (extrapolate or difference, logits or log-probability space).
//!
//! `amateur` (a second model) and `image_noise` (VCD, needs a VLM) are not implemented yet.

use crate::params::{check_indices, check_range, from_value, InterventionError};
use crate::{BranchPrompt, Installed, Intervention, LogitsProcessor, ModelShape};
use attune_models::{Decoder, HookPoint, RowSite, SequenceHooks};
use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::{Arc, Mutex};

/// Parses any `contrastive_decoding` request by its `mode`.
pub fn from_request(
    params: Value,
    shape: &ModelShape,
) -> std::result::Result<Box<dyn Intervention>, InterventionError> {
    let mode = params
        .get("mode")
        .and_then(Value::as_str)
        .map(str::to_string);
    match mode.as_deref() {
        Some("dola") => Ok(Box::new(Dola::from_request(params, shape)?)),
        Some("prompt") => Ok(Box::new(PromptContrast::from_request(params)?)),
        Some(m @ ("amateur" | "image_noise")) => Err(InterventionError::new(
            "mode",
            format!(
                "contrastive decoding mode `{m}` is not implemented yet (available: dola, prompt)"
            ),
        )),
        Some(other) => Err(InterventionError::new(
            "mode",
            format!("unknown mode `{other}` (dola, prompt, amateur, image_noise)"),
        )),
        None => Err(InterventionError::new(
            "mode",
            "is required: dola, prompt, amateur or image_noise",
        )),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    mode: String,
    #[serde(default)]
    layers: Option<LayerChoice>,
    #[serde(default = "default_alpha")]
    alpha: f64,
    #[serde(default = "default_lambda")]
    lambda: f64,
    #[serde(default = "default_repetition_penalty")]
    repetition_penalty: f64,
    #[serde(default)]
    premature_final_norm: bool,
}

fn default_alpha() -> f64 {
    0.1
}

fn default_lambda() -> f64 {
    1.0
}

fn default_repetition_penalty() -> f64 {
    1.2
}

/// `"low"`, `"high"`, or explicit premature layers (hidden state after that many layers).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum LayerChoice {
    Bucket(String),
    List(Vec<usize>),
}

#[derive(Debug, Clone, Serialize)]
pub struct Dola {
    pub mode: &'static str,
    /// Candidate premature layers: depth l means the residual stream after l layers (0 = the
    /// embeddings).
    pub layers: Vec<usize>,
    pub alpha: f64,
    pub lambda: f64,
    pub repetition_penalty: f64,
    pub premature_final_norm: bool,
}

/// HF's candidate buckets: start at 2 when embeddings are tied (layer 0's logits would be
/// trivial), step 2, split at N/2 (or the first/last 20 layers when N > 40).
pub fn dola_bucket(bucket: &str, num_layers: usize, tied_embeddings: bool) -> Option<Vec<usize>> {
    let n = num_layers;
    let start = if tied_embeddings && n > 2 { 2 } else { 0 };
    let (low, high) = if n <= 40 {
        ((start..n / 2), (n / 2..n))
    } else {
        ((start..20), (n - 20..n))
    };
    match bucket {
        "low" => Some(low.step_by(2).collect()),
        "high" => Some(high.step_by(2).collect()),
        _ => None,
    }
}

impl Dola {
    pub fn from_request(
        params: Value,
        shape: &ModelShape,
    ) -> std::result::Result<Self, InterventionError> {
        let req: Request = from_value(params)?;
        if req.mode != "dola" {
            return Err(InterventionError::new("mode", "expected `dola`"));
        }
        let n = shape.num_layers;
        let layers = match req.layers.unwrap_or(LayerChoice::Bucket("high".into())) {
            LayerChoice::Bucket(b) => {
                dola_bucket(&b, n, shape.tied_embeddings).ok_or_else(|| {
                    InterventionError::new(
                        "layers",
                        format!("`{b}` is not \"low\", \"high\" or a list of layers"),
                    )
                })?
            }
            LayerChoice::List(list) => {
                check_indices("layers", &list, n, "premature layer")?;
                list
            }
        };
        if layers.is_empty() {
            return Err(InterventionError::new(
                "layers",
                "no candidate layer (the model is too shallow)",
            ));
        }
        check_range("alpha", req.alpha, 0.0, 1.0, false)?;
        check_range("lambda", req.lambda, 0.0, 100.0, false)?;
        check_range(
            "repetition_penalty",
            req.repetition_penalty,
            0.0,
            10.0,
            true,
        )?;
        Ok(Self {
            mode: "dola",
            layers,
            alpha: req.alpha,
            lambda: req.lambda,
            repetition_penalty: req.repetition_penalty,
            premature_final_norm: req.premature_final_norm,
        })
    }

    /// Weight 0, no plausibility mask and no penalty: exactly the base distribution.
    fn is_neutral(&self) -> bool {
        self.lambda == 0.0 && self.alpha == 0.0 && self.repetition_penalty == 1.0
    }
}

impl Intervention for Dola {
    fn name(&self) -> &'static str {
        "contrastive_decoding"
    }

    fn resolved(&self) -> Value {
        serde_json::to_value(self).expect("plain data serializes")
    }

    fn install(&self) -> Installed {
        if self.is_neutral() {
            return Installed::default();
        }
        let captured = Arc::new(Mutex::new(vec![None; self.layers.len()]));
        Installed {
            hooks: Some(Box::new(CaptureLastRow {
                layers: self.layers.clone(),
                captured: captured.clone(),
            })),
            processor: Some(Box::new(DolaProcessor {
                params: self.clone(),
                captured,
            })),
        }
    }
}

/// Keeps the last row of the residual stream at each candidate depth.
struct CaptureLastRow {
    layers: Vec<usize>,
    captured: Arc<Mutex<Vec<Option<Tensor>>>>,
}

impl SequenceHooks for CaptureLastRow {
    fn wants(&self, point: HookPoint, layer: usize) -> bool {
        point == HookPoint::Residual && self.layers.contains(&layer)
    }

    fn residual(&mut self, site: &RowSite, hidden: Tensor) -> Result<Tensor> {
        let rows = hidden.dim(0)?;
        let last = hidden.narrow(0, rows - 1, 1)?;
        let mut captured = self.captured.lock().expect("not poisoned");
        for (slot, &l) in captured.iter_mut().zip(&self.layers) {
            if l == site.layer {
                *slot = Some(last.clone());
            }
        }
        Ok(hidden)
    }
}

struct DolaProcessor {
    params: Dola,
    captured: Arc<Mutex<Vec<Option<Tensor>>>>,
}

impl LogitsProcessor for DolaProcessor {
    fn process(
        &mut self,
        logits: Vec<f32>,
        _branches: &[Vec<f32>],
        decoder: &Decoder,
        context: &[u32],
    ) -> Result<Vec<f32>> {
        let rows: Vec<Tensor> = self
            .captured
            .lock()
            .expect("not poisoned")
            .iter_mut()
            .map(|slot| {
                slot.take().ok_or_else(|| {
                    candle_core::Error::msg("DoLa: a premature layer was not captured")
                })
            })
            .collect::<Result<_>>()?;
        let premature = decoder
            .logits_from_hidden(&Tensor::cat(&rows, 0)?, self.params.premature_final_norm)?
            .to_vec2::<f32>()?;
        let mature = log_softmax(&logits);
        let candidates: Vec<Vec<f64>> = premature.iter().map(|z| log_softmax(z)).collect();
        let chosen = candidates
            .iter()
            .map(|lp| js_divergence(&mature, lp))
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(i, _)| i)
            .expect("at least one candidate");
        Ok(dola_scores(
            &mature,
            &candidates[chosen],
            &self.params,
            context,
        ))
    }
}

/// log-softmax in f64.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&l| (l as f64 - max).exp())
            .sum::<f64>()
            .ln();
    logits.iter().map(|&l| l as f64 - lse).collect()
}

/// Jensen-Shannon divergence between two distributions given as log-probabilities.
pub fn js_divergence(a: &[f64], b: &[f64]) -> f64 {
    let mut js = 0.0;
    for (&la, &lb) in a.iter().zip(b) {
        let (pa, pb) = (la.exp(), lb.exp());
        let m = 0.5 * (pa + pb);
        if m <= 0.0 {
            continue;
        }
        let lm = m.ln();
        if pa > 0.0 {
            js += 0.5 * pa * (la - lm);
        }
        if pb > 0.0 {
            js += 0.5 * pb * (lb - lm);
        }
    }
    js
}

/// `log p_mature - lambda * log p_premature` on the plausible tokens, -inf elsewhere, then the
/// repetition penalty over `context`.
pub fn dola_scores(mature: &[f64], premature: &[f64], p: &Dola, context: &[u32]) -> Vec<f32> {
    let best = mature.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let floor = if p.alpha > 0.0 {
        best + p.alpha.ln()
    } else {
        f64::NEG_INFINITY
    };
    let mut scores: Vec<f32> = mature
        .iter()
        .zip(premature)
        .map(|(&m, &q)| {
            if m >= floor {
                (m - p.lambda * q) as f32
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    if p.repetition_penalty != 1.0 {
        let mut seen = vec![false; scores.len()];
        for &t in context {
            if let Some(s) = seen.get_mut(t as usize) {
                *s = true;
            }
        }
        let penalty = p.repetition_penalty as f32;
        for (s, _) in scores
            .iter_mut()
            .zip(&seen)
            .filter(|(s, &seen)| seen && s.is_finite())
        {
            *s = if *s > 0.0 { *s / penalty } else { *s * penalty };
        }
    }
    scores
}

/// How the two branches combine (spec §4 step 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rule {
    /// (1 + beta) u+ - beta u-: VCD, LQCD, O'Brien & Lewis.
    Extrapolate,
    /// u+ - lambda u-: Li et al.'s CD.
    Difference,
}

/// The space the branches are compared in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Space {
    Logits,
    /// log_softmax(z+) and log_softmax(z- / temperature).
    Logprobs,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PromptRequest {
    mode: String,
    contrast_prompt: Option<String>,
    contrast_prefix: Option<String>,
    #[serde(default = "default_rule")]
    rule: Rule,
    beta: Option<f64>,
    lambda: Option<f64>,
    #[serde(default = "default_alpha")]
    alpha: f64,
    space: Option<Space>,
    #[serde(default = "default_temperature")]
    temperature: f64,
}

fn default_rule() -> Rule {
    Rule::Extrapolate
}

fn default_temperature() -> f64 {
    1.0
}

/// Contrast with the same model on another prompt, run as a branch of the request.
#[derive(Debug, Clone, Serialize)]
pub struct PromptContrast {
    pub mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contrast_prompt: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contrast_prefix: Option<String>,
    pub rule: Rule,
    /// beta (extrapolate) or lambda (difference).
    #[serde(skip)]
    pub weight: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lambda: Option<f64>,
    pub alpha: f64,
    pub space: Space,
    pub temperature: f64,
}

impl PromptContrast {
    pub fn from_request(params: Value) -> std::result::Result<Self, InterventionError> {
        let req: PromptRequest = from_value(params)?;
        if req.mode != "prompt" {
            return Err(InterventionError::new("mode", "expected `prompt`"));
        }
        if req.contrast_prompt.is_some() == req.contrast_prefix.is_some() {
            return Err(InterventionError::new(
                "contrast_prompt",
                "give exactly one of `contrast_prompt` (replaces the last user message) or \
                 `contrast_prefix` (goes in front of it)",
            ));
        }
        let (weight, beta, lambda) = match req.rule {
            Rule::Extrapolate => {
                if req.lambda.is_some() {
                    return Err(InterventionError::new(
                        "lambda",
                        "goes with `rule: difference`; use `beta`",
                    ));
                }
                let b = req.beta.unwrap_or(1.0);
                (b, Some(b), None)
            }
            Rule::Difference => {
                if req.beta.is_some() {
                    return Err(InterventionError::new(
                        "beta",
                        "goes with `rule: extrapolate`; use `lambda`",
                    ));
                }
                let l = req.lambda.unwrap_or(1.0);
                (l, None, Some(l))
            }
        };
        let field = if req.rule == Rule::Extrapolate {
            "beta"
        } else {
            "lambda"
        };
        check_range(field, weight, 0.0, 100.0, false)?;
        check_range("alpha", req.alpha, 0.0, 1.0, false)?;
        check_range("temperature", req.temperature, 0.0, 100.0, true)?;
        Ok(Self {
            mode: "prompt",
            contrast_prompt: req.contrast_prompt,
            contrast_prefix: req.contrast_prefix,
            rule: req.rule,
            weight,
            beta,
            lambda,
            alpha: req.alpha,
            space: req.space.unwrap_or(match req.rule {
                Rule::Extrapolate => Space::Logits,
                Rule::Difference => Space::Logprobs,
            }),
            temperature: req.temperature,
        })
    }

    /// No contrast weight and no mask: the base distribution, so nothing is installed.
    fn is_neutral(&self) -> bool {
        self.weight == 0.0 && self.alpha == 0.0
    }

    /// The spec's unified step for one row.
    pub fn combine(&self, positive: &[f32], negative: &[f32]) -> Vec<f32> {
        let (w_pos, w_neg) = match self.rule {
            Rule::Extrapolate => (1.0 + self.weight, self.weight),
            Rule::Difference => (1.0, self.weight),
        };
        let (u_pos, u_neg): (Vec<f64>, Vec<f64>) = match self.space {
            Space::Logits => (
                positive.iter().map(|&v| v as f64).collect(),
                negative.iter().map(|&v| v as f64).collect(),
            ),
            Space::Logprobs => {
                let cooled: Vec<f32> = negative
                    .iter()
                    .map(|&v| (v as f64 / self.temperature) as f32)
                    .collect();
                (log_softmax(positive), log_softmax(&cooled))
            }
        };
        let best = positive.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let floor = if self.alpha > 0.0 {
            best + self.alpha.ln()
        } else {
            f64::NEG_INFINITY
        };
        positive
            .iter()
            .zip(u_pos.iter().zip(&u_neg))
            .map(|(&z, (&up, &un))| {
                if (z as f64) >= floor {
                    (w_pos * up - w_neg * un) as f32
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect()
    }
}

impl Intervention for PromptContrast {
    fn name(&self) -> &'static str {
        "contrastive_decoding"
    }

    fn resolved(&self) -> Value {
        serde_json::to_value(self).expect("plain data serializes")
    }

    fn install(&self) -> Installed {
        if self.is_neutral() {
            return Installed::default();
        }
        Installed {
            hooks: None,
            processor: Some(Box::new(PromptContrastProcessor(self.clone()))),
        }
    }

    fn branches(&self) -> Vec<BranchPrompt> {
        if self.is_neutral() {
            return Vec::new();
        }
        match (&self.contrast_prompt, &self.contrast_prefix) {
            (Some(text), _) => vec![BranchPrompt::Replace(text.clone())],
            (None, Some(prefix)) => vec![BranchPrompt::Prefix(prefix.clone())],
            (None, None) => unreachable!("validated in from_request"),
        }
    }
}

struct PromptContrastProcessor(PromptContrast);

impl LogitsProcessor for PromptContrastProcessor {
    fn process(
        &mut self,
        logits: Vec<f32>,
        branches: &[Vec<f32>],
        _: &Decoder,
        _: &[u32],
    ) -> Result<Vec<f32>> {
        let negative = branches.first().ok_or_else(|| {
            candle_core::Error::msg("prompt contrast: the contrast branch is missing")
        })?;
        Ok(self.0.combine(&logits, negative))
    }
}
