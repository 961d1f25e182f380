//! Vision-language models: images in, language-model input embeddings out.
//!
//! A VLM family provides an [`ImageEncoder`] (its processor and vision tower); everything after
//! that is shared: the prompt holds one image token per image, [`Vision`] expands it into the
//! encoder's token count and merges the features into the token embeddings, and the decoder
//! (with all its hooks) runs on the merged embeddings. Interventions see the image spans.

pub mod clip;
pub mod llava;
pub mod preprocess;
pub mod tiny_llava;

pub use image::RgbImage;
pub use preprocess::{decode_image, ClipPreprocess, ImageError, ImageLimits};

use crate::decoder::Decoder;
use candle_core::{Device, Result, Tensor};
use std::ops::Range;

/// One VLM family's image path.
pub trait ImageEncoder: Send + Sync {
    /// The processor's input for one image: (3, height, width) f32 on the CPU.
    fn pixel_values(&self, image: &RgbImage) -> Result<Tensor>;
    /// Language-model embeddings for preprocessed images (images, 3, height, width):
    /// (images, tokens_per_image, text_hidden).
    fn encode(&self, pixels: &Tensor) -> Result<Tensor>;
    /// Embedding rows each image becomes in the prompt.
    fn tokens_per_image(&self) -> usize;
    /// The (rows, cols) grid the image tokens come from, row-major.
    fn token_grid(&self) -> (usize, usize);
}

/// A model's vision side: its encoder and the prompt token that stands for an image.
pub struct Vision {
    pub encoder: Box<dyn ImageEncoder>,
    pub image_token: u32,
}

impl Vision {
    /// The prompt with each image token repeated once per embedding row of its image (what
    /// HF processors do to the text before tokenizing).
    pub fn expand_image_tokens(&self, tokens: &[u32]) -> Vec<u32> {
        let n = self.encoder.tokens_per_image();
        let mut out = Vec::with_capacity(tokens.len() + n * self.count_images(tokens));
        for &t in tokens {
            if t == self.image_token {
                out.extend(std::iter::repeat_n(t, n));
            } else {
                out.push(t);
            }
        }
        out
    }

    /// Image tokens in a prompt (one per image before expansion, one per row after).
    pub fn count_images(&self, tokens: &[u32]) -> usize {
        tokens.iter().filter(|&&t| t == self.image_token).count()
    }

    /// The key positions of each image in an expanded prompt, in order.
    pub fn image_spans(&self, tokens: &[u32]) -> Vec<Range<usize>> {
        let n = self.encoder.tokens_per_image();
        let positions: Vec<usize> = tokens
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == self.image_token)
            .map(|(i, _)| i)
            .collect();
        positions.chunks(n).map(|c| c[0]..c[0] + c.len()).collect()
    }

    /// Encodes images given as pixel tensors (3, height, width) each: (images * tokens, hidden).
    pub fn encode(&self, pixels: &[Tensor], device: &Device) -> Result<Tensor> {
        let batch = Tensor::stack(pixels, 0)?.to_device(device)?;
        let features = self.encoder.encode(&batch)?;
        let (images, tokens, hidden) = features.dims3()?;
        features.reshape((images * tokens, hidden))
    }

    /// Input embeddings of an expanded prompt: token embeddings, with image tokens replaced by
    /// the rows of `features` in order (images * tokens_per_image, hidden).
    pub fn merge(&self, decoder: &Decoder, tokens: &[u32], features: &Tensor) -> Result<Tensor> {
        let slots = self.count_images(tokens);
        let rows = features.dim(0)?;
        if slots != rows {
            candle_core::bail!("the prompt has {slots} image token slots for {rows} feature rows");
        }
        let embeddings = decoder.embed(tokens)?;
        // One gather from [embeddings; features]: text rows keep their index, image slots
        // take the next feature row.
        let mut next_feature = tokens.len() as u32;
        let index: Vec<u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                if t == self.image_token {
                    next_feature += 1;
                    next_feature - 1
                } else {
                    i as u32
                }
            })
            .collect();
        let table = Tensor::cat(&[&embeddings, &features.to_dtype(embeddings.dtype())?], 0)?;
        table.index_select(&Tensor::new(index.as_slice(), embeddings.device())?, 0)
    }
}
