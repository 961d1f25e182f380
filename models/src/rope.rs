//! Rotary position embeddings: inverse frequencies (with Llama 3 scaling) and their application.

use crate::arch::{DecoderConfig, Llama3RopeScaling, RopeLayout};
use candle_core::{Device, Result, Tensor};

#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    layout: RopeLayout,
}

/// cos/sin tables for a run of consecutive positions, shaped (len, head_dim / 2), as tensors
/// and as the host values they were made from.
#[derive(Debug, Clone)]
pub struct RopeTables {
    cos: Tensor,
    sin: Tensor,
    cos_values: Vec<f32>,
    sin_values: Vec<f32>,
}

impl Rope {
    /// `freq_divisors`: GGUF's optional `rope_freqs.weight` (llama.cpp divides each frequency by it).
    pub fn new(cfg: &DecoderConfig, freq_divisors: Option<Vec<f32>>) -> Self {
        let dim = cfg.head_dim;
        let mut inv_freq: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / cfg.rope_theta.powf(i as f32 / dim as f32))
            .collect();
        if let Some(scaling) = &cfg.rope_scaling {
            llama3_scale(&mut inv_freq, scaling);
        }
        if let Some(divisors) = freq_divisors {
            for (f, d) in inv_freq.iter_mut().zip(divisors) {
                *f /= d;
            }
        }
        Self {
            inv_freq,
            layout: cfg.rope_layout,
        }
    }

    pub fn tables(&self, start: usize, len: usize, device: &Device) -> Result<RopeTables> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for pos in start..start + len {
            for &f in &self.inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok(RopeTables {
            cos: Tensor::from_slice(&cos, (len, half), device)?,
            sin: Tensor::from_slice(&sin, (len, half), device)?,
            cos_values: cos,
            sin_values: sin,
        })
    }

    /// Rotates, in place, the heads of position `row` of `tables` (`x`: heads × head_dim): the
    /// arithmetic of [`Self::apply`], without tensors.
    pub fn apply_row(&self, x: &mut [f32], tables: &RopeTables, row: usize) {
        let half = self.inv_freq.len();
        let at = row * half;
        let (cos, sin) = (
            &tables.cos_values[at..at + half],
            &tables.sin_values[at..at + half],
        );
        for head in x.chunks_exact_mut(2 * half) {
            for (i, (&c, &s)) in cos.iter().zip(sin).enumerate() {
                let (i1, i2) = match self.layout {
                    RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                    RopeLayout::Halves => (i, i + half),
                };
                let (a, b) = (head[i1], head[i2]);
                head[i1] = a * c - b * s;
                head[i2] = a * s + b * c;
            }
        }
    }

    /// Rotates `x` shaped (heads, len, head_dim), contiguous.
    pub fn apply(&self, x: &Tensor, tables: &RopeTables) -> Result<Tensor> {
        let x = x.unsqueeze(0)?;
        let out = match self.layout {
            RopeLayout::Interleaved => candle_nn::rotary_emb::rope_i(&x, &tables.cos, &tables.sin)?,
            RopeLayout::Halves => candle_nn::rotary_emb::rope(&x, &tables.cos, &tables.sin)?,
        };
        out.squeeze(0)
    }
}

/// Llama 3.1's rule: keep high frequencies, divide low ones by `factor`, blend in between.
fn llama3_scale(inv_freq: &mut [f32], s: &Llama3RopeScaling) {
    let old_len = s.original_max_position_embeddings as f32;
    let low_freq_wavelen = old_len / s.low_freq_factor;
    let high_freq_wavelen = old_len / s.high_freq_factor;
    for f in inv_freq.iter_mut() {
        let wavelen = 2.0 * std::f32::consts::PI / *f;
        if wavelen < high_freq_wavelen {
            continue;
        }
        if wavelen > low_freq_wavelen {
            *f /= s.factor;
        } else {
            let smooth =
                (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
            *f = (1.0 - smooth) * *f / s.factor + smooth * *f;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let s = Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let mut f = vec![1.0, 1e-4, 2.0 * std::f32::consts::PI / 4096.0];
        llama3_scale(&mut f, &s);
        assert_eq!(f[0], 1.0);
        assert!((f[1] - 1e-4 / 8.0).abs() < 1e-12);
        // wavelen 4096: smooth = (2 - 1) / 3, between the two regimes.
        let orig = 2.0 * std::f32::consts::PI / 4096.0;
        let expect = (2.0 / 3.0) * orig / 8.0 + (1.0 / 3.0) * orig;
        assert!((f[2] - expect).abs() < 1e-9);
    }

    #[test]
    fn interleaved_and_halves_rotate_the_right_pairs() {
        let dev = Device::Cpu;
        let mut cfg = crate::testing::tiny_config();
        cfg.head_dim = 4;
        for (layout, pair) in [
            (RopeLayout::Interleaved, (0, 1)),
            (RopeLayout::Halves, (0, 2)),
        ] {
            cfg.rope_layout = layout;
            let rope = Rope::new(&cfg, None);
            let tables = rope.tables(1, 1, &dev).unwrap();
            let x = Tensor::new(&[[[1f32, 2., 3., 4.]]], &dev).unwrap();
            let y: Vec<f32> = rope
                .apply(&x, &tables)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            // The first frequency is 1, so at position 1 the first pair turns by 1 radian.
            let (a, b) = (pair.0 + 1, pair.1 + 1);
            let (c, s) = (1f32.cos(), 1f32.sin());
            let want = (a as f32 * c - b as f32 * s, a as f32 * s + b as f32 * c);
            assert!((y[pair.0] - want.0).abs() < 1e-6, "{layout:?}: {y:?}");
            assert!((y[pair.1] - want.1).abs() < 1e-6, "{layout:?}: {y:?}");
            let mut row = vec![1f32, 2., 3., 4.];
            rope.apply_row(&mut row, &tables, 0);
            assert_eq!(row, y, "{layout:?}: the host rotation is the tensor one");
        }
    }
}
