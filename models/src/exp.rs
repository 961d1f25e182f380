//! `exp` for the CPU kernels (softmax, SwiGLU), one lane at a time in plain Rust, eight at a
//! time on AVX2 and sixteen on AVX-512, with the same steps per lane so all give the same
//! floats. libm's `expf` is a call per value; this is a handful of fused multiply-adds, and
//! within 2 ulp of it (tested).
//!
//! The method: x = n·ln 2 + r with n = round(x·log₂e) and |r| ≤ ln2/2 (ln 2 split in two
//! parts so that r is exact to f32 precision), eˣ = 2ⁿ·e^r with e^r from a degree-7
//! polynomial (1 + r + r²·(½ + r·(…))). Results below e^-86.5 ≈ 2.9e-38 are flushed to zero
//! (they never matter to a softmax or a SiLU); above f32's range they are +inf, NaN stays NaN.

/// Below this, eˣ is flushed to 0 (2^(n-1) would leave the normal exponents).
const LOWEST: f32 = -86.5;
/// Above this, eˣ overflows f32.
const HIGHEST: f32 = 88.722_84;
const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 = LN2_HI + LN2_LO, LN2_HI with few enough bits that n·LN2_HI is exact.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5·2²³: adding it rounds a float of magnitude < 2²² to an integer held in the low
/// mantissa bits.
const ROUNDER: f32 = 12_582_912.0;
/// Coefficients of (e^r − 1 − r) / r², highest degree first.
const POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// eˣ, computed as one lane of [`avx2::exp`].
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let t = x.mul_add(LOG2_E, ROUNDER);
    let n = t - ROUNDER;
    let r = n.mul_add(-LN2_HI, x);
    let r = n.mul_add(-LN2_LO, r);
    let mut p = POLY[0];
    for c in &POLY[1..] {
        p = p.mul_add(r, *c);
    }
    let y = p.mul_add(r * r, r) + 1.0;
    // 2^(n-1) from n's bits in t; y·2 is exact, so the product rounds once.
    let scale = f32::from_bits(
        (t.to_bits()
            .wrapping_sub(ROUNDER.to_bits())
            .wrapping_add(126))
            << 23,
    );
    let e = (y * 2.0) * scale;
    if x > HIGHEST {
        f32::INFINITY
    } else if x < LOWEST {
        0.0
    } else if x.is_nan() {
        x
    } else {
        e
    }
}

/// Whether the AVX2 lanes can run (checked once by the standard library, then cached).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// eˣ of eight lanes: [`super::exp`]'s steps, each lane-wise.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn exp(x: __m256) -> __m256 {
        let rounder = _mm256_set1_ps(ROUNDER);
        let t = _mm256_fmadd_ps(x, _mm256_set1_ps(LOG2_E), rounder);
        let n = _mm256_sub_ps(t, rounder);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(POLY[0]);
        for c in &POLY[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let y = _mm256_add_ps(
            _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
            _mm256_set1_ps(1.0),
        );
        let exponent = _mm256_add_epi32(
            _mm256_sub_epi32(
                _mm256_castps_si256(t),
                _mm256_set1_epi32(ROUNDER.to_bits() as i32),
            ),
            _mm256_set1_epi32(126),
        );
        let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(exponent));
        let e = _mm256_mul_ps(_mm256_add_ps(y, y), scale);
        let e = _mm256_blendv_ps(
            e,
            _mm256_set1_ps(f32::INFINITY),
            _mm256_cmp_ps::<_CMP_GT_OQ>(x, _mm256_set1_ps(HIGHEST)),
        );
        let e = _mm256_blendv_ps(
            e,
            _mm256_setzero_ps(),
            _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(LOWEST)),
        );
        _mm256_blendv_ps(e, x, _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x))
    }
}

/// Whether the AVX-512 lanes can run (F is all they use; AVX2, FMA and F16C come with it on
/// every CPU that has it, but are checked as the callers also use them).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512() -> bool {
    has_avx2_fma()
        && std::is_x86_feature_detected!("f16c")
        && std::is_x86_feature_detected!("avx512f")
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    /// eˣ of sixteen lanes: [`super::exp`]'s steps, each lane-wise.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn exp(x: __m512) -> __m512 {
        let rounder = _mm512_set1_ps(ROUNDER);
        let t = _mm512_fmadd_ps(x, _mm512_set1_ps(LOG2_E), rounder);
        let n = _mm512_sub_ps(t, rounder);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let mut p = _mm512_set1_ps(POLY[0]);
        for c in &POLY[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
        }
        let y = _mm512_add_ps(
            _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
            _mm512_set1_ps(1.0),
        );
        let exponent = _mm512_add_epi32(
            _mm512_sub_epi32(
                _mm512_castps_si512(t),
                _mm512_set1_epi32(ROUNDER.to_bits() as i32),
            ),
            _mm512_set1_epi32(126),
        );
        let scale = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(exponent));
        let e = _mm512_mul_ps(_mm512_add_ps(y, y), scale);
        let e = _mm512_mask_blend_ps(
            _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, _mm512_set1_ps(HIGHEST)),
            e,
            _mm512_set1_ps(f32::INFINITY),
        );
        let e = _mm512_mask_blend_ps(
            _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(LOWEST)),
            e,
            _mm512_setzero_ps(),
        );
        _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x), e, x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place between two finite floats of the same sign.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    fn sweep() -> impl Iterator<Item = f32> {
        let steps = 400_000;
        (0..=steps)
            .map(move |i| LOWEST + (HIGHEST - LOWEST) * i as f32 / steps as f32)
            .chain([0.0, -0.0, 1.0, -1.0, 1e-8, -1e-8, LOWEST, HIGHEST])
    }

    #[test]
    fn within_two_ulp_of_libm_over_the_whole_range() {
        let mut worst = 0;
        for x in sweep() {
            let (ours, libm) = (exp(x), x.exp());
            if libm >= f32::MIN_POSITIVE {
                worst = worst.max(ulps(ours, libm));
            }
        }
        assert!(worst <= 2, "worst error {worst} ulp");
    }

    #[test]
    fn edges_and_specials() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(88.7).is_finite() && exp(88.7) > 3.3e38);
    }

    /// Every value of the sweep and some specials, `N` at a time through `lanes`, must give
    /// the portable floats.
    #[cfg(target_arch = "x86_64")]
    fn lanes_match_portable<const N: usize>(lanes: impl Fn([f32; N]) -> [f32; N]) {
        let specials = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            88.8,
            -87.5,
        ];
        let values: Vec<f32> = sweep().chain(specials).collect();
        for chunk in values.chunks(N) {
            let mut x = [0f32; N];
            x[..chunk.len()].copy_from_slice(chunk);
            for (x, e) in x.iter().zip(lanes(x)) {
                assert_eq!(e.to_bits(), exp(*x).to_bits(), "exp({x}) in {N} lanes");
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_lanes_give_the_portable_floats() {
        use std::arch::x86_64::*;
        if has_avx2_fma() {
            lanes_match_portable(|x: [f32; 8]| {
                let mut e = [0f32; 8];
                // SAFETY: the CPU has AVX2 and FMA; both arrays hold eight floats.
                unsafe { _mm256_storeu_ps(e.as_mut_ptr(), avx2::exp(_mm256_loadu_ps(x.as_ptr()))) };
                e
            });
        }
        if has_avx512() {
            lanes_match_portable(|x: [f32; 16]| {
                let mut e = [0f32; 16];
                // SAFETY: the CPU has AVX-512 F; both arrays hold sixteen floats.
                unsafe {
                    _mm512_storeu_ps(e.as_mut_ptr(), avx512::exp(_mm512_loadu_ps(x.as_ptr())))
                };
                e
            });
        }
    }
}
