//! x86-64 kernels, one module per instruction set (chosen at run time by
//! [`super::Kernel::detected`]). One call multiplies the 8 weight rows of a row group with `R`
//! activation rows: each weight block is loaded and unpacked once for all of them, and for each
//! activation row every weight row's exact integer block sum lands in its own lane, then takes
//! the same f32 steps as the portable kernel ([`super::blocks`]): results are bit-identical
//! across kernels and whatever `R` a row is computed in.

use super::blocks::{ActBlock, ByteGroup, NibbleGroup, SplitGroup, GROUP};
use std::arch::x86_64::*;

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
/// (`x`) and signed bytes (`y`), four adjacent ones per i32 lane, to `acc`. Q8_0 weights are
/// signed, so `byte_operand` makes the unsigned operand of a weight vector `w`, `byte_dot`
/// multiplies it (`wu`, with the signed weights `ws`) into activations `a`, and `byte_fix`
/// corrects a lane sum `s` of activation block `ab` for the operand's transformation.
macro_rules! kernels {
    (
        $module:ident,
        $features:literal,
        dot_acc: |$acc:ident, $x:ident, $y:ident| $dot:expr,
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
                        let mut s = [_mm256_setzero_si256(); 4];
                        for p in 0..4 {
                            s[p] = dot_acc(dot_acc(s[p], lo[p], alo), hi[p], ahi);
                        }
                        scale_into(row_sums(s), d, ab, &mut acc[r]);
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
// exact here: |15·127·2| and |128·127·2| fit) then madd with ones. Q8_0 takes the sign trick:
// |w| · (a with w's sign).
kernels!(
    avx2,
    "avx2,fma,f16c",
    dot_acc: |acc, x, y| _mm256_add_epi32(
        acc,
        _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), _mm256_set1_epi16(1))
    ),
    byte_operand: |w| _mm256_abs_epi8(w),
    byte_dot: |acc, wu, ws, a| dot_acc(acc, wu, _mm256_sign_epi8(a, ws)),
    byte_fix: |s, ab| s,
);

// The VNNI kernels take Q8_0 weights as unsigned bytes w + 128 and subtract 128·Σa per block.
kernels!(
    avx_vnni,
    "avx2,fma,f16c,avxvnni",
    dot_acc: |acc, x, y| _mm256_dpbusd_avx_epi32(acc, x, y),
    byte_operand: |w| _mm256_xor_si256(w, _mm256_set1_epi8(-128)),
    byte_dot: |acc, wu, ws, a| dot_acc(acc, wu, a),
    byte_fix: |s, ab| _mm256_sub_epi32(s, _mm256_set1_epi32(ab.offset)),
);
kernels!(
    avx512_vnni,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    dot_acc: |acc, x, y| _mm256_dpbusd_epi32(acc, x, y),
    byte_operand: |w| _mm256_xor_si256(w, _mm256_set1_epi8(-128)),
    byte_dot: |acc, wu, ws, a| dot_acc(acc, wu, a),
    byte_fix: |s, ab| _mm256_sub_epi32(s, _mm256_set1_epi32(ab.offset)),
);

/// Batches of 16 activation rows on AVX-512: the activation rows sit in the 16 lanes of
/// a 512-bit register and each weight row's 4-byte groups are broadcast against them, so a
/// block costs one multiply-add per 4 values for 16 rows and no horizontal sums. Per (weight
/// row, activation row) the block's exact integer sum then takes the portable kernel's f32
/// steps, so results equal the one-row kernels'.
pub mod avx512_lanes {
    use super::*;
    use crate::quant::blocks::BLOCK;

    /// Activation rows per batch.
    pub const LANES: usize = 16;

    /// One block of 16 activation rows: `q[k][j]` holds values 4k..4k+4 of row j; per row,
    /// `first_half` is 32·Σq over values 0..16 and `second_half` over 16..32 (Q6_K's
    /// corrections for its unsigned codes).
    #[derive(Debug, Clone, Copy)]
    #[repr(C, align(64))]
    pub struct LaneBlock {
        q: [[i32; LANES]; BLOCK / 4],
        d: [f32; LANES],
        sum: [f32; LANES],
        offset: [i32; LANES],
        first_half: [i32; LANES],
        second_half: [i32; LANES],
    }

    /// One block of up to 16 activation rows in lanes, from each row's quantized block;
    /// lanes without a row hold zeros.
    pub fn lane_block<'a>(rows: impl Iterator<Item = &'a ActBlock>) -> LaneBlock {
        let mut lanes = LaneBlock {
            q: [[0; LANES]; BLOCK / 4],
            d: [0.0; LANES],
            sum: [0.0; LANES],
            offset: [0; LANES],
            first_half: [0; LANES],
            second_half: [0; LANES],
        };
        for (j, block) in rows.take(LANES).enumerate() {
            let words = block.lo[..16]
                .chunks_exact(4)
                .chain(block.hi[..16].chunks_exact(4));
            for (k, word) in words.enumerate() {
                lanes.q[k][j] = i32::from_le_bytes([
                    word[0] as u8,
                    word[1] as u8,
                    word[2] as u8,
                    word[3] as u8,
                ]);
            }
            lanes.d[j] = block.d;
            lanes.sum[j] = block.sum;
            lanes.offset[j] = block.offset;
            (lanes.first_half[j], lanes.second_half[j]) = block.split_corrections();
        }
        lanes
    }

    /// Unpacked unsigned weight bytes of one group block: `pairs[p][h]` = values 16h..16h+16
    /// of row p (bytes 0..16) then of row p + 4 (bytes 16..32).
    #[derive(Clone, Copy)]
    #[repr(C, align(64))]
    struct Unpacked {
        pairs: [[[u8; 32]; 2]; 4],
        d: [f32; GROUP],
        m: [f32; GROUP],
    }

    impl Unpacked {
        /// Where weight row `r`'s values 4k..4k+4 start (four bytes, for a broadcast).
        const fn word_offset(r: usize, k: usize) -> usize {
            let (pair, half) = (r % 4, r / 4);
            std::mem::offset_of!(Unpacked, pairs)
                + 64 * pair
                + 32 * (k / 4)
                + 16 * half
                + 4 * (k % 4)
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load_f16(p: &[half::f16; GROUP]) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.as_ptr() as *const __m128i))
    }

    /// A row group's blocks unpacked once for every batch of 16 activation rows (a prompt's
    /// rows come in many batches).
    #[derive(Default)]
    pub struct UnpackedGroup {
        blocks: Vec<Unpacked>,
        format: UnpackedFormat,
    }

    /// What an unpacked block's bytes and scales hold.
    #[derive(Default, Clone, Copy, PartialEq, Eq)]
    enum UnpackedFormat {
        /// Q4_0/Q4_1: codes, d and m.
        #[default]
        Nibbles,
        /// Q8_0 taken as w + 128 (128·Σa comes off each block's sum): codes and d.
        Bytes,
        /// Q6_K: codes u (32·Σa of each half comes off that half's sum), d of the first half
        /// in `d` and of the second in `m`.
        Split,
    }

    impl UnpackedGroup {
        /// Room for `n` blocks (kept across groups of the same matrix).
        fn make_room(&mut self, n: usize) {
            let empty = Unpacked {
                pairs: [[[0; 32]; 2]; 4],
                d: [0.0; GROUP],
                m: [0.0; GROUP],
            };
            self.blocks.resize(n, empty);
        }
    }

    /// A row group's blocks as stored (one group per block).
    #[derive(Clone, Copy)]
    pub enum GroupBlocks<'a> {
        /// Q4_0 / Q4_1.
        Nibbles(&'a [NibbleGroup]),
        /// Q8_0: taken as unsigned bytes w + 128, so 128·Σa comes off each block's sum.
        Bytes(&'a [ByteGroup]),
        /// Q6_K: unsigned codes and a scale per half block.
        Split(&'a [SplitGroup]),
    }

    impl GroupBlocks<'_> {
        fn format(self) -> UnpackedFormat {
            match self {
                GroupBlocks::Nibbles(_) => UnpackedFormat::Nibbles,
                GroupBlocks::Bytes(_) => UnpackedFormat::Bytes,
                GroupBlocks::Split(_) => UnpackedFormat::Split,
            }
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

    /// A row group's 8 weight rows · 16 activation rows into `out`, from exact per-block
    /// integer sums (each weight row's 4-byte groups broadcast against the 16 rows' 4-byte
    /// groups). With `source`, each block is unpacked into `group` just before its use (the
    /// first batch: reading the weights overlaps the arithmetic); without, `group` holds them
    /// from an earlier batch.
    ///
    /// # Safety
    /// The CPU has AVX-512 F and VNNI; `a` has a lane block per block of the group; `out` can
    /// take `out.acts` activation rows of `out.rows` values.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vnni")]
    pub unsafe fn dot_lanes(
        group: &mut UnpackedGroup,
        source: Option<GroupBlocks<'_>>,
        a: &[LaneBlock],
        out: LanesOut,
    ) {
        if let Some(source) = source {
            group.format = source.format();
            group.make_room(a.len());
        }
        let bytes = group.format == UnpackedFormat::Bytes;
        let mut acc = [_mm512_setzero_ps(); GROUP];
        for (b, ab) in a.iter().enumerate() {
            let unpacked = group.blocks.get_unchecked_mut(b);
            match source {
                Some(GroupBlocks::Nibbles(w)) => {
                    prefetch_next_group(w, b, a.len());
                    unpack_nibbles(w.get_unchecked(b), unpacked)
                }
                Some(GroupBlocks::Bytes(w)) => {
                    prefetch_next_group(w, b, a.len());
                    unpack_bytes(w.get_unchecked(b), unpacked)
                }
                Some(GroupBlocks::Split(w)) => {
                    prefetch_next_group(w, b, a.len());
                    unpack_split(w.get_unchecked(b), unpacked)
                }
                None => {}
            }
            let acts: [__m512i; 8] =
                std::array::from_fn(|k| _mm512_load_si512(ab.q[k].as_ptr() as *const _));
            let d_a = _mm512_load_ps(ab.d.as_ptr());
            if group.format == UnpackedFormat::Split {
                let (first, second) = split_block_sums(unpacked, &acts);
                let fix_first = _mm512_load_si512(ab.first_half.as_ptr() as *const _);
                let fix_second = _mm512_load_si512(ab.second_half.as_ptr() as *const _);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let ints = _mm512_sub_epi32(first[r], fix_first);
                    let scale = _mm512_mul_ps(_mm512_set1_ps(unpacked.d[r]), d_a);
                    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ints), scale, *acc);
                    let ints = _mm512_sub_epi32(second[r], fix_second);
                    let scale = _mm512_mul_ps(_mm512_set1_ps(unpacked.m[r]), d_a);
                    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ints), scale, *acc);
                }
                continue;
            }
            let sum_a = _mm512_load_ps(ab.sum.as_ptr());
            let sums = block_sums(unpacked, &acts);
            for ((r, acc), mut ints) in acc.iter_mut().enumerate().zip(sums) {
                if bytes {
                    ints =
                        _mm512_sub_epi32(ints, _mm512_load_si512(ab.offset.as_ptr() as *const _));
                }
                let scale = _mm512_mul_ps(_mm512_set1_ps(unpacked.d[r]), d_a);
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ints), scale, *acc);
                // Q8_0 has no m_w: skipped, as the row kernels skip it.
                if !bytes {
                    *acc = _mm512_fmadd_ps(_mm512_set1_ps(unpacked.m[r]), sum_a, *acc);
                }
            }
        }
        store_transposed(acc, out);
    }

    /// One step of [`block_sums`]: weight rows 0..8's values 4k..4k+4 against activation word k
    /// of the 16 lanes, each into its own row's sums.
    macro_rules! sums_step {
        ($u:expr, $act:expr, $sums:ident, $k:literal) => {
            std::arch::asm!(
                "vpbroadcastd {w}, dword ptr [{u} + {o0}]",
                "vpdpbusd {s0}, {w}, {a}",
                "vpbroadcastd {w}, dword ptr [{u} + {o1}]",
                "vpdpbusd {s1}, {w}, {a}",
                "vpbroadcastd {w}, dword ptr [{u} + {o2}]",
                "vpdpbusd {s2}, {w}, {a}",
                "vpbroadcastd {w}, dword ptr [{u} + {o3}]",
                "vpdpbusd {s3}, {w}, {a}",
                "vpbroadcastd {w}, dword ptr [{u} + {o4}]",
                "vpdpbusd {s4}, {w}, {a}",
                "vpbroadcastd {w}, dword ptr [{u} + {o5}]",
                "vpdpbusd {s5}, {w}, {a}",
                "vpbroadcastd {w}, dword ptr [{u} + {o6}]",
                "vpdpbusd {s6}, {w}, {a}",
                "vpbroadcastd {w}, dword ptr [{u} + {o7}]",
                "vpdpbusd {s7}, {w}, {a}",
                u = in(reg) $u,
                a = in(zmm_reg) $act,
                w = out(zmm_reg) _,
                s0 = inout(zmm_reg) $sums[0],
                s1 = inout(zmm_reg) $sums[1],
                s2 = inout(zmm_reg) $sums[2],
                s3 = inout(zmm_reg) $sums[3],
                s4 = inout(zmm_reg) $sums[4],
                s5 = inout(zmm_reg) $sums[5],
                s6 = inout(zmm_reg) $sums[6],
                s7 = inout(zmm_reg) $sums[7],
                o0 = const Unpacked::word_offset(0, $k),
                o1 = const Unpacked::word_offset(1, $k),
                o2 = const Unpacked::word_offset(2, $k),
                o3 = const Unpacked::word_offset(3, $k),
                o4 = const Unpacked::word_offset(4, $k),
                o5 = const Unpacked::word_offset(5, $k),
                o6 = const Unpacked::word_offset(6, $k),
                o7 = const Unpacked::word_offset(7, $k),
                options(nostack, readonly, preserves_flags, pure),
            )
        };
    }

    /// Each weight row's exact integer sum against the 16 lanes of one block. In assembly, a
    /// step per activation word with the eight rows innermost: eight independent chains of
    /// multiply-adds side by side in program order, so their latency overlaps without a deep
    /// out-of-order window, and every weight word broadcast straight from memory (written with
    /// intrinsics in this order, the compiler hoists the broadcasts into spilled registers).
    /// Row after row, as before, 3072×576 Q4_1 at 16 rows took 200 µs on one thread and 142 µs
    /// on two; this way 176 µs and 111 µs.
    #[target_feature(enable = "avx512f,avx512vnni")]
    #[inline]
    unsafe fn block_sums(unpacked: &Unpacked, acts: &[__m512i; 8]) -> [__m512i; GROUP] {
        let u = unpacked as *const Unpacked;
        let mut sums = [_mm512_setzero_si512(); GROUP];
        sums_step!(u, acts[0], sums, 0);
        sums_step!(u, acts[1], sums, 1);
        sums_step!(u, acts[2], sums, 2);
        sums_step!(u, acts[3], sums, 3);
        sums_step!(u, acts[4], sums, 4);
        sums_step!(u, acts[5], sums, 5);
        sums_step!(u, acts[6], sums, 6);
        sums_step!(u, acts[7], sums, 7);
        sums
    }

    /// [`block_sums`] for Q6_K: each weight row's sums over values 0..16 and over 16..32 apart.
    #[target_feature(enable = "avx512f,avx512vnni")]
    #[inline]
    unsafe fn split_block_sums(
        unpacked: &Unpacked,
        acts: &[__m512i; 8],
    ) -> ([__m512i; GROUP], [__m512i; GROUP]) {
        let u = unpacked as *const Unpacked;
        let mut first = [_mm512_setzero_si512(); GROUP];
        let mut second = [_mm512_setzero_si512(); GROUP];
        sums_step!(u, acts[0], first, 0);
        sums_step!(u, acts[1], first, 1);
        sums_step!(u, acts[2], first, 2);
        sums_step!(u, acts[3], first, 3);
        sums_step!(u, acts[4], second, 4);
        sums_step!(u, acts[5], second, 5);
        sums_step!(u, acts[6], second, 6);
        sums_step!(u, acts[7], second, 7);
        (first, second)
    }

    /// Writes `acc[r]` lane j to `out.at + j·stride + r`: in registers when the group has all
    /// its rows (an 8 × 16 transpose, then a store of eight floats per activation row).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vnni")]
    #[inline]
    unsafe fn store_transposed(acc: [__m512; GROUP], out: LanesOut) {
        if out.rows < GROUP {
            let mut by_row = [[0f32; LANES]; GROUP];
            for (row, acc) in by_row.iter_mut().zip(acc) {
                _mm512_storeu_ps(row.as_mut_ptr(), acc);
            }
            for j in 0..out.acts {
                for (r, row) in by_row.iter().enumerate().take(out.rows) {
                    let at = j * out.stride + r;
                    *out.at.add(at) = if out.residual.is_null() {
                        row[j]
                    } else {
                        *out.residual.add(at) + row[j]
                    };
                }
            }
            return;
        }
        // Within each 128-bit lane L (activation rows 4L..4L+4): pairs of weight rows, then
        // quads, so that quad[c] holds weight rows 0-3 of activation row 4L + c and quad[4 + c]
        // rows 4-7.
        let pairs: [__m512; 8] = std::array::from_fn(|i| {
            let (a, b) = (acc[2 * (i / 2)], acc[2 * (i / 2) + 1]);
            if i.is_multiple_of(2) {
                _mm512_unpacklo_ps(a, b)
            } else {
                _mm512_unpackhi_ps(a, b)
            }
        });
        let quad = |first: usize, c: usize| {
            let (a, b) = (pairs[first + c / 2], pairs[first + 2 + c / 2]);
            if c.is_multiple_of(2) {
                _mm512_shuffle_ps::<0x44>(a, b)
            } else {
                _mm512_shuffle_ps::<0xEE>(a, b)
            }
        };
        let low_lanes = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
        let high_lanes =
            _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
        for c in 0..4 {
            let (rows_0_3, rows_4_7) = (quad(0, c), quad(4, c));
            // [L0 of both, L1 of both] and [L2 of both, L3 of both]: activation rows c, 4 + c,
            // 8 + c and 12 + c, eight weight rows each.
            for (half, lanes) in [low_lanes, high_lanes].into_iter().enumerate() {
                let both = _mm512_permutex2var_ps(rows_0_3, lanes, rows_4_7);
                let j = 8 * half + c;
                let store = |j: usize, values: __m256| {
                    let at = j * out.stride;
                    let values = if out.residual.is_null() {
                        values
                    } else {
                        _mm256_add_ps(_mm256_loadu_ps(out.residual.add(at)), values)
                    };
                    _mm256_storeu_ps(out.at.add(at), values);
                };
                if j < out.acts {
                    store(j, _mm512_castps512_ps256(both));
                }
                if j + 4 < out.acts {
                    let upper = _mm512_extractf64x4_pd::<1>(_mm512_castps_pd(both));
                    store(j + 4, _mm256_castpd_ps(upper));
                }
            }
        }
    }
}

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
