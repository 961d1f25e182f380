//! ZeroTuning against HF transformers with patched eager attention applying the official code's
//! post-softmax rescale (`fixtures/make_zerotuning_fixture.py`), on the default model dequantized
//! to f32: our pre-softmax bias must give the same next-token log-probabilities.

use attune_interventions::{parse, ModelKind, ModelShape};
use attune_models::testing::converted_default_model;
use attune_models::{Model, ModelSource};
use candle_core::{Device, D};
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    prompt_ids: Vec<u32>,
    intervention: Option<serde_json::Value>,
    top_ids: Vec<u32>,
    top_logprobs: Vec<f32>,
}

#[test]
fn zerotuning_matches_transformers_with_the_official_rescale() {
    let reference: Reference =
        serde_json::from_str(include_str!("fixtures/zerotuning_reference.json")).unwrap();
    let model = Model::load(&ModelSource::HfDir(converted_default_model()), &Device::Cpu).unwrap();
    let shape = ModelShape::of(model.decoder.config(), ModelKind::Llm);
    let mut worst = 0f32;
    for case in &reference.cases {
        let mut hooks = case
            .intervention
            .as_ref()
            .map(|spec| parse(spec, &shape).unwrap().install().hooks.unwrap());
        let mut cache = model.decoder.new_cache();
        let logits = model
            .decoder
            .forward_one(&case.prompt_ids, &mut cache, hooks.as_deref_mut())
            .unwrap();
        let logprobs: Vec<f32> = candle_nn::ops::log_softmax(&logits, D::Minus1)
            .unwrap()
            .to_vec1()
            .unwrap();
        for (id, want) in case.top_ids.iter().zip(&case.top_logprobs) {
            let diff = (logprobs[*id as usize] - want).abs();
            worst = worst.max(diff);
            assert!(
                diff < 1e-3,
                "{:?} token {id}: ours {}, transformers {want}",
                case.intervention,
                logprobs[*id as usize]
            );
        }
    }
    println!("ZeroTuning vs transformers: max |dlogprob| over top-10 = {worst:.2e}");
}
