//! A seeded, random-weight LLaVA written in the llava-hf directory format, for tests and
//! benchmarks: a CLIP tower, the projector, a GQA Llama, a byte-level tokenizer with `<image>`,
//! LLaVA-1.5's chat template and a CLIP processor config. Same seed and shape, same bytes.
//! [`Shape::TINY`] (16 image tokens, 6 layers) is what the tests use; [`Shape::BENCH`] has
//! SmolLM2-135M's language-model shape and a CLIP ViT-B/14 tower at 336 px (576 image tokens),
//! for measuring speed at a realistic size.

use crate::testing::SeededRng;
use anyhow::Result;
use candle_core::{Device, Tensor};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;

/// The sizes of a generated model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub image_size: usize,
    pub patch_size: usize,
    pub vision_hidden: usize,
    pub vision_layers: usize,
    pub vision_heads: usize,
    pub text_hidden: usize,
    pub text_layers: usize,
    pub text_heads: usize,
    pub text_kv_heads: usize,
    pub text_ffn: usize,
    pub context: usize,
}

impl Shape {
    pub const TINY: Shape = Shape {
        image_size: 56,
        patch_size: 14,
        vision_hidden: 32,
        vision_layers: 3,
        vision_heads: 4,
        text_hidden: 64,
        text_layers: 6,
        text_heads: 4,
        text_kv_heads: 2,
        text_ffn: 128,
        context: 1024,
    };

    pub const BENCH: Shape = Shape {
        image_size: 336,
        patch_size: 14,
        vision_hidden: 768,
        vision_layers: 12,
        vision_heads: 12,
        text_hidden: 576,
        text_layers: 30,
        text_heads: 9,
        text_kv_heads: 3,
        text_ffn: 1536,
        context: 4096,
    };
}

const VOCAB: usize = 272;
/// Token ids: specials first, then the 256 bytes, then `<image>`.
const UNK: u32 = 0;
const BOS: u32 = 1;
const EOS: u32 = 2;
const FIRST_BYTE: u32 = 3;
pub const IMAGE_TOKEN: u32 = FIRST_BYTE + 256;

/// LLaVA-1.5's template (llava-hf): images first in each message, then its text.
pub const LLAVA_CHAT_TEMPLATE: &str = "{% for message in messages %}{% if message['role'] != \
'system' %}{{ message['role'].upper() + ': '}}{% endif %}{% if message['content'] is string %}{{ \
message['content'] + ' ' }}{% else %}{% for content in message['content'] | selectattr('type', \
'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | \
selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}{% endif %}{% \
endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}";

/// Writes the model into `dir` (created if missing).
pub fn write(dir: &Path, seed: u64, shape: &Shape) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut rng = SeededRng::new(seed);
    let tensors = weights(&mut rng, shape)?;
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    let size = shape.image_size;
    let files = [
        ("config.json", config(shape)),
        ("tokenizer.json", tokenizer()),
        (
            "tokenizer_config.json",
            json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                   "model_max_length": shape.context,
                   "tokenizer_class": "PreTrainedTokenizerFast"}),
        ),
        (
            "chat_template.json",
            json!({"chat_template": LLAVA_CHAT_TEMPLATE}),
        ),
        (
            "preprocessor_config.json",
            json!({
                "image_processor_type": "CLIPImageProcessor",
                "do_resize": true, "size": {"shortest_edge": size}, "resample": 3,
                "do_center_crop": true, "crop_size": {"height": size, "width": size},
                "do_rescale": true, "rescale_factor": 1.0 / 255.0,
                "do_normalize": true,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "do_convert_rgb": true,
            }),
        ),
        (
            "generation_config.json",
            json!({"bos_token_id": BOS, "eos_token_id": EOS}),
        ),
    ];
    for (name, value) in files {
        std::fs::write(dir.join(name), serde_json::to_string_pretty(&value)? + "\n")?;
    }
    Ok(())
}

fn config(s: &Shape) -> serde_json::Value {
    json!({
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": IMAGE_TOKEN,
        "image_seq_length": (s.image_size / s.patch_size).pow(2),
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": false,
        "torch_dtype": "float32",
        "text_config": {
            "model_type": "llama",
            "vocab_size": VOCAB,
            "hidden_size": s.text_hidden,
            "intermediate_size": s.text_ffn,
            "num_hidden_layers": s.text_layers,
            "num_attention_heads": s.text_heads,
            "num_key_value_heads": s.text_kv_heads,
            "head_dim": s.text_hidden / s.text_heads,
            "max_position_embeddings": s.context,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "tie_word_embeddings": false,
            "bos_token_id": BOS,
            "eos_token_id": EOS,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": s.vision_hidden,
            "intermediate_size": 2 * s.vision_hidden,
            "num_hidden_layers": s.vision_layers,
            "num_attention_heads": s.vision_heads,
            "image_size": s.image_size,
            "patch_size": s.patch_size,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "projection_dim": s.vision_hidden,
        },
    })
}

fn weights(rng: &mut SeededRng, s: &Shape) -> Result<HashMap<String, Tensor>> {
    let dev = &Device::Cpu;
    let mut t = HashMap::new();
    let mut matrix = |t: &mut HashMap<String, Tensor>, name: String, out: usize, inp: usize| {
        let w = rng.tensor((out, inp), 1.0 / (inp as f32).sqrt(), dev)?;
        t.insert(name, w);
        anyhow::Ok(())
    };
    // Vision tower (names as in llava-hf checkpoints).
    let v = "vision_tower.vision_model.";
    let (vh, p) = (s.vision_hidden, s.patch_size);
    matrix(
        &mut t,
        format!("{v}embeddings.patch_embedding.weight"),
        vh,
        3 * p * p,
    )?;
    let patch = t[&format!("{v}embeddings.patch_embedding.weight")].reshape((vh, 3, p, p))?;
    t.insert(format!("{v}embeddings.patch_embedding.weight"), patch);
    let tokens = (s.image_size / s.patch_size).pow(2) + 1;
    matrix(
        &mut t,
        format!("{v}embeddings.position_embedding.weight"),
        tokens,
        vh,
    )?;
    let mut vectors: Vec<(String, usize, f32, f32)> = vec![
        (format!("{v}embeddings.class_embedding"), vh, 0.0, 1.0),
        (format!("{v}pre_layrnorm.weight"), vh, 1.0, 0.1),
        (format!("{v}pre_layrnorm.bias"), vh, 0.0, 0.1),
        (format!("{v}post_layernorm.weight"), vh, 1.0, 0.1),
        (format!("{v}post_layernorm.bias"), vh, 0.0, 0.1),
    ];
    for l in 0..s.vision_layers {
        let layer = format!("{v}encoder.layers.{l}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            matrix(&mut t, format!("{layer}.self_attn.{proj}.weight"), vh, vh)?;
            vectors.push((format!("{layer}.self_attn.{proj}.bias"), vh, 0.0, 0.1));
        }
        matrix(&mut t, format!("{layer}.mlp.fc1.weight"), 2 * vh, vh)?;
        matrix(&mut t, format!("{layer}.mlp.fc2.weight"), vh, 2 * vh)?;
        vectors.push((format!("{layer}.mlp.fc1.bias"), 2 * vh, 0.0, 0.1));
        vectors.push((format!("{layer}.mlp.fc2.bias"), vh, 0.0, 0.1));
        for norm in ["layer_norm1", "layer_norm2"] {
            vectors.push((format!("{layer}.{norm}.weight"), vh, 1.0, 0.1));
            vectors.push((format!("{layer}.{norm}.bias"), vh, 0.0, 0.1));
        }
    }
    // Projector.
    let th = s.text_hidden;
    matrix(
        &mut t,
        "multi_modal_projector.linear_1.weight".into(),
        th,
        vh,
    )?;
    matrix(
        &mut t,
        "multi_modal_projector.linear_2.weight".into(),
        th,
        th,
    )?;
    vectors.push(("multi_modal_projector.linear_1.bias".into(), th, 0.0, 0.1));
    vectors.push(("multi_modal_projector.linear_2.bias".into(), th, 0.0, 0.1));
    // Language model.
    let m = "language_model.model.";
    let (kv, ffn) = (th / s.text_heads * s.text_kv_heads, s.text_ffn);
    matrix(&mut t, format!("{m}embed_tokens.weight"), VOCAB, th)?;
    matrix(&mut t, "language_model.lm_head.weight".into(), VOCAB, th)?;
    vectors.push((format!("{m}norm.weight"), th, 1.0, 0.1));
    for l in 0..s.text_layers {
        let layer = format!("{m}layers.{l}");
        matrix(&mut t, format!("{layer}.self_attn.q_proj.weight"), th, th)?;
        matrix(&mut t, format!("{layer}.self_attn.k_proj.weight"), kv, th)?;
        matrix(&mut t, format!("{layer}.self_attn.v_proj.weight"), kv, th)?;
        matrix(&mut t, format!("{layer}.self_attn.o_proj.weight"), th, th)?;
        matrix(&mut t, format!("{layer}.mlp.gate_proj.weight"), ffn, th)?;
        matrix(&mut t, format!("{layer}.mlp.up_proj.weight"), ffn, th)?;
        matrix(&mut t, format!("{layer}.mlp.down_proj.weight"), th, ffn)?;
        vectors.push((format!("{layer}.input_layernorm.weight"), th, 1.0, 0.1));
        vectors.push((
            format!("{layer}.post_attention_layernorm.weight"),
            th,
            1.0,
            0.1,
        ));
    }
    for (name, len, around, spread) in vectors {
        t.insert(name, rng.vector(len, around, spread, dev)?);
    }
    Ok(t)
}

/// A byte-level BPE without merges: every byte is a token (GPT-2's byte-to-character map), plus
/// the specials and `<image>`.
fn tokenizer() -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    for (id, name) in [(UNK, "<unk>"), (BOS, "<s>"), (EOS, "</s>")] {
        vocab.insert(name.into(), json!(id));
    }
    for (byte, ch) in byte_chars().into_iter().enumerate() {
        vocab.insert(ch.to_string(), json!(FIRST_BYTE + byte as u32));
    }
    vocab.insert("<image>".into(), json!(IMAGE_TOKEN));
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [
            special(UNK, "<unk>"), special(BOS, "<s>"), special(EOS, "</s>"),
            special(IMAGE_TOKEN, "<image>"),
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                          "use_regex": true},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [BOS], "tokens": ["<s>"]}},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                    "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []},
    })
}

/// GPT-2's printable character for each byte.
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut next = 256;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("latin-1")
            } else {
                next += 1;
                char::from_u32(next - 1).expect("valid char")
            }
        })
        .collect()
}
