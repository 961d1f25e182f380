//! ZeroTuning (Han et al. 2025): scale the attention every query pays to the initial token by
//! `gamma` and renormalize, in chosen layers and heads, at prefill and at every decode step.
//!
//! Implemented in the spec's exact pre-softmax form, `S[h, i, p0] += ln(gamma[h])`, which equals
//! the code's post-softmax rescale-and-renormalize (the tests check both agree) and costs one
//! add per head row. In our packed batches every sequence starts at key 0, so p0 = 0.

use crate::params::{check_indices, from_value, InterventionError};
use crate::{Installed, Intervention, ModelShape};
use attune_models::{AttentionSite, HookPoint, SequenceHooks};
use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    #[serde(default = "one")]
    gamma: f64,
    layers: Option<Vec<usize>>,
    heads: Option<Vec<usize>>,
    #[serde(default)]
    per_head: Vec<HeadGamma>,
    auto: Option<Value>,
}

fn one() -> f64 {
    1.0
}

/// One (layer, head) with its own gamma; overrides `gamma` there.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeadGamma {
    pub layer: usize,
    pub head: usize,
    pub gamma: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ZeroTuning {
    pub gamma: f64,
    pub layers: Vec<usize>,
    pub heads: Vec<usize>,
    pub per_head: Vec<HeadGamma>,
    /// ln(gamma) per layer and query head; `None` for layers left alone.
    #[serde(skip)]
    log_gamma: Arc<Vec<Option<Vec<f32>>>>,
}

impl ZeroTuning {
    pub fn from_request(
        params: Value,
        shape: &ModelShape,
    ) -> std::result::Result<Self, InterventionError> {
        let req: Request = from_value(params)?;
        if req.auto.is_some() {
            return Err(InterventionError::new(
                "auto",
                "entropy-picked gamma is not implemented yet",
            ));
        }
        check_gamma("gamma", req.gamma)?;
        let layers = req
            .layers
            .unwrap_or_else(|| (0..shape.num_layers).collect());
        let heads = req.heads.unwrap_or_else(|| (0..shape.num_heads).collect());
        check_indices("layers", &layers, shape.num_layers, "layer")?;
        check_indices("heads", &heads, shape.num_heads, "head")?;
        for (i, p) in req.per_head.iter().enumerate() {
            let field = format!("per_head[{i}]");
            check_indices(
                &format!("{field}.layer"),
                &[p.layer],
                shape.num_layers,
                "layer",
            )?;
            check_indices(&format!("{field}.head"), &[p.head], shape.num_heads, "head")?;
            check_gamma(&format!("{field}.gamma"), p.gamma)?;
        }

        let mut table = vec![vec![1.0f64; shape.num_heads]; shape.num_layers];
        for &l in &layers {
            for &h in &heads {
                table[l][h] = req.gamma;
            }
        }
        for p in &req.per_head {
            table[p.layer][p.head] = p.gamma;
        }
        let log_gamma = table
            .into_iter()
            .map(|row| {
                // gamma = 1 everywhere in a layer: install nothing there (bit-identical).
                row.iter()
                    .any(|&g| g != 1.0)
                    .then(|| row.iter().map(|g| g.ln() as f32).collect())
            })
            .collect();
        Ok(Self {
            gamma: req.gamma,
            layers,
            heads,
            per_head: req.per_head,
            log_gamma: Arc::new(log_gamma),
        })
    }
}

fn check_gamma(field: &str, gamma: f64) -> std::result::Result<(), InterventionError> {
    if (1e-6..=1e6).contains(&gamma) {
        Ok(())
    } else {
        Err(InterventionError::new(
            field,
            format!("must be in [1e-6, 1e6] (got {gamma})"),
        ))
    }
}

impl Intervention for ZeroTuning {
    fn name(&self) -> &'static str {
        "zerotuning"
    }

    fn resolved(&self) -> Value {
        serde_json::to_value(self).expect("plain data serializes")
    }

    fn install(&self) -> Installed {
        Installed::hooks(ZeroTuningHooks {
            log_gamma: self.log_gamma.clone(),
        })
    }
}

struct ZeroTuningHooks {
    log_gamma: Arc<Vec<Option<Vec<f32>>>>,
}

impl SequenceHooks for ZeroTuningHooks {
    fn wants(&self, point: HookPoint, layer: usize) -> bool {
        point == HookPoint::Scores && self.log_gamma.get(layer).is_some_and(Option::is_some)
    }

    fn scores(&mut self, site: &AttentionSite, scores: Tensor) -> Result<Tensor> {
        let Some(log_gamma) = &self.log_gamma[site.layer] else {
            return Ok(scores);
        };
        let (heads, _, keys) = scores.dims3()?;
        let mut bias = vec![0f32; heads * keys];
        match site.selected_keys {
            None => {
                for (h, lg) in log_gamma.iter().enumerate() {
                    bias[h * keys] = *lg;
                }
            }
            // A key selection reorders the columns: find key 0 in each head's group.
            Some(selected) => {
                let selected = selected.to_vec2::<u32>()?;
                let group = heads / selected.len();
                for (h, lg) in log_gamma.iter().enumerate() {
                    if let Some(col) = selected[h / group].iter().position(|&k| k == 0) {
                        bias[h * keys + col] = *lg;
                    }
                }
            }
        }
        let bias =
            Tensor::from_vec(bias, (heads, 1, keys), scores.device())?.to_dtype(scores.dtype())?;
        scores.broadcast_add(&bias)
    }
}
