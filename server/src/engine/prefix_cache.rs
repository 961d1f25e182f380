//! Prompt prefix caching: the KV caches of recently prefilled prompts, kept up to a byte
//! budget, so that a new prompt starting with the same tokens (a shared system prompt, a
//! few-shot preamble, a conversation's earlier turns) copies those positions instead of
//! computing them again. Only prompts run without hooks and without images are stored or
//! served: hooks may change a prompt's keys and values, and image rows are not tokens.
//!
//! A copied prefix continues exactly as the whole prompt would (the quantized kernels and the
//! row-by-row attention give a row the same result whatever else is in its step), so a request
//! gets the same tokens and log-probabilities with or without a hit.

use attune_models::KvCache;
use candle_core::Result;

/// Shortest shared prefix worth a copy: below it the prefill of those rows costs about as
/// little as the copy.
const MIN_REUSED_TOKENS: usize = 16;

struct Entry {
    tokens: Vec<u32>,
    cache: KvCache,
    last_used: u64,
}

pub struct PrefixCache {
    entries: Vec<Entry>,
    budget_bytes: usize,
    clock: u64,
}

impl PrefixCache {
    /// Keeps at most `budget_bytes` of KV buffers; 0 turns prefix caching off.
    pub fn new(budget_bytes: usize) -> Self {
        Self {
            entries: Vec::new(),
            budget_bytes,
            clock: 0,
        }
    }

    /// For `prompt`, a cache holding its longest stored prefix, and that prefix's length; at
    /// least the prompt's last token is left to compute (its logits start the generation).
    pub fn lookup(&mut self, prompt: &[u32]) -> Result<Option<(KvCache, usize)>> {
        let usable = prompt.len().saturating_sub(1);
        let best = self
            .entries
            .iter_mut()
            .map(|e| {
                let shared = e.tokens.iter().zip(prompt).take_while(|(a, b)| a == b);
                (shared.count().min(usable), e)
            })
            .max_by_key(|(shared, _)| *shared);
        let Some((shared, entry)) = best.filter(|(shared, _)| *shared >= MIN_REUSED_TOKENS) else {
            return Ok(None);
        };
        self.clock += 1;
        entry.last_used = self.clock;
        Ok(Some((entry.cache.prefix(shared)?, shared)))
    }

    /// Stores the cache of a just prefilled `prompt` (holding exactly its positions), replacing
    /// a stored prompt it extends, and drops the least recently used entries over the budget.
    pub fn insert(&mut self, prompt: &[u32], cache: &KvCache) -> Result<()> {
        if self.budget_bytes == 0 || prompt.len() < MIN_REUSED_TOKENS {
            return Ok(());
        }
        self.clock += 1;
        if let Some(same) = self.entries.iter_mut().find(|e| e.tokens == prompt) {
            same.last_used = self.clock;
            return Ok(());
        }
        let cache = cache.prefix(prompt.len())?;
        if cache.bytes() > self.budget_bytes {
            return Ok(());
        }
        self.entries.retain(|e| !prompt.starts_with(&e.tokens));
        self.entries.push(Entry {
            tokens: prompt.to_vec(),
            cache,
            last_used: self.clock,
        });
        while self.bytes() > self.budget_bytes {
            let oldest = (0..self.entries.len())
                .min_by_key(|&i| self.entries[i].last_used)
                .expect("over budget means not empty");
            self.entries.swap_remove(oldest);
        }
        Ok(())
    }

    /// Bytes of the stored KV buffers.
    pub fn bytes(&self) -> usize {
        self.entries.iter().map(|e| e.cache.bytes()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use attune_models::testing::{random_decoder, tiny_config};
    use candle_core::Device;

    fn prefilled(tokens: &[u32]) -> KvCache {
        let model = random_decoder(&tiny_config(), 3, &Device::Cpu).unwrap();
        let mut cache = model.new_cache();
        model.forward_one(tokens, &mut cache, None).unwrap();
        cache
    }

    #[test]
    fn serves_the_longest_shared_prefix_and_leaves_the_last_token() {
        let system: Vec<u32> = (0..20).collect();
        let mut store = PrefixCache::new(1 << 30);
        let first = [system.clone(), vec![40, 41, 42]].concat();
        store.insert(&first, &prefilled(&first)).unwrap();
        let longer = [system.clone(), vec![40, 41, 50, 51]].concat();
        store.insert(&longer, &prefilled(&longer)).unwrap();
        let (cache, shared) = store
            .lookup(&[system.clone(), vec![40, 41, 50, 99]].concat())
            .unwrap()
            .unwrap();
        assert_eq!((shared, cache.len()), (23, 23));
        // The whole stored prompt asked again: all but its last token.
        let (_, shared) = store.lookup(&first).unwrap().unwrap();
        assert_eq!(shared, first.len() - 1);
        // Too short a match, or none.
        assert!(store.lookup(&system[..10]).unwrap().is_none());
        assert!(store.lookup(&[7; 30]).unwrap().is_none());
    }

    #[test]
    fn keeps_to_its_budget_dropping_the_least_recently_used() {
        let prompts: Vec<Vec<u32>> = (0..3)
            .map(|p| (0..20).map(|t| 20 * p + t).collect())
            .collect();
        let one = prefilled(&prompts[0]).prefix(20).unwrap().bytes();
        let mut store = PrefixCache::new(2 * one);
        store.insert(&prompts[0], &prefilled(&prompts[0])).unwrap();
        store.insert(&prompts[1], &prefilled(&prompts[1])).unwrap();
        // Using the first makes the second the oldest.
        assert!(store
            .lookup(&[prompts[0].clone(), vec![1]].concat())
            .unwrap()
            .is_some());
        store.insert(&prompts[2], &prefilled(&prompts[2])).unwrap();
        assert_eq!(store.bytes(), 2 * one);
        let hit = |store: &mut PrefixCache, p: &[u32]| {
            store.lookup(&[p, &[1]].concat()).unwrap().is_some()
        };
        assert!(hit(&mut store, &prompts[0]));
        assert!(!hit(&mut store, &prompts[1]));
        assert!(hit(&mut store, &prompts[2]));
        // A budget of zero stores nothing.
        let mut off = PrefixCache::new(0);
        off.insert(&prompts[0], &prefilled(&prompts[0])).unwrap();
        assert_eq!(off.bytes(), 0);
    }

    #[test]
    fn a_prompt_that_extends_a_stored_one_replaces_it() {
        let short: Vec<u32> = (0..20).collect();
        let long: Vec<u32> = (0..30).collect();
        let mut store = PrefixCache::new(1 << 30);
        store.insert(&short, &prefilled(&short)).unwrap();
        let before = store.bytes();
        store.insert(&long, &prefilled(&long)).unwrap();
        assert_eq!(store.entries.len(), 1);
        assert!(store.bytes() >= before);
        let (_, shared) = store
            .lookup(&[long.clone(), vec![1]].concat())
            .unwrap()
            .unwrap();
        assert_eq!(shared, 30);
    }
}
