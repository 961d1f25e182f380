//! Quantized matrix × f32 activations on the CPU for GGUF's Q4_0, Q4_1 and Q8_0, with the
//! instruction set chosen at run time so a default build is fast on any x86-64 (other targets
//! get the portable kernel). Candle's `QMatMul` stays the path for K-quants (its kernels already
//! dispatch at run time), dense and GPU weights, and is the oracle these kernels are tested
//! against.

mod blocks;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use blocks::{quantize_row, BlockQ4_0, BlockQ4_1, BlockQ8, BlockQ8_0, BLOCK};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use half::f16;
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

    /// Whether 8 activation rows fit its registers (AVX-512 has 32 vector registers; with
    /// AVX2's 16, groups of 8 spill and run no faster than groups of 4).
    fn wide_groups(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if self == Kernel::Avx512Vnni {
            return true;
        }
        false
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
            if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") {
                kernels.push(Kernel::Avx512Vnni);
            }
        }
        kernels
    }
}

/// Activation rows that share one unpacking of each weight block in a batched matmul: groups of
/// 8 where the kernel has registers for them, then groups of 4, then single rows (a row's result
/// does not depend on its group's size).
const WIDE_GROUP: usize = 8;
const NARROW_GROUP: usize = 4;

/// A weight matrix's blocks, row-major as in the GGUF file.
#[derive(Debug, Clone)]
enum Blocks {
    Q4_0(Vec<BlockQ4_0>),
    Q4_1(Vec<BlockQ4_1>),
    Q8_0(Vec<BlockQ8_0>),
}

/// Runs `$call` from `$kernel`'s instruction-set module, or `$scalar` on the portable kernel.
macro_rules! on_kernel {
    ($kernel:expr, $scalar:expr, $f:ident($($arg:expr),*)) => {
        match $kernel {
            Kernel::Scalar => $scalar,
            // SAFETY: `Kernel::available` lists a SIMD kernel only on CPUs with its features;
            // callers size the slices as each kernel's documentation asks.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { x86::avx2::$f($($arg),*) },
            #[cfg(target_arch = "x86_64")]
            Kernel::AvxVnni => unsafe { x86::avx_vnni::$f($($arg),*) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => unsafe { x86::avx512_vnni::$f($($arg),*) },
        }
    };
}

/// Every row of `w` · `a` with a portable dot product.
fn scalar_each_row<B>(w: &[B], a: &[BlockQ8], out: &mut [f32], dot: fn(&[B], &[BlockQ8]) -> f32) {
    for (o, row) in out.iter_mut().zip(w.chunks_exact(a.len())) {
        *o = dot(row, a);
    }
}

/// One weight row `w` · each activation row in `a` with a portable dot product.
fn scalar_shared<B>(w: &[B], a: &[BlockQ8], out: &mut [f32], dot: fn(&[B], &[BlockQ8]) -> f32) {
    for (o, a) in out.iter_mut().zip(a.chunks_exact(w.len())) {
        *o = dot(w, a);
    }
}

/// A quantized weight matrix (out_features, in_features) in Q4_0, Q4_1 or Q8_0: rows
/// `first_row..first_row + rows` of shared block storage (several matrices can be views of one
/// stacked matrix).
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    rows: usize,
    cols: usize,
    first_row: usize,
    blocks: Arc<Blocks>,
}

fn f16_at(b: &[u8], at: usize) -> f16 {
    f16::from_le_bytes([b[at], b[at + 1]])
}

impl QuantMatrix {
    /// Takes a `QTensor` of shape (out, in) in a format these kernels serve; `None` otherwise.
    pub fn from_qtensor(t: &QTensor) -> Result<Option<Self>> {
        let (rows, cols) = match t.shape().dims() {
            &[rows, cols] => (rows, cols),
            _ => return Ok(None),
        };
        let bytes = t.data()?;
        let blocks = match t.dtype() {
            GgmlDType::Q4_0 => Blocks::Q4_0(
                bytes
                    .chunks_exact(18)
                    .map(|b| BlockQ4_0 {
                        d: f16_at(b, 0),
                        qs: b[2..].try_into().expect("16 bytes"),
                    })
                    .collect(),
            ),
            GgmlDType::Q4_1 => Blocks::Q4_1(
                bytes
                    .chunks_exact(20)
                    .map(|b| BlockQ4_1 {
                        d: f16_at(b, 0),
                        m: f16_at(b, 2),
                        qs: b[4..].try_into().expect("16 bytes"),
                    })
                    .collect(),
            ),
            GgmlDType::Q8_0 => Blocks::Q8_0(
                bytes
                    .chunks_exact(34)
                    .map(|b| BlockQ8_0 {
                        d: f16_at(b, 0),
                        qs: std::array::from_fn(|i| b[2 + i] as i8),
                    })
                    .collect(),
            ),
            _ => return Ok(None),
        };
        let matrix = Self {
            rows,
            cols,
            first_row: 0,
            blocks: Arc::new(blocks),
        };
        if cols % BLOCK != 0 || matrix.block_count() != rows * cols / BLOCK {
            candle_core::bail!(
                "quantized tensor of shape ({rows}, {cols}) has {} blocks",
                matrix.block_count()
            );
        }
        Ok(Some(matrix))
    }

    fn block_count(&self) -> usize {
        match self.blocks.as_ref() {
            Blocks::Q4_0(b) => b.len(),
            Blocks::Q4_1(b) => b.len(),
            Blocks::Q8_0(b) => b.len(),
        }
    }

    /// Stacks matrices of one format and input size into one whose outputs are theirs in
    /// order, so projections of the same input (q, k, v; gate, up) run as one matmul.
    pub fn stack(parts: &[&Self]) -> Result<Self> {
        let Some(first) = parts.first() else {
            candle_core::bail!("nothing to stack");
        };
        let mut blocks = first.own_blocks();
        for part in &parts[1..] {
            if part.cols != first.cols {
                candle_core::bail!("stacked matrices must share their input size");
            }
            match (&mut blocks, part.own_blocks()) {
                (Blocks::Q4_0(all), Blocks::Q4_0(more)) => all.extend(more),
                (Blocks::Q4_1(all), Blocks::Q4_1(more)) => all.extend(more),
                (Blocks::Q8_0(all), Blocks::Q8_0(more)) => all.extend(more),
                _ => candle_core::bail!("stacked matrices must share their format"),
            }
        }
        Ok(Self {
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
            first_row: 0,
            blocks: Arc::new(blocks),
        })
    }

    /// A copy of this matrix's own rows.
    fn own_blocks(&self) -> Blocks {
        let range = self.block_range(0..self.rows);
        match self.blocks.as_ref() {
            Blocks::Q4_0(b) => Blocks::Q4_0(b[range].to_vec()),
            Blocks::Q4_1(b) => Blocks::Q4_1(b[range].to_vec()),
            Blocks::Q8_0(b) => Blocks::Q8_0(b[range].to_vec()),
        }
    }

    /// Rows `rows` of this matrix, sharing its storage.
    pub fn view(&self, rows: Range<usize>) -> Result<Self> {
        if rows.start > rows.end || rows.end > self.rows {
            candle_core::bail!("rows {rows:?} of a {}-row matrix", self.rows);
        }
        Ok(Self {
            rows: rows.len(),
            cols: self.cols,
            first_row: self.first_row + rows.start,
            blocks: self.blocks.clone(),
        })
    }

    /// Indices in the shared storage of the blocks of (view-relative) `rows`.
    fn block_range(&self, rows: Range<usize>) -> Range<usize> {
        let n = self.cols / BLOCK;
        (self.first_row + rows.start) * n..(self.first_row + rows.end) * n
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row `r` as f32 values into `out` (`cols` long).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let row = self.block_range(r..r + 1);
        match self.blocks.as_ref() {
            Blocks::Q4_0(b) => blocks::dequantize_q4_0(&b[row], out),
            Blocks::Q4_1(b) => blocks::dequantize_q4_1(&b[row], out),
            Blocks::Q8_0(b) => blocks::dequantize_q8_0(&b[row], out),
        }
    }

    /// Weight rows `rows` · activation row `a`, into `out` (one entry per row).
    fn dot_each_row(&self, kernel: Kernel, rows: Range<usize>, a: &[BlockQ8], out: &mut [f32]) {
        let range = self.block_range(rows);
        match self.blocks.as_ref() {
            Blocks::Q4_0(b) => on_kernel!(
                kernel,
                scalar_each_row(&b[range], a, out, blocks::dot_q4_0),
                dot_q4_0_each_row(&b[range], a, out)
            ),
            Blocks::Q4_1(b) => on_kernel!(
                kernel,
                scalar_each_row(&b[range], a, out, blocks::dot_q4_1),
                dot_q4_1_each_row(&b[range], a, out)
            ),
            Blocks::Q8_0(b) => on_kernel!(
                kernel,
                scalar_each_row(&b[range], a, out, blocks::dot_q8_0),
                dot_q8_0_each_row(&b[range], a, out)
            ),
        }
    }

    /// Weight row `r` · the `R` activation rows in `a` (back to back): the SIMD kernels unpack
    /// each weight block once for all of them.
    fn dot_shared<const R: usize>(
        &self,
        kernel: Kernel,
        r: usize,
        a: &[BlockQ8],
        out: &mut [f32; R],
    ) {
        let row = self.block_range(r..r + 1);
        match self.blocks.as_ref() {
            Blocks::Q4_0(b) => on_kernel!(
                kernel,
                scalar_shared(&b[row], a, out, blocks::dot_q4_0),
                dot_q4_0_rows(&b[row], a, out)
            ),
            Blocks::Q4_1(b) => on_kernel!(
                kernel,
                scalar_shared(&b[row], a, out, blocks::dot_q4_1),
                dot_q4_1_rows(&b[row], a, out)
            ),
            Blocks::Q8_0(b) => on_kernel!(
                kernel,
                scalar_shared(&b[row], a, out, blocks::dot_q8_0),
                dot_q8_0_rows(&b[row], a, out)
            ),
        }
    }

    /// `out` (m, rows) = `x` (m, cols) · selfᵀ, with `kernel`. Output rows are split over
    /// candle's CPU worker pool; every activation row is quantized once per call and each weight
    /// row is read once for all `m` activation rows, unpacked once per group of them.
    pub fn matmul_with(&self, kernel: Kernel, x: &[f32], m: usize, out: &mut [f32]) {
        assert_eq!(x.len(), m * self.cols, "activation size");
        assert_eq!(out.len(), m * self.rows, "output size");
        let per_row = self.cols / BLOCK;
        let mut acts = vec![BlockQ8::default(); m * per_row];
        for (xr, ar) in x
            .chunks_exact(self.cols)
            .zip(acts.chunks_exact_mut(per_row))
        {
            quantize_row(xr, ar);
        }
        let n = self.rows;
        let out_addr = out.as_mut_ptr() as usize;
        // SAFETY (for the raw writes): (i, r) is in bounds (asserted sizes) and each r belongs to
        // exactly one chunk, so no two workers write the same element.
        let write = |i: usize, r: usize, value: f32| unsafe {
            *(out_addr as *mut f32).add(i * n + r) = value
        };
        let wide = if kernel.wide_groups() {
            m - m % WIDE_GROUP
        } else {
            0
        };
        let grouped = wide + (m - wide) / NARROW_GROUP * NARROW_GROUP;
        candle_core::utils::barrier_pool().execute_chunked(n, |range| {
            let mut wide_out = [0f32; WIDE_GROUP];
            let mut narrow_out = [0f32; NARROW_GROUP];
            for r in range.clone() {
                for (g, a) in acts[..wide * per_row]
                    .chunks_exact(WIDE_GROUP * per_row)
                    .enumerate()
                {
                    self.dot_shared(kernel, r, a, &mut wide_out);
                    for (k, &value) in wide_out.iter().enumerate() {
                        write(g * WIDE_GROUP + k, r, value);
                    }
                }
                for (g, a) in acts[wide * per_row..grouped * per_row]
                    .chunks_exact(NARROW_GROUP * per_row)
                    .enumerate()
                {
                    self.dot_shared(kernel, r, a, &mut narrow_out);
                    for (k, &value) in narrow_out.iter().enumerate() {
                        write(wide + g * NARROW_GROUP + k, r, value);
                    }
                }
            }
            for i in grouped..m {
                // SAFETY: this chunk's rows of output row i; as for `write`.
                let segment = unsafe {
                    std::slice::from_raw_parts_mut(
                        (out_addr as *mut f32).add(i * n + range.start),
                        range.len(),
                    )
                };
                let a = &acts[i * per_row..(i + 1) * per_row];
                self.dot_each_row(kernel, range.clone(), a, segment);
            }
        });
    }

    /// [`Self::matmul_with`] on this CPU's fastest kernel.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        self.matmul_with(Kernel::detected(), x, m, out)
    }
}

/// `x` (.., in) → (.., out) through a [`QuantMatrix`], as a candle op on CPU f32 tensors.
#[derive(Debug, Clone)]
pub struct QuantMatMul(pub Arc<QuantMatrix>);

impl CustomOp1 for QuantMatMul {
    fn name(&self) -> &'static str {
        "quantized-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("the quantized kernels take f32 activations");
        };
        let Some(x) = layout.contiguous_offsets().map(|(a, b)| &data[a..b]) else {
            candle_core::bail!("the quantized kernels take contiguous activations");
        };
        let dims = layout.shape().dims();
        let cols = *dims.last().unwrap_or(&0);
        if cols != self.0.cols {
            candle_core::bail!(
                "quantized matmul: input has {cols} features, weight takes {}",
                self.0.cols
            );
        }
        let m = x.len() / cols;
        let mut out = vec![0f32; m * self.0.rows];
        self.0.matmul(x, m, &mut out);
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("non-empty") = self.0.rows;
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }
}

impl QuantMatMul {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }
}
