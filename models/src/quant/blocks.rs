//! Block layouts and the portable (scalar) dot products.
//!
//! Weights keep GGML's on-disk block layout so they are used straight from the file. Activations
//! are quantized per 32-value block to 8 bits with f32 scales (finer than GGML's f16 Q8_1).

use half::f16;

/// Values per block in every format here.
pub const BLOCK: usize = 32;

/// GGML's Q4_1 block: value = d * q + m for 4-bit q; byte j holds value j (low nibble) and
/// value j + 16 (high nibble).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; BLOCK / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);

/// An activation block: value ≈ d * q; `sum` = d * Σq, which Q4_1's offset term needs.
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
            *q = (v * inv).round() as i8;
            total += *q as i32;
        }
        block.d = d;
        block.sum = d * total as f32;
    }
}

/// Σ over blocks of d_w·d_a·Σ(q_w·q_a) + m_w·sum_a.
pub fn dot_q4_1_scalar(w: &[BlockQ4_1], a: &[BlockQ8]) -> f32 {
    let mut total = 0f32;
    for (wb, ab) in w.iter().zip(a) {
        let mut int_dot = 0i32;
        for j in 0..BLOCK / 2 {
            let lo = (wb.qs[j] & 0x0F) as i32;
            let hi = (wb.qs[j] >> 4) as i32;
            int_dot += lo * ab.qs[j] as i32 + hi * ab.qs[j + BLOCK / 2] as i32;
        }
        total += wb.d.to_f32() * ab.d * int_dot as f32 + wb.m.to_f32() * ab.sum;
    }
    total
}
