//! ACT, Attention Calibration Technique (Yu et al., ICML 2024): in chosen heads, detect
//! "hidden" attention sinks of the current input (keys that draw more than `threshold` of the
//! attention on average), keep the first one (normally the initial token), cut the others'
//! attention by `beta`, and hand the freed mass to the remaining keys in proportion to their
//! weight.
//!
//! Follows the spec (shared/spec/llm-interventions.md §2): column scores are averaged over the
//! rows that can see each key (correct at prefill and at decode), the released code's
//! `A'[0,0] = 1` is a no-op here because masked probabilities are exactly zero, and by default
//! it acts on the prompt only (the classification setting); `decode: true` applies it at every
//! step (the MT-Bench setting).

use crate::params::{check_indices, check_range, from_value, InterventionError};
use crate::{Installed, Intervention, ModelShape};
use attune_models::{AttentionSite, HookPoint, SequenceHooks};
use candle_core::{Result, Tensor, D};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    #[serde(default = "default_beta")]
    beta: f64,
    #[serde(default = "default_threshold")]
    threshold: f64,
    layers: Option<Vec<usize>>,
    heads: Option<Vec<(usize, usize)>>,
    #[serde(default)]
    decode: bool,
}

fn default_beta() -> f64 {
    0.4
}

fn default_threshold() -> f64 {
    0.1
}

#[derive(Debug, Clone, Serialize)]
pub struct Act {
    pub beta: f64,
    pub threshold: f64,
    pub layers: Vec<usize>,
    /// (layer, head) pairs; defaults to every head of `layers`.
    pub heads: Vec<(usize, usize)>,
    pub decode: bool,
    /// Per layer, which query heads are calibrated (`None`: the layer is left alone).
    #[serde(skip)]
    selected: Arc<Vec<Option<Vec<bool>>>>,
}

impl Act {
    pub fn from_request(
        params: Value,
        shape: &ModelShape,
    ) -> std::result::Result<Self, InterventionError> {
        let req: Request = from_value(params)?;
        check_range("beta", req.beta, 0.0, 1.0, false)?;
        check_range("threshold", req.threshold, 0.0, 1.0, true)?;
        let n = shape.num_layers;
        let layers = req
            .layers
            .unwrap_or_else(|| (2.min(n)..n.saturating_sub(1)).collect());
        check_indices("layers", &layers, n, "layer")?;
        let heads = match req.heads {
            Some(pairs) => {
                for (i, &(l, h)) in pairs.iter().enumerate() {
                    check_indices(&format!("heads[{i}][0]"), &[l], n, "layer")?;
                    check_indices(&format!("heads[{i}][1]"), &[h], shape.num_heads, "head")?;
                    if !layers.contains(&l) {
                        return Err(InterventionError::new(
                            format!("heads[{i}]"),
                            format!("layer {l} is not among `layers`"),
                        ));
                    }
                }
                pairs
            }
            None => layers
                .iter()
                .flat_map(|&l| (0..shape.num_heads).map(move |h| (l, h)))
                .collect(),
        };
        let neutral = req.beta == 1.0 || req.threshold >= 1.0;
        let mut selected: Vec<Option<Vec<bool>>> = vec![None; n];
        if !neutral {
            for &(l, h) in &heads {
                selected[l].get_or_insert_with(|| vec![false; shape.num_heads])[h] = true;
            }
        }
        Ok(Self {
            beta: req.beta,
            threshold: req.threshold,
            layers,
            heads,
            decode: req.decode,
            selected: Arc::new(selected),
        })
    }
}

impl Intervention for Act {
    fn name(&self) -> &'static str {
        "act"
    }

    fn resolved(&self) -> Value {
        serde_json::to_value(self).expect("plain data serializes")
    }

    fn install(&self) -> Installed {
        Installed::hooks(ActHooks {
            beta: self.beta,
            threshold: self.threshold,
            decode: self.decode,
            selected: self.selected.clone(),
        })
    }
}

struct ActHooks {
    beta: f64,
    threshold: f64,
    decode: bool,
    selected: Arc<Vec<Option<Vec<bool>>>>,
}

impl SequenceHooks for ActHooks {
    fn wants(&self, point: HookPoint, layer: usize) -> bool {
        point == HookPoint::Probs && self.selected.get(layer).is_some_and(Option::is_some)
    }

    fn probs(&mut self, site: &AttentionSite, probs: Tensor) -> Result<Tensor> {
        // A prompt step starts the sequence or carries several queries; decode steps do not.
        let prompt_step = site.query_start == 0 || site.query_len > 1;
        if !(prompt_step || self.decode) || site.selected_keys.is_some() {
            return Ok(probs);
        }
        let Some(heads) = &self.selected[site.layer] else {
            return Ok(probs);
        };
        calibrate(&probs, heads, site.query_start, self.beta, self.threshold)
    }
}

/// ACT on probabilities (heads, q_len, k_len) whose first query is at absolute position
/// `query_start`; only heads flagged in `heads` change.
pub fn calibrate(
    probs: &Tensor,
    heads: &[bool],
    query_start: usize,
    beta: f64,
    threshold: f64,
) -> Result<Tensor> {
    let (n_heads, q_len, k_len) = probs.dims3()?;
    // Rows that can see key j: the queries at or after it.
    let visible: Vec<f32> = (0..k_len)
        .map(|j| (q_len - j.saturating_sub(query_start).min(q_len)).max(1) as f32)
        .collect();
    let visible = Tensor::from_vec(visible, (1, k_len), probs.device())?;
    let column_scores = probs.sum(1)?.broadcast_div(&visible)?.to_vec2::<f32>()?;

    // Sinks after the first candidate, per head.
    let mut sink_mask = vec![0f32; n_heads * k_len];
    let mut any = false;
    for (h, scores) in column_scores.iter().enumerate() {
        if !heads[h] {
            continue;
        }
        // Compared in f32, as the reference code's float32 tensors compare with a Python float.
        let mut candidates = (0..k_len).filter(|&j| scores[j] > threshold as f32);
        candidates.next(); // the first sink is kept
        for j in candidates {
            sink_mask[h * k_len + j] = 1.0;
            any = true;
        }
    }
    if !any {
        return Ok(probs.clone());
    }
    let sinks = Tensor::from_vec(sink_mask, (n_heads, 1, k_len), probs.device())?;
    let sink_mass = probs.broadcast_mul(&sinks)?.sum_keepdim(D::Minus1)?; // m_i: (heads, q, 1)
    let rest = (1.0 - &sink_mass)?; // R_i
                                    // Non-sink keys grow by (1 + (1 - beta) m / R); rows with no room (R ~ 0) stay as they are,
                                    // which also keeps 0/0 out of the next layer.
    let room = rest.ge(1e-6)?.to_dtype(probs.dtype())?;
    let grow = ((sink_mass * (1.0 - beta))?.broadcast_div(&rest.clamp(1e-6, f64::MAX)?)? * &room)?;
    let other_scale = (grow + 1.0)?; // (heads, q, 1)
    let sink_scale = ((&room * (beta - 1.0))? + 1.0)?; // beta where there is room, else 1
    let scale = sinks
        .broadcast_mul(&sink_scale)?
        .add(&(1.0 - &sinks)?.broadcast_mul(&other_scale)?)?;
    debug_assert_eq!(scale.dims3()?, (n_heads, q_len, k_len));
    probs.mul(&scale)
}
