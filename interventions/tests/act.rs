//! ACT's invariants (spec §2 "Sanity") on known rows and a tiny seeded model.

use attune_interventions::act::calibrate;
use attune_interventions::{parse, parse_all};
use attune_models::{AttentionRows, AttentionSite, HookPoint};
use candle_core::{Device, Tensor, D};
use serde_json::json;

mod common;
use common::{in_pass_decode_logits, prefill_then_decode, smollm2_shape, tiny_shape};

/// Rows of a causal map, zero-padded on the right, as one head.
fn head(rows: &[&[f32]]) -> Tensor {
    let n = rows.len();
    let mut data = vec![0f32; n * n];
    for (i, r) in rows.iter().enumerate() {
        data[i * n..i * n + r.len()].copy_from_slice(r);
    }
    Tensor::from_vec(data, (1, n, n), &Device::Cpu).unwrap()
}

#[test]
fn worked_example_from_the_spec() {
    let probs = head(&[
        &[1.0],
        &[0.7, 0.3],
        &[0.5, 0.4, 0.1],
        &[0.4, 0.35, 0.05, 0.2],
        &[0.4, 0.3, 0.1, 0.1, 0.1],
    ]);
    let out = calibrate(&probs, &[true], 0, 0.4, 0.1)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let want: [&[f32]; 5] = [
        &[1.0],
        &[0.88, 0.12],
        &[0.70, 0.16, 0.14],
        &[0.6933, 0.14, 0.0867, 0.08],
        &[0.56, 0.12, 0.14, 0.04, 0.14],
    ];
    for (i, row) in want.iter().enumerate() {
        for (j, w) in row.iter().enumerate() {
            assert!(
                (out[i][j] - w).abs() < 1e-4,
                "row {i}: {:?} vs {row:?}",
                out[i]
            );
        }
        let sum: f32 = out[i].iter().sum();
        assert!((sum - 1.0).abs() < 1e-5);
    }
}

#[test]
fn unselected_heads_and_sinkless_maps_are_untouched() {
    let probs = head(&[&[1.0], &[0.7, 0.3], &[0.5, 0.4, 0.1]])
        .repeat((2, 1, 1))
        .unwrap();
    let out = calibrate(&probs, &[false, true], 0, 0.4, 0.1).unwrap();
    let (a, b) = (
        out.to_vec3::<f32>().unwrap(),
        probs.to_vec3::<f32>().unwrap(),
    );
    assert_eq!(a[0], b[0], "head 0 is not selected");
    assert_ne!(a[1], b[1]);
    let flat = head(&[&[1.0], &[0.5, 0.5]]);
    let same = calibrate(&flat, &[true], 0, 0.4, 0.99).unwrap();
    assert_eq!(
        same.to_vec3::<f32>().unwrap(),
        flat.to_vec3::<f32>().unwrap()
    );
}

#[test]
fn rows_with_all_mass_on_removed_sinks_stay_finite() {
    // c = [1/3, 1, 0]: key 1 is a sink after key 0, and rows 1 and 2 put everything on it.
    let probs = head(&[&[1.0], &[0.0, 1.0], &[0.0, 1.0, 0.0]]);
    let out = calibrate(&probs, &[true], 0, 0.4, 0.1).unwrap();
    let v = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(v.iter().all(|x| x.is_finite()), "{v:?}");
    assert_eq!(
        out.to_vec3::<f32>().unwrap(),
        probs.to_vec3::<f32>().unwrap()
    );
}

#[test]
fn decode_rows_use_their_own_weights_as_column_scores() {
    // One query at position 4: every key is seen by one row.
    let probs = Tensor::new(&[[[0.4f32, 0.3, 0.05, 0.2, 0.05]]], &Device::Cpu).unwrap();
    let out = calibrate(&probs, &[true], 4, 0.4, 0.1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    // Sinks {0, 1, 3}: key 0 kept, keys 1 and 3 scaled by .4; m = .5 goes .3 to the rest.
    let grow = 1.0 + 0.6 * 0.5 / 0.5;
    let want = [0.4 * grow, 0.12, 0.05 * grow, 0.08, 0.05 * grow];
    for (g, w) in out.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{out:?}");
    }
}

fn logits_with(spec: Option<serde_json::Value>) -> Vec<Vec<f32>> {
    prefill_then_decode(9, spec, &[3, 1, 4, 1, 5, 9, 2, 6], &[5, 3])
}

#[test]
fn neutral_parameters_are_bit_identical_and_real_ones_change_the_model() {
    let plain = logits_with(None);
    let layers = json!([0, 1]);
    assert_eq!(
        plain,
        logits_with(Some(json!({"type": "act", "beta": 1.0, "layers": layers})))
    );
    assert_eq!(
        plain,
        logits_with(Some(
            json!({"type": "act", "threshold": 1.0, "layers": layers})
        ))
    );
    // Default layers (2..N-2) are empty on a 2-layer model: also a no-op.
    assert_eq!(plain, logits_with(Some(json!({"type": "act"}))));
    let on = logits_with(Some(
        json!({"type": "act", "beta": 0.0, "threshold": 0.05, "layers": layers, "decode": true}),
    ));
    assert_ne!(plain, on);
}

#[test]
fn prompt_only_by_default() {
    let spec = json!({"type": "act", "layers": [0], "threshold": 0.05});
    let mut hooks = parse(&spec, &tiny_shape())
        .unwrap()
        .install()
        .hooks
        .unwrap();
    assert!(hooks.wants(HookPoint::Probs, 0) && !hooks.wants(HookPoint::Probs, 1));
    let probs = Tensor::new(&[[[0.4f32, 0.3, 0.05, 0.2, 0.05]]], &Device::Cpu)
        .unwrap()
        .repeat((4, 1, 1))
        .unwrap();
    let decode = AttentionSite {
        layer: 0,
        query_start: 4,
        query_len: 1,
        key_len: 5,
        selected_keys: None,
    };
    let out = hooks.probs(&decode, probs.clone()).unwrap();
    assert_eq!(
        out.to_vec3::<f32>().unwrap(),
        probs.to_vec3::<f32>().unwrap()
    );
    let mut every_step = parse(
        &json!({"type": "act", "layers": [0], "threshold": 0.05, "decode": true}),
        &tiny_shape(),
    )
    .unwrap()
    .install()
    .hooks
    .unwrap();
    let changed = every_step.probs(&decode, probs.clone()).unwrap();
    assert_ne!(
        changed.to_vec3::<f32>().unwrap(),
        probs.to_vec3::<f32>().unwrap()
    );
    let sums = changed
        .sum(D::Minus1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5));
}

#[test]
fn defaults_are_resolved_and_bad_parameters_name_the_field() {
    let big = smollm2_shape();
    let act = parse(&json!({"type": "act"}), &big).unwrap().resolved();
    assert_eq!(act["beta"], 0.4);
    assert_eq!(act["threshold"], 0.1);
    assert_eq!(act["layers"], json!((2..=28).collect::<Vec<_>>()));
    assert_eq!(act["heads"].as_array().unwrap().len(), 27 * 9);
    let err = |spec| parse_all(&[spec], &big).err().unwrap().to_string();
    assert!(err(json!({"type": "act", "beta": 1.5})).starts_with("interventions[0].beta:"));
    assert!(err(json!({"type": "act", "threshold": 0})).starts_with("interventions[0].threshold:"));
    assert!(
        err(json!({"type": "act", "heads": [[3, 9]]})).starts_with("interventions[0].heads[0][1]:")
    );
    assert!(
        err(json!({"type": "act", "layers": [2], "heads": [[3, 0]]}))
            .starts_with("interventions[0].heads[0]:")
    );
}

/// The host-memory hook (used on CPU f32 models) gives the tensor hook's probabilities.
#[test]
fn in_place_calibration_equals_the_tensor_hook() {
    let spec = json!({"type": "act", "layers": [0], "threshold": 0.05, "decode": true});
    let mut hooks = parse(&spec, &tiny_shape())
        .unwrap()
        .install()
        .hooks
        .unwrap();
    // 4 heads, 3 query rows, 5 keys; each row a distribution with sinks past the first key.
    let row = [0.3f32, 0.25, 0.05, 0.35, 0.05];
    let mut values: Vec<f32> = (0..4 * 3).flat_map(|_| row).collect();
    let probs = Tensor::from_slice(&values, (4, 3, 5), &Device::Cpu).unwrap();
    let site = AttentionSite {
        layer: 0,
        query_start: 2,
        query_len: 3,
        key_len: 5,
        selected_keys: None,
    };
    let want = hooks.probs(&site, probs.clone()).unwrap();
    assert_ne!(
        want.to_vec3::<f32>().unwrap(),
        probs.to_vec3::<f32>().unwrap()
    );
    let mut rows = AttentionRows {
        values: &mut values,
        heads: 4,
        query_len: 3,
        keys: 5,
    };
    assert!(hooks.probs_in_place(&site, &mut rows).unwrap());
    assert_eq!(
        values,
        want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
}

/// At decode steps each head calibrates its row inside the attention pass; the logits are
/// those of the hook run between passes, bit for bit.
#[test]
fn in_pass_decode_rewrite_gives_the_between_pass_logits() {
    let spec =
        json!({"type": "act", "beta": 0.0, "threshold": 0.05, "layers": [0, 1], "decode": true});
    let (prompt, decode) = ([3u32, 1, 4, 1, 5, 9, 2, 6], [5u32, 3, 5]);
    let in_pass = in_pass_decode_logits(9, spec, &prompt, &decode);
    let plain = prefill_then_decode(9, None, &prompt, &decode);
    assert_ne!(
        plain[1..],
        in_pass[1..],
        "the calibration changes decode steps"
    );
}
