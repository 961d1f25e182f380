//! Building a [`Decoder`] from a weight file, whatever its naming scheme.

use crate::arch::DecoderConfig;
use crate::decoder::{Decoder, LayerWeights};
use crate::embedding::Embedding;
use crate::linear::Linear;
use crate::rope::Rope;
use anyhow::Result;
use candle_core::Tensor;

/// The tensors a Llama-family decoder is made of, independent of file naming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightName {
    Embedding,
    FinalNorm,
    LmHead,
    AttnNorm(usize),
    Q(usize),
    K(usize),
    V(usize),
    O(usize),
    FfnNorm(usize),
    Gate(usize),
    Up(usize),
    Down(usize),
}

impl WeightName {
    /// The tensor's name in GGUF files (llama.cpp's naming).
    pub fn gguf(&self) -> String {
        match *self {
            Self::Embedding => "token_embd.weight".into(),
            Self::FinalNorm => "output_norm.weight".into(),
            Self::LmHead => "output.weight".into(),
            Self::AttnNorm(l) => format!("blk.{l}.attn_norm.weight"),
            Self::Q(l) => format!("blk.{l}.attn_q.weight"),
            Self::K(l) => format!("blk.{l}.attn_k.weight"),
            Self::V(l) => format!("blk.{l}.attn_v.weight"),
            Self::O(l) => format!("blk.{l}.attn_output.weight"),
            Self::FfnNorm(l) => format!("blk.{l}.ffn_norm.weight"),
            Self::Gate(l) => format!("blk.{l}.ffn_gate.weight"),
            Self::Up(l) => format!("blk.{l}.ffn_up.weight"),
            Self::Down(l) => format!("blk.{l}.ffn_down.weight"),
        }
    }

    /// The tensor's name in Hugging Face checkpoints.
    pub fn hf(&self) -> String {
        match *self {
            Self::Embedding => "model.embed_tokens.weight".into(),
            Self::FinalNorm => "model.norm.weight".into(),
            Self::LmHead => "lm_head.weight".into(),
            Self::AttnNorm(l) => format!("model.layers.{l}.input_layernorm.weight"),
            Self::Q(l) => format!("model.layers.{l}.self_attn.q_proj.weight"),
            Self::K(l) => format!("model.layers.{l}.self_attn.k_proj.weight"),
            Self::V(l) => format!("model.layers.{l}.self_attn.v_proj.weight"),
            Self::O(l) => format!("model.layers.{l}.self_attn.o_proj.weight"),
            Self::FfnNorm(l) => format!("model.layers.{l}.post_attention_layernorm.weight"),
            Self::Gate(l) => format!("model.layers.{l}.mlp.gate_proj.weight"),
            Self::Up(l) => format!("model.layers.{l}.mlp.up_proj.weight"),
            Self::Down(l) => format!("model.layers.{l}.mlp.down_proj.weight"),
        }
    }

    /// Every tensor of a decoder with `cfg`, in file order.
    pub fn all(cfg: &DecoderConfig) -> Vec<Self> {
        let mut names = vec![Self::Embedding];
        for l in 0..cfg.num_layers {
            names.extend([
                Self::AttnNorm(l),
                Self::Q(l),
                Self::K(l),
                Self::V(l),
                Self::O(l),
                Self::FfnNorm(l),
                Self::Gate(l),
                Self::Up(l),
                Self::Down(l),
            ]);
        }
        names.push(Self::FinalNorm);
        if !cfg.tie_word_embeddings {
            names.push(Self::LmHead);
        }
        names
    }

    /// q/k/v carry a bias in Qwen2-style models.
    pub fn has_bias(&self, cfg: &DecoderConfig) -> bool {
        cfg.attention_bias && matches!(self, Self::Q(_) | Self::K(_) | Self::V(_))
    }
}

/// A weight file, seen through [`WeightName`]s.
pub(crate) trait WeightSource {
    /// A norm weight or bias, dense, in the compute dtype.
    fn vector(&mut self, name: &str) -> Result<Tensor>;
    /// The embedding table (vocab, hidden).
    fn embedding(&mut self) -> Result<Embedding>;
    /// A projection; `bias` names its bias tensor when the model has one.
    fn linear(&mut self, name: WeightName, bias: Option<String>) -> Result<Linear>;
    /// The output projection tied to the embedding table.
    fn tied_lm_head(&mut self) -> Result<Linear>;
    /// File name of a tensor.
    fn name(&self, name: WeightName) -> String;
    /// Name of the bias that goes with a q/k/v weight.
    fn bias_name(&self, name: WeightName) -> String {
        self.name(name).replace(".weight", ".bias")
    }
}

pub(crate) fn build_decoder(
    cfg: DecoderConfig,
    rope: Rope,
    src: &mut dyn WeightSource,
) -> Result<Decoder> {
    let linear = |src: &mut dyn WeightSource, name: WeightName| -> Result<Linear> {
        let bias = name.has_bias(&cfg).then(|| src.bias_name(name));
        src.linear(name, bias)
    };
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for l in 0..cfg.num_layers {
        let mut layer = LayerWeights {
            attn_norm: src.vector(&src.name(WeightName::AttnNorm(l)))?,
            q: linear(src, WeightName::Q(l))?,
            k: linear(src, WeightName::K(l))?,
            v: linear(src, WeightName::V(l))?,
            o: linear(src, WeightName::O(l))?,
            ffn_norm: src.vector(&src.name(WeightName::FfnNorm(l)))?,
            gate: linear(src, WeightName::Gate(l))?,
            up: linear(src, WeightName::Up(l))?,
            down: linear(src, WeightName::Down(l))?,
            qkv: None,
            gate_up: None,
        };
        layer.fuse_projections()?;
        layers.push(layer);
    }
    let embed = src.embedding()?;
    let final_norm = src.vector(&src.name(WeightName::FinalNorm))?;
    let lm_head = if cfg.tie_word_embeddings {
        src.tied_lm_head()?
    } else {
        linear(src, WeightName::LmHead)?
    };
    Ok(Decoder::new(cfg, rope, embed, layers, final_norm, lm_head))
}
