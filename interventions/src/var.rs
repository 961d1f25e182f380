//! VAR, visual attention redistribution (Kang et al., ICLR 2025; spec
//! shared/spec/vlm-interventions.md §1): image tokens that carry the language model's massive
//! activations in its sink dimensions are visual attention sinks. In "image-centric" rows
//! (attention mass on the image >= `image_mass`, non-sink share of it >= `rho`) a fraction of
//! the attention on every sink (text and visual) moves to the non-sink image tokens in
//! proportion to their attention. Rows still sum to 1; no extra pass.
//!
//! Sinks are detected per request from the residual stream entering each layer (not the
//! official code's stale state), only on prompt tokens; generated tokens reuse them.

use crate::params::{check_indices, check_range, from_value, InterventionError};
use crate::{Installed, Intervention, ModelShape, PromptView};
use attune_models::{AttentionSite, Decoder, HookPoint, RowSite, SequenceHooks};
use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::ops::{Range, RangeInclusive};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    sink_dims: Option<Vec<usize>>,
    #[serde(default = "default_tau")]
    tau: f64,
    #[serde(default = "default_rho")]
    rho: f64,
    #[serde(default = "default_image_mass")]
    image_mass: f64,
    #[serde(default = "default_transfer")]
    transfer_fraction: f64,
    layers: Option<Vec<usize>>,
}

fn default_tau() -> f64 {
    20.0
}
fn default_rho() -> f64 {
    0.5
}
fn default_image_mass() -> f64 {
    0.2
}
fn default_transfer() -> f64 {
    0.6
}

/// Sink dimensions on record for known language backbones (the official `constants.py`),
/// by (hidden size, layers).
const KNOWN_SINK_DIMS: &[((usize, usize), &[usize])] = &[
    // LLaMA-2-7B / Vicuna-7B (LLaVA-1.5-7B).
    ((4096, 32), &[2533, 1415]),
    // LLaMA-2-13B / Vicuna-13B (LLaVA-1.5-13B, LLaVA-1.6-vicuna-13B).
    ((5120, 40), &[2100, 4743]),
];

/// How many dimensions the calibration keeps when a backbone has none on record.
const CALIBRATED_DIMS: usize = 2;

#[derive(Debug, Clone, Serialize)]
pub struct Var {
    /// `None`: calibrated per request from the first token's residual (see [`sink_dims_of`]).
    pub sink_dims: Option<Vec<usize>>,
    pub tau: f64,
    pub rho: f64,
    pub image_mass: f64,
    /// Fraction of the sink attention moved (paper 0.6; the released code moves 0.4).
    pub transfer_fraction: f64,
    pub layers: Vec<usize>,
    #[serde(skip)]
    num_layers: usize,
}

impl Var {
    pub fn from_request(
        params: Value,
        shape: &ModelShape,
    ) -> std::result::Result<Self, InterventionError> {
        let hidden_size = shape.hidden_size;
        let req: Request = from_value(params)?;
        check_range("tau", req.tau, 0.0, 1e6, true)?;
        check_range("rho", req.rho, 0.0, 2.0, false)?;
        check_range("image_mass", req.image_mass, 0.0, 1.0, false)?;
        check_range("transfer_fraction", req.transfer_fraction, 0.0, 1.0, false)?;
        let n = shape.num_layers;
        // Sinks are computed from layer 2 on and the paper skips the last layer.
        let layers = req
            .layers
            .unwrap_or_else(|| (2.min(n)..n.saturating_sub(1)).collect());
        check_indices("layers", &layers, n, "layer")?;
        let sink_dims = req
            .sink_dims
            .or_else(|| known_sink_dims(hidden_size, n).map(<[usize]>::to_vec));
        if let Some(dims) = &sink_dims {
            if dims.is_empty() {
                return Err(InterventionError::new("sink_dims", "must not be empty"));
            }
            check_indices("sink_dims", dims, hidden_size, "hidden dimension")?;
        }
        Ok(Self {
            sink_dims,
            tau: req.tau,
            rho: req.rho,
            image_mass: req.image_mass,
            transfer_fraction: req.transfer_fraction,
            layers,
            num_layers: n,
        })
    }

    fn is_neutral(&self) -> bool {
        self.transfer_fraction == 0.0 || self.rho > 1.0 || self.layers.is_empty()
    }
}

fn known_sink_dims(hidden: usize, layers: usize) -> Option<&'static [usize]> {
    KNOWN_SINK_DIMS
        .iter()
        .find(|(key, _)| *key == (hidden, layers))
        .map(|(_, dims)| *dims)
}

impl Intervention for Var {
    fn name(&self) -> &'static str {
        "var"
    }

    fn resolved(&self) -> Value {
        serde_json::to_value(self).expect("plain data serializes")
    }

    fn install(&self) -> Installed {
        Installed::default()
    }

    fn install_for(&self, _decoder: &Decoder, prompt: &PromptView) -> Result<Installed> {
        if self.is_neutral() || !prompt.has_images() {
            return Ok(Installed::default());
        }
        let mut active = vec![false; self.num_layers];
        for &l in &self.layers {
            active[l] = true;
        }
        let images: Vec<Range<usize>> = prompt.image_spans.to_vec();
        Ok(Installed::hooks(VarHooks {
            params: self.clone(),
            active,
            dims: self.sink_dims.clone(),
            prompt_len: prompt.tokens.len(),
            rows_from: images.iter().map(|s| s.end).max().unwrap_or(0),
            images,
            sinks: vec![Vec::new(); self.num_layers],
        }))
    }

    fn images(&self) -> RangeInclusive<usize> {
        1..=usize::MAX
    }
}

struct VarHooks {
    params: Var,
    active: Vec<bool>,
    /// Sink dimensions, once known.
    dims: Option<Vec<usize>>,
    prompt_len: usize,
    images: Vec<Range<usize>>,
    /// Rows at or after this position (text after the last image, and generated tokens) are
    /// eligible.
    rows_from: usize,
    /// Sink key positions per layer, found on the prompt.
    sinks: Vec<Vec<usize>>,
}

impl VarHooks {
    fn in_image(&self, j: usize) -> bool {
        self.images.iter().any(|s| s.contains(&j))
    }
}

impl SequenceHooks for VarHooks {
    fn wants(&self, point: HookPoint, layer: usize) -> bool {
        matches!(point, HookPoint::Residual | HookPoint::Probs)
            && self.active.get(layer).copied().unwrap_or(false)
    }

    /// The residual entering layer `site.layer` (depth l = input of layer l): sink test of
    /// the prompt rows.
    fn residual(&mut self, site: &RowSite, hidden: Tensor) -> Result<Tensor> {
        if site.query_start >= self.prompt_len {
            return Ok(hidden);
        }
        let rows = hidden.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        if self.dims.is_none() && site.query_start == 0 {
            self.dims = Some(sink_dims_of(&rows[0], CALIBRATED_DIMS));
        }
        let Some(dims) = &self.dims else {
            return Ok(hidden);
        };
        for (i, row) in rows.iter().enumerate() {
            let position = site.query_start + i;
            if position < self.prompt_len && sink_score(row, dims) >= self.params.tau {
                self.sinks[site.layer].push(position);
            }
        }
        Ok(hidden)
    }

    fn probs(&mut self, site: &AttentionSite, probs: Tensor) -> Result<Tensor> {
        let sinks = &self.sinks[site.layer];
        let last_row = site.query_start + site.query_len;
        if site.selected_keys.is_some()
            || last_row <= self.rows_from
            || !sinks.iter().any(|&j| self.in_image(j))
        {
            return Ok(probs);
        }
        let (heads, q_len, k_len) = probs.dims3()?;
        let mut kind = vec![Key::Other; k_len];
        for (j, k) in kind.iter_mut().enumerate() {
            if self.in_image(j) {
                *k = Key::Image;
            }
        }
        for &j in sinks.iter().filter(|&&j| j < k_len) {
            kind[j] = Key::Sink {
                image: self.in_image(j),
            };
        }
        let first = self.rows_from.saturating_sub(site.query_start);
        let mut p = probs
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for head in p.chunks_exact_mut(q_len * k_len).take(heads) {
            for row in head.chunks_exact_mut(k_len).skip(first) {
                redistribute(
                    row,
                    &kind,
                    self.params.image_mass,
                    self.params.rho,
                    self.params.transfer_fraction,
                );
            }
        }
        Tensor::from_vec(p, (heads, q_len, k_len), probs.device())?.to_dtype(probs.dtype())
    }
}

/// What a key is to VAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    /// A sink (visual if `image`, else a text sink such as BOS).
    Sink {
        image: bool,
    },
    /// A non-sink image token.
    Image,
    Other,
}

/// VAR on one attention row (spec §1 steps 2-3); returns whether the row was selected.
pub fn redistribute(row: &mut [f32], kind: &[Key], image_mass: f64, rho: f64, p: f64) -> bool {
    let (mut image, mut plain_image, mut sink) = (0f64, 0f64, 0f64);
    let mut visual_sink = false;
    for (&a, k) in row.iter().zip(kind) {
        match k {
            Key::Sink { image: is_image } => {
                sink += a as f64;
                if *is_image {
                    image += a as f64;
                    visual_sink = true;
                }
            }
            Key::Image => {
                image += a as f64;
                plain_image += a as f64;
            }
            Key::Other => {}
        }
    }
    if !visual_sink || image <= 0.0 || plain_image <= 0.0 {
        return false;
    }
    if image < image_mass || plain_image / image < rho {
        return false;
    }
    let gain = p * sink / plain_image;
    for (a, k) in row.iter_mut().zip(kind) {
        match k {
            Key::Sink { .. } => *a = ((1.0 - p) * *a as f64) as f32,
            Key::Image => *a = (*a as f64 * (1.0 + gain)) as f32,
            Key::Other => {}
        }
    }
    true
}

/// φ = max over `dims` of |x\[d\]| / RMS(x) (spec §1 step 1).
pub fn sink_score(row: &[f32], dims: &[usize]) -> f64 {
    let mean_sq = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / row.len() as f64;
    let rms = (mean_sq + 1e-6).sqrt();
    dims.iter()
        .map(|&d| (row[d] as f64).abs() / rms)
        .fold(0.0, f64::max)
}

/// The `count` dimensions where the first token's residual is most massive relative to its
/// RMS: our calibration for backbones with no sink dimensions on record (spec §1, \[ours\]).
pub fn sink_dims_of(first_token: &[f32], count: usize) -> Vec<usize> {
    let mut dims: Vec<usize> = (0..first_token.len()).collect();
    dims.sort_by(|&a, &b| first_token[b].abs().total_cmp(&first_token[a].abs()));
    dims.truncate(count);
    dims
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_row() -> (Vec<f32>, Vec<Key>) {
        // [BOS (sink), img0 (sink), img1, img2, txt].
        (
            vec![0.5, 0.2, 0.1, 0.1, 0.1],
            vec![
                Key::Sink { image: false },
                Key::Sink { image: true },
                Key::Image,
                Key::Image,
                Key::Other,
            ],
        )
    }

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6)
    }

    #[test]
    fn spec_example_paper_and_code_fractions() {
        let (mut row, kind) = spec_row();
        assert!(redistribute(&mut row, &kind, 0.2, 0.5, 0.6));
        assert!(close(&row, &[0.2, 0.08, 0.31, 0.31, 0.1]), "{row:?}");
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let (mut row, kind) = spec_row();
        assert!(redistribute(&mut row, &kind, 0.2, 0.5, 0.4));
        assert!(close(&row, &[0.3, 0.12, 0.24, 0.24, 0.1]), "{row:?}");
    }

    #[test]
    fn unselected_rows_and_neutral_fraction_are_untouched() {
        let (row0, kind) = spec_row();
        // r = 0.5 < rho 0.6.
        let mut row = row0.clone();
        assert!(!redistribute(&mut row, &kind, 0.2, 0.6, 0.6));
        assert_eq!(row, row0);
        // Image mass 0.4 below the floor 0.5.
        assert!(!redistribute(&mut row, &kind, 0.5, 0.5, 0.6));
        assert_eq!(row, row0);
        // p = 0 changes nothing, bit for bit.
        assert!(redistribute(&mut row, &kind, 0.2, 0.5, 0.0));
        assert_eq!(row, row0);
        // No visual sink: nothing selected.
        let text_only: Vec<Key> = kind
            .iter()
            .map(|k| match k {
                Key::Sink { .. } => Key::Sink { image: false },
                other => *other,
            })
            .collect();
        assert!(!redistribute(&mut row, &text_only, 0.2, 0.5, 0.6));
    }

    #[test]
    fn sink_mass_moves_to_plain_image_tokens_exactly() {
        let (mut row, kind) = spec_row();
        let before = row.clone();
        redistribute(&mut row, &kind, 0.2, 0.5, 0.6);
        // Visual-sink mass x (1 - p); image mass rises by p x (text-sink mass).
        assert!((row[1] - 0.4 * before[1]).abs() < 1e-7);
        let image = |r: &[f32]| r[1] + r[2] + r[3];
        assert!((image(&row) - image(&before) - 0.6 * before[0]).abs() < 1e-6);
    }

    #[test]
    fn sink_score_and_calibration() {
        let mut row = vec![1.0f32; 8];
        row[3] = -40.0;
        let rms = ((7.0 + 1600.0) / 8.0f64 + 1e-6).sqrt();
        assert!((sink_score(&row, &[3]) - 40.0 / rms).abs() < 1e-9);
        row[5] = 9.0;
        assert_eq!(sink_dims_of(&row, 2), vec![3, 5]);
    }
}
