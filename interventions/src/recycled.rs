//! Recycled Attention / RefreshKV (Xu, Goyal, Choi): keep the full KV cache, but on most decode
//! steps attend only to the K keys the last full step attended to most (plus the tokens
//! generated since), refreshing that set on occasional full steps. From the paper (spec §3):
//! scores aggregate to KV heads by the max over each query group, are max-pooled over key
//! positions (kernel 7), and the top K per KV head are kept, lowest score first so that new
//! tokens push the weakest out. Full steps come every `stride` steps, or (`dynamic`, the
//! RefreshKV default) on every `check_every`-th step for each layer whose pre-RoPE mean query has
//! drifted below `similarity` (cosine) from the one at its last full step.

use crate::params::{check_range, from_value, InterventionError};
use crate::{Installed, Intervention, ModelShape};
use attune_models::{AttentionSite, HookPoint, SequenceHooks};
use candle_core::{Device, Result, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Max-pooling window over key positions (SnapKV's convention, as the paper uses).
const POOL_KERNEL: usize = 7;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    k: Option<usize>,
    k_fraction: Option<f64>,
    #[serde(default = "default_k_min")]
    k_min: usize,
    stride: Option<usize>,
    dynamic: Option<Dynamic>,
}

fn default_k_min() -> usize {
    256
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dynamic {
    #[serde(default = "default_check_every")]
    pub check_every: usize,
    #[serde(default = "default_similarity")]
    pub similarity: f64,
}

fn default_check_every() -> usize {
    5
}

fn default_similarity() -> f64 {
    0.85
}

#[derive(Debug, Clone, Serialize)]
pub struct RecycledAttention {
    /// Absolute budget; when absent, `max(k_min, ceil(k_fraction * prompt length))`.
    pub k: Option<usize>,
    pub k_fraction: f64,
    pub k_min: usize,
    pub stride: Option<usize>,
    pub dynamic: Option<Dynamic>,
    pub pool_kernel: usize,
    /// Never evict the first key (set when ZeroTuning also runs, as the spec asks).
    pub keep_first_key: bool,
    #[serde(skip)]
    kv_heads: usize,
}

impl RecycledAttention {
    pub fn from_request(
        params: Value,
        shape: &ModelShape,
        keep_first_key: bool,
    ) -> std::result::Result<Self, InterventionError> {
        let req: Request = from_value(params)?;
        if req.k.is_some() && req.k_fraction.is_some() {
            return Err(InterventionError::new(
                "k_fraction",
                "give `k` or `k_fraction`, not both",
            ));
        }
        if req.k == Some(0) {
            return Err(InterventionError::new("k", "must be at least 1"));
        }
        let k_fraction = req.k_fraction.unwrap_or(0.125);
        check_range("k_fraction", k_fraction, 0.0, 1.0, true)?;
        let dynamic = match (req.stride, req.dynamic) {
            (Some(_), Some(_)) => {
                return Err(InterventionError::new(
                    "dynamic",
                    "give `stride` or `dynamic`, not both",
                ))
            }
            (Some(0), None) => return Err(InterventionError::new("stride", "must be at least 1")),
            (Some(_), None) => None,
            (None, d) => Some(d.unwrap_or(Dynamic {
                check_every: default_check_every(),
                similarity: default_similarity(),
            })),
        };
        if let Some(d) = &dynamic {
            if d.check_every == 0 {
                return Err(InterventionError::new(
                    "dynamic.check_every",
                    "must be at least 1",
                ));
            }
            check_range("dynamic.similarity", d.similarity, -1.0, 2.0, false)?;
        }
        Ok(Self {
            k: req.k,
            k_fraction,
            k_min: req.k_min,
            stride: req.stride,
            dynamic,
            pool_kernel: POOL_KERNEL,
            keep_first_key,
            kv_heads: shape.num_kv_heads,
        })
    }

    fn budget(&self, prompt_len: usize) -> usize {
        self.k.unwrap_or_else(|| {
            self.k_min
                .max((prompt_len as f64 * self.k_fraction).ceil() as usize)
        })
    }
}

impl Intervention for RecycledAttention {
    fn name(&self) -> &'static str {
        "recycled_attention"
    }

    fn resolved(&self) -> Value {
        serde_json::to_value(self).expect("plain data serializes")
    }

    fn install(&self) -> Installed {
        Installed::hooks(RecycledHooks {
            params: self.clone(),
            budget: 0,
            prompt_len: 0,
            layers: Vec::new(),
            device: Device::Cpu,
        })
    }
}

/// Per-layer state: the partial cache's key positions per KV head (lowest score first), the
/// reference mean query of the last full step, and this step's mean query.
#[derive(Default, Clone)]
struct LayerState {
    selected: Vec<Vec<u32>>,
    reference_query: Option<Vec<f32>>,
    current_query: Option<Vec<f32>>,
    full_now: bool,
}

struct RecycledHooks {
    params: RecycledAttention,
    budget: usize,
    prompt_len: usize,
    layers: Vec<LayerState>,
    /// Where the attention runs (the selections must live there too).
    device: Device,
}

impl RecycledHooks {
    fn layer(&mut self, layer: usize) -> &mut LayerState {
        if self.layers.len() <= layer {
            self.layers.resize(layer + 1, LayerState::default());
        }
        &mut self.layers[layer]
    }

    /// Whether this decode step of `layer` attends to every key.
    fn full_step(&mut self, site: &AttentionSite) -> bool {
        let step = site.query_start + 1 - self.prompt_len;
        match (self.params.stride, self.params.dynamic) {
            (Some(stride), _) => step.is_multiple_of(stride),
            (None, Some(d)) => {
                let state = self.layer(site.layer);
                step.is_multiple_of(d.check_every)
                    && match (&state.reference_query, &state.current_query) {
                        (Some(r), Some(q)) => cosine(r, q) < d.similarity,
                        _ => true,
                    }
            }
            (None, None) => true,
        }
    }

    /// Rebuilds the partial cache from one query row's probabilities, (heads, 1.., key_len).
    fn refresh(&mut self, layer: usize, probs: &Tensor) -> Result<()> {
        let (heads, rows, keys) = probs.dims3()?;
        let last = probs.narrow(1, rows - 1, 1)?.squeeze(1)?.to_vec2::<f32>()?;
        let budget = self.budget.min(keys);
        let keep_first = self.params.keep_first_key;
        let kv_heads = self.params.kv_heads;
        let groups = heads / kv_heads;
        let state = self.layer(layer);
        state.selected = (0..kv_heads)
            .map(|g| {
                let group = &last[g * groups..(g + 1) * groups];
                let aggregated: Vec<f32> = (0..keys)
                    .map(|j| {
                        group
                            .iter()
                            .map(|row| row[j])
                            .fold(f32::NEG_INFINITY, f32::max)
                    })
                    .collect();
                top_keys(&max_pool(&aggregated, POOL_KERNEL), budget, keep_first)
            })
            .collect();
        state.reference_query = state.current_query.clone();
        state.full_now = false;
        Ok(())
    }
}

impl SequenceHooks for RecycledHooks {
    fn wants(&self, point: HookPoint, _: usize) -> bool {
        match point {
            HookPoint::Probs | HookPoint::KeySelection => true,
            HookPoint::Queries => self.params.dynamic.is_some(),
            _ => false,
        }
    }

    fn queries(&mut self, site: &AttentionSite, q: &Tensor) -> Result<()> {
        let rows = q.dim(1)?;
        let mean = q
            .narrow(1, rows - 1, 1)?
            .mean(0)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        self.layer(site.layer).current_query = Some(mean);
        Ok(())
    }

    fn probs(&mut self, site: &AttentionSite, probs: Tensor) -> Result<Tensor> {
        let prompt_step = site.query_start == 0 || site.query_len > 1;
        if prompt_step {
            self.device = probs.device().clone();
            self.prompt_len = site.key_len;
            self.budget = self.params.budget(site.key_len);
        }
        if prompt_step || self.layer(site.layer).full_now {
            self.refresh(site.layer, &probs)?;
        }
        Ok(probs)
    }

    fn select_keys(&mut self, site: &AttentionSite) -> Result<Option<Tensor>> {
        if self.prompt_len == 0 || site.key_len <= self.budget || self.full_step(site) {
            // Everything fits, or a full step: attend to all keys and refresh from them.
            self.layer(site.layer).full_now = true;
            return Ok(None);
        }
        let (budget, keep_first, newest) = (
            self.budget,
            self.params.keep_first_key,
            site.key_len as u32 - 1,
        );
        let state = self.layer(site.layer);
        state.full_now = false;
        for keys in &mut state.selected {
            keys.push(newest);
            while keys.len() > budget {
                let evict = usize::from(keep_first && keys[0] == 0);
                keys.remove(evict);
            }
        }
        let width = state.selected[0].len();
        let flat: Vec<u32> = state.selected.iter().flatten().copied().collect();
        let rows = state.selected.len();
        Ok(Some(Tensor::from_vec(flat, (rows, width), &self.device)?))
    }
}

/// 1-D max pooling with stride 1 and "same" padding.
pub fn max_pool(scores: &[f32], kernel: usize) -> Vec<f32> {
    let half = kernel / 2;
    (0..scores.len())
        .map(|j| {
            let lo = j.saturating_sub(half);
            let hi = (j + half + 1).min(scores.len());
            scores[lo..hi]
                .iter()
                .cloned()
                .fold(f32::NEG_INFINITY, f32::max)
        })
        .collect()
}

/// The `budget` best positions, lowest score first (ties: earlier position first); with
/// `keep_first`, position 0 is always among them.
pub fn top_keys(scores: &[f32], budget: usize, keep_first: bool) -> Vec<u32> {
    let mut order: Vec<u32> = (0..scores.len() as u32).collect();
    order.sort_by(|&a, &b| {
        scores[b as usize]
            .total_cmp(&scores[a as usize])
            .then(a.cmp(&b))
    });
    order.truncate(budget);
    if keep_first && !order.contains(&0) && !order.is_empty() {
        order.pop();
        order.insert(0, 0);
    }
    order.reverse();
    order
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64) * (*y as f64))
        .sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    if na == 0.0 || nb == 0.0 {
        return 0.0;
    }
    dot / (na * nb)
}
