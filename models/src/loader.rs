//! A ready-to-run model: decoder, tokenizer and chat template from one source.

use crate::chat_template::{ChatTemplate, CHATML_TEMPLATE};
use crate::decoder::Decoder;
use crate::gguf::GgufFile;
use crate::safetensors;
use crate::source::ModelSource;
use crate::tokenizer::TextTokenizer;
use crate::vision::{llava, Vision};
use anyhow::{Context, Result};
use candle_core::Device;

pub struct Model {
    pub decoder: Decoder,
    pub tokenizer: TextTokenizer,
    pub chat_template: ChatTemplate,
    pub source: ModelSource,
    /// The vision side of a vision-language model.
    pub vision: Option<Vision>,
}

impl Model {
    pub fn load(source: &ModelSource, device: &Device) -> Result<Self> {
        let mut vision = None;
        let (decoder, tokenizer, template) = match source {
            ModelSource::Gguf(path) => {
                let mut gguf = GgufFile::open(path)?;
                let decoder = gguf.load_decoder(device)?;
                let tokenizer = TextTokenizer::from_gguf(&gguf)?;
                let template = gguf
                    .metadata_str("tokenizer.chat_template")
                    .map(str::to_string);
                (decoder, tokenizer, template)
            }
            ModelSource::HfDir(dir) => {
                let tokenizer = TextTokenizer::from_hf_dir(dir)?;
                let config: serde_json::Value = serde_json::from_str(
                    &std::fs::read_to_string(dir.join("config.json"))
                        .with_context(|| format!("cannot read {}/config.json", dir.display()))?,
                )
                .with_context(|| format!("invalid {}/config.json", dir.display()))?;
                let decoder = if llava::is_llava_config(&config) {
                    let (decoder, v) = llava::load(dir, &tokenizer, device)?;
                    vision = Some(v);
                    decoder
                } else {
                    safetensors::load_decoder(dir, device)?
                };
                let template = ChatTemplate::source_from_hf_dir(dir)?;
                (decoder, tokenizer, template)
            }
        };
        let token = |id: Option<u32>| id.and_then(|i| tokenizer.token_text(i)).unwrap_or_default();
        let chat_template = ChatTemplate::new(
            template.as_deref().unwrap_or(CHATML_TEMPLATE),
            &token(tokenizer.bos()),
            &token(tokenizer.eos()),
        )
        .with_context(|| format!("chat template of {}", source.path().display()))?;
        if template.is_none() {
            tracing::warn!(
                "{} has no chat template; using ChatML",
                source.path().display()
            );
        }
        Ok(Self {
            decoder,
            tokenizer,
            chat_template,
            source: source.clone(),
            vision,
        })
    }

    /// Token ids of a chat conversation, ready for generation. On a VLM, each image stands
    /// as one image token (see [`Vision::expand_image_tokens`]).
    pub fn chat_prompt(&self, messages: &[serde_json::Value]) -> Result<Vec<u32>> {
        let text = self.chat_template.render(messages, true)?;
        // The template writes BOS and other specials itself, as in HF's apply_chat_template.
        self.tokenizer.encode(&text, false)
    }

    /// Token ids of a plain completion prompt (with BOS if the model adds one).
    pub fn completion_prompt(&self, prompt: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(prompt, true)
    }
}

/// The compute device: CUDA device 0 when built with `cuda` and a GPU is present, else CPU.
pub fn default_device() -> Result<Device> {
    #[cfg(feature = "cuda")]
    if candle_core::utils::cuda_is_available() {
        return Ok(Device::new_cuda(0)?);
    }
    Ok(Device::Cpu)
}
