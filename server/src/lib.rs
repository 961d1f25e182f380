//! Attune's server side: generation core (sampling, stop rules, sequences), benchmarks, and
//! the command-line settings. The `attune` binary is `main.rs`.

pub mod bench;
pub mod generate;
pub mod sampling;
pub mod sequence;
pub mod settings;
pub mod stop;
