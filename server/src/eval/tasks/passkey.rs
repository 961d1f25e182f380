//! `passkey`: synthetic long-context retrieval (RULER-style needle). Each item hides a random
//! five-digit key at a chosen depth of filler text of a chosen length; it is right when the
//! greedy answer after "The pass key is" contains the key. Reported by context length and depth.

use crate::eval::client::Client;
use crate::eval::item::{Item, Prompt, Target};
use crate::passkey::{passkey, repeats_for, user_text, ANSWER_PREFIX, FILLER};
use anyhow::Result;
use serde_json::json;

/// Tokens generated per answer: room for " 12345." after the model restates "the pass key is"
/// (8 cut such answers off after the key's first digits).
const ANSWER_TOKENS: usize = 16;

/// `n` items per (context length, depth) pair; keys drawn from `seed`.
pub fn items(
    client: &Client,
    contexts: &[usize],
    depths: &[f64],
    n: usize,
    seed: u64,
) -> Result<Vec<Item>> {
    let filler_tokens = client.tokenize(FILLER)?.len();
    let answer_prefix = client.tokenize(ANSWER_PREFIX)?;
    let prompt = |repeats: usize, depth: f64, key: u32| -> Result<Vec<u32>> {
        let user = user_text(repeats, depth, key);
        let mut ids = client.tokenize_chat(&[json!({"role": "user", "content": user})])?;
        ids.extend(&answer_prefix);
        Ok(ids)
    };
    let mut items = Vec::new();
    let mut index = 0u64;
    for &context in contexts {
        for &depth in depths {
            let overhead = prompt(0, depth, 10_000)?.len();
            let repeats = repeats_for(context, overhead, filler_tokens);
            for _ in 0..n {
                let key = passkey(seed.wrapping_add(index));
                index += 1;
                items.push(Item {
                    id: format!("ctx{context}-depth{depth}-key{key}"),
                    group: Some(format!("{context} tokens, depth {depth}")),
                    prompt: Prompt::Tokens(prompt(repeats, depth, key)?),
                    target: Target::Contains {
                        expected: key.to_string(),
                        max_tokens: ANSWER_TOKENS,
                    },
                });
            }
        }
    }
    Ok(items)
}
