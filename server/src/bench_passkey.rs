//! `attune bench --passkey`: Recycled Attention on long passkey-retrieval prompts. A random
//! five-digit key is hidden halfway through filler text of the requested length; each
//! configuration (full attention and several Recycled Attention budgets and schedules) prefills
//! the same prompt, decodes greedily, and is reported with its decode speed and whether the
//! answer contains the key.

use crate::passkey::{passkey, repeats_for, user_text, ANSWER_PREFIX, FILLER};
use crate::sampling::argmax;
use anyhow::Result;
use attune_interventions::{parse, Installed, ModelKind, ModelShape};
use attune_models::{IncrementalDecoder, Model};
use serde_json::json;
use std::time::Instant;

/// Configurations compared at every context length (Recycled Attention's request bodies).
const CONFIGS: &[(&str, Option<&str>)] = &[
    ("full attention", None),
    (
        "recycled k 256, stride 8",
        Some(r#"{"type": "recycled_attention", "k": 256, "stride": 8}"#),
    ),
    (
        "recycled k 512, stride 16",
        Some(r#"{"type": "recycled_attention", "k": 512, "stride": 16}"#),
    ),
    (
        "recycled k 1/8 of context, stride 32",
        Some(r#"{"type": "recycled_attention", "stride": 32}"#),
    ),
    (
        "recycled k 1/8 of context, dynamic",
        Some(r#"{"type": "recycled_attention", "dynamic": {}}"#),
    ),
];

/// Prompt tokens per prefill step.
const PREFILL_CHUNK: usize = 512;

#[derive(Debug, Clone)]
pub struct PasskeyConfig {
    /// Prompt lengths in tokens.
    pub contexts: Vec<usize>,
    pub decode_tokens: usize,
    pub seed: u64,
}

pub fn run(model: &Model, config: &PasskeyConfig, threads: usize) -> Result<()> {
    let shape = ModelShape::of(model.decoder.config(), ModelKind::Llm);
    println!(
        "model: {} | threads: {threads} | {} greedy tokens after the prompt | key at 50% depth",
        model.source.path().display(),
        config.decode_tokens
    );
    println!(
        "| context tokens | attention | decode tok/s | vs full | passkey retrieved | answer |"
    );
    println!("|---:|---|---:|---:|---|---|");
    for (i, &context) in config.contexts.iter().enumerate() {
        let key = passkey(config.seed + i as u64);
        let prompt = passkey_prompt(model, context, key)?;
        let mut full_speed = None;
        for (name, spec) in CONFIGS {
            let installed = match spec {
                Some(spec) => parse(&serde_json::from_str(spec)?, &shape)?.install(),
                None => Installed::default(),
            };
            let (speed, answer) = generate(model, &prompt, config.decode_tokens, installed)?;
            let full = *full_speed.get_or_insert(speed);
            println!(
                "| {} | {name} | {speed:.1} | {:.2}x | {} | {} |",
                prompt.len(),
                speed / full,
                if answer.contains(&key.to_string()) {
                    "yes"
                } else {
                    "no"
                },
                json!(answer.trim()),
            );
        }
    }
    Ok(())
}

/// A chat prompt of about `context` tokens with `key` stated halfway, ending where the
/// assistant's answer begins ("The pass key is").
fn passkey_prompt(model: &Model, context: usize, key: u32) -> Result<Vec<u32>> {
    let filler_tokens = model.tokenizer.encode(FILLER, false)?.len();
    let build = |repeats: usize| -> Result<Vec<u32>> {
        let user = user_text(repeats, 0.5, key);
        let mut ids = model.chat_prompt(&[json!({"role": "user", "content": user})])?;
        ids.extend(model.tokenizer.encode(ANSWER_PREFIX, false)?);
        Ok(ids)
    };
    let overhead = build(0)?.len();
    build(repeats_for(context, overhead, filler_tokens))
}

/// Greedy decoding of `tokens` tokens (end-of-sequence ignored, so every configuration decodes
/// the same count); returns decode tokens/s and the text.
fn generate(
    model: &Model,
    prompt: &[u32],
    tokens: usize,
    installed: Installed,
) -> Result<(f64, String)> {
    let Installed { mut hooks, .. } = installed;
    let decoder = &model.decoder;
    let mut cache = decoder.new_cache();
    // Chunked prefill keeps the explicit attention's score matrices at chunk × context.
    let mut logits = None;
    for chunk in prompt.chunks(PREFILL_CHUNK) {
        logits = Some(decoder.forward_one(chunk, &mut cache, hooks.as_deref_mut())?);
    }
    let logits = logits.ok_or_else(|| anyhow::anyhow!("empty passkey prompt"))?;
    let mut next = argmax(&logits.to_vec1::<f32>()?);
    let mut text = IncrementalDecoder::new();
    let mut answer = String::new();
    let start = Instant::now();
    for _ in 0..tokens {
        if let Some(piece) = text.push(&model.tokenizer, next)? {
            answer.push_str(&piece);
        }
        let logits = decoder.forward_one(&[next], &mut cache, hooks.as_deref_mut())?;
        next = argmax(&logits.to_vec1::<f32>()?);
    }
    Ok((tokens as f64 / start.elapsed().as_secs_f64(), answer))
}
