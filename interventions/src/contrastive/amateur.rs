//! `amateur` mode (Li et al., ACL 2023; O'Brien & Lewis 2023): contrast with another served
//! model that shares the tokenizer. The amateur runs as a branch sequence on its own model in
//! the same engine step; the server checks that the model exists and the vocabularies match.

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
    amateur_model: Option<String>,
    #[serde(default = "difference")]
    rule: Rule,
    beta: Option<f64>,
    lambda: Option<f64>,
    #[serde(default = "default_alpha")]
    alpha: f64,
    space: Option<Space>,
    #[serde(default = "one")]
    amateur_temperature: f64,
    #[serde(default)]
    ignore_prefix: bool,
}

fn difference() -> Rule {
    Rule::Difference
}

fn one() -> f64 {
    1.0
}

/// Contrast with a smaller model: Li et al.'s `difference` in log-probability space by default
/// (lambda 1), or O'Brien & Lewis's `extrapolate` in logit space (beta 0.5).
#[derive(Debug, Clone, Serialize)]
pub struct AmateurContrast {
    pub mode: &'static str,
    pub amateur_model: String,
    #[serde(flatten)]
    pub contrast: Contrast,
    pub amateur_temperature: f64,
    /// The amateur sees only the last prompt token and the continuation (CD's `ignore_prefix`).
    pub ignore_prefix: bool,
}

impl AmateurContrast {
    pub fn from_request(params: Value) -> std::result::Result<Self, InterventionError> {
        let req: Request = from_value(params)?;
        if req.mode != "amateur" {
            return Err(InterventionError::new("mode", "expected `amateur`"));
        }
        let amateur_model = req.amateur_model.filter(|m| !m.is_empty()).ok_or_else(|| {
            InterventionError::new(
                "amateur_model",
                "is required: the id of another served model with the same tokenizer",
            )
        })?;
        let contrast = Contrast::new(ContrastFields {
            rule: req.rule,
            beta: req.beta,
            lambda: req.lambda,
            alpha: req.alpha,
            space: req.space,
            temperature: req.amateur_temperature,
            temperature_field: "amateur_temperature",
            default_beta: 0.5,
        })?;
        Ok(Self {
            mode: "amateur",
            amateur_model,
            contrast,
            amateur_temperature: req.amateur_temperature,
            ignore_prefix: req.ignore_prefix,
        })
    }
}

impl Intervention for AmateurContrast {
    fn name(&self) -> &'static str {
        "contrastive_decoding"
    }

    fn resolved(&self) -> Value {
        serde_json::to_value(self).expect("plain data serializes")
    }

    fn install(&self) -> Installed {
        self.contrast.install()
    }

    fn other_models(&self) -> Vec<String> {
        vec![self.amateur_model.clone()]
    }

    fn branches(&self) -> Vec<Branch> {
        if self.contrast.is_neutral() {
            return Vec::new();
        }
        vec![Branch {
            prompt: if self.ignore_prefix {
                BranchPrompt::LastToken
            } else {
                BranchPrompt::Same
            },
            model: Some(self.amateur_model.clone()),
            image_noise: None,
        }]
    }
}
