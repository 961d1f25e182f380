//! Contrastive decoding (spec §4), one intervention with a `mode`:
//! - `dola`: the final layer against a premature layer of the same pass ([`Dola`]);
//! - `prompt`: the same model on a contrasting prompt, run as a branch sequence beside the main
//!   one ([`PromptContrast`]);
//! - `amateur`: another served model that shares the tokenizer, run as a branch on that model
//!   ([`AmateurContrast`]).
//!
//! - `image_noise` (VCD): the same prompt with the request's images noised, run as a branch
//!   ([`ImageNoiseContrast`]); needs a VLM and an image.
//!
//! The two-branch modes combine their logits by the spec's unified step ([`Contrast`]).

mod amateur;
mod dola;
mod image_noise;
mod pair;
mod prompt;

pub use amateur::AmateurContrast;
pub use dola::{dola_bucket, dola_scores, js_divergence, Dola, LayerChoice};
pub use image_noise::{ImageNoise, ImageNoiseContrast};
pub use pair::{Contrast, Rule, Space};
pub use prompt::PromptContrast;

use crate::params::InterventionError;
use crate::{Intervention, ModelKind, ModelShape};
use serde_json::Value;

/// Parses any `contrastive_decoding` request by its `mode`.
pub fn from_request(
    params: Value,
    shape: &ModelShape,
) -> std::result::Result<Box<dyn Intervention>, InterventionError> {
    let mode = params
        .get("mode")
        .and_then(Value::as_str)
        .map(str::to_string);
    match mode.as_deref() {
        Some("dola") => Ok(Box::new(Dola::from_request(params, shape)?)),
        Some("prompt") => Ok(Box::new(PromptContrast::from_request(params)?)),
        Some("amateur") => Ok(Box::new(AmateurContrast::from_request(params)?)),
        Some("image_noise") if shape.kind == ModelKind::Vlm => {
            Ok(Box::new(ImageNoiseContrast::from_request(params)?))
        }
        Some("image_noise") => Err(InterventionError::new(
            "mode",
            "`image_noise` (VCD) contrasts with a noised copy of the request's image and needs \
             a vision-language model; this model is text-only",
        )),
        Some(other) => Err(InterventionError::new(
            "mode",
            format!("unknown mode `{other}` (dola, prompt, amateur, image_noise)"),
        )),
        None => Err(InterventionError::new(
            "mode",
            "is required: dola, prompt, amateur or image_noise",
        )),
    }
}

fn default_alpha() -> f64 {
    0.1
}

/// log-softmax in f64.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&l| (l as f64 - max).exp())
            .sum::<f64>()
            .ln();
    logits.iter().map(|&l| l as f64 - lse).collect()
}
