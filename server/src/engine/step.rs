//! One decoder step for the running batch: which tokens each sequence and branch feeds (prompt
//! pieces while prefilling, then the last generated token), one batched forward pass per model,
//! and the logits processors that rewrite a sequence's logits before sampling.

use super::Running;
use attune_models::{DecoderInput, LogitsFor, Model, SequenceHooks, SequenceStep};
use candle_core::{CpuStorage, Layout, Result as CandleResult, Storage, Tensor};

/// Last-position logits of a running sequence and of each of its branches.
pub struct StepLogits {
    pub main: LogitsRow,
    pub branches: Vec<Vec<f32>>,
}

/// A sequence's logits row: the decoder's output read where it lies in host memory (a step's
/// rows are 16 × 196 KB for the default model at 16 streams, and copying them out took ~2% of
/// a step), or a copy where it does not (another device) or a processor rewrote it.
pub enum LogitsRow {
    Host(Tensor),
    Owned(Vec<f32>),
}

impl LogitsRow {
    fn new(row: Tensor) -> CandleResult<Self> {
        let in_place = {
            let (storage, layout) = row.storage_and_layout();
            host_values(&storage, layout).is_some()
        };
        Ok(if in_place {
            Self::Host(row)
        } else {
            Self::Owned(row.to_vec1()?)
        })
    }

    /// Runs `f` on the row's values.
    pub fn read<R>(&self, f: impl FnOnce(&[f32]) -> R) -> CandleResult<R> {
        match self {
            Self::Owned(values) => Ok(f(values)),
            Self::Host(row) => {
                let (storage, layout) = row.storage_and_layout();
                let values = host_values(&storage, layout)
                    .ok_or_else(|| candle_core::Error::msg("logits left host memory"))?;
                Ok(f(values))
            }
        }
    }

    fn into_vec(self) -> CandleResult<Vec<f32>> {
        match self {
            Self::Owned(values) => Ok(values),
            Self::Host(row) => row.to_vec1(),
        }
    }
}

/// The values of a contiguous f32 tensor in host memory.
fn host_values<'a>(storage: &'a Storage, layout: &Layout) -> Option<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(values)), Some((start, end))) => Some(&values[start..end]),
        _ => None,
    }
}

/// Piece `index` of a prompt cut into `pieces` nearly equal parts (early ones may be empty;
/// the last never is): its tokens, or its rows of the input embeddings when it has images.
fn piece(
    tokens: &[u32],
    embeddings: Option<&Tensor>,
    pieces: usize,
    index: usize,
) -> CandleResult<DecoderInput> {
    let n = tokens.len();
    let range = n * index / pieces..n * (index + 1) / pieces;
    Ok(match embeddings {
        Some(e) if !range.is_empty() => {
            DecoderInput::Embeddings(e.narrow(0, range.start, range.len())?)
        }
        _ => DecoderInput::Tokens(tokens[range].to_vec()),
    })
}

/// Runs the decoder on `running` and their branches: everything on the engine's model in one
/// batch, then each other model's branches (contrastive decoding's amateurs) in one batch each.
///
/// Long prompts are prefilled over several steps: a sequence and its branches cut their prompts
/// into the same number of pieces, so they finish prefilling in the same step. Returns, per
/// running sequence, its logits, or `None` while it is still prefilling.
pub fn forward(model: &Model, running: &mut [Running]) -> CandleResult<Vec<Option<StepLogits>>> {
    // Batches by model (index 0 = the engine's); where each sequence's and branch's row is
    // (`None`: it feeds nothing this step).
    let mut models: Vec<&Model> = vec![model];
    let mut batches: Vec<Vec<SequenceStep>> = vec![Vec::new()];
    let mut main_rows: Vec<Option<usize>> = Vec::with_capacity(running.len());
    let mut branch_rows: Vec<Option<(usize, usize)>> = Vec::new();
    for r in running.iter_mut() {
        let (pieces, done) = (r.prefill_pieces, r.prefilled_pieces);
        let prefilling = done < pieces;
        let logits = if prefilling && done + 1 < pieces {
            LogitsFor::None
        } else {
            LogitsFor::Last
        };
        let last = r.seq.generated().last().copied();
        // A branch starts with its own prompt, then follows the main sequence's tokens.
        let input = |prompt: &[u32], embeddings: Option<&Tensor>| -> CandleResult<DecoderInput> {
            if prefilling {
                piece(prompt, embeddings, pieces, done)
            } else {
                Ok(DecoderInput::Tokens(last.into_iter().collect()))
            }
        };
        let main_input = input(
            &r.seq.prompt()[r.reused_prompt..],
            r.prompt_embeddings.as_ref(),
        )?;
        if main_input.is_empty()? {
            main_rows.push(None);
        } else {
            let mut step = SequenceStep::new(main_input, r.seq.cache_mut()).with_logits(logits);
            step.hooks = r.hooks.as_mut().map(|h| h as &mut dyn SequenceHooks);
            main_rows.push(Some(batches[0].len()));
            batches[0].push(step);
        }
        for b in &mut r.branches {
            let branch_input = input(&b.prompt, b.embeddings.as_ref())?;
            if branch_input.is_empty()? {
                branch_rows.push(None);
                continue;
            }
            let group = match &b.model {
                None => 0,
                Some(m) => match models.iter().position(|&known| std::ptr::eq(known, &**m)) {
                    Some(g) => g,
                    None => {
                        models.push(m);
                        batches.push(Vec::new());
                        models.len() - 1
                    }
                },
            };
            branch_rows.push(Some((group, batches[group].len())));
            batches[group].push(SequenceStep::new(branch_input, &mut b.cache).with_logits(logits));
        }
    }
    let mut logits: Vec<Vec<Option<Tensor>>> = Vec::with_capacity(batches.len());
    for (m, mut batch) in models.iter().zip(batches) {
        if batch.is_empty() {
            logits.push(Vec::new());
            continue;
        }
        let rows = m
            .decoder
            .forward(&mut batch)?
            .into_iter()
            .map(|l| l.map(|t| t.squeeze(0)).transpose())
            .collect::<CandleResult<Vec<_>>>()?;
        logits.push(rows);
    }
    let mut take = |row: Option<(usize, usize)>| -> CandleResult<Tensor> {
        row.and_then(|(group, row)| logits[group][row].take())
            .ok_or_else(|| candle_core::Error::msg("a finished prefill returned no logits"))
    };
    let mut branch_rows = branch_rows.into_iter();
    let mut out = Vec::with_capacity(running.len());
    for (r, main_row) in running.iter_mut().zip(main_rows) {
        let rows: Vec<_> = r
            .branches
            .iter()
            .map(|_| branch_rows.next().flatten())
            .collect();
        if r.prefilled_pieces < r.prefill_pieces {
            r.prefilled_pieces += 1;
            if r.prefilled_pieces < r.prefill_pieces {
                out.push(None);
                continue;
            }
        }
        let main = LogitsRow::new(take(main_row.map(|row| (0, row)))?)?;
        let branches = rows
            .into_iter()
            .map(|row| take(row)?.to_vec1())
            .collect::<CandleResult<_>>()?;
        out.push(Some(StepLogits { main, branches }));
    }
    Ok(out)
}

/// Lets the sequence's logits processors rewrite its logits before sampling.
pub fn apply_processors(
    model: &Model,
    r: &mut Running,
    logits: StepLogits,
) -> CandleResult<LogitsRow> {
    if r.processors.is_empty() {
        return Ok(logits.main);
    }
    let mut row = logits.main.into_vec()?;
    let context = r.seq.context();
    for (p, branches) in &mut r.processors {
        row = p.process(
            row,
            &logits.branches[branches.clone()],
            &model.decoder,
            &context,
        )?;
    }
    Ok(LogitsRow::Owned(row))
}
