//! ZeroTuning (Han et al. 2025): scale the attention every query pays to the initial token by
//! `gamma` and renormalize, in chosen layers and heads, at prefill and at every decode step.
//!
//! `auto` (the spec's proposal; the paper's unsupervised mode is UNVERIFIED) picks gamma per
//! prompt: one prefill per grid value, batched, keeping the gamma whose next-token distribution
//! at the last prompt position has the lowest entropy. It costs |grid| extra prefills.
//!
//! Implemented in the spec's exact pre-softmax form, `S[h, i, p0] += ln(gamma[h])`, which equals
//! the code's post-softmax rescale-and-renormalize (the tests check both agree) and costs one
//! add per head row. In our packed batches every sequence starts at key 0, so p0 = 0.

use crate::params::{check_indices, from_value, InterventionError};
use crate::{Installed, Intervention, ModelShape, PromptView};
use attune_models::{
    AttentionRows, AttentionSite, Decoder, HeadRowRewrite, HookPoint, LogitsFor, SequenceHooks,
    SequenceStep,
};
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

/// The spec's proposed grid.
pub const DEFAULT_AUTO_GRID: [f64; 6] = [0.5, 0.75, 1.0, 1.5, 2.0, 3.0];
/// Most grid values (each is one extra prefill).
pub const MAX_AUTO_GRID: usize = 16;
/// Prompt tokens per step of the grid prefills.
const AUTO_PREFILL_PIECE: usize = 512;

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
    /// Grid searched per prompt for the gamma of `layers` x `heads` (replaces `gamma`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto: Option<Vec<f64>>,
    /// ln(gamma) per layer and query head; `None` for layers left alone.
    #[serde(skip)]
    log_gamma: Arc<LogGammaTable>,
    #[serde(skip)]
    shape: ModelShape,
}

/// ln(gamma) per layer and query head; `None` for layers left alone.
type LogGammaTable = Vec<Option<Vec<f32>>>;

impl ZeroTuning {
    pub fn from_request(
        params: Value,
        shape: &ModelShape,
    ) -> std::result::Result<Self, InterventionError> {
        let req: Request = from_value(params)?;
        check_gamma("gamma", req.gamma)?;
        let auto = req.auto.map(auto_grid).transpose()?.flatten();
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

        let mut zt = Self {
            gamma: req.gamma,
            layers,
            heads,
            per_head: req.per_head,
            auto,
            shape: *shape,
            log_gamma: Arc::default(),
        };
        zt.log_gamma = Arc::new(zt.table(req.gamma));
        Ok(zt)
    }

    /// ln(gamma) per layer and head: `gamma` on `layers` x `heads`, then the `per_head` entries.
    fn table(&self, gamma: f64) -> LogGammaTable {
        let mut table = vec![vec![1.0f64; self.shape.num_heads]; self.shape.num_layers];
        for &l in &self.layers {
            for &h in &self.heads {
                table[l][h] = gamma;
            }
        }
        for p in &self.per_head {
            table[p.layer][p.head] = p.gamma;
        }
        table
            .into_iter()
            .map(|row| {
                // gamma = 1 everywhere in a layer: install nothing there (bit-identical).
                row.iter()
                    .any(|&g| g != 1.0)
                    .then(|| row.iter().map(|g| g.ln() as f32).collect())
            })
            .collect()
    }

    /// The auto grid's gamma with the lowest next-token entropy after `prompt`, and every
    /// grid value's entropy (nats). All grid prefills run as one batch.
    pub fn pick_gamma(&self, decoder: &Decoder, prompt: &PromptView) -> Result<(f64, Vec<f64>)> {
        let grid = self
            .auto
            .as_deref()
            .unwrap_or(std::slice::from_ref(&self.gamma));
        let mut caches: Vec<_> = grid.iter().map(|_| decoder.new_cache()).collect();
        let mut hooks: Vec<ZeroTuningHooks> = grid
            .iter()
            .map(|&g| ZeroTuningHooks {
                log_gamma: Arc::new(self.table(g)),
            })
            .collect();
        // Long prompts go in pieces, keeping the score matrices at piece x context.
        let pieces = prompt.pieces(AUTO_PREFILL_PIECE)?;
        let mut logits = Vec::new();
        for (i, piece) in pieces.iter().enumerate() {
            let wanted = if i + 1 == pieces.len() {
                LogitsFor::Last
            } else {
                LogitsFor::None
            };
            let mut steps: Vec<SequenceStep> = caches
                .iter_mut()
                .zip(hooks.iter_mut())
                .map(|(cache, h)| {
                    SequenceStep::new(piece.clone(), cache)
                        .with_hooks(h)
                        .with_logits(wanted)
                })
                .collect();
            logits = decoder.forward(&mut steps)?;
        }
        let entropies = logits
            .into_iter()
            .map(|l| {
                let row = l
                    .ok_or_else(|| candle_core::Error::msg("no logits"))?
                    .squeeze(0)?
                    .to_vec1::<f32>()?;
                Ok(entropy(&row))
            })
            .collect::<Result<Vec<f64>>>()?;
        let best = entropies
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .expect("the grid is not empty");
        Ok((grid[best], entropies))
    }
}

/// Entropy (nats) of softmax(logits).
fn entropy(logits: &[f32]) -> f64 {
    let logp = crate::contrastive::log_softmax(logits);
    -logp
        .iter()
        .filter(|l| l.is_finite())
        .map(|&l| l.exp() * l)
        .sum::<f64>()
}

/// `auto`: `true` (the default grid), `false` (off) or `{"grid": [gamma, ...]}`.
fn auto_grid(auto: Value) -> std::result::Result<Option<Vec<f64>>, InterventionError> {
    let grid = match auto {
        Value::Bool(on) => return Ok(on.then(|| DEFAULT_AUTO_GRID.to_vec())),
        Value::Object(mut fields) => {
            let grid = fields.remove("grid");
            if let Some(other) = fields.keys().next() {
                return Err(InterventionError::new(
                    format!("auto.{other}"),
                    "unknown field (auto takes only `grid`)",
                ));
            }
            match grid {
                None => return Ok(Some(DEFAULT_AUTO_GRID.to_vec())),
                Some(g) => serde_json::from_value::<Vec<f64>>(g).map_err(|_| {
                    InterventionError::new("auto.grid", "must be an array of numbers")
                })?,
            }
        }
        _ => {
            return Err(InterventionError::new(
                "auto",
                "must be true, false or {\"grid\": [gamma, ...]}",
            ))
        }
    };
    if grid.is_empty() || grid.len() > MAX_AUTO_GRID {
        return Err(InterventionError::new(
            "auto.grid",
            format!("needs 1 to {MAX_AUTO_GRID} values (got {})", grid.len()),
        ));
    }
    for (i, &g) in grid.iter().enumerate() {
        check_gamma(&format!("auto.grid[{i}]"), g)?;
    }
    Ok(Some(grid))
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

    fn install_for(&self, decoder: &Decoder, prompt: &PromptView) -> Result<Installed> {
        let Some(grid) = &self.auto else {
            return Ok(self.install());
        };
        let (gamma, entropies) = self.pick_gamma(decoder, prompt)?;
        let mut installed = Installed::hooks(ZeroTuningHooks {
            log_gamma: Arc::new(self.table(gamma)),
        });
        installed.report = Some(serde_json::json!({
            "gamma": gamma,
            "grid": grid,
            "entropy": entropies,
        }));
        Ok(installed)
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
        let (heads, _, keys) = scores.dims3()?;
        let Some(bias) = self.bias(site, heads, keys)? else {
            return Ok(scores);
        };
        let bias =
            Tensor::from_vec(bias, (heads, 1, keys), scores.device())?.to_dtype(scores.dtype())?;
        scores.broadcast_add(&bias)
    }

    /// The same bias added on host memory (x + 0 leaves the other scores as they are).
    fn scores_in_place(&mut self, site: &AttentionSite, rows: &mut AttentionRows) -> Result<bool> {
        let Some(bias) = self.bias(site, rows.heads, rows.keys)? else {
            return Ok(true);
        };
        for (head, bias) in rows
            .values
            .chunks_exact_mut(rows.query_len * rows.keys)
            .zip(bias.chunks_exact(rows.keys))
        {
            for row in head.chunks_exact_mut(rows.keys) {
                for (v, b) in row.iter_mut().zip(bias) {
                    *v += b;
                }
            }
        }
        Ok(true)
    }

    /// ln gamma onto each head's score of key 0, inside the attention pass.
    fn decode_rewrite(&self, site: &AttentionSite) -> Option<Box<dyn HeadRowRewrite + '_>> {
        if site.selected_keys.is_some() {
            return None;
        }
        let log_gamma = self.log_gamma[site.layer].as_deref()?;
        Some(Box::new(InitialKeyBias(log_gamma)))
    }
}

/// [`ZeroTuningHooks::bias`] for one head's row of keys in position order: only key 0
/// changes (adding the bias's zeros elsewhere leaves every probability as it is).
struct InitialKeyBias<'a>(&'a [f32]);

impl HeadRowRewrite for InitialKeyBias<'_> {
    fn scores(&self, head: usize, scores: &mut [f32]) {
        if let (Some(log_gamma), Some(initial)) = (self.0.get(head), scores.first_mut()) {
            *initial += log_gamma;
        }
    }
}

impl ZeroTuningHooks {
    /// log gamma at key 0 of each head in `layer` (heads × keys), or `None` where this layer
    /// is left alone.
    fn bias(&self, site: &AttentionSite, heads: usize, keys: usize) -> Result<Option<Vec<f32>>> {
        let Some(log_gamma) = &self.log_gamma[site.layer] else {
            return Ok(None);
        };
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
        Ok(Some(bias))
    }
}
