//! CLIP image preprocessing exactly as Hugging Face's slow, PIL-based `CLIPImageProcessor` does it
//! (`CLIPImageProcessorPil` in transformers 5), plus decoding of request images.
//!
//! The PIL bicubic resize is reproduced bit for bit (Pillow 13's `libImaging/Resample.c`
//! fixed-point arithmetic), and so are `convert_to_rgb`'s compositing onto white and the float
//! steps, so `pixel_values` equals transformers' output for the same RGB pixels. Known gaps, all
//! in decoding: JPEG comes from zune-jpeg rather than libjpeg-turbo, so pixels can differ by a few
//! levels; 16-bit grayscale PNGs are scaled to 8 bits where PIL clips them at 255 (nearly white);
//! EXIF orientation is not applied (as with PIL's `Image.open`; transformers' `load_image` helper
//! does apply it).

use anyhow::{bail, Context, Result};
use image::{
    DynamicImage, ImageBuffer, ImageDecoder, ImageFormat, ImageReader, Limits, Pixel, Rgb, RgbImage,
};
use serde_json::Value;
use std::borrow::Cow;
use std::fmt;
use std::io::Cursor;

/// Limits on a request image, enforced before its pixels are decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest encoded (file) size.
    pub max_bytes: usize,
    /// Largest width * height.
    pub max_pixels: u64,
    /// Largest width and largest height.
    pub max_side: u32,
}

/// Why a request image was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageError {
    /// Over one of the [`ImageLimits`]; the text says which.
    TooLarge(String),
    /// Not a PNG, JPEG, WebP or GIF image, or a corrupt one.
    Undecodable(String),
    /// Zero width or height.
    Empty,
}

impl fmt::Display for ImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageError::TooLarge(why) => write!(f, "image too large: {why}"),
            ImageError::Undecodable(why) => write!(f, "could not decode the image: {why}"),
            ImageError::Empty => write!(f, "the image is empty (zero width or height)"),
        }
    }
}

impl std::error::Error for ImageError {}

/// Decodes PNG, JPEG, WebP or GIF (first frame) bytes into RGB, compositing any transparency
/// onto white as transformers' `convert_to_rgb` does. Oversized and empty images are refused from
/// the header's dimensions, before any pixel buffer is allocated.
pub fn decode_image(bytes: &[u8], limits: &ImageLimits) -> Result<RgbImage, ImageError> {
    if bytes.len() > limits.max_bytes {
        return Err(ImageError::TooLarge(format!(
            "{} bytes, the limit is {}",
            bytes.len(),
            limits.max_bytes
        )));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Undecodable(e.to_string()))?;
    if !matches!(
        reader.format(),
        Some(ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP | ImageFormat::Gif)
    ) {
        return Err(ImageError::Undecodable(
            "not a PNG, JPEG, WebP or GIF image".into(),
        ));
    }
    reader.limits(decoder_limits(limits));
    let decoder = reader.into_decoder().map_err(refusal)?;
    let (width, height) = decoder.dimensions();
    check_dimensions(width, height, limits)?;
    let image = DynamicImage::from_decoder(decoder).map_err(refusal)?;
    Ok(flatten_alpha(high_bytes(image)))
}

/// The decoders' memory cap, a second line of defence should a header understate the pixels.
/// (Dimensions are left to `check_dimensions`, whose messages are clearer.)
fn decoder_limits(limits: &ImageLimits) -> Limits {
    let mut decoder = Limits::no_limits();
    // The widest decoded pixel (16-bit RGBA) is 8 bytes; twice that leaves room for the
    // decoders' working buffers.
    decoder.max_alloc = Some(limits.max_pixels.saturating_mul(16));
    decoder
}

fn check_dimensions(width: u32, height: u32, limits: &ImageLimits) -> Result<(), ImageError> {
    if width == 0 || height == 0 {
        return Err(ImageError::Empty);
    }
    if width.max(height) > limits.max_side {
        return Err(ImageError::TooLarge(format!(
            "{width}x{height}, the largest side allowed is {}",
            limits.max_side
        )));
    }
    let pixels = u64::from(width) * u64::from(height);
    if pixels > limits.max_pixels {
        return Err(ImageError::TooLarge(format!(
            "{width}x{height} is {pixels} pixels, the limit is {}",
            limits.max_pixels
        )));
    }
    Ok(())
}

fn refusal(error: image::ImageError) -> ImageError {
    match error {
        image::ImageError::Limits(e) => ImageError::TooLarge(e.to_string()),
        e => ImageError::Undecodable(e.to_string()),
    }
}

/// 16-bit colour as PIL loads it: each sample's high byte (the image crate would round).
fn high_bytes(image: DynamicImage) -> DynamicImage {
    match image {
        DynamicImage::ImageRgb16(buffer) => DynamicImage::ImageRgb8(keep_high_bytes(buffer)),
        DynamicImage::ImageRgba16(buffer) => DynamicImage::ImageRgba8(keep_high_bytes(buffer)),
        DynamicImage::ImageLumaA16(buffer) => DynamicImage::ImageLumaA8(keep_high_bytes(buffer)),
        other => other,
    }
}

fn keep_high_bytes<P, Q>(buffer: ImageBuffer<P, Vec<u16>>) -> ImageBuffer<Q, Vec<u8>>
where
    P: Pixel<Subpixel = u16>,
    Q: Pixel<Subpixel = u8>,
{
    let (width, height) = buffer.dimensions();
    let samples = buffer
        .into_raw()
        .into_iter()
        .map(|v| (v >> 8) as u8)
        .collect();
    ImageBuffer::from_raw(width, height, samples).expect("one byte per 16-bit sample")
}

/// transformers' `convert_to_rgb`: PIL `alpha_composite` onto opaque white, then drop alpha.
fn flatten_alpha(image: DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.into_rgb8();
    }
    let rgba = image.into_rgba8();
    RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let [r, g, b, a] = rgba.get_pixel(x, y).0;
        Rgb([r, g, b].map(|c| over_white(c, a)))
    })
}

/// `c * a/255 + 255 * (1 - a/255)`, rounded to nearest. Pillow computes it in fixed point with 7
/// extra bits; the two agree on all 65536 (channel, alpha) pairs (checked against Pillow 13).
fn over_white(channel: u8, alpha: u8) -> u8 {
    let (c, a) = (u32::from(channel), u32::from(alpha));
    // 255 is odd, so no quotient is exactly half-way: adding 127 first rounds to nearest.
    ((c * a + 255 * (255 - a) + 127) / 255) as u8
}

/// The OpenAI CLIP normalization constants, as published (and as f32 rounds them, like the
/// float32 arrays transformers normalizes with).
const CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
#[allow(clippy::excessive_precision)]
const CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

/// A CLIP image processor's settings (the fields of HF's `preprocessor_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipPreprocess {
    pub shortest_edge: u32,
    pub crop_height: u32,
    pub crop_width: u32,
    pub do_resize: bool,
    pub do_center_crop: bool,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// LLaVA's `image_aspect_ratio: pad`: `expand2square` before the processor. (Original LLaVA
    /// opens images with `.convert("RGB")`, which drops alpha; [`decode_image`] composites it on
    /// white, so only transparent images differ.)
    pub pad_to_square: bool,
}

impl ClipPreprocess {
    /// CLIP ViT-L/14-336 defaults (shortest_edge 336, crop 336x336, OpenAI CLIP mean and std,
    /// rescale 1/255).
    pub fn clip_336() -> Self {
        Self {
            shortest_edge: 336,
            crop_height: 336,
            crop_width: 336,
            do_resize: true,
            do_center_crop: true,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            mean: CLIP_MEAN,
            std: CLIP_STD,
            pad_to_square: false,
        }
    }

    /// From a Hugging Face `preprocessor_config.json` text. Missing (or null) fields take the
    /// [`clip_336`](Self::clip_336) defaults; `pad_to_square` is false (it is the model config's
    /// business). Refuses what this processor cannot reproduce: a `size` other than a shortest
    /// edge and a resampling filter other than bicubic.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let json: Value = serde_json::from_str(text).context("preprocessor config is not JSON")?;
        let default = Self::clip_336();
        let flag = |key: &str, default| read(&json, key, default, "a boolean", Value::as_bool);
        let bicubic = |v: &Value| v.as_u64().filter(|&r| r == 3);
        read(
            &json,
            "resample",
            3,
            "3 (bicubic, the only filter here)",
            bicubic,
        )?;
        let (crop_height, crop_width) = read(
            &json,
            "crop_size",
            (default.crop_height, default.crop_width),
            "a positive integer or {\"height\": H, \"width\": W}",
            crop_size,
        )?;
        Ok(Self {
            shortest_edge: read(
                &json,
                "size",
                default.shortest_edge,
                "a positive integer or {\"shortest_edge\": N}",
                shortest_edge,
            )?,
            crop_height,
            crop_width,
            do_resize: flag("do_resize", default.do_resize)?,
            do_center_crop: flag("do_center_crop", default.do_center_crop)?,
            do_rescale: flag("do_rescale", default.do_rescale)?,
            rescale_factor: read(
                &json,
                "rescale_factor",
                default.rescale_factor,
                "a number",
                Value::as_f64,
            )?,
            do_normalize: flag("do_normalize", default.do_normalize)?,
            mean: read(&json, "image_mean", default.mean, "3 numbers", three_floats)?,
            std: read(&json, "image_std", default.std, "3 numbers", three_floats)?,
            pad_to_square: false,
        })
    }

    /// The model input for one image: f32 in (channel, row, column) order, 3 * crop_height *
    /// crop_width values (with `do_center_crop` off, the resized image's size instead).
    ///
    /// # Panics
    /// On an empty image ([`decode_image`] refuses those).
    pub fn pixel_values(&self, image: &RgbImage) -> Vec<f32> {
        assert!(
            image.width() > 0 && image.height() > 0,
            "pixel_values of an empty image"
        );
        let mut image = Cow::Borrowed(image);
        if self.pad_to_square {
            image = Cow::Owned(expand_to_square(&image, self.pad_background()));
        }
        if self.do_resize {
            let (width, height) =
                shortest_edge_size(image.width(), image.height(), self.shortest_edge);
            image = Cow::Owned(resize_bicubic(&image, width, height));
        }
        if self.do_center_crop {
            image = Cow::Owned(center_crop(&image, self.crop_width, self.crop_height));
        }
        self.channels_first(&image)
    }

    /// LLaVA's `tuple(int(x * 255) for x in image_processor.image_mean)`.
    fn pad_background(&self) -> [u8; 3] {
        self.mean.map(|m| (f64::from(m) * 255.0) as u8)
    }

    fn channels_first(&self, image: &RgbImage) -> Vec<f32> {
        let plane = image.width() as usize * image.height() as usize;
        let mut out = vec![0.0; 3 * plane];
        for (i, pixel) in image.pixels().enumerate() {
            for (c, &value) in pixel.0.iter().enumerate() {
                out[c * plane + i] = self.channel_value(value, c);
            }
        }
        out
    }

    fn channel_value(&self, value: u8, channel: usize) -> f32 {
        // transformers rescales in float64 and casts to float32 after; it normalizes in float32.
        let x = if self.do_rescale {
            (f64::from(value) * self.rescale_factor) as f32
        } else {
            f32::from(value)
        };
        if self.do_normalize {
            (x - self.mean[channel]) / self.std[channel]
        } else {
            x
        }
    }
}

/// Reads `json[key]` with `parse`, or `default` when absent or null.
fn read<T>(
    json: &Value,
    key: &str,
    default: T,
    expected: &str,
    parse: impl Fn(&Value) -> Option<T>,
) -> Result<T> {
    match json.get(key).filter(|v| !v.is_null()) {
        None => Ok(default),
        Some(v) => match parse(v) {
            Some(parsed) => Ok(parsed),
            None => bail!("`{key}` must be {expected}, got {v}"),
        },
    }
}

fn positive_u32(v: &Value) -> Option<u32> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .filter(|&n| n > 0)
}

/// `size` as CLIP uses it: an int or `{"shortest_edge": N}` (HF's `default_to_square=False`).
fn shortest_edge(v: &Value) -> Option<u32> {
    match v {
        Value::Object(fields) if fields.len() == 1 => positive_u32(fields.get("shortest_edge")?),
        _ => positive_u32(v),
    }
}

/// `crop_size` as (height, width): an int is a square.
fn crop_size(v: &Value) -> Option<(u32, u32)> {
    match v {
        Value::Object(fields) => Some((
            positive_u32(fields.get("height")?)?,
            positive_u32(fields.get("width")?)?,
        )),
        _ => positive_u32(v).map(|side| (side, side)),
    }
}

fn three_floats(v: &Value) -> Option<[f32; 3]> {
    match v.as_array()?.as_slice() {
        [a, b, c] => Some([a.as_f64()? as f32, b.as_f64()? as f32, c.as_f64()? as f32]),
        _ => None,
    }
}

/// transformers' `get_resize_output_image_size(default_to_square=False)` as (width, height): the
/// short side becomes `size`, the long side `int(size * long / short)` with a float64 quotient.
fn shortest_edge_size(width: u32, height: u32, size: u32) -> (u32, u32) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    let new_long = ((u64::from(size) * u64::from(long)) as f64 / f64::from(short)) as u32;
    if width <= height {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

/// transformers' `center_crop`: the window starts at `floor((side - crop) / 2)` on each axis and
/// reads zeros wherever it reaches past the image (an image smaller than the crop is padded).
fn center_crop(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    let left = crop_start(image.width(), width);
    let top = crop_start(image.height(), height);
    RgbImage::from_fn(width, height, |x, y| {
        let source_x = u32::try_from(i64::from(x) + left).ok();
        let source_y = u32::try_from(i64::from(y) + top).ok();
        source_x
            .zip(source_y)
            .and_then(|(sx, sy)| image.get_pixel_checked(sx, sy))
            .copied()
            .unwrap_or(Rgb([0, 0, 0]))
    })
}

fn crop_start(side: u32, crop: u32) -> i64 {
    (i64::from(side) - i64::from(crop)).div_euclid(2)
}

/// LLaVA's `expand2square`: pad to a square with `background` (LLaVA uses
/// `tuple(int(x * 255) for x in image_mean)`), the image pasted centered: for w > h at
/// (0, (w - h) / 2), else at ((h - w) / 2, 0).
pub fn expand_to_square(image: &RgbImage, background: [u8; 3]) -> RgbImage {
    let (width, height) = image.dimensions();
    if width == height {
        return image.clone();
    }
    let side = width.max(height);
    let mut square = RgbImage::from_pixel(side, side, Rgb(background));
    let (x, y) = if width > height {
        (0, (width - height) / 2)
    } else {
        ((height - width) / 2, 0)
    };
    image::imageops::replace(&mut square, image, i64::from(x), i64::from(y));
    square
}

/// Fixed-point fraction bits of Pillow's 8-bit resampling coefficients.
const PRECISION_BITS: u32 = 22;

/// One output sample's window into its input line: the first input index and the weights.
struct Taps {
    start: usize,
    weights: Vec<i32>,
}

/// PIL's `Image.resize(size, resample=Image.BICUBIC, reducing_gap=None)` on an 8-bit RGB image,
/// bit-exact against Pillow 13: a horizontal and a vertical pass, each only when that dimension
/// changes. Pillow 13 runs the vertical pass first when the height loses more than twice as many
/// pixels as the width (python-pillow/Pillow#9549); earlier Pillows always start horizontally,
/// which moves some pixels of such resizes by a few levels.
pub fn resize_bicubic(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    let height_loss = i64::from(image.height()) - i64::from(height);
    let width_loss = i64::from(image.width()) - i64::from(width);
    let image = Cow::Borrowed(image);
    let resized = if height_loss > 0 && height_loss > 2 * width_loss {
        resize_width(resize_height(image, height), width)
    } else {
        resize_height(resize_width(image, width), height)
    };
    resized.into_owned()
}

fn resize_width(image: Cow<'_, RgbImage>, width: u32) -> Cow<'_, RgbImage> {
    if image.width() == width {
        image
    } else {
        Cow::Owned(resample_horizontal(&image, width))
    }
}

fn resize_height(image: Cow<'_, RgbImage>, height: u32) -> Cow<'_, RgbImage> {
    if image.height() == height {
        image
    } else {
        Cow::Owned(resample_vertical(&image, height))
    }
}

fn resample_horizontal(image: &RgbImage, width: u32) -> RgbImage {
    let taps = coefficients(image.width(), width);
    let row_len = 3 * image.width() as usize;
    let raw = image.as_raw();
    RgbImage::from_fn(width, image.height(), |x, y| {
        let row = &raw[y as usize * row_len..][..row_len];
        Rgb(convolve(&taps[x as usize], |i| &row[3 * i..3 * i + 3]))
    })
}

fn resample_vertical(image: &RgbImage, height: u32) -> RgbImage {
    let taps = coefficients(image.height(), height);
    let row_len = 3 * image.width() as usize;
    let raw = image.as_raw();
    RgbImage::from_fn(image.width(), height, |x, y| {
        let column = 3 * x as usize;
        Rgb(convolve(&taps[y as usize], |i| {
            &raw[i * row_len + column..][..3]
        }))
    })
}

/// Pillow's inner loop: integer multiply-adds from a rounding bias of one half, then `clip8`.
fn convolve<'a>(taps: &Taps, pixel: impl Fn(usize) -> &'a [u8]) -> [u8; 3] {
    let mut sums = [1i32 << (PRECISION_BITS - 1); 3];
    for (i, &weight) in taps.weights.iter().enumerate() {
        for (sum, &value) in sums.iter_mut().zip(pixel(taps.start + i)) {
            *sum += i32::from(value) * weight;
        }
    }
    sums.map(|sum| (sum >> PRECISION_BITS).clamp(0, 255) as u8)
}

/// Pillow's `precompute_coeffs` for the bicubic filter over a whole input line, followed by
/// `normalize_coeffs_8bpc`.
fn coefficients(in_size: u32, out_size: u32) -> Vec<Taps> {
    const SUPPORT: f64 = 2.0;
    let scale = f64::from(in_size) / f64::from(out_size);
    let filter_scale = scale.max(1.0);
    let support = SUPPORT * filter_scale;
    let inverse = 1.0 / filter_scale;
    (0..out_size)
        .map(|out| {
            let center = (f64::from(out) + 0.5) * scale;
            // `as` truncates toward zero like C's (int) casts.
            let first = ((center - support + 0.5) as i64).max(0);
            let end = ((center + support + 0.5) as i64).min(i64::from(in_size));
            let raw: Vec<f64> = (first..end)
                .map(|x| bicubic((x as f64 - center + 0.5) * inverse))
                .collect();
            let total: f64 = raw.iter().sum();
            let weights = raw
                .iter()
                .map(|&w| fixed_point(if total == 0.0 { w } else { w / total }))
                .collect();
            Taps {
                start: first as usize,
                weights,
            }
        })
        .collect()
}

/// `normalize_coeffs_8bpc`: scale to 22 fraction bits, rounding half away from zero.
fn fixed_point(weight: f64) -> i32 {
    let scaled = weight * f64::from(1u32 << PRECISION_BITS);
    if weight < 0.0 {
        (scaled - 0.5) as i32
    } else {
        (scaled + 0.5) as i32
    }
}

/// Pillow's `bicubic_filter`: Keys' cubic convolution with a = -0.5.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::codecs::png::PngEncoder;
    use image::{ExtendedColorType, ImageEncoder};
    use std::time::{Duration, Instant};

    const FIXTURES: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/clip_preprocess/"
    );
    const LIMITS: ImageLimits = ImageLimits {
        max_bytes: 1 << 20,
        max_pixels: 1 << 22,
        max_side: 4096,
    };

    fn fixture_bytes(name: &str) -> Vec<u8> {
        std::fs::read(format!("{FIXTURES}{name}")).unwrap()
    }

    fn fixture_image(name: &str) -> RgbImage {
        decode_image(&fixture_bytes(name), &LIMITS).unwrap()
    }

    fn expected() -> Value {
        serde_json::from_slice(&fixture_bytes("expected.json")).unwrap()
    }

    fn as_str(v: &Value) -> &str {
        v.as_str().unwrap()
    }

    fn as_u32(v: &Value) -> u32 {
        v.as_u64().unwrap() as u32
    }

    fn bytes_of(v: &Value) -> Vec<u8> {
        let values = v.as_array().unwrap();
        values.iter().map(|b| b.as_u64().unwrap() as u8).collect()
    }

    #[track_caller]
    fn assert_too_large(result: Result<RgbImage, ImageError>) {
        assert!(matches!(result, Err(ImageError::TooLarge(_))), "{result:?}");
    }

    #[track_caller]
    fn assert_undecodable(result: Result<RgbImage, ImageError>) {
        assert!(
            matches!(result, Err(ImageError::Undecodable(_))),
            "{result:?}"
        );
    }

    /// A case's processor: a config file in the fixture directory or an inline config.
    fn processor(case: &Value) -> ClipPreprocess {
        let text = match &case["config"] {
            Value::String(file) => String::from_utf8(fixture_bytes(file)).unwrap(),
            inline => inline.to_string(),
        };
        ClipPreprocess {
            pad_to_square: case["pad_to_square"].as_bool().unwrap(),
            ..ClipPreprocess::from_hf_json(&text).unwrap()
        }
    }

    #[test]
    fn resize_bicubic_matches_pil_bit_exactly() {
        for case in expected()["resize"].as_array().unwrap() {
            let image = fixture_image(as_str(&case["file"]));
            let (width, height) = (as_u32(&case["width"]), as_u32(&case["height"]));
            let resized = resize_bicubic(&image, width, height);
            assert_eq!(resized.dimensions(), (width, height));
            assert!(
                resized.as_raw() == &bytes_of(&case["pixels"]),
                "{} -> {width}x{height} differs from PIL",
                case["file"]
            );
        }
    }

    #[test]
    fn pixel_values_match_transformers() {
        let mut worst = 0.0f32;
        for case in expected()["cases"].as_array().unwrap() {
            let pixels = processor(case).pixel_values(&fixture_image(as_str(&case["file"])));
            let reference = case["pixel_values"].as_array().unwrap();
            let shape: usize = case["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .product();
            assert_eq!(
                (pixels.len(), reference.len()),
                (shape, shape),
                "{}",
                case["name"]
            );
            let diff = pixels
                .iter()
                .zip(reference)
                .map(|(&ours, theirs)| (ours - theirs.as_f64().unwrap() as f32).abs())
                .fold(0.0, f32::max);
            eprintln!("{}: max |difference| {diff:e}", case["name"]);
            assert!(diff <= 1e-5, "{}: max difference {diff}", case["name"]);
            worst = worst.max(diff);
        }
        eprintln!("all cases: max |difference| {worst:e}");
    }

    #[test]
    fn transparency_is_composited_on_white_like_pil() {
        for case in expected()["convert_to_rgb"].as_array().unwrap() {
            let image = fixture_image(as_str(&case["file"]));
            let size = (as_u32(&case["width"]), as_u32(&case["height"]));
            assert_eq!(image.dimensions(), size, "{}", case["file"]);
            assert!(
                image.as_raw() == &bytes_of(&case["pixels"]),
                "{} differs from PIL",
                case["file"]
            );
        }
    }

    #[test]
    fn decodes_jpeg_webp_and_gif() {
        for case in expected()["dimensions"].as_array().unwrap() {
            let image = fixture_image(as_str(&case["file"]));
            let size = (as_u32(&case["width"]), as_u32(&case["height"]));
            assert_eq!(image.dimensions(), size, "{}", case["file"]);
        }
    }

    #[test]
    fn refuses_garbage_and_truncated_images() {
        assert_undecodable(decode_image(b"GIF87 is not how this starts", &LIMITS));
        assert_undecodable(decode_image(&fixture_bytes("noise.png")[..2000], &LIMITS));
        assert_undecodable(decode_image(&[], &LIMITS));
    }

    #[test]
    fn refuses_a_huge_header_before_decoding() {
        // A valid PNG header saying 100000x100000 (30 GB of RGB) over 1 KiB of data.
        let bomb = fixture_bytes("bomb_header.png");
        let roomy = ImageLimits {
            max_side: u32::MAX,
            ..LIMITS
        };
        for limits in [LIMITS, roomy] {
            let started = Instant::now();
            let refused = decode_image(&bomb, &limits);
            assert!(started.elapsed() < Duration::from_secs(1));
            assert!(
                matches!(&refused, Err(ImageError::TooLarge(why)) if why.contains("100000x100000")),
                "{refused:?}"
            );
        }
    }

    #[test]
    fn refuses_more_bytes_than_allowed() {
        let bytes = fixture_bytes("gradient.png");
        let limits = ImageLimits {
            max_bytes: bytes.len() - 1,
            ..LIMITS
        };
        assert_too_large(decode_image(&bytes, &limits));
        let exact = ImageLimits {
            max_bytes: bytes.len(),
            ..LIMITS
        };
        assert!(decode_image(&bytes, &exact).is_ok());
    }

    #[test]
    fn refuses_a_zero_sized_image() {
        // PNG, JPEG and WebP headers cannot say 0; a GIF's logical screen can.
        let refused = decode_image(&fixture_bytes("empty.gif"), &LIMITS);
        assert_eq!(refused, Err(ImageError::Empty));
    }

    #[test]
    fn decodes_up_to_the_limits_and_no_further() {
        // 16-bit RGBA: the widest pixels the decoders produce, against the tightest limits.
        let (width, height) = (300u32, 200u32);
        let raw: Vec<u8> = (0..width * height * 8).map(|i| (i % 251) as u8).collect();
        let mut png = Vec::new();
        PngEncoder::new(&mut png)
            .write_image(&raw, width, height, ExtendedColorType::Rgba16)
            .unwrap();
        let exact = ImageLimits {
            max_bytes: png.len(),
            max_pixels: u64::from(width * height),
            max_side: width,
        };
        assert_eq!(
            decode_image(&png, &exact).unwrap().dimensions(),
            (width, height)
        );
        for tighter in [
            ImageLimits {
                max_pixels: exact.max_pixels - 1,
                ..exact
            },
            ImageLimits {
                max_side: width - 1,
                ..exact
            },
        ] {
            assert_too_large(decode_image(&png, &tighter));
        }
    }

    #[test]
    fn keeps_the_high_byte_of_16_bit_colour_like_pil() {
        // Samples where truncating and rounding differ (0x12ff: PIL 0x12, rounding 0x13).
        let samples: [u16; 6] = [0x12ff, 0x8080, 0xfe01, 0x00ff, 0x0180, 0xffff];
        let raw: Vec<u8> = samples.iter().flat_map(|v| v.to_ne_bytes()).collect();
        let mut png = Vec::new();
        PngEncoder::new(&mut png)
            .write_image(&raw, 2, 1, ExtendedColorType::Rgb16)
            .unwrap();
        let image = decode_image(&png, &LIMITS).unwrap();
        assert_eq!(image.as_raw(), &[0x12, 0x80, 0xfe, 0x00, 0x01, 0xff]);
    }

    #[test]
    fn reads_hf_configs() {
        let tiny = ClipPreprocess::from_hf_json(
            std::str::from_utf8(&fixture_bytes("preprocessor_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            tiny,
            ClipPreprocess {
                shortest_edge: 56,
                crop_height: 56,
                crop_width: 56,
                ..ClipPreprocess::clip_336()
            }
        );
        let ints =
            ClipPreprocess::from_hf_json(r#"{"size": 224, "crop_size": 200, "image_std": null}"#)
                .unwrap();
        assert_eq!(
            (ints.shortest_edge, ints.crop_height, ints.crop_width),
            (224, 200, 200)
        );
        assert_eq!(ints.std, ClipPreprocess::clip_336().std);
        assert_eq!(
            ClipPreprocess::from_hf_json("{}").unwrap(),
            ClipPreprocess::clip_336()
        );
        for refused in [
            r#"{"size": {"height": 384, "width": 384}}"#,
            r#"{"resample": 2}"#,
            r#"{"image_mean": [0.5, 0.5]}"#,
            r#"{"crop_size": 0}"#,
            "not json",
        ] {
            assert!(ClipPreprocess::from_hf_json(refused).is_err(), "{refused}");
        }
    }

    #[test]
    fn expand_to_square_centres_the_image() {
        let wide = RgbImage::from_fn(4, 1, |x, _| Rgb([x as u8; 3]));
        let square = expand_to_square(&wide, [9, 9, 9]);
        assert_eq!(square.dimensions(), (4, 4));
        assert_eq!(square.get_pixel(2, 1), &Rgb([2; 3]));
        assert_eq!(square.get_pixel(2, 0), &Rgb([9; 3]));
        let tall = RgbImage::from_pixel(1, 4, Rgb([1; 3]));
        let square = expand_to_square(&tall, [9, 9, 9]);
        assert_eq!(
            (square.get_pixel(1, 3), square.get_pixel(0, 3)),
            (&Rgb([1; 3]), &Rgb([9; 3]))
        );
    }

    #[test]
    fn error_messages_say_what_went_wrong() {
        let empty = ImageError::Empty.to_string();
        assert!(empty.contains("empty"), "{empty}");
        let big = ImageError::TooLarge("5000x5000".into()).to_string();
        assert!(
            big.contains("too large") && big.contains("5000x5000"),
            "{big}"
        );
    }
}
