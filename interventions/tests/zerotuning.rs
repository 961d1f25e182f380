//! ZeroTuning's invariants (spec §1 "Sanity") on a tiny seeded model.

use attune_interventions::{parse, parse_all, PromptView};
use attune_models::testing::{random_decoder, tiny_config};
use attune_models::{AttentionRows, AttentionSite, HookPoint};
use candle_core::{Device, Result, Tensor, D};
use serde_json::json;

mod common;
use common::{in_pass_decode_logits, prefill_then_decode, tiny_shape};

fn logits_with(spec: Option<serde_json::Value>, tokens: &[u32]) -> Vec<Vec<f32>> {
    prefill_then_decode(3, spec, tokens, &[7, 8, 9])
}

#[test]
fn gamma_one_is_bit_identical_to_no_intervention() {
    let tokens = [1u32, 2, 3, 4, 5];
    let plain = logits_with(None, &tokens);
    assert_eq!(
        plain,
        logits_with(Some(json!({"type": "zerotuning", "gamma": 1.0})), &tokens)
    );
    let per_head_neutral =
        json!({"type": "zerotuning", "per_head": [{"layer": 1, "head": 2, "gamma": 1.0}]});
    assert_eq!(plain, logits_with(Some(per_head_neutral), &tokens));
    assert_ne!(
        plain,
        logits_with(Some(json!({"type": "zerotuning", "gamma": 2.0})), &tokens)
    );
}

/// Applies the hook to a known score row and returns softmax of the result.
fn hooked_probs(spec: serde_json::Value, scores: &Tensor) -> Tensor {
    let mut hooks = parse(&spec, &tiny_shape())
        .unwrap()
        .install()
        .hooks
        .unwrap();
    assert!(hooks.wants(HookPoint::Scores, 0));
    let site = AttentionSite {
        layer: 0,
        query_start: 0,
        query_len: scores.dim(1).unwrap(),
        key_len: scores.dim(2).unwrap(),
        selected_keys: None,
    };
    let s = hooks.scores(&site, scores.clone()).unwrap();
    candle_nn::ops::softmax_last_dim(&s).unwrap()
}

/// The code's form: A'[p0] = g A[p0], then divide the row by 1 + (g - 1) A[p0].
fn rescale_form(probs: &Tensor, g: f32) -> Result<Tensor> {
    let (h, q, k) = probs.dims3()?;
    let mut w = vec![1f32; k];
    w[0] = g;
    let scaled = probs.broadcast_mul(&Tensor::from_vec(w, (1, 1, k), probs.device())?)?;
    let denom = (probs.narrow(2, 0, 1)? * (g as f64 - 1.0))? + 1.0;
    let out = scaled.broadcast_div(&denom?)?;
    assert_eq!(out.dims3()?, (h, q, k));
    Ok(out)
}

#[test]
fn bias_form_equals_rescale_form_and_keeps_ratios() {
    let dev = Device::Cpu;
    let scores = Tensor::from_vec(
        (0..4 * 3 * 6)
            .map(|i| ((i * 37 % 11) as f32) * 0.3 - 1.0)
            .collect::<Vec<_>>(),
        (4, 3, 6),
        &dev,
    )
    .unwrap();
    let base = candle_nn::ops::softmax_last_dim(&scores).unwrap();
    for g in [0.3f32, 2.0, 4.0] {
        let ours = hooked_probs(json!({"type": "zerotuning", "gamma": g}), &scores);
        let code = rescale_form(&base, g).unwrap();
        let diff: f32 = (&ours - &code)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-6, "gamma {g}: {diff}");
        let sums: Vec<f32> = ours
            .sum(D::Minus1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5));
        // Ratios among the other keys are unchanged.
        let (a, b) = (
            ours.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            base.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(((a[2] / a[3]) - (b[2] / b[3])).abs() < 1e-4);
    }
}

#[test]
fn worked_example_from_the_spec() {
    // a = [.5, .25, .25], g = 2 -> [.6667, .1667, .1667].
    let scores = Tensor::new(&[[[0.5f32.ln(), 0.25f32.ln(), 0.25f32.ln()]]], &Device::Cpu)
        .unwrap()
        .repeat((4, 1, 1))
        .unwrap();
    let p = hooked_probs(json!({"type": "zerotuning", "gamma": 2}), &scores);
    let row: Vec<f32> = p.flatten_all().unwrap().to_vec1().unwrap()[..3].to_vec();
    for (got, want) in row.iter().zip([2.0 / 3.0, 1.0 / 6.0, 1.0 / 6.0]) {
        assert!((got - want).abs() < 1e-5, "{row:?}");
    }
}

#[test]
fn only_the_chosen_heads_change() {
    let scores = Tensor::ones((4, 2, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
    let p = hooked_probs(
        json!({"type": "zerotuning", "gamma": 3, "heads": [1]}),
        &scores,
    );
    let rows = p.to_vec3::<f32>().unwrap();
    assert!((rows[0][0][0] - 0.2).abs() < 1e-6, "head 0 untouched");
    assert!((rows[1][0][0] - 3.0 / 7.0).abs() < 1e-6, "head 1 scaled");
}

#[test]
fn bad_parameters_name_the_field() {
    let err = |spec| parse_all(&[spec], &tiny_shape()).err().unwrap().to_string();
    assert!(err(json!({"type": "zerotuning", "gamma": 0})).starts_with("interventions[0].gamma:"));
    assert!(err(json!({"type": "zerotuning", "gamma": "x"})).contains("invalid type"));
    assert!(
        err(json!({"type": "zerotuning", "layers": [2]})).starts_with("interventions[0].layers:")
    );
    assert!(err(json!({"type": "zerotuning", "gama": 2})).starts_with("interventions[0].gama:"));
    assert!(err(json!({"type": "carve"})).contains("needs a vision-language model"));
    assert!(err(json!({"type": "nope"})).contains("unknown intervention"));
    assert!(err(json!({"gamma": 2})).starts_with("interventions[0].type:"));
    let twice = parse_all(
        &[json!({"type": "zerotuning"}), json!({"type": "zerotuning"})],
        &tiny_shape(),
    );
    assert!(twice.err().unwrap().to_string().contains("given twice"));
}

#[test]
fn resolved_parameters_fill_in_defaults() {
    let z = parse(&json!({"type": "zerotuning", "gamma": 1.5}), &tiny_shape()).unwrap();
    assert_eq!(
        z.resolved(),
        json!({"gamma": 1.5, "layers": [0, 1], "heads": [0, 1, 2, 3], "per_head": []})
    );
}

/// Entropy (nats) of softmax(row).
fn entropy(row: &[f32]) -> f64 {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    row.iter()
        .map(|&v| {
            let p = (v as f64 - max).exp() / z;
            if p > 0.0 {
                -p * p.ln()
            } else {
                0.0
            }
        })
        .sum()
}

#[test]
fn auto_picks_the_grid_gamma_with_the_lowest_next_token_entropy() {
    let prompt = [1u32, 5, 9, 2, 7, 3];
    let grid = [0.25, 1.0, 2.0, 6.0];
    // Each gamma's entropy from its own plain (non-auto) run.
    let expected: Vec<f64> = grid
        .iter()
        .map(|&g| {
            let spec = json!({"type": "zerotuning", "gamma": g});
            entropy(&prefill_then_decode(3, Some(spec), &prompt, &[])[0])
        })
        .collect();
    let spec = json!({"type": "zerotuning", "auto": {"grid": grid}});
    let zt = parse(&spec, &tiny_shape()).unwrap();
    let decoder = random_decoder(&tiny_config(), 3, &Device::Cpu).unwrap();
    let installed = zt
        .install_for(&decoder, &PromptView::text(&prompt))
        .unwrap();
    let report = installed.report.expect("auto reports its choice");
    let entropies: Vec<f64> = serde_json::from_value(report["entropy"].clone()).unwrap();
    for (got, want) in entropies.iter().zip(&expected) {
        assert!((got - want).abs() < 1e-4, "{entropies:?} vs {expected:?}");
    }
    let best = (0..grid.len())
        .min_by(|&a, &b| expected[a].total_cmp(&expected[b]))
        .unwrap();
    assert_eq!(report["gamma"], json!(grid[best]));
    assert!(
        expected.iter().any(|&e| (e - expected[best]).abs() > 1e-3),
        "the grid should make a difference on this model: {expected:?}"
    );
    // The installed hooks are the chosen gamma's: same logits as asking for it directly.
    let mut hooks = installed.hooks.unwrap();
    let mut cache = decoder.new_cache();
    let auto_row = decoder
        .forward_one(&prompt, &mut cache, Some(hooks.as_mut()))
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let direct = json!({"type": "zerotuning", "gamma": grid[best]});
    assert_eq!(
        auto_row,
        prefill_then_decode(3, Some(direct), &prompt, &[])[0]
    );
}

#[test]
fn auto_forms_and_errors() {
    let shape = tiny_shape();
    let resolved = |auto| {
        parse(&json!({"type": "zerotuning", "auto": auto}), &shape)
            .unwrap()
            .resolved()
    };
    assert_eq!(
        resolved(json!(true))["auto"],
        json!([0.5, 0.75, 1.0, 1.5, 2.0, 3.0])
    );
    assert_eq!(resolved(json!({}))["auto"], resolved(json!(true))["auto"]);
    assert!(resolved(json!(false)).get("auto").is_none());
    let err = |auto| {
        parse_all(&[json!({"type": "zerotuning", "auto": auto})], &shape)
            .err()
            .unwrap()
            .to_string()
    };
    assert!(err(json!({"grid": []})).starts_with("interventions[0].auto.grid:"));
    assert!(err(json!({"grid": [1.0, -2.0]})).starts_with("interventions[0].auto.grid[1]:"));
    assert!(err(json!({"grid": "x"})).starts_with("interventions[0].auto.grid:"));
    assert!(err(json!({"grids": [1.0]})).starts_with("interventions[0].auto.grids:"));
    assert!(err(json!("yes")).starts_with("interventions[0].auto:"));
}

/// The host-memory hook (used on CPU f32 models) gives the tensor hook's scores, with and
/// without a key selection.
#[test]
fn in_place_scores_equal_the_tensor_hook() {
    let mut hooks = parse(&json!({"type": "zerotuning", "gamma": 1.7}), &tiny_shape())
        .unwrap()
        .install()
        .hooks
        .unwrap();
    let values: Vec<f32> = (0..4 * 2 * 6).map(|i| (i as f32 * 0.37).sin()).collect();
    let scores = Tensor::from_slice(&values, (4, 2, 6), &Device::Cpu).unwrap();
    // 2 KV heads: the first attends keys [3, 0, ...], the second does not see key 0.
    let selection =
        Tensor::new(&[[3u32, 0, 1, 2, 4, 5], [1, 2, 3, 4, 5, 6]], &Device::Cpu).unwrap();
    for selected_keys in [None, Some(&selection)] {
        let site = AttentionSite {
            layer: 0,
            query_start: 5,
            query_len: 2,
            key_len: 7,
            selected_keys,
        };
        let want = hooks.scores(&site, scores.clone()).unwrap();
        let mut mine = values.clone();
        let mut rows = AttentionRows {
            values: &mut mine,
            heads: 4,
            query_len: 2,
            keys: 6,
        };
        assert!(hooks.scores_in_place(&site, &mut rows).unwrap());
        assert_eq!(mine, want.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
}

/// At decode steps the bias goes onto key 0 inside the attention pass; the logits are those of
/// the hook run between passes, bit for bit.
#[test]
fn in_pass_decode_rewrite_gives_the_between_pass_logits() {
    let spec = json!({"type": "zerotuning", "gamma": 1.7});
    let (prompt, decode) = ([2u32, 7, 1, 8, 2, 8], [1u32, 8, 2]);
    let in_pass = in_pass_decode_logits(4, spec, &prompt, &decode);
    let plain = prefill_then_decode(4, None, &prompt, &decode);
    assert_ne!(plain[1..], in_pass[1..], "the bias changes decode steps");
}
