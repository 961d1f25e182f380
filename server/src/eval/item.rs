//! Labeled items and how one is scored through the API, the way the papers score: a
//! classification or multiple-choice item by the log-probabilities of its label words at the
//! answer position (each label's surface forms summed), a generation item by its answer text.

use super::client::Client;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

/// One labeled item.
#[derive(Debug, Clone)]
pub struct Item {
    pub id: String,
    /// Items of one group are also reported together (passkey: context length and depth).
    pub group: Option<String>,
    pub prompt: Prompt,
    pub target: Target,
}

#[derive(Debug, Clone)]
pub enum Prompt {
    /// Chat messages, rendered by the server's chat template.
    Chat(Vec<Value>),
    /// Ready token ids (a chat prompt with the start of the answer appended).
    Tokens(Vec<u32>),
}

#[derive(Debug, Clone)]
pub enum Target {
    /// Pick one of `choices` (each given by its surface forms); `answer` indexes the right one.
    Choice {
        names: Vec<String>,
        forms: Vec<Vec<String>>,
        answer: usize,
    },
    /// Correct when the greedy answer of up to `max_tokens` tokens contains `expected`.
    Contains { expected: String, max_tokens: usize },
}

/// What one item gave under one configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub id: String,
    pub correct: bool,
    /// The chosen label, or the generated text.
    pub answer: String,
    /// Per choice: log of the summed probabilities of its surface forms' first tokens.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub label_logprobs: Vec<f64>,
}

impl Item {
    /// Runs the item with `interventions` (a JSON array) and scores it.
    pub fn evaluate(&self, client: &Client, interventions: &Value) -> Result<Outcome> {
        let result = match &self.target {
            Target::Choice {
                names,
                forms,
                answer,
            } => self.score_choice(client, interventions, names, forms, *answer),
            Target::Contains {
                expected,
                max_tokens,
            } => self.generate(client, interventions, expected, *max_tokens),
        };
        result.with_context(|| format!("item {}", self.id))
    }

    fn request(&self, interventions: &Value, max_tokens: usize) -> (&'static str, Value) {
        let mut body = json!({
            "max_tokens": max_tokens,
            "temperature": 0,
            "interventions": interventions,
        });
        match &self.prompt {
            Prompt::Chat(messages) => {
                body["messages"] = json!(messages);
                ("/v1/chat/completions", body)
            }
            Prompt::Tokens(ids) => {
                body["prompt"] = json!(ids);
                ("/v1/completions", body)
            }
        }
    }

    fn score_choice(
        &self,
        client: &Client,
        interventions: &Value,
        names: &[String],
        forms: &[Vec<String>],
        answer: usize,
    ) -> Result<Outcome> {
        let tokens = label_tokens(client, names, forms)?;
        let (path, mut body) = self.request(interventions, 1);
        body["score_token_ids"] = json!(tokens.iter().flatten().collect::<Vec<_>>());
        let reply = client.post(path, &body)?;
        let scores = reply["choices"][0]["token_scores"]
            .as_array()
            .context("the answer has no token_scores")?;
        let logprob_of = |id: u32| -> f64 {
            scores
                .iter()
                .find(|s| s["token_id"] == id)
                .and_then(|s| s["logprob"].as_f64())
                // JSON has no -inf: a token an intervention masked out comes back as null.
                .unwrap_or(f64::NEG_INFINITY)
        };
        let label_logprobs: Vec<f64> = tokens
            .iter()
            .map(|ids| log_sum_exp(ids.iter().map(|&id| logprob_of(id))))
            .collect();
        let best = label_logprobs
            .iter()
            .enumerate()
            .filter(|(_, lp)| lp.is_finite())
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i);
        Ok(Outcome {
            id: self.id.clone(),
            correct: best == Some(answer),
            // No finite label score (every label masked out): counted wrong, shown as "-".
            answer: best.map_or_else(|| "-".to_string(), |i| names[i].clone()),
            label_logprobs,
        })
    }

    fn generate(
        &self,
        client: &Client,
        interventions: &Value,
        expected: &str,
        max_tokens: usize,
    ) -> Result<Outcome> {
        let (path, body) = self.request(interventions, max_tokens);
        let reply = client.post(path, &body)?;
        let choice = &reply["choices"][0];
        let text = choice["text"]
            .as_str()
            .or_else(|| choice["message"]["content"].as_str())
            .context("the answer has no text")?;
        Ok(Outcome {
            id: self.id.clone(),
            correct: text.contains(expected),
            answer: text.trim().to_string(),
            label_logprobs: Vec::new(),
        })
    }
}

/// The distinct first tokens of each choice's surface forms; two choices must not share one.
fn label_tokens(client: &Client, names: &[String], forms: &[Vec<String>]) -> Result<Vec<Vec<u32>>> {
    let mut out: Vec<Vec<u32>> = Vec::with_capacity(forms.len());
    for (i, choice_forms) in forms.iter().enumerate() {
        let mut ids = Vec::new();
        for form in choice_forms {
            let Some(id) = client.first_token(form)? else {
                continue;
            };
            if let Some(j) = out.iter().position(|other| other.contains(&id)) {
                bail!(
                    "choices `{}` and `{}` both start with token {id} (from {form:?}); \
                     labels are scored by their first token, so they must differ there",
                    names[j],
                    names[i]
                );
            }
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        if ids.is_empty() {
            bail!("choice `{}` has no scorable first token", names[i]);
        }
        out.push(ids);
    }
    Ok(out)
}

/// ln(sum(exp(x))) over finite and infinite values alike.
fn log_sum_exp(values: impl Iterator<Item = f64>) -> f64 {
    let values: Vec<f64> = values.collect();
    let max = values.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return max;
    }
    max + values.iter().map(|v| (v - max).exp()).sum::<f64>().ln()
}
