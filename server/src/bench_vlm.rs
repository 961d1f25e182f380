//! `attune bench --vlm`: a vision-language model with each VLM intervention against none,
//! through the real server (started in this process): vision encode time, time to the first
//! token (image encoding, every extra pass and the prefill), decode tokens/s, and what extra
//! work each method does.

use crate::bench::median;
use crate::local_server;
use anyhow::{Context, Result};
use attune_config::AttuneConfig;
use attune_models::vision::RgbImage;
use attune_models::Model;
use base64::Engine as _;
use serde_json::{json, Value};
use std::io::Cursor;
use std::time::Instant;

/// The methods compared, with parameters that make them act, and the extra work each does.
const METHODS: &[(&str, &str, &str)] = &[
    ("none", "null", "-"),
    (
        "var (tau 2: sinks on a random model)",
        r#"{"type": "var", "tau": 2.0, "rho": 0.0, "image_mass": 0.0}"#,
        "none; explicit edits of rows after the image",
    ),
    (
        "vhr",
        r#"{"type": "vhr"}"#,
        "2 prefills at start (text-only + image, lockstep)",
    ),
    (
        "vista (vsv + sla)",
        r#"{"type": "vista"}"#,
        "2 prefills at start (with, without image); lm_head on 6 layers per step",
    ),
    (
        "contrastive_decoding image_noise (vcd)",
        r#"{"type": "contrastive_decoding", "mode": "image_noise"}"#,
        "a branch sequence with the noised image, same batch, every step",
    ),
    (
        "carve",
        r#"{"type": "carve"}"#,
        "2 greedy runs (<= 32 steps) at start; answer with 2 images",
    ),
];

pub struct VlmBenchConfig {
    pub runs: usize,
    pub max_tokens: usize,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    first_token_s: f64,
    decode_tok_s: f64,
    prompt_tokens: u64,
}

/// Benchmarks `model` (the first of `config`'s models, a VLM).
pub fn run(model: &Model, config: AttuneConfig, bench: &VlmBenchConfig) -> Result<()> {
    let vision = model
        .vision
        .as_ref()
        .context("--vlm needs a vision-language model (e.g. `attune models make-tiny-vlm`)")?;
    let image = test_image();
    let png = png_bytes(&image)?;
    let encode_ms = median(
        &(0..bench.runs.max(3))
            .map(|_| {
                let start = Instant::now();
                let pixels = vision.encoder.pixel_values(&image)?;
                vision.encode(&[pixels], model.decoder.device())?;
                Ok(start.elapsed().as_secs_f64() * 1e3)
            })
            .collect::<Result<Vec<f64>>>()?,
    );
    let model_id = config.models[0].id.clone();
    let base = local_server::start(config)?;
    local_server::wait_ready(&base, None)?;
    let url = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&png)
    );
    println!(
        "model: {} | image {}x{} PNG, {} image tokens | {} greedy tokens | median of {} runs",
        model.source.path().display(),
        image.width(),
        image.height(),
        vision.encoder.tokens_per_image(),
        bench.max_tokens,
        bench.runs
    );
    println!("vision encode (preprocess + tower + projector, one image): {encode_ms:.2} ms\n");
    println!("| method | extra work | prompt tokens | first token ms (encode, extra passes, prefill) | vs none | prompt tok/s to first token | decode tok/s | vs none |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    let mut baseline: Option<(f64, f64)> = None;
    for (name, spec, extra) in METHODS {
        let spec: Value = serde_json::from_str(spec)?;
        let interventions = if spec.is_null() {
            json!([])
        } else {
            json!([spec])
        };
        let samples = (0..bench.runs)
            .map(|_| one_request(&base, &model_id, &url, &interventions, bench.max_tokens))
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("method {name}"))?;
        let first = median(
            &samples
                .iter()
                .map(|s| s.first_token_s * 1e3)
                .collect::<Vec<_>>(),
        );
        let decode = median(&samples.iter().map(|s| s.decode_tok_s).collect::<Vec<_>>());
        let (base_first, base_decode) = *baseline.get_or_insert((first, decode));
        let prompt_tokens = samples[0].prompt_tokens;
        println!(
            "| {name} | {extra} | {prompt_tokens} | {first:.1} | {:.2}x | {:.1} | {decode:.1} | {:.2}x |",
            first / base_first,
            prompt_tokens as f64 / (first / 1e3),
            decode / base_decode
        );
    }
    Ok(())
}

/// A 640 x 480 test picture (smooth colour fields and a bright disc), the same every run.
fn test_image() -> RgbImage {
    RgbImage::from_fn(640, 480, |x, y| {
        let (dx, dy) = (x as f64 - 400.0, y as f64 - 200.0);
        let disc = dx * dx + dy * dy < 90.0 * 90.0;
        let v = |a: u32, b: u32| (a * 255 / b) as u8;
        if disc {
            image::Rgb([250, 240, 60])
        } else {
            image::Rgb([v(x, 640), v(y, 480), v(x + y, 1120)])
        }
    })
}

fn png_bytes(image: &RgbImage) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    image.write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png)?;
    Ok(bytes)
}

/// One streamed greedy request: time to its first token and its decode rate.
fn one_request(
    base: &str,
    model: &str,
    image_url: &str,
    interventions: &Value,
    max_tokens: usize,
) -> Result<Sample> {
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url}},
            {"type": "text", "text": "What is in the picture?"},
        ]}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "logprobs": true,
        "stream": true,
        "stream_options": {"include_usage": true},
        "interventions": interventions,
    });
    let start = Instant::now();
    let (mut first, mut last, mut tokens, mut prompt_tokens) = (None, 0.0, 0usize, 0);
    local_server::stream_chunks(base, "/v1/chat/completions", &body, |chunk| {
        // Every generated token comes with its log-probability, printable or not.
        let n = chunk["choices"][0]["logprobs"]["content"]
            .as_array()
            .map_or(0, Vec::len);
        if n > 0 {
            let now = start.elapsed().as_secs_f64();
            first.get_or_insert(now);
            last = now;
            tokens += n;
        }
        if let Some(p) = chunk["usage"]["prompt_tokens"].as_u64() {
            prompt_tokens = p;
        }
    })?;
    let first = first.context("no token was streamed")?;
    Ok(Sample {
        first_token_s: first,
        decode_tok_s: (tokens.saturating_sub(1)) as f64 / (last - first).max(1e-9),
        prompt_tokens,
    })
}
