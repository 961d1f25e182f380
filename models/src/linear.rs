//! A projection: quantized (GGUF) or dense weights, plus an optional bias.

use crate::quant::{Q4_1MatMul, Q4_1Matrix};
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Module, Result, Tensor};
use std::sync::Arc;

/// The weight of a projection and the kernel that multiplies by it.
#[derive(Debug, Clone)]
pub enum Weight {
    /// Candle's matmul: dense weights, GPU weights, and quantized formats with a candle kernel.
    Candle(QMatMul),
    /// Q4_1 on the CPU through our own SIMD kernel.
    Q4_1(Q4_1MatMul),
}

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Weight, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// A quantized weight from a GGUF file, on the fastest kernel for its format and device.
    pub fn quantized(weight: QTensor, bias: Option<Tensor>) -> Result<Self> {
        let weight = match (weight.device(), Q4_1Matrix::from_qtensor(&weight)?) {
            (Device::Cpu, Some(matrix)) => Weight::Q4_1(Q4_1MatMul(Arc::new(matrix))),
            _ => Weight::Candle(QMatMul::from_qtensor(weight)?),
        };
        Ok(Self::new(weight, bias))
    }

    /// A dense (out, in) weight.
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self::new(Weight::Candle(QMatMul::Tensor(weight)), bias)
    }

    /// `x` is (rows, in); returns (rows, out).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            Weight::Candle(w) => w.forward(x)?,
            Weight::Q4_1(w) => w.forward(x)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    pub fn weight(&self) -> &Weight {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}
