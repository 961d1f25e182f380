//! LLaVA against HF transformers on the tiny generated VLM (fixtures/llava_tiny.json, made by
//! fixtures/make_llava_fixture.py), and the generator's determinism.

use attune_models::vision::tiny_llava::{self, Shape};
use attune_models::vision::{decode_image, llava, ImageEncoder, ImageLimits};
use attune_models::{DecoderInput, LogitsFor, Model, ModelSource, SequenceStep};
use candle_core::{Device, Tensor};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::path::Path;

#[derive(Deserialize)]
struct Fixture {
    weights_sha256: String,
    prompt: String,
    prompt_ids: Vec<u32>,
    expanded_ids: Vec<u32>,
    pixel_values: Vec<f32>,
    vision_features: Vec<f32>,
    image_features: Vec<f32>,
    logits: Vec<Vec<f32>>,
}

fn fixtures() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))
}

fn fixture() -> Fixture {
    let text = std::fs::read_to_string(fixtures().join("llava_tiny.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn noise_image() -> image::RgbImage {
    let bytes = std::fs::read(fixtures().join("clip_preprocess/noise.png")).unwrap();
    let limits = ImageLimits {
        max_bytes: 1 << 20,
        max_pixels: 1 << 20,
        max_side: 4096,
    };
    decode_image(&bytes, &limits).unwrap()
}

#[test]
fn generator_is_deterministic() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    tiny_llava::write(a.path(), 0, &Shape::TINY).unwrap();
    tiny_llava::write(b.path(), 0, &Shape::TINY).unwrap();
    tiny_llava::write(c.path(), 1, &Shape::TINY).unwrap();
    for entry in std::fs::read_dir(a.path()).unwrap() {
        let name = entry.unwrap().file_name();
        let read = |d: &Path| std::fs::read(d.join(&name)).unwrap();
        assert_eq!(
            read(a.path()),
            read(b.path()),
            "{name:?} differs for one seed"
        );
    }
    let weights = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert_ne!(weights(a.path()), weights(c.path()));
}

#[test]
fn tiny_llava_matches_transformers() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    tiny_llava::write(dir.path(), 0, &Shape::TINY).unwrap();
    let weights = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    assert_eq!(
        format!("{:x}", Sha256::digest(&weights)),
        fx.weights_sha256,
        "the generator no longer writes the model the fixture was made from"
    );
    let dev = Device::Cpu;
    let model = Model::load(&ModelSource::HfDir(dir.path().to_path_buf()), &dev).unwrap();
    let vision = model
        .vision
        .as_ref()
        .expect("a LLaVA directory loads as a VLM");

    // Tokenizer and image-token expansion.
    let ids = model.tokenizer.encode(&fx.prompt, true).unwrap();
    assert_eq!(ids, fx.prompt_ids);
    let expanded = vision.expand_image_tokens(&ids);
    assert_eq!(expanded, fx.expanded_ids);
    assert_eq!(vision.image_spans(&expanded).len(), 1);

    // Processor and vision tower, within 1e-4.
    let encoder = llava::load_encoder(dir.path(), &dev).unwrap();
    let pixels = encoder.pixel_values(&noise_image()).unwrap();
    let d = max_diff(&flat(&pixels), &fx.pixel_values);
    assert!(d < 1e-4, "pixel values differ by {d}");
    let batch = pixels.unsqueeze(0).unwrap();
    let d = max_diff(
        &flat(&encoder.vision_features(&batch).unwrap()),
        &fx.vision_features,
    );
    assert!(d < 1e-4, "vision features differ by {d}");
    let features = vision.encode(&[pixels], &dev).unwrap();
    let d = max_diff(&flat(&features), &fx.image_features);
    assert!(d < 1e-4, "projected features differ by {d}");

    // One LLaVA forward: every position's logits.
    let embeddings = vision.merge(&model.decoder, &expanded, &features).unwrap();
    let mut cache = model.decoder.new_cache();
    let mut step = [
        SequenceStep::new(DecoderInput::Embeddings(embeddings), &mut cache)
            .with_logits(LogitsFor::All),
    ];
    let logits = model.decoder.forward(&mut step).unwrap().remove(0).unwrap();
    let rows = logits.to_vec2::<f32>().unwrap();
    assert_eq!(rows.len(), fx.logits.len());
    let d = rows
        .iter()
        .zip(&fx.logits)
        .map(|(a, b)| max_diff(a, b))
        .fold(0.0, f32::max);
    assert!(d < 1e-4, "logits differ by {d}");
}
