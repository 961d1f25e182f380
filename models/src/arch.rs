//! The decoder's hyperparameters, read from GGUF metadata or an HF `config.json`.

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use serde::{Deserialize, Serialize};

/// Llama-family architectures that share our decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama 2/3, SmolLM2 and other `LlamaForCausalLM` checkpoints.
    Llama,
    Mistral,
    /// Like Llama, with biases on the q/k/v projections.
    Qwen2,
}

/// How RoPE pairs the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Pairs (2i, 2i+1): GGUF llama weights, whose q/k rows the converter permuted.
    Interleaved,
    /// Pairs (i, i + D/2): HF checkpoints (`rotate_half`) and GGUF qwen2 (NEOX).
    Halves,
}

/// Llama 3.1's frequency-dependent RoPE scaling (`rope_type = "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub rope_layout: RopeLayout,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    /// Mistral's sliding attention window, if the checkpoint uses one.
    pub sliding_window: Option<usize>,
}

impl DecoderConfig {
    pub fn kv_groups(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    fn validate(self) -> Result<Self> {
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.num_layers == 0 {
            bail!("model has zero heads or layers");
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            bail!(
                "{} attention heads are not a multiple of {} KV heads",
                self.num_heads,
                self.num_kv_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!("head_dim {} must be even for RoPE", self.head_dim);
        }
        Ok(self)
    }

    /// Reads the hyperparameters of a GGUF file (`general.architecture` = llama or qwen2).
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let md = |key: &str| content.metadata.get(key);
        let arch_name = md("general.architecture")
            .context("GGUF has no general.architecture")?
            .to_string()?
            .clone();
        let architecture = match arch_name.as_str() {
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            other => bail!("unsupported GGUF architecture `{other}` (supported: llama, qwen2)"),
        };
        let get_u32 = |key: &str| -> Result<usize> {
            let full = format!("{arch_name}.{key}");
            Ok(md(&full)
                .with_context(|| format!("GGUF has no {full}"))?
                .to_u32()? as usize)
        };
        let opt_f32 = |key: &str| md(&format!("{arch_name}.{key}")).and_then(|v| v.to_f32().ok());
        let hidden_size = get_u32("embedding_length")?;
        let num_heads = get_u32("attention.head_count")?;
        let num_kv_heads = get_u32("attention.head_count_kv").unwrap_or(num_heads);
        let head_dim = get_u32("attention.key_length")
            .or_else(|_| get_u32("rope.dimension_count"))
            .unwrap_or(hidden_size / num_heads);
        let embd = content
            .tensor_infos
            .get("token_embd.weight")
            .context("GGUF has no token_embd.weight")?;
        let vocab_size = embd.shape.dims()[0];
        let rope_scaling = match md(&format!("{arch_name}.rope.scaling.type")) {
            Some(kind) if kind.to_string()? == "llama3" => Some(Llama3RopeScaling {
                factor: opt_f32("rope.scaling.factor").unwrap_or(8.0),
                low_freq_factor: opt_f32("rope.scaling.low_freq_factor").unwrap_or(1.0),
                high_freq_factor: opt_f32("rope.scaling.high_freq_factor").unwrap_or(4.0),
                original_max_position_embeddings: get_u32("rope.scaling.original_context_length")
                    .unwrap_or(8192),
            }),
            _ => None,
        };
        Self {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: get_u32("feed_forward_length")?,
            num_layers: get_u32("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: opt_f32("attention.layer_norm_rms_epsilon").unwrap_or(1e-5) as f64,
            rope_theta: opt_f32("rope.freq_base").unwrap_or(10_000.0),
            rope_scaling,
            rope_layout: match architecture {
                Architecture::Qwen2 => RopeLayout::Halves,
                _ => RopeLayout::Interleaved,
            },
            max_position_embeddings: get_u32("context_length").unwrap_or(4096),
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
            attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            sliding_window: None,
        }
        .validate()
    }

    /// Reads an HF `config.json` (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM).
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let raw: HfConfig = serde_json::from_str(text).context("invalid config.json")?;
        let architecture = match raw.model_type.as_str() {
            "llama" => Architecture::Llama,
            "mistral" => Architecture::Mistral,
            "qwen2" => Architecture::Qwen2,
            other => bail!(
                "unsupported model_type `{other}` in config.json (supported: llama, mistral, qwen2)"
            ),
        };
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        // transformers >= 5 writes `rope_parameters` (theta included) instead of
        // `rope_theta` + `rope_scaling`.
        let rope_theta = raw
            .rope_theta
            .or_else(|| raw.rope_parameters.as_ref().and_then(|p| p.rope_theta))
            .unwrap_or(10_000.0);
        let rope_scaling = match raw.rope_scaling.or(raw.rope_parameters) {
            None => None,
            Some(s) => match s.rope_type.as_deref().or(s.kind.as_deref()) {
                Some("llama3") => Some(Llama3RopeScaling {
                    factor: s.factor.context("llama3 rope_scaling needs `factor`")?,
                    low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                    high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                    original_max_position_embeddings: s
                        .original_max_position_embeddings
                        .unwrap_or(8192),
                }),
                Some("default") | None => None,
                Some(other) => bail!("unsupported rope_scaling type `{other}`"),
            },
        };
        Self {
            architecture,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim: raw
                .head_dim
                .unwrap_or(raw.hidden_size / raw.num_attention_heads),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            rope_layout: RopeLayout::Halves,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: raw
                .attention_bias
                .unwrap_or(architecture == Architecture::Qwen2),
            sliding_window: match architecture {
                // Qwen2 configs carry a window but only use it with use_sliding_window.
                Architecture::Mistral => raw.sliding_window,
                _ => None,
            },
        }
        .validate()
    }
}

#[derive(Deserialize)]
struct HfConfig {
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f32>,
    rope_scaling: Option<HfRopeScaling>,
    rope_parameters: Option<HfRopeScaling>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    sliding_window: Option<usize>,
}

#[derive(Deserialize)]
struct HfRopeScaling {
    rope_theta: Option<f32>,
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_llama3_config_with_rope_scaling() {
        let cfg = DecoderConfig::from_hf_json(
            r#"{"model_type":"llama","vocab_size":128256,"hidden_size":2048,
            "intermediate_size":8192,"num_hidden_layers":16,"num_attention_heads":32,
            "num_key_value_heads":8,"rms_norm_eps":1e-5,"rope_theta":500000.0,
            "rope_scaling":{"factor":32.0,"high_freq_factor":4.0,"low_freq_factor":1.0,
            "original_max_position_embeddings":8192,"rope_type":"llama3"},
            "tie_word_embeddings":true,"max_position_embeddings":131072}"#,
        )
        .unwrap();
        assert_eq!(cfg.head_dim, 64);
        assert_eq!(cfg.kv_groups(), 4);
        assert_eq!(cfg.rope_scaling.unwrap().factor, 32.0);
        assert!(!cfg.attention_bias);
    }

    #[test]
    fn qwen2_defaults_to_qkv_bias_and_rejects_bad_gqa() {
        let base = r#"{"model_type":"qwen2","vocab_size":10,"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":4,"num_key_value_heads":KV}"#;
        let cfg = DecoderConfig::from_hf_json(&base.replace("KV", "2")).unwrap();
        assert!(cfg.attention_bias);
        assert!(DecoderConfig::from_hf_json(&base.replace("KV", "3")).is_err());
    }
}
