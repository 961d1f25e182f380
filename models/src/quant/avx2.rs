//! AVX2 + FMA + F16C dot products, used only after run-time detection of those features.

use super::blocks::{BlockQ4_1, BlockQ8, BLOCK};
use std::arch::x86_64::*;

/// [`super::blocks::dot_q4_1_scalar`] with 32 lanes per block.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C, and `w` and `a` must have the same length.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q4_1(w: &[BlockQ4_1], a: &[BlockQ8]) -> f32 {
    debug_assert_eq!(w.len(), a.len());
    let low_nibbles = _mm_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    let mut offsets = _mm_setzero_ps();
    for (wb, ab) in w.iter().zip(a) {
        // d and m are adjacent f16s: one 32-bit load converts both.
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(
            wb as *const BlockQ4_1 as *const i32,
        )));
        let act_scales = _mm_castsi128_ps(_mm_loadl_epi64(ab as *const BlockQ8 as *const __m128i));
        // [d_w·d_a, m_w·sum_a, ..]
        let scaled = _mm_mul_ps(dm, act_scales);
        offsets = _mm_add_ss(offsets, _mm_movehdup_ps(scaled));

        let packed = _mm_loadu_si128(wb.qs.as_ptr() as *const __m128i);
        let lo = _mm_and_si128(packed, low_nibbles);
        let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low_nibbles);
        let weights = _mm256_set_m128i(hi, lo);
        let acts = _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i);
        // u8 × i8 pairs summed to i16 (|15·127·2| fits), then pairs of those to i32.
        let products = _mm256_madd_epi16(_mm256_maddubs_epi16(weights, acts), ones);
        let scale = _mm256_broadcastss_ps(scaled);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(products), scale, acc);
    }
    debug_assert_eq!(BLOCK, 32);
    horizontal_sum(acc) + _mm_cvtss_f32(offsets)
}

#[target_feature(enable = "avx2,fma")]
unsafe fn horizontal_sum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}
