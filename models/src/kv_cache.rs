//! Per-sequence KV cache: one preallocated buffer per layer that grows by doubling, so a
//! generation never re-copies its whole history on every step. Values may be stored in a
//! narrower type than the model computes in (f16 for quantized models, as llama.cpp does:
//! half the memory, and half the bytes a batched decode step reads).

use crate::arch::DecoderConfig;
use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Result, Tensor};

const MIN_CAPACITY: usize = 64;

#[derive(Debug)]
struct LayerKv {
    /// (kv_heads, capacity, head_dim); rows at and past `KvCache::len` are garbage.
    k: Tensor,
    v: Tensor,
}

/// Not `Clone`: buffers are written in place, so a copy must be deep ([`KvCache::try_clone`]).
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    len: usize,
    capacity: usize,
    kv_heads: usize,
    head_dim: usize,
    /// What the buffers hold.
    storage: DType,
    device: Device,
}

impl KvCache {
    /// A cache whose buffers hold `storage` values (see [`crate::Decoder::kv_storage`]).
    pub fn new(cfg: &DecoderConfig, storage: DType, device: &Device) -> Self {
        Self {
            layers: (0..cfg.num_layers).map(|_| None).collect(),
            len: 0,
            capacity: 0,
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            storage,
            device: device.clone(),
        }
    }

    /// A deep copy, e.g. to fork a prefilled prompt into several continuations.
    pub fn try_clone(&self) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref()
                    .map(|e| {
                        Ok(LayerKv {
                            k: e.k.copy()?,
                            v: e.v.copy()?,
                        })
                    })
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            device: self.device.clone(),
            ..*self
        })
    }

    /// A deep copy of the first `len` cached positions (a prompt's prefix that other sequences
    /// continue from), with room for at least as many more.
    pub fn prefix(&self, len: usize) -> Result<Self> {
        if len > self.len {
            candle_core::bail!("a prefix of {len} positions from a cache of {}", self.len);
        }
        let capacity = if len == 0 {
            0
        } else {
            len.next_power_of_two().max(MIN_CAPACITY)
        };
        let shape = (self.kv_heads, capacity, self.head_dim);
        let copy = |buf: &Tensor| -> Result<Tensor> {
            let out = Tensor::zeros(shape, self.storage, &self.device)?;
            if len > 0 {
                out.slice_set(&buf.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
            }
            Ok(out)
        };
        let layers = self
            .layers
            .iter()
            .map(|l| match l {
                Some(e) if capacity > 0 => Ok(Some(LayerKv {
                    k: copy(&e.k)?,
                    v: copy(&e.v)?,
                })),
                _ => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            len,
            capacity,
            device: self.device.clone(),
            ..*self
        })
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held by the buffers (allocated capacity, not just the used part).
    pub fn bytes(&self) -> usize {
        let per_layer =
            2 * self.kv_heads * self.capacity * self.head_dim * self.storage.size_in_bytes();
        per_layer * self.layers.iter().filter(|l| l.is_some()).count()
    }

    /// Writes `k`, `v` (kv_heads, t, head_dim) after the cached positions of `layer` and returns
    /// views of everything cached for that layer including them, in the storage type. Call
    /// [`Self::advance`] once all layers have been written.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let start = self.len;
        let needed = start + k.dim(1)?;
        let storage = self.storage;
        let entry = self.reserve(layer, needed)?;
        entry
            .k
            .slice_set(&k.to_dtype(storage)?.contiguous()?, 1, start)?;
        entry
            .v
            .slice_set(&v.to_dtype(storage)?.contiguous()?, 1, start)?;
        Ok((entry.k.narrow(1, 0, needed)?, entry.v.narrow(1, 0, needed)?))
    }

    /// [`Self::append`] of positions given as f32 rows (kv_heads × head_dim each, one per
    /// position), written straight into the buffers of a CPU cache (f32 or f16).
    pub(crate) fn append_rows(&mut self, layer: usize, k: &[&[f32]], v: &[&[f32]]) -> Result<()> {
        let start = self.len;
        let entry = self.reserve(layer, start + k.len())?;
        for (buffer, rows) in [(&entry.k, k), (&entry.v, v)] {
            buffer.inplace_op1(&WriteRows { start, rows })?;
        }
        Ok(())
    }

    /// Room in `layer` for `rows` positions after the cached ones, so that writing them
    /// allocates nothing.
    pub(crate) fn reserve_rows(&mut self, layer: usize, rows: usize) -> Result<()> {
        self.reserve(layer, self.len + rows).map(|_| ())
    }

    /// The buffers of `layer`, allocated, with room for `needed` positions.
    fn reserve(&mut self, layer: usize, needed: usize) -> Result<&LayerKv> {
        if needed > self.capacity {
            self.grow(needed.next_power_of_two().max(MIN_CAPACITY))?;
        }
        Ok(match &mut self.layers[layer] {
            Some(entry) => entry,
            slot => {
                let shape = (self.kv_heads, self.capacity, self.head_dim);
                slot.insert(LayerKv {
                    k: Tensor::zeros(shape, self.storage, &self.device)?,
                    v: Tensor::zeros(shape, self.storage, &self.device)?,
                })
            }
        })
    }

    /// The whole contiguous buffers of `layer`, (kv_heads, capacity, head_dim), in the storage
    /// type: for gathers, which need contiguous input, and for reading on the host. Only rows
    /// below the cached length are meaningful.
    pub(crate) fn buffers(&self, layer: usize) -> Option<(Tensor, Tensor)> {
        self.layers[layer]
            .as_ref()
            .map(|e| (e.k.clone(), e.v.clone()))
    }

    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }

    fn grow(&mut self, capacity: usize) -> Result<()> {
        let shape = (self.kv_heads, capacity, self.head_dim);
        for entry in self.layers.iter_mut().flatten() {
            for buf in [&mut entry.k, &mut entry.v] {
                let bigger = Tensor::zeros(shape, self.storage, &self.device)?;
                if self.len > 0 {
                    bigger.slice_set(&buf.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                }
                *buf = bigger;
            }
        }
        self.capacity = capacity;
        Ok(())
    }
}

/// `out[i] = values[i]` rounded to f16 (to nearest, ties to even), eight at a time where the
/// CPU converts in hardware. Not `half`'s slice conversion: it converts four values per call of
/// an out-of-line function, which made the cache writes 4% of a 16-row decode step.
fn narrow_to_f16(out: &mut [half::f16], values: &[f32]) {
    assert_eq!(out.len(), values.len());
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("f16c") {
        // SAFETY: the CPU has F16C; the lengths match (asserted).
        return unsafe { narrow_to_f16_f16c(out, values) };
    }
    for (o, &v) in out.iter_mut().zip(values) {
        *o = half::f16::from_f32(v);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn narrow_to_f16_f16c(out: &mut [half::f16], values: &[f32]) {
    use std::arch::x86_64::*;
    let whole = values.len() / 8 * 8;
    for c in (0..whole).step_by(8) {
        // SAFETY: c + 8 <= whole <= both lengths.
        unsafe {
            let halves = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(
                values.as_ptr().add(c),
            ));
            _mm_storeu_si128(out.as_mut_ptr().add(c) as *mut __m128i, halves);
        }
    }
    for (o, &v) in out[whole..].iter_mut().zip(&values[whole..]) {
        *o = half::f16::from_f32(v);
    }
}

/// Writes positions `start..` (`rows`: kv_heads × head_dim each) into an f32 or f16 CPU buffer
/// (kv_heads, capacity, head_dim).
struct WriteRows<'a> {
    start: usize,
    rows: &'a [&'a [f32]],
}

impl WriteRows<'_> {
    /// Each row's heads into their places in `data`, through `put`.
    fn write<T>(
        &self,
        data: &mut [T],
        capacity: usize,
        head_dim: usize,
        put: impl Fn(&mut [T], &[f32]),
    ) {
        for (position, row) in (self.start..).zip(self.rows) {
            for (head, values) in row.chunks_exact(head_dim).enumerate() {
                let at = (head * capacity + position) * head_dim;
                put(&mut data[at..at + head_dim], values);
            }
        }
    }
}

impl InplaceOp1 for WriteRows<'_> {
    fn name(&self) -> &'static str {
        "kv-cache-write-rows"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let (Some((0, _)), &[kv_heads, capacity, head_dim]) =
            (layout.contiguous_offsets(), layout.shape().dims())
        else {
            candle_core::bail!("a row write needs a whole contiguous cache buffer");
        };
        if self.start + self.rows.len() > capacity
            || self.rows.iter().any(|r| r.len() != kv_heads * head_dim)
        {
            candle_core::bail!("a row write outside the cache buffer");
        }
        match storage {
            CpuStorage::F32(data) => self.write(data, capacity, head_dim, |out, values| {
                out.copy_from_slice(values)
            }),
            CpuStorage::F16(data) => self.write(data, capacity, head_dim, narrow_to_f16),
            _ => candle_core::bail!("a row write needs an f32 or f16 cache buffer"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardware_and_software_f16_rounding_agree() {
        let mut values: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.37).collect();
        values.extend([
            0.0,
            -0.0,
            65504.0,
            65520.0,
            1e9,
            -1e9,
            f32::INFINITY,
            f32::NEG_INFINITY,
            5.96e-8,
            2.98e-8,
            1.0 + 1.0 / 2048.0,
            1.0 + 3.0 / 2048.0,
            6.1e-5,
        ]);
        let mut fast = vec![half::f16::ZERO; values.len()];
        narrow_to_f16(&mut fast, &values);
        for (f, v) in fast.iter().zip(&values) {
            assert_eq!(f.to_bits(), half::f16::from_f32(*v).to_bits(), "{v}");
        }
    }
}
