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
        let mature_probs: Vec<f64> = mature.iter().map(|l| l.exp()).collect();
        // Each candidate's divergence on its own CPU worker: ~2·vocabulary exp/ln in f64 each.
        let mut divergences = vec![0f64; premature.len()];
        let at = divergences.as_mut_ptr() as usize;
        attune_models::parallel::for_each_chunk(premature.len(), |candidates| {
            for c in candidates {
                let js = js_divergence(&mature, &mature_probs, &premature[c]);
                // SAFETY: c < premature.len() = divergences.len(), and each candidate belongs
                // to exactly one chunk.
                unsafe { *(at as *mut f64).add(c) = js };
            }
        });
        let chosen = divergences
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .expect("at least one candidate");
        Ok(dola_scores(
            &mature,
            &log_softmax(&premature[chosen]),
            &self.params,
            context,
        ))
    }
}

/// Jensen-Shannon divergence between a distribution given as log-probabilities `a` and
/// probabilities `a_probs`, and the softmax of `logits`. The softmax's probabilities come from
/// the exponentials its normalizer sums (one exp and one ln per token, not three and one).
pub fn js_divergence(a: &[f64], a_probs: &[f64], logits: &[f32]) -> f64 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let exps: Vec<f64> = logits.iter().map(|&l| (l as f64 - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    let lse = max + sum.ln();
    let mut js = 0.0;
    for (((&la, &pa), &l), &e) in a.iter().zip(a_probs).zip(logits).zip(&exps) {
        let (lb, pb) = (l as f64 - lse, e / sum);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The divergence from probabilities derived once per row equals the textbook formula on
    /// both rows' log-probabilities (to f64 rounding), is zero for identical rows and grows
    /// as they part.
    #[test]
    fn js_divergence_follows_the_definition() {
        let a_logits: Vec<f32> = (0..300)
            .map(|i| ((i * 37 % 101) as f32 * 0.11).sin() * 4.0)
            .collect();
        let b_logits: Vec<f32> = a_logits
            .iter()
            .enumerate()
            .map(|(i, l)| l + (i % 7) as f32 * 0.3)
            .collect();
        let (a, b) = (log_softmax(&a_logits), log_softmax(&b_logits));
        let a_probs: Vec<f64> = a.iter().map(|l| l.exp()).collect();
        let textbook: f64 = a
            .iter()
            .zip(&b)
            .map(|(&la, &lb)| {
                let (pa, pb) = (la.exp(), lb.exp());
                let lm = (0.5 * (pa + pb)).ln();
                0.5 * pa * (la - lm) + 0.5 * pb * (lb - lm)
            })
            .sum();
        let ours = js_divergence(&a, &a_probs, &b_logits);
        assert!(textbook > 1e-3, "{textbook}");
        assert!((ours - textbook).abs() < 1e-12, "{ours} vs {textbook}");
        assert!(js_divergence(&a, &a_probs, &a_logits).abs() < 1e-12);
        let further: Vec<f32> = b_logits
            .iter()
            .enumerate()
            .map(|(i, l)| l + (i % 7) as f32 * 0.3)
            .collect();
        assert!(js_divergence(&a, &a_probs, &further) > ours);
    }
}
