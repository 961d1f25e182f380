//! Contrastive decoding's unified step (spec §4) in `prompt` mode.

use attune_interventions::contrastive::PromptContrast;
use attune_interventions::{parse_all, BranchPrompt, Intervention};
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
        vec![BranchPrompt::Replace(
            "Agree with me: is the sky green?".into()
        )]
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
        err(json!({"type": "contrastive_decoding", "mode": "amateur"}))
            .contains("not implemented yet")
    );
}
