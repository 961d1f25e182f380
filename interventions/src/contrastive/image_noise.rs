//! `image_noise` mode, VCD (Leng et al., CVPR 2024): the same model on the same prompt with a
//! diffusion-noised copy of the request's images, run as a branch in the same batch, combined
//! by extrapolation in logit space (`(1 + beta) z - beta z_noised` on the plausible tokens).

use super::default_alpha;
use super::pair::{Contrast, ContrastFields, Rule, Space};
use crate::params::{from_value, InterventionError};
use crate::{Branch, BranchPrompt, Installed, Intervention};
use attune_models::testing::SeededRng;
use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::ops::RangeInclusive;

/// VCD's forward-diffusion schedule length.
const NOISE_STEPS: usize = 1000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    mode: String,
    #[serde(default = "extrapolate")]
    rule: Rule,
    beta: Option<f64>,
    lambda: Option<f64>,
    #[serde(default = "default_alpha")]
    alpha: f64,
    space: Option<Space>,
    #[serde(default = "default_noise_step")]
    noise_step: usize,
    #[serde(default)]
    noise_seed: u64,
}

fn extrapolate() -> Rule {
    Rule::Extrapolate
}

fn default_noise_step() -> usize {
    500
}

/// Forward diffusion to step `step` on preprocessed pixels:
/// `sqrt(abar[step]) x + sqrt(1 - abar[step]) eps`, VCD's schedule
/// (`betas = sigmoid(linspace(-6, 6, 1000)) * (5e-3 - 1e-5) + 1e-5`), eps seeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ImageNoise {
    pub step: usize,
    pub seed: u64,
}

impl ImageNoise {
    /// (signal, noise) coefficients of the step.
    pub fn coefficients(&self) -> (f64, f64) {
        let abar: f64 = (0..=self.step)
            .map(|i| {
                let x = -6.0 + 12.0 * i as f64 / (NOISE_STEPS - 1) as f64;
                let sigmoid = 1.0 / (1.0 + (-x).exp());
                1.0 - (sigmoid * (5e-3 - 1e-5) + 1e-5)
            })
            .product();
        (abar.sqrt(), (1.0 - abar).sqrt())
    }

    pub fn apply(&self, pixels: &Tensor) -> Result<Tensor> {
        let (signal, noise) = self.coefficients();
        let mut rng = SeededRng::new(self.seed);
        let eps: Vec<f32> = (0..pixels.elem_count())
            .map(|_| standard_normal(&mut rng))
            .collect();
        let eps = Tensor::from_vec(eps, pixels.shape(), pixels.device())?;
        (pixels * signal)? + (eps * noise)?
    }
}

/// A standard normal draw (Box-Muller).
fn standard_normal(rng: &mut SeededRng) -> f32 {
    let u1 = ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let u2 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

/// VCD: contrast with the request's images noised.
#[derive(Debug, Clone, Serialize)]
pub struct ImageNoiseContrast {
    pub mode: &'static str,
    #[serde(flatten)]
    pub contrast: Contrast,
    pub noise_step: usize,
    pub noise_seed: u64,
}

impl ImageNoiseContrast {
    pub fn from_request(params: Value) -> std::result::Result<Self, InterventionError> {
        let req: Request = from_value(params)?;
        if req.mode != "image_noise" {
            return Err(InterventionError::new("mode", "expected `image_noise`"));
        }
        if req.noise_step >= NOISE_STEPS {
            return Err(InterventionError::new(
                "noise_step",
                format!("must be below {NOISE_STEPS} (got {})", req.noise_step),
            ));
        }
        let contrast = Contrast::new(ContrastFields {
            rule: req.rule,
            beta: req.beta,
            lambda: req.lambda,
            alpha: req.alpha,
            space: req.space,
            temperature: 1.0,
            temperature_field: "temperature",
            default_beta: 1.0,
        })?;
        Ok(Self {
            mode: "image_noise",
            contrast,
            noise_step: req.noise_step,
            noise_seed: req.noise_seed,
        })
    }
}

impl Intervention for ImageNoiseContrast {
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
        vec![Branch {
            prompt: BranchPrompt::Same,
            model: None,
            image_noise: Some(ImageNoise {
                step: self.noise_step,
                seed: self.noise_seed,
            }),
        }]
    }

    fn images(&self) -> RangeInclusive<usize> {
        1..=usize::MAX
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_matches_vcd_test_values() {
        let (s, n) = ImageNoise { step: 500, seed: 0 }.coefficients();
        assert!(
            (s - 0.86302).abs() < 1e-5 && (n - 0.50517).abs() < 1e-5,
            "{s} {n}"
        );
        let (s, n) = ImageNoise { step: 0, seed: 0 }.coefficients();
        assert!(
            (s - 0.99999).abs() < 1e-5 && (n - 0.00473).abs() < 1e-5,
            "{s} {n}"
        );
    }

    #[test]
    fn noise_is_seeded_and_standard_normal() {
        let x = Tensor::zeros(
            (3, 40, 40),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let noise = ImageNoise {
            step: NOISE_STEPS - 1,
            seed: 7,
        };
        let noised = || -> Vec<f32> {
            let t = noise.apply(&x).unwrap();
            t.flatten_all().unwrap().to_vec1().unwrap()
        };
        let a = noised();
        assert_eq!(a, noised(), "the same seed gives the same noise");
        let (_, scale) = noise.coefficients();
        let n = a.len() as f64;
        let mean = a.iter().map(|&v| v as f64).sum::<f64>() / n / scale;
        let var = a.iter().map(|&v| (v as f64 / scale).powi(2)).sum::<f64>() / n - mean * mean;
        assert!(
            mean.abs() < 0.05 && (var - 1.0).abs() < 0.05,
            "{mean} {var}"
        );
    }
}
