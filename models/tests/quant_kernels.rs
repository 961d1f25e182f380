//! Our CPU quantized kernels against candle's `QMatMul` and the dequantized f32 product, on
//! seeded random weights and on the default model's real weights, for every kernel this CPU runs.
//!
//! Tolerance: both implementations quantize activations to 8 bits (ours per 32-value block with
//! f32 scales; candle per 32 values with f16 scales, per 256 for K-quants), so each differs from
//! the exact f32 product by activation rounding. Ours must stay within 1% of the largest output
//! magnitude of the f32 product, and its root-mean-square error over all outputs must not be
//! more than 10% above candle's. Every SIMD kernel must equal the portable kernel bit for bit
//! (exact integer block sums, then the same f32 steps).

use attune_models::gguf::GgufFile;
use attune_models::quant::{Kernel, QuantMatrix};
use attune_models::testing::{default_model_path, SeededRng};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

/// Each kernel family with an input width it accepts (K-quants take whole 256-value
/// super-blocks), for the batching tests.
const FAMILIES: [(GgmlDType, usize); 4] = [
    (GgmlDType::Q4_0, 96),
    (GgmlDType::Q4_1, 96),
    (GgmlDType::Q8_0, 96),
    (GgmlDType::Q6K, 256),
];

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn rms_diff(a: &[f32], b: &[f32]) -> f32 {
    let squares: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    (squares / a.len() as f64).sqrt() as f32
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Checks every kernel on `weight` against candle and the f32 product for `m` rows.
fn check(weight: QTensor, m: usize, rng: &mut SeededRng) {
    let dev = Device::Cpu;
    let format = weight.dtype();
    let (_, cols) = weight.shape().dims2().unwrap();
    let x = rng.tensor((m, cols), 1.0, &dev).unwrap();
    let exact = flat(
        &x.matmul(&weight.dequantize(&dev).unwrap().t().unwrap())
            .unwrap(),
    );
    let ours = QuantMatrix::from_qtensor(&weight)
        .unwrap()
        .expect("a format our kernels serve");
    let candle = flat(&QMatMul::from_qtensor(weight).unwrap().forward(&x).unwrap());
    let scale = exact.iter().fold(0f32, |a, v| a.max(v.abs()));
    let candle_rms = rms_diff(&candle, &exact);
    let xs = flat(&x);
    let mut scalar: Option<Vec<f32>> = None;
    for kernel in Kernel::available() {
        let mut out = vec![0f32; exact.len()];
        ours.matmul_with(kernel, &xs, m, &mut out);
        let error = max_abs_diff(&out, &exact);
        assert!(
            error <= 0.01 * scale,
            "{format:?} {kernel:?}: error {error} vs f32 product of scale {scale}"
        );
        let rms = rms_diff(&out, &exact);
        assert!(
            rms <= 1.1 * candle_rms + 1e-6 * scale,
            "{format:?} {kernel:?}: RMS error {rms}, candle's {candle_rms}"
        );
        match &scalar {
            None => scalar = Some(out),
            Some(reference) => assert_eq!(
                &out, reference,
                "{format:?} {kernel:?} differs from the scalar kernel"
            ),
        }
    }
}

#[test]
fn kernels_match_candle_on_random_weights() {
    println!("kernels on this CPU: {:?}", Kernel::available());
    let mut rng = SeededRng::new(7);
    // (weight rows, columns, activation rows, weight spread)
    let shapes = [
        (64, 256, 1, 0.5),
        (96, 576, 3, 0.5),
        (33, 32, 17, 0.5),
        (576, 1536, 8, 0.5),
    ];
    // K-quants take whole 256-value super-blocks. Each case has hundreds of outputs: candle
    // quantizes their activations per 256 values, so the two errors differ by chance over a few
    // dozen. Several spreads reach the high bits of Q4_K's packed sub-block scales and mins.
    let k_shapes = [
        (64, 256, 8, 0.5),
        (96, 768, 3, 2.0),
        (33, 256, 17, 0.05),
        (576, 1536, 8, 0.5),
        (40, 512, 21, 1.0),
    ];
    let cases = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::Q5_0,
    ]
    .into_iter()
    .flat_map(|format| shapes.map(|shape| (format, shape)))
    .chain(
        [GgmlDType::Q4K, GgmlDType::Q6K]
            .into_iter()
            .flat_map(|format| k_shapes.map(|shape| (format, shape))),
    );
    for (format, (rows, cols, m, spread)) in cases {
        let w = rng.tensor((rows, cols), spread, &Device::Cpu).unwrap();
        check(QTensor::quantize(&w, format).unwrap(), m, &mut rng);
    }
}

/// Rewriting Q4_K as Q4_1 blocks keeps every weight: dequantized, they are candle's Q4_K
/// values up to the f16 rounding of each sub-block's scale and offset.
#[test]
fn q4k_weights_dequantize_to_candles_values() {
    let mut rng = SeededRng::new(29);
    let w = rng.tensor((40, 512), 1.0, &Device::Cpu).unwrap();
    let q = QTensor::quantize(&w, GgmlDType::Q4K).unwrap();
    let reference = flat(&q.dequantize(&Device::Cpu).unwrap());
    let ours = QuantMatrix::from_qtensor(&q)
        .unwrap()
        .expect("Q4_K is served");
    let range = reference.iter().fold(0f32, |a, v| a.max(v.abs()));
    let mut row = vec![0f32; 512];
    for r in 0..40 {
        ours.dequantize_row(r, &mut row);
        let error = max_abs_diff(&row, &reference[r * 512..(r + 1) * 512]);
        // 16 · (a scale's f16 rounding) + (an offset's), both below 2⁻¹¹ relative.
        assert!(error <= 2e-3 * range, "row {r}: {error} of {range}");
    }
}

#[test]
fn kernels_match_candle_on_the_default_models_weights() {
    let mut gguf = GgufFile::open(&default_model_path()).unwrap();
    let mut rng = SeededRng::new(11);
    // Q4_1 projections of early, middle and last layers, and the Q8_0 embedding (the lm_head).
    for name in [
        "blk.0.attn_q.weight",
        "blk.7.ffn_up.weight",
        "blk.29.ffn_down.weight",
        "token_embd.weight",
    ] {
        let w = gguf.tensor(name, &Device::Cpu).unwrap();
        check(w, 3, &mut rng);
    }
}

fn random_matrix(rng: &mut SeededRng, rows: usize, cols: usize, format: GgmlDType) -> QuantMatrix {
    let w = rng.tensor((rows, cols), 0.5, &Device::Cpu).unwrap();
    QuantMatrix::from_qtensor(&QTensor::quantize(&w, format).unwrap())
        .unwrap()
        .unwrap()
}

#[test]
fn stacked_matrices_give_their_parts_outputs_in_order() {
    let mut rng = SeededRng::new(3);
    let parts: Vec<QuantMatrix> = [48, 16, 16]
        .iter()
        .map(|&rows| random_matrix(&mut rng, rows, 64, GgmlDType::Q4_1))
        .collect();
    let stacked = QuantMatrix::stack(&parts.iter().collect::<Vec<_>>()).unwrap();
    assert_eq!((stacked.rows(), stacked.cols()), (80, 64));
    let x: Vec<f32> = (0..2 * 64).map(|_| rng.next_f32()).collect();
    let mut whole = vec![0f32; 2 * 80];
    stacked.matmul(&x, 2, &mut whole);
    let mut offset = 0;
    for part in &parts {
        let mut out = vec![0f32; 2 * part.rows()];
        part.matmul(&x, 2, &mut out);
        for row in 0..2 {
            assert_eq!(
                &whole[row * 80 + offset..row * 80 + offset + part.rows()],
                &out[row * part.rows()..(row + 1) * part.rows()]
            );
        }
        offset += part.rows();
    }
    let other_format = random_matrix(&mut rng, 16, 64, GgmlDType::Q8_0);
    assert!(QuantMatrix::stack(&[&parts[0], &other_format]).is_err());
    let other_width = random_matrix(&mut rng, 16, 32, GgmlDType::Q4_1);
    assert!(QuantMatrix::stack(&[&parts[0], &other_width]).is_err());
}

#[test]
fn formats_without_our_kernel_are_left_to_candle() {
    let w = SeededRng::new(5)
        .tensor((8, 256), 0.5, &Device::Cpu)
        .unwrap();
    for format in [GgmlDType::Q5K, GgmlDType::Q3K, GgmlDType::F16] {
        let q = QTensor::quantize(&w, format).unwrap();
        assert!(
            QuantMatrix::from_qtensor(&q).unwrap().is_none(),
            "{format:?}"
        );
    }
}

/// A row's result must not depend on how many rows share the call (batched sequences must get
/// the logits they would get alone).
#[test]
fn a_rows_result_is_the_same_alone_or_in_a_batch() {
    let mut rng = SeededRng::new(13);
    for (format, cols) in FAMILIES {
        // 44 weight rows: five whole groups of 8 and a partial one.
        let matrix = random_matrix(&mut rng, 44, cols, format);
        // On AVX-512, 21 rows: 16 in lanes, a batch of 4 sharing weights and a single row;
        // 19: 16 in lanes, a pair and a single row; 22 and 27: a last batch of 6 and of 11 in
        // padded lanes; 12: 12 in padded lanes alone; 7: a batch of 4, a pair and a single
        // row; 2: a pair alone. On AVX2 (lanes for Q4_0 and Q4_1 only), 21: two lane batches
        // of 8, a batch of 4 and a single row; 27: three lane batches, a pair and a single
        // row; 12: one lane batch and a batch of 4.
        for m in [21, 19, 22, 27, 12, 7, 2] {
            let x: Vec<f32> = (0..m * cols).map(|_| rng.next_f32()).collect();
            for kernel in Kernel::available() {
                let mut batched = vec![0f32; m * 44];
                matrix.matmul_with(kernel, &x, m, &mut batched);
                for i in 0..m {
                    let mut alone = vec![0f32; 44];
                    matrix.matmul_with(kernel, &x[i * cols..(i + 1) * cols], 1, &mut alone);
                    assert_eq!(
                        &batched[i * 44..(i + 1) * 44],
                        &alone[..],
                        "{format:?} {kernel:?} m {m} row {i}"
                    );
                }
            }
        }
    }
}

/// Kernels that keep block sums in 16 bits before widening (the AVX2 lanes and row kernels)
/// must still be exact where the sums are largest: weight codes at the top of their range
/// (each block's first value −1, the rest +1: Q4_0 and Q4_1 codes 15) against activations that
/// quantize to ±127 everywhere, in batches of every lane width.
#[test]
fn largest_block_sums_are_exact_on_every_kernel() {
    let cols = 256;
    let weights: Vec<f32> = (0..16 * cols)
        .map(|i| if i % 32 == 0 { -1.0 } else { 1.0 })
        .collect();
    let w = Tensor::from_vec(weights, (16, cols), &Device::Cpu).unwrap();
    for format in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q6K] {
        let matrix = QuantMatrix::from_qtensor(&QTensor::quantize(&w, format).unwrap())
            .unwrap()
            .unwrap();
        for m in [1, 8, 16] {
            // Rows of +1, of −1, and of +1 in each block's first half and −1 in its second
            // (Q6_K corrects each half apart).
            let x: Vec<f32> = (0..m * cols)
                .map(|i| match (i / cols) % 3 {
                    0 => 1.0,
                    1 => -1.0,
                    _ if i % 32 < 16 => 1.0,
                    _ => -1.0,
                })
                .collect();
            let mut reference = vec![0f32; m * 16];
            matrix.matmul_with(Kernel::Scalar, &x, m, &mut reference);
            for kernel in Kernel::available() {
                let mut out = vec![0f32; m * 16];
                matrix.matmul_with(kernel, &x, m, &mut out);
                assert_eq!(out, reference, "{format:?} {kernel:?} m {m}");
            }
        }
    }
}

/// A matmul that adds a residual as it writes gives the matmul's floats plus the residual, on
/// every kernel and every way rows are batched (lanes, padded lanes, batches, pairs, singles;
/// a partial last row group).
#[test]
fn matmul_add_is_the_matmul_then_the_addition() {
    let mut rng = SeededRng::new(19);
    for (format, cols) in FAMILIES {
        let matrix = random_matrix(&mut rng, 44, cols, format);
        for m in [1, 2, 7, 12, 16, 21, 22] {
            let x: Vec<f32> = (0..m * cols).map(|_| rng.next_f32() - 0.5).collect();
            let residual: Vec<f32> = (0..m * 44).map(|_| 4.0 * (rng.next_f32() - 0.5)).collect();
            for kernel in Kernel::available() {
                let mut product = vec![0f32; m * 44];
                matrix.matmul_with(kernel, &x, m, &mut product);
                let expected: Vec<u32> = residual
                    .iter()
                    .zip(&product)
                    .map(|(r, p)| (r + p).to_bits())
                    .collect();
                let mut fused = vec![f32::NAN; m * 44];
                matrix.matmul_add_with(kernel, &x, m, &residual, &mut fused);
                let fused: Vec<u32> = fused.iter().map(|v| v.to_bits()).collect();
                assert_eq!(fused, expected, "{format:?} {kernel:?} m {m}");
            }
        }
    }
}

/// Rows dequantized for embedding lookups are candle's dequantization, bit for bit.
#[test]
fn dequantized_rows_equal_candles() {
    let mut rng = SeededRng::new(17);
    // Q5_0 rewritten as Q8_0 bytes and Q6_K in bytes with a scale per half block keep every
    // weight exactly too.
    let formats = [
        (GgmlDType::Q4_0, 64),
        (GgmlDType::Q4_1, 64),
        (GgmlDType::Q8_0, 64),
        (GgmlDType::Q5_0, 96),
        (GgmlDType::Q6K, 512),
    ];
    for (format, cols) in formats {
        let w = rng.tensor((20, cols), 1.0, &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, format).unwrap();
        let want = flat(&q.dequantize(&Device::Cpu).unwrap());
        let matrix = QuantMatrix::from_qtensor(&q).unwrap().unwrap();
        let mut row = vec![0f32; cols];
        for r in 0..20 {
            matrix.dequantize_row(r, &mut row);
            assert_eq!(
                &row[..],
                &want[r * cols..(r + 1) * cols],
                "{format:?} row {r}"
            );
        }
    }
}
