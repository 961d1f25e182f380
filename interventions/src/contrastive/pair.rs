//! The spec's unified step for two branches (§4): a plausibility mask from the positive
//! branch, then `w+ u+ - w- u-` on it, in logit or log-probability space.

use super::log_softmax;
use crate::params::{check_range, InterventionError};
use crate::{Installed, LogitsProcessor};
use attune_models::Decoder;
use candle_core::Result;
use serde::{Deserialize, Serialize};

/// How the two branches combine (spec §4 step 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rule {
    /// (1 + beta) u+ - beta u-: VCD, LQCD, O'Brien & Lewis.
    Extrapolate,
    /// u+ - lambda u-: Li et al.'s CD.
    Difference,
}

/// The space the branches are compared in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Space {
    Logits,
    /// log_softmax(z+) and log_softmax(z- / temperature).
    Logprobs,
}

/// Validated combination parameters shared by the two-branch modes. Serializes as `rule`,
/// `beta` or `lambda`, `alpha` and `space`; each mode names its own temperature field.
#[derive(Debug, Clone, Serialize)]
pub struct Contrast {
    pub rule: Rule,
    /// beta (extrapolate) or lambda (difference).
    #[serde(skip)]
    pub weight: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lambda: Option<f64>,
    pub alpha: f64,
    pub space: Space,
    /// Temperature of the contrast branch in log-probability space.
    #[serde(skip)]
    pub temperature: f64,
}

/// The request fields of a two-branch mode, before validation.
pub struct ContrastFields<'a> {
    pub rule: Rule,
    pub beta: Option<f64>,
    pub lambda: Option<f64>,
    pub alpha: f64,
    pub space: Option<Space>,
    pub temperature: f64,
    /// The request's name for `temperature`, for error messages.
    pub temperature_field: &'a str,
    /// beta when `rule` is extrapolate and none is given (lambda defaults to 1).
    pub default_beta: f64,
}

impl Contrast {
    pub fn new(f: ContrastFields) -> std::result::Result<Self, InterventionError> {
        let (weight, beta, lambda, field) = match f.rule {
            Rule::Extrapolate => {
                if f.lambda.is_some() {
                    return Err(InterventionError::new(
                        "lambda",
                        "goes with `rule: difference`; use `beta`",
                    ));
                }
                let b = f.beta.unwrap_or(f.default_beta);
                (b, Some(b), None, "beta")
            }
            Rule::Difference => {
                if f.beta.is_some() {
                    return Err(InterventionError::new(
                        "beta",
                        "goes with `rule: extrapolate`; use `lambda`",
                    ));
                }
                let l = f.lambda.unwrap_or(1.0);
                (l, None, Some(l), "lambda")
            }
        };
        check_range(field, weight, 0.0, 100.0, false)?;
        check_range("alpha", f.alpha, 0.0, 1.0, false)?;
        check_range(f.temperature_field, f.temperature, 0.0, 100.0, true)?;
        Ok(Self {
            rule: f.rule,
            weight,
            beta,
            lambda,
            alpha: f.alpha,
            space: f.space.unwrap_or(match f.rule {
                Rule::Extrapolate => Space::Logits,
                Rule::Difference => Space::Logprobs,
            }),
            temperature: f.temperature,
        })
    }

    /// No contrast weight and no mask: the base distribution, so nothing needs to run.
    pub fn is_neutral(&self) -> bool {
        self.weight == 0.0 && self.alpha == 0.0
    }

    /// The processor that combines the branches, or nothing when neutral.
    pub fn install(&self) -> Installed {
        if self.is_neutral() {
            return Installed::default();
        }
        Installed::processor(ContrastProcessor(self.clone()))
    }

    /// The unified step for one row. A contrast branch with a longer or shorter vocabulary
    /// (padded lm_heads) is compared on the common part; tokens past it are masked.
    pub fn combine(&self, positive: &[f32], negative: &[f32]) -> Vec<f32> {
        let (w_pos, w_neg) = match self.rule {
            Rule::Extrapolate => (1.0 + self.weight, self.weight),
            Rule::Difference => (1.0, self.weight),
        };
        let (u_pos, u_neg): (Vec<f64>, Vec<f64>) = match self.space {
            Space::Logits => (
                positive.iter().map(|&v| v as f64).collect(),
                negative.iter().map(|&v| v as f64).collect(),
            ),
            Space::Logprobs => {
                let cooled: Vec<f32> = negative
                    .iter()
                    .map(|&v| (v as f64 / self.temperature) as f32)
                    .collect();
                (log_softmax(positive), log_softmax(&cooled))
            }
        };
        let best = positive.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let floor = if self.alpha > 0.0 {
            best + self.alpha.ln()
        } else {
            f64::NEG_INFINITY
        };
        let mut scores = vec![f32::NEG_INFINITY; positive.len()];
        for (s, (&z, (&up, &un))) in scores
            .iter_mut()
            .zip(positive.iter().zip(u_pos.iter().zip(&u_neg)))
        {
            if (z as f64) >= floor {
                *s = (w_pos * up - w_neg * un) as f32;
            }
        }
        scores
    }
}

/// Applies a [`Contrast`] to the main logits and the first branch's.
struct ContrastProcessor(Contrast);

impl LogitsProcessor for ContrastProcessor {
    fn process(
        &mut self,
        logits: Vec<f32>,
        branches: &[Vec<f32>],
        _: &Decoder,
        _: &[u32],
    ) -> Result<Vec<f32>> {
        let negative = branches.first().ok_or_else(|| {
            candle_core::Error::msg("contrastive decoding: the branch is missing")
        })?;
        Ok(self.0.combine(&logits, negative))
    }
}
