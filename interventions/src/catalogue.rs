//! The catalogue served at `/v1/interventions`: every method, the models it applies to, and
//! its parameters with types, defaults and ranges.

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
    let planned = |name, applies_to, description| MethodInfo {
        name,
        applies_to,
        implemented: false,
        description,
        parameters: Vec::new(),
    };
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
                `image_noise` (VCD) needs a vision-language model. Weight 0 with alpha 0 (and, \
                for dola, repetition_penalty 1) gives the base distribution.",
            parameters: vec![
                ParamInfo {
                    name: "mode",
                    kind: "string",
                    default: json!(null),
                    range: "\"dola\" | \"prompt\" | \"amateur\" (required; \"image_noise\" needs a VLM)",
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
        planned(
            "var",
            vec![ModelKind::Vlm],
            "VAR: visual attention sink redistribution (planned).",
        ),
        planned(
            "vhr",
            vec![ModelKind::Vlm],
            "VHR: vision-aware head reinforcement (planned).",
        ),
        planned(
            "carve",
            vec![ModelKind::Vlm],
            "CARVE: contrastive attention refinement (planned).",
        ),
        planned(
            "vista",
            vec![ModelKind::Vlm],
            "VISTA: visual steering vector and early-layer logit augmentation (planned).",
        ),
    ]
}
