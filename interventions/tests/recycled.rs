//! Recycled Attention's invariants (spec §3 "Sanity") on a tiny seeded model.

use attune_interventions::recycled::{max_pool, top_keys};
use attune_interventions::{parse, parse_all};
use attune_models::testing::{random_decoder, tiny_config};
use attune_models::{AttentionSite, HookPoint, SequenceHooks};
use candle_core::{Device, Result, Tensor};
use serde_json::{json, Value};

mod common;
use common::{prefill_then_decode, tiny_shape};

/// Logits of a 12-token prompt and 10 decode steps.
fn run(spec: Option<Value>) -> Vec<Vec<f32>> {
    let prompt: Vec<u32> = (0..12).map(|i| (i * 5 + 3) % 64).collect();
    let decode: Vec<u32> = (0..10).map(|t| (t * 7) % 64).collect();
    prefill_then_decode(5, spec, &prompt, &decode)
}

#[test]
fn neutral_settings_give_full_attention_bit_for_bit() {
    let plain = run(None);
    // K >= length, a full step every step, or a similarity no cosine reaches.
    assert_eq!(
        plain,
        run(Some(
            json!({"type": "recycled_attention", "k": 64, "stride": 3})
        ))
    );
    assert_eq!(
        plain,
        run(Some(
            json!({"type": "recycled_attention", "k": 4, "stride": 1})
        ))
    );
    assert_eq!(
        plain,
        run(Some(
            json!({"type": "recycled_attention", "k": 4, "dynamic": {"check_every": 1, "similarity": 1.5}})
        ))
    );
}

#[test]
fn a_small_budget_changes_partial_steps_only() {
    let plain = run(None);
    let recycled = run(Some(
        json!({"type": "recycled_attention", "k": 4, "stride": 4}),
    ));
    assert_eq!(plain[0], recycled[0], "prefill is full attention");
    assert_ne!(plain[1], recycled[1], "step 1 is partial");
    let dynamic = run(Some(
        json!({"type": "recycled_attention", "k": 4, "dynamic": {"check_every": 2, "similarity": 0.99}}),
    ));
    assert_eq!(plain[0], dynamic[0]);
    assert_ne!(plain, dynamic);
}

/// Records every key selection of the wrapped hooks.
struct Spy {
    inner: Box<dyn SequenceHooks>,
    selections: Vec<(usize, Vec<Vec<u32>>)>,
}

impl SequenceHooks for Spy {
    fn wants(&self, point: HookPoint, layer: usize) -> bool {
        self.inner.wants(point, layer)
    }
    fn queries(&mut self, site: &AttentionSite, q: &Tensor) -> Result<()> {
        self.inner.queries(site, q)
    }
    fn probs(&mut self, site: &AttentionSite, p: Tensor) -> Result<Tensor> {
        self.inner.probs(site, p)
    }
    fn select_keys(&mut self, site: &AttentionSite) -> Result<Option<Tensor>> {
        let sel = self.inner.select_keys(site)?;
        if let Some(t) = &sel {
            self.selections.push((site.key_len, t.to_vec2::<u32>()?));
        }
        Ok(sel)
    }
}

#[test]
fn selections_are_unique_in_range_within_budget_and_keep_the_newest_token() {
    for zerotuning in [false, true] {
        let mut specs = vec![json!({"type": "recycled_attention", "k": 5, "stride": 6})];
        if zerotuning {
            specs.push(json!({"type": "zerotuning", "gamma": 2.0}));
        }
        let parsed = parse_all(&specs, &tiny_shape()).unwrap();
        let m = random_decoder(&tiny_config(), 5, &Device::Cpu).unwrap();
        let mut spy = Spy {
            inner: parsed[0].install().hooks.unwrap(),
            selections: Vec::new(),
        };
        let mut cache = m.new_cache();
        m.forward_one(&(0..20).collect::<Vec<u32>>(), &mut cache, Some(&mut spy))
            .unwrap();
        for t in 0..12u32 {
            m.forward_one(&[t], &mut cache, Some(&mut spy)).unwrap();
        }
        assert!(!spy.selections.is_empty());
        for (len, heads) in &spy.selections {
            assert_eq!(heads.len(), 2, "one list per KV head");
            for keys in heads {
                let mut sorted = keys.clone();
                sorted.sort();
                sorted.dedup();
                assert_eq!(sorted.len(), keys.len(), "unique: {keys:?}");
                assert!(keys.len() <= 5 && keys.iter().all(|&k| (k as usize) < *len));
                assert_eq!(
                    *keys.last().unwrap() as usize,
                    len - 1,
                    "the newest token is attended"
                );
                if zerotuning {
                    assert!(
                        keys.contains(&0),
                        "ZeroTuning's first key is kept: {keys:?}"
                    );
                }
            }
        }
        assert_eq!(parsed[0].resolved()["keep_first_key"], zerotuning);
    }
}

#[test]
fn pooling_and_top_k_follow_the_paper() {
    assert_eq!(
        max_pool(&[0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0], 7),
        vec![1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 2.0, 2.0, 2.0]
    );
    // Lowest score first, so new tokens push the weakest out.
    assert_eq!(top_keys(&[0.1, 0.5, 0.3, 0.9], 3, false), vec![2, 1, 3]);
    assert_eq!(top_keys(&[0.1, 0.5, 0.3, 0.9], 3, true), vec![1, 3, 0]);
}

#[test]
fn composition_rules_and_parameters() {
    let err = |specs: Vec<Value>| parse_all(&specs, &tiny_shape()).err().unwrap().to_string();
    let e = err(vec![
        json!({"type": "act"}),
        json!({"type": "recycled_attention"}),
    ]);
    assert!(
        e.starts_with("interventions[1].type:") && e.contains("act"),
        "{e}"
    );
    assert!(err(vec![
        json!({"type": "recycled_attention", "k": 4, "k_fraction": 0.5})
    ])
    .contains("k_fraction"));
    assert!(
        err(vec![json!({"type": "recycled_attention", "stride": 0})])
            .starts_with("interventions[0].stride:")
    );
    assert!(err(vec![
        json!({"type": "recycled_attention", "stride": 2, "dynamic": {}})
    ])
    .starts_with("interventions[0].dynamic:"));
    let resolved = parse(&json!({"type": "recycled_attention"}), &tiny_shape())
        .unwrap()
        .resolved();
    assert_eq!(
        resolved["dynamic"],
        json!({"check_every": 5, "similarity": 0.85})
    );
    assert_eq!(resolved["k_fraction"], 0.125);
    assert_eq!(resolved["pool_kernel"], 7);
}
