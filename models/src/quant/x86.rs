//! x86-64 dot products of weight blocks with activation blocks, one module per instruction set
//! (chosen at run time by [`super::Kernel::detected`]). All share one shape: per block an 8-lane
//! i32 vector of Σq_w·q_a partial sums, scaled by d_w·d_a into an f32 accumulator, plus the
//! scalar offset term m_w·sum_a of Q4_0/Q4_1.

use super::blocks::{BlockQ4_0, BlockQ4_1, BlockQ8, BlockQ8_0};
use std::arch::x86_64::*;

/// Dot products of one weight row with `R` activation rows (`$a` holds them back to back): each
/// weight block is unpacked once by `$weight` (giving its byte operand and [d_w, m_w, ..]) and
/// multiplied into every activation row by `$ints`. One accumulator per row (a second chain per
/// row measured slower: the registers spill). A row's result is the same whatever `R` it is
/// computed in, so a sequence gets identical logits alone or batched.
macro_rules! shared_weight_rows {
    ($w:expr, $a:expr, $out:expr, $R:expr, |$wb:ident| $weight:expr, |$wq:ident, $ab:ident| $ints:expr) => {{
        let n = $w.len();
        let mut acc = [_mm256_setzero_ps(); $R];
        let mut offsets = [_mm_setzero_ps(); $R];
        for b in 0..n {
            let $wb = $w.get_unchecked(b);
            let ($wq, dm) = $weight;
            for r in 0..$R {
                let $ab = $a.get_unchecked(r * n + b);
                let ints = $ints;
                accumulate(ints, dm, $ab, &mut acc[r], &mut offsets[r]);
            }
        }
        for r in 0..$R {
            $out[r] = finish(acc[r], offsets[r]);
        }
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
            unsafe fn finish(acc: __m256, offsets: __m128) -> f32 {
                let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_movehdup_ps(s));
                _mm_cvtss_f32(s) + _mm_cvtss_f32(_mm_movehdup_ps(offsets))
            }

            /// Every row of `w` (rows of `a.len()` blocks) · `a`, into `out`: the same arithmetic
            /// as [`dot_q4_0_rows`] with one row, without a call per row.
            ///
            /// # Safety
            /// The CPU has this module's features; `out` has one entry per row of `w`.
            #[target_feature(enable = $features)]
            pub unsafe fn dot_q4_0_each_row(w: &[BlockQ4_0], a: &[BlockQ8], out: &mut [f32]) {
                for (row, o) in w.chunks_exact(a.len()).zip(out.iter_mut()) {
                    dot_q4_0_rows::<1>(
                        row,
                        a,
                        std::slice::from_mut(o).try_into().unwrap_unchecked(),
                    );
                }
            }

            /// As [`dot_q4_0_each_row`], for Q4_1.
            ///
            /// # Safety
            /// The CPU has this module's features; `out` has one entry per row of `w`.
            #[target_feature(enable = $features)]
            pub unsafe fn dot_q4_1_each_row(w: &[BlockQ4_1], a: &[BlockQ8], out: &mut [f32]) {
                for (row, o) in w.chunks_exact(a.len()).zip(out.iter_mut()) {
                    dot_q4_1_rows::<1>(
                        row,
                        a,
                        std::slice::from_mut(o).try_into().unwrap_unchecked(),
                    );
                }
            }

            /// As [`dot_q4_0_each_row`], for Q8_0.
            ///
            /// # Safety
            /// The CPU has this module's features; `out` has one entry per row of `w`.
            #[target_feature(enable = $features)]
            pub unsafe fn dot_q8_0_each_row(w: &[BlockQ8_0], a: &[BlockQ8], out: &mut [f32]) {
                for (row, o) in w.chunks_exact(a.len()).zip(out.iter_mut()) {
                    dot_q8_0_rows::<1>(
                        row,
                        a,
                        std::slice::from_mut(o).try_into().unwrap_unchecked(),
                    );
                }
            }

            /// One weight row (Q4_0) with `R` activation rows stored back to back.
            ///
            /// # Safety
            /// The CPU has this module's features; `a` holds `R` rows of `w.len()` blocks.
            #[target_feature(enable = $features)]
            #[inline]
            pub unsafe fn dot_q4_0_rows<const R: usize>(
                w: &[BlockQ4_0],
                a: &[BlockQ8],
                out: &mut [f32; R],
            ) {
                let minus_eight = _mm_setr_ps(1.0, -8.0, 0.0, 0.0);
                shared_weight_rows!(
                    w,
                    a,
                    out,
                    R,
                    |wb| {
                        let d = _mm_cvtph_ps(_mm_cvtsi32_si128(wb.d.to_bits() as i32));
                        (
                            unpack_nibbles(&wb.qs),
                            _mm_mul_ps(_mm_shuffle_ps(d, d, 0), minus_eight),
                        )
                    },
                    |wq, ab| dot_u8_i8(wq, acts(ab))
                )
            }

            /// One weight row (Q4_1) with `R` activation rows stored back to back.
            ///
            /// # Safety
            /// The CPU has this module's features; `a` holds `R` rows of `w.len()` blocks.
            #[target_feature(enable = $features)]
            #[inline]
            pub unsafe fn dot_q4_1_rows<const R: usize>(
                w: &[BlockQ4_1],
                a: &[BlockQ8],
                out: &mut [f32; R],
            ) {
                shared_weight_rows!(
                    w,
                    a,
                    out,
                    R,
                    |wb| {
                        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(
                            wb as *const BlockQ4_1 as *const i32,
                        )));
                        (unpack_nibbles(&wb.qs), dm)
                    },
                    |wq, ab| dot_u8_i8(wq, acts(ab))
                )
            }

            /// One weight row (Q8_0) with `R` activation rows stored back to back.
            ///
            /// # Safety
            /// The CPU has this module's features; `a` holds `R` rows of `w.len()` blocks.
            #[target_feature(enable = $features)]
            #[inline]
            pub unsafe fn dot_q8_0_rows<const R: usize>(
                w: &[BlockQ8_0],
                a: &[BlockQ8],
                out: &mut [f32; R],
            ) {
                shared_weight_rows!(
                    w,
                    a,
                    out,
                    R,
                    |wb| {
                        let d = _mm_cvtph_ps(_mm_cvtsi32_si128(wb.d.to_bits() as i32));
                        (_mm256_loadu_si256(wb.qs.as_ptr() as *const __m256i), d)
                    },
                    |q, ab| dot_u8_i8(_mm256_sign_epi8(q, q), _mm256_sign_epi8(acts(ab), q))
                )
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
