//! The default model against HF transformers (fixtures from `fixtures/make_hf_fixtures.py`):
//! tokenizer ids, chat template rendering, next-token log-probabilities and greedy text.

use attune_models::gguf::GgufFile;
use attune_models::testing::{converted_default_model, default_model_path};
use attune_models::{Model, ModelSource, TextTokenizer};
use candle_core::{Device, Tensor, D};
use serde::Deserialize;
use std::sync::OnceLock;

#[derive(Deserialize)]
struct Reference {
    chats: Vec<Chat>,
    tokenized: Vec<Tokenized>,
}

#[derive(Deserialize)]
struct Chat {
    messages: Vec<serde_json::Value>,
    prompt_ids: Vec<u32>,
    top_ids: Vec<u32>,
    top_logprobs: Vec<f32>,
    greedy_ids: Vec<u32>,
    greedy_text: String,
}

#[derive(Deserialize)]
struct Tokenized {
    text: String,
    ids: Vec<u32>,
}

fn reference() -> &'static Reference {
    static R: OnceLock<Reference> = OnceLock::new();
    R.get_or_init(|| {
        let text = include_str!("fixtures/hf_reference.json");
        serde_json::from_str(text).unwrap()
    })
}

fn gguf_model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| Model::load(&ModelSource::Gguf(default_model_path()), &Device::Cpu).unwrap())
}

/// The default model converted by our converter and loaded from safetensors.
fn converted_model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| {
        Model::load(&ModelSource::HfDir(converted_default_model()), &Device::Cpu).unwrap()
    })
}

fn log_softmax(logits: &Tensor) -> Vec<f32> {
    candle_nn::ops::log_softmax(logits, D::Minus1)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0 as u32
}

fn greedy(model: &Model, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let mut cache = model.decoder.new_cache();
    let mut logits = model.decoder.forward_one(prompt, &mut cache, None).unwrap();
    let mut out = Vec::new();
    for _ in 0..max_tokens {
        let next = argmax(&logits.to_vec1::<f32>().unwrap());
        out.push(next);
        if model.tokenizer.stop_ids().contains(&next) {
            break;
        }
        logits = model
            .decoder
            .forward_one(&[next], &mut cache, None)
            .unwrap();
    }
    out
}

/// HF's generate keeps the stop token in its output; so do we.
fn assert_same_greedy(model: &Model, chat: &Chat) {
    let ours = greedy(model, &chat.prompt_ids, chat.greedy_ids.len());
    assert_eq!(
        ours,
        chat.greedy_ids,
        "greedy continuation differs for {:?}: ours {:?}",
        chat.messages,
        model.tokenizer.decode(&ours, true).unwrap()
    );
}

#[test]
fn gguf_tokenizer_matches_transformers_on_varied_text() {
    let tok = &gguf_model().tokenizer;
    for case in &reference().tokenized {
        assert_eq!(
            tok.encode(&case.text, false).unwrap(),
            case.ids,
            "text {:?}",
            case.text
        );
    }
}

#[test]
fn chat_template_renders_like_transformers() {
    let model = gguf_model();
    for chat in &reference().chats {
        assert_eq!(model.chat_prompt(&chat.messages).unwrap(), chat.prompt_ids);
    }
}

#[test]
fn gguf_and_written_tokenizer_json_give_the_same_ids() {
    let gguf = GgufFile::open(&default_model_path()).unwrap();
    let from_gguf = TextTokenizer::from_gguf(&gguf).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tokenizer.json"),
        from_gguf.to_json().unwrap(),
    )
    .unwrap();
    let from_json = TextTokenizer::from_hf_dir(dir.path()).unwrap();
    for case in &reference().tokenized {
        assert_eq!(
            from_json.encode(&case.text, false).unwrap(),
            from_gguf.encode(&case.text, false).unwrap()
        );
    }
    assert_eq!(from_gguf.stop_ids(), &[0u32, 2].into_iter().collect());
}

#[test]
fn converted_f32_model_matches_transformers_logprobs_and_greedy_text() {
    let model = converted_model();
    for (index, chat) in reference().chats.iter().enumerate() {
        let mut cache = model.decoder.new_cache();
        let logits = model
            .decoder
            .forward_one(&chat.prompt_ids, &mut cache, None)
            .unwrap();
        let logprobs = log_softmax(&logits);
        for (id, want) in chat.top_ids.iter().zip(&chat.top_logprobs) {
            let got = logprobs[*id as usize];
            assert!(
                (got - want).abs() < 1e-3,
                "token {id}: ours {got}, transformers {want} ({:?})",
                chat.messages
            );
        }
        // 48 greedy f32 tokens per chat take a while on CI's cores: the first six suffice.
        if index < GREEDY_CHATS {
            assert_same_greedy(model, chat);
        }
    }
}

/// Chats whose greedy continuation the converted f32 model must reproduce.
const GREEDY_CHATS: usize = 6;

#[test]
fn default_model_says_paris_in_f32() {
    let model = converted_model();
    let chat = &reference().chats[0];
    let ids = greedy(model, &model.chat_prompt(&chat.messages).unwrap(), 48);
    let text = model.tokenizer.decode(&ids, true).unwrap();
    assert_eq!(text, "The capital of France is Paris.");
    assert_eq!(text, chat.greedy_text);
}

/// Next-token log-probabilities of candle-transformers' `quantized_llama` on the same GGUF: a
/// peer implementation we did not write.
fn peer_logprobs(prompt: &[u32]) -> Vec<f32> {
    use candle_transformers::models::quantized_llama::ModelWeights;
    static PEER: OnceLock<std::sync::Mutex<ModelWeights>> = OnceLock::new();
    let mut peer = PEER
        .get_or_init(|| {
            let mut file = std::fs::File::open(default_model_path()).unwrap();
            let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
            std::sync::Mutex::new(
                ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap(),
            )
        })
        .lock()
        .unwrap();
    // Position 0 starts a fresh context (the peer drops its cache).
    let input = Tensor::new(prompt, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    log_softmax(&peer.forward(&input, 0).unwrap().squeeze(0).unwrap())
}

/// Agreement with the f32 reference: (top-1 matches where the reference is decisive, mean and
/// max |dlogprob| over its top 5).
fn agreement(logprobs: &[Vec<f32>]) -> (usize, f32, f32) {
    let mut top1 = 0;
    let mut gaps = Vec::new();
    for (chat, lp) in reference().chats.iter().zip(logprobs) {
        if is_decisive(chat) {
            top1 += usize::from(argmax(lp) == chat.top_ids[0]);
        }
        for (id, want) in chat.top_ids.iter().take(5).zip(&chat.top_logprobs) {
            gaps.push((lp[*id as usize] - want).abs());
        }
    }
    let mean = gaps.iter().sum::<f32>() / gaps.len() as f32;
    (top1, mean, gaps.iter().cloned().fold(0.0, f32::max))
}

/// Whether the reference's top-1 leads its runner-up by more than Q4_1 noise can move it (the
/// quantized paths differ from f32 by ~0.1 in mean logprob; near-ties flip either way).
fn is_decisive(chat: &Chat) -> bool {
    chat.top_logprobs[0] - chat.top_logprobs[1] > 0.5
}

/// Q4_1 weights move near-ties (see shared notes), so the GGUF path is held to the level of
/// agreement that other implementations reach on the same file, and the gap is printed.
#[test]
fn gguf_path_agrees_with_transformers_as_well_as_the_peer() {
    let model = gguf_model();
    let ours: Vec<Vec<f32>> = reference()
        .chats
        .iter()
        .map(|chat| {
            let mut cache = model.decoder.new_cache();
            log_softmax(
                &model
                    .decoder
                    .forward_one(&chat.prompt_ids, &mut cache, None)
                    .unwrap(),
            )
        })
        .collect();
    let peer: Vec<Vec<f32>> = reference()
        .chats
        .iter()
        .map(|c| peer_logprobs(&c.prompt_ids))
        .collect();
    let decisive = reference().chats.iter().filter(|c| is_decisive(c)).count();
    assert!(decisive >= 2, "the fixture needs decisive chats");
    let (our_top1, our_mean, our_max) = agreement(&ours);
    let (peer_top1, peer_mean, peer_max) = agreement(&peer);
    println!("GGUF vs transformers f32: attune top-1 {our_top1}/{decisive} decisive chats, mean |dlogprob| (top 5) {our_mean:.3}, max {our_max:.3}");
    println!("GGUF vs transformers f32: quantized_llama top-1 {peer_top1}/{decisive}, mean {peer_mean:.3}, max {peer_max:.3}");
    assert_eq!(our_top1, decisive, "a decisive top-1 moved");
    assert!(
        our_mean <= peer_mean * 1.25 + 0.01,
        "mean gap {our_mean} vs peer {peer_mean}"
    );
    // The largest single gap is held to the peer's the same way (over the first six chats,
    // llama.cpp on this file reaches 0.41; over all 24 the peer reaches 0.46).
    assert!(
        our_max <= peer_max * 1.25 + 0.01,
        "max gap {our_max} vs peer {peer_max}"
    );
    let peer_gap = ours
        .iter()
        .zip(&peer)
        .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
        .fold(0.0, f32::max);
    println!(
        "attune vs quantized_llama on the GGUF: max |dlogprob| over the vocabulary {peer_gap:.4}"
    );
}

#[test]
fn incremental_decoding_never_splits_a_character_and_adds_up_to_the_whole() {
    use attune_models::IncrementalDecoder;
    let tok = &gguf_model().tokenizer;
    for case in &reference().tokenized {
        let ids = tok.encode(&case.text, false).unwrap();
        let mut decoder = IncrementalDecoder::new();
        let mut text = String::new();
        for &id in &ids {
            if let Some(piece) = decoder.push(tok, id).unwrap() {
                assert!(!piece.contains('\u{FFFD}'), "half a character in {piece:?}");
                text.push_str(&piece);
            }
        }
        text.extend(decoder.finish(tok).unwrap());
        assert_eq!(text, tok.decode(&ids, true).unwrap(), "for {:?}", case.text);
    }
}

#[test]
fn token_bytes_concatenate_to_the_text() {
    let tok = &gguf_model().tokenizer;
    for case in &reference().tokenized {
        let ids = tok.encode(&case.text, false).unwrap();
        let bytes: Vec<u8> = ids.iter().flat_map(|&id| tok.token_bytes(id)).collect();
        assert_eq!(String::from_utf8(bytes).unwrap(), case.text);
    }
}
