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

/// Logits as [`prefill_then_decode`] gives them with `spec`'s hooks, whose decode steps run
/// inside the attention pass (their `HeadRowRewrite`); asserts that they are, bit for bit, the
/// logits of the same hooks run between passes, and that only the first run took the in-pass
/// path.
pub fn in_pass_decode_logits(
    seed: u64,
    spec: Value,
    prompt: &[u32],
    decode: &[u32],
) -> Vec<Vec<f32>> {
    let (in_pass, rows) = decode_in_pass_or_between(seed, spec.clone(), prompt, decode, false);
    let (between, no_rows) = decode_in_pass_or_between(seed, spec, prompt, decode, true);
    assert_eq!(in_pass, between);
    assert!(rows > 0, "the decode steps took the in-pass rewrite");
    assert_eq!(no_rows, 0);
    in_pass
}

/// Logits as [`prefill_then_decode`] gives them, with `spec`'s hooks run at decode steps
/// inside the attention pass (their [`HeadRowRewrite`]) or, with `whole_rows`, between passes
/// (a pass-through hook on scores without a rewrite joins them). Also returns how many head
/// rows a counting rewrite beside them saw.
fn decode_in_pass_or_between(
    seed: u64,
    spec: Value,
    prompt: &[u32],
    decode: &[u32],
    whole_rows: bool,
) -> (Vec<Vec<f32>>, usize) {
    use attune_models::{AttentionSite, HeadRowRewrite, HookPoint, HookStack, SequenceHooks};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Wants probabilities everywhere; its rewrite only counts the rows it sees.
    struct Counting(Arc<AtomicUsize>);
    impl SequenceHooks for Counting {
        fn wants(&self, point: HookPoint, _: usize) -> bool {
            point == HookPoint::Probs
        }
        fn decode_rewrite(&self, _: &AttentionSite) -> Option<Box<dyn HeadRowRewrite + '_>> {
            Some(Box::new(CountRows(&self.0)))
        }
    }
    struct CountRows<'a>(&'a AtomicUsize);
    impl HeadRowRewrite for CountRows<'_> {
        fn probs(&self, _: usize, _: &mut [f32]) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
    /// Wants scores everywhere, passes them through, offers no rewrite.
    struct WholeRows;
    impl SequenceHooks for WholeRows {
        fn wants(&self, point: HookPoint, _: usize) -> bool {
            point == HookPoint::Scores
        }
    }

    let m = random_decoder(&tiny_config(), seed, &Device::Cpu).unwrap();
    let rows = Arc::new(AtomicUsize::new(0));
    let mut stack: Vec<Box<dyn SequenceHooks>> = vec![
        parse(&spec, &tiny_shape())
            .unwrap()
            .install()
            .hooks
            .unwrap(),
        Box::new(Counting(rows.clone())),
    ];
    if whole_rows {
        stack.push(Box::new(WholeRows));
    }
    let mut hooks = HookStack(stack);
    let mut cache = m.new_cache();
    let logits = std::iter::once(prompt)
        .chain(decode.chunks(1))
        .map(|tokens| {
            m.forward_one(tokens, &mut cache, Some(&mut hooks))
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect();
    let rows = rows.load(Ordering::Relaxed);
    (logits, rows)
}
