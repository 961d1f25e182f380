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
            ],
        },
        planned(
            "act",
            both(),
            "ACT: attention calibration of hidden sinks (planned).",
        ),
        planned(
            "recycled_attention",
            both(),
            "Recycled Attention / RefreshKV: top-K KV reuse for long contexts (planned).",
        ),
        planned(
            "contrastive_decoding",
            both(),
            "Contrastive decoding: DoLa, amateur model, contrast prompt, VCD (planned).",
        ),
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
