//! GGUF files: decoder weights as quantized matmuls, plus the metadata the tokenizer and chat
//! template are built from.

use crate::arch::DecoderConfig;
use crate::decoder::Decoder;
use crate::embedding::Embedding;
use crate::linear::{Linear, Weight};
use crate::quant::{QuantMatMul, QuantMatrix};
use crate::rope::Rope;
use crate::weights::{build_decoder, WeightName, WeightSource};
use anyhow::{Context, Result};
use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{DType, Device, Tensor};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// An open GGUF file with its parsed header.
pub struct GgufFile {
    pub path: PathBuf,
    pub content: gguf_file::Content,
    file: File,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path)
            .with_context(|| format!("cannot open GGUF file {}", path.display()))?;
        let content = gguf_file::Content::read(&mut file)
            .with_context(|| format!("{} is not a valid GGUF file", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            file,
        })
    }

    pub fn tensor(&mut self, name: &str, device: &Device) -> Result<QTensor> {
        self.content
            .tensor(&mut self.file, name, device)
            .with_context(|| format!("GGUF tensor `{name}`"))
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    pub fn metadata(&self, key: &str) -> Option<&gguf_file::Value> {
        self.content.metadata.get(key)
    }

    pub fn metadata_str(&self, key: &str) -> Option<&str> {
        self.metadata(key)
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
    }

    /// Builds the decoder; quantized weights stay quantized.
    pub fn load_decoder(&mut self, device: &Device) -> Result<Decoder> {
        let cfg = DecoderConfig::from_gguf(&self.content)?;
        let divisors = if self.has_tensor("rope_freqs.weight") {
            let t = self
                .tensor("rope_freqs.weight", device)?
                .dequantize(device)?;
            Some(t.to_dtype(DType::F32)?.to_vec1::<f32>()?)
        } else {
            None
        };
        let rope = Rope::new(&cfg, divisors);
        build_decoder(
            cfg,
            rope,
            &mut GgufSource {
                gguf: self,
                device: device.clone(),
                quantized_embedding: None,
            },
        )
    }
}

struct GgufSource<'a> {
    gguf: &'a mut GgufFile,
    device: Device,
    /// The embedding table in our kernels' format, shared by a tied lm_head.
    quantized_embedding: Option<Arc<QuantMatrix>>,
}

impl WeightSource for GgufSource<'_> {
    fn vector(&mut self, name: &str) -> Result<Tensor> {
        let t = self.gguf.tensor(name, &self.device)?;
        Ok(t.dequantize(&self.device)?.to_dtype(DType::F32)?)
    }

    fn embedding(&mut self) -> Result<Embedding> {
        let name = WeightName::Embedding.gguf();
        if self.device.is_cpu() {
            if let Some(table) = QuantMatrix::from_qtensor(&self.gguf.tensor(&name, &self.device)?)?
            {
                let table = Arc::new(table);
                self.quantized_embedding = Some(table.clone());
                return Ok(Embedding::Quant(table));
            }
        }
        Ok(Embedding::Dense(self.vector(&name)?))
    }

    fn linear(&mut self, name: WeightName, bias: Option<String>) -> Result<Linear> {
        let weight = self.gguf.tensor(&name.gguf(), &self.device)?;
        let bias = bias.map(|b| self.vector(&b)).transpose()?;
        Ok(Linear::quantized(weight, bias)?)
    }

    fn tied_lm_head(&mut self) -> Result<Linear> {
        match &self.quantized_embedding {
            Some(table) => Ok(Linear::new(Weight::Quant(QuantMatMul(table.clone())), None)),
            None => self.linear(WeightName::Embedding, None),
        }
    }

    fn name(&self, name: WeightName) -> String {
        name.gguf()
    }
}
