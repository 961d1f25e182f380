//! Weight and activation layouts, and the portable (scalar) kernels.
//!
//! Weights keep GGML's values and scales but are regrouped at load time: the same block of
//! [`GROUP`] consecutive rows is stored together, so one SIMD dot product covers eight weight
//! rows and every row's exact integer block sum comes out in its own vector lane. A row's
//! result is then the same arithmetic whether one activation row or a batch shares the
//! unpacked weights. Activations are quantized per 32-value block to 8 bits with f32 scales
//! (finer than GGML's f16 Q8_0/Q8_1).

use half::f16;

/// Values per block in every format here.
pub const BLOCK: usize = 32;

/// Weight rows stored together, one per vector lane.
pub const GROUP: usize = 8;

/// Rows `p` and `p + 4` of a group share pair `p` of the packed storage, so that the kernels'
/// pairwise reductions leave row `r` in lane `r`.
const PAIRS: usize = GROUP / 2;

/// One block of 8 weight rows in Q4_0 or Q4_1: value = d·q + m for 4-bit q (Q4_0's m is −8·d,
/// exact in f16). `qs[p]` is row p's 16 GGML bytes then row p + 4's; in each byte the low
/// nibble is value j and the high nibble value j + 16.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct NibbleGroup {
    pub d: [f16; GROUP],
    pub m: [f16; GROUP],
    pub qs: [[u8; BLOCK]; PAIRS],
}

/// One block of 8 weight rows in Q8_0: value = d·q. `lo[p]` holds values 0..16 of row p then
/// of row p + 4, `hi[p]` values 16..32.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct ByteGroup {
    pub d: [f16; GROUP],
    pub lo: [[i8; BLOCK]; PAIRS],
    pub hi: [[i8; BLOCK]; PAIRS],
}

/// One block of 8 weight rows in Q6_K: values 0..16 of row r are `d_lo[r]`·(u − 32), values
/// 16..32 `d_hi[r]`·(u − 32), for 6-bit codes u (0..=63) laid out as [`ByteGroup`]'s bytes. The
/// scales are Q6_K's d·sc products, exact in f32.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct SplitGroup {
    pub d_lo: [f32; GROUP],
    pub d_hi: [f32; GROUP],
    pub lo: [[u8; BLOCK]; PAIRS],
    pub hi: [[u8; BLOCK]; PAIRS],
}

/// The code offset of Q6_K: value = scale·(u − 32).
const SPLIT_CODE_OFFSET: i32 = 32;

const _: () = assert!(std::mem::size_of::<NibbleGroup>() == 20 * GROUP);
const _: () = assert!(std::mem::size_of::<ByteGroup>() == 34 * GROUP);

/// Storage pair and half (0 or 1) of row `lane` of a group.
fn pair_of(lane: usize) -> (usize, usize) {
    (lane % PAIRS, lane / PAIRS)
}

/// GGML block bytes of each row of one row group (`rows[k]` is lane k; missing rows are zero).
pub fn nibble_group(rows: &[&[u8]], offset_from_d: bool) -> NibbleGroup {
    let mut group = NibbleGroup {
        d: [f16::ZERO; GROUP],
        m: [f16::ZERO; GROUP],
        qs: [[0; BLOCK]; PAIRS],
    };
    for (lane, b) in rows.iter().enumerate() {
        let d = f16::from_le_bytes([b[0], b[1]]);
        // Q4_0 (18 bytes: d, qs) has value d·(q − 8); Q4_1 (20 bytes: d, m, qs) has d·q + m.
        let (m, qs) = if offset_from_d {
            (f16::from_f32(-8.0 * d.to_f32()), &b[2..18])
        } else {
            (f16::from_le_bytes([b[2], b[3]]), &b[4..20])
        };
        let (pair, half) = pair_of(lane);
        group.d[lane] = d;
        group.m[lane] = m;
        group.qs[pair][half * 16..half * 16 + 16].copy_from_slice(qs);
    }
    group
}

/// As [`nibble_group`], for Q8_0 blocks (34 bytes: d, 32 signed bytes).
pub fn byte_group(rows: &[&[u8]]) -> ByteGroup {
    let mut group = ByteGroup {
        d: [f16::ZERO; GROUP],
        lo: [[0; BLOCK]; PAIRS],
        hi: [[0; BLOCK]; PAIRS],
    };
    for (lane, b) in rows.iter().enumerate() {
        let (pair, half) = pair_of(lane);
        group.d[lane] = f16::from_le_bytes([b[0], b[1]]);
        for j in 0..16 {
            group.lo[pair][half * 16 + j] = b[2 + j] as i8;
            group.hi[pair][half * 16 + j] = b[18 + j] as i8;
        }
    }
    group
}

/// Values in a Q4_K super-block, and its bytes: d and dmin (f16), twelve bytes packing eight
/// 6-bit sub-block scales and eight 6-bit mins, then 128 bytes of 4-bit values.
pub const Q4K_VALUES: usize = 256;
pub const Q4K_BYTES: usize = 144;

/// Bytes of a GGML Q4_0 block (d, 16 bytes of nibbles) and of a Q4_1 block (d, m, the same).
pub const Q4_0_BYTES: usize = 18;
pub const Q4_1_BYTES: usize = 20;

/// Q4_K rows (whole super-blocks) rewritten as Q4_1 blocks, which the nibble kernels take: each
/// 32-value sub-block has value d·sc·q − dmin·min for 4-bit q, i.e. Q4_1's d'·q + m' with
/// d' = d·sc and m' = −dmin·min. Those two are stored in f16 as Q4_1's are (relative rounding
/// at most 2⁻¹¹, where the format's own 6-bit scales step by 1/63); the values are unchanged.
pub fn q4k_as_q4_1(super_blocks: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(super_blocks.len() / Q4K_BYTES * 8 * Q4_1_BYTES);
    for sb in super_blocks.chunks_exact(Q4K_BYTES) {
        let d = f16::from_le_bytes([sb[0], sb[1]]).to_f32();
        let dmin = f16::from_le_bytes([sb[2], sb[3]]).to_f32();
        let packed: &[u8; 12] = sb[4..16].try_into().expect("12 scale bytes");
        let qs = &sb[16..];
        for sub in 0..8 {
            let (scale, min) = q4k_scale_and_min(packed, sub);
            out.extend_from_slice(&f16::from_f32(d * scale as f32).to_le_bytes());
            out.extend_from_slice(&f16::from_f32(-dmin * min as f32).to_le_bytes());
            // Sub-blocks 2k and 2k + 1 are the low and high nibbles of bytes 32k..32k + 32.
            let shift = 4 * (sub % 2);
            let value = |l: usize| (qs[32 * (sub / 2) + l] >> shift) & 0x0F;
            out.extend((0..16).map(|j| value(j) | (value(j + 16) << 4)));
        }
    }
    out
}

/// Bytes of a GGML Q5_0 block (d, 32 high bits, 16 bytes of low nibbles) and of a Q8_0 block
/// (d, 32 signed bytes).
pub const Q5_0_BYTES: usize = 22;
pub const Q8_0_BYTES: usize = 34;

/// Q5_0 blocks rewritten as Q8_0 blocks, which the byte kernels take: value d·(q − 16) for 5-bit
/// q is Q8_0's d·q' with q' = q − 16 in −16..=15, so d and every value are kept exactly.
pub fn q5_0_as_q8_0(blocks: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(blocks.len() / Q5_0_BYTES * Q8_0_BYTES);
    for block in blocks.chunks_exact(Q5_0_BYTES) {
        out.extend_from_slice(&block[..2]);
        let high_bits = u32::from_le_bytes(block[2..6].try_into().expect("four bytes"));
        let qs = &block[6..];
        // Value j's low four bits are byte j's low nibble (j < 16) or byte j − 16's high one;
        // its fifth bit is bit j of the 32 high bits.
        out.extend((0..32).map(|j| {
            let low = if j < 16 {
                qs[j] & 0x0F
            } else {
                qs[j - 16] >> 4
            };
            let fifth = ((high_bits >> j) & 1) as u8;
            ((low | (fifth << 4)) as i8 - 16) as u8
        }));
    }
    out
}

/// Values in a Q6_K super-block, and its bytes: 128 bytes of low nibbles, 64 of high bit
/// pairs, sixteen i8 scales (one per 16 values), then d (f16).
pub const Q6K_VALUES: usize = 256;
pub const Q6K_BYTES: usize = 210;

/// One 32-value block of a Q6_K row: its codes and its halves' scales (see [`SplitGroup`]).
#[derive(Debug, Clone, Copy)]
pub struct SplitBlock {
    d_lo: f32,
    d_hi: f32,
    u: [u8; BLOCK],
}

/// A Q6_K super-block's eight 32-value blocks. Values 128h + 32t + l (h < 2, t < 4, l < 32)
/// have code (nibble t / 2 of low byte 64h + 32(t % 2) + l) | (bit pair t of high byte 32h + l)
/// << 4 and scale d·sc[8h + 2t + l / 16].
pub fn q6k_blocks(super_block: &[u8]) -> [SplitBlock; Q6K_VALUES / BLOCK] {
    let (low, high, scales) = (
        &super_block[..128],
        &super_block[128..192],
        &super_block[192..208],
    );
    let d = f16::from_le_bytes([super_block[208], super_block[209]]).to_f32();
    std::array::from_fn(|k| {
        let (h, t) = (k / 4, k % 4);
        let scale = |half: usize| d * scales[8 * h + 2 * t + half] as i8 as f32;
        SplitBlock {
            d_lo: scale(0),
            d_hi: scale(1),
            u: std::array::from_fn(|l| {
                let nibble = (low[64 * h + 32 * (t % 2) + l] >> (4 * (t / 2))) & 0x0F;
                let pair = (high[32 * h + l] >> (2 * t)) & 3;
                nibble | (pair << 4)
            }),
        }
    })
}

/// Blocks of each row of one row group (`rows[k]` is lane k; missing rows are zero).
pub fn split_group(rows: &[&SplitBlock]) -> SplitGroup {
    let mut group = SplitGroup {
        d_lo: [0.0; GROUP],
        d_hi: [0.0; GROUP],
        lo: [[SPLIT_CODE_OFFSET as u8; BLOCK]; PAIRS],
        hi: [[SPLIT_CODE_OFFSET as u8; BLOCK]; PAIRS],
    };
    for (lane, b) in rows.iter().enumerate() {
        let (pair, half) = pair_of(lane);
        group.d_lo[lane] = b.d_lo;
        group.d_hi[lane] = b.d_hi;
        group.lo[pair][half * 16..half * 16 + 16].copy_from_slice(&b.u[..16]);
        group.hi[pair][half * 16..half * 16 + 16].copy_from_slice(&b.u[16..]);
    }
    group
}

/// Sub-block `j`'s 6-bit scale and min: the first four pairs are the low six bits of bytes
/// j and j + 4; the last four take four bits from byte j + 4 and their top two bits from the
/// spare top bits of bytes j − 4 (scale) and j (min).
fn q4k_scale_and_min(packed: &[u8; 12], j: usize) -> (u8, u8) {
    if j < 4 {
        (packed[j] & 63, packed[j + 4] & 63)
    } else {
        (
            (packed[j + 4] & 0x0F) | ((packed[j - 4] >> 6) << 4),
            (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4),
        )
    }
}

/// Values of row `lane` of one block, GGML's formulas: d·q + m.
pub fn dequantize_nibbles(g: &NibbleGroup, lane: usize, out: &mut [f32]) {
    let (pair, half) = pair_of(lane);
    let (d, m) = (g.d[lane].to_f32(), g.m[lane].to_f32());
    for (j, &byte) in g.qs[pair][half * 16..half * 16 + 16].iter().enumerate() {
        out[j] = (byte & 0x0F) as f32 * d + m;
        out[j + 16] = (byte >> 4) as f32 * d + m;
    }
}

/// Values of row `lane` of one block: d·q.
pub fn dequantize_bytes(g: &ByteGroup, lane: usize, out: &mut [f32]) {
    let (pair, half) = pair_of(lane);
    let d = g.d[lane].to_f32();
    for j in 0..16 {
        out[j] = d * g.lo[pair][half * 16 + j] as f32;
        out[j + 16] = d * g.hi[pair][half * 16 + j] as f32;
    }
}

/// Values of row `lane` of one block: d_lo·(u − 32), then d_hi·(u − 32).
pub fn dequantize_split(g: &SplitGroup, lane: usize, out: &mut [f32]) {
    let (pair, half) = pair_of(lane);
    for j in 0..16 {
        let code = |u: u8| (u as i32 - SPLIT_CODE_OFFSET) as f32;
        out[j] = g.d_lo[lane] * code(g.lo[pair][half * 16 + j]);
        out[j + 16] = g.d_hi[lane] * code(g.hi[pair][half * 16 + j]);
    }
}

/// An activation block: value ≈ d·q. The 8-bit values are stored twice over, halves
/// duplicated (`lo` = q[0..16] twice, `hi` = q[16..32] twice), so one 32-byte operand meets two
/// weight rows of a [`NibbleGroup`] pair. `sum` = d·Σq (for the m term); `offset` = 128·Σq
/// (for kernels that take Q8_0 weights as unsigned bytes, q + 128); `first_half` = Σq over
/// values 0..16 (for [`SplitGroup`]'s halves).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct ActBlock {
    pub lo: [i8; BLOCK],
    pub hi: [i8; BLOCK],
    pub d: f32,
    pub sum: f32,
    pub offset: i32,
    pub first_half: i32,
}

impl Default for ActBlock {
    fn default() -> Self {
        Self {
            lo: [0; BLOCK],
            hi: [0; BLOCK],
            d: 0.0,
            sum: 0.0,
            offset: 0,
            first_half: 0,
        }
    }
}

impl ActBlock {
    /// 32·Σq over values 0..16 and over values 16..32: what Q6_K's unsigned codes (u = code
    /// + 32) add to each half's integer sum.
    pub fn split_corrections(&self) -> (i32, i32) {
        let first = SPLIT_CODE_OFFSET * self.first_half;
        (first, SPLIT_CODE_OFFSET * (self.offset / 128) - first)
    }

    /// Value j's 8-bit code.
    fn q(&self, j: usize) -> i32 {
        if j < 16 {
            self.lo[j] as i32
        } else {
            self.hi[j - 16] as i32
        }
    }
}

/// Quantizes one row (a multiple of [`BLOCK`] long) into `out`, round-to-nearest with the
/// block's largest magnitude mapped to ±127.
pub fn quantize_row(x: &[f32], out: &mut [ActBlock]) {
    debug_assert_eq!(x.len(), out.len() * BLOCK);
    for (values, block) in x.chunks_exact(BLOCK).zip(out.iter_mut()) {
        let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        let (mut total, mut first_half) = (0i32, 0i32);
        for (j, v) in values.iter().enumerate() {
            // Round half away from zero, as `f32::round` does, without its libm call (a default
            // x86-64 build has no rounding instruction).
            let scaled = v * inv;
            let q = (scaled + 0.5f32.copysign(scaled)) as i8;
            let half = if j < 16 { &mut block.lo } else { &mut block.hi };
            half[j % 16] = q;
            half[j % 16 + 16] = q;
            total += q as i32;
            if j < 16 {
                first_half += q as i32;
            }
        }
        block.d = d;
        block.sum = d * total as f32;
        block.offset = 128 * total;
        block.first_half = first_half;
    }
}

/// One block's f32 contribution from its exact integer sum: the arithmetic every kernel does
/// per row and block, in this order, so that kernels differ only in how they get `ints` (Q8_0
/// kernels may skip the second step, whose m_w is 0).
#[inline(always)]
fn block_terms(ints: i32, d_w: f32, m_w: f32, a: &ActBlock, acc: &mut f32) {
    *acc = (ints as f32).mul_add(d_w * a.d, *acc);
    *acc = m_w.mul_add(a.sum, *acc);
}

/// Rows of one nibble group · activation row `a` (one block per group), lane by lane.
pub fn dot_nibbles(w: &[NibbleGroup], a: &[ActBlock], out: &mut [f32; GROUP]) {
    let mut acc = [0f32; GROUP];
    for (g, ab) in w.iter().zip(a) {
        for (lane, acc) in acc.iter_mut().enumerate() {
            let (pair, half) = pair_of(lane);
            let ints: i32 = g.qs[pair][half * 16..half * 16 + 16]
                .iter()
                .enumerate()
                .map(|(j, &byte)| {
                    (byte & 0x0F) as i32 * ab.q(j) + (byte >> 4) as i32 * ab.q(j + 16)
                })
                .sum();
            let (d, m) = (g.d[lane].to_f32(), g.m[lane].to_f32());
            block_terms(ints, d, m, ab, acc);
        }
    }
    *out = acc;
}

/// As [`dot_nibbles`], for Q8_0 groups.
pub fn dot_bytes(w: &[ByteGroup], a: &[ActBlock], out: &mut [f32; GROUP]) {
    let mut acc = [0f32; GROUP];
    for (g, ab) in w.iter().zip(a) {
        for (lane, acc) in acc.iter_mut().enumerate() {
            let (pair, half) = pair_of(lane);
            let ints: i32 = (0..16)
                .map(|j| {
                    g.lo[pair][half * 16 + j] as i32 * ab.q(j)
                        + g.hi[pair][half * 16 + j] as i32 * ab.q(j + 16)
                })
                .sum();
            block_terms(ints, g.d[lane].to_f32(), 0.0, ab, acc);
        }
    }
    *out = acc;
}

/// As [`dot_nibbles`], for Q6_K groups: each half's exact integer sum takes its own scale,
/// the first half's step first.
pub fn dot_split(w: &[SplitGroup], a: &[ActBlock], out: &mut [f32; GROUP]) {
    let mut acc = [0f32; GROUP];
    for (g, ab) in w.iter().zip(a) {
        for (lane, acc) in acc.iter_mut().enumerate() {
            let (pair, half) = pair_of(lane);
            let code = |u: u8| u as i32 - SPLIT_CODE_OFFSET;
            let (lo, hi) = (0..16).fold((0i32, 0i32), |(lo, hi), j| {
                (
                    lo + code(g.lo[pair][half * 16 + j]) * ab.q(j),
                    hi + code(g.hi[pair][half * 16 + j]) * ab.q(j + 16),
                )
            });
            *acc = (lo as f32).mul_add(g.d_lo[lane] * ab.d, *acc);
            *acc = (hi as f32).mul_add(g.d_hi[lane] * ab.d, *acc);
        }
    }
    *out = acc;
}
