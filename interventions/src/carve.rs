//! CARVE, contrastive attention refinement (Ge et al. 2025; spec
//! shared/spec/vlm-interventions.md §3), a request-level pipeline:
//! 1. question run: greedy generation on the image and the question (+ suffix), recording at
//!    every step the last query's attention to the image tokens (head mean) in `layers`;
//! 2. general run: the same with a generic instruction instead of the question;
//! 3. the step-weighted sum over steps and layers of question / (general + lambda), upsampled to
//!    the image, keeps its top `top_fraction` pixels, the highest-scoring connected regions
//!    (at least `min_regions`), and the image is masked to them, cropped to their box and
//!    enlarged back (Lanczos) into a refined image;
//! 4. the generation itself answers the question with the original and the refined image (the
//!    released code) or the refined one alone (`final_images: "refined"`, the paper).
//!
//! Runs 1 and 2 happen when the sequence starts; the map and the crop come back in the choice's
//! `intervention_report`.

use crate::params::{check_indices, check_range, from_value, InterventionError};
use crate::prompt_view::VisionRequest;
use crate::{
    BranchPrompt, Installed, Intervention, ModelShape, PromptOverride, PromptVariant, PromptView,
};
use attune_models::{AttentionSite, Decoder, DecoderInput, HookPoint, SequenceHooks, SequenceStep};
use candle_core::{DType, Result, Tensor};
use image::RgbImage;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::ops::{Range, RangeInclusive};

/// The general run's instruction (the released code's).
pub const GENERAL_PROMPT: &str = "Write a general description of the image.";
/// Appended to the question and the general instruction.
pub const SUFFIX: &str = "Answer the question using a single word or phrase.";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinalImages {
    /// The original and the refined image (the released code).
    Both,
    /// The refined image alone (the paper).
    Refined,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    #[serde(default = "default_general")]
    general_prompt: String,
    #[serde(default = "default_suffix")]
    suffix: String,
    layers: Option<Vec<usize>>,
    #[serde(default = "default_lambda")]
    lambda: f64,
    #[serde(default = "default_top_fraction")]
    top_fraction: f64,
    #[serde(default = "default_min_regions")]
    min_regions: usize,
    #[serde(default = "default_max_steps")]
    max_steps: usize,
    #[serde(default = "default_final")]
    final_images: FinalImages,
}

fn default_general() -> String {
    GENERAL_PROMPT.into()
}
fn default_suffix() -> String {
    SUFFIX.into()
}
fn default_lambda() -> f64 {
    1e-8
}
fn default_top_fraction() -> f64 {
    0.2
}
fn default_min_regions() -> usize {
    3
}
fn default_max_steps() -> usize {
    32
}
fn default_final() -> FinalImages {
    FinalImages::Both
}

/// LLaVA-1.5's layers 20..25 of 32 rescaled: round(0.62 N) ..= floor(0.8 N).
pub fn default_layers(num_layers: usize) -> Vec<usize> {
    let first = (0.62 * num_layers as f64).round() as usize;
    let last = (0.8 * num_layers as f64) as usize;
    (first..=last.min(num_layers - 1)).collect()
}

#[derive(Debug, Clone, Serialize)]
pub struct Carve {
    pub general_prompt: String,
    pub suffix: String,
    pub layers: Vec<usize>,
    pub lambda: f64,
    pub top_fraction: f64,
    pub min_regions: usize,
    pub max_steps: usize,
    pub final_images: FinalImages,
}

impl Carve {
    pub fn from_request(
        params: Value,
        shape: &ModelShape,
    ) -> std::result::Result<Self, InterventionError> {
        let req: Request = from_value(params)?;
        let layers = req
            .layers
            .unwrap_or_else(|| default_layers(shape.num_layers));
        check_indices("layers", &layers, shape.num_layers, "layer")?;
        if layers.is_empty() {
            return Err(InterventionError::new(
                "layers",
                "must name at least one layer",
            ));
        }
        check_range("lambda", req.lambda, 0.0, 1e6, false)?;
        check_range("top_fraction", req.top_fraction, 0.0, 1.0, true)?;
        check_range("max_steps", req.max_steps as f64, 1.0, 1024.0, false)?;
        Ok(Self {
            general_prompt: req.general_prompt,
            suffix: req.suffix,
            layers,
            lambda: req.lambda,
            top_fraction: req.top_fraction,
            min_regions: req.min_regions,
            max_steps: req.max_steps,
            final_images: req.final_images,
        })
    }

    fn with_suffix(&self, text: &str) -> String {
        if self.suffix.is_empty() {
            text.to_string()
        } else {
            format!("{text} {}", self.suffix)
        }
    }

    /// Runs 1 and 2 and the refinement: the refined image and what was found. `features` are
    /// the image's embedding rows (the request prompt already holds them).
    pub fn refine(
        &self,
        decoder: &Decoder,
        request: &VisionRequest,
        features: &Tensor,
    ) -> Result<(RgbImage, Refinement)> {
        let image = &request.images[0];
        let question = self.image_attention(decoder, request, features, &request.variants[0])?;
        let general = self.image_attention(decoder, request, features, &request.variants[1])?;
        let grid = request.vision.encoder.token_grid();
        let map = contrast_map(
            &question,
            &general,
            self.lambda,
            grid,
            (image.width() as usize, image.height() as usize),
        );
        let regions = top_regions(
            &map,
            image.width() as usize,
            self.top_fraction,
            self.min_regions,
        );
        let refinement = Refinement {
            steps: question.len().min(general.len()),
            regions: regions.count,
            bbox: regions.bbox,
        };
        Ok((refined_image(image, &regions), refinement))
    }

    /// Greedy generation on `tokens` (one image), recording per step and layer the last
    /// query's head-mean attention over the image tokens.
    fn image_attention(
        &self,
        decoder: &Decoder,
        request: &VisionRequest,
        features: &Tensor,
        tokens: &[u32],
    ) -> Result<Vec<Vec<Vec<f32>>>> {
        let vision = request.vision;
        let spans = vision.image_spans(tokens);
        let span = spans
            .first()
            .cloned()
            .ok_or_else(|| candle_core::Error::msg("CARVE: the run's prompt has no image"))?;
        let embeddings = vision.merge(decoder, tokens, features)?;
        let mut capture = CaptureImageAttention {
            layers: self.layers.clone(),
            span,
            step: Vec::new(),
        };
        let mut cache = decoder.new_cache();
        let mut input = DecoderInput::Embeddings(embeddings);
        let mut steps = Vec::new();
        for _ in 0..self.max_steps {
            let mut step = [SequenceStep::new(input, &mut cache).with_hooks(&mut capture)];
            let logits = decoder
                .forward(&mut step)?
                .remove(0)
                .ok_or_else(|| candle_core::Error::msg("CARVE: a run step returned no logits"))?;
            steps.push(std::mem::take(&mut capture.step));
            let next = logits.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
            // The step that predicts the end is included, then the run stops.
            if request.stop_ids.contains(&next) {
                break;
            }
            input = DecoderInput::Tokens(vec![next]);
        }
        Ok(steps)
    }
}

/// What CARVE found for a request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Refinement {
    /// Steps fused (the shorter run's).
    pub steps: usize,
    /// Connected regions kept.
    pub regions: usize,
    /// The crop, [x0, y0, x1, y1) in image pixels.
    pub bbox: [usize; 4],
}

impl Intervention for Carve {
    fn name(&self) -> &'static str {
        "carve"
    }

    fn resolved(&self) -> Value {
        serde_json::to_value(self).expect("plain data serializes")
    }

    fn install(&self) -> Installed {
        Installed::default()
    }

    fn images(&self) -> RangeInclusive<usize> {
        1..=1
    }

    /// The question run's prompt, the general run's, and the final one.
    fn prompt_variants(&self) -> Vec<PromptVariant> {
        let suffix = if self.suffix.is_empty() {
            String::new()
        } else {
            format!(" {}", self.suffix)
        };
        vec![
            PromptVariant {
                prompt: BranchPrompt::Suffix(suffix.clone()),
                repeat_images: false,
            },
            PromptVariant {
                prompt: BranchPrompt::Replace(self.with_suffix(&self.general_prompt)),
                repeat_images: false,
            },
            PromptVariant {
                prompt: BranchPrompt::Suffix(suffix),
                repeat_images: self.final_images == FinalImages::Both,
            },
        ]
    }

    fn install_for(&self, decoder: &Decoder, prompt: &PromptView) -> Result<Installed> {
        let request = prompt
            .request
            .filter(|r| r.images.len() == 1 && r.variants.len() == 3)
            .ok_or_else(|| candle_core::Error::msg("CARVE needs one image and its prompts"))?;
        let original = prompt
            .image_features()?
            .ok_or_else(|| candle_core::Error::msg("CARVE: the prompt's image is not encoded"))?;
        let (refined, found) = self.refine(decoder, &request, &original)?;
        let vision = request.vision;
        let refined = vision.encode(&[vision.encoder.pixel_values(&refined)?], decoder.device())?;
        let features = match self.final_images {
            FinalImages::Both => Tensor::cat(&[&original, &refined], 0)?,
            FinalImages::Refined => refined,
        };
        let tokens = request.variants[2].clone();
        let embeddings = vision.merge(decoder, &tokens, &features)?;
        Ok(Installed {
            report: Some(serde_json::to_value(&found).expect("plain data serializes")),
            prompt: Some(PromptOverride { tokens, embeddings }),
            ..Installed::default()
        })
    }
}

/// Records, for the step in progress, each chosen layer's last-query attention over the image
/// keys, averaged over heads.
struct CaptureImageAttention {
    layers: Vec<usize>,
    span: Range<usize>,
    step: Vec<Vec<f32>>,
}

impl SequenceHooks for CaptureImageAttention {
    fn wants(&self, point: HookPoint, layer: usize) -> bool {
        point == HookPoint::Probs && self.layers.contains(&layer)
    }

    fn probs(&mut self, _site: &AttentionSite, probs: Tensor) -> Result<Tensor> {
        let (_, q_len, _) = probs.dims3()?;
        let row = probs
            .narrow(1, q_len - 1, 1)?
            .squeeze(1)?
            .narrow(1, self.span.start, self.span.len())?
            .to_dtype(DType::F32)?
            .mean(0)?
            .to_vec1::<f32>()?;
        self.step.push(row);
        Ok(probs)
    }
}

/// The fused map over the image (width x height, row-major): sum over steps t < n and layers
/// of (t + 1) * bilinear(question / (general + lambda)) (spec §3 step 3).
pub fn contrast_map(
    question: &[Vec<Vec<f32>>],
    general: &[Vec<Vec<f32>>],
    lambda: f64,
    grid: (usize, usize),
    size: (usize, usize),
) -> Vec<f64> {
    let (width, height) = size;
    let mut map = vec![0.0; width * height];
    for (t, (q_step, g_step)) in question.iter().zip(general).enumerate() {
        for (q, g) in q_step.iter().zip(g_step) {
            let ratio = contrast(q, g, lambda);
            let up = bilinear(&ratio, grid, size);
            for (m, u) in map.iter_mut().zip(up) {
                *m += (t + 1) as f64 * u;
            }
        }
    }
    map
}

/// question / (general + lambda), element-wise.
pub fn contrast(question: &[f32], general: &[f32], lambda: f64) -> Vec<f64> {
    question
        .iter()
        .zip(general)
        .map(|(&q, &g)| q as f64 / (g as f64 + lambda))
        .collect()
}

/// Bilinear upsampling of a (rows, cols) grid to width x height with half-pixel centers
/// (`align_corners=False`), edges clamped.
pub fn bilinear(values: &[f64], grid: (usize, usize), size: (usize, usize)) -> Vec<f64> {
    let (rows, cols) = grid;
    let (width, height) = size;
    let source = |out: usize, out_len: usize, in_len: usize| {
        let x = ((out as f64 + 0.5) * in_len as f64 / out_len as f64 - 0.5).max(0.0);
        let i0 = (x.floor() as usize).min(in_len - 1);
        let i1 = (i0 + 1).min(in_len - 1);
        (i0, i1, x - i0 as f64)
    };
    let mut out = Vec::with_capacity(width * height);
    for y in 0..height {
        let (r0, r1, fy) = source(y, height, rows);
        for x in 0..width {
            let (c0, c1, fx) = source(x, width, cols);
            let at = |r: usize, c: usize| values[r * cols + c];
            let top = at(r0, c0) * (1.0 - fx) + at(r0, c1) * fx;
            let bottom = at(r1, c0) * (1.0 - fx) + at(r1, c1) * fx;
            out.push(top * (1.0 - fy) + bottom * fy);
        }
    }
    out
}

/// numpy's `percentile` with linear interpolation.
pub fn percentile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = q / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

/// The kept pixels of the map and their bounding box.
#[derive(Debug, Clone, PartialEq)]
pub struct Regions {
    pub mask: Vec<bool>,
    pub count: usize,
    /// [x0, y0, x1, y1) of the kept pixels; the whole image when none is kept.
    pub bbox: [usize; 4],
}

/// Spec §3 step 4: pixels at or above the (1 - p) percentile, their 4-connected components
/// scored by the map's sum, the best max(min_regions, floor(components * p)) kept.
pub fn top_regions(map: &[f64], width: usize, p: f64, min_regions: usize) -> Regions {
    let height = map.len() / width;
    let threshold = percentile(map, 100.0 * (1.0 - p));
    let hot: Vec<bool> = map.iter().map(|&v| v >= threshold).collect();
    let mut label = vec![usize::MAX; map.len()];
    let mut scores: Vec<f64> = Vec::new();
    for start in 0..map.len() {
        if !hot[start] || label[start] != usize::MAX {
            continue;
        }
        let id = scores.len();
        let mut score = 0.0;
        let mut stack = vec![start];
        label[start] = id;
        while let Some(i) = stack.pop() {
            score += map[i];
            let (x, y) = (i % width, i / width);
            let neighbours = [
                (x > 0).then(|| i - 1),
                (x + 1 < width).then(|| i + 1),
                (y > 0).then(|| i - width),
                (y + 1 < height).then(|| i + width),
            ];
            for j in neighbours.into_iter().flatten() {
                if hot[j] && label[j] == usize::MAX {
                    label[j] = id;
                    stack.push(j);
                }
            }
        }
        scores.push(score);
    }
    let keep_count = min_regions.max((scores.len() as f64 * p) as usize);
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut kept = vec![false; scores.len()];
    for &id in order.iter().take(keep_count) {
        kept[id] = true;
    }
    let mask: Vec<bool> = label.iter().map(|&l| l != usize::MAX && kept[l]).collect();
    let mut bbox = [usize::MAX, usize::MAX, 0, 0];
    for (i, _) in mask.iter().enumerate().filter(|(_, &m)| m) {
        let (x, y) = (i % width, i / width);
        bbox = [
            bbox[0].min(x),
            bbox[1].min(y),
            bbox[2].max(x + 1),
            bbox[3].max(y + 1),
        ];
    }
    if bbox[0] == usize::MAX {
        bbox = [0, 0, width, height];
    }
    Regions {
        mask,
        count: kept.iter().filter(|&&k| k).count(),
        bbox,
    }
}

/// Spec §3 step 5: pixels outside the mask zeroed, the box cropped and enlarged by
/// max(W / w, H / h) (Lanczos), aspect kept.
pub fn refined_image(image: &RgbImage, regions: &Regions) -> RgbImage {
    let (width, height) = (image.width() as usize, image.height() as usize);
    let [x0, y0, x1, y1] = regions.bbox;
    let (crop_w, crop_h) = (x1 - x0, y1 - y0);
    let mut crop = RgbImage::new(crop_w as u32, crop_h as u32);
    for (x, y, pixel) in crop.enumerate_pixels_mut() {
        let (sx, sy) = (x0 + x as usize, y0 + y as usize);
        if regions.mask[sy * width + sx] {
            *pixel = *image.get_pixel(sx as u32, sy as u32);
        }
    }
    let scale = (width as f64 / crop_w as f64).max(height as f64 / crop_h as f64);
    let (new_w, new_h) = (
        (crop_w as f64 * scale).round() as u32,
        (crop_h as f64 * scale).round() as u32,
    );
    if (new_w, new_h) == (crop_w as u32, crop_h as u32) {
        return crop;
    }
    image::imageops::resize(&crop, new_w, new_h, image::imageops::FilterType::Lanczos3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_contrast_and_step_weights() {
        let c = contrast(&[0.4, 0.1], &[0.2, 0.1], 1e-8);
        assert!((c[0] - 2.0).abs() < 1e-6 && (c[1] - 1.0).abs() < 1e-6);
        // Three steps of a uniform 1x1 ratio of 1 sum to 1 + 2 + 3 on every pixel.
        let step = vec![vec![1.0f32]];
        let runs = vec![step.clone(), step.clone(), step];
        let map = contrast_map(&runs, &runs, 0.0, (1, 1), (2, 2));
        assert_eq!(map, vec![6.0; 4]);
        // The shorter run sets the steps.
        let map = contrast_map(&runs[..2], &runs, 0.0, (1, 1), (1, 1));
        assert_eq!(map, vec![3.0]);
    }

    #[test]
    fn full_fraction_keeps_the_whole_image() {
        let image = RgbImage::from_fn(7, 5, |x, y| image::Rgb([x as u8 * 30, y as u8 * 40, 9]));
        let map: Vec<f64> = (0..35).map(|i| (i % 6) as f64).collect();
        let regions = top_regions(&map, 7, 1.0, 3);
        assert_eq!(regions.count, 1);
        assert_eq!(regions.bbox, [0, 0, 7, 5]);
        assert_eq!(refined_image(&image, &regions), image);
    }

    #[test]
    fn regions_are_four_connected_and_ranked_by_score() {
        // Three hot blobs; the diagonal pair at (4,0)-(5,1) is two components.
        #[rustfmt::skip]
        let map = vec![
            9.0, 9.0, 0.0, 0.0, 5.0, 0.0,
            9.0, 0.0, 0.0, 0.0, 0.0, 4.0,
            0.0, 0.0, 0.0, 7.0, 0.0, 0.0,
        ];
        let regions = top_regions(&map, 6, 0.34, 2);
        assert_eq!(regions.count, 2);
        // The 27-point blob and the 7 are kept; the 5 and the 4 are not.
        assert!(regions.mask[0] && regions.mask[15] && !regions.mask[4] && !regions.mask[11]);
        assert_eq!(regions.bbox, [0, 0, 4, 3]);
    }

    #[test]
    fn percentile_interpolates_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 50.0), 2.5);
        assert_eq!(percentile(&v, 80.0), 3.4000000000000004);
        assert_eq!(percentile(&v, 0.0), 1.0);
    }

    #[test]
    fn refinement_crops_masks_and_enlarges() {
        let image = RgbImage::from_pixel(8, 8, image::Rgb([200, 100, 50]));
        let mut mask = vec![false; 64];
        for y in 2..4 {
            for x in 2..6 {
                mask[y * 8 + x] = true;
            }
        }
        mask[2 * 8 + 2] = false;
        let regions = Regions {
            mask,
            count: 1,
            bbox: [2, 2, 6, 4],
        };
        let refined = refined_image(&image, &regions);
        // 4 x 2 box, scale max(8/4, 8/2) = 4.
        assert_eq!((refined.width(), refined.height()), (16, 8));
        assert_eq!(*refined.get_pixel(15, 7), image::Rgb([200, 100, 50]));
        // The masked-out corner pixel darkens its enlarged neighbourhood.
        assert!(
            refined.get_pixel(0, 0)[0] < 150,
            "{:?}",
            refined.get_pixel(0, 0)
        );
    }

    #[test]
    fn default_layers_rescale_llava() {
        assert_eq!(default_layers(32), (20..=25).collect::<Vec<_>>());
        assert_eq!(default_layers(6), vec![4]);
    }
}
