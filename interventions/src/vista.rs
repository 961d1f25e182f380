//! VISTA (Li et al., ICML 2025; spec shared/spec/vlm-interventions.md §4), two parts usable
//! separately or together:
//! - VSV, the visual steering vector: per request, the direction "with image minus without
//!   image" of the last prompt token's hidden state at every layer (two extra prefills, both
//!   unsteered); during generation each layer's MLP output (the released code; `site:
//!   "residual"` steers the post-block residual as the paper describes) is turned toward it,
//!   norm preserved, at every position: `u = m/|m| + lambda c v`, `m' = |m| u/|u|` with the
//!   code's gain `c = 1 + max(0, cos(m, -v))` (1 on the residual site).
//! - SLA, self-logits augmentation: `z = gamma mean_l lm_head(h_l) + (1 - gamma) z_final`
//!   over intermediate layers' hidden states (no final norm), before sampling.

use crate::capture::{take_rows, CaptureLastRow};
use crate::params::{check_indices, check_range, from_value, InterventionError};
use crate::{Installed, Intervention, LogitsProcessor, ModelShape, PromptView};
use attune_models::{
    Decoder, DecoderInput, HookPoint, HookStack, LogitsFor, RowSite, SequenceHooks, SequenceStep,
};
use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};

/// Rows per piece of the extra prefills.
const EXTRA_PREFILL_PIECE: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SteeringSite {
    /// Each layer's MLP output (the released code).
    Mlp,
    /// The residual stream leaving each layer (the paper).
    Residual,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    #[serde(default = "default_lambda")]
    lambda: f64,
    #[serde(default = "default_site")]
    site: SteeringSite,
    layers: Option<Vec<usize>>,
    #[serde(default = "default_gamma")]
    gamma: f64,
    sla_layers: Option<Vec<usize>>,
}

fn default_lambda() -> f64 {
    0.1
}
fn default_site() -> SteeringSite {
    SteeringSite::Mlp
}
fn default_gamma() -> f64 {
    0.3
}

/// The SLA window rescaled from LLaVA-1.5's 25..30 of 32: layers L-7..L-2.
pub fn default_sla_layers(num_layers: usize) -> Vec<usize> {
    (num_layers.saturating_sub(7)..num_layers.saturating_sub(1)).collect()
}

#[derive(Debug, Clone, Serialize)]
pub struct Vista {
    /// Steering strength (0 = no VSV). The authors use 0.17 (CHAIR), 0.01 (POPE), 0.1 (MMHal).
    pub lambda: f64,
    pub site: SteeringSite,
    /// Steered layers.
    pub layers: Vec<usize>,
    /// SLA mixing weight (0 = no SLA).
    pub gamma: f64,
    /// Layers whose outputs SLA averages.
    pub sla_layers: Vec<usize>,
}

impl Vista {
    pub fn from_request(
        params: Value,
        shape: &ModelShape,
    ) -> std::result::Result<Self, InterventionError> {
        let req: Request = from_value(params)?;
        check_range("lambda", req.lambda, 0.0, 100.0, false)?;
        check_range("gamma", req.gamma, 0.0, 1.0, false)?;
        let n = shape.num_layers;
        let layers = req.layers.unwrap_or_else(|| (0..n).collect());
        check_indices("layers", &layers, n, "layer")?;
        let sla_layers = req.sla_layers.unwrap_or_else(|| default_sla_layers(n));
        check_indices("sla_layers", &sla_layers, n, "layer")?;
        if req.gamma > 0.0 && sla_layers.is_empty() {
            return Err(InterventionError::new(
                "sla_layers",
                "must name at least one layer when gamma > 0",
            ));
        }
        Ok(Self {
            lambda: req.lambda,
            site: req.site,
            layers,
            gamma: req.gamma,
            sla_layers,
        })
    }

    /// The unit steering vector of every layer (`None` where with and without the image agree).
    pub fn steering_vectors(
        &self,
        decoder: &Decoder,
        prompt: &PromptView,
    ) -> Result<Vec<Option<Vec<f32>>>> {
        let n = decoder.config().num_layers;
        let with_image = last_hidden_states(decoder, prompt.pieces(EXTRA_PREFILL_PIECE)?, n)?;
        let text = prompt.without_images();
        let pieces = text
            .chunks(EXTRA_PREFILL_PIECE)
            .map(|c| DecoderInput::Tokens(c.to_vec()))
            .collect();
        let without = last_hidden_states(decoder, pieces, n)?;
        Ok(with_image
            .iter()
            .zip(&without)
            .map(|(pos, neg)| {
                let v: Vec<f32> = pos.iter().zip(neg).map(|(a, b)| a - b).collect();
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                (norm > 0.0).then(|| v.iter().map(|x| x / norm).collect())
            })
            .collect())
    }
}

/// The last position's output of every layer (pre-final-norm) for a prompt fed in pieces.
fn last_hidden_states(
    decoder: &Decoder,
    pieces: Vec<DecoderInput>,
    num_layers: usize,
) -> Result<Vec<Vec<f32>>> {
    let captured = Arc::new(Mutex::new(vec![None; num_layers]));
    let mut hooks = CaptureLastRow {
        layers: (1..=num_layers).collect(),
        captured: captured.clone(),
    };
    let mut cache = decoder.new_cache();
    for piece in pieces {
        let mut step = [SequenceStep::new(piece, &mut cache)
            .with_hooks(&mut hooks)
            .with_logits(LogitsFor::None)];
        decoder.forward(&mut step)?;
    }
    let rows = captured.lock().expect("not poisoned").clone();
    rows.into_iter()
        .map(|row| {
            row.ok_or_else(|| candle_core::Error::msg("VISTA: a layer was not captured"))?
                .squeeze(0)?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()
        })
        .collect()
}

impl Intervention for Vista {
    fn name(&self) -> &'static str {
        "vista"
    }

    fn resolved(&self) -> Value {
        serde_json::to_value(self).expect("plain data serializes")
    }

    fn install(&self) -> Installed {
        Installed::default()
    }

    fn install_for(&self, decoder: &Decoder, prompt: &PromptView) -> Result<Installed> {
        let mut hooks: Vec<Box<dyn SequenceHooks>> = Vec::new();
        if self.lambda > 0.0 && prompt.has_images() {
            let mut vectors = self.steering_vectors(decoder, prompt)?;
            for (l, v) in vectors.iter_mut().enumerate() {
                if !self.layers.contains(&l) {
                    *v = None;
                }
            }
            hooks.push(Box::new(Steer {
                vectors,
                lambda: self.lambda as f32,
                site: self.site,
            }));
        }
        let mut processor = None;
        if self.gamma > 0.0 {
            // Layer l's output is the residual stream at depth l + 1.
            let depths: Vec<usize> = self.sla_layers.iter().map(|l| l + 1).collect();
            let captured = Arc::new(Mutex::new(vec![None; depths.len()]));
            hooks.push(Box::new(CaptureLastRow {
                layers: depths,
                captured: captured.clone(),
            }));
            processor = Some(Box::new(SelfLogitsAugmentation {
                gamma: self.gamma,
                captured,
            }) as Box<dyn LogitsProcessor>);
        }
        Ok(Installed {
            hooks: (!hooks.is_empty()).then(|| Box::new(HookStack(hooks)) as Box<_>),
            processor,
            ..Installed::default()
        })
    }

    fn images(&self) -> RangeInclusive<usize> {
        1..=usize::MAX
    }
}

/// VSV's steering of every row of the chosen layers.
struct Steer {
    /// Unit vectors per layer.
    vectors: Vec<Option<Vec<f32>>>,
    lambda: f32,
    site: SteeringSite,
}

impl Steer {
    /// The layer a hook call at `point` / `layer` steers (residual depth l + 1 = layer l).
    fn layer_of(&self, point: HookPoint, layer: usize) -> Option<usize> {
        match (self.site, point) {
            (SteeringSite::Mlp, HookPoint::MlpOutput) => Some(layer),
            (SteeringSite::Residual, HookPoint::Residual) => layer.checked_sub(1),
            _ => None,
        }
    }

    fn steer_rows(&self, layer: usize, rows: Tensor, gain: bool) -> Result<Tensor> {
        let Some(v) = &self.vectors[layer] else {
            return Ok(rows);
        };
        let (n, d) = rows.dims2()?;
        let mut data = rows.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        for row in data.chunks_exact_mut(d) {
            steer(row, v, self.lambda, gain);
        }
        Tensor::from_vec(data, (n, d), rows.device())?.to_dtype(rows.dtype())
    }
}

impl SequenceHooks for Steer {
    fn wants(&self, point: HookPoint, layer: usize) -> bool {
        self.layer_of(point, layer)
            .and_then(|l| self.vectors.get(l))
            .is_some_and(Option::is_some)
    }

    fn mlp_output(&mut self, site: &RowSite, output: Tensor) -> Result<Tensor> {
        self.steer_rows(site.layer, output, true)
    }

    fn residual(&mut self, site: &RowSite, hidden: Tensor) -> Result<Tensor> {
        self.steer_rows(site.layer - 1, hidden, false)
    }
}

/// One row turned toward the unit vector `v`, norm kept (spec §4 step 4); `gain` adds the
/// code's `c = 1 + max(0, cos(m, -v))`.
pub fn steer(m: &mut [f32], v: &[f32], lambda: f32, gain: bool) {
    let norm = m.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm == 0.0 {
        return;
    }
    let c = if gain {
        let cos_neg = -m.iter().zip(v).map(|(a, b)| a * b).sum::<f32>() / norm;
        1.0 + cos_neg.max(0.0)
    } else {
        1.0
    };
    let u: Vec<f32> = m
        .iter()
        .zip(v)
        .map(|(a, b)| a / norm + lambda * c * b)
        .collect();
    let u_norm = u.iter().map(|x| x * x).sum::<f32>().sqrt();
    for (out, x) in m.iter_mut().zip(&u) {
        *out = norm * x / u_norm;
    }
}

/// SLA: mixes the mean logits of intermediate layers into the final ones.
struct SelfLogitsAugmentation {
    gamma: f64,
    captured: Arc<Mutex<Vec<Option<Tensor>>>>,
}

impl LogitsProcessor for SelfLogitsAugmentation {
    fn process(
        &mut self,
        logits: Vec<f32>,
        _: &[Vec<f32>],
        decoder: &Decoder,
        _: &[u32],
    ) -> Result<Vec<f32>> {
        let rows = take_rows(&self.captured, "VISTA SLA")?;
        let augmented = decoder
            .logits_from_hidden(&Tensor::cat(&rows, 0)?, false)?
            .mean(0)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        Ok(sla_mix(&logits, &augmented, self.gamma))
    }
}

/// `gamma * augmented + (1 - gamma) * final`, on raw logits.
pub fn sla_mix(final_logits: &[f32], augmented: &[f32], gamma: f64) -> Vec<f32> {
    final_logits
        .iter()
        .zip(augmented)
        .map(|(&z, &a)| (gamma * a as f64 + (1.0 - gamma) * z as f64) as f32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_steering_examples() {
        let v = [1.0, 0.0];
        let mut m = [3.0, 4.0];
        steer(&mut m, &v, 0.5, true);
        assert!(
            (m[0] - 4.0437).abs() < 1e-4 && (m[1] - 2.9409).abs() < 1e-4,
            "{m:?}"
        );
        let mut m = [-3.0, 4.0];
        steer(&mut m, &v, 0.5, true);
        assert!(
            (m[0] - 1.2127).abs() < 1e-4 && (m[1] - 4.8507).abs() < 1e-4,
            "{m:?}"
        );
        let norm = (m[0] * m[0] + m[1] * m[1]).sqrt();
        assert!((norm - 5.0).abs() < 1e-5);
    }

    #[test]
    fn zero_lambda_keeps_the_row() {
        let mut m = [3.0, 4.0, -1.5];
        steer(&mut m, &[0.0, 1.0, 0.0], 0.0, true);
        let expected = [3.0f32, 4.0, -1.5];
        assert!(m.iter().zip(&expected).all(|(a, b)| (a - b).abs() < 1e-6));
    }

    #[test]
    fn spec_sla_example() {
        let mixed = sla_mix(&[2.0, 0.0], &[0.0, 2.0], 0.3);
        assert!((mixed[0] - 1.4).abs() < 1e-6 && (mixed[1] - 0.6).abs() < 1e-6);
        assert_eq!(sla_mix(&[2.0, -1.0], &[5.0, 7.0], 0.0), vec![2.0, -1.0]);
    }

    #[test]
    fn sla_window_of_llava() {
        assert_eq!(default_sla_layers(32), (25..31).collect::<Vec<_>>());
        assert_eq!(default_sla_layers(6), (0..5).collect::<Vec<_>>());
    }
}
