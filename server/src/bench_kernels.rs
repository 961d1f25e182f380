//! `attune bench --kernels`: the matrix products of one decode step, as the decoder runs them
//! (q/k/v and gate/up fused where our kernels allow), on our quantized kernels and on candle's
//! `QMatMul` for the same GGUF tensors, at one activation row and at more (a batched decode
//! step multiplies one row per sequence). The last table sums a whole step's products, so
//! "rows per one-row time" is how much aggregate decode throughput batching can add when
//! nothing but the matmuls is counted.

use crate::bench::median;
use anyhow::{Context, Result};
use attune_models::gguf::GgufFile;
use attune_models::linear::{Linear, Weight};
use attune_models::quant::Kernel;
use attune_models::testing::SeededRng;
use attune_models::{DecoderConfig, WeightName};
use candle_core::quantized::QMatMul;
use candle_core::{Device, Module};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct KernelBenchConfig {
    /// Activation rows per product (decode steps of that many sequences).
    pub rows: Vec<usize>,
    pub runs: usize,
}

/// Each timing repeats a product until this long has passed, so that short ones are not
/// lost in timer and scheduling noise.
const MIN_TIMING: Duration = Duration::from_millis(20);

/// One product of a decode step: ours (fused where the decoder fuses) and candle's kernels
/// for its parts, and how many of it a step runs (layers with the same shapes and formats);
/// `rows` and `cols` are the weight's (all parts' rows together).
struct StepMatmul {
    name: String,
    format: String,
    rows: usize,
    cols: usize,
    per_step: usize,
    ours: Vec<Linear>,
    candle: Vec<QMatMul>,
}

/// Median µs of each product at each row count, ours and candle's.
struct Timings {
    ours: Vec<Vec<f64>>,
    candle: Vec<Vec<f64>>,
}

pub fn run(gguf_path: &Path, config: &KernelBenchConfig, threads: usize) -> Result<()> {
    anyhow::ensure!(
        config.rows.iter().all(|&m| m > 0),
        "--rows must be positive"
    );
    let matmuls = step_matmuls(gguf_path)?;
    let timings = measure(&matmuls, config)?;
    println!(
        "kernels: {} | {threads} threads | {} | median of {} runs (ours and candle's alternating)\n",
        Kernel::detected().name(),
        gguf_path.display(),
        config.runs
    );
    print_products(&matmuls, &timings, &config.rows);
    println!();
    print_step(&matmuls, &timings, &config.rows);
    Ok(())
}

/// A decode step's products, one per distinct (role, formats, shapes), with their counts.
fn step_matmuls(path: &Path) -> Result<Vec<StepMatmul>> {
    let mut gguf = GgufFile::open(path)?;
    let cfg = DecoderConfig::from_gguf(&gguf.content)?;
    let mut roles: Vec<(&str, Vec<WeightName>)> = Vec::new();
    for l in 0..cfg.num_layers {
        roles.extend([
            (
                "attention q/k/v",
                vec![WeightName::Q(l), WeightName::K(l), WeightName::V(l)],
            ),
            ("attention output", vec![WeightName::O(l)]),
            ("mlp gate/up", vec![WeightName::Gate(l), WeightName::Up(l)]),
            ("mlp down", vec![WeightName::Down(l)]),
        ]);
    }
    // A tied lm_head multiplies by the embedding table.
    let lm_head = if gguf.has_tensor(&WeightName::LmHead.gguf()) {
        WeightName::LmHead
    } else {
        WeightName::Embedding
    };
    roles.push(("lm_head", vec![lm_head]));

    let mut matmuls: Vec<StepMatmul> = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (role, names) in roles {
        let infos = names
            .iter()
            .map(|n| {
                let name = n.gguf();
                gguf.content
                    .tensor_infos
                    .get(&name)
                    .map(|t| (t.ggml_dtype, t.shape.dims().to_vec()))
                    .with_context(|| format!("GGUF tensor `{name}` is missing"))
            })
            .collect::<Result<Vec<_>>>()?;
        let key = format!("{role} {infos:?}");
        if let Some(&i) = seen.get(&key) {
            matmuls[i].per_step += 1;
            continue;
        }
        seen.insert(key, matmuls.len());
        // Each side gets its own copy of the tensors (a QTensor is not Clone).
        let mut load = || -> Result<Vec<_>> {
            names
                .iter()
                .map(|n| gguf.tensor(&n.gguf(), &Device::Cpu))
                .collect()
        };
        let candle = load()?
            .into_iter()
            .map(QMatMul::from_qtensor)
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut parts = load()?
            .into_iter()
            .map(|t| Linear::quantized(t, None))
            .collect::<candle_core::Result<Vec<_>>>()?;
        // As in the decoder: one product when the parts fuse, else each on its own.
        let ours = match Linear::fuse(&mut parts.iter_mut().collect::<Vec<_>>())? {
            Some(fused) => vec![fused],
            None => parts,
        };
        let mut formats: Vec<String> = infos.iter().map(|(d, _)| format!("{d:?}")).collect();
        formats.dedup();
        let on_candle = ours.iter().any(|l| matches!(l.weight(), Weight::Candle(_)));
        matmuls.push(StepMatmul {
            name: role.to_string(),
            format: if on_candle {
                format!("{} (candle's kernel)", formats.join("+"))
            } else {
                formats.join("+")
            },
            rows: ours.iter().map(Linear::out_features).sum(),
            cols: infos[0].1[1],
            per_step: 1,
            ours,
            candle,
        });
    }
    Ok(matmuls)
}

fn measure(matmuls: &[StepMatmul], config: &KernelBenchConfig) -> Result<Timings> {
    let mut rng = SeededRng::new(1);
    let mut ours = vec![vec![Vec::new(); config.rows.len()]; matmuls.len()];
    let mut candle = ours.clone();
    for _ in 0..config.runs {
        for (i, matmul) in matmuls.iter().enumerate() {
            for (j, &m) in config.rows.iter().enumerate() {
                let x = rng.tensor((m, matmul.cols), 1.0, &Device::Cpu)?;
                ours[i][j].push(time_us(|| {
                    matmul.ours.iter().try_for_each(|l| l.forward(&x).map(drop))
                })?);
                candle[i][j].push(time_us(|| {
                    matmul
                        .candle
                        .iter()
                        .try_for_each(|c| c.forward(&x).map(drop))
                })?);
            }
        }
    }
    let medians = |t: Vec<Vec<Vec<f64>>>| -> Vec<Vec<f64>> {
        t.into_iter()
            .map(|per_rows| per_rows.iter().map(|v| median(v)).collect())
            .collect()
    };
    Ok(Timings {
        ours: medians(ours),
        candle: medians(candle),
    })
}

/// µs per call of `f`, over as many calls as fill [`MIN_TIMING`] (after one warm-up call).
fn time_us(mut f: impl FnMut() -> candle_core::Result<()>) -> Result<f64> {
    f()?;
    let (start, mut calls) = (Instant::now(), 0u32);
    while calls == 0 || start.elapsed() < MIN_TIMING {
        f()?;
        calls += 1;
    }
    Ok(start.elapsed().as_secs_f64() * 1e6 / f64::from(calls))
}

fn print_products(matmuls: &[StepMatmul], t: &Timings, rows: &[usize]) {
    println!("| product | format | out × in | per step | rows | attune µs | candle µs | vs candle | attune GMAC/s | attune rows per one-row time |");
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for (i, mm) in matmuls.iter().enumerate() {
        for (j, &m) in rows.iter().enumerate() {
            let (ours, candle) = (t.ours[i][j], t.candle[i][j]);
            let macs = (m * mm.rows * mm.cols) as f64;
            let gain = batching_gain(&t.ours[i], rows, j);
            println!(
                "| {} | {} | {}×{} | {} | {m} | {ours:.1} | {candle:.1} | {:.2}x | {:.1} | {gain} |",
                mm.name,
                mm.format,
                mm.rows,
                mm.cols,
                mm.per_step,
                candle / ours,
                macs / ours / 1e3,
            );
        }
    }
}

fn print_step(matmuls: &[StepMatmul], t: &Timings, rows: &[usize]) {
    let step = |times: &[Vec<f64>]| -> Vec<f64> {
        (0..rows.len())
            .map(|j| {
                matmuls
                    .iter()
                    .zip(times)
                    .map(|(mm, per_rows)| mm.per_step as f64 * per_rows[j])
                    .sum::<f64>()
                    / 1e3
            })
            .collect()
    };
    let (ours, candle) = (step(&t.ours), step(&t.candle));
    println!("One decode step's matmuls (every layer and the lm_head):\n");
    println!("| rows | attune ms | candle ms | vs candle | attune rows per one-row time |");
    println!("|---:|---:|---:|---:|---:|");
    for (j, &m) in rows.iter().enumerate() {
        println!(
            "| {m} | {:.2} | {:.2} | {:.2}x | {} |",
            ours[j],
            candle[j],
            candle[j] / ours[j],
            batching_gain(&ours, rows, j),
        );
    }
}

/// rows[j] · T(1) / T(rows[j]): how many rows a batch of rows[j] multiplies in the time of one
/// row alone, the throughput multiple of batching ("-" without a one-row timing).
fn batching_gain(times: &[f64], rows: &[usize], j: usize) -> String {
    match rows.iter().position(|&m| m == 1) {
        Some(one) => format!("{:.2}x", rows[j] as f64 * times[one] / times[j]),
        None => "-".into(),
    }
}
