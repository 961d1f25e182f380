//! Turning logits into the next token: penalties, temperature, top-k, top-p, min-p, and a
//! seeded RNG so that a seed reproduces a sample.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Per-request sampling settings (OpenAI's plus the usual extensions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 1 = off.
    pub top_p: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 0 = off. Keeps tokens with p >= min_p * max p.
    pub min_p: f32,
    /// 1 = off. Divides positive / multiplies negative logits of tokens already seen.
    pub repetition_penalty: f32,
    /// OpenAI: subtracted once from every token already generated.
    pub presence_penalty: f32,
    /// OpenAI: subtracted per occurrence of a token already generated.
    pub frequency_penalty: f32,
    pub seed: Option<u64>,
    /// Added to the logits of the given tokens (OpenAI's `logit_bias`).
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self { params, rng }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Whether [`Self::apply_penalties`] changes anything.
    pub fn has_penalties(&self) -> bool {
        let p = &self.params;
        !p.logit_bias.is_empty()
            || p.repetition_penalty != 1.0
            || p.presence_penalty != 0.0
            || p.frequency_penalty != 0.0
    }

    /// Applies `logit_bias` and the repetition, presence and frequency penalties in place. The
    /// repetition penalty covers the prompt and the output, the OpenAI penalties the output only.
    pub fn apply_penalties(&self, logits: &mut [f32], prompt: &[u32], generated: &[u32]) {
        let p = &self.params;
        for &(token, bias) in &p.logit_bias {
            if let Some(logit) = logits.get_mut(token as usize) {
                *logit += bias;
            }
        }
        if p.repetition_penalty != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &t in prompt.iter().chain(generated) {
                if let Some(s) = seen.get_mut(t as usize) {
                    *s = true;
                }
            }
            for (logit, _) in logits.iter_mut().zip(&seen).filter(|(_, &s)| s) {
                *logit = if *logit > 0.0 {
                    *logit / p.repetition_penalty
                } else {
                    *logit * p.repetition_penalty
                };
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let mut counts: HashMap<u32, usize> = HashMap::new();
            for &t in generated {
                *counts.entry(t).or_default() += 1;
            }
            for (t, n) in counts {
                if let Some(logit) = logits.get_mut(t as usize) {
                    *logit -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
    }

    /// Picks the next token from penalized logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 {
            return argmax(logits);
        }
        let candidates = self.filtered_probs(logits);
        let draw: f32 = self.rng.random();
        let total: f32 = candidates.iter().map(|c| c.1).sum();
        let mut acc = 0.0;
        for &(token, p) in &candidates {
            acc += p / total;
            if draw < acc {
                return token;
            }
        }
        candidates
            .last()
            .map(|c| c.0)
            .unwrap_or_else(|| argmax(logits))
    }

    /// Tokens left after temperature, top-k, top-p and min-p, with their (unnormalized)
    /// probabilities, most likely first.
    fn filtered_probs(&self, logits: &[f32]) -> Vec<(u32, f32)> {
        let p = &self.params;
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) / p.temperature).exp()))
            .filter(|c| c.1 > 0.0)
            .collect();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1));
        if p.top_k > 0 {
            probs.truncate(p.top_k);
        }
        if p.top_p < 1.0 {
            let total: f32 = probs.iter().map(|c| c.1).sum();
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, c) in probs.iter().enumerate() {
                acc += c.1 / total;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        if p.min_p > 0.0 {
            // probs[0] is the most likely token, with unnormalized probability 1.
            let floor = p.min_p * probs.first().map_or(0.0, |c| c.1);
            probs.retain(|c| c.1 >= floor);
        }
        probs
    }
}

/// The index of the first largest value (NaNs are never chosen, unless the first value is one:
/// then 0), in two vectorized passes: the largest value in eight running maxima, then the first
/// block of eight that holds it. One pass with a branch per value was 2.5% of a 16-stream server
/// profile (0.5% now), on the engine thread that the compute workers wait for.
pub fn argmax(v: &[f32]) -> u32 {
    let Some(&first) = v.first() else {
        return 0;
    };
    if first.is_nan() {
        return 0;
    }
    let mut lanes = [first; 8];
    let mut chunks = v.chunks_exact(8);
    for chunk in chunks.by_ref() {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane = if x > *lane { x } else { *lane };
        }
    }
    let best = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(first, |best, &x| if x > best { x } else { best });
    // Blocks of eight are compared whole (no branch per value); the tail after them by value.
    let whole = v.len() / 8 * 8;
    let block = v[..whole]
        .chunks_exact(8)
        .position(|chunk| {
            let chunk: &[f32; 8] = chunk.try_into().expect("eight values");
            chunk.iter().fold(false, |hit, &x| hit | (x == best))
        })
        .map_or(whole, |b| 8 * b);
    let within = v[block..]
        .iter()
        .position(|&x| x == best)
        .expect("the largest value is in v");
    (block + within) as u32
}

/// log-softmax of a logits row.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
    logits.iter().map(|l| l - lse).collect()
}

/// The `n` most likely tokens of a log-probability row, most likely first.
pub fn top_n(logprobs: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..logprobs.len() as u32).collect();
    let n = n.min(idx.len());
    if n == 0 {
        return Vec::new();
    }
    idx.select_nth_unstable_by(n - 1, |a, b| {
        logprobs[*b as usize].total_cmp(&logprobs[*a as usize])
    });
    idx.truncate(n);
    idx.sort_by(|a, b| logprobs[*b as usize].total_cmp(&logprobs[*a as usize]));
    idx.into_iter().map(|i| (i, logprobs[i as usize])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(f: impl FnOnce(&mut SamplingParams)) -> Sampler {
        let mut p = SamplingParams {
            seed: Some(1),
            ..SamplingParams::default()
        };
        f(&mut p);
        Sampler::new(p)
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = sampler(|p| p.temperature = 0.0);
        assert_eq!(s.sample(&[0.1, 3.0, 2.9]), 1);
    }

    /// The two-pass argmax picks what a plain scan does: the first of equal maxima, never a
    /// NaN unless the row starts with one, -0 and 0 as equals.
    #[test]
    fn argmax_is_the_first_largest_value() {
        let scan = |v: &[f32]| {
            let mut best = 0;
            for (i, &x) in v.iter().enumerate() {
                if x > v[best] {
                    best = i;
                }
            }
            best as u32
        };
        let mut rows: Vec<Vec<f32>> = vec![
            vec![1.0],
            vec![-0.0, 0.0, -1.0],
            vec![f32::NAN, 5.0, 6.0],
            vec![1.0, f32::NAN, 7.0, f32::NAN, 7.0],
            vec![f32::NEG_INFINITY; 19],
            (0..64).map(|i| (i % 5) as f32).collect(),
        ];
        for len in [7, 8, 9, 16, 23, 1000, 49152] {
            rows.push(
                (0..len)
                    .map(|i| ((i * 7919 % 1013) as f32 * 0.37).sin())
                    .collect(),
            );
            // A maximum repeated in the tail and in a later block.
            let mut tied: Vec<f32> = (0..len).map(|i| (i % 13) as f32).collect();
            tied[len - 1] = 100.0;
            tied[len / 2] = 100.0;
            rows.push(tied);
        }
        for row in &rows {
            assert_eq!(argmax(row), scan(row), "{:?}", &row[..row.len().min(12)]);
        }
    }

    #[test]
    fn same_seed_same_samples() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut s = sampler(|p| p.seed = Some(seed));
            (0..20).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(5), draw(5));
        assert_ne!(draw(5), draw(6));
    }

    #[test]
    fn top_k_top_p_and_min_p_cut_the_tail() {
        let logits = [4.0f32, 3.0, 2.0, 1.0, 0.0];
        let k = sampler(|p| p.top_k = 2).filtered_probs(&logits);
        assert_eq!(k.iter().map(|c| c.0).collect::<Vec<_>>(), vec![0, 1]);
        // Softmax: .636 .234 .086 .032 .012 -> top_p .8 keeps the first two.
        let tp = sampler(|p| p.top_p = 0.8).filtered_probs(&logits);
        assert_eq!(tp.len(), 2);
        // min_p .1: keeps p >= .0636 -> three tokens.
        let mp = sampler(|p| p.min_p = 0.1).filtered_probs(&logits);
        assert_eq!(mp.len(), 3);
        for _ in 0..50 {
            assert!(sampler(|p| p.top_k = 2).sample(&logits) < 2);
        }
    }

    #[test]
    fn penalties_follow_hf_and_openai_rules() {
        let s = sampler(|p| {
            p.repetition_penalty = 2.0;
            p.presence_penalty = 0.5;
            p.frequency_penalty = 0.25;
        });
        let mut logits = [2.0f32, -2.0, 2.0, 1.0];
        s.apply_penalties(&mut logits, &[0, 1], &[3, 3]);
        assert_eq!(logits, [1.0, -4.0, 2.0, 0.5 - 0.5 - 0.5]);
    }

    #[test]
    fn top_n_and_log_softmax() {
        let lp = log_softmax(&[1.0, 3.0, 2.0]);
        let total: f32 = lp.iter().map(|l| l.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        let top = top_n(&lp, 2);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
    }
}
