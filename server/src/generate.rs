//! Running one sequence to the end on a model: the core of `attune generate` and a reference
//! for the batching engine.

use crate::sequence::{FinishReason, GenerationParams, Sequence, StepOutput};
use anyhow::Result;
use attune_models::{Model, SequenceStep};

pub struct Completion {
    pub text: String,
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    pub finish_reason: FinishReason,
    pub steps: Vec<StepOutput>,
}

/// Generates from `prompt`; `on_step` sees every step as it happens (for streaming).
pub fn generate(
    model: &Model,
    prompt: Vec<u32>,
    params: GenerationParams,
    mut on_step: impl FnMut(&StepOutput),
) -> Result<Completion> {
    let prompt_tokens = prompt.len();
    let cfg = model.decoder.config();
    let mut seq = Sequence::new(
        prompt,
        params,
        model.decoder.new_cache(),
        model.tokenizer.stop_ids().clone(),
        cfg.max_position_embeddings,
    );
    let mut steps = Vec::new();
    loop {
        let input = seq.next_input();
        let mut step = SequenceStep::new(input, seq.cache_mut());
        let logits = model.decoder.forward(std::slice::from_mut(&mut step))?;
        let row = logits[0]
            .as_ref()
            .expect("last-position logits were requested")
            .squeeze(0)?
            .to_vec1::<f32>()?;
        let out = seq.on_logits(&row, &model.tokenizer)?;
        on_step(&out);
        steps.push(out);
        if let Some(finish_reason) = seq.finished() {
            return Ok(Completion {
                text: seq.text().to_string(),
                tokens: seq.generated().to_vec(),
                prompt_tokens,
                finish_reason,
                steps,
            });
        }
    }
}
