//! What an intervention may read of a sequence's prompt when it installs itself: the tokens,
//! the merged input embeddings of a VLM prompt with images, and where the images are.

use attune_models::vision::Vision;
use attune_models::DecoderInput;
use candle_core::{Result, Tensor};
use image::RgbImage;
use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::Arc;

#[derive(Clone, Copy)]
pub struct PromptView<'a> {
    /// The prompt tokens; each image appears as its run of image tokens.
    pub tokens: &'a [u32],
    /// Input embeddings (len, hidden) with image features in place, when the prompt has images.
    pub embeddings: Option<&'a Tensor>,
    /// Key positions of each image, in order.
    pub image_spans: &'a [Range<usize>],
    /// What request-level pipelines (CARVE) need beyond the prompt, on a VLM.
    pub request: Option<VisionRequest<'a>>,
}

/// A VLM request's images and the prompt renderings an intervention asked for.
#[derive(Clone, Copy)]
pub struct VisionRequest<'a> {
    pub vision: &'a Vision,
    /// The request's images as decoded.
    pub images: &'a [Arc<RgbImage>],
    /// The intervention's [`crate::Intervention::prompt_variants`], rendered to tokens with
    /// image tokens expanded, in order.
    pub variants: &'a [Vec<u32>],
    /// Tokens that end a generation.
    pub stop_ids: &'a BTreeSet<u32>,
}

impl<'a> PromptView<'a> {
    /// A text-only prompt.
    pub fn text(tokens: &'a [u32]) -> Self {
        Self {
            tokens,
            embeddings: None,
            image_spans: &[],
            request: None,
        }
    }

    pub fn has_images(&self) -> bool {
        !self.image_spans.is_empty()
    }

    /// Decoder inputs for the prompt in pieces of at most `piece` rows (extra prefills of long
    /// prompts keep their attention scores at piece x context).
    pub fn pieces(&self, piece: usize) -> Result<Vec<DecoderInput>> {
        let len = self.tokens.len();
        (0..len)
            .step_by(piece.max(1))
            .map(|start| {
                let n = piece.min(len - start);
                Ok(match self.embeddings {
                    Some(e) => DecoderInput::Embeddings(e.narrow(0, start, n)?),
                    None => DecoderInput::Tokens(self.tokens[start..start + n].to_vec()),
                })
            })
            .collect()
    }

    /// The prompt with every image span deleted (later positions move up): the text-only
    /// counterpart VHR and VISTA compare against.
    pub fn without_images(&self) -> Vec<u32> {
        self.tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.image_spans.iter().any(|s| s.contains(i)))
            .map(|(_, &t)| t)
            .collect()
    }

    /// The images' embedding rows (what the vision tower and projector made of them), in
    /// order, taken from the prompt's embeddings; `None` for a text prompt.
    pub fn image_features(&self) -> Result<Option<Tensor>> {
        let Some(embeddings) = self.embeddings.filter(|_| self.has_images()) else {
            return Ok(None);
        };
        let rows = self
            .image_spans
            .iter()
            .map(|s| embeddings.narrow(0, s.start, s.len()))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&rows, 0).map(Some)
    }
}
