//! Training-free, per-request interventions. Each method lives in its own module: typed,
//! validated parameters, and the hooks it installs in the decoder for one sequence.
//!
//! The server parses the request's `interventions` list with [`parse_all`], installs each
//! method on each sequence ([`Intervention::install_for`]: decoder hooks, a logits processor,
//! contrast branches), and lists [`catalogue`] at `/v1/interventions`.
//!
//! Composition: whatever the order in the request, score hooks (ZeroTuning's bias) run before
//! the softmax and probability hooks (ACT) after it, as the spec orders them.

pub mod act;
mod capture;
pub mod carve;
mod catalogue;
pub mod contrastive;
mod params;
mod prompt_view;
pub mod recycled;
pub mod var;
pub mod vhr;
pub mod vista;
pub mod zerotuning;

pub use catalogue::{catalogue, MethodInfo, ModelKind, ParamInfo};
pub use contrastive::ImageNoise;
pub use params::InterventionError;
pub use prompt_view::{PromptView, VisionRequest};

use attune_models::{Decoder, DecoderConfig, SequenceHooks};
use candle_core::Tensor;
use serde_json::Value;
use std::ops::RangeInclusive;

/// What an intervention needs to know about the model it runs on.
#[derive(Debug, Clone, Copy)]
pub struct ModelShape {
    pub num_layers: usize,
    pub hidden_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub tied_embeddings: bool,
    pub kind: ModelKind,
}

impl ModelShape {
    /// The shape of a decoder of `cfg` serving as a model of `kind`.
    pub fn of(cfg: &DecoderConfig, kind: ModelKind) -> Self {
        Self {
            num_layers: cfg.num_layers,
            hidden_size: cfg.hidden_size,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            tied_embeddings: cfg.tie_word_embeddings,
            kind,
        }
    }
}

/// A method with validated, fully resolved parameters, ready to install on sequences.
pub trait Intervention: Send + Sync {
    /// The request name (`"zerotuning"`, ...).
    fn name(&self) -> &'static str;
    /// The parameters with every default filled in, echoed back in responses.
    fn resolved(&self) -> Value;
    /// Fresh per-sequence state: decoder hooks and/or a logits processor.
    fn install(&self) -> Installed;
    /// Extra sequences this method runs beside each choice, in the same engine step; their
    /// last-position logits reach its processor every step.
    fn branches(&self) -> Vec<Branch> {
        Vec::new()
    }
    /// Other served models this method reads (by id); the server checks that each exists and
    /// shares the request model's tokenizer.
    fn other_models(&self) -> Vec<String> {
        Vec::new()
    }
    /// Fresh per-sequence state for a sequence with this `prompt`. Methods that pick their
    /// parameters per prompt (ZeroTuning's `auto`) run their extra passes on `decoder` here.
    fn install_for(
        &self,
        _decoder: &Decoder,
        _prompt: &PromptView,
    ) -> candle_core::Result<Installed> {
        Ok(self.install())
    }
    /// How many images the request may have: VLM methods need at least one (a request without
    /// is refused rather than silently left unchanged), CARVE exactly one.
    fn images(&self) -> RangeInclusive<usize> {
        0..=usize::MAX
    }
    /// Other renderings of the request's prompt the method runs itself (CARVE's question,
    /// general and final prompts); the server renders them into [`VisionRequest::variants`].
    fn prompt_variants(&self) -> Vec<PromptVariant> {
        Vec::new()
    }
}

/// A rendering of the request's chat prompt: its text changed like a branch's, and each image
/// optionally shown twice (the second slot is filled by the method).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptVariant {
    pub prompt: BranchPrompt,
    pub repeat_images: bool,
}

/// A contrast branch: a sequence that starts from its own prompt and then receives every token
/// the main sequence generates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Branch {
    pub prompt: BranchPrompt,
    /// The id of another served model to run it on; `None`: the request's model.
    pub model: Option<String>,
    /// Noise put on the prompt's images (VCD); `None`: the images as they are.
    pub image_noise: Option<ImageNoise>,
}

/// How a branch's prompt derives from the request's. The server renders it (chat template,
/// tokenizer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BranchPrompt {
    /// The request's own prompt.
    Same,
    /// Only the last token of the request's prompt (CD's `ignore_prefix`).
    LastToken,
    /// The last user message (chat) or the prompt (completions) replaced by this text.
    Replace(String),
    /// This text put in front of the last user message (chat) or of the prompt (completions).
    Prefix(String),
    /// This text put after the last user message (chat) or the prompt (completions).
    Suffix(String),
}

/// What an intervention puts on one sequence.
#[derive(Default)]
pub struct Installed {
    pub hooks: Option<Box<dyn SequenceHooks>>,
    pub processor: Option<Box<dyn LogitsProcessor>>,
    /// What the method chose for this sequence (ZeroTuning `auto`'s gamma), reported with the
    /// choice.
    pub report: Option<Value>,
    /// A prompt to generate from instead of the request's (CARVE's final run).
    pub prompt: Option<PromptOverride>,
}

/// A replacement prompt: its tokens and input embeddings (images merged in).
pub struct PromptOverride {
    pub tokens: Vec<u32>,
    pub embeddings: Tensor,
}

impl Installed {
    pub fn hooks(hooks: impl SequenceHooks + 'static) -> Self {
        Self {
            hooks: Some(Box::new(hooks)),
            ..Self::default()
        }
    }

    pub fn processor(processor: impl LogitsProcessor + 'static) -> Self {
        Self {
            processor: Some(Box::new(processor)),
            ..Self::default()
        }
    }
}

/// Rewrites a step's last-position logits before sampling (contrastive decoding wraps the
/// sampler this way). Runs after the decoder step, so it can read what the sequence's hooks
/// captured during it.
pub trait LogitsProcessor: Send {
    /// `branches` holds the logits of this method's branches (see [`Intervention::branches`]),
    /// in order; `context` is every token so far (prompt and generated).
    fn process(
        &mut self,
        logits: Vec<f32>,
        branches: &[Vec<f32>],
        decoder: &Decoder,
        context: &[u32],
    ) -> candle_core::Result<Vec<f32>>;
}

/// All method names the API accepts.
pub const METHOD_NAMES: &[&str] = &[
    "var",
    "vhr",
    "carve",
    "zerotuning",
    "act",
    "vista",
    "recycled_attention",
    "contrastive_decoding",
];

/// Parses one `{"type": NAME, ...params}` object on its own.
pub fn parse(spec: &Value, shape: &ModelShape) -> Result<Box<dyn Intervention>, InterventionError> {
    parse_with(spec, shape, &[])
}

/// Parses one intervention knowing the method names of the whole request (`others`), for the
/// spec's composition rules.
fn parse_with(
    spec: &Value,
    shape: &ModelShape,
    others: &[&str],
) -> Result<Box<dyn Intervention>, InterventionError> {
    let object = spec.as_object().ok_or_else(|| {
        InterventionError::new("", "must be an object like {\"type\": \"zerotuning\", ...}")
    })?;
    let name = object
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| InterventionError::new("type", "is required and must be a string"))?;
    let mut params = object.clone();
    params.remove("type");
    let params = Value::Object(params);
    let vlm_only = ["var", "vhr", "carve", "vista"];
    if vlm_only.contains(&name) && shape.kind != ModelKind::Vlm {
        return Err(InterventionError::new(
            "type",
            format!("`{name}` works on images and needs a vision-language model; this model is text-only"),
        ));
    }
    match name {
        "var" => {
            if others.contains(&"recycled_attention") {
                return Err(InterventionError::new(
                    "type",
                    "`var` cannot be combined with `recycled_attention`: VAR edits rows over \
                     the whole image, which a partial cache does not hold",
                ));
            }
            Ok(Box::new(var::Var::from_request(params, shape)?))
        }
        "carve" => {
            if others.len() > 1 {
                return Err(InterventionError::new(
                    "type",
                    "`carve` cannot be combined with other interventions: it replaces the \
                     prompt they would act on",
                ));
            }
            Ok(Box::new(carve::Carve::from_request(params, shape)?))
        }
        "vhr" => Ok(Box::new(vhr::Vhr::from_request(params, shape)?)),
        "vista" => Ok(Box::new(vista::Vista::from_request(params, shape)?)),
        "zerotuning" => Ok(Box::new(zerotuning::ZeroTuning::from_request(
            params, shape,
        )?)),
        "act" => Ok(Box::new(act::Act::from_request(params, shape)?)),
        "contrastive_decoding" => contrastive::from_request(params, shape),
        "recycled_attention" => {
            if others.contains(&"act") {
                return Err(InterventionError::new(
                    "type",
                    "`recycled_attention` cannot be combined with `act`: ACT's column \
                     statistics are undefined on a partial cache",
                ));
            }
            // ZeroTuning's bias needs the first key present on partial steps.
            let keep_first = others.contains(&"zerotuning");
            Ok(Box::new(recycled::RecycledAttention::from_request(
                params, shape, keep_first,
            )?))
        }
        other => Err(InterventionError::new(
            "type",
            format!(
                "unknown intervention `{other}`; known: {}",
                METHOD_NAMES.join(", ")
            ),
        )),
    }
}

/// Parses a request's whole `interventions` list; errors name the list index.
pub fn parse_all(
    specs: &[Value],
    shape: &ModelShape,
) -> Result<Vec<Box<dyn Intervention>>, InterventionError> {
    let names: Vec<&str> = specs
        .iter()
        .filter_map(|s| s.get("type")?.as_str())
        .collect();
    let parsed = specs
        .iter()
        .enumerate()
        .map(|(i, spec)| parse_with(spec, shape, &names).map_err(|e| e.at_index(i)))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, a) in parsed.iter().enumerate() {
        if parsed[..i].iter().any(|b| b.name() == a.name()) {
            return Err(
                InterventionError::new("type", format!("`{}` is given twice", a.name()))
                    .at_index(i),
            );
        }
    }
    Ok(parsed)
}
