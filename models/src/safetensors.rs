//! Hugging Face model directories: `config.json` plus safetensors weights, sharded or not.

use crate::arch::DecoderConfig;
use crate::decoder::Decoder;
use crate::embedding::Embedding;
use crate::linear::Linear;
use crate::rope::Rope;
use crate::weights::{build_decoder, WeightName, WeightSource};
use anyhow::{bail, Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Loads the decoder of an HF directory; weights are converted to f32.
pub fn load_decoder(dir: &Path, device: &Device) -> Result<Decoder> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    let cfg = DecoderConfig::from_hf_json(&text)
        .with_context(|| format!("in {}", config_path.display()))?;
    decoder_from(cfg, &open(dir)?, "", device)
}

/// Memory-maps every weight file of an HF directory.
pub(crate) fn open(dir: &Path) -> Result<MmapedSafetensors> {
    let files = weight_files(dir)?;
    // SAFETY: the files are memory-mapped read-only; like every mmap-based loader we rely on
    // them not being modified while the model is loading.
    Ok(unsafe { MmapedSafetensors::multi(&files)? })
}

/// A decoder whose tensors carry `prefix` before their usual HF names (a VLM's language
/// model: `language_model.` in llava-hf checkpoints).
pub(crate) fn decoder_from(
    cfg: DecoderConfig,
    st: &MmapedSafetensors,
    prefix: &str,
    device: &Device,
) -> Result<Decoder> {
    let rope = Rope::new(&cfg, None);
    build_decoder(
        cfg,
        rope,
        &mut SafetensorsSource {
            st,
            prefix,
            device: device.clone(),
        },
    )
}

/// A dense f32 tensor of a checkpoint.
pub(crate) fn tensor(st: &MmapedSafetensors, name: &str, device: &Device) -> Result<Tensor> {
    let t = st
        .load(name, device)
        .with_context(|| format!("safetensors tensor `{name}`"))?;
    Ok(t.to_dtype(DType::F32)?)
}

/// The safetensors files of a checkpoint: from its shard index, or every `*.safetensors`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index)?;
        let json: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("invalid {}", index.display()))?;
        let map = json["weight_map"]
            .as_object()
            .with_context(|| format!("{} has no weight_map", index.display()))?;
        let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        return Ok(shards.into_iter().map(|s| dir.join(s)).collect());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no .safetensors files in {}", dir.display());
    }
    Ok(files)
}

struct SafetensorsSource<'a> {
    st: &'a MmapedSafetensors,
    prefix: &'a str,
    device: Device,
}

impl WeightSource for SafetensorsSource<'_> {
    fn vector(&mut self, name: &str) -> Result<Tensor> {
        tensor(self.st, name, &self.device)
    }

    fn embedding(&mut self) -> Result<Embedding> {
        Ok(Embedding::Dense(
            self.vector(&self.name(WeightName::Embedding))?,
        ))
    }

    fn linear(&mut self, name: WeightName, bias: Option<String>) -> Result<Linear> {
        let weight = self.vector(&self.name(name))?;
        let bias = bias.map(|b| self.vector(&b)).transpose()?;
        Ok(Linear::dense(weight, bias))
    }

    fn tied_lm_head(&mut self) -> Result<Linear> {
        Ok(Linear::dense(
            self.vector(&self.name(WeightName::Embedding))?,
            None,
        ))
    }

    fn name(&self, name: WeightName) -> String {
        format!("{}{}", self.prefix, name.hf())
    }
}
