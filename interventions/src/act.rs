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
use attune_models::{AttentionRows, AttentionSite, HeadRowRewrite, HookPoint, SequenceHooks};
use candle_core::{DType, Result, Tensor};
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
        let Some(heads) = self.heads_at(site) else {
            return Ok(probs);
        };
        calibrate(&probs, heads, site.query_start, self.beta, self.threshold)
    }

    fn probs_in_place(&mut self, site: &AttentionSite, rows: &mut AttentionRows) -> Result<bool> {
        if let Some(heads) = self.heads_at(site) {
            calibrate_rows(rows, heads, site.query_start, self.beta, self.threshold);
        }
        Ok(true)
    }

    /// A decode row is its own column scores: each head calibrates alone, inside the pass.
    fn decode_rewrite(&self, site: &AttentionSite) -> Option<Box<dyn HeadRowRewrite + '_>> {
        Some(Box::new(DecodeCalibration {
            heads: self.heads_at(site),
            beta: self.beta,
            threshold: self.threshold,
        }))
    }
}

/// [`calibrate_rows`] on one decode row of one head (`heads`: `None` on steps ACT leaves
/// alone).
struct DecodeCalibration<'a> {
    heads: Option<&'a [bool]>,
    beta: f64,
    threshold: f64,
}

impl HeadRowRewrite for DecodeCalibration<'_> {
    fn probs(&self, head: usize, probs: &mut [f32]) {
        if self
            .heads
            .is_some_and(|heads| heads.get(head).copied().unwrap_or(false))
        {
            calibrate_decode_row(probs, self.beta, self.threshold);
        }
    }
}

/// [`calibrate_head`] for a single row: one query sees every key, so each key's column score
/// is its own weight, and nothing needs to be gathered first (no allocation per head and step).
fn calibrate_decode_row(row: &mut [f32], beta: f64, threshold: f64) {
    let threshold = threshold as f32;
    let Some(first) = row.iter().position(|&v| v > threshold) else {
        return;
    };
    move_off_sinks(row, |j, v| j > first && v > threshold, beta);
}

/// Shrinks a row's sinks by `beta` and grows the rest by (1 + (1 - beta) m / R), m the sinks'
/// mass and R the rest's. Rows with no sink mass or no room (R ~ 0) stay as they are, which
/// also keeps 0/0 out of the next layer. `is_sink(j, value)` is asked before value j changes.
fn move_off_sinks(row: &mut [f32], is_sink: impl Fn(usize, f32) -> bool, beta: f64) {
    let sink_mass = sink_mass(row, &is_sink);
    let rest = 1.0 - sink_mass;
    if sink_mass == 0.0 || rest < 1e-6 {
        return;
    }
    let grow = 1.0 + (1.0 - beta as f32) * sink_mass / rest;
    for (j, v) in row.iter_mut().enumerate() {
        *v *= if is_sink(j, *v) { beta as f32 } else { grow };
    }
}

/// The sinks' total in eight running sums (value j in sum j mod 8, as the attention softmax
/// sums), which become vector adds where one running sum is a chain of dependent adds: this runs
/// on every calibrated head of every decode row.
fn sink_mass(row: &[f32], is_sink: impl Fn(usize, f32) -> bool) -> f32 {
    let mut lanes = [0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for (c, chunk) in chunks.by_ref().enumerate() {
        for (lane, (i, &v)) in lanes.iter_mut().zip(chunk.iter().enumerate()) {
            *lane += if is_sink(c * 8 + i, v) { v } else { 0.0 };
        }
    }
    let whole = row.len() - chunks.remainder().len();
    for (lane, (i, &v)) in lanes.iter_mut().zip(chunks.remainder().iter().enumerate()) {
        *lane += if is_sink(whole + i, v) { v } else { 0.0 };
    }
    lanes.iter().sum()
}

impl ActHooks {
    /// The heads to calibrate at this attention call, if any.
    fn heads_at(&self, site: &AttentionSite) -> Option<&[bool]> {
        // A prompt step starts the sequence or carries several queries; decode steps do not.
        let prompt_step = site.query_start == 0 || site.query_len > 1;
        if !(prompt_step || self.decode) || site.selected_keys.is_some() {
            return None;
        }
        self.selected[site.layer].as_deref()
    }
}

/// ACT on probabilities (heads, q_len, k_len) whose first query is at absolute position
/// `query_start`; only heads flagged in `heads` change. Plain loops over one host copy: this runs
/// inside every selected layer of every step, where a chain of small tensor ops costs more than
/// the arithmetic.
pub fn calibrate(
    probs: &Tensor,
    heads: &[bool],
    query_start: usize,
    beta: f64,
    threshold: f64,
) -> Result<Tensor> {
    let (n_heads, q_len, k_len) = probs.dims3()?;
    let mut p = probs
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut rows = AttentionRows {
        values: &mut p,
        heads: n_heads,
        query_len: q_len,
        keys: k_len,
    };
    if !calibrate_rows(&mut rows, heads, query_start, beta, threshold) {
        return Ok(probs.clone());
    }
    Tensor::from_vec(p, (n_heads, q_len, k_len), probs.device())?.to_dtype(probs.dtype())
}

/// [`calibrate`] in place on host rows; returns whether any head changed.
pub fn calibrate_rows(
    rows: &mut AttentionRows,
    heads: &[bool],
    query_start: usize,
    beta: f64,
    threshold: f64,
) -> bool {
    let (q_len, k_len) = (rows.query_len, rows.keys);
    // Rows that can see key j: the queries at or after it.
    let visible: Vec<f32> = (0..k_len)
        .map(|j| (q_len - j.saturating_sub(query_start).min(q_len)).max(1) as f32)
        .collect();
    let mut changed = false;
    for (h, head) in rows.values.chunks_exact_mut(q_len * k_len).enumerate() {
        if heads.get(h).copied().unwrap_or(false) {
            changed |= calibrate_head(head, &visible, beta, threshold);
        }
    }
    changed
}

/// ACT on one head's rows (query_len × keys, `visible[j]` rows seeing key j); returns whether
/// it found sinks to calibrate.
fn calibrate_head(head: &mut [f32], visible: &[f32], beta: f64, threshold: f64) -> bool {
    let k_len = visible.len();
    let mut column = vec![0f32; k_len];
    for row in head.chunks_exact(k_len) {
        for (c, v) in column.iter_mut().zip(row) {
            *c += v;
        }
    }
    // Sinks after the first candidate. Compared in f32, as the reference code's float32
    // tensors compare with a Python float.
    let mut is_sink = vec![false; k_len];
    let mut seen_first = false;
    let mut any = false;
    for j in 0..k_len {
        let candidate = column[j] / visible[j] > threshold as f32;
        is_sink[j] = candidate && seen_first;
        seen_first |= candidate;
        any |= is_sink[j];
    }
    if !any {
        return false;
    }
    for row in head.chunks_exact_mut(k_len) {
        move_off_sinks(row, |j, _| is_sink[j], beta);
    }
    true
}
