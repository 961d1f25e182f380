//! `attune models convert`: a GGUF file to a dequantized Hugging Face directory (config.json,
//! model.safetensors, tokenizer files, chat template), loadable by HF transformers and by our
//! safetensors path.

use crate::arch::{Architecture, DecoderConfig, RopeLayout};
use crate::gguf::GgufFile;
use crate::tokenizer::TextTokenizer;
use crate::weights::WeightName;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;

pub fn gguf_to_hf_dir(gguf_path: &Path, out_dir: &Path) -> Result<()> {
    let mut gguf = GgufFile::open(gguf_path)?;
    let cfg = DecoderConfig::from_gguf(&gguf.content)?;
    if gguf.has_tensor("rope_freqs.weight") && cfg.rope_scaling.is_none() {
        bail!("this GGUF scales RoPE with rope_freqs.weight, which config.json cannot express");
    }
    let tokenizer = TextTokenizer::from_gguf(&gguf)?;
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;

    let device = Device::Cpu;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for name in WeightName::all(&cfg) {
        let weight = dequantized(&mut gguf, &name.gguf(), &device)?;
        let weight = match (name, cfg.rope_layout) {
            (WeightName::Q(_), RopeLayout::Interleaved) => unpermute_rows(&weight, cfg.num_heads)?,
            (WeightName::K(_), RopeLayout::Interleaved) => {
                unpermute_rows(&weight, cfg.num_kv_heads)?
            }
            _ => weight,
        };
        if name.has_bias(&cfg) {
            let bias = dequantized(&mut gguf, &name.gguf().replace(".weight", ".bias"), &device)?;
            tensors.insert(name.hf().replace(".weight", ".bias"), bias);
        }
        tensors.insert(name.hf(), weight);
    }
    candle_core::safetensors::save(&tensors, out_dir.join("model.safetensors"))?;

    let token = |id: Option<u32>| id.and_then(|i| tokenizer.token_text(i));
    write_json(&out_dir.join("config.json"), &hf_config(&cfg, &tokenizer))?;
    std::fs::write(out_dir.join("tokenizer.json"), tokenizer.to_json()?)?;
    let chat_template = gguf.metadata_str("tokenizer.chat_template");
    write_json(
        &out_dir.join("tokenizer_config.json"),
        &json!({
            // The generic fast tokenizer keeps tokenizer.json exactly as written.
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": token(tokenizer.bos()),
            "eos_token": token(tokenizer.eos()),
            "model_max_length": cfg.max_position_embeddings,
            "chat_template": chat_template,
        }),
    )?;
    if let Some(template) = chat_template {
        std::fs::write(out_dir.join("chat_template.jinja"), template)?;
    }
    write_json(
        &out_dir.join("generation_config.json"),
        &json!({
            "bos_token_id": tokenizer.bos(),
            "eos_token_id": tokenizer.stop_ids().iter().collect::<Vec<_>>(),
        }),
    )?;
    Ok(())
}

fn dequantized(gguf: &mut GgufFile, name: &str, device: &Device) -> Result<Tensor> {
    Ok(gguf
        .tensor(name, device)?
        .dequantize(device)?
        .to_dtype(DType::F32)?)
}

/// Undoes llama.cpp's q/k row permutation: GGUF stores each head's rows as interleaved pairs
/// (for `rope_i`); HF checkpoints store the two halves (for `rotate_half`).
pub fn unpermute_rows(weight: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = weight.dims2()?;
    let head_dim = rows / heads;
    Ok(weight
        .reshape((heads, head_dim / 2, 2, cols))?
        .transpose(1, 2)?
        .reshape((rows, cols))?)
}

fn hf_config(cfg: &DecoderConfig, tokenizer: &TextTokenizer) -> serde_json::Value {
    let (model_type, class) = match cfg.architecture {
        Architecture::Llama => ("llama", "LlamaForCausalLM"),
        Architecture::Mistral => ("mistral", "MistralForCausalLM"),
        Architecture::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
    };
    let rope_scaling = cfg.rope_scaling.map(|s| {
        json!({
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        })
    });
    json!({
        "architectures": [class],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "mlp_bias": false,
        "torch_dtype": "float32",
        "bos_token_id": tokenizer.bos(),
        "eos_token_id": tokenizer.eos(),
    })
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: reshape(heads, 2, D/2, cols).swapaxes(1, 2).
        let (heads, d, cols) = (2, 6, 3);
        let hf = Tensor::arange(0f32, (heads * d * cols) as f32, &Device::Cpu)
            .unwrap()
            .reshape((heads * d, cols))
            .unwrap();
        let gguf = hf
            .reshape((heads, 2, d / 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((heads * d, cols))
            .unwrap();
        let back = unpermute_rows(&gguf, heads).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), hf.to_vec2::<f32>().unwrap());
    }
}
