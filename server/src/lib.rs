//! Attune's server side: the OpenAI-compatible API, the batching engine, the generation core
//! (sampling, stop rules, sequences), metrics, benchmarks and command-line settings. The
//! `attune` binary is `main.rs`.

pub mod api;
pub mod bench;
pub mod bench_kernels;
pub mod bench_passkey;
pub mod bench_serve;
pub mod bench_vlm;
pub mod engine;
pub mod eval;
pub mod generate;
pub mod llama_cpp_peer;
pub mod local_server;
pub mod metrics;
pub mod passkey;
pub mod sampling;
pub mod sequence;
pub mod serve;
pub mod settings;
pub mod stop;
