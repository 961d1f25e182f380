//! A projection: quantized (GGUF) or dense weights, plus an optional bias.

use crate::quant::{QuantMatMul, QuantMatrix};
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Module, Result, Tensor};
use std::sync::Arc;

/// The weight of a projection and the kernel that multiplies by it.
#[derive(Debug, Clone)]
pub enum Weight {
    /// Candle's matmul: dense weights, GPU weights, and quantized formats with a candle kernel.
    Candle(QMatMul),
    /// Q4_0, Q4_1, Q8_0, Q4_K or Q5_0 on the CPU through our own SIMD kernels.
    Quant(QuantMatMul),
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
        let weight = match (weight.device(), QuantMatrix::from_qtensor(&weight)?) {
            (Device::Cpu, Some(matrix)) => Weight::Quant(QuantMatMul(Arc::new(matrix))),
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
            Weight::Quant(w) => w.forward(x)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// `residual + self.forward(x)`: on our quantized kernels without a bias, in one pass
    /// (each result added to its residual value as it is written), the same floats.
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        match (&self.weight, &self.bias) {
            (Weight::Quant(w), None) => w.forward_add(x, residual),
            _ => residual + self.forward(x)?,
        }
    }

    /// One projection computing all of `parts` (outputs side by side, in order) when they run on
    /// our quantized kernels in one format with matching biases; the parts become views of its
    /// storage, so memory is not doubled. `None` (parts untouched) when they cannot be fused.
    pub fn fuse(parts: &mut [&mut Linear]) -> Result<Option<Linear>> {
        let matrices: Option<Vec<&QuantMatrix>> = parts
            .iter()
            .map(|p| match &p.weight {
                Weight::Quant(q) => Some(q.0.as_ref()),
                Weight::Candle(_) => None,
            })
            .collect();
        let Some(matrices) = matrices else {
            return Ok(None);
        };
        let bias = match parts.iter().filter(|p| p.bias.is_some()).count() {
            0 => None,
            n if n == parts.len() => Some(Tensor::cat(
                &parts
                    .iter()
                    .filter_map(|p| p.bias.clone())
                    .collect::<Vec<_>>(),
                0,
            )?),
            _ => return Ok(None),
        };
        let Ok(stacked) = QuantMatrix::stack(&matrices) else {
            return Ok(None);
        };
        let mut start = 0;
        for part in parts.iter_mut() {
            let rows = match &part.weight {
                Weight::Quant(q) => q.0.rows(),
                Weight::Candle(_) => unreachable!("checked above"),
            };
            part.weight = Weight::Quant(QuantMatMul(Arc::new(stacked.view(start..start + rows)?)));
            start += rows;
        }
        Ok(Some(Self::new(
            Weight::Quant(QuantMatMul(Arc::new(stacked))),
            bias,
        )))
    }

    pub fn out_features(&self) -> usize {
        match &self.weight {
            Weight::Quant(q) => q.0.rows(),
            Weight::Candle(w) => match w {
                QMatMul::QTensor(t) => t.shape().dims()[0],
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.dims()[0],
            },
        }
    }

    pub fn weight(&self) -> &Weight {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}
