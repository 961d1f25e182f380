//! Tokenizers: `tokenizer.json` when the model has one, otherwise built from GGUF metadata.

use crate::gguf::GgufFile;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeSet;
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// Names of control tokens that end a turn or a document in common chat models.
const END_OF_GENERATION: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "</s>",
    "<end_of_turn>",
];

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
    stop_ids: BTreeSet<u32>,
}

impl TextTokenizer {
    /// Loads `tokenizer.json`; special-token roles come from the files beside it
    /// (`tokenizer_config.json`, `generation_config.json`) when present.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = Tokenizer::from_file(&path)
            .map_err(|e| anyhow!("cannot load {}: {e}", path.display()))?;
        let config = read_json(&dir.join("tokenizer_config.json"))?;
        let token_id = |field: &str| -> Option<u32> {
            let value = config.as_ref()?.get(field)?;
            let text = value.as_str().or_else(|| value.get("content")?.as_str())?;
            inner.token_to_id(text)
        };
        let bos = token_id("bos_token");
        let eos = token_id("eos_token");
        let mut stop_ids: BTreeSet<u32> = eos.into_iter().collect();
        if let Some(gen) = read_json(&dir.join("generation_config.json"))? {
            match &gen["eos_token_id"] {
                serde_json::Value::Number(n) => stop_ids.extend(n.as_u64().map(|n| n as u32)),
                serde_json::Value::Array(ids) => {
                    stop_ids.extend(ids.iter().filter_map(|n| n.as_u64()).map(|n| n as u32))
                }
                _ => {}
            }
        }
        let added = inner.get_added_tokens_decoder();
        stop_ids.extend(
            added
                .iter()
                .filter(|(_, t)| t.special && END_OF_GENERATION.contains(&t.content.as_str()))
                .map(|(id, _)| *id),
        );
        Ok(Self {
            inner,
            bos,
            eos,
            stop_ids,
        })
    }

    /// Builds a byte-level BPE tokenizer from `tokenizer.ggml.*` metadata.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let model = gguf.metadata_str("tokenizer.ggml.model").unwrap_or("");
        if model != "gpt2" {
            bail!(
                "GGUF tokenizer model `{model}` cannot be rebuilt from metadata (only byte-level \
                 BPE, `gpt2`, is supported); put a tokenizer.json next to {}",
                gguf.path.display()
            );
        }
        let tokens = string_array(gguf, "tokenizer.ggml.tokens")?;
        let merges = string_array(gguf, "tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| anyhow!("malformed BPE merge `{m}` in GGUF metadata"))
            })
            .collect::<Result<Vec<_>>>()?;
        let types: Vec<i32> = match gguf.metadata("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()?
                .iter()
                .map(|t| t.to_i32())
                .collect::<candle_core::Result<_>>()?,
            None => vec![1; tokens.len()],
        };
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| anyhow!("cannot build BPE from GGUF metadata: {e}"))?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer(
            gguf.metadata_str("tokenizer.ggml.pre").unwrap_or("default"),
        )?));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let added = |kind: i32, special: bool| -> Vec<AddedToken> {
            tokens
                .iter()
                .zip(&types)
                .filter(|(_, &t)| t == kind)
                .map(|(text, _)| AddedToken::from(text.clone(), special))
                .collect()
        };
        inner
            .add_special_tokens(added(TOKEN_TYPE_CONTROL, true))
            .map_err(|e| anyhow!("cannot add GGUF control tokens: {e}"))?;
        inner
            .add_tokens(added(TOKEN_TYPE_USER_DEFINED, false))
            .map_err(|e| anyhow!("cannot add GGUF user tokens: {e}"))?;

        let id = |key: &str| gguf.metadata(key).and_then(|v| v.to_u32().ok());
        let bos = id("tokenizer.ggml.bos_token_id");
        let eos = id("tokenizer.ggml.eos_token_id");
        let add_bos = gguf
            .metadata("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        if let (true, Some(bos)) = (add_bos, bos) {
            let text = &tokens[bos as usize];
            let template = TemplateProcessing::builder()
                .try_single(format!("{text} $A"))
                .and_then(|b| b.try_pair(format!("{text} $A {text} $B")))
                .map_err(|e| anyhow!("BOS template: {e}"))?
                .special_tokens(vec![(text.clone(), bos)])
                .build()
                .map_err(|e| anyhow!("BOS template: {e}"))?;
            inner.with_post_processor(Some(template));
        }
        let mut stop_ids: BTreeSet<u32> = eos.into_iter().collect();
        stop_ids.extend(id("tokenizer.ggml.eot_token_id"));
        stop_ids.extend(id("tokenizer.ggml.eom_token_id"));
        stop_ids.extend(
            tokens
                .iter()
                .zip(&types)
                .enumerate()
                .filter_map(|(i, (t, &k))| {
                    (k == TOKEN_TYPE_CONTROL && END_OF_GENERATION.contains(&t.as_str()))
                        .then_some(i as u32)
                }),
        );
        Ok(Self {
            inner,
            bos,
            eos,
            stop_ids,
        })
    }

    /// Token ids of `text`. Special tokens written in the text (e.g. `<|im_start|>`) map to their
    /// ids. `add_special` adds what the model adds around a plain prompt (e.g. BOS).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| anyhow!("tokenization failed: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| anyhow!("detokenization failed: {e}"))
    }

    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.inner.token_to_id(text)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Whether both tokenizers map every id to the same token (so one's ids mean the same to
    /// a model of the other, as contrastive decoding with an amateur model needs).
    pub fn same_vocabulary(&self, other: &TextTokenizer) -> bool {
        let size = self.vocab_size();
        size == other.vocab_size()
            && (0..size as u32).all(|id| self.inner.id_to_token(id) == other.inner.id_to_token(id))
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Tokens that end generation (EOS, end-of-turn and end-of-text tokens).
    pub fn stop_ids(&self) -> &BTreeSet<u32> {
        &self.stop_ids
    }

    /// Whether `id` is a special (control) token, which is not printed.
    pub fn is_special(&self, id: u32) -> bool {
        self.inner
            .get_added_tokens_decoder()
            .get(&id)
            .is_some_and(|t| t.special)
    }

    /// The raw bytes a token stands for: byte-level BPE symbols mapped back to bytes, special
    /// tokens as written; a token may be part of a UTF-8 character.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(text) = self.inner.id_to_token(id) else {
            return Vec::new();
        };
        if self.is_special(id) {
            return text.into_bytes();
        }
        let table = byte_level_table();
        text.chars()
            .map(|c| table.get(&c).copied())
            .collect::<Option<Vec<u8>>>()
            .unwrap_or_else(|| self.decode(&[id], false).unwrap_or_default().into_bytes())
    }

    /// The tokenizer as `tokenizer.json` text.
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(true)
            .map_err(|e| anyhow!("cannot serialize tokenizer: {e}"))
    }
}

/// GPT-2's byte-level alphabet, inverted: printable bytes stand for themselves, the others
/// were shifted to code points from 256 on.
fn byte_level_table() -> &'static std::collections::HashMap<char, u8> {
    static TABLE: std::sync::OnceLock<std::collections::HashMap<char, u8>> =
        std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let printable = |b: u32| {
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b)
        };
        let mut shifted = 256;
        (0u32..256)
            .map(|b| {
                let c = if printable(b) {
                    b
                } else {
                    shifted += 1;
                    shifted - 1
                };
                (char::from_u32(c).expect("valid code point"), b as u8)
            })
            .collect()
    })
}

fn pre_tokenizer(pre: &str) -> Result<Sequence> {
    let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(
            SplitPattern::Regex(pattern.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| anyhow!("bad split regex: {e}"))?;
        Ok(split.into())
    };
    let parts: Vec<PreTokenizerWrapper> = match pre {
        // SmolLM/StarCoder: each digit alone, then GPT-2's byte-level split, no prefix space.
        "smollm" | "starcoder" | "refact" => vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ],
        "llama3" | "llama-bpe" => vec![
            split(LLAMA3_SPLIT)?,
            ByteLevel::new(false, true, false).into(),
        ],
        "qwen2" => vec![
            split(QWEN2_SPLIT)?,
            ByteLevel::new(false, true, false).into(),
        ],
        "default" | "gpt2" | "gpt-2" => vec![ByteLevel::new(false, true, true).into()],
        other => bail!(
            "GGUF pre-tokenizer `{other}` is not supported (supported: smollm, starcoder, \
             llama-bpe, qwen2, gpt2); put a tokenizer.json next to the model"
        ),
    };
    Ok(Sequence::new(parts))
}

fn string_array(gguf: &GgufFile, key: &str) -> Result<Vec<String>> {
    gguf.metadata(key)
        .with_context(|| format!("GGUF has no {key}"))?
        .to_vec()?
        .iter()
        .map(|v| Ok(v.to_string()?.clone()))
        .collect()
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)?;
    serde_json::from_str(&text)
        .map(Some)
        .with_context(|| format!("invalid JSON in {}", path.display()))
}

/// Turns a growing list of token ids into text pieces without ever emitting half a UTF-8
/// character: a piece is released only once its bytes decode cleanly.
#[derive(Debug, Clone, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    /// Start of the window that is re-decoded for context (leading spaces depend on it).
    prefix_offset: usize,
    /// End of what has already been emitted.
    read_offset: usize,
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token; returns the text it completes, if any.
    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let (prefix, full) = self.window(tokenizer)?;
        if full.len() <= prefix.len() || full.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(Some(new_suffix(&prefix, &full)))
    }

    /// Whatever is still held back at the end of the stream (e.g. an unfinished character).
    pub fn finish(&mut self, tokenizer: &TextTokenizer) -> Result<Option<String>> {
        let (prefix, full) = self.window(tokenizer)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok((full.len() > prefix.len()).then(|| new_suffix(&prefix, &full)))
    }

    /// The decoded context window without and with the tokens not yet emitted.
    fn window(&self, tokenizer: &TextTokenizer) -> Result<(String, String)> {
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], true)?;
        Ok((prefix, full))
    }
}

/// The part of `full` after `prefix`; all of `full` if decoding the longer window changed the
/// prefix itself (never slices inside a character).
fn new_suffix(prefix: &str, full: &str) -> String {
    full.strip_prefix(prefix).unwrap_or(full).to_string()
}
