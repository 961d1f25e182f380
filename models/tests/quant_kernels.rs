//! Our CPU quantized kernels against candle's `QMatMul` and the dequantized f32 product, on
//! seeded random weights and on the default model's real Q4_1 weights.
//!
//! Tolerance: both kernels quantize activations to 8 bits per 32-value block, so each differs
//! from the exact f32 product by activation rounding. Ours must stay within 1% of the output's
//! largest magnitude of the f32 product, and never be more than 10% worse than candle's own
//! error (ours uses f32 block scales where candle uses f16, so it is usually better).

use attune_models::gguf::GgufFile;
use attune_models::quant::{Kernel, Q4_1Matrix};
use attune_models::testing::{default_model_path, SeededRng};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn kernels() -> Vec<Kernel> {
    let mut all = vec![Kernel::Scalar];
    if Kernel::detected() != Kernel::Scalar {
        all.push(Kernel::detected());
    }
    all
}

/// Checks every kernel on `weight` (Q4_1) against candle and the f32 product for `m` rows.
fn check(weight: QTensor, m: usize, rng: &mut SeededRng) {
    let dev = Device::Cpu;
    let (_, cols) = weight.shape().dims2().unwrap();
    let x = rng.tensor((m, cols), 1.0, &dev).unwrap();
    let exact = x
        .matmul(&weight.dequantize(&dev).unwrap().t().unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let ours_matrix = Q4_1Matrix::from_qtensor(&weight).unwrap().expect("Q4_1");
    let candle = QMatMul::from_qtensor(weight)
        .unwrap()
        .forward(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let scale = exact.iter().fold(0f32, |a, v| a.max(v.abs()));
    let candle_error = max_abs_diff(&candle, &exact);
    let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut scalar_out = None;
    for kernel in kernels() {
        let mut out = vec![0f32; exact.len()];
        ours_matrix.matmul_with(kernel, &xs, m, &mut out);
        let error = max_abs_diff(&out, &exact);
        assert!(
            error <= 0.01 * scale,
            "{kernel:?}: error {error} vs f32 product of scale {scale}"
        );
        assert!(
            error <= 1.1 * candle_error + 1e-6 * scale,
            "{kernel:?}: error {error}, candle's {candle_error}"
        );
        // SIMD and scalar differ only in float summation order.
        match &scalar_out {
            None => scalar_out = Some(out),
            Some(reference) => assert!(max_abs_diff(&out, reference) <= 1e-5 * scale),
        }
    }
}

#[test]
fn q4_1_matches_candle_on_random_weights() {
    let mut rng = SeededRng::new(7);
    for (rows, cols, m) in [(64, 256, 1), (96, 576, 3), (33, 32, 17), (576, 1536, 8)] {
        let w = rng.tensor((rows, cols), 0.5, &Device::Cpu).unwrap();
        check(QTensor::quantize(&w, GgmlDType::Q4_1).unwrap(), m, &mut rng);
    }
}

#[test]
fn q4_1_matches_candle_on_the_default_models_weights() {
    let mut gguf = GgufFile::open(&default_model_path()).unwrap();
    let mut rng = SeededRng::new(11);
    for name in [
        "blk.0.attn_q.weight",
        "blk.29.ffn_down.weight",
        "blk.7.ffn_up.weight",
    ] {
        let w = gguf.tensor(name, &Device::Cpu).unwrap();
        check(w, 5, &mut rng);
    }
}

#[test]
fn stacked_matrices_give_their_parts_outputs_in_order() {
    let mut rng = SeededRng::new(3);
    let dev = Device::Cpu;
    let parts: Vec<Q4_1Matrix> = [48, 16, 16]
        .iter()
        .map(|&rows| {
            let w = rng.tensor((rows, 64), 0.5, &dev).unwrap();
            Q4_1Matrix::from_qtensor(&QTensor::quantize(&w, GgmlDType::Q4_1).unwrap())
                .unwrap()
                .unwrap()
        })
        .collect();
    let stacked = Q4_1Matrix::stack(&parts.iter().collect::<Vec<_>>()).unwrap();
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
    assert!(Q4_1Matrix::stack(&[
        &parts[0],
        &Q4_1Matrix::from_qtensor(
            &QTensor::quantize(
                &Tensor::zeros((32, 32), candle_core::DType::F32, &dev).unwrap(),
                GgmlDType::Q4_1
            )
            .unwrap()
        )
        .unwrap()
        .unwrap()
    ])
    .is_err());
}
