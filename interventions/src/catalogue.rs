//! The catalogue served at `/v1/interventions`: every method, the models it applies to, and
//! its parameters with types, defaults and ranges.

use crate::carve::{GENERAL_PROMPT, SUFFIX};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Text-only language models (and a VLM's language tower).
    Llm,
    /// Vision-language models.
    Vlm,
}

#[derive(Debug, Clone, Serialize)]
pub struct ParamInfo {
    pub name: &'static str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub default: serde_json::Value,
    pub range: &'static str,
    pub description: &'static str,
    /// The same constraints as a JSON Schema fragment (used by the OpenAPI document).
    pub schema: serde_json::Value,
}

#[derive(Debug, Clone, Serialize)]
pub struct MethodInfo {
    pub name: &'static str,
    pub applies_to: Vec<ModelKind>,
    pub implemented: bool,
    pub description: &'static str,
    pub parameters: Vec<ParamInfo>,
}

pub fn catalogue() -> Vec<MethodInfo> {
    use serde_json::json;
    let both = || vec![ModelKind::Llm, ModelKind::Vlm];
    vec![
        MethodInfo {
            name: "zerotuning",
            applies_to: both(),
            implemented: true,
            description: "ZeroTuning (Han et al. 2025): scales the attention each query pays to \
                the first token by gamma and renormalizes, in the chosen layers and heads, at \
                prefill and every decode step (exact pre-softmax form: +ln(gamma) on the first \
                key's score). gamma > 1 flattens attention, < 1 sharpens it; 1 is a no-op.",
            parameters: vec![
                ParamInfo {
                    name: "gamma",
                    kind: "number",
                    default: json!(1.0),
                    range: "[1e-6, 1e6]",
                    description: "Scale of the attention to the first token.",
                    schema: json!({"type": "number", "minimum": 1e-6, "maximum": 1e6, "default": 1.0}),
                },
                ParamInfo {
                    name: "layers",
                    kind: "array of integers | null",
                    default: json!(null),
                    range: "each in 0..num_layers; null = all layers",
                    description: "Decoder layers to apply gamma in.",
                    schema: json!({"type": ["array", "null"], "items": {"type": "integer", "minimum": 0}}),
                },
                ParamInfo {
                    name: "heads",
                    kind: "array of integers | null",
                    default: json!(null),
                    range: "each in 0..num_heads; null = all query heads",
                    description: "Query heads to apply gamma in (the same set in every layer).",
                    schema: json!({"type": ["array", "null"], "items": {"type": "integer", "minimum": 0}}),
                },
                ParamInfo {
                    name: "per_head",
                    kind: "array of {layer, head, gamma}",
                    default: json!([]),
                    range: "layer/head as above, gamma in [1e-6, 1e6]",
                    description: "Per-(layer, head) gammas; override `gamma` where given.",
                    schema: json!({"type": "array", "items": {
                        "type": "object",
                        "required": ["layer", "head", "gamma"],
                        "additionalProperties": false,
                        "properties": {
                            "layer": {"type": "integer", "minimum": 0},
                            "head": {"type": "integer", "minimum": 0},
                            "gamma": {"type": "number", "minimum": 1e-6, "maximum": 1e6},
                        },
                    }}),
                },
                ParamInfo {
                    name: "auto",
                    kind: "boolean | {grid: array of numbers}",
                    default: json!(false),
                    range: "true = grid [0.5, 0.75, 1, 1.5, 2, 3]; 1 to 16 grid values in [1e-6, 1e6]",
                    description: "Pick gamma per prompt (our proposal; the paper's unsupervised \
                        objective is unverified): one extra prefill per grid value, batched, \
                        keeping the gamma with the lowest next-token entropy at the last prompt \
                        position. Replaces `gamma` on layers x heads; the choice and each grid \
                        value's entropy come back in the choice's `intervention_report`.",
                    schema: json!({"oneOf": [
                        {"type": "boolean"},
                        {"type": "object", "additionalProperties": false, "properties": {
                            "grid": {"type": "array", "minItems": 1, "maxItems": 16,
                                     "items": {"type": "number", "minimum": 1e-6, "maximum": 1e6}},
                        }},
                    ], "default": false}),
                },
            ],
        },
        MethodInfo {
            name: "act",
            applies_to: both(),
            implemented: true,
            description: "ACT (Yu et al. 2024): in the chosen heads, keys drawing more than \
                `threshold` of the attention on average are attention sinks; all but the first \
                (normally the initial token) get their attention multiplied by beta, and the freed \
                mass goes to the other keys in proportion to their weight. Sinks are detected per \
                request. Defaults: all heads of layers 2..N-2 (the official per-model head lists \
                were calibrated offline; `all` was not validated by the authors), prompt only.",
            parameters: vec![
                ParamInfo {
                    name: "beta",
                    kind: "number",
                    default: json!(0.4),
                    range: "[0, 1]; 1 = off",
                    description: "Factor applied to the attention of the sinks after the first.",
                    schema: json!({"type": "number", "minimum": 0, "maximum": 1, "default": 0.4}),
                },
                ParamInfo {
                    name: "threshold",
                    kind: "number",
                    default: json!(0.1),
                    range: "(0, 1]; 1 = off (0.15 was used for chat)",
                    description: "Average attention above which a key counts as a sink.",
                    schema: json!({"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 0.1}),
                },
                ParamInfo {
                    name: "layers",
                    kind: "array of integers | null",
                    default: json!(null),
                    range: "each in 0..num_layers; null = 2..N-2",
                    description: "Layers to calibrate.",
                    schema: json!({"type": ["array", "null"], "items": {"type": "integer", "minimum": 0}}),
                },
                ParamInfo {
                    name: "heads",
                    kind: "array of [layer, head] | null",
                    default: json!(null),
                    range: "layers among `layers`, heads in 0..num_heads; null = all heads",
                    description: "The (layer, head) pairs to calibrate.",
                    schema: json!({"type": ["array", "null"], "items": {
                        "type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 2, "maxItems": 2,
                    }}),
                },
                ParamInfo {
                    name: "decode",
                    kind: "boolean",
                    default: json!(false),
                    range: "false: prompt only (classification setting); true: every step",
                    description: "Also calibrate each generated token's attention.",
                    schema: json!({"type": "boolean", "default": false}),
                },
            ],
        },
        MethodInfo {
            name: "recycled_attention",
            applies_to: both(),
            implemented: true,
            description: "Recycled Attention / RefreshKV (Xu, Goyal, Choi; from the paper, no \
                official code): decode steps attend only to the K keys the last full step \
                attended to most (max over each GQA group, max-pooled with kernel 7) plus the \
                tokens generated since; full steps refresh that set every `stride` steps, or \
                (`dynamic`, the default) on every `check_every`-th step for each layer whose \
                pre-RoPE mean query drifted below `similarity` (cosine; pre-RoPE is our choice, \
                the paper does not say). K >= the context gives full attention. Cannot be combined \
                with `act`; with `zerotuning` the first key is never evicted.",
            parameters: vec![
                ParamInfo {
                    name: "k",
                    kind: "integer | null",
                    default: json!(null),
                    range: ">= 1; null = from k_fraction",
                    description: "Keys kept per KV head on partial steps.",
                    schema: json!({"type": ["integer", "null"], "minimum": 1}),
                },
                ParamInfo {
                    name: "k_fraction",
                    kind: "number",
                    default: json!(0.125),
                    range: "(0, 1]",
                    description: "K as a fraction of the prompt length (RefreshKV uses 1/8), at least k_min.",
                    schema: json!({"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 0.125}),
                },
                ParamInfo {
                    name: "k_min",
                    kind: "integer",
                    default: json!(256),
                    range: ">= 0",
                    description: "Lower bound on K when it comes from k_fraction (our suggestion for small models).",
                    schema: json!({"type": "integer", "minimum": 0, "default": 256}),
                },
                ParamInfo {
                    name: "stride",
                    kind: "integer | null",
                    default: json!(null),
                    range: ">= 1; 1 = always full",
                    description: "Fixed schedule: a full step every `stride` steps (paper v1).",
                    schema: json!({"type": ["integer", "null"], "minimum": 1}),
                },
                ParamInfo {
                    name: "dynamic",
                    kind: "{check_every, similarity} | null",
                    default: json!({"check_every": 5, "similarity": 0.85}),
                    range: "check_every >= 1, similarity in [-1, 2]; used when no stride is given",
                    description: "Query-drift schedule (RefreshKV).",
                    schema: json!({"type": ["object", "null"], "additionalProperties": false, "properties": {
                        "check_every": {"type": "integer", "minimum": 1, "default": 5},
                        "similarity": {"type": "number", "minimum": -1, "maximum": 2, "default": 0.85},
                    }}),
                },
            ],
        },
        MethodInfo {
            name: "contrastive_decoding",
            applies_to: both(),
            implemented: true,
            description: "Contrastive decoding; `mode` picks the contrast. `dola` (Chuang et al. \
                2024): the final layer against the premature layer (chosen each step by \
                Jensen-Shannon divergence) of the same pass; score = log p_final - lambda * log \
                p_premature over tokens with p_final >= alpha * max p_final, then the repetition \
                penalty. `prompt`: the same model on a contrasting prompt (`contrast_prompt` \
                replaces the last user message, `contrast_prefix` goes in front of it; e.g. CD's \
                \"I love repetitive text! Here is my writing:\" or LQCD's leading query), run as a \
                branch sequence in the same batch and combined by `rule`: extrapolate \
                (1+beta) u+ - beta u-, or difference u+ - lambda u-, in `space` logits or \
                logprobs. `amateur` (Li et al. 2023; O'Brien & Lewis 2023): another served model \
                with the same tokenizer (`amateur_model`), run as a branch on that model in the \
                same engine step; default rule difference in logprobs space (lambda 1, \
                `amateur_temperature` 1), or extrapolate in logits space (beta 0.5). \
                `image_noise` (VCD, Leng et al. 2024; vision-language models, requests with an \
                image): the same prompt with the images diffusion-noised to `noise_step` of \
                1000, run as a branch in the same batch, extrapolated in logits space (beta 1). \
                Weight 0 with alpha 0 (and, for dola, repetition_penalty 1) gives the base \
                distribution.",
            parameters: vec![
                ParamInfo {
                    name: "mode",
                    kind: "string",
                    default: json!(null),
                    range: "\"dola\" | \"prompt\" | \"amateur\" | \"image_noise\" (required; image_noise needs a VLM)",
                    description: "Which contrast to use.",
                    schema: json!({"enum": ["dola", "prompt", "amateur", "image_noise"]}),
                },
                ParamInfo {
                    name: "layers",
                    kind: "\"low\" | \"high\" | array of integers",
                    default: json!("high"),
                    range: "depths in 0..num_layers (0 = embeddings)",
                    description: "dola: candidate premature layers; \"high\" suits short \
                        factual answers, \"low\" long reasoning (HF's buckets: step 2, split at N/2).",
                    schema: json!({"oneOf": [{"enum": ["low", "high"]}, {"type": "array", "items": {"type": "integer", "minimum": 0}}], "default": "high"}),
                },
                ParamInfo {
                    name: "alpha",
                    kind: "number",
                    default: json!(0.1),
                    range: "[0, 1]; 0 = no plausibility mask",
                    description: "Relative-top plausibility threshold (both modes).",
                    schema: json!({"type": "number", "minimum": 0, "maximum": 1, "default": 0.1}),
                },
                ParamInfo {
                    name: "lambda",
                    kind: "number",
                    default: json!(1.0),
                    range: "[0, 100]; 0 = no contrast; dola, or prompt/amateur with rule difference",
                    description: "Weight of the contrast (premature layer or branch).",
                    schema: json!({"type": "number", "minimum": 0, "maximum": 100, "default": 1.0}),
                },
                ParamInfo {
                    name: "repetition_penalty",
                    kind: "number",
                    default: json!(1.2),
                    range: "(0, 10]; 1 = off",
                    description: "dola: applied to the contrast scores (the official setting).",
                    schema: json!({"type": "number", "exclusiveMinimum": 0, "maximum": 10, "default": 1.2}),
                },
                ParamInfo {
                    name: "premature_final_norm",
                    kind: "boolean",
                    default: json!(false),
                    range: "",
                    description: "dola: apply the final norm before lm_head on premature \
                        layers (both reference implementations do not).",
                    schema: json!({"type": "boolean", "default": false}),
                },
                ParamInfo {
                    name: "contrast_prompt",
                    kind: "string",
                    default: json!(null),
                    range: "prompt: this or contrast_prefix",
                    description: "prompt: the contrast branch's last user message (chat) or \
                        prompt (completions).",
                    schema: json!({"type": "string"}),
                },
                ParamInfo {
                    name: "contrast_prefix",
                    kind: "string",
                    default: json!(null),
                    range: "prompt: this or contrast_prompt",
                    description: "prompt: text put in front of the last user message (chat) or \
                        the prompt (completions) in the contrast branch.",
                    schema: json!({"type": "string"}),
                },
                ParamInfo {
                    name: "rule",
                    kind: "string",
                    default: json!("extrapolate"),
                    range: "\"extrapolate\" | \"difference\"; amateur defaults to difference",
                    description: "prompt, amateur: how the branches combine.",
                    schema: json!({"enum": ["extrapolate", "difference"], "default": "extrapolate"}),
                },
                ParamInfo {
                    name: "beta",
                    kind: "number",
                    default: json!(1.0),
                    range: "[0, 100]; 0 = no contrast; with rule extrapolate (amateur: default 0.5)",
                    description: "prompt, amateur: extrapolation weight.",
                    schema: json!({"type": "number", "minimum": 0, "maximum": 100, "default": 1.0}),
                },
                ParamInfo {
                    name: "space",
                    kind: "string",
                    default: json!(null),
                    range: "\"logits\" | \"logprobs\"; default: logits for extrapolate, logprobs for difference",
                    description: "prompt, amateur: compare raw logits or log-probabilities.",
                    schema: json!({"enum": ["logits", "logprobs"]}),
                },
                ParamInfo {
                    name: "temperature",
                    kind: "number",
                    default: json!(1.0),
                    range: "(0, 100]",
                    description: "prompt: the contrast branch's temperature in logprobs space.",
                    schema: json!({"type": "number", "exclusiveMinimum": 0, "maximum": 100, "default": 1.0}),
                },
                ParamInfo {
                    name: "amateur_model",
                    kind: "string",
                    default: json!(null),
                    range: "amateur (required): a served model id with the same vocabulary",
                    description: "amateur: the model to contrast with, usually a smaller one of \
                        the same family. The request's own model is allowed (a no-op check).",
                    schema: json!({"type": "string"}),
                },
                ParamInfo {
                    name: "amateur_temperature",
                    kind: "number",
                    default: json!(1.0),
                    range: "(0, 100]",
                    description: "amateur: the amateur's temperature in logprobs space (Li et \
                        al. used 0.5 for a GPT-2-small amateur, 1.0 for OPT-125m).",
                    schema: json!({"type": "number", "exclusiveMinimum": 0, "maximum": 100, "default": 1.0}),
                },
                ParamInfo {
                    name: "noise_step",
                    kind: "integer",
                    default: json!(500),
                    range: "0..999",
                    description: "image_noise: diffusion step of the noise (VCD's schedule; 500: \
                        0.863 x + 0.505 eps).",
                    schema: json!({"type": "integer", "minimum": 0, "maximum": 999, "default": 500}),
                },
                ParamInfo {
                    name: "noise_seed",
                    kind: "integer",
                    default: json!(0),
                    range: ">= 0",
                    description: "image_noise: seed of the Gaussian noise.",
                    schema: json!({"type": "integer", "minimum": 0, "default": 0}),
                },
                ParamInfo {
                    name: "ignore_prefix",
                    kind: "boolean",
                    default: json!(false),
                    range: "",
                    description: "amateur: give the amateur only the last prompt token and the \
                        continuation (CD's --ignore_prefix, used by its paper scripts).",
                    schema: json!({"type": "boolean", "default": false}),
                },
            ],
        },
        MethodInfo {
            name: "var",
            applies_to: vec![ModelKind::Vlm],
            implemented: true,
            description: "VAR (Kang et al., ICLR 2025): image tokens whose residual stream is \
                massive in the sink dimensions (phi = max |x[d]| / RMS(x) >= tau, tested on the \
                prompt per request) are visual attention sinks. In rows after the image whose \
                image attention is >= image_mass and whose non-sink share of it is >= rho, \
                transfer_fraction of the attention on every sink (text and visual) moves to the \
                non-sink image tokens in proportion to their attention; rows still sum to 1. No \
                extra pass. Needs an image.",
            parameters: vec![
                ParamInfo {
                    name: "sink_dims",
                    kind: "array of integers | null",
                    default: json!(null),
                    range: "each in 0..hidden_size; null = on record (LLaMA-2-7B {2533, 1415}, \
                        13B {2100, 4743}) or, for other backbones, the 2 dimensions where the \
                        first token's residual entering the first VAR layer is largest",
                    description: "Hidden dimensions carrying the sink activations.",
                    schema: json!({"type": ["array", "null"], "items": {"type": "integer", "minimum": 0}}),
                },
                ParamInfo {
                    name: "tau",
                    kind: "number",
                    default: json!(20.0),
                    range: "> 0; lower = more sinks",
                    description: "Sink threshold on phi.",
                    schema: json!({"type": "number", "exclusiveMinimum": 0, "default": 20.0}),
                },
                ParamInfo {
                    name: "rho",
                    kind: "number",
                    default: json!(0.5),
                    range: "[0, 2]; > 1 = off (0.5 hallucination, 0.8 general, 0.9 vision-centric)",
                    description: "Least non-sink share of a row's image attention for the row to be edited.",
                    schema: json!({"type": "number", "minimum": 0, "maximum": 2, "default": 0.5}),
                },
                ParamInfo {
                    name: "image_mass",
                    kind: "number",
                    default: json!(0.2),
                    range: "[0, 1]",
                    description: "Least attention on the image for a row to be edited.",
                    schema: json!({"type": "number", "minimum": 0, "maximum": 1, "default": 0.2}),
                },
                ParamInfo {
                    name: "transfer_fraction",
                    kind: "number",
                    default: json!(0.6),
                    range: "[0, 1]; 0 = off; 0.6 = paper, 0.4 = released code",
                    description: "Fraction of the sink attention moved to the image.",
                    schema: json!({"type": "number", "minimum": 0, "maximum": 1, "default": 0.6}),
                },
                ParamInfo {
                    name: "layers",
                    kind: "array of integers | null",
                    default: json!(null),
                    range: "each in 0..num_layers; null = 2..N-2",
                    description: "Layers to edit.",
                    schema: json!({"type": ["array", "null"], "items": {"type": "integer", "minimum": 0}}),
                },
            ],
        },
        MethodInfo {
            name: "vhr",
            applies_to: vec![ModelKind::Vlm],
            implemented: true,
            description: "VHR (He et al., ACL 2025): when the sequence starts, the prompt with \
                and without its image spans prefill in lockstep; per chosen layer, heads whose \
                output at the last prompt position moves most without the image (VHD, after \
                dropping heads that explode without it) above the median get their outputs \
                multiplied by alpha for the whole generation. Costs two extra prefills (the \
                image prefill is rerun with the heads fixed; the result equals reinforcing in \
                place). The chosen heads come back in `intervention_report`. Needs an image.",
            parameters: vec![
                ParamInfo {
                    name: "alpha",
                    kind: "number",
                    default: json!(2.0),
                    range: "[0, 100]; 1 = off; the paper finds 2-3 best, 4 degenerates",
                    description: "Gain of the vision-aware heads.",
                    schema: json!({"type": "number", "minimum": 0, "maximum": 100, "default": 2.0}),
                },
                ParamInfo {
                    name: "layers",
                    kind: "array of integers | null",
                    default: json!(null),
                    range: "each in 0..num_layers; null = {1} and the last round(0.44 N) \
                        (LLaVA-1.5: {1, 18..31})",
                    description: "Layers whose heads are selected and reinforced.",
                    schema: json!({"type": ["array", "null"], "items": {"type": "integer", "minimum": 0}}),
                },
            ],
        },
        MethodInfo {
            name: "vista",
            applies_to: vec![ModelKind::Vlm],
            implemented: true,
            description: "VISTA (Li et al., ICML 2025). VSV: two extra prefills (with and \
                without the image) give each layer's direction at the last prompt token; every \
                step, each steered layer's MLP output (`site: mlp`, the released code, with its \
                gain c = 1 + max(0, cos(m, -v))) or post-block residual (`site: residual`, the \
                paper) is turned toward it with its norm kept. SLA: gamma * the mean logits of \
                `sla_layers` (lm_head without the final norm) + (1 - gamma) * the final logits. \
                lambda 0 turns VSV off, gamma 0 turns SLA off. Needs an image.",
            parameters: vec![
                ParamInfo {
                    name: "lambda",
                    kind: "number",
                    default: json!(0.1),
                    range: "[0, 100]; 0 = no VSV (authors: 0.17 CHAIR, 0.01 POPE, 0.1 MMHal)",
                    description: "Steering strength.",
                    schema: json!({"type": "number", "minimum": 0, "maximum": 100, "default": 0.1}),
                },
                ParamInfo {
                    name: "site",
                    kind: "string",
                    default: json!("mlp"),
                    range: "\"mlp\" | \"residual\"",
                    description: "Where VSV steers.",
                    schema: json!({"enum": ["mlp", "residual"], "default": "mlp"}),
                },
                ParamInfo {
                    name: "layers",
                    kind: "array of integers | null",
                    default: json!(null),
                    range: "each in 0..num_layers; null = all",
                    description: "Steered layers.",
                    schema: json!({"type": ["array", "null"], "items": {"type": "integer", "minimum": 0}}),
                },
                ParamInfo {
                    name: "gamma",
                    kind: "number",
                    default: json!(0.3),
                    range: "[0, 1]; 0 = no SLA",
                    description: "SLA mixing weight.",
                    schema: json!({"type": "number", "minimum": 0, "maximum": 1, "default": 0.3}),
                },
                ParamInfo {
                    name: "sla_layers",
                    kind: "array of integers | null",
                    default: json!(null),
                    range: "each in 0..num_layers; null = N-7..N-2 (LLaVA-1.5: 25..30)",
                    description: "Layers whose outputs SLA averages.",
                    schema: json!({"type": ["array", "null"], "items": {"type": "integer", "minimum": 0}}),
                },
            ],
        },
        MethodInfo {
            name: "carve",
            applies_to: vec![ModelKind::Vlm],
            implemented: true,
            description: "CARVE (Ge et al. 2025), a request-level pipeline: a greedy question \
                run and a greedy general-description run (each up to max_steps, recording the \
                last query's head-mean attention to the image in `layers`), their step-weighted \
                ratio upsampled to the image, its top `top_fraction` pixels grouped into \
                4-connected regions of which the best max(min_regions, floor(n p)) are kept; the \
                image is masked to them, cropped and enlarged (Lanczos), and the answer is \
                generated with the original and refined images (`final_images: both`, the \
                released code) or the refined one (`refined`, the paper). The suffix is added \
                to the question in all runs. Regions and crop come back in \
                `intervention_report`. One image per request; not combinable.",
            parameters: vec![
                ParamInfo {
                    name: "general_prompt",
                    kind: "string",
                    default: json!(GENERAL_PROMPT),
                    range: "",
                    description: "The general run's instruction.",
                    schema: json!({"type": "string", "default": GENERAL_PROMPT}),
                },
                ParamInfo {
                    name: "suffix",
                    kind: "string",
                    default: json!(SUFFIX),
                    range: "\"\" = none",
                    description: "Appended to the question and the general instruction.",
                    schema: json!({"type": "string", "default": SUFFIX}),
                },
                ParamInfo {
                    name: "layers",
                    kind: "array of integers | null",
                    default: json!(null),
                    range: "each in 0..num_layers; null = round(0.62 N)..=floor(0.8 N) (LLaVA-1.5: 20..25)",
                    description: "Layers whose attention is recorded.",
                    schema: json!({"type": ["array", "null"], "items": {"type": "integer", "minimum": 0}}),
                },
                ParamInfo {
                    name: "lambda",
                    kind: "number",
                    default: json!(1e-8),
                    range: "[0, 1e6]",
                    description: "Added to the general attention before dividing.",
                    schema: json!({"type": "number", "minimum": 0, "default": 1e-8}),
                },
                ParamInfo {
                    name: "top_fraction",
                    kind: "number",
                    default: json!(0.2),
                    range: "(0, 1]; 1 = no masking (the refined image is the original)",
                    description: "Fraction of pixels kept before grouping into regions.",
                    schema: json!({"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 0.2}),
                },
                ParamInfo {
                    name: "min_regions",
                    kind: "integer",
                    default: json!(3),
                    range: ">= 0",
                    description: "Least number of regions kept (the code's \"at least\").",
                    schema: json!({"type": "integer", "minimum": 0, "default": 3}),
                },
                ParamInfo {
                    name: "max_steps",
                    kind: "integer",
                    default: json!(32),
                    range: "1..1024",
                    description: "Most tokens of the question and general runs.",
                    schema: json!({"type": "integer", "minimum": 1, "maximum": 1024, "default": 32}),
                },
                ParamInfo {
                    name: "final_images",
                    kind: "string",
                    default: json!("both"),
                    range: "\"both\" | \"refined\"",
                    description: "Images of the answering run.",
                    schema: json!({"enum": ["both", "refined"], "default": "both"}),
                },
            ],
        },
    ]
}
