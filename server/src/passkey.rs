//! Passkey-retrieval prompts (the needle tests of RULER and Landmark Attention): a random
//! five-digit key stated at a chosen depth of repetitive filler text, then asked for. Shared by
//! `attune bench --passkey` (speed) and `attune eval passkey` (accuracy).

use attune_models::testing::SeededRng;

/// One filler sentence group, repeated to reach the wanted length.
pub const FILLER: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";

/// Put after the chat prompt as the start of the assistant's answer.
pub const ANSWER_PREFIX: &str = "The pass key is";

/// A five-digit key from `seed`.
pub fn passkey(seed: u64) -> u32 {
    10_000 + (SeededRng::new(seed).next_u64() % 90_000) as u32
}

/// The user message: `repeats` filler groups with the key stated after `depth` (0..=1) of them.
pub fn user_text(repeats: usize, depth: f64, key: u32) -> String {
    let before = ((repeats as f64) * depth.clamp(0.0, 1.0)).floor() as usize;
    format!(
        "There is an important pass key hidden inside a lot of irrelevant text. Find it and \
         remember it.\n\n{}The pass key is {key}. Remember it. {key} is the pass key. {}\n\nWhat \
         is the pass key?",
        FILLER.repeat(before),
        FILLER.repeat(repeats - before)
    )
}

/// Filler repeats that bring a prompt of `overhead` tokens without filler to about `context`
/// tokens, when one filler group is `filler_tokens` long.
pub fn repeats_for(context: usize, overhead: usize, filler_tokens: usize) -> usize {
    context.saturating_sub(overhead) / filler_tokens.max(1)
}
