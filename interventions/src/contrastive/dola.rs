//! DoLa (Chuang et al., ICLR 2024): the final layer against a premature layer of the same
//! pass, chosen per step by Jensen-Shannon divergence; score = log p_final - lambda * log
//! p_premature on the plausible tokens (p_final >= alpha * max p_final), -inf elsewhere; then
//! the repetition penalty on those scores, as HF's `_dola_decoding` orders it.

use super::{default_alpha, log_softmax};
use crate::capture::{take_rows, CaptureLastRow};
use crate::params::{check_indices, check_range, from_value, InterventionError};
use crate::{Installed, Intervention, LogitsProcessor, ModelShape};
use attune_models::Decoder;
use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::{Arc, Mutex};

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
            ..Installed::default()
        }
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
        let rows = take_rows(&self.captured, "DoLa")?;
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
