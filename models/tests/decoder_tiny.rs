//! Decoder invariants on a tiny seeded random model: batching, caching and hooks.

use attune_models::testing::{random_decoder, tiny_config};
use attune_models::{
    AttentionSite, Decoder, DecoderInput, HookPoint, KvCache, LogitsFor, RowSite, SequenceHooks,
    SequenceStep,
};
use candle_core::{Device, IndexOp, Result, Tensor, D};

fn model() -> Decoder {
    random_decoder(&tiny_config(), 7, &Device::Cpu).unwrap()
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    to_vec(a)
        .iter()
        .zip(to_vec(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Feeds `tokens` one at a time and returns the logits after each.
fn stepwise(m: &Decoder, tokens: &[u32]) -> Vec<Tensor> {
    let mut cache = m.new_cache();
    tokens
        .iter()
        .map(|&t| m.forward_one(&[t], &mut cache, None).unwrap())
        .collect()
}

/// Logits at every position of `tokens` fed as one prompt.
fn prefill_logits(m: &Decoder, tokens: &[u32]) -> Tensor {
    let mut cache = m.new_cache();
    let mut step = SequenceStep::new(DecoderInput::Tokens(tokens.to_vec()), &mut cache)
        .with_logits(LogitsFor::All);
    m.forward(std::slice::from_mut(&mut step)).unwrap()[0]
        .clone()
        .unwrap()
}

#[test]
fn prefill_matches_token_by_token_decoding() {
    let m = model();
    let tokens: Vec<u32> = (0..20).map(|i| (i * 7 % 64) as u32).collect();
    let all = prefill_logits(&m, &tokens);
    for (i, single) in stepwise(&m, &tokens).iter().enumerate() {
        let diff = max_abs_diff(&all.i(i).unwrap(), single);
        assert!(diff < 1e-4, "position {i}: {diff}");
    }
}

/// Decode steps take the CPU single-query path, prompts the tensor path: both must apply
/// Mistral's sliding window alike.
#[test]
fn a_sliding_window_hides_the_same_keys_at_prefill_and_decode() {
    let cfg = attune_models::DecoderConfig {
        sliding_window: Some(4),
        ..tiny_config()
    };
    let m = random_decoder(&cfg, 7, &Device::Cpu).unwrap();
    let unwindowed = model();
    let tokens: Vec<u32> = (0..12).map(|i| (i * 5 % 64) as u32).collect();
    let all = prefill_logits(&m, &tokens);
    let full = stepwise(&unwindowed, &tokens);
    for (i, single) in stepwise(&m, &tokens).iter().enumerate() {
        assert!(
            max_abs_diff(&all.i(i).unwrap(), single) < 1e-4,
            "position {i}"
        );
        // Within the window nothing is hidden yet; past it the window must matter.
        let windowed = max_abs_diff(single, &full[i]);
        if i < 4 {
            assert!(windowed < 1e-5, "position {i}: {windowed}");
        } else if i > 5 {
            assert!(windowed > 1e-4, "position {i}: the window changed nothing");
        }
    }
}

#[test]
fn batched_sequences_of_different_lengths_match_running_alone() {
    let m = model();
    let prompts: Vec<Vec<u32>> = vec![vec![1, 2, 3, 4, 5, 6, 7], vec![9, 8], vec![30, 31, 32, 33]];
    // expected[round][sequence]: round 0 is the prompt, round 1 one more token.
    let mut expected: [Vec<Tensor>; 2] = [Vec::new(), Vec::new()];
    for p in &prompts {
        let mut cache = m.new_cache();
        expected[0].push(m.forward_one(p, &mut cache, None).unwrap());
        expected[1].push(m.forward_one(&[5], &mut cache, None).unwrap());
    }

    let mut caches: Vec<KvCache> = prompts.iter().map(|_| m.new_cache()).collect();
    for (round, expected) in expected.iter().enumerate() {
        let mut steps: Vec<SequenceStep> = caches
            .iter_mut()
            .zip(&prompts)
            .map(|(c, p)| {
                let input = if round == 0 { p.clone() } else { vec![5] };
                SequenceStep::new(DecoderInput::Tokens(input), c)
            })
            .collect();
        let out = m.forward(&mut steps).unwrap();
        // Dense f32 GEMM blocks differently for different row counts, so batching moves the
        // last bits; the quantized path is row-exact and is checked on the real model.
        for (i, (logits, alone)) in out.iter().zip(expected).enumerate() {
            let logits = logits.as_ref().unwrap().squeeze(0).unwrap();
            let diff = max_abs_diff(&logits, alone);
            assert!(diff < 1e-4, "sequence {i}, round {round}: {diff}");
        }
    }
}

/// A step where a prompt's prefill comes before other sequences' decode rows (the decode rows
/// take the direct CPU attention, the prefill the row-by-row path): each gets what it gets alone.
#[test]
fn a_prefill_before_decode_rows_in_one_batch_matches_running_alone() {
    let m = model();
    let (prompt, others) = (vec![3u32, 1, 4, 1, 5], [vec![9u32, 8, 7], vec![30u32, 31]]);
    let mut alone = Vec::new();
    let mut cache = m.new_cache();
    alone.push(m.forward_one(&prompt, &mut cache, None).unwrap());
    let mut caches: Vec<KvCache> = others.iter().map(|_| m.new_cache()).collect();
    for (p, c) in others.iter().zip(&mut caches) {
        m.forward_one(p, c, None).unwrap();
        let mut fork = c.try_clone().unwrap();
        alone.push(m.forward_one(&[6], &mut fork, None).unwrap());
    }
    let mut fresh = m.new_cache();
    let mut steps = vec![SequenceStep::new(
        DecoderInput::Tokens(prompt.clone()),
        &mut fresh,
    )];
    for c in &mut caches {
        steps.push(SequenceStep::new(DecoderInput::Tokens(vec![6]), c));
    }
    let out = m.forward(&mut steps).unwrap();
    for (i, (logits, alone)) in out.iter().zip(&alone).enumerate() {
        let diff = max_abs_diff(&logits.as_ref().unwrap().squeeze(0).unwrap(), alone);
        assert!(diff < 1e-4, "sequence {i}: {diff}");
    }
}

#[test]
fn kv_cache_grows_past_its_first_allocation() {
    let m = model();
    let tokens: Vec<u32> = (0..150).map(|i| (i * 13 % 64) as u32).collect();
    let mut cache = m.new_cache();
    let whole = m.forward_one(&tokens, &mut cache, None).unwrap();
    assert_eq!(cache.len(), 150);
    let mut cache = m.new_cache();
    m.forward_one(&tokens[..60], &mut cache, None).unwrap();
    let mut last = None;
    for &t in &tokens[60..] {
        last = Some(m.forward_one(&[t], &mut cache, None).unwrap());
    }
    assert!(max_abs_diff(&whole, &last.unwrap()) < 1e-4);
    assert!(cache.bytes() > 0);
}

#[test]
fn final_logits_equal_lm_head_on_last_residual_with_norm() {
    struct Capture(Option<Tensor>);
    impl SequenceHooks for Capture {
        fn wants(&self, point: HookPoint, layer: usize) -> bool {
            point == HookPoint::Residual && layer == 2
        }
        fn residual(&mut self, _: &RowSite, h: Tensor) -> Result<Tensor> {
            self.0 = Some(h.clone());
            Ok(h)
        }
    }
    let m = model();
    let mut hooks = Capture(None);
    let mut cache = m.new_cache();
    let logits = m
        .forward_one(&[3, 4, 5], &mut cache, Some(&mut hooks))
        .unwrap();
    let h = hooks.0.unwrap();
    let again = m
        .logits_from_hidden(&h.i(2..3).unwrap(), true)
        .unwrap()
        .squeeze(0)
        .unwrap();
    assert_eq!(to_vec(&logits), to_vec(&again));
}

/// Reads every hook point and changes nothing.
struct Observer {
    probs_rows_checked: usize,
}

impl SequenceHooks for Observer {
    fn wants(&self, _: HookPoint, _: usize) -> bool {
        true
    }
    fn probs(&mut self, _: &AttentionSite, p: Tensor) -> Result<Tensor> {
        let sums = to_vec(&p.sum(D::Minus1)?);
        assert!(
            sums.iter().all(|s| (s - 1.0).abs() < 1e-5),
            "rows sum to {sums:?}"
        );
        self.probs_rows_checked += sums.len();
        Ok(p)
    }
}

#[test]
fn a_hook_that_does_nothing_leaves_logits_bit_identical() {
    let m = model();
    let tokens = [1u32, 5, 9, 13, 17];
    let mut plain_cache = m.new_cache();
    let plain = m.forward_one(&tokens, &mut plain_cache, None).unwrap();
    let plain_next = m.forward_one(&[2], &mut plain_cache, None).unwrap();
    let mut hooks = Observer {
        probs_rows_checked: 0,
    };
    let mut cache = m.new_cache();
    let hooked = m
        .forward_one(&tokens, &mut cache, Some(&mut hooks))
        .unwrap();
    let hooked_next = m.forward_one(&[2], &mut cache, Some(&mut hooks)).unwrap();
    assert_eq!(to_vec(&plain), to_vec(&hooked));
    assert_eq!(to_vec(&plain_next), to_vec(&hooked_next));
    // 2 layers x 4 heads x (5 prefill rows + 1 decode row).
    assert_eq!(hooks.probs_rows_checked, 2 * 4 * 6);
}

/// Scales attention to key 0 by `gamma` and renormalizes (ZeroTuning's probability form).
struct ScaleFirstKey(f32);

impl SequenceHooks for ScaleFirstKey {
    fn wants(&self, point: HookPoint, _: usize) -> bool {
        point == HookPoint::Probs
    }
    fn probs(&mut self, _: &AttentionSite, p: Tensor) -> Result<Tensor> {
        let (h, q, k) = p.dims3()?;
        let mut w = vec![1f32; k];
        w[0] = self.0;
        let scaled = p.broadcast_mul(&Tensor::from_vec(w, (1, 1, k), p.device())?)?;
        let sums = scaled.sum_keepdim(D::Minus1)?;
        let out = scaled.broadcast_div(&sums)?;
        assert_eq!(out.dims3()?, (h, q, k));
        Ok(out)
    }
}

#[test]
fn scaling_attention_to_position_zero_changes_the_output() {
    let m = model();
    let tokens = [1u32, 5, 9, 13, 17, 21, 25];
    let plain = m.forward_one(&tokens, &mut m.new_cache(), None).unwrap();
    let mut hooks = ScaleFirstKey(4.0);
    let scaled = m
        .forward_one(&tokens, &mut m.new_cache(), Some(&mut hooks))
        .unwrap();
    assert!(max_abs_diff(&plain, &scaled) > 1e-3);
}

/// Selects the given key positions on every decode step.
struct SelectKeys(Vec<u32>);

impl SequenceHooks for SelectKeys {
    fn wants(&self, point: HookPoint, _: usize) -> bool {
        point == HookPoint::KeySelection
    }
    fn select_keys(&mut self, site: &AttentionSite) -> Result<Option<Tensor>> {
        let mut keys = self.0.clone();
        keys.push(site.key_len as u32 - 1);
        let kv_heads = 2;
        let idx = Tensor::new(keys.as_slice(), &Device::Cpu)?
            .unsqueeze(0)?
            .repeat((kv_heads, 1))?;
        Ok(Some(idx))
    }
}

#[test]
fn selecting_all_keys_equals_full_attention_and_fewer_keys_differs() {
    let m = model();
    let prompt: Vec<u32> = (0..12).collect();
    let mut cache = m.new_cache();
    m.forward_one(&prompt, &mut cache, None).unwrap();
    let mut full_cache = cache.try_clone().unwrap();
    let full = m.forward_one(&[40], &mut full_cache, None).unwrap();

    let mut all = SelectKeys((0..12).collect());
    let mut c = cache.try_clone().unwrap();
    let selected = m.forward_one(&[40], &mut c, Some(&mut all)).unwrap();
    assert!(max_abs_diff(&full, &selected) < 1e-5);

    let mut few = SelectKeys(vec![0, 3]);
    let mut c = cache.try_clone().unwrap();
    let partial = m.forward_one(&[40], &mut c, Some(&mut few)).unwrap();
    assert!(max_abs_diff(&full, &partial) > 1e-4);
}

#[test]
fn embeddings_input_equals_token_input() {
    let m = model();
    let tokens = [3u32, 1, 4, 1, 5];
    let from_tokens = m.forward_one(&tokens, &mut m.new_cache(), None).unwrap();
    let mut cache = m.new_cache();
    let mut step = SequenceStep::new(
        DecoderInput::Embeddings(m.embed(&tokens).unwrap()),
        &mut cache,
    );
    let from_embeds = m.forward(std::slice::from_mut(&mut step)).unwrap()[0]
        .clone()
        .unwrap()
        .squeeze(0)
        .unwrap();
    assert_eq!(to_vec(&from_tokens), to_vec(&from_embeds));
}

#[test]
fn forked_caches_do_not_share_history() {
    let m = model();
    let mut cache = m.new_cache();
    m.forward_one(&[1, 2, 3], &mut cache, None).unwrap();
    let mut fork = cache.try_clone().unwrap();
    let a = m.forward_one(&[10], &mut cache, None).unwrap();
    m.forward_one(&[20], &mut fork, None).unwrap();
    // The fork wrote position 3 too; the original's next step must still see its own token.
    let b = m.forward_one(&[11], &mut cache, None).unwrap();
    let mut fresh = m.new_cache();
    m.forward_one(&[1, 2, 3, 10], &mut fresh, None).unwrap();
    let want = m.forward_one(&[11], &mut fresh, None).unwrap();
    assert!(max_abs_diff(&b, &want) < 1e-5);
    assert!(max_abs_diff(&a, &b) > 0.0);
}
