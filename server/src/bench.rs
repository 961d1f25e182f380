//! `attune bench`: prefill and decode speed of our decoder with no hooks, with pass-through
//! hooks and with each implemented intervention, against candle-transformers'
//! `quantized_llama` on the same GGUF, in one run, with the same threads.

use crate::llama_cpp_peer::LlamaCppPeer;
use crate::sampling::argmax;
use anyhow::{Context, Result};
use attune_interventions::{parse, Installed, ModelKind, ModelShape};
use attune_models::{
    DecoderInput, HookPoint, KvCache, Model, ModelSource, SequenceHooks, SequenceStep,
};
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use std::path::PathBuf;
use std::time::Instant;

const PARAGRAPH: &str = "The history of astronomy is a story of patient observation. Long before \
telescopes, people tracked the motion of the Sun, the Moon and the planets across the sky, \
recorded eclipses, and built calendars around the seasons. Later, careful measurements of \
planetary positions led to laws of motion that explained why orbits are ellipses, and those \
laws in turn pointed to gravity as a universal force. ";

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    pub runs: usize,
    /// Python of a venv with llama-cpp-python: adds llama.cpp as a peer.
    pub llama_cpp: Option<PathBuf>,
}

/// The prefix of the prompt-contrast row (CD's same-model amateur).
const CONTRAST_PREFIX: &str = "I love repetitive text! Here is my writing: ";

/// Tokens per second of one run (also what the llama.cpp peer reports, as JSON).
#[derive(Debug, Clone, Copy, serde::Deserialize)]
pub struct Speed {
    pub prefill: f64,
    pub decode: f64,
}

/// Reads every hook point and changes nothing: the cost of the hook plumbing itself.
struct PassThrough;

impl SequenceHooks for PassThrough {
    fn wants(&self, _: HookPoint, _: usize) -> bool {
        true
    }
}

/// Interventions measured against no intervention, with the parameters that make them act at
/// every decode step.
const INTERVENTIONS: &[(&str, &str)] = &[
    (
        "zerotuning, gamma 2, all heads",
        r#"{"type": "zerotuning", "gamma": 2.0}"#,
    ),
    (
        "act, defaults, every step",
        r#"{"type": "act", "decode": true}"#,
    ),
    (
        "contrastive_decoding, dola (high)",
        r#"{"type": "contrastive_decoding", "mode": "dola"}"#,
    ),
    // A no-op while the context fits in k: use long prompts (--prompt-tokens) to see it work.
    (
        "recycled_attention, k 128, stride 16",
        r#"{"type": "recycled_attention", "k": 128, "stride": 16}"#,
    ),
];

/// Runs the benchmark; `amateur` (a model with the same vocabulary) adds a row for contrastive
/// decoding against it.
pub fn run(
    model: &Model,
    amateur: Option<&Model>,
    config: &BenchConfig,
    threads: usize,
) -> Result<()> {
    let prompt = bench_prompt(model, config.prompt_tokens)?;
    let cfg = model.decoder.config();
    let shape = ModelShape::of(cfg, ModelKind::Llm);
    let mut interventions = INTERVENTIONS
        .iter()
        .map(|(name, spec)| {
            Ok((
                name.to_string(),
                parse(&serde_json::from_str(spec)?, &shape)?,
                None,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    // The two-branch contrasts, each with the branch the engine would run beside the request.
    let mut contrast_prompt = model.tokenizer.encode(CONTRAST_PREFIX, true)?;
    contrast_prompt.extend(&prompt);
    interventions.push((
        "contrastive_decoding, prompt contrast (branch in the same batch)".into(),
        parse(
            &serde_json::json!({"type": "contrastive_decoding", "mode": "prompt", "contrast_prefix": CONTRAST_PREFIX}),
            &shape,
        )?,
        Some(Branch {
            model,
            prompt: contrast_prompt,
        }),
    ));
    if let Some(amateur) = amateur {
        anyhow::ensure!(
            amateur.tokenizer.same_vocabulary(&model.tokenizer),
            "the amateur's vocabulary differs from the model's"
        );
        interventions.push((
            format!(
                "contrastive_decoding, amateur {}",
                amateur.source.path().display()
            ),
            parse(
                &serde_json::json!({"type": "contrastive_decoding", "mode": "amateur", "amateur_model": "amateur"}),
                &shape,
            )?,
            Some(Branch {
                model: amateur,
                prompt: prompt.clone(),
            }),
        ));
    }
    let mut rows: Vec<(String, Vec<Speed>)> = vec![
        ("attune, no hooks".into(), Vec::new()),
        (
            "attune, pass-through hook at every point".into(),
            Vec::new(),
        ),
    ];
    rows.extend(
        interventions
            .iter()
            .map(|(name, ..)| (name.clone(), Vec::new())),
    );
    let gguf = match &model.source {
        ModelSource::Gguf(path) => Some(path.clone()),
        ModelSource::HfDir(_) => None,
    };
    let mut candle_peer = gguf.as_deref().map(load_peer).transpose()?;
    let mut llama_cpp = match (&config.llama_cpp, &gguf) {
        (Some(python), Some(gguf)) => Some(LlamaCppPeer::start(
            python,
            gguf,
            config.decode_tokens,
            threads,
        )?),
        (Some(_), None) => anyhow::bail!("the llama.cpp peer needs a GGUF model"),
        (None, _) => None,
    };
    let mut candle_speeds = Vec::new();
    let mut llama_cpp_speeds = Vec::new();
    // Interleave the contenders run by run so that machine noise hits them alike.
    for _ in 0..config.runs {
        rows[0].1.push(run_attune(
            model,
            &prompt,
            config.decode_tokens,
            Installed::default(),
            None,
        )?);
        rows[1].1.push(run_attune(
            model,
            &prompt,
            config.decode_tokens,
            Installed::hooks(PassThrough),
            None,
        )?);
        for (i, (_, intervention, branch)) in interventions.iter().enumerate() {
            rows[2 + i].1.push(run_attune(
                model,
                &prompt,
                config.decode_tokens,
                intervention.install(),
                branch.as_ref(),
            )?);
        }
        if let Some(peer) = candle_peer.as_mut() {
            candle_speeds.push(run_peer(peer, &prompt, config.decode_tokens)?);
        }
        if let Some(peer) = llama_cpp.as_mut() {
            llama_cpp_speeds.push(peer.run(&prompt)?);
        }
    }
    // Ratios are given against each peer that ran.
    let mut peers = Vec::new();
    if candle_peer.is_some() {
        peers.push(("quantized_llama", median_speed(&candle_speeds)));
        rows.push(("candle quantized_llama (peer)".into(), candle_speeds));
    }
    if llama_cpp.is_some() {
        peers.push(("llama.cpp", median_speed(&llama_cpp_speeds)));
        rows.push((
            "llama.cpp via llama-cpp-python (peer)".into(),
            llama_cpp_speeds,
        ));
    }

    println!(
        "model: {} | threads: {threads} | prompt: {} tokens | decode: {} tokens | median of {} runs (vs no hooks: of each run's ratio) | kernel: {}",
        model.source.path().display(),
        prompt.len(),
        config.decode_tokens,
        config.runs,
        attune_models::quant::Kernel::detected().name(),
    );
    // Against no hooks, each run's own ratio (the rows of a run ran back to back), then the
    // median: a slow or fast spell of the machine moves both sides of a ratio alike.
    let baseline = rows[0].1.clone();
    let vs_baseline = |speeds: &[Speed]| {
        let mut ratios: Vec<f64> = speeds
            .iter()
            .zip(&baseline)
            .map(|(s, b)| s.decode / b.decode)
            .collect();
        ratios.sort_by(f64::total_cmp);
        ratios[ratios.len() / 2]
    };
    let mut header = "| engine | prefill tok/s | decode tok/s | decode vs no hooks |".to_string();
    let mut rule = "|---|---:|---:|---:|".to_string();
    for (peer, _) in &peers {
        header += &format!(" prefill vs {peer} | decode vs {peer} |");
        rule += "---:|---:|";
    }
    println!("{header}\n{rule}");
    for (name, speeds) in &rows {
        let m = median_speed(speeds);
        let mut line = format!(
            "| {name} | {:.1} | {:.1} | {:.2}x |",
            m.prefill,
            m.decode,
            vs_baseline(speeds)
        );
        for (_, p) in &peers {
            line += &format!(
                " {:.2}x | {:.2}x |",
                m.prefill / p.prefill,
                m.decode / p.decode
            );
        }
        println!("{line}");
    }
    Ok(())
}

/// A prompt of exactly `len` tokens of ordinary English.
fn bench_prompt(model: &Model, len: usize) -> Result<Vec<u32>> {
    let once = model.tokenizer.encode(PARAGRAPH, false)?;
    let tokens: Vec<u32> = once.iter().cycle().take(len).copied().collect();
    anyhow::ensure!(!tokens.is_empty(), "the benchmark prompt is empty");
    Ok(tokens)
}

/// A contrast branch benchmarked as the engine runs it: in the same batch as its sequence when
/// on the same model, as a second forward pass on its own model otherwise.
pub struct Branch<'a> {
    pub model: &'a Model,
    pub prompt: Vec<u32>,
}

/// Greedy prefill and decode with `installed` on the sequence (its logits processor included)
/// and `branch` beside it.
fn run_attune(
    model: &Model,
    prompt: &[u32],
    decode_tokens: usize,
    installed: Installed,
    branch: Option<&Branch>,
) -> Result<Speed> {
    let Installed {
        mut hooks,
        mut processor,
        ..
    } = installed;
    let decoder = &model.decoder;
    let mut cache = decoder.new_cache();
    let mut branch_cache = branch.map(|b| b.model.decoder.new_cache());
    let mut context = prompt.to_vec();
    let mut step = |input: &[u32], branch_input: &[u32], context: &[u32]| -> Result<u32> {
        let branch = branch.zip(branch_cache.as_mut()).map(|(b, c)| (b.model, c));
        let (logits, branch_logits) = forward_pair(
            model,
            &mut cache,
            hooks.as_deref_mut(),
            input,
            branch,
            branch_input,
        )?;
        let logits = match processor.as_mut() {
            Some(p) => p.process(logits, &branch_logits, decoder, context)?,
            None => logits,
        };
        Ok(argmax(&logits))
    };
    let branch_prompt = branch.map_or(&[][..], |b| &b.prompt[..]);
    let start = Instant::now();
    let mut next = step(prompt, branch_prompt, &context)?;
    let prefill = start.elapsed().as_secs_f64();
    let start = Instant::now();
    for _ in 0..decode_tokens {
        context.push(next);
        next = step(&[next], &[next], &context)?;
    }
    Ok(Speed {
        prefill: prompt.len() as f64 / prefill,
        decode: decode_tokens as f64 / start.elapsed().as_secs_f64(),
    })
}

/// One step of a sequence and (if any) its branch; returns their last-position logits.
fn forward_pair(
    model: &Model,
    cache: &mut KvCache,
    hooks: Option<&mut (dyn SequenceHooks + '_)>,
    input: &[u32],
    branch: Option<(&Model, &mut KvCache)>,
    branch_input: &[u32],
) -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
    let mut main = SequenceStep::new(DecoderInput::Tokens(input.to_vec()), cache);
    main.hooks = hooks.map(|h| h as &mut dyn SequenceHooks);
    let Some((branch_model, branch_cache)) = branch else {
        return Ok((
            last_row(model.decoder.forward(&mut [main])?.pop())?,
            Vec::new(),
        ));
    };
    let branch_step = SequenceStep::new(DecoderInput::Tokens(branch_input.to_vec()), branch_cache);
    if std::ptr::eq(branch_model, model) {
        let mut out = model.decoder.forward(&mut [main, branch_step])?;
        let branch_logits = last_row(out.pop())?;
        Ok((last_row(out.pop())?, vec![branch_logits]))
    } else {
        let main_logits = last_row(model.decoder.forward(&mut [main])?.pop())?;
        let branch_logits = last_row(branch_model.decoder.forward(&mut [branch_step])?.pop())?;
        Ok((main_logits, vec![branch_logits]))
    }
}

/// The last position's logits of one sequence's step output.
fn last_row(logits: Option<Option<Tensor>>) -> Result<Vec<f32>> {
    let logits = logits.flatten().context("the step returned no logits")?;
    Ok(logits.squeeze(0)?.to_vec1::<f32>()?)
}

fn load_peer(path: &std::path::Path) -> Result<ModelWeights> {
    let mut file = std::fs::File::open(path)?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file)?;
    ModelWeights::from_gguf(content, &mut file, &Device::Cpu)
        .context("quantized_llama cannot load this GGUF")
}

fn run_peer(peer: &mut ModelWeights, prompt: &[u32], decode_tokens: usize) -> Result<Speed> {
    let input = Tensor::new(prompt, &Device::Cpu)?.unsqueeze(0)?;
    let start = Instant::now();
    let logits = peer.forward(&input, 0)?;
    let prefill = start.elapsed().as_secs_f64();
    let mut next = argmax(&logits.squeeze(0)?.to_vec1::<f32>()?);
    let start = Instant::now();
    for i in 0..decode_tokens {
        let input = Tensor::new(&[next], &Device::Cpu)?.unsqueeze(0)?;
        let logits = peer.forward(&input, prompt.len() + i)?;
        next = argmax(&logits.squeeze(0)?.to_vec1::<f32>()?);
    }
    Ok(Speed {
        prefill: prompt.len() as f64 / prefill,
        decode: decode_tokens as f64 / start.elapsed().as_secs_f64(),
    })
}

fn median_speed(speeds: &[Speed]) -> Speed {
    let pick = |f: fn(&Speed) -> f64| median(&speeds.iter().map(f).collect::<Vec<_>>());
    Speed {
        prefill: pick(|s| s.prefill),
        decode: pick(|s| s.decode),
    }
}

/// The middle value (the upper one of an even count).
pub(crate) fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
