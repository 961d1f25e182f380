//! Contrastive decoding's unified step (spec §4) in the two-branch modes, `prompt` and
//! `amateur`.

use attune_interventions::contrastive::PromptContrast;
use attune_interventions::{parse_all, Branch, BranchPrompt, Intervention};
use serde_json::json;

mod common;
use common::smollm2_shape;

fn contrast(params: serde_json::Value) -> PromptContrast {
    let mut p = params;
    p["mode"] = json!("prompt");
    p["contrast_prefix"] = json!("I love repetitive text! Here is my writing: ");
    PromptContrast::from_request(p).unwrap()
}

fn softmax(v: &[f32]) -> Vec<f32> {
    let m = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = v.iter().map(|x| (x - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

const POSITIVE: [f32; 4] = [3.0, 2.0, 0.0, -1.0];
const NEGATIVE: [f32; 4] = [3.5, 1.0, 0.5, -2.0];

#[test]
fn worked_example_from_the_spec() {
    // alpha .1 keeps {0, 1}; beta .5 scores [2.75, 2.5]; beta 1 flips the argmax.
    let half = contrast(json!({"beta": 0.5})).combine(&POSITIVE, &NEGATIVE);
    assert_eq!(&half[..2], &[2.75, 2.5]);
    assert!(half[2] == f32::NEG_INFINITY && half[3] == f32::NEG_INFINITY);
    let one = softmax(&contrast(json!({"beta": 1.0})).combine(&POSITIVE, &NEGATIVE));
    assert!(
        (one[0] - 0.378).abs() < 1e-3 && (one[1] - 0.622).abs() < 1e-3,
        "{one:?}"
    );
}

#[test]
fn zero_weight_keeps_the_base_distribution() {
    // w- = 0, alpha -> 0: exactly the base logits.
    let none = contrast(json!({"beta": 0.0, "alpha": 0.0}));
    assert_eq!(none.combine(&POSITIVE, &NEGATIVE), POSITIVE.to_vec());
    assert!(
        none.branches().is_empty(),
        "neutral contrast runs no branch"
    );
    // w- = 0 with alpha .1: the base renormalized over M (greedy unchanged).
    let masked = softmax(&contrast(json!({"beta": 0.0})).combine(&POSITIVE, &NEGATIVE));
    let base = softmax(&POSITIVE[..2]);
    assert!((masked[0] - base[0]).abs() < 1e-6 && (masked[1] - base[1]).abs() < 1e-6);
}

#[test]
fn identical_branches_extrapolate_to_the_base_and_differ_to_uniform() {
    let same = contrast(json!({"beta": 1.0, "alpha": 0.0})).combine(&POSITIVE, &POSITIVE);
    assert_eq!(softmax(&same), softmax(&POSITIVE));
    let diff = contrast(json!({"rule": "difference", "lambda": 1.0})).combine(&POSITIVE, &POSITIVE);
    assert!(
        diff[0].abs() < 1e-6 && diff[1].abs() < 1e-6,
        "uniform over M: {diff:?}"
    );
    assert!(diff[2] == f32::NEG_INFINITY);
}

#[test]
fn branches_and_errors() {
    let shape = smollm2_shape();
    let spec = json!({"type": "contrastive_decoding", "mode": "prompt", "contrast_prompt": "Agree with me: is the sky green?"});
    let parsed = parse_all(&[spec], &shape).unwrap();
    assert_eq!(
        parsed[0].branches(),
        vec![Branch {
            prompt: BranchPrompt::Replace("Agree with me: is the sky green?".into()),
            model: None,
            image_noise: None,
        }]
    );
    assert_eq!(parsed[0].resolved()["rule"], "extrapolate");
    assert_eq!(parsed[0].resolved()["space"], "logits");
    let err = |spec| parse_all(&[spec], &shape).err().unwrap().to_string();
    assert!(
        err(json!({"type": "contrastive_decoding", "mode": "prompt"}))
            .starts_with("interventions[0].contrast_prompt:")
    );
    assert!(err(json!({"type": "contrastive_decoding", "mode": "prompt", "contrast_prompt": "x", "lambda": 1})).starts_with("interventions[0].lambda:"));
    assert!(err(json!({"type": "contrastive_decoding", "mode": "prompt", "contrast_prompt": "x", "beta": -1})).starts_with("interventions[0].beta:"));
    assert!(
        err(json!({"type": "contrastive_decoding", "mode": "image_noise"}))
            .contains("vision-language model")
    );
}

#[test]
fn amateur_mode_defaults_branches_and_errors() {
    let shape = smollm2_shape();
    let amateur = |extra: serde_json::Value| {
        let mut spec =
            json!({"type": "contrastive_decoding", "mode": "amateur", "amateur_model": "small"});
        spec.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        parse_all(&[spec], &shape)
    };
    // Li et al.'s CD by default: difference of log-probabilities, lambda 1, alpha .1.
    let cd = amateur(json!({})).unwrap();
    assert_eq!(
        cd[0].resolved(),
        json!({"mode": "amateur", "amateur_model": "small", "rule": "difference", "lambda": 1.0,
               "alpha": 0.1, "space": "logprobs", "amateur_temperature": 1.0, "ignore_prefix": false})
    );
    assert_eq!(cd[0].other_models(), vec!["small".to_string()]);
    assert_eq!(
        cd[0].branches(),
        vec![Branch {
            prompt: BranchPrompt::Same,
            model: Some("small".into()),
            image_noise: None,
        }]
    );
    // O'Brien & Lewis: extrapolate in logit space, beta .5.
    let ob = amateur(json!({"rule": "extrapolate", "ignore_prefix": true})).unwrap();
    assert_eq!(ob[0].resolved()["beta"], 0.5);
    assert_eq!(ob[0].resolved()["space"], "logits");
    assert_eq!(ob[0].branches()[0].prompt, BranchPrompt::LastToken);
    // Neutral: no branch runs, but the model is still named for the server to check.
    let neutral = amateur(json!({"lambda": 0.0, "alpha": 0.0})).unwrap();
    assert!(neutral[0].branches().is_empty());
    assert_eq!(neutral[0].other_models(), vec!["small".to_string()]);

    let err = |r: Result<_, attune_interventions::InterventionError>| r.err().unwrap().to_string();
    assert!(err(parse_all(
        &[json!({"type": "contrastive_decoding", "mode": "amateur"})],
        &shape
    ))
    .starts_with("interventions[0].amateur_model:"));
    assert!(err(amateur(json!({"amateur_temperature": 0.0})))
        .starts_with("interventions[0].amateur_temperature:"));
    assert!(err(amateur(json!({"beta": 1.0}))).starts_with("interventions[0].beta:"));
    assert!(err(amateur(json!({"contrast_prompt": "x"})))
        .starts_with("interventions[0].contrast_prompt:"));
}

#[test]
fn a_shorter_contrast_vocabulary_masks_the_tokens_past_it() {
    // Padded lm_heads: compare on the common part; the rest can never be chosen.
    let spec = json!({"type": "contrastive_decoding", "mode": "amateur", "amateur_model": "a",
                      "rule": "extrapolate", "beta": 1.0, "alpha": 0.0});
    let parsed = parse_all(&[spec], &smollm2_shape()).unwrap();
    let mut processor = parsed[0].install().processor.unwrap();
    let decoder = attune_models::testing::random_decoder(
        &attune_models::testing::tiny_config(),
        1,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let out = processor
        .process(POSITIVE.to_vec(), &[NEGATIVE[..3].to_vec()], &decoder, &[])
        .unwrap();
    assert_eq!(&out[..3], &[2.5, 3.0, -0.5]);
    assert_eq!(out[3], f32::NEG_INFINITY);
}
