//! Block layouts and the portable (scalar) dot products.
//!
//! Weights keep GGML's block layouts so they are used straight from the file. Activations are
//! quantized per 32-value block to 8 bits with f32 scales (finer than GGML's f16 Q8_0/Q8_1).

use half::f16;

/// Values per block in every format here.
pub const BLOCK: usize = 32;

/// GGML's Q4_0 block: value = d * (q - 8) for 4-bit q; byte j holds value j (low nibble) and
/// value j + 16 (high nibble).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; BLOCK / 2],
}

/// GGML's Q4_1 block: value = d * q + m, nibbles as in Q4_0.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; BLOCK / 2],
}

/// GGML's Q8_0 block: value = d * q.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; BLOCK],
}

const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);

/// An activation block: value ≈ d * q; `sum` = d * Σq, which the offset of Q4_0/Q4_1 needs.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ8 {
    pub d: f32,
    pub sum: f32,
    pub qs: [i8; BLOCK],
}

impl Default for BlockQ8 {
    fn default() -> Self {
        Self {
            d: 0.0,
            sum: 0.0,
            qs: [0; BLOCK],
        }
    }
}

/// Quantizes one row (a multiple of [`BLOCK`] long) into `out`, round-to-nearest with the
/// block's largest magnitude mapped to ±127.
pub fn quantize_row(x: &[f32], out: &mut [BlockQ8]) {
    debug_assert_eq!(x.len(), out.len() * BLOCK);
    for (values, block) in x.chunks_exact(BLOCK).zip(out.iter_mut()) {
        let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut total = 0i32;
        for (q, v) in block.qs.iter_mut().zip(values) {
            // Round half away from zero, as `f32::round` does, without its libm call (a default
            // x86-64 build has no rounding instruction).
            let scaled = v * inv;
            *q = (scaled + 0.5f32.copysign(scaled)) as i8;
            total += *q as i32;
        }
        block.d = d;
        block.sum = d * total as f32;
    }
}

/// Σq_w·q_a of one 4-bit block against an activation block.
fn nibble_dot(qs: &[u8; BLOCK / 2], a: &BlockQ8) -> i32 {
    (0..BLOCK / 2)
        .map(|j| (qs[j] & 0x0F) as i32 * a.qs[j] as i32 + (qs[j] >> 4) as i32 * a.qs[j + 16] as i32)
        .sum()
}

/// Σ over blocks of d_w·d_a·Σ(q_w·q_a) − 8·d_w·sum_a.
pub fn dot_q4_0(w: &[BlockQ4_0], a: &[BlockQ8]) -> f32 {
    w.iter()
        .zip(a)
        .map(|(wb, ab)| {
            let d = wb.d.to_f32();
            d * ab.d * nibble_dot(&wb.qs, ab) as f32 - 8.0 * d * ab.sum
        })
        .sum()
}

/// Σ over blocks of d_w·d_a·Σ(q_w·q_a) + m_w·sum_a.
pub fn dot_q4_1(w: &[BlockQ4_1], a: &[BlockQ8]) -> f32 {
    w.iter()
        .zip(a)
        .map(|(wb, ab)| {
            wb.d.to_f32() * ab.d * nibble_dot(&wb.qs, ab) as f32 + wb.m.to_f32() * ab.sum
        })
        .sum()
}

/// Σ over blocks of d_w·d_a·Σ(q_w·q_a).
pub fn dot_q8_0(w: &[BlockQ8_0], a: &[BlockQ8]) -> f32 {
    w.iter()
        .zip(a)
        .map(|(wb, ab)| {
            let int_dot: i32 = wb
                .qs
                .iter()
                .zip(&ab.qs)
                .map(|(&x, &y)| x as i32 * y as i32)
                .sum();
            wb.d.to_f32() * ab.d * int_dot as f32
        })
        .sum()
}

/// Values of one 4-bit block: d·(q + shift) + m (GGML's own formulas for Q4_0 and Q4_1).
fn dequantize_nibbles(qs: &[u8; BLOCK / 2], shift: i8, d: f32, m: f32, out: &mut [f32]) {
    for (j, &byte) in qs.iter().enumerate() {
        out[j] = ((byte & 0x0F) as i8 + shift) as f32 * d + m;
        out[j + BLOCK / 2] = ((byte >> 4) as i8 + shift) as f32 * d + m;
    }
}

pub fn dequantize_q4_0(w: &[BlockQ4_0], out: &mut [f32]) {
    for (b, o) in w.iter().zip(out.chunks_exact_mut(BLOCK)) {
        dequantize_nibbles(&b.qs, -8, b.d.to_f32(), 0.0, o);
    }
}

pub fn dequantize_q4_1(w: &[BlockQ4_1], out: &mut [f32]) {
    for (b, o) in w.iter().zip(out.chunks_exact_mut(BLOCK)) {
        dequantize_nibbles(&b.qs, 0, b.d.to_f32(), b.m.to_f32(), o);
    }
}

pub fn dequantize_q8_0(w: &[BlockQ8_0], out: &mut [f32]) {
    for (b, o) in w.iter().zip(out.chunks_exact_mut(BLOCK)) {
        let d = b.d.to_f32();
        for (v, &q) in o.iter_mut().zip(&b.qs) {
            *v = d * q as f32;
        }
    }
}
