//! silu(gate) · up straight from a fused gate_up projection's output, on the CPU worker pool:
//! one pass instead of two narrowed copies, candle's single-threaded silu and a product.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// Values per work item handed to a CPU worker.
const CHUNK: usize = 1024;

struct SwiGlu;

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(data), Some((start, end)), &[rows, both]) =
            (storage, layout.contiguous_offsets(), layout.shape().dims())
        else {
            candle_core::bail!("swiglu takes a contiguous f32 (rows, 2 * ffn) tensor");
        };
        let input = &data[start..end];
        let ffn = both / 2;
        let mut out = vec![0f32; rows * ffn];
        let out_addr = out.as_mut_ptr() as usize;
        candle_core::utils::barrier_pool().execute_chunked(out.len().div_ceil(CHUNK), |chunks| {
            for c in chunks {
                for i in c * CHUNK..((c + 1) * CHUNK).min(rows * ffn) {
                    let (row, col) = (i / ffn, i % ffn);
                    let gate = input[row * both + col];
                    let up = input[row * both + ffn + col];
                    // candle's silu, then the product, so results equal the tensor ops'.
                    let silu = gate / (1.0 + (-gate).exp());
                    // SAFETY: i < out.len() and each i belongs to exactly one chunk.
                    unsafe { *(out_addr as *mut f32).add(i) = silu * up };
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((rows, ffn))))
    }
}

/// silu(gate) · up for `gate_up` (rows, 2 · ffn) holding gate then up side by side.
pub fn swiglu(gate_up: &Tensor) -> Result<Tensor> {
    if gate_up.device().is_cpu() && gate_up.dtype() == candle_core::DType::F32 {
        return gate_up.contiguous()?.apply_op1_no_bwd(&SwiGlu);
    }
    let ffn = gate_up.dim(1)? / 2;
    candle_nn::ops::silu(&gate_up.narrow(1, 0, ffn)?)? * gate_up.narrow(1, ffn, ffn)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::SeededRng;
    use candle_core::Device;

    #[test]
    fn fused_swiglu_equals_the_tensor_ops() {
        let gate_up = SeededRng::new(9)
            .tensor((5, 2 * 700), 4.0, &Device::Cpu)
            .unwrap();
        let fused = swiglu(&gate_up).unwrap();
        let gate = gate_up.narrow(1, 0, 700).unwrap();
        let up = gate_up.narrow(1, 700, 700).unwrap();
        let plain = (candle_nn::ops::silu(&gate).unwrap() * up).unwrap();
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(values(&fused), values(&plain));
    }
}
