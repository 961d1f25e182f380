//! LLaVA-1.5 (HF `LlavaForConditionalGeneration`, the llava-hf directory format): a CLIP vision
//! tower, a two-layer GELU projector, and a Llama-family language model.

use super::clip::{Activation, ClipConfig, ClipLayer, ClipVisionTower, LayerNorm, Projector};
use super::preprocess::ClipPreprocess;
use super::{ImageEncoder, Vision};
use crate::arch::DecoderConfig;
use crate::decoder::Decoder;
use crate::linear::Linear;
use crate::safetensors;
use crate::tokenizer::TextTokenizer;
use anyhow::{bail, Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{Device, Module, Tensor};
use serde::Deserialize;
use std::path::Path;

/// The fields of a LLaVA `config.json` beside `text_config`.
#[derive(Debug, Clone, Deserialize)]
struct LlavaConfig {
    vision_config: ClipConfig,
    #[serde(alias = "image_token_id")]
    image_token_index: Option<u32>,
    #[serde(default = "default_projector_act")]
    projector_hidden_act: String,
    #[serde(default = "default_feature_layer")]
    vision_feature_layer: i64,
    #[serde(default = "default_strategy")]
    vision_feature_select_strategy: String,
    /// Original LLaVA's `pad`: images are padded to a square before the processor.
    #[serde(default)]
    image_aspect_ratio: Option<String>,
}

fn default_projector_act() -> String {
    "gelu".into()
}
fn default_feature_layer() -> i64 {
    -2
}
fn default_strategy() -> String {
    "default".into()
}

/// Whether a `config.json` describes a LLaVA model.
pub fn is_llava_config(json: &serde_json::Value) -> bool {
    json["model_type"] == "llava"
        || json["architectures"]
            .as_array()
            .is_some_and(|a| a.iter().any(|n| n == "LlavaForConditionalGeneration"))
}

/// The language model and the vision side of a LLaVA directory.
pub fn load(dir: &Path, tokenizer: &TextTokenizer, device: &Device) -> Result<(Decoder, Vision)> {
    let (json, cfg) = read_config(dir)?;
    let text_cfg =
        DecoderConfig::from_hf_json(&with_llama_defaults(&json["text_config"]).to_string())
            .with_context(|| format!("text_config in {}/config.json", dir.display()))?;
    let st = safetensors::open(dir)?;
    let decoder = safetensors::decoder_from(text_cfg, &st, "language_model.", device)
        .context("the language model (expected tensors named `language_model.model.*`)")?;
    let encoder = encoder_from(dir, &cfg, &st, device)?;
    let image_token = match cfg.image_token_index {
        Some(id) => id,
        None => tokenizer
            .token_id("<image>")
            .context("config.json has no image_token_index and the tokenizer no `<image>`")?,
    };
    Ok((
        decoder,
        Vision {
            encoder: Box::new(encoder),
            image_token,
        },
    ))
}

/// A `text_config` with transformers' `LlamaConfig` defaults filled in: llava-hf checkpoints
/// list only what differs from them (llava-1.5-7b-hf gives just the vocabulary, context and
/// norm epsilon).
pub fn with_llama_defaults(text_config: &serde_json::Value) -> serde_json::Value {
    let mut config = serde_json::json!({
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
    });
    let is_llama = matches!(text_config["model_type"].as_str(), None | Some("llama"));
    match (config.as_object_mut(), text_config.as_object()) {
        (Some(defaults), Some(given)) if is_llama => {
            defaults.extend(given.clone());
            config
        }
        _ => text_config.clone(),
    }
}

/// The image path of a LLaVA directory alone (processor, tower, projector).
pub fn load_encoder(dir: &Path, device: &Device) -> Result<LlavaEncoder> {
    let (_, cfg) = read_config(dir)?;
    encoder_from(dir, &cfg, &safetensors::open(dir)?, device)
}

fn read_config(dir: &Path) -> Result<(serde_json::Value, LlavaConfig)> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text)?;
    let cfg: LlavaConfig = serde_json::from_value(json.clone())
        .with_context(|| format!("invalid LLaVA config in {}", config_path.display()))?;
    Ok((json, cfg))
}

fn encoder_from(
    dir: &Path,
    cfg: &LlavaConfig,
    st: &MmapedSafetensors,
    device: &Device,
) -> Result<LlavaEncoder> {
    let vision_prefix = ["vision_tower.vision_model.", "vision_tower."]
        .into_iter()
        .find(|p| st.get(&format!("{p}embeddings.class_embedding")).is_ok())
        .context("no CLIP vision tower (`vision_tower.vision_model.*`) in the weights")?;
    let tower = load_tower(st, vision_prefix, &cfg.vision_config, device)?;
    let layers = cfg.vision_config.num_hidden_layers as i64;
    let depth = match cfg.vision_feature_layer {
        l if l < 0 => layers + 1 + l,
        l => l,
    };
    if !(0..=layers).contains(&depth) {
        bail!(
            "vision_feature_layer {} is outside the tower's {layers} layers",
            cfg.vision_feature_layer
        );
    }
    let drop_class = match cfg.vision_feature_select_strategy.as_str() {
        "default" => true,
        "full" => false,
        other => bail!("unsupported vision_feature_select_strategy `{other}` (default, full)"),
    };
    let linear = |name: &str| -> Result<Linear> {
        Ok(Linear::dense(
            safetensors::tensor(st, &format!("multi_modal_projector.{name}.weight"), device)?,
            safetensors::tensor(st, &format!("multi_modal_projector.{name}.bias"), device).ok(),
        ))
    };
    let projector = Projector {
        linear_1: linear("linear_1")?,
        activation: Activation::parse(&cfg.projector_hidden_act)?,
        linear_2: linear("linear_2")?,
    };
    let mut preprocess = match std::fs::read_to_string(dir.join("preprocessor_config.json")) {
        Ok(text) => ClipPreprocess::from_hf_json(&text).context("preprocessor_config.json")?,
        Err(_) => ClipPreprocess::clip_336(),
    };
    preprocess.pad_to_square = cfg.image_aspect_ratio.as_deref() == Some("pad");
    let side = cfg.vision_config.image_size;
    if !preprocess.do_center_crop {
        bail!("preprocessor_config.json must center-crop (do_center_crop) to the tower's size");
    }
    if preprocess.crop_height as usize != side || preprocess.crop_width as usize != side {
        bail!(
            "the processor crops to {}x{} but the vision tower takes {side}x{side}",
            preprocess.crop_height,
            preprocess.crop_width
        );
    }
    Ok(LlavaEncoder {
        tower,
        projector,
        depth: depth as usize,
        drop_class,
        preprocess,
    })
}

fn load_tower(
    st: &MmapedSafetensors,
    prefix: &str,
    cfg: &ClipConfig,
    device: &Device,
) -> Result<ClipVisionTower> {
    let t = |name: &str| safetensors::tensor(st, &format!("{prefix}{name}"), device);
    let linear = |name: &str| -> Result<Linear> {
        Ok(Linear::dense(
            t(&format!("{name}.weight"))?,
            Some(t(&format!("{name}.bias"))?),
        ))
    };
    let norm = |name: &str| -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: t(&format!("{name}.weight"))?,
            bias: t(&format!("{name}.bias"))?,
            eps: cfg.layer_norm_eps,
        })
    };
    let layers = (0..cfg.num_hidden_layers)
        .map(|l| {
            let p = format!("encoder.layers.{l}");
            Ok(ClipLayer {
                norm1: norm(&format!("{p}.layer_norm1"))?,
                q: linear(&format!("{p}.self_attn.q_proj"))?,
                k: linear(&format!("{p}.self_attn.k_proj"))?,
                v: linear(&format!("{p}.self_attn.v_proj"))?,
                out: linear(&format!("{p}.self_attn.out_proj"))?,
                norm2: norm(&format!("{p}.layer_norm2"))?,
                fc1: linear(&format!("{p}.mlp.fc1"))?,
                fc2: linear(&format!("{p}.mlp.fc2"))?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let patch = t("embeddings.patch_embedding.weight")?;
    let hidden = cfg.hidden_size;
    Ok(ClipVisionTower {
        cfg: cfg.clone(),
        patch_embedding: patch.reshape((hidden, ()))?,
        class_embedding: t("embeddings.class_embedding")?,
        position_embedding: t("embeddings.position_embedding.weight")?,
        pre_norm: norm("pre_layrnorm")?,
        layers,
        activation: Activation::parse(&cfg.hidden_act)?,
    })
}

/// LLaVA-1.5's image path: CLIP processor, the tower up to `vision_feature_layer`, the class
/// token dropped (strategy `default`), the projector.
pub struct LlavaEncoder {
    pub tower: ClipVisionTower,
    pub projector: Projector,
    /// Tower layers to run (`vision_feature_layer` -2 on 24 layers: 23).
    pub depth: usize,
    pub drop_class: bool,
    pub preprocess: ClipPreprocess,
}

impl LlavaEncoder {
    /// The tower's selected features before the projector: (images, tokens, vision_hidden).
    pub fn vision_features(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let hidden = self.tower.hidden_state(pixels, self.depth)?;
        if self.drop_class {
            let tokens = hidden.dim(1)?;
            hidden.narrow(1, 1, tokens - 1)
        } else {
            Ok(hidden)
        }
    }
}

impl ImageEncoder for LlavaEncoder {
    fn pixel_values(&self, image: &image::RgbImage) -> candle_core::Result<Tensor> {
        let p = &self.preprocess;
        Tensor::from_vec(
            p.pixel_values(image),
            (3, p.crop_height as usize, p.crop_width as usize),
            &Device::Cpu,
        )
    }

    fn encode(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        self.projector.forward(&self.vision_features(pixels)?)
    }

    fn tokens_per_image(&self) -> usize {
        self.tower.cfg.num_patches() + usize::from(!self.drop_class)
    }

    fn token_grid(&self) -> (usize, usize) {
        let side = self.tower.cfg.patches_per_side();
        (side, side)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llava_1_5_text_config_takes_llama_defaults() {
        // llava-hf/llava-1.5-7b-hf's whole text_config.
        let given = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096,
            "model_type": "llama", "pad_token_id": 32001, "rms_norm_eps": 1e-05,
            "torch_dtype": "float16", "vocab_size": 32064,
        });
        let cfg = DecoderConfig::from_hf_json(&with_llama_defaults(&given).to_string()).unwrap();
        assert_eq!(
            (
                cfg.hidden_size,
                cfg.num_layers,
                cfg.num_heads,
                cfg.num_kv_heads
            ),
            (4096, 32, 32, 32)
        );
        assert_eq!((cfg.vocab_size, cfg.max_position_embeddings), (32064, 4096));
        assert_eq!((cfg.intermediate_size, cfg.rms_norm_eps), (11008, 1e-5));
    }
}
