//! VHR, vision-aware head reinforcement (He et al., ACL 2025; spec
//! shared/spec/vlm-interventions.md §2): at the first step, compare each head's output at the
//! last prompt position with and without the image (VHD); in each chosen layer the heads whose
//! VHD is above the layer's median (after dropping heads that explode without the image) get
//! their outputs multiplied by `alpha` for the whole generation.
//!
//! The selection runs as an extra pass when the sequence starts: the image prompt and the
//! text-only prompt (image spans deleted) prefill in one batch, layer by layer in lockstep, so
//! each layer's VHD already sees the earlier layers reinforced (the decoder shows every
//! sequence's head outputs to the hooks before rewriting any). The generation then prefills
//! again with the chosen heads fixed, which gives the same result as reinforcing in place and
//! lets long prompts be prefilled in pieces.

use crate::params::{check_indices, check_range, from_value, InterventionError};
use crate::{Installed, Intervention, ModelShape, PromptView};
use attune_models::{
    AttentionSite, Decoder, DecoderInput, HookPoint, LogitsFor, SequenceHooks, SequenceStep,
};
use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    #[serde(default = "default_alpha")]
    alpha: f64,
    layers: Option<Vec<usize>>,
}

fn default_alpha() -> f64 {
    2.0
}

#[derive(Debug, Clone, Serialize)]
pub struct Vhr {
    pub alpha: f64,
    pub layers: Vec<usize>,
    #[serde(skip)]
    num_layers: usize,
}

/// LLaVA-1.5's layers rescaled to other depths: layer 1 and the last 44% ({1, 18..31} of 32).
pub fn default_layers(num_layers: usize) -> Vec<usize> {
    let last = ((0.44 * num_layers as f64).round() as usize).min(num_layers);
    let mut layers: Vec<usize> = (num_layers - last..num_layers).collect();
    if num_layers > 1 && !layers.contains(&1) {
        layers.insert(0, 1);
    }
    layers
}

impl Vhr {
    pub fn from_request(
        params: Value,
        shape: &ModelShape,
    ) -> std::result::Result<Self, InterventionError> {
        let req: Request = from_value(params)?;
        check_range("alpha", req.alpha, 0.0, 100.0, false)?;
        let layers = req
            .layers
            .unwrap_or_else(|| default_layers(shape.num_layers));
        check_indices("layers", &layers, shape.num_layers, "layer")?;
        Ok(Self {
            alpha: req.alpha,
            layers,
            num_layers: shape.num_layers,
        })
    }

    /// Per layer, the gain of each head (`None`: layer not reinforced), chosen on `prompt`.
    pub fn select(&self, decoder: &Decoder, prompt: &PromptView) -> Result<Gains> {
        let state = Arc::new(Mutex::new(Selection {
            text_last: vec![None; self.num_layers],
            gains: vec![None; self.num_layers],
        }));
        let hooks = |role| SelectionHooks {
            role,
            alpha: self.alpha as f32,
            layers: self.layers.clone(),
            state: state.clone(),
        };
        let (mut text_hooks, mut image_hooks) = (hooks(Role::Text), hooks(Role::Image));
        let (mut text_cache, mut image_cache) = (decoder.new_cache(), decoder.new_cache());
        let whole = prompt.tokens.len();
        let image_input = prompt.pieces(whole)?.remove(0);
        // Text first: its outputs must be recorded when the image branch compares.
        let mut batch = [
            SequenceStep::new(
                DecoderInput::Tokens(prompt.without_images()),
                &mut text_cache,
            )
            .with_hooks(&mut text_hooks)
            .with_logits(LogitsFor::None),
            SequenceStep::new(image_input, &mut image_cache)
                .with_hooks(&mut image_hooks)
                .with_logits(LogitsFor::None),
        ];
        decoder.forward(&mut batch)?;
        let gains = state.lock().expect("not poisoned").gains.clone();
        Ok(Arc::new(gains))
    }
}

/// Per layer, per head gains.
pub type Gains = Arc<Vec<Option<Vec<f32>>>>;

impl Intervention for Vhr {
    fn name(&self) -> &'static str {
        "vhr"
    }

    fn resolved(&self) -> Value {
        serde_json::to_value(self).expect("plain data serializes")
    }

    fn install(&self) -> Installed {
        Installed::default()
    }

    fn install_for(&self, decoder: &Decoder, prompt: &PromptView) -> Result<Installed> {
        if self.alpha == 1.0 || self.layers.is_empty() || !prompt.has_images() {
            return Ok(Installed::default());
        }
        let gains = self.select(decoder, prompt)?;
        let heads: serde_json::Map<String, Value> = gains
            .iter()
            .enumerate()
            .filter_map(|(l, g)| {
                let g = g.as_ref()?;
                let chosen: Vec<usize> = (0..g.len()).filter(|&h| g[h] != 1.0).collect();
                Some((l.to_string(), serde_json::json!(chosen)))
            })
            .collect();
        let mut installed = Installed::hooks(ScaleHeads { gains });
        installed.report = Some(serde_json::json!({ "heads": heads }));
        Ok(installed)
    }

    fn images(&self) -> RangeInclusive<usize> {
        1..=usize::MAX
    }
}

/// Multiplies each head's output by its gain.
struct ScaleHeads {
    gains: Gains,
}

impl SequenceHooks for ScaleHeads {
    fn wants(&self, point: HookPoint, layer: usize) -> bool {
        point == HookPoint::HeadOutputs && self.gains.get(layer).is_some_and(Option::is_some)
    }

    fn head_outputs(&mut self, site: &AttentionSite, outputs: Tensor) -> Result<Tensor> {
        match &self.gains[site.layer] {
            Some(g) => scale(&outputs, g),
            None => Ok(outputs),
        }
    }
}

fn scale(outputs: &Tensor, gains: &[f32]) -> Result<Tensor> {
    let g = Tensor::new(gains, outputs.device())?
        .to_dtype(outputs.dtype())?
        .reshape((gains.len(), 1, 1))?;
    outputs.broadcast_mul(&g)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Text,
    Image,
}

struct Selection {
    /// The text-only branch's last-row head outputs per layer, (heads x head_dim).
    text_last: Vec<Option<Vec<Vec<f32>>>>,
    gains: Vec<Option<Vec<f32>>>,
}

/// The lockstep selection pass: the text branch records, the image branch compares and picks,
/// then both are reinforced before their layer's `o_proj`.
struct SelectionHooks {
    role: Role,
    alpha: f32,
    layers: Vec<usize>,
    state: Arc<Mutex<Selection>>,
}

impl SequenceHooks for SelectionHooks {
    fn wants(&self, point: HookPoint, layer: usize) -> bool {
        point == HookPoint::HeadOutputs && self.layers.contains(&layer)
    }

    fn observe_head_outputs(&mut self, site: &AttentionSite, outputs: &Tensor) -> Result<()> {
        let last = last_rows(outputs)?;
        let mut state = self.state.lock().expect("not poisoned");
        match self.role {
            Role::Text => state.text_last[site.layer] = Some(last),
            Role::Image => {
                let text = state.text_last[site.layer]
                    .take()
                    .ok_or_else(|| candle_core::Error::msg("VHR: text branch not recorded"))?;
                let vhd: Vec<f64> = last
                    .iter()
                    .zip(&text)
                    .map(|(a, b)| distance(a, b))
                    .collect();
                let ta: Vec<f64> = text.iter().map(|b| squared_norm(b)).collect();
                let gains = select_heads(&vhd, &ta)
                    .into_iter()
                    .map(|chosen| if chosen { self.alpha } else { 1.0 })
                    .collect();
                state.gains[site.layer] = Some(gains);
            }
        }
        Ok(())
    }

    fn head_outputs(&mut self, site: &AttentionSite, outputs: Tensor) -> Result<Tensor> {
        let state = self.state.lock().expect("not poisoned");
        match &state.gains[site.layer] {
            Some(g) => scale(&outputs, g),
            None => Ok(outputs),
        }
    }
}

/// Each head's output at the last query row: (heads, q_len, head_dim) -> heads x head_dim.
fn last_rows(outputs: &Tensor) -> Result<Vec<Vec<f32>>> {
    let q_len = outputs.dim(1)?;
    outputs
        .narrow(1, q_len - 1, 1)?
        .squeeze(1)?
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()
}

fn distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum::<f64>()
        .sqrt()
}

fn squared_norm(a: &[f32]) -> f64 {
    a.iter().map(|&x| (x as f64).powi(2)).sum()
}

/// The reinforced heads of one layer (spec §2 step 2): heads whose VHD and text-only
/// attention both exceed mean + std lose their VHD; the heads with VHD above the median are
/// chosen. Sample std and the lower median, as torch computes them.
pub fn select_heads(vhd: &[f64], text_attention: &[f64]) -> Vec<bool> {
    let threshold = |v: &[f64]| {
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
        mean + var.sqrt()
    };
    let (vhd_limit, ta_limit) = (threshold(vhd), threshold(text_attention));
    let cleaned: Vec<f64> = vhd
        .iter()
        .zip(text_attention)
        .map(|(&d, &t)| {
            if d > vhd_limit && t > ta_limit {
                0.0
            } else {
                d
            }
        })
        .collect();
    let mut sorted = cleaned.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[(sorted.len() - 1) / 2];
    cleaned.iter().map(|&d| d > median).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_four_head_example() {
        let chosen = select_heads(&[0.1, 0.5, 3.0, 0.2], &[1.0, 1.0, 10.0, 1.0]);
        assert_eq!(chosen, vec![false, true, false, true]);
    }

    #[test]
    fn distinct_vhd_without_outliers_picks_half() {
        let vhd = [0.3, 0.1, 0.4, 0.2, 0.6, 0.5];
        let chosen = select_heads(&vhd, &[1.0; 6]);
        assert_eq!(chosen.iter().filter(|&&c| c).count(), 3);
        assert_eq!(chosen, vec![false, false, true, false, true, true]);
    }

    #[test]
    fn default_layers_rescale_llava() {
        let mut expected = vec![1];
        expected.extend(18..32);
        assert_eq!(default_layers(32), expected);
        assert_eq!(default_layers(6), vec![1, 3, 4, 5]);
    }
}
