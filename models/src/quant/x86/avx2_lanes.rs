//! Batches of 8 activation rows on AVX2: the rows sit in the 8 lanes of a 256-bit register and
//! each weight row's 4-byte groups are broadcast against them (see [`super::lanes`]). AVX2's
//! byte product (maddubs) leaves 16-bit pair sums; for 4-bit weights the eight of a block fit
//! in 16 bits (|8·2·15·128| < 2¹⁵), so a block takes one widening multiply per weight row
//! instead of one per product, and no horizontal sums. On CPUs that run vector integer
//! multiplies on one 128-bit pipe (Zen 1) that is what bounds a batched matmul. Only 4-bit
//! weights come here: Q8_0's pair sums fill 16 bits (in lanes, with the sign trick, a 49152×576
//! matmul of 16 rows took 1.6× as long on Zen 1), and Q6_K's 6-bit codes, two steps to 16 bits,
//! measured no faster than the row kernels (1536×768 at 16 rows: 750 µs either way). Per (weight
//! row, activation row) the block's exact integer sum then takes the portable kernel's f32
//! steps, so results equal the one-row kernels'.

use super::lanes::{GroupBlocks, LaneBlock, LanesOut, Unpacked, UnpackedFormat, UnpackedGroup};
use crate::quant::blocks::GROUP;
use std::arch::x86_64::*;

/// Activation rows per batch.
pub const LANES: usize = 8;

/// A row group's 8 weight rows · 8 activation rows into `out`, from exact per-block integer
/// sums. With `source`, each block is unpacked into `group` just before its use (the first
/// batch); without, `group` holds them from an earlier batch.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `a` has a lane block per block of the group; `out` can
/// take `out.acts` activation rows of `out.rows` values.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_lanes(
    group: &mut UnpackedGroup,
    source: Option<GroupBlocks<'_>>,
    a: &[LaneBlock<LANES>],
    out: LanesOut,
) {
    if let Some(source) = source {
        group.start(source, a.len());
    }
    // See the module comment: a format check per call, not per block.
    assert!(
        group.format == UnpackedFormat::Nibbles,
        "only 4-bit weights are given to the AVX2 lanes"
    );
    let mut acc = [_mm256_setzero_ps(); GROUP];
    for (b, ab) in a.iter().enumerate() {
        let unpacked = match source {
            Some(source) => group.unpack(source, b),
            None => group.blocks.get_unchecked(b),
        };
        let sums = nibble_sums(unpacked, ab);
        let (d_a, sum_a) = (
            _mm256_load_ps(ab.d.as_ptr()),
            _mm256_load_ps(ab.sum.as_ptr()),
        );
        // The portable kernel's steps in its order: ints·(d_w·d_a), then m_w·Σa.
        for (r, acc) in acc.iter_mut().enumerate() {
            let scale = _mm256_mul_ps(_mm256_set1_ps(unpacked.d[r]), d_a);
            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r]), scale, *acc);
            *acc = _mm256_fmadd_ps(_mm256_set1_ps(unpacked.m[r]), sum_a, *acc);
        }
    }
    store_transposed(acc, out);
}

/// Activation word k of the 8 lanes (values 4k..4k+4 of each row).
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn act_word(ab: &LaneBlock<LANES>, k: usize) -> __m256i {
    _mm256_load_si256(ab.q[k].as_ptr() as *const __m256i)
}

/// Weight row r's values 4k..4k+4 in every lane.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn weight_word(u: &Unpacked, r: usize, k: usize) -> __m256i {
    _mm256_set1_epi32(u.word(r, k))
}

/// 4-bit weights: each weight row's exact sum against the 8 lanes, pair sums kept in 16 bits
/// over the whole block (|8 · 2 · 15 · 128| < 2¹⁵) and widened once.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn nibble_sums(u: &Unpacked, ab: &LaneBlock<LANES>) -> [__m256i; GROUP] {
    let mut pairs = [_mm256_setzero_si256(); GROUP];
    for k in 0..8 {
        let a = act_word(ab, k);
        for (r, pairs) in pairs.iter_mut().enumerate() {
            *pairs = _mm256_add_epi16(*pairs, _mm256_maddubs_epi16(weight_word(u, r, k), a));
        }
    }
    let ones = _mm256_set1_epi16(1);
    pairs.map(|p| _mm256_madd_epi16(p, ones))
}

/// Writes `acc[r]` lane j to `out.at + j·stride + r`: in registers when the group has all its
/// rows (an 8 × 8 transpose, then a store of eight floats per activation row).
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn store_transposed(acc: [__m256; GROUP], out: LanesOut) {
    if out.rows < GROUP {
        let mut by_row = [[0f32; LANES]; GROUP];
        for (row, acc) in by_row.iter_mut().zip(acc) {
            _mm256_storeu_ps(row.as_mut_ptr(), acc);
        }
        out.write_each(&by_row);
        return;
    }
    // Within each 128-bit half (activation rows 0..4, then 4..8): pairs of weight rows, then
    // quads, so that quad[c] holds weight rows 0-3 of activation rows c and c + 4 and
    // quad[4 + c] rows 4-7.
    let pairs: [__m256; 8] = std::array::from_fn(|i| {
        let (a, b) = (acc[2 * (i / 2)], acc[2 * (i / 2) + 1]);
        if i.is_multiple_of(2) {
            _mm256_unpacklo_ps(a, b)
        } else {
            _mm256_unpackhi_ps(a, b)
        }
    });
    let quad = |first: usize, c: usize| {
        let (a, b) = (pairs[first + c / 2], pairs[first + 2 + c / 2]);
        if c.is_multiple_of(2) {
            _mm256_shuffle_ps::<0x44>(a, b)
        } else {
            _mm256_shuffle_ps::<0xEE>(a, b)
        }
    };
    for c in 0..4 {
        let (rows_0_3, rows_4_7) = (quad(0, c), quad(4, c));
        if c < out.acts {
            out.store_row(c, _mm256_permute2f128_ps::<0x20>(rows_0_3, rows_4_7));
        }
        if c + 4 < out.acts {
            out.store_row(c + 4, _mm256_permute2f128_ps::<0x31>(rows_0_3, rows_4_7));
        }
    }
}
