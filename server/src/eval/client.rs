//! The eval's HTTP client: the same public API any user calls (`/tokenize`, chat and text
//! completions with `score_token_ids` and `interventions`).

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

pub struct Client {
    base: String,
    api_key: Option<String>,
    agent: ureq::Agent,
    /// First token of each label surface form, by text.
    first_tokens: Mutex<HashMap<String, Option<u32>>>,
}

impl Client {
    pub fn new(base: &str, api_key: Option<String>) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            api_key,
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(3600)))
                .build()
                .into(),
            first_tokens: Mutex::default(),
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn get(&self, path: &str) -> Result<Value> {
        let mut request = self.agent.get(&format!("{}{path}", self.base));
        if let Some(key) = &self.api_key {
            request = request.header("Authorization", &format!("Bearer {key}"));
        }
        answer(path, request.call())
    }

    pub fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let mut request = self.agent.post(&format!("{}{path}", self.base));
        if let Some(key) = &self.api_key {
            request = request.header("Authorization", &format!("Bearer {key}"));
        }
        answer(path, request.send_json(body))
    }

    /// The id of the server's default (first) model.
    pub fn default_model(&self) -> Result<String> {
        let models = self.get("/v1/models")?;
        models["data"][0]["id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("the server lists no models"))
    }

    /// Token ids of `text` (no special tokens added).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let out = self.post(
            "/tokenize",
            &json!({"prompt": text, "add_special_tokens": false}),
        )?;
        serde_json::from_value(out["tokens"].clone()).context("/tokenize answered without tokens")
    }

    /// Token ids of a chat prompt, ready for the assistant's answer.
    pub fn tokenize_chat(&self, messages: &[Value]) -> Result<Vec<u32>> {
        let out = self.post("/tokenize", &json!({"messages": messages}))?;
        serde_json::from_value(out["tokens"].clone()).context("/tokenize answered without tokens")
    }

    /// The first token of `text`, which is what a label is scored by; `None` when that token
    /// is only whitespace (" 4" is " " then "4" in many vocabularies), which says nothing of
    /// the label.
    pub fn first_token(&self, text: &str) -> Result<Option<u32>> {
        if let Some(&id) = self.first_tokens.lock().expect("not poisoned").get(text) {
            return Ok(id);
        }
        let first = *self
            .tokenize(text)?
            .first()
            .ok_or_else(|| anyhow!("the label form {text:?} has no tokens"))?;
        let piece = self.post("/detokenize", &json!({"tokens": [first]}))?;
        let blank = piece["prompt"]
            .as_str()
            .is_some_and(|p| p.trim().is_empty());
        let id = (!blank).then_some(first);
        self.first_tokens
            .lock()
            .expect("not poisoned")
            .insert(text.to_string(), id);
        Ok(id)
    }
}

/// The JSON body of a 200 answer, or an error carrying the server's message.
fn answer(
    path: &str,
    response: std::result::Result<ureq::http::Response<ureq::Body>, ureq::Error>,
) -> Result<Value> {
    let mut response = response.with_context(|| format!("{path}: the request failed"))?;
    let status = response.status().as_u16();
    let body: Value = response
        .body_mut()
        .with_config()
        .limit(64 * 1024 * 1024)
        .read_json()
        .with_context(|| format!("{path}: the answer (status {status}) is not JSON"))?;
    if status != 200 {
        bail!(
            "{path}: status {status}: {}",
            body["error"]["message"].as_str().unwrap_or("(no message)")
        );
    }
    Ok(body)
}
