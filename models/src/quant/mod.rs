//! Quantized matrix × f32 activations on the CPU for the GGUF formats candle has no SIMD kernel
//! for (Q4_1), with the instruction set chosen at run time so a default build is fast on any
//! x86-64. Candle's `QMatMul` stays the path for the other formats (its Q4_0, Q8_0 and K-quant
//! kernels already dispatch at run time) and the oracle these kernels are tested against.

#[cfg(target_arch = "x86_64")]
mod avx2;
mod blocks;

pub use blocks::{quantize_row, BlockQ4_1, BlockQ8, BLOCK};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use std::sync::{Arc, OnceLock};

/// Which dot-product implementation this CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Kernel {
    /// The fastest kernel this CPU supports (detected once).
    pub fn detected() -> Self {
        static DETECTED: OnceLock<Kernel> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                return Kernel::Avx2;
            }
            Kernel::Scalar
        })
    }

    fn dot_q4_1(self, w: &[BlockQ4_1], a: &[BlockQ8]) -> f32 {
        match self {
            Kernel::Scalar => blocks::dot_q4_1_scalar(w, a),
            // SAFETY: `detected` only picks Avx2 on CPUs with AVX2, FMA and F16C; callers pass
            // slices of one row length.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { avx2::dot_q4_1(w, a) },
        }
    }
}

/// A Q4_1 weight matrix (out_features, in_features), blocks row-major as in the GGUF file.
#[derive(Debug, Clone)]
pub struct Q4_1Matrix {
    rows: usize,
    cols: usize,
    blocks: Vec<BlockQ4_1>,
}

impl Q4_1Matrix {
    /// Takes a Q4_1 `QTensor` of shape (out, in); `None` for any other format.
    pub fn from_qtensor(t: &QTensor) -> Result<Option<Self>> {
        if t.dtype() != GgmlDType::Q4_1 {
            return Ok(None);
        }
        let (rows, cols) = t.shape().dims2()?;
        let bytes = t.data()?;
        let size = std::mem::size_of::<BlockQ4_1>();
        let blocks = bytes
            .chunks_exact(size)
            .map(|b| BlockQ4_1 {
                d: half::f16::from_le_bytes([b[0], b[1]]),
                m: half::f16::from_le_bytes([b[2], b[3]]),
                qs: b[4..size].try_into().expect("16 bytes"),
            })
            .collect::<Vec<_>>();
        if cols % BLOCK != 0 || blocks.len() != rows * cols / BLOCK {
            candle_core::bail!(
                "Q4_1 tensor of shape ({rows}, {cols}) has {} blocks",
                blocks.len()
            );
        }
        Ok(Some(Self { rows, cols, blocks }))
    }

    /// Stacks matrices with the same input size into one whose outputs are theirs in order, so
    /// projections of the same input (q, k, v; gate, up) run as one matmul.
    pub fn stack(parts: &[&Self]) -> Result<Self> {
        let cols = parts.first().map_or(0, |p| p.cols);
        if parts.iter().any(|p| p.cols != cols) {
            candle_core::bail!("stacked matrices must share their input size");
        }
        Ok(Self {
            rows: parts.iter().map(|p| p.rows).sum(),
            cols,
            blocks: parts
                .iter()
                .flat_map(|p| p.blocks.iter().copied())
                .collect(),
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    fn row(&self, r: usize) -> &[BlockQ4_1] {
        let per_row = self.cols / BLOCK;
        &self.blocks[r * per_row..(r + 1) * per_row]
    }

    /// `out` (m, rows) = `x` (m, cols) · selfᵀ, with `kernel`. Output rows are split over
    /// candle's CPU worker pool; every activation row is quantized once per call and each weight
    /// row is read once for all `m` activation rows.
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
        candle_core::utils::barrier_pool().execute_chunked(n, |range| {
            for r in range {
                let w = self.row(r);
                for (i, a) in acts.chunks_exact(per_row).enumerate() {
                    // SAFETY: (i, r) is in bounds (asserted sizes) and each r belongs to exactly
                    // one chunk, so no two workers write the same element.
                    unsafe { *(out_addr as *mut f32).add(i * n + r) = kernel.dot_q4_1(w, a) };
                }
            }
        });
    }

    /// [`Self::matmul_with`] on this CPU's fastest kernel.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        self.matmul_with(Kernel::detected(), x, m, out)
    }
}

/// `x` (.., in) → (.., out) through a [`Q4_1Matrix`], as a candle op on CPU f32 tensors.
#[derive(Debug, Clone)]
pub struct Q4_1MatMul(pub Arc<Q4_1Matrix>);

impl CustomOp1 for Q4_1MatMul {
    fn name(&self) -> &'static str {
        "q4_1-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("the Q4_1 kernel takes f32 activations");
        };
        let Some(x) = layout.contiguous_offsets().map(|(a, b)| &data[a..b]) else {
            candle_core::bail!("the Q4_1 kernel takes contiguous activations");
        };
        let dims = layout.shape().dims();
        let cols = *dims.last().unwrap_or(&0);
        if cols != self.0.cols {
            candle_core::bail!(
                "Q4_1 matmul: input has {cols} features, weight takes {}",
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

impl Q4_1MatMul {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }
}
