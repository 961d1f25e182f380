//! Helpers shared by the intervention test files (each file uses a subset of them).
#![allow(dead_code)]

use attune_interventions::{parse, ModelKind, ModelShape};
use attune_models::testing::{random_decoder, tiny_config};
use candle_core::Device;
use serde_json::Value;

/// The shape of `tiny_config()`'s model.
pub fn tiny_shape() -> ModelShape {
    ModelShape::of(&tiny_config(), ModelKind::Llm)
}

/// The shape of the default model (SmolLM2-135M): 30 layers, 9 query and 3 KV heads.
pub fn smollm2_shape() -> ModelShape {
    ModelShape {
        num_layers: 30,
        hidden_size: 576,
        num_heads: 9,
        num_kv_heads: 3,
        tied_embeddings: true,
        kind: ModelKind::Llm,
    }
}

/// Logits of a tiny model (weights from `seed`) with `spec` installed, if any: one row after
/// prefilling `prompt`, then one per token of `decode` fed one at a time.
pub fn prefill_then_decode(
    seed: u64,
    spec: Option<Value>,
    prompt: &[u32],
    decode: &[u32],
) -> Vec<Vec<f32>> {
    let m = random_decoder(&tiny_config(), seed, &Device::Cpu).unwrap();
    let mut hooks = spec.map(|s| parse(&s, &tiny_shape()).unwrap().install().hooks.unwrap());
    let mut cache = m.new_cache();
    std::iter::once(prompt)
        .chain(decode.chunks(1))
        .map(|tokens| {
            m.forward_one(tokens, &mut cache, hooks.as_deref_mut())
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect()
}
