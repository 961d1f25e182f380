//! Attune's model runtime: weights (GGUF, safetensors), tokenizers, chat templates, and a
//! Llama-family decoder with hook points for interventions. No HTTP and no intervention logic.

pub mod arch;
pub mod chat_template;
pub mod convert;
mod cpu_attention;
pub mod decoder;
pub mod embedding;
mod exp;
pub mod fetch;
pub mod gguf;
pub mod hooks;
pub mod kv_cache;
pub mod linear;
pub mod loader;
pub mod parallel;
mod prefetch;
pub mod quant;
mod rms_norm;
pub mod rope;
pub mod safetensors;
pub mod source;
mod swiglu;
pub mod testing;
pub mod tokenizer;
pub mod vision;
mod weights;

pub use arch::{Architecture, DecoderConfig};
pub use decoder::{Decoder, DecoderInput, LogitsFor, SequenceStep};
pub use hooks::{
    AttentionRows, AttentionSite, HeadRowRewrite, HookPoint, HookStack, RowSite, SequenceHooks,
};
pub use kv_cache::KvCache;
pub use loader::{default_device, Model};
pub use source::{MissingDefault, ModelSource};
pub use tokenizer::{IncrementalDecoder, TextTokenizer};
pub use weights::WeightName;
