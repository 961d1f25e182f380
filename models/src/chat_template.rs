//! Chat prompts rendered with the model's own Jinja template, as HF transformers does.

use anyhow::{anyhow, Context, Result};
use minijinja::{Environment, ErrorKind, Value};
use std::path::Path;

/// Used when a model ships no template (as llama.cpp does).
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    source: String,
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        // HF renders with trim_blocks and lstrip_blocks on; templates are written for that.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| anyhow!("invalid chat template: {e}"))?;
        Ok(Self {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            source: source.to_string(),
        })
    }

    /// The template of an HF directory: `chat_template.jinja`, `chat_template.json`, or the
    /// `chat_template` field of `tokenizer_config.json`.
    pub fn source_from_hf_dir(dir: &Path) -> Result<Option<String>> {
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            return Ok(Some(std::fs::read_to_string(jinja)?));
        }
        for file in ["chat_template.json", "tokenizer_config.json"] {
            let path = dir.join(file);
            if !path.exists() {
                continue;
            }
            let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
                .with_context(|| format!("invalid JSON in {}", path.display()))?;
            match &json["chat_template"] {
                serde_json::Value::String(s) => return Ok(Some(s.clone())),
                // A list of named templates: take the default one.
                serde_json::Value::Array(list) => {
                    let default = list
                        .iter()
                        .find(|t| t["name"] == "default")
                        .or_else(|| list.first());
                    if let Some(s) = default.and_then(|t| t["template"].as_str()) {
                        return Ok(Some(s.to_string()));
                    }
                }
                _ => {}
            }
        }
        Ok(None)
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` (OpenAI-style objects with `role` and `content`).
    pub fn render(
        &self,
        messages: &[serde_json::Value],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.env.get_template("chat").expect("added in new");
        template
            .render(minijinja::context! {
                messages => Value::from_serialize(messages),
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(|e| anyhow!("chat template failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_chatml_with_generation_prompt() {
        let t = ChatTemplate::new(CHATML_TEMPLATE, "", "").unwrap();
        let text = t
            .render(&[json!({"role": "user", "content": "Hi"})], true)
            .unwrap();
        assert_eq!(
            text,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_string_methods_and_raise_exception_work() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0]['content'].strip().upper() }}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert_eq!(
            t.render(&[json!({"role": "user", "content": " hi "})], false)
                .unwrap(),
            "HI"
        );
        let err = t
            .render(&[json!({"role": "system", "content": "x"})], false)
            .unwrap_err();
        assert!(err.to_string().contains("first must be user"), "{err}");
    }
}
