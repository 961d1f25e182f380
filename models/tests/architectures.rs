//! Every supported architecture against HF transformers, on tiny seeded checkpoints made by
//! `fixtures/make_tiny_arch_fixtures.py` (Llama 3 RoPE scaling, Mistral sliding window with
//! sharded weights, Qwen2 q/k/v biases with bf16 weights).

use attune_models::safetensors::load_decoder;
use attune_models::{Architecture, DecoderInput, LogitsFor, SequenceStep};
use candle_core::Device;
use serde::Deserialize;
use std::path::PathBuf;

#[derive(Deserialize)]
struct Fixture {
    tokens: Vec<u32>,
    logits: std::collections::HashMap<String, Vec<Vec<f32>>>,
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn check(name: &str, architecture: Architecture) {
    let fixture: Fixture = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tiny_arch_logits.json")).unwrap(),
    )
    .unwrap();
    let decoder = load_decoder(&fixtures().join(format!("tiny-{name}")), &Device::Cpu).unwrap();
    assert_eq!(decoder.config().architecture, architecture);
    let want = &fixture.logits[name];

    // All positions in one prefill.
    let mut cache = decoder.new_cache();
    let mut step = SequenceStep::new(DecoderInput::Tokens(fixture.tokens.clone()), &mut cache)
        .with_logits(LogitsFor::All);
    let all = decoder.forward(std::slice::from_mut(&mut step)).unwrap()[0]
        .clone()
        .unwrap();
    let got: Vec<Vec<f32>> = all.to_vec2().unwrap();
    // And token by token through the cache (decode-time masks, e.g. the sliding window).
    let mut cache = decoder.new_cache();
    let stepwise: Vec<Vec<f32>> = fixture
        .tokens
        .iter()
        .map(|&t| {
            decoder
                .forward_one(&[t], &mut cache, None)
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect();
    for (pos, want_row) in want.iter().enumerate() {
        for (label, rows) in [("prefill", &got), ("decode", &stepwise)] {
            let diff = rows[pos]
                .iter()
                .zip(want_row)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(
                diff < 1e-4,
                "{name} {label} position {pos}: max |diff| {diff}"
            );
        }
    }
}

#[test]
fn llama3_with_rope_scaling_and_untied_head_matches_transformers() {
    let cfg = load_decoder(&fixtures().join("tiny-llama3"), &Device::Cpu)
        .unwrap()
        .config()
        .clone();
    assert!(cfg.rope_scaling.is_some() && !cfg.tie_word_embeddings);
    check("llama3", Architecture::Llama);
}

#[test]
fn mistral_with_sliding_window_and_shards_matches_transformers() {
    let cfg = load_decoder(&fixtures().join("tiny-mistral"), &Device::Cpu)
        .unwrap()
        .config()
        .clone();
    assert_eq!(cfg.sliding_window, Some(4));
    check("mistral", Architecture::Mistral);
}

#[test]
fn qwen2_with_qkv_bias_and_bf16_weights_matches_transformers() {
    let cfg = load_decoder(&fixtures().join("tiny-qwen2"), &Device::Cpu)
        .unwrap()
        .config()
        .clone();
    assert!(cfg.attention_bias && cfg.tie_word_embeddings);
    check("qwen2", Architecture::Qwen2);
}
