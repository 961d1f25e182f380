//! Quantized matrix × f32 activations on the CPU for GGUF's Q4_0, Q4_1, Q8_0, Q4_K (whose
//! 32-value sub-blocks are taken as Q4_1 blocks), Q5_0 (whose values are taken as Q8_0's) and
//! Q6_K (6-bit codes in bytes, a scale per 16 values), with the instruction set chosen at run
//! time so a default build is fast on any x86-64 (other targets get the portable kernel).
//! Candle's `QMatMul` stays the path for the other K-quants (its kernels already dispatch at
//! run time), dense and GPU weights, and is the oracle these kernels are tested against.

mod blocks;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use blocks::{quantize_row, ActBlock, ByteGroup, NibbleGroup, SplitGroup, BLOCK, GROUP};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use std::borrow::Cow;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::{Arc, OnceLock};

/// Which dot-product implementation this CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX2 with the VEX-encoded VNNI byte dot product (Intel Alder Lake and later).
    #[cfg(target_arch = "x86_64")]
    AvxVnni,
    /// AVX2 with AVX-512 VNNI on 256-bit registers (Intel Ice Lake and later, AMD Zen 4).
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
}

impl Kernel {
    /// The fastest kernel this CPU supports (detected once), or the one named by
    /// `ATTUNE_CPU_KERNEL` (scalar, avx2, avx_vnni, avx512_vnni) when this CPU has it: for
    /// measuring what a smaller CPU would get.
    pub fn detected() -> Self {
        static DETECTED: OnceLock<Kernel> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            let available = Self::available();
            let requested = std::env::var("ATTUNE_CPU_KERNEL").ok();
            match requested.and_then(|name| available.iter().find(|k| k.name() == name)) {
                Some(kernel) => *kernel,
                None => *available.last().expect("scalar is always available"),
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Kernel::AvxVnni => "avx_vnni",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => "avx512_vnni",
        }
    }

    /// Every kernel this CPU can run, slowest first.
    pub fn available() -> Vec<Self> {
        #[allow(unused_mut)]
        let mut kernels = vec![Kernel::Scalar];
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            kernels.push(Kernel::Avx2);
            if is_x86_feature_detected!("avxvnni") {
                kernels.push(Kernel::AvxVnni);
            }
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx512vl")
            {
                kernels.push(Kernel::Avx512Vnni);
            }
        }
        kernels
    }
}

/// A weight matrix's row groups ([`GROUP`] rows each, the last padded with zero rows), group
/// by group, each group's blocks in column order.
#[derive(Debug, Clone)]
enum Groups {
    /// Q4_0 or Q4_1.
    Nibbles(Vec<NibbleGroup>),
    /// Q8_0 (and Q5_0, rewritten).
    Bytes(Vec<ByteGroup>),
    /// Q6_K.
    Split(Vec<SplitGroup>),
}

/// Runs `$f::<$R>` from `$kernel`'s instruction-set module, or `$scalar` on the portable kernel.
macro_rules! on_kernel {
    ($kernel:expr, $scalar:expr, $f:ident::<$R:ident>($($arg:expr),*)) => {
        match $kernel {
            Kernel::Scalar => $scalar,
            // SAFETY: `Kernel::available` lists a SIMD kernel only on CPUs with its features;
            // callers size the slices as each kernel's documentation asks.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { x86::avx2::$f::<$R>($($arg),*) },
            #[cfg(target_arch = "x86_64")]
            Kernel::AvxVnni => unsafe { x86::avx_vnni::$f::<$R>($($arg),*) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => unsafe { x86::avx512_vnni::$f::<$R>($($arg),*) },
        }
    };
}

/// Each activation row in `a` (`R` rows back to back) · one weight group with a portable kernel.
fn scalar_rows<G, const R: usize>(
    w: &[G],
    a: &[ActBlock],
    out: &mut [[f32; GROUP]; R],
    dot: fn(&[G], &[ActBlock], &mut [f32; GROUP]),
) {
    for (o, a) in out.iter_mut().zip(a.chunks_exact(w.len())) {
        dot(w, a, o);
    }
}

/// A quantized weight matrix (out_features, in_features) in Q4_0, Q4_1, Q4_K, Q5_0, Q6_K or Q8_0:
/// rows `first_group * GROUP..` of shared group storage, `rows` of them (several matrices can be
/// views of one stacked matrix).
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    rows: usize,
    cols: usize,
    first_group: usize,
    groups: Arc<Groups>,
}

impl QuantMatrix {
    /// Takes a `QTensor` of shape (out, in) in a format these kernels serve; `None` otherwise.
    pub fn from_qtensor(t: &QTensor) -> Result<Option<Self>> {
        let (rows, cols) = match t.shape().dims() {
            &[rows, cols] => (rows, cols),
            _ => return Ok(None),
        };
        let (block_values, block_bytes) = match t.dtype() {
            GgmlDType::Q4_0 => (BLOCK, blocks::Q4_0_BYTES),
            GgmlDType::Q4_1 => (BLOCK, blocks::Q4_1_BYTES),
            GgmlDType::Q8_0 => (BLOCK, blocks::Q8_0_BYTES),
            GgmlDType::Q5_0 => (BLOCK, blocks::Q5_0_BYTES),
            GgmlDType::Q4K => (blocks::Q4K_VALUES, blocks::Q4K_BYTES),
            GgmlDType::Q6K => (blocks::Q6K_VALUES, blocks::Q6K_BYTES),
            _ => return Ok(None),
        };
        let bytes = t.data()?;
        if cols % block_values != 0 || bytes.len() != rows * cols / block_values * block_bytes {
            candle_core::bail!(
                "quantized tensor of shape ({rows}, {cols}) has {} bytes",
                bytes.len()
            );
        }
        let per_row = cols / BLOCK;
        let slots = (0..rows.div_ceil(GROUP)).flat_map(|g| (0..per_row).map(move |b| (g, b)));
        // The rows of row group g (those that exist).
        let group_rows = move |g: usize| g * GROUP..((g + 1) * GROUP).min(rows);
        if t.dtype() == GgmlDType::Q6K {
            let split: Vec<blocks::SplitBlock> = bytes
                .chunks_exact(blocks::Q6K_BYTES)
                .flat_map(blocks::q6k_blocks)
                .collect();
            let groups = slots
                .map(|(g, b)| {
                    let rows: Vec<_> = group_rows(g).map(|r| &split[r * per_row + b]).collect();
                    blocks::split_group(&rows)
                })
                .collect();
            return Ok(Some(Self::new(rows, cols, Groups::Split(groups))));
        }
        // Q4_K's sub-blocks are Q4_1 blocks with their own scales and offsets; Q5_0's values
        // fit Q8_0's bytes.
        let (bytes, dtype, block_bytes) = match t.dtype() {
            GgmlDType::Q4K => (
                Cow::Owned(blocks::q4k_as_q4_1(&bytes)),
                GgmlDType::Q4_1,
                blocks::Q4_1_BYTES,
            ),
            GgmlDType::Q5_0 => (
                Cow::Owned(blocks::q5_0_as_q8_0(&bytes)),
                GgmlDType::Q8_0,
                blocks::Q8_0_BYTES,
            ),
            dtype => (bytes, dtype, block_bytes),
        };
        // Row group g's GGML blocks b, lane by lane.
        let block_rows = |g: usize, b: usize| -> Vec<&[u8]> {
            group_rows(g)
                .map(|row| &bytes[(row * per_row + b) * block_bytes..][..block_bytes])
                .collect()
        };
        let groups = match dtype {
            GgmlDType::Q8_0 => Groups::Bytes(
                slots
                    .map(|(g, b)| blocks::byte_group(&block_rows(g, b)))
                    .collect(),
            ),
            dtype => Groups::Nibbles(
                slots
                    .map(|(g, b)| blocks::nibble_group(&block_rows(g, b), dtype == GgmlDType::Q4_0))
                    .collect(),
            ),
        };
        Ok(Some(Self::new(rows, cols, groups)))
    }

    fn new(rows: usize, cols: usize, groups: Groups) -> Self {
        Self {
            rows,
            cols,
            first_group: 0,
            groups: Arc::new(groups),
        }
    }

    /// Stacks matrices of one format family (Q4_0, Q4_1 and Q4_K together; Q8_0 and Q5_0;
    /// Q6_K) and input size into one whose outputs are theirs in order, so projections of the
    /// same input (q, k, v; gate, up) run as one matmul. Every part but the last must fill its row groups.
    pub fn stack(parts: &[&Self]) -> Result<Self> {
        let Some(first) = parts.first() else {
            candle_core::bail!("nothing to stack");
        };
        let mut groups = first.own_groups();
        for (i, part) in parts.iter().enumerate().skip(1) {
            if part.cols != first.cols {
                candle_core::bail!("stacked matrices must share their input size");
            }
            if !parts[i - 1].rows.is_multiple_of(GROUP) {
                candle_core::bail!("a stacked matrix before the last has a partial row group");
            }
            match (&mut groups, part.own_groups()) {
                (Groups::Nibbles(all), Groups::Nibbles(more)) => all.extend(more),
                (Groups::Bytes(all), Groups::Bytes(more)) => all.extend(more),
                (Groups::Split(all), Groups::Split(more)) => all.extend(more),
                _ => candle_core::bail!("stacked matrices must share their format"),
            }
        }
        Ok(Self {
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
            first_group: 0,
            groups: Arc::new(groups),
        })
    }

    /// A copy of this matrix's own row groups.
    fn own_groups(&self) -> Groups {
        let range = self.slot_range(0..self.rows.div_ceil(GROUP));
        match self.groups.as_ref() {
            Groups::Nibbles(g) => Groups::Nibbles(g[range].to_vec()),
            Groups::Bytes(g) => Groups::Bytes(g[range].to_vec()),
            Groups::Split(g) => Groups::Split(g[range].to_vec()),
        }
    }

    /// Rows `rows` of this matrix, sharing its storage; they must start a row group.
    pub fn view(&self, rows: Range<usize>) -> Result<Self> {
        if rows.start > rows.end || rows.end > self.rows || !rows.start.is_multiple_of(GROUP) {
            candle_core::bail!("rows {rows:?} of a {}-row matrix", self.rows);
        }
        Ok(Self {
            rows: rows.len(),
            cols: self.cols,
            first_group: self.first_group + rows.start / GROUP,
            groups: self.groups.clone(),
        })
    }

    /// Indices in the shared storage of the blocks of (view-relative) row groups `groups`.
    fn slot_range(&self, groups: Range<usize>) -> Range<usize> {
        let n = self.cols / BLOCK;
        (self.first_group + groups.start) * n..(self.first_group + groups.end) * n
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row `r` as f32 values into `out` (`cols` long).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let slots = self.slot_range(r / GROUP..r / GROUP + 1);
        let lane = r % GROUP;
        let values = out.chunks_exact_mut(BLOCK);
        match self.groups.as_ref() {
            Groups::Nibbles(g) => g[slots]
                .iter()
                .zip(values)
                .for_each(|(g, o)| blocks::dequantize_nibbles(g, lane, o)),
            Groups::Bytes(g) => g[slots]
                .iter()
                .zip(values)
                .for_each(|(g, o)| blocks::dequantize_bytes(g, lane, o)),
            Groups::Split(g) => g[slots]
                .iter()
                .zip(values)
                .for_each(|(g, o)| blocks::dequantize_split(g, lane, o)),
        }
    }

    /// Row group `g`'s 8 rows · the `R` activation rows in `a` (back to back).
    fn dot_group<const R: usize>(
        &self,
        kernel: Kernel,
        g: usize,
        a: &[ActBlock],
        out: &mut [[f32; GROUP]; R],
    ) {
        let slots = self.slot_range(g..g + 1);
        match self.groups.as_ref() {
            Groups::Nibbles(w) => on_kernel!(
                kernel,
                scalar_rows(&w[slots], a, out, blocks::dot_nibbles),
                dot_nibble_rows::<R>(&w[slots], a, out)
            ),
            Groups::Bytes(w) => on_kernel!(
                kernel,
                scalar_rows(&w[slots], a, out, blocks::dot_bytes),
                dot_byte_rows::<R>(&w[slots], a, out)
            ),
            Groups::Split(w) => on_kernel!(
                kernel,
                scalar_rows(&w[slots], a, out, blocks::dot_split),
                dot_split_rows::<R>(&w[slots], a, out)
            ),
        }
    }

    /// `out` (m, rows) = `x` (m, cols) · selfᵀ, with `kernel`. Row groups are split over
    /// candle's CPU worker pool; every activation row is quantized once per call and each weight
    /// block is read and unpacked once per 16 activation rows on AVX-512 (in its lanes), once
    /// per batch of four of the rest.
    pub fn matmul_with(&self, kernel: Kernel, x: &[f32], m: usize, out: &mut [f32]) {
        // SAFETY: f32 and MaybeUninit<f32> share their layout, and only f32 values are written.
        let out = unsafe { &mut *(out as *mut [f32] as *mut [MaybeUninit<f32>]) };
        self.matmul_into(kernel, x, m, None, out)
    }

    /// `out` = `residual` + `x` · selfᵀ (all (m, rows) but x), each sum formed as its result is
    /// written: the floats of [`Self::matmul`] then an addition, in one pass.
    pub fn matmul_add_with(
        &self,
        kernel: Kernel,
        x: &[f32],
        m: usize,
        residual: &[f32],
        out: &mut [f32],
    ) {
        // SAFETY: as in `matmul_with`.
        let out = unsafe { &mut *(out as *mut [f32] as *mut [MaybeUninit<f32>]) };
        self.matmul_into(kernel, x, m, Some(residual), out)
    }

    /// [`Self::matmul_with`] into memory that need not be initialized (every element of `out`
    /// is written), plus `residual` when given.
    fn matmul_into(
        &self,
        kernel: Kernel,
        x: &[f32],
        m: usize,
        residual: Option<&[f32]>,
        out: &mut [MaybeUninit<f32>],
    ) {
        assert_eq!(x.len(), m * self.cols, "activation size");
        assert_eq!(out.len(), m * self.rows, "output size");
        assert!(
            residual.is_none_or(|r| r.len() == out.len()),
            "residual size"
        );
        let per_row = self.cols / BLOCK;
        let n = self.rows;
        let out_addr = out.as_mut_ptr() as usize;
        let residual_addr = residual.map_or(0, |r| r.as_ptr() as usize);
        // Writes activation row i's outputs for group g's rows that exist.
        // SAFETY: (i, row) is in bounds (asserted sizes, rows < n) and each group belongs to
        // exactly one chunk, so no two workers write the same element.
        let write = |i: usize, g: usize, values: &[f32; GROUP]| {
            let first = g * GROUP;
            let len = GROUP.min(n - first);
            unsafe {
                let at = (out_addr as *mut f32).add(i * n + first);
                if residual_addr != 0 {
                    let residual = (residual_addr as *const f32).add(i * n + first);
                    for (k, value) in values.iter().enumerate().take(len) {
                        at.add(k).write(*residual.add(k) + value);
                    }
                } else if len == GROUP {
                    // A whole group is a fixed-size copy, not a call to memcpy.
                    (at as *mut [f32; GROUP]).write_unaligned(*values);
                } else {
                    std::ptr::copy_nonoverlapping(values.as_ptr(), at, len);
                }
            }
        };
        // The lane kernels (16 rows on AVX-512, 8 on AVX2) take whole batches, and a last
        // few rows in padded lanes where that is cheaper than the per-row kernels for that
        // many; the rest share weights 4 at a time.
        #[cfg(target_arch = "x86_64")]
        let lane_acts = LaneActs::for_kernel(kernel, &self.groups, x, m, per_row);
        #[cfg(target_arch = "x86_64")]
        let lane_rows = lane_acts.rows;
        #[cfg(not(target_arch = "x86_64"))]
        let lane_rows = 0;
        // The rows outside the lanes, from index 0.
        let acts = quantize_rows(kernel, &x[lane_rows * self.cols..], m - lane_rows, per_row);
        let full = lane_rows + (m - lane_rows) / BATCH * BATCH;
        // Two or three rows left over: two of them share the unpacking too.
        let paired = if m - full >= 2 { full + 2 } else { full };
        crate::parallel::for_each_chunk(n.div_ceil(GROUP), |groups| {
            let mut batch_out = [[0f32; GROUP]; BATCH];
            let mut pair_out = [[0f32; GROUP]; 2];
            let mut single_out = [[0f32; GROUP]; 1];
            #[cfg(target_arch = "x86_64")]
            let mut unpacked = UNPACKED.take();
            for g in groups {
                #[cfg(target_arch = "x86_64")]
                match &lane_acts.blocks {
                    LaneBlocks::None => {}
                    LaneBlocks::Avx512(a) => self.lane_batches(
                        a,
                        x86::avx512_lanes::dot_lanes,
                        g,
                        &mut unpacked,
                        (out_addr, residual_addr, m),
                    ),
                    LaneBlocks::Avx2(a) => self.lane_batches(
                        a,
                        x86::avx2_lanes::dot_lanes,
                        g,
                        &mut unpacked,
                        (out_addr, residual_addr, m),
                    ),
                }
                for (c, a) in acts[..(full - lane_rows) * per_row]
                    .chunks_exact(BATCH * per_row)
                    .enumerate()
                {
                    self.dot_group(kernel, g, a, &mut batch_out);
                    for (k, values) in batch_out.iter().enumerate() {
                        write(lane_rows + c * BATCH + k, g, values);
                    }
                }
                if paired > full {
                    let a = &acts[(full - lane_rows) * per_row..(paired - lane_rows) * per_row];
                    self.dot_group(kernel, g, a, &mut pair_out);
                    for (k, values) in pair_out.iter().enumerate() {
                        write(full + k, g, values);
                    }
                }
                for i in paired..m {
                    let a = &acts[(i - lane_rows) * per_row..(i - lane_rows + 1) * per_row];
                    self.dot_group(kernel, g, a, &mut single_out);
                    write(i, g, &single_out[0]);
                }
            }
            #[cfg(target_arch = "x86_64")]
            UNPACKED.set(unpacked);
        });
    }

    /// Row group `g` times every batch of activation rows in lanes (`acts`: each batch's
    /// blocks back to back) with the lane kernel `dot`, written to `out` (the output's
    /// address, the residual's or 0, and the activation rows m).
    #[cfg(target_arch = "x86_64")]
    fn lane_batches<const L: usize>(
        &self,
        acts: &[x86::lanes::LaneBlock<L>],
        dot: LaneKernel<L>,
        g: usize,
        unpacked: &mut x86::lanes::UnpackedGroup,
        (out_addr, residual_addr, m): (usize, usize, usize),
    ) {
        let n = self.rows;
        for (c, a) in acts.chunks(self.cols / BLOCK).enumerate() {
            let offset = c * L * n + g * GROUP;
            let out = x86::lanes::LanesOut {
                // SAFETY: in bounds: activation row c·L < m, weight row g·8 < n.
                at: unsafe { (out_addr as *mut f32).add(offset) },
                residual: match residual_addr {
                    0 => std::ptr::null(),
                    // SAFETY: the residual has out's size (asserted by the caller).
                    addr => unsafe { (addr as *const f32).add(offset) },
                },
                stride: n,
                rows: GROUP.min(n - g * GROUP),
                acts: L.min(m - c * L),
            };
            // The first batch unpacks the group's blocks as it goes, the rest reuse them.
            let source = (c == 0).then(|| self.group_blocks(g));
            // SAFETY: `LaneActs::for_kernel` builds lanes of L rows only for a kernel whose
            // CPU features `dot` needs; `a` has a lane block per block of a row; the caller's
            // chunk alone writes group g's columns, and `out` spans the batch's values of them.
            unsafe { dot(unpacked, source, a, out) };
        }
    }

    /// Row group `g`'s blocks as stored.
    #[cfg(target_arch = "x86_64")]
    fn group_blocks(&self, g: usize) -> x86::lanes::GroupBlocks<'_> {
        use x86::lanes::GroupBlocks;
        let slots = self.slot_range(g..g + 1);
        match self.groups.as_ref() {
            Groups::Nibbles(w) => GroupBlocks::Nibbles(&w[slots]),
            Groups::Bytes(w) => GroupBlocks::Bytes(&w[slots]),
            Groups::Split(w) => GroupBlocks::Split(&w[slots]),
        }
    }

    /// [`Self::matmul_with`] on this CPU's fastest kernel.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        self.matmul_with(Kernel::detected(), x, m, out)
    }
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// Each thread's unpacked row group, kept between matmuls: freeing it after every call
    /// cost ~1.5% of a 16-row decode profile.
    static UNPACKED: std::cell::Cell<x86::lanes::UnpackedGroup> =
        std::cell::Cell::new(x86::lanes::UnpackedGroup::default());
}

/// Rows quantized on the calling thread; larger batches are split over the CPU workers.
const SERIAL_QUANTIZE_ROWS: usize = 8;

/// A lane kernel: a row group's weight rows times one batch of `L` activation rows in lanes.
#[cfg(target_arch = "x86_64")]
type LaneKernel<const L: usize> = unsafe fn(
    &mut x86::lanes::UnpackedGroup,
    Option<x86::lanes::GroupBlocks<'_>>,
    &[x86::lanes::LaneBlock<L>],
    x86::lanes::LanesOut,
);

/// A matmul's first `rows` activation rows in lanes, for the kernels that have a lane kernel:
/// the whole batches (and a padded last one where that is cheaper).
#[cfg(target_arch = "x86_64")]
struct LaneActs {
    rows: usize,
    blocks: LaneBlocks,
}

#[cfg(target_arch = "x86_64")]
enum LaneBlocks {
    None,
    Avx512(Vec<x86::lanes::LaneBlock<{ x86::avx512_lanes::LANES }>>),
    Avx2(Vec<x86::lanes::LaneBlock<{ x86::avx2_lanes::LANES }>>),
}

#[cfg(target_arch = "x86_64")]
impl LaneActs {
    fn for_kernel(kernel: Kernel, groups: &Groups, x: &[f32], m: usize, per_row: usize) -> Self {
        let cols = per_row * BLOCK;
        let (rows, blocks) = match kernel {
            Kernel::Avx512Vnni => {
                let rows = AVX512_PADDING.lane_rows(m, x86::avx512_lanes::LANES);
                let blocks = quantize_lanes(&x[..rows * cols], rows, per_row);
                (rows, LaneBlocks::Avx512(blocks))
            }
            // Only 4-bit weights gain from AVX2 lanes (see `x86::avx2_lanes`).
            Kernel::Avx2 if matches!(groups, Groups::Nibbles(_)) => {
                let rows = AVX2_PADDING.lane_rows(m, x86::avx2_lanes::LANES);
                let blocks = quantize_lanes(&x[..rows * cols], rows, per_row);
                (rows, LaneBlocks::Avx2(blocks))
            }
            _ => (0, LaneBlocks::None),
        };
        LaneActs { rows, blocks }
    }
}

/// From how many rows left over after whole lane batches a padded last batch costs less than
/// the per-row kernels: with no whole batch before it, and after one (whose unpacked weight
/// blocks the padded batch reuses).
#[cfg(target_arch = "x86_64")]
struct LanePadding {
    alone: usize,
    after_a_batch: usize,
}

#[cfg(target_arch = "x86_64")]
impl LanePadding {
    /// How many of `m` rows go in lanes of `lanes` rows.
    fn lane_rows(&self, m: usize, lanes: usize) -> usize {
        let rest = m % lanes;
        let padded_from = if m > lanes {
            self.after_a_batch
        } else {
            self.alone
        };
        if rest >= padded_from {
            m
        } else {
            m - rest
        }
    }
}

/// The `m` rows of `x` (`per_row` blocks each) quantized straight into lane blocks of `L`
/// rows: chunk c's block b (c·per_row + b) holds block b of rows L·c..L·c + L. Every
/// (chunk, block) is a work item for the CPU workers.
#[cfg(target_arch = "x86_64")]
fn quantize_lanes<const L: usize>(
    x: &[f32],
    m: usize,
    per_row: usize,
) -> Vec<x86::lanes::LaneBlock<L>> {
    use x86::lanes::{lane_block, LaneBlock};
    let (chunks, cols) = (m.div_ceil(L), per_row * BLOCK);
    let mut lanes: Vec<LaneBlock<L>> = Vec::with_capacity(chunks * per_row);
    let lanes_addr = lanes.spare_capacity_mut().as_mut_ptr() as usize;
    crate::parallel::for_each_chunk(chunks * per_row, |items| {
        let mut blocks = [ActBlock::default(); L];
        for item in items {
            let (c, b) = (item / per_row, item % per_row);
            let rows = c * L..m.min((c + 1) * L);
            for (row, block) in rows.clone().zip(&mut blocks) {
                let values = &x[row * cols + b * BLOCK..][..BLOCK];
                // SAFETY: lanes are only built for kernels whose CPU has AVX2.
                unsafe { x86::quantize_row(values, std::slice::from_mut(block)) };
            }
            // SAFETY: `item` < chunks · per_row, the capacity, and each item is written by
            // exactly one worker.
            unsafe {
                (lanes_addr as *mut LaneBlock<L>)
                    .add(item)
                    .write(lane_block(blocks[..rows.len()].iter()))
            };
        }
    });
    // SAFETY: the items cover every index below chunks · per_row.
    unsafe { lanes.set_len(chunks * per_row) };
    lanes
}

/// The `m` rows of `x` (`per_row` blocks each) quantized to activation blocks.
fn quantize_rows(kernel: Kernel, x: &[f32], m: usize, per_row: usize) -> Vec<ActBlock> {
    let mut acts = vec![ActBlock::default(); m * per_row];
    let quantize = |x: &[f32], acts: &mut [ActBlock]| match kernel {
        Kernel::Scalar => quantize_row(x, acts),
        // SAFETY: every SIMD kernel's CPU has AVX2; `acts` has a block per 32 values of x.
        #[cfg(target_arch = "x86_64")]
        _ => unsafe { x86::quantize_row(x, acts) },
    };
    if m <= SERIAL_QUANTIZE_ROWS {
        quantize(x, &mut acts);
        return acts;
    }
    let (cols, acts_addr) = (per_row * BLOCK, acts.as_mut_ptr() as usize);
    crate::parallel::for_each_chunk(m, |rows| {
        // SAFETY: each row belongs to exactly one chunk, so the blocks handed out never
        // overlap, and `acts` outlives the call.
        let acts = unsafe {
            std::slice::from_raw_parts_mut(
                (acts_addr as *mut ActBlock).add(rows.start * per_row),
                rows.len() * per_row,
            )
        };
        quantize(&x[rows.start * cols..rows.end * cols], acts);
    });
    acts
}

/// Activation rows that share one unpacking of each weight block in a batched matmul (two of
/// the rest share one too, the others run one by one; a row's result does not depend on which
/// way it ran).
const BATCH: usize = 4;

/// AVX-512's padding rule (measured on 3072×576 and 576×1536 Q4_1: alone, 9 rows cost about
/// as much either way and 15 rows 1.7× more on the per-row kernels; after a batch, 16 + 5 rows
/// took 168 µs padded against 185 µs on the per-row kernels, 16 + 4 rows 167 against 146, and
/// 576×1536 breaks even at 16 + 6).
#[cfg(target_arch = "x86_64")]
const AVX512_PADDING: LanePadding = LanePadding {
    alone: 9,
    after_a_batch: 6,
};

/// AVX2's padding rule: none. On 3072×576 and 576×1536 Q4_1 (Zen 1), every padded count from
/// 4 to 7 rows, alone or after a batch, took as long as the per-row kernels or longer (7 rows
/// of 3072×576: 487 µs padded, 457 on the per-row kernels, before their 16-bit sums).
#[cfg(target_arch = "x86_64")]
const AVX2_PADDING: LanePadding = LanePadding {
    alone: x86::avx2_lanes::LANES,
    after_a_batch: x86::avx2_lanes::LANES,
};

/// `x` (.., in) → (.., out) through a [`QuantMatrix`], as a candle op on CPU f32 tensors.
#[derive(Debug, Clone)]
pub struct QuantMatMul(pub Arc<QuantMatrix>);

impl CustomOp1 for QuantMatMul {
    fn name(&self) -> &'static str {
        "quantized-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, m) = activations(&self.0, storage, layout)?;
        let len = m * self.0.rows;
        let mut out = Vec::with_capacity(len);
        self.0.matmul_into(
            Kernel::detected(),
            x,
            m,
            None,
            &mut out.spare_capacity_mut()[..len],
        );
        // SAFETY: `matmul_into` wrote all `len` elements.
        unsafe { out.set_len(len) };
        let mut out_dims = layout.shape().dims().to_vec();
        *out_dims.last_mut().expect("non-empty") = self.0.rows;
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }
}

/// The activation rows of a candle op's input for `matrix`: the values of a contiguous f32
/// tensor (.., matrix.cols) and how many rows of `cols` they hold.
fn activations<'a>(
    matrix: &QuantMatrix,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> Result<(&'a [f32], usize)> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("the quantized kernels take f32 activations");
    };
    let Some(x) = layout.contiguous_offsets().map(|(a, b)| &data[a..b]) else {
        candle_core::bail!("the quantized kernels take contiguous activations");
    };
    let cols = *layout.shape().dims().last().unwrap_or(&0);
    if cols != matrix.cols {
        candle_core::bail!(
            "quantized matmul: input has {cols} features, weight takes {}",
            matrix.cols
        );
    }
    Ok((x, x.len() / cols))
}

impl QuantMatMul {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }

    /// `residual + self.forward(x)` in one pass (see [`QuantMatrix::matmul_add_with`]).
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        x.contiguous()?
            .apply_op2_no_bwd(&residual.contiguous()?, &QuantMatMulAdd(self.0.clone()))
    }
}

/// `residual + x · Wᵀ` with the residual added as each result is written (a residual stream's
/// update without a separate addition over the whole output).
struct QuantMatMulAdd(Arc<QuantMatrix>);

impl CustomOp2 for QuantMatMulAdd {
    fn name(&self) -> &'static str {
        "quantized-matmul-add"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        residual: &CpuStorage,
        residual_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, m) = activations(&self.0, x, x_layout)?;
        let (CpuStorage::F32(r_data), Some((ra, rb))) =
            (residual, residual_layout.contiguous_offsets())
        else {
            candle_core::bail!("quantized matmul-add: the residual must be contiguous f32");
        };
        let residual = &r_data[ra..rb];
        let shape = residual_layout.shape().clone();
        if residual.len() != m * self.0.rows || shape.dims().last() != Some(&self.0.rows) {
            candle_core::bail!(
                "quantized matmul-add: residual of shape {shape:?} for {m} rows of {} outputs",
                self.0.rows
            );
        }
        let mut out = Vec::with_capacity(residual.len());
        self.0.matmul_into(
            Kernel::detected(),
            x,
            m,
            Some(residual),
            &mut out.spare_capacity_mut()[..residual.len()],
        );
        // SAFETY: `matmul_into` wrote every element.
        unsafe { out.set_len(residual.len()) };
        Ok((CpuStorage::F32(out), shape))
    }
}
