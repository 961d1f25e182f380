//! x86-64 dot products of weight blocks with activation blocks, one module per instruction set
//! (chosen at run time by [`super::Kernel::detected`]). All share one shape: per block an 8-lane
//! i32 vector of Σq_w·q_a partial sums, scaled by d_w·d_a into one of two f32 accumulators (two
//! break the FMA dependency chain), plus the scalar offset term m_w·sum_a of Q4_0/Q4_1.

use super::blocks::{BlockQ4_0, BlockQ4_1, BlockQ8, BlockQ8_0};
use std::arch::x86_64::*;

/// Runs `$block` (giving a block's i32 partial sums and [d_w, m_w, ..]) over `$w` and `$a` with
/// even and odd blocks on separate accumulators, and returns the dot product.
macro_rules! two_chains {
    ($w:expr, $a:expr, |$wb:ident, $ab:ident| $block:expr) => {{
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut offsets = _mm_setzero_ps();
        let pairs = $w.len() / 2;
        for p in 0..pairs {
            let ($wb, $ab) = ($w.get_unchecked(2 * p), $a.get_unchecked(2 * p));
            let (ints, dm) = $block;
            accumulate(ints, dm, $ab, &mut acc0, &mut offsets);
            let ($wb, $ab) = ($w.get_unchecked(2 * p + 1), $a.get_unchecked(2 * p + 1));
            let (ints, dm) = $block;
            accumulate(ints, dm, $ab, &mut acc1, &mut offsets);
        }
        if $w.len() % 2 == 1 {
            let ($wb, $ab) = (
                $w.get_unchecked($w.len() - 1),
                $a.get_unchecked($w.len() - 1),
            );
            let (ints, dm) = $block;
            accumulate(ints, dm, $ab, &mut acc0, &mut offsets);
        }
        finish(acc0, acc1, offsets)
    }};
}

/// Generates the kernels of one instruction set; `$dot` multiplies unsigned bytes by signed
/// bytes and sums each four adjacent products into an i32 lane.
macro_rules! kernels {
    ($module:ident, $features:literal, |$x:ident, $y:ident| $dot:expr) => {
        pub mod $module {
            use super::*;

            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn dot_u8_i8($x: __m256i, $y: __m256i) -> __m256i {
                $dot
            }

            /// 32 nibbles as bytes: low nibbles are values 0..16, high nibbles 16..32.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn unpack_nibbles(qs: &[u8; 16]) -> __m256i {
                let packed = _mm_loadu_si128(qs.as_ptr() as *const __m128i);
                let mask = _mm_set1_epi8(0x0F);
                let lo = _mm_and_si128(packed, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
                _mm256_set_m128i(hi, lo)
            }

            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn acts(a: &BlockQ8) -> __m256i {
                _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i)
            }

            /// [d_a, sum_a, 0, 0]
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn act_scales(a: &BlockQ8) -> __m128 {
                _mm_castsi128_ps(_mm_loadl_epi64(a as *const BlockQ8 as *const __m128i))
            }

            /// Accumulates one block: `ints` are its partial sums, `dm` = [d_w, m_w, ..].
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn accumulate(
                ints: __m256i,
                dm: __m128,
                a: &BlockQ8,
                acc: &mut __m256,
                offsets: &mut __m128,
            ) {
                let scaled = _mm_mul_ps(dm, act_scales(a)); // [d_w·d_a, m_w·sum_a, ..]
                *offsets = _mm_add_ps(*offsets, scaled);
                *acc = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(ints),
                    _mm256_broadcastss_ps(scaled),
                    *acc,
                );
            }

            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn finish(acc0: __m256, acc1: __m256, offsets: __m128) -> f32 {
                let v = _mm256_add_ps(acc0, acc1);
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_movehdup_ps(s));
                _mm_cvtss_f32(s) + _mm_cvtss_f32(_mm_movehdup_ps(offsets))
            }

            /// # Safety
            /// The CPU has this module's features; `w` and `a` have the same length.
            #[target_feature(enable = $features)]
            pub unsafe fn dot_q4_0(w: &[BlockQ4_0], a: &[BlockQ8]) -> f32 {
                let minus_eight = _mm_setr_ps(1.0, -8.0, 0.0, 0.0);
                two_chains!(w, a, |wb, ab| {
                    let d = _mm_cvtph_ps(_mm_cvtsi32_si128(wb.d.to_bits() as i32));
                    let dm = _mm_mul_ps(_mm_shuffle_ps(d, d, 0), minus_eight);
                    (dot_u8_i8(unpack_nibbles(&wb.qs), acts(ab)), dm)
                })
            }

            /// # Safety
            /// The CPU has this module's features; `w` and `a` have the same length.
            #[target_feature(enable = $features)]
            pub unsafe fn dot_q4_1(w: &[BlockQ4_1], a: &[BlockQ8]) -> f32 {
                two_chains!(w, a, |wb, ab| {
                    // d and m are adjacent f16s: one 32-bit load converts both.
                    let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(
                        wb as *const BlockQ4_1 as *const i32,
                    )));
                    (dot_u8_i8(unpack_nibbles(&wb.qs), acts(ab)), dm)
                })
            }

            /// # Safety
            /// The CPU has this module's features; `w` and `a` have the same length.
            #[target_feature(enable = $features)]
            pub unsafe fn dot_q8_0(w: &[BlockQ8_0], a: &[BlockQ8]) -> f32 {
                two_chains!(w, a, |wb, ab| {
                    let d = _mm_cvtph_ps(_mm_cvtsi32_si128(wb.d.to_bits() as i32));
                    let q = _mm256_loadu_si256(wb.qs.as_ptr() as *const __m256i);
                    // |w| as unsigned times a with w's sign: the same products, u8 × i8.
                    let ints = dot_u8_i8(_mm256_sign_epi8(q, q), _mm256_sign_epi8(acts(ab), q));
                    (ints, d)
                })
            }
        }
    };
}

kernels!(avx2, "avx2,fma,f16c", |x, y| _mm256_madd_epi16(
    _mm256_maddubs_epi16(x, y),
    _mm256_set1_epi16(1)
));
kernels!(avx_vnni, "avx2,fma,f16c,avxvnni", |x, y| {
    _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), x, y)
});
kernels!(avx512_vnni, "avx2,fma,f16c,avx512vnni,avx512vl", |x, y| {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), x, y)
});
