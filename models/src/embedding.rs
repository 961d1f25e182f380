//! The token embedding table: dense, or quantized rows dequantized on lookup (a GGUF's table
//! then costs its file size once, shared with a tied `lm_head`, instead of a full f32 copy).

use crate::quant::QuantMatrix;
use candle_core::{Device, Result, Tensor};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub enum Embedding {
    /// (vocab, hidden) in the compute dtype.
    Dense(Tensor),
    /// (vocab, hidden) quantized, on the CPU; lookups give f32.
    Quant(Arc<QuantMatrix>),
}

impl Embedding {
    /// Embeddings of `tokens`, (len, hidden).
    pub fn lookup(&self, tokens: &[u32], device: &Device) -> Result<Tensor> {
        match self {
            Self::Dense(table) => table.index_select(&Tensor::new(tokens, device)?, 0),
            Self::Quant(table) => {
                let hidden = table.cols();
                let mut rows = vec![0f32; tokens.len() * hidden];
                for (&token, row) in tokens.iter().zip(rows.chunks_exact_mut(hidden)) {
                    if token as usize >= table.rows() {
                        candle_core::bail!("token id {token} is outside the vocabulary");
                    }
                    table.dequantize_row(token as usize, row);
                }
                Tensor::from_vec(rows, (tokens.len(), hidden), device)
            }
        }
    }

    /// The whole table, (vocab, hidden), dequantized if need be.
    pub fn table(&self, device: &Device) -> Result<Tensor> {
        match self {
            Self::Dense(table) => Ok(table.clone()),
            Self::Quant(table) => {
                let ids: Vec<u32> = (0..table.rows() as u32).collect();
                self.lookup(&ids, device)
            }
        }
    }
}
