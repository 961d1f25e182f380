//! Tiny, seeded, random-weight models for tests (same seed, same weights).

use crate::arch::{Architecture, DecoderConfig, RopeLayout};
use crate::decoder::{Decoder, LayerWeights};
use crate::embedding::Embedding;
use crate::linear::Linear;
use crate::rope::Rope;
use candle_core::{Device, Result, Tensor};

/// A 2-layer GQA decoder config: 4 query heads sharing 2 KV heads, head_dim 8.
pub fn tiny_config() -> DecoderConfig {
    DecoderConfig {
        architecture: Architecture::Llama,
        vocab_size: 64,
        hidden_size: 32,
        intermediate_size: 48,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        rope_layout: RopeLayout::Halves,
        max_position_embeddings: 512,
        tie_word_embeddings: true,
        attention_bias: false,
        sliding_window: None,
    }
}

/// SplitMix64: a tiny deterministic generator, so test weights never depend on a crate's RNG.
pub struct SeededRng(u64);

impl SeededRng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    pub fn tensor(&mut self, shape: (usize, usize), scale: f32, device: &Device) -> Result<Tensor> {
        let data: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| self.next_f32() * scale)
            .collect();
        Tensor::from_vec(data, shape, device)
    }

    pub fn vector(
        &mut self,
        len: usize,
        around: f32,
        spread: f32,
        device: &Device,
    ) -> Result<Tensor> {
        let data: Vec<f32> = (0..len)
            .map(|_| around + self.next_f32() * spread)
            .collect();
        Tensor::from_vec(data, len, device)
    }
}

/// A random-weight decoder for `cfg`, dense f32.
pub fn random_decoder(cfg: &DecoderConfig, seed: u64, device: &Device) -> Result<Decoder> {
    let mut rng = SeededRng::new(seed);
    let d = cfg.hidden_size;
    let q_dim = cfg.num_heads * cfg.head_dim;
    let kv_dim = cfg.num_kv_heads * cfg.head_dim;
    let scale = 1.0 / (d as f32).sqrt();
    let linear = |rng: &mut SeededRng, out: usize, inp: usize, bias: bool| -> Result<Linear> {
        let b = bias
            .then(|| rng.vector(out, 0.0, 0.1, device))
            .transpose()?;
        Ok(Linear::dense(
            rng.tensor((out, inp), 2.0 * scale, device)?,
            b,
        ))
    };
    let mut layers = Vec::new();
    for _ in 0..cfg.num_layers {
        layers.push(LayerWeights {
            attn_norm: rng.vector(d, 1.0, 0.2, device)?,
            q: linear(&mut rng, q_dim, d, cfg.attention_bias)?,
            k: linear(&mut rng, kv_dim, d, cfg.attention_bias)?,
            v: linear(&mut rng, kv_dim, d, cfg.attention_bias)?,
            o: linear(&mut rng, d, q_dim, false)?,
            ffn_norm: rng.vector(d, 1.0, 0.2, device)?,
            gate: linear(&mut rng, cfg.intermediate_size, d, false)?,
            up: linear(&mut rng, cfg.intermediate_size, d, false)?,
            down: linear(&mut rng, d, cfg.intermediate_size, false)?,
            qkv: None,
            gate_up: None,
        });
    }
    let embed = rng.tensor((cfg.vocab_size, d), 1.0, device)?;
    let final_norm = rng.vector(d, 1.0, 0.2, device)?;
    let lm_head = if cfg.tie_word_embeddings {
        Linear::dense(embed.clone(), None)
    } else {
        linear(&mut rng, cfg.vocab_size, d, false)?
    };
    Ok(Decoder::new(
        cfg.clone(),
        Rope::new(cfg, None),
        Embedding::Dense(embed),
        layers,
        final_norm,
        lm_head,
    ))
}

/// The default model's GGUF for tests, fetched into the cache on first use
/// (`ATTUNE_CACHE_DIR` or the XDG default).
pub fn default_model_path() -> std::path::PathBuf {
    static PATH: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let cache = std::env::var_os("ATTUNE_CACHE_DIR")
            .filter(|v| !v.is_empty())
            .map(std::path::PathBuf::from)
            .unwrap_or_else(attune_config::default_cache_dir);
        crate::fetch::fetch_default_model(&cache).unwrap_or_else(|e| {
            panic!("this test needs the default model, and fetching it failed: {e:#}")
        })
    })
    .clone()
}

/// The default model converted to a dequantized f32 HF directory by our converter, cached
/// beside the GGUF (written to a temporary name, then renamed, so it is never half there).
pub fn converted_default_model() -> std::path::PathBuf {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let gguf = default_model_path();
        let parent = gguf.parent().expect("the cache has a directory");
        let dir = parent.join("SmolLM2-135M-Instruct-f32-test");
        if !dir.join("model.safetensors").exists() {
            let staging = tempfile::tempdir_in(parent).expect("a temporary directory in the cache");
            crate::convert::gguf_to_hf_dir(&gguf, staging.path()).expect("conversion works");
            let staged = staging.keep();
            if std::fs::rename(&staged, &dir).is_err() {
                // Another test process won the race; its copy is complete.
                let _ = std::fs::remove_dir_all(&staged);
            }
        }
        dir
    })
    .clone()
}
