//! GGUF loading in every weight format we serve: a seeded dense model is written as GGUF with
//! its matrices quantized to each format, loaded back through our GGUF path, and compared with
//! the dense original. Layout or dequantization bugs show as errors near 100%; quantization
//! noise stays within the per-format bound.

use attune_models::arch::RopeLayout;
use attune_models::convert::gguf_to_hf_dir;
use attune_models::gguf::GgufFile;
use attune_models::linear::{Linear, Weight};
use attune_models::safetensors::load_decoder;
use attune_models::testing::{random_decoder, tiny_config};
use attune_models::{Decoder, DecoderConfig, WeightName};
use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Tensor};

/// Dimensions that K-quants accept (rows of 256 values).
fn config() -> DecoderConfig {
    DecoderConfig {
        hidden_size: 256,
        intermediate_size: 512,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
        vocab_size: 64,
        rope_layout: RopeLayout::Interleaved,
        ..tiny_config()
    }
}

fn dense(linear: &Linear) -> Tensor {
    match linear.weight() {
        Weight::Candle(QMatMul::Tensor(t)) => t.clone(),
        other => panic!("expected a dense weight, got {other:?}"),
    }
}

fn write_gguf(model: &Decoder, matrices: GgmlDType, path: &std::path::Path) {
    let cfg = model.config();
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut put = |name: WeightName, t: &Tensor, dtype: GgmlDType| {
        tensors.push((name.gguf(), QTensor::quantize(t, dtype).unwrap()));
    };
    put(
        WeightName::Embedding,
        &model.embedding_table().unwrap(),
        matrices,
    );
    put(WeightName::FinalNorm, model.final_norm(), GgmlDType::F32);
    for (l, layer) in model.layers().iter().enumerate() {
        put(WeightName::AttnNorm(l), &layer.attn_norm, GgmlDType::F32);
        put(WeightName::FfnNorm(l), &layer.ffn_norm, GgmlDType::F32);
        for (name, linear) in [
            (WeightName::Q(l), &layer.q),
            (WeightName::K(l), &layer.k),
            (WeightName::V(l), &layer.v),
            (WeightName::O(l), &layer.o),
            (WeightName::Gate(l), &layer.gate),
            (WeightName::Up(l), &layer.up),
            (WeightName::Down(l), &layer.down),
        ] {
            put(name, &dense(linear), matrices);
        }
    }
    use gguf_file::Value;
    let u32v = |v: usize| Value::U32(v as u32);
    let metadata = [
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", u32v(cfg.hidden_size)),
        ("llama.feed_forward_length", u32v(cfg.intermediate_size)),
        ("llama.block_count", u32v(cfg.num_layers)),
        ("llama.attention.head_count", u32v(cfg.num_heads)),
        ("llama.attention.head_count_kv", u32v(cfg.num_kv_heads)),
        ("llama.context_length", u32v(cfg.max_position_embeddings)),
        ("llama.rope.freq_base", Value::F32(cfg.rope_theta)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        // A minimal byte-level vocabulary (one merge) so that the converter can write a tokenizer.
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", Value::Array(vocab(cfg.vocab_size))),
        (
            "tokenizer.ggml.merges",
            Value::Array(vec![Value::String("! \"".into())]),
        ),
    ];
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &metadata, &tensors).unwrap();
}

fn vocab(size: usize) -> Vec<gguf_file::Value> {
    let mut tokens = vec!["!\"".to_string()];
    tokens.extend((33u8..).take(size - 1).map(|b| (b as char).to_string()));
    tokens.into_iter().map(gguf_file::Value::String).collect()
}

/// max |logit difference| relative to the largest reference logit, over a short generation.
fn relative_error(reference: &Decoder, loaded: &Decoder) -> f32 {
    let (mut a, mut b) = (reference.new_cache(), loaded.new_cache());
    let mut worst = 0f32;
    for tokens in [&[1u32, 7, 19, 33, 2][..], &[40], &[41], &[63]] {
        let want: Vec<f32> = reference
            .forward_one(tokens, &mut a, None)
            .unwrap()
            .to_vec1()
            .unwrap();
        let got: Vec<f32> = loaded
            .forward_one(tokens, &mut b, None)
            .unwrap()
            .to_vec1()
            .unwrap();
        let scale = want.iter().map(|v| v.abs()).fold(0.0, f32::max);
        let diff = want
            .iter()
            .zip(&got)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        worst = worst.max(diff / scale);
    }
    worst
}

/// Errors of the GGUF path in `dtype` against (the dense original, the same weights
/// dequantized by our converter and run densely through the safetensors path).
fn errors(dtype: GgmlDType) -> (f32, f32) {
    let original = random_decoder(&config(), 21, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_gguf(&original, dtype, &path);
    let loaded = GgufFile::open(&path)
        .unwrap()
        .load_decoder(&Device::Cpu)
        .unwrap();
    assert_eq!(loaded.config().rope_layout, RopeLayout::Interleaved);
    let hf_dir = dir.path().join("hf");
    gguf_to_hf_dir(&path, &hf_dir).unwrap();
    let dequantized = load_decoder(&hf_dir, &Device::Cpu).unwrap();
    assert_eq!(dequantized.config().rope_layout, RopeLayout::Halves);
    (
        relative_error(&original, &loaded),
        relative_error(&dequantized, &loaded),
    )
}

#[test]
fn every_served_format_loads_and_computes_the_same_model() {
    // Against the original, quantizing the weights costs up to ~1/16 per matrix at 4 bits;
    // against the same weights dequantized, only the kernels' 8-bit activations differ. A
    // layout or dequantization bug gives errors near 1 in both.
    let cases = [
        (GgmlDType::F32, 1e-5, 1e-5),
        (GgmlDType::F16, 5e-3, 1e-5),
        (GgmlDType::Q8_0, 4e-2, 4e-2),
        (GgmlDType::Q6K, 8e-2, 4e-2),
        (GgmlDType::Q4K, 0.25, 4e-2),
        (GgmlDType::Q5_0, 0.15, 4e-2),
        (GgmlDType::Q4_1, 0.25, 4e-2),
        (GgmlDType::Q4_0, 0.25, 4e-2),
    ];
    for (dtype, vs_original, vs_dequantized) in cases {
        let (a, b) = errors(dtype);
        println!("{dtype:?}: relative logit error {a:.2e} vs the original, {b:.2e} vs dequantized");
        assert!(
            a < vs_original,
            "{dtype:?}: {a} vs the original exceeds {vs_original}"
        );
        assert!(
            b < vs_dequantized,
            "{dtype:?}: {b} vs dequantized exceeds {vs_dequantized}"
        );
    }
}

/// A seeded random f32 model and its Q4_1 GGUF copy, loaded (on our quantized kernels).
fn q4_1_copy(seed: u64) -> (Decoder, Decoder) {
    let original = random_decoder(&config(), seed, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_gguf(&original, GgmlDType::Q4_1, &path);
    let model = GgufFile::open(&path)
        .unwrap()
        .load_decoder(&Device::Cpu)
        .unwrap();
    (original, model)
}

/// A model on our quantized kernels keeps its KV cache in f16; its attention paths read the
/// same f16 values with the same arithmetic: the one-pass batch path, the per-sequence path (a
/// hook on queries sends each layer there) and a prompt fed whole or token by token all give
/// the same logits.
#[test]
fn quantized_models_cache_f16_and_every_attention_path_agrees() {
    use attune_models::{AttentionSite, HookPoint, SequenceHooks};
    use candle_core::DType;
    struct SeeQueries;
    impl SequenceHooks for SeeQueries {
        fn wants(&self, point: HookPoint, _: usize) -> bool {
            point == HookPoint::Queries
        }
        fn queries(&mut self, _: &AttentionSite, _: &Tensor) -> candle_core::Result<()> {
            Ok(())
        }
    }
    let (original, model) = q4_1_copy(21);
    assert_eq!(model.kv_storage(), DType::F16);
    assert_eq!(original.kv_storage(), DType::F32);
    let prompt = [1u32, 7, 19, 33, 2, 40, 41];
    let run = |pieces: &[&[u32]], hooks: bool| -> Vec<f32> {
        let mut cache = model.new_cache();
        let mut see = SeeQueries;
        let mut last = Vec::new();
        for piece in pieces {
            let hooks = hooks.then_some(&mut see as &mut dyn SequenceHooks);
            last = model
                .forward_one(piece, &mut cache, hooks)
                .unwrap()
                .to_vec1()
                .unwrap();
        }
        last
    };
    let whole = run(&[&prompt, &[63], &[5]], false);
    let one_by_one: Vec<&[u32]> = prompt.chunks(1).chain([&[63u32][..], &[5]]).collect();
    assert_eq!(whole, run(&one_by_one, false));
    assert_eq!(whole, run(&[&prompt, &[63], &[5]], true));
}

/// A prompt's cached prefix, copied into a new cache, continues exactly as the prompt fed
/// whole (what the server's prefix cache relies on): same logits at the prompt's end and after.
#[test]
fn a_copied_cache_prefix_continues_as_the_whole_prompt() {
    let (_, model) = q4_1_copy(22);
    let prompt = [1u32, 7, 19, 33, 2, 40, 41, 12, 9];
    let logits = |cache: &mut attune_models::KvCache, tokens: &[u32]| -> Vec<f32> {
        model
            .forward_one(tokens, cache, None)
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let mut cold = model.new_cache();
    let cold_logits = [
        logits(&mut cold, &prompt),
        logits(&mut cold, &[63]),
        logits(&mut cold, &[5]),
    ];
    for reused in [1, 5, 8] {
        let mut warm = cold.prefix(reused).unwrap();
        assert_eq!(warm.len(), reused);
        let warm_logits = [
            logits(&mut warm, &prompt[reused..]),
            logits(&mut warm, &[63]),
            logits(&mut warm, &[5]),
        ];
        assert_eq!(cold_logits, warm_logits, "{reused} positions reused");
    }
    assert!(cold.prefix(cold.len() + 1).is_err());
}
