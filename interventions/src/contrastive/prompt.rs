//! `prompt` mode: the same model on a contrasting prompt, run as a branch sequence beside the
//! main one (CD's same-model amateur with a prefix, or LQCD's leading query).

use super::default_alpha;
use super::pair::{Contrast, ContrastFields, Rule, Space};
use crate::params::{from_value, InterventionError};
use crate::{Branch, BranchPrompt, Installed, Intervention};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    mode: String,
    contrast_prompt: Option<String>,
    contrast_prefix: Option<String>,
    #[serde(default = "extrapolate")]
    rule: Rule,
    beta: Option<f64>,
    lambda: Option<f64>,
    #[serde(default = "default_alpha")]
    alpha: f64,
    space: Option<Space>,
    #[serde(default = "one")]
    temperature: f64,
}

fn extrapolate() -> Rule {
    Rule::Extrapolate
}

fn one() -> f64 {
    1.0
}

/// Contrast with the same model on another prompt, run as a branch of the request.
#[derive(Debug, Clone, Serialize)]
pub struct PromptContrast {
    pub mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contrast_prompt: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contrast_prefix: Option<String>,
    #[serde(flatten)]
    pub contrast: Contrast,
    pub temperature: f64,
}

impl PromptContrast {
    pub fn from_request(params: Value) -> std::result::Result<Self, InterventionError> {
        let req: Request = from_value(params)?;
        if req.mode != "prompt" {
            return Err(InterventionError::new("mode", "expected `prompt`"));
        }
        if req.contrast_prompt.is_some() == req.contrast_prefix.is_some() {
            return Err(InterventionError::new(
                "contrast_prompt",
                "give exactly one of `contrast_prompt` (replaces the last user message) or \
                 `contrast_prefix` (goes in front of it)",
            ));
        }
        let contrast = Contrast::new(ContrastFields {
            rule: req.rule,
            beta: req.beta,
            lambda: req.lambda,
            alpha: req.alpha,
            space: req.space,
            temperature: req.temperature,
            temperature_field: "temperature",
            default_beta: 1.0,
        })?;
        Ok(Self {
            mode: "prompt",
            contrast_prompt: req.contrast_prompt,
            contrast_prefix: req.contrast_prefix,
            contrast,
            temperature: req.temperature,
        })
    }

    /// The unified step for one row (see [`Contrast::combine`]).
    pub fn combine(&self, positive: &[f32], negative: &[f32]) -> Vec<f32> {
        self.contrast.combine(positive, negative)
    }
}

impl Intervention for PromptContrast {
    fn name(&self) -> &'static str {
        "contrastive_decoding"
    }

    fn resolved(&self) -> Value {
        serde_json::to_value(self).expect("plain data serializes")
    }

    fn install(&self) -> Installed {
        self.contrast.install()
    }

    fn branches(&self) -> Vec<Branch> {
        if self.contrast.is_neutral() {
            return Vec::new();
        }
        let prompt = match (&self.contrast_prompt, &self.contrast_prefix) {
            (Some(text), _) => BranchPrompt::Replace(text.clone()),
            (None, Some(prefix)) => BranchPrompt::Prefix(prefix.clone()),
            (None, None) => unreachable!("validated in from_request"),
        };
        vec![Branch {
            prompt,
            model: None,
            image_noise: None,
        }]
    }
}
