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

/// An activation block: value ≈ d·q. The 8-bit values are stored twice over, halves
/// duplicated (`lo` = q[0..16] twice, `hi` = q[16..32] twice), so one 32-byte operand meets two
/// weight rows of a [`NibbleGroup`] pair. `sum` = d·Σq (for the m term); `offset` = 128·Σq
/// (for kernels that take Q8_0 weights as unsigned bytes, q + 128).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct ActBlock {
    pub lo: [i8; BLOCK],
    pub hi: [i8; BLOCK],
    pub d: f32,
    pub sum: f32,
    pub offset: i32,
}

impl Default for ActBlock {
    fn default() -> Self {
        Self {
            lo: [0; BLOCK],
            hi: [0; BLOCK],
            d: 0.0,
            sum: 0.0,
            offset: 0,
        }
    }
}

impl ActBlock {
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
        let mut total = 0i32;
        for (j, v) in values.iter().enumerate() {
            // Round half away from zero, as `f32::round` does, without its libm call (a default
            // x86-64 build has no rounding instruction).
            let scaled = v * inv;
            let q = (scaled + 0.5f32.copysign(scaled)) as i8;
            let half = if j < 16 { &mut block.lo } else { &mut block.hi };
            half[j % 16] = q;
            half[j % 16 + 16] = q;
            total += q as i32;
        }
        block.d = d;
        block.sum = d * total as f32;
        block.offset = 128 * total;
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
