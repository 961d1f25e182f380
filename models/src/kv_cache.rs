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
            CpuStorage::F16(data) => self.write(data, capacity, head_dim, |out, values| {
                // Eight values per instruction where the CPU converts in hardware.
                half::slice::HalfFloatSliceExt::convert_from_f32_slice(out, values)
            }),
            _ => candle_core::bail!("a row write needs an f32 or f16 cache buffer"),
        }
        Ok(())
    }
}
