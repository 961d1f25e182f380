//! The CLIP ViT vision tower (HF `CLIPVisionModel`), as LLaVA uses it: patch embeddings, a
//! class token, learned positions, pre-norm transformer layers, and the hidden state of one
//! chosen layer as the image's features.

use crate::linear::Linear;
use candle_core::{Module, Result, Tensor, D};
use serde::Deserialize;

/// The `vision_config` of an HF LLaVA `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_image_size")]
    pub image_size: usize,
    #[serde(default = "default_patch_size")]
    pub patch_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

fn default_image_size() -> usize {
    336
}
fn default_patch_size() -> usize {
    14
}
fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}

impl ClipConfig {
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }

    pub fn num_patches(&self) -> usize {
        self.patches_per_side().pow(2)
    }
}

/// CLIP's MLP activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// x * sigmoid(1.702 x), OpenAI CLIP's.
    QuickGelu,
    /// The exact (erf) GELU.
    Gelu,
}

impl Activation {
    pub fn parse(name: &str) -> anyhow::Result<Self> {
        match name {
            "quick_gelu" => Ok(Self::QuickGelu),
            "gelu" => Ok(Self::Gelu),
            other => anyhow::bail!("unsupported activation `{other}` (quick_gelu, gelu)"),
        }
    }

    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Self::Gelu => x.gelu_erf(),
        }
    }
}

/// LayerNorm weights.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::layer_norm(x, &self.weight, &self.bias, self.eps as f32)
    }
}

#[derive(Debug, Clone)]
pub struct ClipLayer {
    pub norm1: LayerNorm,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub out: Linear,
    pub norm2: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
}

#[derive(Debug, Clone)]
pub struct ClipVisionTower {
    pub cfg: ClipConfig,
    /// The patch convolution as a matrix: (hidden, 3 * patch * patch), (channel, row, col) order.
    pub patch_embedding: Tensor,
    pub class_embedding: Tensor,
    /// (patches + 1, hidden).
    pub position_embedding: Tensor,
    pub pre_norm: LayerNorm,
    pub layers: Vec<ClipLayer>,
    pub activation: Activation,
}

impl ClipVisionTower {
    /// The hidden states after `depth` layers (0 = the embeddings after the pre-norm) for
    /// images (batch, 3, size, size): (batch, patches + 1, hidden), class token first.
    pub fn hidden_state(&self, pixels: &Tensor, depth: usize) -> Result<Tensor> {
        let mut x = self.embed(pixels)?;
        for layer in &self.layers[..depth] {
            x = self.layer_forward(layer, &x)?;
        }
        Ok(x)
    }

    fn embed(&self, pixels: &Tensor) -> Result<Tensor> {
        let (batch, channels, height, width) = pixels.dims4()?;
        let p = self.cfg.patch_size;
        let (rows, cols) = (height / p, width / p);
        if rows * p != height || cols * p != width || rows * cols != self.cfg.num_patches() {
            candle_core::bail!(
                "the vision tower takes {0}x{0} images, got {height}x{width}",
                self.cfg.image_size
            );
        }
        // (b, c, rows, p, cols, p) -> (b, rows, cols, c, p, p): each patch flattened in the
        // convolution kernel's order, so the stride-p convolution becomes one matmul.
        let patches = pixels
            .reshape((batch, channels, rows, p, cols, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((batch * rows * cols, channels * p * p))?;
        let hidden = self.cfg.hidden_size;
        let patch_embeds =
            patches
                .matmul(&self.patch_embedding.t()?)?
                .reshape((batch, rows * cols, hidden))?;
        let class = self
            .class_embedding
            .reshape((1, 1, hidden))?
            .broadcast_as((batch, 1, hidden))?;
        let x = Tensor::cat(&[&class, &patch_embeds], 1)?
            .broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        self.pre_norm.forward(&x)
    }

    fn layer_forward(&self, layer: &ClipLayer, x: &Tensor) -> Result<Tensor> {
        let (batch, tokens, hidden) = x.dims3()?;
        let heads = self.cfg.num_attention_heads;
        let head_dim = hidden / heads;
        let rows = |t: Tensor| -> Result<Tensor> {
            t.reshape((batch, tokens, heads, head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let h = layer.norm1.forward(x)?.reshape((batch * tokens, hidden))?;
        let q = rows((layer.q.forward(&h)? * (head_dim as f64).powf(-0.5))?)?;
        let k = rows(layer.k.forward(&h)?)?;
        let v = rows(layer.v.forward(&h)?)?;
        let probs = candle_nn::ops::softmax_last_dim(&q.matmul(&k.t()?)?)?;
        let attn = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((batch * tokens, hidden))?;
        let x = (x + layer.out.forward(&attn)?.reshape((batch, tokens, hidden))?)?;
        let h = layer.norm2.forward(&x)?.reshape((batch * tokens, hidden))?;
        let mlp = layer
            .fc2
            .forward(&self.activation.apply(&layer.fc1.forward(&h)?)?)?;
        x + mlp.reshape((batch, tokens, hidden))?
    }
}

/// LLaVA's projector: linear, GELU, linear, from the vision width to the text width.
#[derive(Debug, Clone)]
pub struct Projector {
    pub linear_1: Linear,
    pub activation: Activation,
    pub linear_2: Linear,
}

impl Module for Projector {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let flat = x.flatten_to(D::Minus2)?;
        let y = self
            .linear_2
            .forward(&self.activation.apply(&self.linear_1.forward(&flat)?)?)?;
        let mut out_dims = dims;
        *out_dims.last_mut().expect("rank >= 1") = y.dim(D::Minus1)?;
        y.reshape(out_dims)
    }
}
