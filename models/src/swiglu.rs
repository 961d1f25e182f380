//! silu(gate) · up straight from a fused gate_up projection's output, on the CPU worker pool:
//! one pass instead of two narrowed copies, candle's single-threaded silu and a product, with
//! [`crate::exp`] in eight lanes on AVX2 and sixteen on AVX-512 (the same floats as the portable
//! loop).

use crate::exp::exp;
#[cfg(target_arch = "x86_64")]
use crate::exp::{has_avx2_fma, has_avx512};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use std::mem::MaybeUninit;

/// Values of a row per work item handed to a CPU worker.
const CHUNK: usize = 512;

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
        let mut out = Vec::with_capacity(rows * ffn);
        let out_addr = out.spare_capacity_mut().as_mut_ptr() as usize;
        let per_row = ffn.div_ceil(CHUNK);
        crate::parallel::for_each_chunk(rows * per_row, |items| {
            for item in items {
                let (row, first) = (item / per_row, item % per_row * CHUNK);
                let len = CHUNK.min(ffn - first);
                let gate = &input[row * both + first..][..len];
                let up = &input[row * both + ffn + first..][..len];
                // SAFETY: the item's values lie within the `rows * ffn` reserved, and each item
                // belongs to exactly one chunk, so no two workers write the same value.
                let out = unsafe {
                    std::slice::from_raw_parts_mut(
                        (out_addr as *mut MaybeUninit<f32>).add(row * ffn + first),
                        len,
                    )
                };
                silu_times(gate, up, out);
            }
        });
        // SAFETY: every item above wrote its values, and the items cover all rows × ffn.
        unsafe { out.set_len(rows * ffn) };
        Ok((CpuStorage::F32(out), Shape::from((rows, ffn))))
    }
}

/// `out[i] = gate[i] / (1 + e^-gate[i]) · up[i]`: candle's silu, then the product.
fn silu_times(gate: &[f32], up: &[f32], out: &mut [MaybeUninit<f32>]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has AVX-512 F, AVX2 and FMA.
        return unsafe { silu_times_avx512(gate, up, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { silu_times_avx2(gate, up, out) };
    }
    silu_times_portable(gate, up, out)
}

fn silu_times_portable(gate: &[f32], up: &[f32], out: &mut [MaybeUninit<f32>]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        o.write(g / (1.0 + exp(-g)) * u);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn silu_times_avx2(gate: &[f32], up: &[f32], out: &mut [MaybeUninit<f32>]) {
    use std::arch::x86_64::*;
    assert!(gate.len() == out.len() && up.len() == out.len());
    let whole = out.len() / 8 * 8;
    for c in (0..whole).step_by(8) {
        // SAFETY: the three slices are `out.len()` long and c + 8 <= whole.
        unsafe {
            let g = _mm256_loadu_ps(gate.as_ptr().add(c));
            let negated = _mm256_xor_ps(g, _mm256_set1_ps(-0.0));
            let silu = _mm256_div_ps(
                g,
                _mm256_add_ps(_mm256_set1_ps(1.0), crate::exp::avx2::exp(negated)),
            );
            let product = _mm256_mul_ps(silu, _mm256_loadu_ps(up.as_ptr().add(c)));
            _mm256_storeu_ps(out.as_mut_ptr().add(c) as *mut f32, product);
        }
    }
    silu_times_portable(&gate[whole..], &up[whole..], &mut out[whole..]);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f")]
fn silu_times_avx512(gate: &[f32], up: &[f32], out: &mut [MaybeUninit<f32>]) {
    use std::arch::x86_64::*;
    assert!(gate.len() == out.len() && up.len() == out.len());
    let whole = out.len() / 16 * 16;
    for c in (0..whole).step_by(16) {
        // SAFETY: the three slices are `out.len()` long and c + 16 <= whole.
        unsafe {
            let g = _mm512_loadu_ps(gate.as_ptr().add(c));
            // The sign bit flipped, as `-g` does (an f32 xor would need AVX-512 DQ).
            let negated = _mm512_castsi512_ps(_mm512_xor_si512(
                _mm512_castps_si512(g),
                _mm512_set1_epi32(i32::MIN),
            ));
            let silu = _mm512_div_ps(
                g,
                _mm512_add_ps(_mm512_set1_ps(1.0), crate::exp::avx512::exp(negated)),
            );
            let product = _mm512_mul_ps(silu, _mm512_loadu_ps(up.as_ptr().add(c)));
            _mm512_storeu_ps(out.as_mut_ptr().add(c) as *mut f32, product);
        }
    }
    silu_times_avx2(&gate[whole..], &up[whole..], &mut out[whole..]);
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
    fn fused_swiglu_is_the_tensor_ops_within_a_few_ulp() {
        let gate_up = SeededRng::new(9)
            .tensor((5, 2 * 700), 4.0, &Device::Cpu)
            .unwrap();
        let fused = swiglu(&gate_up).unwrap();
        let gate = gate_up.narrow(1, 0, 700).unwrap();
        let up = gate_up.narrow(1, 700, 700).unwrap();
        let plain = (candle_nn::ops::silu(&gate).unwrap() * up).unwrap();
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (fused, plain) = (values(&fused), values(&plain));
        assert_eq!(fused.len(), plain.len());
        for (f, p) in fused.iter().zip(&plain) {
            // exp is within 2 ulp of libm's; the division and product add one rounding each.
            assert!((f - p).abs() <= 4.0 * f32::EPSILON * p.abs(), "{f} vs {p}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_lanes_give_the_portable_floats() {
        if !has_avx2_fma() {
            return;
        }
        let mut rng = SeededRng::new(4);
        let mut values = |n: usize| {
            (0..n)
                .map(|_| 40.0 * (rng.next_f32() - 0.5))
                .collect::<Vec<f32>>()
        };
        let (mut gate, up) = (values(203), values(203));
        gate[..4].copy_from_slice(&[100.0, -100.0, f32::NAN, 0.0]);
        let mut simd = vec![MaybeUninit::uninit(); 203];
        let mut portable = simd.clone();
        // SAFETY: the CPU has AVX2 and FMA.
        unsafe { silu_times_avx2(&gate, &up, &mut simd) };
        silu_times_portable(&gate, &up, &mut portable);
        let bits = |v: &[MaybeUninit<f32>]| {
            // SAFETY: every function here writes every value.
            v.iter()
                .map(|x| unsafe { x.assume_init() }.to_bits())
                .collect::<Vec<_>>()
        };
        assert_eq!(bits(&simd), bits(&portable));
        if has_avx512() {
            let mut wide = vec![MaybeUninit::uninit(); 203];
            // SAFETY: the CPU has AVX-512 F, AVX2 and FMA.
            unsafe { silu_times_avx512(&gate, &up, &mut wide) };
            assert_eq!(bits(&wide), bits(&portable));
        }
    }
}
