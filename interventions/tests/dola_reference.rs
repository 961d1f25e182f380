//! DoLa against the spec's formula computed in PyTorch on HF transformers' hidden states
//! (`fixtures/make_dola_fixture.py`), on the default model dequantized to f32.

use attune_interventions::{parse, ModelKind, ModelShape};
use attune_models::testing::converted_default_model;
use attune_models::{Model, ModelSource};
use candle_core::Device;
use serde::Deserialize;
use serde_json::json;

mod common;
use common::smollm2_shape;

#[derive(Deserialize)]
struct Reference {
    alpha: f64,
    repetition_penalty: f64,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    prompt_ids: Vec<u32>,
    layers: String,
    candidates: Vec<usize>,
    tokens: Vec<u32>,
    first_step_top5: Vec<(u32, f64)>,
    text: String,
}

#[test]
fn dola_matches_the_pytorch_reference() {
    let reference: Reference =
        serde_json::from_str(include_str!("fixtures/dola_reference.json")).unwrap();
    let model = Model::load(&ModelSource::HfDir(converted_default_model()), &Device::Cpu).unwrap();
    let cfg = model.decoder.config();
    let shape = ModelShape::of(cfg, ModelKind::Llm);
    for case in &reference.cases {
        let spec = json!({
            "type": "contrastive_decoding", "mode": "dola", "layers": case.layers,
            "alpha": reference.alpha, "repetition_penalty": reference.repetition_penalty,
        });
        let dola = parse(&spec, &shape).unwrap();
        assert_eq!(dola.resolved()["layers"], json!(case.candidates));
        let installed = dola.install();
        let (mut hooks, mut processor) = (installed.hooks.unwrap(), installed.processor.unwrap());
        let mut cache = model.decoder.new_cache();
        let mut context = case.prompt_ids.clone();
        let mut input = case.prompt_ids.clone();
        let mut tokens = Vec::new();
        for step in 0..case.tokens.len() {
            let logits = model
                .decoder
                .forward_one(&input, &mut cache, Some(hooks.as_mut()))
                .unwrap();
            let scores = processor
                .process(logits.to_vec1().unwrap(), &[], &model.decoder, &context)
                .unwrap();
            if step == 0 {
                for &(id, want) in &case.first_step_top5 {
                    let got = scores[id as usize] as f64;
                    assert!(
                        (got - want).abs() < 2e-3,
                        "{} token {id}: ours {got}, reference {want}",
                        case.layers
                    );
                }
            }
            let next = scores
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0 as u32;
            tokens.push(next);
            context.push(next);
            input = vec![next];
        }
        assert_eq!(
            tokens,
            case.tokens,
            "{} layers: ours {:?}, reference {:?}",
            case.layers,
            model.tokenizer.decode(&tokens, true).unwrap(),
            case.text
        );
    }
}

#[test]
fn neutral_contrast_installs_nothing_and_bad_modes_are_named() {
    let shape = smollm2_shape();
    let neutral = parse(&json!({"type": "contrastive_decoding", "mode": "dola", "lambda": 0, "alpha": 0, "repetition_penalty": 1}), &shape).unwrap();
    let installed = neutral.install();
    assert!(installed.hooks.is_none() && installed.processor.is_none());
    let resolved = parse(
        &json!({"type": "contrastive_decoding", "mode": "dola", "layers": "low"}),
        &shape,
    )
    .unwrap()
    .resolved();
    assert_eq!(resolved["layers"], json!([2, 4, 6, 8, 10, 12, 14]));
    let high = parse(
        &json!({"type": "contrastive_decoding", "mode": "dola"}),
        &shape,
    )
    .unwrap()
    .resolved();
    assert_eq!(high["layers"], json!([15, 17, 19, 21, 23, 25, 27, 29]));
    let err = |spec| {
        attune_interventions::parse_all(&[spec], &shape)
            .err()
            .unwrap()
            .to_string()
    };
    assert!(
        err(json!({"type": "contrastive_decoding", "mode": "image_noise"}))
            .starts_with("interventions[0].mode:")
    );
    assert!(err(json!({"type": "contrastive_decoding", "mode": "x"}))
        .starts_with("interventions[0].mode:"));
    assert!(err(json!({"type": "contrastive_decoding"})).contains("mode"));
    assert!(
        err(json!({"type": "contrastive_decoding", "mode": "dola", "layers": [30]}))
            .starts_with("interventions[0].layers:")
    );
    assert!(
        err(json!({"type": "contrastive_decoding", "mode": "dola", "alpha": 2}))
            .starts_with("interventions[0].alpha:")
    );
}

#[test]
fn identical_contrast_gives_uniform_over_the_plausible_set() {
    // Spec sanity: z- == z+ with the difference rule (lambda 1) gives 0 on M, -inf elsewhere.
    use attune_interventions::contrastive::{dola_scores, log_softmax, Dola};
    let shape = smollm2_shape();
    let params =
        Dola::from_request(json!({"mode": "dola", "repetition_penalty": 1.0}), &shape).unwrap();
    let lp = log_softmax(&[3.0, 2.0, 0.0, -1.0]);
    let scores = dola_scores(&lp, &lp, &params, &[]);
    // p = [.66, .24, .03, .01]: alpha .1 keeps the first two.
    assert_eq!(scores[0], 0.0);
    assert_eq!(scores[1], 0.0);
    assert!(scores[2] == f32::NEG_INFINITY && scores[3] == f32::NEG_INFINITY);
}
