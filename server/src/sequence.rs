//! One generation in progress: its prompt, cache, sampler and stopping rules. The caller runs
//! the decoder on [`Sequence::next_input`] and hands the logits back to [`Sequence::on_logits`],
//! so a scheduler can batch many sequences per step.

use crate::sampling::{log_softmax, top_n, Sampler, SamplingParams};
use crate::stop::StopStrings;
use anyhow::Result;
use attune_models::{DecoderInput, IncrementalDecoder, KvCache, TextTokenizer};
use serde::Serialize;
use std::collections::BTreeSet;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` or the model's context was reached.
    Length,
}

#[derive(Debug, Clone)]
pub struct GenerationParams {
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub sampling: SamplingParams,
    /// Record log-probabilities with this many alternatives per token (`None` = off).
    pub logprobs: Option<usize>,
    /// Tokens whose log-probabilities at the first generated position are reported.
    pub score_tokens: Vec<u32>,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            stop: Vec::new(),
            sampling: SamplingParams::default(),
            logprobs: None,
            score_tokens: Vec::new(),
        }
    }
}

/// Log-probability of a chosen token and the most likely alternatives at that step.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// What one step produced.
#[derive(Debug, Clone, Default)]
pub struct StepOutput {
    pub token: u32,
    /// Text that became final with this token (may be empty).
    pub text: String,
    pub logprob: Option<TokenLogprob>,
    pub finished: Option<FinishReason>,
    /// `score_tokens` with their log-probabilities (first step only).
    pub token_scores: Option<Vec<(u32, f32)>>,
    /// What the interventions chose for this choice (first step only), by method name.
    pub intervention_report: Option<serde_json::Value>,
    /// The prompt's length when an intervention replaced it (CARVE), first step only.
    pub prompt_tokens: Option<usize>,
}

/// The token picked from a step's logits, before the stop rules see it.
#[derive(Debug)]
pub struct Choice {
    token: u32,
    logprob: Option<TokenLogprob>,
    token_scores: Option<Vec<(u32, f32)>>,
}

pub struct Sequence {
    params: GenerationParams,
    sampler: Sampler,
    prompt: Vec<u32>,
    generated: Vec<u32>,
    cache: KvCache,
    stop_ids: BTreeSet<u32>,
    context_limit: usize,
    detokenizer: IncrementalDecoder,
    stops: StopStrings,
    text: String,
    finished: Option<FinishReason>,
}

impl Sequence {
    /// `stop_ids` are the model's end-of-generation tokens; `context_limit` its context size.
    pub fn new(
        prompt: Vec<u32>,
        params: GenerationParams,
        cache: KvCache,
        stop_ids: BTreeSet<u32>,
        context_limit: usize,
    ) -> Self {
        Self {
            sampler: Sampler::new(params.sampling.clone()),
            stops: StopStrings::new(params.stop.clone()),
            params,
            prompt,
            generated: Vec::new(),
            cache,
            stop_ids,
            context_limit,
            detokenizer: IncrementalDecoder::new(),
            text: String::new(),
            finished: None,
        }
    }

    /// The input of the next decoder step: the whole prompt first, then the last token.
    pub fn next_input(&self) -> DecoderInput {
        match self.generated.last() {
            Some(&t) => DecoderInput::Tokens(vec![t]),
            None => DecoderInput::Tokens(self.prompt.clone()),
        }
    }

    pub fn cache_bytes(&self) -> usize {
        self.cache.bytes()
    }

    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    pub fn cache_mut(&mut self) -> &mut KvCache {
        &mut self.cache
    }

    pub fn prompt(&self) -> &[u32] {
        &self.prompt
    }

    /// Every token so far: the prompt, then what was generated.
    pub fn context(&self) -> Vec<u32> {
        self.prompt.iter().chain(&self.generated).copied().collect()
    }

    pub fn generated(&self) -> &[u32] {
        &self.generated
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn finished(&self) -> Option<FinishReason> {
        self.finished
    }

    /// Samples the next token from the last position's logits and applies the stop rules.
    pub fn on_logits(&mut self, logits: &[f32], tokenizer: &TextTokenizer) -> Result<StepOutput> {
        let choice = self.choose(logits);
        self.accept(choice, tokenizer)
    }

    /// The next token from the last position's logits, with the log-probabilities asked for:
    /// all the work on the logits row, and only that (no detokenizing, no state change but the
    /// sampler's), so that a scheduler can choose for many sequences at once.
    pub fn choose(&mut self, logits: &[f32]) -> Choice {
        let scoring = self.generated.is_empty() && !self.params.score_tokens.is_empty();
        let row = (self.params.logprobs.is_some() || scoring).then(|| log_softmax(logits));
        let token_scores = scoring.then(|| {
            let row = row.as_ref().expect("computed when scoring");
            self.params
                .score_tokens
                .iter()
                .map(|&t| (t, row[t as usize]))
                .collect()
        });
        let token = if self.sampler.has_penalties() {
            let mut penalized = logits.to_vec();
            self.sampler
                .apply_penalties(&mut penalized, &self.prompt, &self.generated);
            self.sampler.sample(&penalized)
        } else {
            self.sampler.sample(logits)
        };
        let logprob = self
            .params
            .logprobs
            .zip(row.as_ref())
            .map(|(n, row)| TokenLogprob {
                token,
                logprob: row[token as usize],
                top: top_n(row, n),
            });
        Choice {
            token,
            logprob,
            token_scores,
        }
    }

    /// Takes the token [`Self::choose`] picked and applies the stop rules.
    pub fn accept(&mut self, choice: Choice, tokenizer: &TextTokenizer) -> Result<StepOutput> {
        let Choice {
            token,
            logprob,
            token_scores,
        } = choice;
        self.generated.push(token);
        let mut out = StepOutput {
            token,
            logprob,
            token_scores,
            ..StepOutput::default()
        };
        if self.stop_ids.contains(&token) {
            out.text = self.flush(tokenizer)?;
            self.finished = Some(FinishReason::Stop);
        } else {
            let piece = self.detokenizer.push(tokenizer, token)?.unwrap_or_default();
            let (text, hit_stop) = self.stops.push(&piece);
            out.text = text;
            if hit_stop {
                self.finished = Some(FinishReason::Stop);
            } else if self.generated.len() >= self.params.max_tokens
                || self.prompt.len() + self.generated.len() >= self.context_limit
            {
                out.text.push_str(&self.flush(tokenizer)?);
                self.finished = Some(FinishReason::Length);
            }
        }
        self.text.push_str(&out.text);
        out.finished = self.finished;
        Ok(out)
    }

    /// Text held back by the detokenizer or the stop-string matcher.
    fn flush(&mut self, tokenizer: &TextTokenizer) -> Result<String> {
        let tail = self.detokenizer.finish(tokenizer)?.unwrap_or_default();
        let (mut text, _) = self.stops.push(&tail);
        text.push_str(&self.stops.flush());
        Ok(text)
    }
}
