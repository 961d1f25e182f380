//! x86-64 kernels, one module per instruction set (chosen at run time by
//! [`super::Kernel::detected`]). One call multiplies the 8 weight rows of a row group with `R`
//! activation rows: each weight block is loaded and unpacked once for all of them, and for each
//! activation row every weight row's exact integer block sum lands in its own lane, then takes
//! the same f32 steps as the portable kernel ([`super::blocks`]): results are bit-identical
//! across kernels and whatever `R` a row is computed in.

use super::blocks::{ActBlock, ByteGroup, NibbleGroup, SplitGroup, GROUP};
use std::arch::x86_64::*;

pub mod avx2_lanes;
pub mod avx512_lanes;
pub mod lanes;

/// Asks for block `b + blocks` of `w`: the same block of the next row group (groups lie back to
/// back, `blocks` blocks each; past the last group the address lies outside the weights, which
/// a prefetch may name), so that its weights are on their way from L3 while this group's are
/// multiplied. The hardware prefetcher alone left the kernels waiting: a decode step of the
/// default model took 5.8 ms for one row and 18 ms for 16 without this, 3.2 ms and 15 ms with
/// it.
#[inline(always)]
fn prefetch_next_group<T>(w: &[T], b: usize, blocks: usize) {
    let next = w.as_ptr().wrapping_add(b + blocks) as *const u8;
    crate::prefetch::prefetch(next, std::mem::size_of::<T>());
}

/// Generates the kernels of one instruction set. `dot_acc` adds the products of unsigned bytes
/// (`x`) and signed bytes (`y`), four adjacent ones per i32 lane, to `acc`; `nibble_sums` gives
/// the block sums of a Q4 group's 8 rows (`lo`/`hi`: its unpacked pair vectors) against
/// activations `alo`/`ahi`, row r's in lane r. Q8_0 weights are signed, so `byte_operand` makes the unsigned operand of a weight vector `w`, `byte_dot`
/// multiplies it (`wu`, with the signed weights `ws`) into activations `a`, and `byte_fix`
/// corrects a lane sum `s` of activation block `ab` for the operand's transformation.
macro_rules! kernels {
    (
        $module:ident,
        $features:literal,
        dot_acc: |$acc:ident, $x:ident, $y:ident| $dot:expr,
        nibble_sums: |$lo:ident, $hi:ident, $alo:ident, $ahi:ident| $nsums:expr,
        byte_operand: |$w:ident| $operand:expr,
        byte_dot: |$bacc:ident, $wu:ident, $ws:ident, $a:ident| $bdot:expr,
        byte_fix: |$s:ident, $ab:ident| $fix:expr $(,)?
    ) => {
        pub mod $module {
            use super::*;

            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn dot_acc($acc: __m256i, $x: __m256i, $y: __m256i) -> __m256i {
                $dot
            }

            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn nibble_sums(
                $lo: &[__m256i; 4],
                $hi: &[__m256i; 4],
                $alo: __m256i,
                $ahi: __m256i,
            ) -> __m256i {
                $nsums
            }

            #[target_feature(enable = $features)]
            #[inline]
            #[allow(unused_variables)]
            unsafe fn byte_operand($w: __m256i) -> __m256i {
                $operand
            }

            #[target_feature(enable = $features)]
            #[inline]
            #[allow(unused_variables)]
            unsafe fn byte_dot($bacc: __m256i, $wu: __m256i, $ws: __m256i, $a: __m256i) -> __m256i {
                $bdot
            }

            #[target_feature(enable = $features)]
            #[inline]
            #[allow(unused_variables)]
            unsafe fn byte_fix($s: __m256i, $ab: &ActBlock) -> __m256i {
                $fix
            }

            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn load<T>(p: &T) -> __m256i {
                _mm256_loadu_si256(p as *const T as *const __m256i)
            }

            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn load_f16(p: &[half::f16; GROUP]) -> __m256 {
                _mm256_cvtph_ps(_mm_loadu_si128(p.as_ptr() as *const __m128i))
            }

            /// Lane sums of the four pair vectors (pair p: row p in lanes 0..4, row p + 4 in
            /// lanes 4..8) as one vector with row r's block sum in lane r.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn row_sums(s: [__m256i; 4]) -> __m256i {
                _mm256_hadd_epi32(_mm256_hadd_epi32(s[0], s[1]), _mm256_hadd_epi32(s[2], s[3]))
            }

            /// acc += ints·(d_w·d_a), lane by lane, as the portable kernel does.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn scale_into(ints: __m256i, d: __m256, ab: &ActBlock, acc: &mut __m256) {
                let scale = _mm256_mul_ps(d, _mm256_set1_ps(ab.d));
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ints), scale, *acc);
            }

            /// The 8 rows of a Q4_0/Q4_1 group (`w`: one group per block) · `R` activation rows
            /// stored back to back in `a`; `out[r][k]` is activation row r · weight row k.
            ///
            /// # Safety
            /// The CPU has this module's features; `a` holds `R * w.len()` blocks.
            #[target_feature(enable = $features)]
            pub unsafe fn dot_nibble_rows<const R: usize>(
                w: &[NibbleGroup],
                a: &[ActBlock],
                out: &mut [[f32; GROUP]; R],
            ) {
                let n = w.len();
                let mask = _mm256_set1_epi8(0x0F);
                let mut acc = [_mm256_setzero_ps(); R];
                for b in 0..n {
                    prefetch_next_group(w, b, n);
                    let g = w.get_unchecked(b);
                    let (d, m) = (load_f16(&g.d), load_f16(&g.m));
                    let mut lo = [_mm256_setzero_si256(); 4];
                    let mut hi = [_mm256_setzero_si256(); 4];
                    for p in 0..4 {
                        let packed = load(&g.qs[p]);
                        lo[p] = _mm256_and_si256(packed, mask);
                        hi[p] = _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask);
                    }
                    for r in 0..R {
                        let ab = a.get_unchecked(r * n + b);
                        let (alo, ahi) = (load(&ab.lo), load(&ab.hi));
                        scale_into(nibble_sums(&lo, &hi, alo, ahi), d, ab, &mut acc[r]);
                        acc[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(ab.sum), acc[r]);
                    }
                }
                for r in 0..R {
                    _mm256_storeu_ps(out[r].as_mut_ptr(), acc[r]);
                }
            }

            /// As [`dot_nibble_rows`], for Q8_0 groups.
            ///
            /// # Safety
            /// The CPU has this module's features; `a` holds `R * w.len()` blocks.
            #[target_feature(enable = $features)]
            pub unsafe fn dot_byte_rows<const R: usize>(
                w: &[ByteGroup],
                a: &[ActBlock],
                out: &mut [[f32; GROUP]; R],
            ) {
                let n = w.len();
                let mut acc = [_mm256_setzero_ps(); R];
                for b in 0..n {
                    prefetch_next_group(w, b, n);
                    let g = w.get_unchecked(b);
                    let d = load_f16(&g.d);
                    let mut ws = [[_mm256_setzero_si256(); 4]; 2];
                    let mut wu = [[_mm256_setzero_si256(); 4]; 2];
                    for p in 0..4 {
                        ws[0][p] = load(&g.lo[p]);
                        ws[1][p] = load(&g.hi[p]);
                        wu[0][p] = byte_operand(ws[0][p]);
                        wu[1][p] = byte_operand(ws[1][p]);
                    }
                    for r in 0..R {
                        let ab = a.get_unchecked(r * n + b);
                        let (alo, ahi) = (load(&ab.lo), load(&ab.hi));
                        let mut s = [_mm256_setzero_si256(); 4];
                        for p in 0..4 {
                            s[p] = byte_dot(s[p], wu[0][p], ws[0][p], alo);
                            s[p] = byte_dot(s[p], wu[1][p], ws[1][p], ahi);
                        }
                        scale_into(byte_fix(row_sums(s), ab), d, ab, &mut acc[r]);
                    }
                }
                for r in 0..R {
                    _mm256_storeu_ps(out[r].as_mut_ptr(), acc[r]);
                }
            }

            /// As [`dot_nibble_rows`], for Q6_K groups: the unsigned codes u meet the
            /// activations directly, each half's sum is corrected by 32·Σa of that half, and
            /// takes its own scale, the first half first.
            ///
            /// # Safety
            /// The CPU has this module's features; `a` holds `R * w.len()` blocks.
            #[target_feature(enable = $features)]
            pub unsafe fn dot_split_rows<const R: usize>(
                w: &[SplitGroup],
                a: &[ActBlock],
                out: &mut [[f32; GROUP]; R],
            ) {
                let n = w.len();
                let mut acc = [_mm256_setzero_ps(); R];
                for b in 0..n {
                    prefetch_next_group(w, b, n);
                    let g = w.get_unchecked(b);
                    let (d_lo, d_hi) = (
                        _mm256_loadu_ps(g.d_lo.as_ptr()),
                        _mm256_loadu_ps(g.d_hi.as_ptr()),
                    );
                    let lo: [__m256i; 4] = std::array::from_fn(|p| load(&g.lo[p]));
                    let hi: [__m256i; 4] = std::array::from_fn(|p| load(&g.hi[p]));
                    for r in 0..R {
                        let ab = a.get_unchecked(r * n + b);
                        let (alo, ahi) = (load(&ab.lo), load(&ab.hi));
                        let mut s_lo = [_mm256_setzero_si256(); 4];
                        let mut s_hi = [_mm256_setzero_si256(); 4];
                        for p in 0..4 {
                            s_lo[p] = dot_acc(s_lo[p], lo[p], alo);
                            s_hi[p] = dot_acc(s_hi[p], hi[p], ahi);
                        }
                        let (fix_lo, fix_hi) = ab.split_corrections();
                        let ints_lo = _mm256_sub_epi32(row_sums(s_lo), _mm256_set1_epi32(fix_lo));
                        let ints_hi = _mm256_sub_epi32(row_sums(s_hi), _mm256_set1_epi32(fix_hi));
                        scale_into(ints_lo, d_lo, ab, &mut acc[r]);
                        scale_into(ints_hi, d_hi, ab, &mut acc[r]);
                    }
                }
                for r in 0..R {
                    _mm256_storeu_ps(out[r].as_mut_ptr(), acc[r]);
                }
            }
        }
    };
}

// AVX2 has no unsigned×signed byte dot product into i32: maddubs (pairs into saturating i16,
// exact here: |15·127·2| and |128·127·2| fit) then madd with ones. A Q4 block's 16-bit pair
// sums are added up in 16 bits as far as they fit (two products' pairs, then horizontal sums of
// two and of four: |4·2·2·15·128| < 2¹⁵), which leaves each row's two halves in adjacent 16-bit
// lanes of lane r, and one madd finishes the sums: 9 multiplies a block instead of 16, where
// vector integer multiplies have one pipe (Zen 1). Q8_0 takes the sign trick: |w| · (a with
// w's sign).
kernels!(
    avx2,
    "avx2,fma,f16c",
    dot_acc: |acc, x, y| _mm256_add_epi32(
        acc,
        _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), _mm256_set1_epi16(1))
    ),
    nibble_sums: |lo, hi, alo, ahi| {
        let pairs: [__m256i; 4] = std::array::from_fn(|p| {
            _mm256_add_epi16(_mm256_maddubs_epi16(lo[p], alo), _mm256_maddubs_epi16(hi[p], ahi))
        });
        let quads = _mm256_hadd_epi16(
            _mm256_hadd_epi16(pairs[0], pairs[1]),
            _mm256_hadd_epi16(pairs[2], pairs[3]),
        );
        _mm256_madd_epi16(quads, _mm256_set1_epi16(1))
    },
    byte_operand: |w| _mm256_abs_epi8(w),
    byte_dot: |acc, wu, ws, a| dot_acc(acc, wu, _mm256_sign_epi8(a, ws)),
    byte_fix: |s, ab| s,
);

// The VNNI kernels take Q8_0 weights as unsigned bytes w + 128 and subtract 128·Σa per block.
kernels!(
    avx_vnni,
    "avx2,fma,f16c,avxvnni",
    dot_acc: |acc, x, y| _mm256_dpbusd_avx_epi32(acc, x, y),
    nibble_sums: |lo, hi, alo, ahi| row_sums(std::array::from_fn(|p| {
        dot_acc(dot_acc(_mm256_setzero_si256(), lo[p], alo), hi[p], ahi)
    })),
    byte_operand: |w| _mm256_xor_si256(w, _mm256_set1_epi8(-128)),
    byte_dot: |acc, wu, ws, a| dot_acc(acc, wu, a),
    byte_fix: |s, ab| _mm256_sub_epi32(s, _mm256_set1_epi32(ab.offset)),
);
kernels!(
    avx512_vnni,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    dot_acc: |acc, x, y| _mm256_dpbusd_epi32(acc, x, y),
    nibble_sums: |lo, hi, alo, ahi| row_sums(std::array::from_fn(|p| {
        dot_acc(dot_acc(_mm256_setzero_si256(), lo[p], alo), hi[p], ahi)
    })),
    byte_operand: |w| _mm256_xor_si256(w, _mm256_set1_epi8(-128)),
    byte_dot: |acc, wu, ws, a| dot_acc(acc, wu, a),
    byte_fix: |s, ab| _mm256_sub_epi32(s, _mm256_set1_epi32(ab.offset)),
);

/// [`super::blocks::quantize_row`] with AVX2, value for value (including its NaN → 0 and
/// saturation rules).
///
/// # Safety
/// The CPU has AVX2; `x` holds `out.len()` blocks of 32 values.
#[target_feature(enable = "avx2")]
pub unsafe fn quantize_row(x: &[f32], out: &mut [ActBlock]) {
    const BLOCK: usize = super::blocks::BLOCK;
    assert_eq!(x.len(), out.len() * BLOCK);
    let sign = _mm256_set1_ps(-0.0);
    for (values, block) in x.chunks_exact(BLOCK).zip(out.iter_mut()) {
        let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(values.as_ptr().add(8 * i)));
        // max(|v|, acc) keeps acc where |v| is NaN, as f32::max does.
        let mut amax = _mm256_setzero_ps();
        for vi in v {
            amax = _mm256_max_ps(_mm256_andnot_ps(sign, vi), amax);
        }
        // The lanes' maximum in registers (no lane is NaN, so the order does not matter).
        let amax = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        let amax = _mm_max_ps(amax, _mm_movehl_ps(amax, amax));
        let amax = _mm_cvtss_f32(_mm_max_ss(amax, _mm_movehdup_ps(amax)));
        let d = amax / 127.0;
        let inv = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        let half = _mm256_set1_ps(0.5);
        let ints: [__m256i; 4] = std::array::from_fn(|i| {
            let scaled = _mm256_mul_ps(v[i], inv);
            let rounded = _mm256_add_ps(scaled, _mm256_or_ps(_mm256_and_ps(scaled, sign), half));
            // As `as i8`: NaN becomes 0, the rest saturates (a subnormal scale overflows `inv`).
            let rounded = _mm256_and_ps(rounded, _mm256_cmp_ps(rounded, rounded, _CMP_ORD_Q));
            let clamped = _mm256_min_ps(
                _mm256_max_ps(rounded, _mm256_set1_ps(-128.0)),
                _mm256_set1_ps(127.0),
            );
            _mm256_cvttps_epi32(clamped)
        });
        let words = [
            _mm256_packs_epi32(ints[0], ints[1]),
            _mm256_packs_epi32(ints[2], ints[3]),
        ];
        let bytes = _mm256_permutevar8x32_epi32(
            _mm256_packs_epi16(words[0], words[1]),
            _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7),
        );
        _mm256_storeu_si256(
            block.lo.as_mut_ptr() as *mut __m256i,
            _mm256_permute2x128_si256(bytes, bytes, 0x00),
        );
        _mm256_storeu_si256(
            block.hi.as_mut_ptr() as *mut __m256i,
            _mm256_permute2x128_si256(bytes, bytes, 0x11),
        );
        // Σq from the saturated bytes, as the portable code sums its stored values: sums of
        // values 0..8, 8..16, 16..24 and 24..32, each offset by 128 per value.
        let sums = _mm256_sad_epu8(
            _mm256_xor_si256(bytes, _mm256_set1_epi8(-128)),
            _mm256_setzero_si256(),
        );
        let (first, second) = (
            _mm256_castsi256_si128(sums),
            _mm256_extracti128_si256(sums, 1),
        );
        let sums = _mm_add_epi64(first, second);
        let sums = _mm_add_epi64(sums, _mm_unpackhi_epi64(sums, sums));
        let first = _mm_add_epi64(first, _mm_unpackhi_epi64(first, first));
        let total = _mm_cvtsi128_si64(sums) as i32 - 128 * BLOCK as i32;
        block.d = d;
        block.sum = d * total as f32;
        block.offset = 128 * total;
        block.first_half = _mm_cvtsi128_si64(first) as i32 - 128 * 16;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::SeededRng;

    #[test]
    fn simd_quantization_equals_the_portable_one() {
        if !is_x86_feature_detected!("avx2") {
            return;
        }
        let mut rng = SeededRng::new(5);
        let mut x: Vec<f32> = (0..32 * 40).map(|_| (rng.next_f32() - 0.5) * 8.0).collect();
        // Ties, zeros, a lone NaN, infinities, subnormals and huge values in some blocks.
        x[32..64].fill(0.0);
        x[64] = f32::NAN;
        x[96] = f32::INFINITY;
        x[130] = f32::NEG_INFINITY;
        x[160..192].iter_mut().for_each(|v| *v *= 1e-40);
        x[192] = 3e38;
        for (i, v) in x[224..256].iter_mut().enumerate() {
            *v = i as f32 - 15.5;
        }
        let mut portable = vec![ActBlock::default(); 40];
        let mut simd = vec![ActBlock::default(); 40];
        super::super::blocks::quantize_row(&x, &mut portable);
        // SAFETY: AVX2 detected above; sizes match.
        unsafe { quantize_row(&x, &mut simd) };
        for (b, (p, s)) in portable.iter().zip(&simd).enumerate() {
            assert_eq!(
                (p.lo, p.hi, p.offset, p.first_half),
                (s.lo, s.hi, s.offset, s.first_half),
                "block {b}"
            );
            assert_eq!(p.d.to_bits(), s.d.to_bits(), "block {b}");
            assert_eq!(p.sum.to_bits(), s.sum.to_bits(), "block {b}");
        }
    }
}
