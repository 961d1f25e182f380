//! What the lane kernels ([`super::avx512_lanes`], [`super::avx2_lanes`]) share: a batch of
//! activation rows sits in the lanes of one register and each weight row's 4-byte groups are
//! broadcast against them, so a block needs no horizontal sums. Activation blocks come in lane
//! order ([`LaneBlock`]); a row group's weight blocks are unpacked to bytes once per matmul
//! ([`UnpackedGroup`]) and reused by every batch of rows.

use super::prefetch_next_group;
use crate::quant::blocks::{ActBlock, ByteGroup, NibbleGroup, SplitGroup, BLOCK, GROUP};
use std::arch::x86_64::*;

/// One block of up to `L` activation rows: `q[k][j]` holds values 4k..4k+4 of row j; per row,
/// `first_half` is 32·Σq over values 0..16 and `second_half` over 16..32 (Q6_K's corrections
/// for its unsigned codes). Every field is a whole number of 32-byte vectors for the lane
/// counts used (8 and 16), so each loads aligned.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
pub struct LaneBlock<const L: usize> {
    pub(super) q: [[i32; L]; BLOCK / 4],
    pub(super) d: [f32; L],
    pub(super) sum: [f32; L],
    pub(super) offset: [i32; L],
    pub(super) first_half: [i32; L],
    pub(super) second_half: [i32; L],
}

/// One block of up to `L` activation rows in lanes, from each row's quantized block; lanes
/// without a row hold zeros.
pub fn lane_block<'a, const L: usize>(rows: impl Iterator<Item = &'a ActBlock>) -> LaneBlock<L> {
    let mut lanes = LaneBlock {
        q: [[0; L]; BLOCK / 4],
        d: [0.0; L],
        sum: [0.0; L],
        offset: [0; L],
        first_half: [0; L],
        second_half: [0; L],
    };
    for (j, block) in rows.take(L).enumerate() {
        let words = block.lo[..16]
            .chunks_exact(4)
            .chain(block.hi[..16].chunks_exact(4));
        for (k, word) in words.enumerate() {
            lanes.q[k][j] =
                i32::from_le_bytes([word[0] as u8, word[1] as u8, word[2] as u8, word[3] as u8]);
        }
        lanes.d[j] = block.d;
        lanes.sum[j] = block.sum;
        lanes.offset[j] = block.offset;
        (lanes.first_half[j], lanes.second_half[j]) = block.split_corrections();
    }
    lanes
}

/// Unpacked weight bytes of one group block: `pairs[p][h]` = values 16h..16h+16 of row p
/// (bytes 0..16) then of row p + 4 (bytes 16..32).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(super) struct Unpacked {
    pub(super) pairs: [[[u8; 32]; 2]; 4],
    pub(super) d: [f32; GROUP],
    pub(super) m: [f32; GROUP],
}

impl Unpacked {
    /// Where weight row `r`'s values 4k..4k+4 start (four bytes, for a broadcast).
    pub(super) const fn word_offset(r: usize, k: usize) -> usize {
        let (pair, half) = (r % 4, r / 4);
        std::mem::offset_of!(Unpacked, pairs) + 64 * pair + 32 * (k / 4) + 16 * half + 4 * (k % 4)
    }

    /// Weight row `r`'s values 4k..4k+4, as four bytes in one i32.
    #[inline(always)]
    pub(super) fn word(&self, r: usize, k: usize) -> i32 {
        // SAFETY: word_offset(r, k) + 4 lies within `pairs` for r, k < 8.
        unsafe {
            ((self as *const Self as *const u8).add(Self::word_offset(r, k)) as *const i32)
                .read_unaligned()
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load_f16(p: &[half::f16; GROUP]) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p.as_ptr() as *const __m128i))
}

/// A row group's blocks unpacked once for every batch of activation rows (a prompt's rows
/// come in many batches).
#[derive(Default)]
pub struct UnpackedGroup {
    pub(super) blocks: Vec<Unpacked>,
    pub(super) format: UnpackedFormat,
}

/// What an unpacked block's bytes and scales hold.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
pub(super) enum UnpackedFormat {
    /// Q4_0/Q4_1: codes, d and m.
    #[default]
    Nibbles,
    /// Q8_0 taken as w + 128 (128·Σa comes off each block's sum): codes and d.
    Bytes,
    /// Q6_K: codes u (32·Σa of each half comes off that half's sum), d of the first half
    /// in `d` and of the second in `m`.
    Split,
}

/// A row group's blocks as stored (one group per block).
#[derive(Clone, Copy)]
pub enum GroupBlocks<'a> {
    /// Q4_0 / Q4_1.
    Nibbles(&'a [NibbleGroup]),
    /// Q8_0.
    Bytes(&'a [ByteGroup]),
    /// Q6_K: unsigned codes and a scale per half block.
    Split(&'a [SplitGroup]),
}

impl UnpackedGroup {
    /// Starts unpacking `n` blocks of `source` (room kept across groups of the same matrix).
    pub(super) fn start(&mut self, source: GroupBlocks<'_>, n: usize) {
        self.format = match source {
            GroupBlocks::Nibbles(_) => UnpackedFormat::Nibbles,
            GroupBlocks::Bytes(_) => UnpackedFormat::Bytes,
            GroupBlocks::Split(_) => UnpackedFormat::Split,
        };
        let empty = Unpacked {
            pairs: [[[0; 32]; 2]; 4],
            d: [0.0; GROUP],
            m: [0.0; GROUP],
        };
        self.blocks.resize(n, empty);
    }

    /// Unpacks block `b` of `source` (the one given to [`Self::start`]), asking for the next
    /// group's block `b` on the way.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `b` < the `n` given to `start`, and `source` has `n`
    /// blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub(super) unsafe fn unpack(&mut self, source: GroupBlocks<'_>, b: usize) -> &Unpacked {
        let n = self.blocks.len();
        let u = self.blocks.get_unchecked_mut(b);
        match source {
            GroupBlocks::Nibbles(w) => {
                prefetch_next_group(w, b, n);
                unpack_nibbles(w.get_unchecked(b), u)
            }
            GroupBlocks::Bytes(w) => {
                prefetch_next_group(w, b, n);
                unpack_bytes(w.get_unchecked(b), u)
            }
            GroupBlocks::Split(w) => {
                prefetch_next_group(w, b, n);
                unpack_split(w.get_unchecked(b), u)
            }
        }
        u
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn unpack_nibbles(g: &NibbleGroup, u: &mut Unpacked) {
    let mask = _mm256_set1_epi8(0x0F);
    for p in 0..4 {
        let packed = _mm256_loadu_si256(g.qs[p].as_ptr() as *const __m256i);
        let lo = _mm256_and_si256(packed, mask);
        let hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask);
        _mm256_store_si256(u.pairs[p][0].as_mut_ptr() as *mut __m256i, lo);
        _mm256_store_si256(u.pairs[p][1].as_mut_ptr() as *mut __m256i, hi);
    }
    _mm256_store_ps(u.d.as_mut_ptr(), load_f16(&g.d));
    _mm256_store_ps(u.m.as_mut_ptr(), load_f16(&g.m));
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn unpack_bytes(g: &ByteGroup, u: &mut Unpacked) {
    let flip = _mm256_set1_epi8(-128);
    for p in 0..4 {
        for (h, half) in [&g.lo[p], &g.hi[p]].into_iter().enumerate() {
            let signed = _mm256_loadu_si256(half.as_ptr() as *const __m256i);
            let unsigned = _mm256_xor_si256(signed, flip);
            _mm256_store_si256(u.pairs[p][h].as_mut_ptr() as *mut __m256i, unsigned);
        }
    }
    _mm256_store_ps(u.d.as_mut_ptr(), load_f16(&g.d));
    _mm256_store_ps(u.m.as_mut_ptr(), _mm256_setzero_ps());
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn unpack_split(g: &SplitGroup, u: &mut Unpacked) {
    for p in 0..4 {
        for (h, half) in [&g.lo[p], &g.hi[p]].into_iter().enumerate() {
            let codes = _mm256_loadu_si256(half.as_ptr() as *const __m256i);
            _mm256_store_si256(u.pairs[p][h].as_mut_ptr() as *mut __m256i, codes);
        }
    }
    u.d = g.d_lo;
    u.m = g.d_hi;
}

/// Where a group's results go: activation row j's value for weight row r at
/// `at + j·stride + r`, for the group's first `rows` weight rows and the first `acts`
/// activation rows (the lanes past them are padding). With a `residual` (not null), each
/// value written is the one at the same offset from it plus the result.
#[derive(Clone, Copy)]
pub struct LanesOut {
    pub at: *mut f32,
    pub residual: *const f32,
    pub stride: usize,
    pub rows: usize,
    pub acts: usize,
}

impl LanesOut {
    /// Writes `by_row[r][j]` (weight row r, activation row j) value by value: for a group
    /// with fewer than 8 rows or a batch with padding lanes.
    ///
    /// # Safety
    /// `self` spans `acts` activation rows of `rows` values.
    pub(super) unsafe fn write_each<const L: usize>(self, by_row: &[[f32; L]; GROUP]) {
        for j in 0..self.acts {
            for (r, row) in by_row.iter().enumerate().take(self.rows) {
                let at = j * self.stride + r;
                *self.at.add(at) = if self.residual.is_null() {
                    row[j]
                } else {
                    *self.residual.add(at) + row[j]
                };
            }
        }
    }

    /// Writes activation row j's eight results (one per weight row), plus the residual.
    ///
    /// # Safety
    /// The CPU has AVX; the group has 8 rows and j < `acts`.
    #[target_feature(enable = "avx")]
    #[inline]
    pub(super) unsafe fn store_row(self, j: usize, values: __m256) {
        let at = j * self.stride;
        let values = if self.residual.is_null() {
            values
        } else {
            _mm256_add_ps(_mm256_loadu_ps(self.residual.add(at)), values)
        };
        _mm256_storeu_ps(self.at.add(at), values);
    }
}
