//! Our Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) with explicit attention and
//! hook points, running a batch of sequences of different lengths in one pass.
//!
//! Batching is packed, not padded: the rows of every sequence in the step are stacked into
//! one (total_rows, hidden) matrix, so each projection and MLP weight is read once per step for
//! the whole batch; attention runs per sequence against that sequence's own KV cache, so no
//! padding masks are needed and each sequence's hooks see only its own rows.

use crate::arch::DecoderConfig;
use crate::cpu_attention::{self, KvValues, QueryRow};
use crate::embedding::Embedding;
use crate::hooks::{
    AttentionRows, AttentionSite, HeadRowRewrite, HookPoint, RowSite, SequenceHooks,
};
use crate::kv_cache::KvCache;
use crate::linear::{Linear, Weight};
use crate::rope::{Rope, RopeTables};
use candle_core::{CpuStorage, DType, Device, Layout, Result, Storage, Tensor};
use std::sync::Mutex;

#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub attn_norm: Tensor,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub ffn_norm: Tensor,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
    /// q, k and v as one matmul, when their kernels allow (see [`Linear::fuse`]).
    pub(crate) qkv: Option<Linear>,
    /// gate and up as one matmul, likewise.
    pub(crate) gate_up: Option<Linear>,
}

impl LayerWeights {
    /// Fuses the projections that share an input, where the weights allow it.
    pub(crate) fn fuse_projections(&mut self) -> Result<()> {
        self.qkv = Linear::fuse(&mut [&mut self.q, &mut self.k, &mut self.v])?;
        self.gate_up = Linear::fuse(&mut [&mut self.gate, &mut self.up])?;
        Ok(())
    }

    /// (q, k, v) projections of `x`, (rows, _) each.
    fn qkv(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let Some(qkv) = &self.qkv else {
            return Ok((self.q.forward(x)?, self.k.forward(x)?, self.v.forward(x)?));
        };
        let all = qkv.forward(x)?;
        let (q_dim, kv_dim) = (self.q.out_features(), self.k.out_features());
        Ok((
            all.narrow(1, 0, q_dim)?,
            all.narrow(1, q_dim, kv_dim)?,
            all.narrow(1, q_dim + kv_dim, kv_dim)?,
        ))
    }

    /// silu(gate(x)) * up(x).
    fn gated(&self, x: &Tensor) -> Result<Tensor> {
        match &self.gate_up {
            Some(gate_up) => crate::swiglu::swiglu(&gate_up.forward(x)?),
            None => candle_nn::ops::silu(&self.gate.forward(x)?)? * self.up.forward(x)?,
        }
    }
}

/// The weights and hyperparameters of one decoder.
#[derive(Debug, Clone)]
pub struct Decoder {
    cfg: DecoderConfig,
    rope: Rope,
    embed: Embedding,
    layers: Vec<LayerWeights>,
    final_norm: Tensor,
    lm_head: Linear,
    device: Device,
}

/// What one sequence feeds into a step.
#[derive(Debug, Clone)]
pub enum DecoderInput {
    Tokens(Vec<u32>),
    /// Precomputed input embeddings, (len, hidden): e.g. text merged with image features.
    Embeddings(Tensor),
}

impl DecoderInput {
    pub fn len(&self) -> Result<usize> {
        match self {
            Self::Tokens(t) => Ok(t.len()),
            Self::Embeddings(e) => e.dim(0),
        }
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }
}

/// Which positions of a step need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    None,
    Last,
    All,
}

/// One sequence's part in a batched step.
pub struct SequenceStep<'a> {
    pub input: DecoderInput,
    pub cache: &'a mut KvCache,
    pub hooks: Option<&'a mut dyn SequenceHooks>,
    pub logits: LogitsFor,
}

impl<'a> SequenceStep<'a> {
    pub fn new(input: DecoderInput, cache: &'a mut KvCache) -> Self {
        Self {
            input,
            cache,
            hooks: None,
            logits: LogitsFor::Last,
        }
    }

    pub fn with_hooks(mut self, hooks: &'a mut dyn SequenceHooks) -> Self {
        self.hooks = Some(hooks);
        self
    }

    pub fn with_logits(mut self, logits: LogitsFor) -> Self {
        self.logits = logits;
        self
    }

    fn hooks_for(&mut self, point: HookPoint, layer: usize) -> Option<&mut dyn SequenceHooks> {
        match self.hooks.as_deref_mut() {
            Some(h) if h.wants(point, layer) => Some(h),
            _ => None,
        }
    }
}

/// Longest context whose prefill attention runs row by row on the CPU kernels; past it the
/// tensor path's matrix products are faster.
const DIRECT_PREFILL_KEYS: usize = 1024;

/// Rows of one sequence inside the packed step.
struct Span {
    row: usize,
    len: usize,
    /// Absolute position of the first row.
    start: usize,
    rope: RopeTables,
}

impl Span {
    /// The attention call of this sequence in `layer`, over all its keys.
    fn site(&self, layer: usize) -> AttentionSite<'static> {
        AttentionSite {
            layer,
            query_start: self.start,
            query_len: self.len,
            key_len: self.start + self.len,
            selected_keys: None,
        }
    }
}

impl Decoder {
    pub fn new(
        cfg: DecoderConfig,
        rope: Rope,
        embed: Embedding,
        layers: Vec<LayerWeights>,
        final_norm: Tensor,
        lm_head: Linear,
    ) -> Self {
        let device = final_norm.device().clone();
        Self {
            cfg,
            rope,
            embed,
            layers,
            final_norm,
            lm_head,
            device,
        }
    }

    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.final_norm.dtype()
    }

    pub fn layers(&self) -> &[LayerWeights] {
        &self.layers
    }

    /// The whole embedding table (vocab, hidden), dequantized if it is stored quantized.
    pub fn embedding_table(&self) -> Result<Tensor> {
        self.embed.table(&self.device)
    }

    pub fn final_norm(&self) -> &Tensor {
        &self.final_norm
    }

    pub fn lm_head(&self) -> &Linear {
        &self.lm_head
    }

    /// A fresh, empty KV cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(&self.cfg, self.kv_storage(), &self.device)
    }

    /// What the KV cache stores: f16 for a model on our quantized CPU kernels (its int8
    /// activations already round far more than f16 does; batched decode reads half the
    /// bytes), the model's dtype otherwise (f32 models keep exact parity).
    pub fn kv_storage(&self) -> DType {
        let quantized = self
            .layers
            .first()
            .is_some_and(|l| matches!(l.k.weight(), Weight::Quant(_)));
        if self.device.is_cpu() && self.dtype() == DType::F32 && quantized {
            DType::F16
        } else {
            self.dtype()
        }
    }

    /// Token embeddings, (len, hidden).
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        self.embed.lookup(tokens, &self.device)
    }

    /// Logits from any hidden state (rows, hidden): the residual stream of an intermediate
    /// layer (DoLa reads it without the final norm) or the last layer's output (with it).
    pub fn logits_from_hidden(&self, hidden: &Tensor, final_norm: bool) -> Result<Tensor> {
        if final_norm {
            self.lm_head
                .forward(&self.rms_norm(hidden, &self.final_norm)?)
        } else {
            self.lm_head.forward(hidden)
        }
    }

    /// One sequence, one step: returns the last position's logits, (vocab,).
    pub fn forward_one(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        hooks: Option<&mut (dyn SequenceHooks + '_)>,
    ) -> Result<Tensor> {
        let mut step = SequenceStep::new(DecoderInput::Tokens(tokens.to_vec()), cache);
        step.hooks = hooks.map(|h| h as &mut dyn SequenceHooks);
        let mut out = self.forward(std::slice::from_mut(&mut step))?;
        out.pop()
            .flatten()
            .ok_or_else(|| candle_core::Error::msg("no logits"))?
            .squeeze(0)
    }

    /// Runs one step for every sequence in `batch` and appends its keys and values to its
    /// cache. Returns, per sequence, logits (rows, vocab) for the positions it asked for.
    pub fn forward(&self, batch: &mut [SequenceStep<'_>]) -> Result<Vec<Option<Tensor>>> {
        let (mut hidden, spans) = self.embed_batch(batch)?;
        hidden = self.row_hooks(hidden, &spans, batch, HookPoint::Residual, 0)?;
        for (index, layer) in self.layers.iter().enumerate() {
            hidden = self.layer_forward(index, layer, hidden, &spans, batch)?;
        }
        for (step, span) in batch.iter_mut().zip(&spans) {
            step.cache.advance(span.len);
        }
        self.batch_logits(&hidden, &spans, batch)
    }

    fn embed_batch(&self, batch: &[SequenceStep<'_>]) -> Result<(Tensor, Vec<Span>)> {
        let mut spans = Vec::with_capacity(batch.len());
        let mut row = 0;
        for step in batch {
            let len = step.input.len()?;
            if len == 0 {
                candle_core::bail!("a sequence in the batch has no input");
            }
            let start = step.cache.len();
            let rope = self.rope.tables(start, len, &self.device)?;
            spans.push(Span {
                row,
                len,
                start,
                rope,
            });
            row += len;
        }
        let all_tokens: Option<Vec<u32>> = batch
            .iter()
            .map(|s| match &s.input {
                DecoderInput::Tokens(t) => Some(t.clone()),
                DecoderInput::Embeddings(_) => None,
            })
            .collect::<Option<Vec<_>>>()
            .map(|parts| parts.concat());
        let hidden = match all_tokens {
            Some(tokens) => self.embed(&tokens)?,
            None => {
                let parts = batch
                    .iter()
                    .map(|s| match &s.input {
                        DecoderInput::Tokens(t) => self.embed(t),
                        DecoderInput::Embeddings(e) => e.to_dtype(self.dtype()),
                    })
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&parts, 0)?
            }
        };
        Ok((hidden, spans))
    }

    fn layer_forward(
        &self,
        index: usize,
        layer: &LayerWeights,
        hidden: Tensor,
        spans: &[Span],
        batch: &mut [SequenceStep<'_>],
    ) -> Result<Tensor> {
        let x = self.rms_norm(&hidden, &layer.attn_norm)?;
        let (q, k, v) = layer.qkv(&x)?;
        let direct: Vec<bool> = batch
            .iter_mut()
            .zip(spans)
            .map(|(step, span)| self.attends_directly(step, span, index))
            .collect();
        let (heads, head_dim) = (self.cfg.num_heads, self.cfg.head_dim);
        let width = heads * head_dim;
        let mut attn = if direct.iter().any(|&d| d) {
            self.direct_attention(index, (&q, &k, &v), spans, batch, &direct)?
        } else {
            Vec::new()
        };
        let mut outputs = Vec::with_capacity(batch.len());
        for ((step, span), _) in batch
            .iter_mut()
            .zip(spans)
            .zip(&direct)
            .filter(|(_, &d)| !d)
        {
            let rows = |t: &Tensor, heads: usize| -> Result<Tensor> {
                t.narrow(0, span.row, span.len)?
                    .reshape((span.len, heads, self.cfg.head_dim))?
                    .transpose(0, 1)?
                    .contiguous()
            };
            let q = rows(&q, self.cfg.num_heads)?;
            let site = span.site(index);
            if let Some(hooks) = step.hooks_for(HookPoint::Queries, index) {
                hooks.queries(&site, &q)?;
            }
            let q = self.rope.apply(&q, &span.rope)?;
            let k = self
                .rope
                .apply(&rows(&k, self.cfg.num_kv_heads)?, &span.rope)?;
            let v = rows(&v, self.cfg.num_kv_heads)?;
            let (k_all, v_all) = step.cache.append(index, &k, &v)?;
            let out = self.attention(index, span.start, &q, &k_all, &v_all, step)?;
            if let Some(hooks) = step.hooks_for(HookPoint::HeadOutputs, index) {
                hooks.observe_head_outputs(&site, &out)?;
            }
            outputs.push((span, out));
        }
        // Rewrites only after every sequence's outputs were observed.
        for ((step, _), (span, out)) in batch
            .iter_mut()
            .zip(&direct)
            .filter(|(_, &d)| !d)
            .zip(outputs.iter_mut())
        {
            if let Some(hooks) = step.hooks_for(HookPoint::HeadOutputs, index) {
                *out = hooks.head_outputs(&span.site(index), out.clone())?;
            }
        }
        let mut rows = outputs
            .iter()
            .map(|(_, o)| o.transpose(0, 1)?.reshape((o.dim(1)?, width)))
            .collect::<Result<Vec<_>>>()?;
        let attn = if attn.is_empty() {
            if rows.len() == 1 {
                rows.pop().expect("one output")
            } else {
                Tensor::cat(&rows, 0)?
            }
        } else {
            // Sequences that took the tensor path fill their rows of the direct path's output.
            for ((span, _), rows) in outputs.iter().zip(rows) {
                let values = rows.flatten_all()?.to_vec1::<f32>()?;
                attn[span.row * width..(span.row + span.len) * width].copy_from_slice(&values);
            }
            Tensor::from_vec(attn, (hidden.dim(0)?, width), &self.device)?
        };
        let hidden = layer.o.forward_add(&attn, &hidden)?;
        let x = self.rms_norm(&hidden, &layer.ffn_norm)?;
        let gated = layer.gated(&x)?;
        let hidden = if wants_row_hooks(batch, HookPoint::MlpOutput, index) {
            let mlp = layer.down.forward(&gated)?;
            (hidden + self.row_hooks(mlp, spans, batch, HookPoint::MlpOutput, index)?)?
        } else {
            layer.down.forward_add(&gated, &hidden)?
        };
        self.row_hooks(hidden, spans, batch, HookPoint::Residual, index + 1)
    }

    /// Whether attention of `q_len` query rows over `key_len` keys runs on the CPU kernels of
    /// [`crate::cpu_attention`] (an f32 model on the CPU, a decode row or a short context)
    /// rather than as tensor products.
    fn attends_on_host(&self, q_len: usize, key_len: usize) -> bool {
        self.device.is_cpu()
            && self.dtype() == DType::F32
            && (q_len == 1 || key_len <= DIRECT_PREFILL_KEYS)
    }

    /// Whether this sequence's attention in `layer` takes [`Self::direct_attention`]: an f32
    /// model on the CPU, a context short enough for the row-by-row kernels (every decode row
    /// qualifies), and no hook on queries, key selection or head outputs (hooks on scores and
    /// probabilities are served there).
    fn attends_directly(&self, step: &mut SequenceStep<'_>, span: &Span, layer: usize) -> bool {
        const TENSOR_PATH_POINTS: [HookPoint; 3] = [
            HookPoint::Queries,
            HookPoint::KeySelection,
            HookPoint::HeadOutputs,
        ];
        self.attends_on_host(span.len, span.start + span.len)
            && TENSOR_PATH_POINTS
                .iter()
                .all(|&point| step.hooks_for(point, layer).is_none())
    }

    /// Attention of the `direct` sequences' rows on host memory: RoPE in place, keys and values
    /// written straight into each cache, and every head of every row of every such sequence
    /// without hooks in one pass over the CPU workers (see [`cpu_attention::attend_all`]);
    /// sequences with hooks on scores or probabilities go through
    /// [`Self::hooked_attention_rows`]. The arithmetic of [`Self::attention_cpu`], so results
    /// are the same either way. Returns the packed attention output (rows, heads × head_dim)
    /// with the direct sequences' rows filled.
    fn direct_attention(
        &self,
        layer: usize,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        spans: &[Span],
        batch: &mut [SequenceStep<'_>],
        direct: &[bool],
    ) -> Result<Vec<f32>> {
        let (heads, head_dim) = (self.cfg.num_heads, self.cfg.head_dim);
        let (q_width, kv_width) = (heads * head_dim, self.cfg.num_kv_heads * head_dim);
        let chosen: Vec<usize> = (0..batch.len()).filter(|&i| direct[i]).collect();
        let (q_store, q_layout) = q.storage_and_layout();
        let (k_store, k_layout) = k.storage_and_layout();
        let (v_store, v_layout) = v.storage_and_layout();
        let (q_rows, k_rows, v_rows) = (
            HostRows::new(&q_store, q_layout)?,
            HostRows::new(&k_store, k_layout)?,
            HostRows::new(&v_store, v_layout)?,
        );
        // The direct sequences' query rows, rotated, in batch order; keys are rotated on their
        // way into the cache. Room in every cache first (growing one allocates), then each
        // sequence's rows over the CPU workers: with a decode row per sequence, the rotations
        // and cache writes of 16 sequences were ~2% of a step on the thread the workers wait for.
        let mut writes = Vec::with_capacity(chosen.len());
        for ((step, span), _) in batch.iter_mut().zip(spans).zip(direct).filter(|(_, &d)| d) {
            step.cache.reserve_rows(layer, span.len)?;
            writes.push(Mutex::new((&mut *step.cache, span, Vec::new(), Ok(()))));
        }
        crate::parallel::for_each_chunk(writes.len(), |range| {
            for write in &writes[range] {
                let mut write = write.lock().unwrap_or_else(|e| e.into_inner());
                let (cache, span, q, result) = &mut *write;
                q.reserve_exact(span.len * q_width);
                let mut keys = Vec::with_capacity(span.len * kv_width);
                for r in 0..span.len {
                    for (rotated, from) in [(&mut *q, &q_rows), (&mut keys, &k_rows)] {
                        let at = rotated.len();
                        rotated.extend_from_slice(from.row(span.row + r));
                        self.rope.apply_row(&mut rotated[at..], &span.rope, r);
                    }
                }
                let values: Vec<&[f32]> = (0..span.len).map(|r| v_rows.row(span.row + r)).collect();
                let keys: Vec<&[f32]> = keys.chunks_exact(kv_width).collect();
                *result = cache.append_rows(layer, &keys, &values);
            }
        });
        // Each direct sequence's rotated query rows, in batch order.
        let rotated = writes
            .into_iter()
            .map(|write| {
                let (_, _, q, result) = write.into_inner().unwrap_or_else(|e| e.into_inner());
                result.map(|()| q)
            })
            .collect::<Result<Vec<_>>>()?;
        let buffers = chosen
            .iter()
            .map(|&i| {
                batch[i]
                    .cache
                    .buffers(layer)
                    .ok_or_else(|| candle_core::Error::msg("attention before any cache write"))
            })
            .collect::<Result<Vec<_>>>()?;
        let storages: Vec<_> = buffers
            .iter()
            .map(|(k, v)| Ok((k.storage_and_layout(), v.storage_and_layout(), k.dim(1)?)))
            .collect::<Result<_>>()?;
        // Each direct sequence's query rows.
        let mut queries = Vec::with_capacity(chosen.len());
        for ((&i, q), ((k_storage, k_layout), (v_storage, v_layout), capacity)) in
            chosen.iter().zip(&rotated).zip(&storages)
        {
            let cache = (
                cpu_kv(k_storage, k_layout)?,
                cpu_kv(v_storage, v_layout)?,
                *capacity,
            );
            let rows = q.chunks_exact(q_width);
            queries.push(self.row_queries(rows, cache, None, spans[i].start));
        }
        let window = self.cfg.sliding_window;
        let batch_rows: usize = spans.iter().map(|s| s.len).sum();
        // Allocated once a row needs it: when every row takes the one pass in order, that
        // pass's output is the result.
        let mut attn = Vec::new();
        // Hooks on scores or probabilities: decode rows whose hooks rewrite a head's row at a
        // time join the one pass; the others get whole rows between passes, first (their
        // hooks need `&mut`, the rewrites borrow them).
        let hooked: Vec<bool> = chosen
            .iter()
            .map(|&i| {
                [HookPoint::Scores, HookPoint::Probs]
                    .iter()
                    .any(|&point| batch[i].hooks_for(point, layer).is_some())
            })
            .collect();
        let rewrites_in_pass: Vec<bool> = chosen
            .iter()
            .zip(&hooked)
            .map(|(&i, &hooked)| {
                hooked && self.decode_rewrite(&batch[i], &spans[i], layer).is_some()
            })
            .collect();
        let mut plain = Vec::new();
        let mut plain_rows = Vec::new();
        let mut in_pass = Vec::new();
        for (k, (&i, rows)) in chosen.iter().zip(queries).enumerate() {
            let span = &spans[i];
            if rewrites_in_pass[k] {
                in_pass.push((i, rows));
            } else if hooked[k] {
                attn.resize(batch_rows * q_width, 0.0);
                let out = &mut attn[span.row * q_width..(span.row + span.len) * q_width];
                self.hooked_attention_rows(&span.site(layer), &rows, window, &mut batch[i], out)?;
            } else {
                plain_rows.extend(span.row..span.row + span.len);
                plain.extend(rows);
            }
        }
        let rewrites: Vec<_> = in_pass
            .iter()
            .map(|&(i, _)| self.decode_rewrite(&batch[i], &spans[i], layer))
            .collect();
        for ((i, mut rows), rewrite) in in_pass.into_iter().zip(&rewrites) {
            for row in &mut rows {
                row.rewrite = rewrite.as_deref();
            }
            plain_rows.extend(spans[i].row..spans[i].row + spans[i].len);
            plain.extend(rows);
        }
        let mut outputs = vec![0f32; plain.len() * q_width];
        cpu_attention::attend_all(&plain, window, &mut outputs);
        if plain_rows.iter().copied().eq(0..batch_rows) {
            return Ok(outputs);
        }
        attn.resize(batch_rows * q_width, 0.0);
        for (row, out) in plain_rows.into_iter().zip(outputs.chunks_exact(q_width)) {
            attn[row * q_width..(row + 1) * q_width].copy_from_slice(out);
        }
        Ok(attn)
    }

    /// The in-pass rewrite of `step`'s hooks for its attention in `layer`, if the step is a
    /// decode row and its hooks offer one.
    fn decode_rewrite<'s>(
        &self,
        step: &'s SequenceStep<'_>,
        span: &Span,
        layer: usize,
    ) -> Option<Box<dyn HeadRowRewrite + 's>> {
        if span.len != 1 {
            return None;
        }
        step.hooks.as_deref()?.decode_rewrite(&span.site(layer))
    }

    /// One [`QueryRow`] per query row (heads × head_dim each) of a sequence whose first row
    /// is at `query_start`, over its cache buffers `(k, v, capacity)`: row i sees the keys up
    /// to its own position, or the selected `keys`.
    fn row_queries<'a>(
        &self,
        rows: impl Iterator<Item = &'a [f32]>,
        (k, v, capacity): (KvValues<'a>, KvValues<'a>, usize),
        keys: Option<&'a [u32]>,
        query_start: usize,
    ) -> Vec<QueryRow<'a>> {
        rows.enumerate()
            .map(|(i, q)| QueryRow {
                q,
                k,
                v,
                heads: self.cfg.num_heads,
                kv_heads: self.cfg.num_kv_heads,
                head_dim: self.cfg.head_dim,
                capacity,
                keys,
                key_len: query_start + i + 1,
                rewrite: None,
            })
            .collect()
    }

    /// Attention for one sequence: `q` (heads, q_len, head_dim) against the cached `k`, `v`
    /// (kv_heads, key_len, head_dim). Returns the per-head outputs (heads, q_len, head_dim).
    fn attention(
        &self,
        layer: usize,
        query_start: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        step: &mut SequenceStep<'_>,
    ) -> Result<Tensor> {
        let (heads, q_len, head_dim) = q.dims3()?;
        let kv_heads = self.cfg.num_kv_heads;
        let key_len = k.dim(1)?;
        let mut site = AttentionSite {
            layer,
            query_start,
            query_len: q_len,
            key_len,
            selected_keys: None,
        };
        let selection = match step.hooks_for(HookPoint::KeySelection, layer) {
            Some(hooks) if q_len == 1 => hooks.select_keys(&site)?,
            _ => None,
        };
        if self.attends_on_host(q_len, key_len) {
            return self.attention_cpu(site, q, selection.as_ref(), step);
        }
        let (k, v) = match &selection {
            Some(idx) => {
                // Gather from the contiguous buffers: only the selected rows are read.
                let (k_buf, v_buf) = step.cache.buffers(layer).ok_or_else(|| {
                    candle_core::Error::msg("key selection before any cache write")
                })?;
                let idx = idx
                    .unsqueeze(2)?
                    .expand((kv_heads, idx.dim(1)?, head_dim))?
                    .contiguous()?;
                (
                    k_buf.gather(&idx, 1)?.to_dtype(q.dtype())?,
                    v_buf.gather(&idx, 1)?.to_dtype(q.dtype())?,
                )
            }
            // The cache's storage type, widened for the products (a no-op for f32 caches).
            None => (k.to_dtype(q.dtype())?, v.to_dtype(q.dtype())?),
        };
        site.selected_keys = selection.as_ref();
        let attended = k.dim(1)?;

        // Query heads of one KV group are adjacent, so grouping them as extra query rows lets
        // each KV head serve its group without repeating K and V.
        let groups = heads / kv_heads;
        let q_grouped = q.reshape((kv_heads, groups * q_len, head_dim))?;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let mut scores = (q_grouped.matmul(&k.t()?)? * scale)?.reshape((heads, q_len, attended))?;
        if selection.is_none() {
            if let Some(mask) = self.mask(query_start, q_len, key_len)? {
                scores = scores.broadcast_add(&mask)?;
            }
        }
        if let Some(hooks) = step.hooks_for(HookPoint::Scores, layer) {
            scores = hooks.scores(&site, scores)?;
        }
        let mut probs = candle_nn::ops::softmax_last_dim(&scores)?;
        if let Some(hooks) = step.hooks_for(HookPoint::Probs, layer) {
            probs = hooks.probs(&site, probs)?;
        }
        probs
            .reshape((kv_heads, groups * q_len, attended))?
            .matmul(&v)?
            .reshape((heads, q_len, head_dim))
    }

    /// [`Self::attention`] on the CPU, query row by query row (see [`crate::cpu_attention`]):
    /// row i sees keys up to its own position. The same hooks at the same points, with the same
    /// tensor shapes (future keys' scores are -inf, as the tensor path's mask makes them); with
    /// no hook on scores or probabilities every (row, head) runs in one pass, with the same
    /// arithmetic.
    fn attention_cpu<'s>(
        &self,
        mut site: AttentionSite<'s>,
        q: &Tensor,
        selection: Option<&'s Tensor>,
        step: &mut SequenceStep<'_>,
    ) -> Result<Tensor> {
        let (heads, q_len, head_dim) = q.dims3()?;
        let width = heads * head_dim;
        // (q_len, heads, head_dim): each query row's heads side by side.
        let q_rows = q
            .transpose(0, 1)?
            .contiguous()?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let keys = selection
            .map(|idx| idx.flatten_all()?.to_vec1::<u32>())
            .transpose()?;
        site.selected_keys = selection;
        let (k_buf, v_buf) = step
            .cache
            .buffers(site.layer)
            .ok_or_else(|| candle_core::Error::msg("attention before any cache write"))?;
        let (k_storage, k_layout) = k_buf.storage_and_layout();
        let (v_storage, v_layout) = v_buf.storage_and_layout();
        let (k, v) = (cpu_kv(&k_storage, k_layout)?, cpu_kv(&v_storage, v_layout)?);
        let queries = self.row_queries(
            q_rows.chunks_exact(width),
            (k, v, k_buf.dim(1)?),
            keys.as_deref(),
            site.query_start,
        );
        // Keys more than `window` positions back are out of sight (as in `mask`).
        let window = self.cfg.sliding_window.filter(|_| selection.is_none());
        let hooked = [HookPoint::Scores, HookPoint::Probs]
            .iter()
            .any(|&point| step.hooks_for(point, site.layer).is_some());
        let mut out = vec![0f32; q_len * width];
        if hooked {
            self.hooked_attention_rows(&site, &queries, window, step, &mut out)?;
        } else {
            cpu_attention::attend_all(&queries, window, &mut out);
        }
        let out = Tensor::from_vec(out, (q_len, heads, head_dim), &self.device)?;
        if q_len == 1 {
            out.reshape((heads, 1, head_dim))
        } else {
            out.transpose(0, 1)?.contiguous()
        }
    }

    /// [`Self::attention_cpu`] with hooks on scores or probabilities: scores of all rows as one
    /// (heads, q_len, key_len) tensor for the hooks, then softmax and values row by row. Writes
    /// (q_len, heads, head_dim) into `out`.
    fn hooked_attention_rows(
        &self,
        site: &AttentionSite<'_>,
        queries: &[QueryRow<'_>],
        window: Option<usize>,
        step: &mut SequenceStep<'_>,
        out: &mut [f32],
    ) -> Result<()> {
        let (q_len, heads) = (queries.len(), self.cfg.num_heads);
        let total = queries.iter().map(|q| q.n_keys()).max().unwrap_or(0);
        // Without a hook on scores, the softmax comes with them in the same pass.
        let scores_hooked = step.hooks_for(HookPoint::Scores, site.layer).is_some();
        let mut scores = cpu_attention::scores_all(queries, window, total, !scores_hooked);
        let rewrite = |step: &mut SequenceStep<'_>, values: &mut Vec<f32>, point| -> Result<()> {
            let Some(hooks) = step.hooks_for(point, site.layer) else {
                return Ok(());
            };
            let mut rows = AttentionRows {
                values,
                heads,
                query_len: q_len,
                keys: total,
            };
            let done = match point {
                HookPoint::Scores => hooks.scores_in_place(site, &mut rows)?,
                _ => hooks.probs_in_place(site, &mut rows)?,
            };
            if !done {
                let t = rows.to_tensor()?;
                let t = match point {
                    HookPoint::Scores => hooks.scores(site, t)?,
                    _ => hooks.probs(site, t)?,
                };
                rows.set(&t)?;
            }
            Ok(())
        };
        if scores_hooked {
            rewrite(step, &mut scores, HookPoint::Scores)?;
            if step.hooks_for(HookPoint::Probs, site.layer).is_none() {
                // Softmax and values of each (row, head) together on the CPU workers.
                cpu_attention::softmax_and_values(queries, &scores, total, out);
                return Ok(());
            }
            cpu_attention::softmax_rows_parallel(&mut scores, total);
        }
        let mut probs = scores;
        rewrite(step, &mut probs, HookPoint::Probs)?;
        cpu_attention::values_of(queries, &probs, total, out);
        Ok(())
    }

    /// Additive mask (q_len, key_len) for causality and Mistral's sliding window; `None` when
    /// every query may see every key (a plain decode step).
    fn mask(&self, query_start: usize, q_len: usize, key_len: usize) -> Result<Option<Tensor>> {
        let window = self.cfg.sliding_window.filter(|&w| w < key_len);
        if q_len == 1 && window.is_none() {
            return Ok(None);
        }
        let mut mask = vec![0f32; q_len * key_len];
        for i in 0..q_len {
            let pos = query_start + i;
            for (j, m) in mask[i * key_len..(i + 1) * key_len].iter_mut().enumerate() {
                let outside_window = window.is_some_and(|w| pos >= j + w);
                if j > pos || outside_window {
                    *m = f32::NEG_INFINITY;
                }
            }
        }
        Tensor::from_vec(mask, (q_len, key_len), &self.device)?
            .to_dtype(self.dtype())
            .map(Some)
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        crate::rms_norm::rms_norm(x, weight, self.cfg.rms_norm_eps as f32)
    }

    /// Runs a row-wise hook on each sequence's rows of a packed (rows, hidden) tensor.
    fn row_hooks(
        &self,
        packed: Tensor,
        spans: &[Span],
        batch: &mut [SequenceStep<'_>],
        point: HookPoint,
        layer: usize,
    ) -> Result<Tensor> {
        if !wants_row_hooks(batch, point, layer) {
            return Ok(packed);
        }
        let mut parts = Vec::with_capacity(batch.len());
        for (step, span) in batch.iter_mut().zip(spans) {
            let rows = packed.narrow(0, span.row, span.len)?;
            let site = RowSite {
                layer,
                query_start: span.start,
            };
            parts.push(match step.hooks_for(point, layer) {
                Some(hooks) if point == HookPoint::MlpOutput => hooks.mlp_output(&site, rows)?,
                Some(hooks) => hooks.residual(&site, rows)?,
                None => rows,
            });
        }
        Tensor::cat(&parts, 0)
    }

    fn batch_logits(
        &self,
        hidden: &Tensor,
        spans: &[Span],
        batch: &[SequenceStep<'_>],
    ) -> Result<Vec<Option<Tensor>>> {
        let mut rows = Vec::new();
        for (step, span) in batch.iter().zip(spans) {
            match step.logits {
                LogitsFor::None => {}
                LogitsFor::Last => rows.push((span.row + span.len - 1) as u32),
                LogitsFor::All => rows.extend((span.row..span.row + span.len).map(|r| r as u32)),
            }
        }
        if rows.is_empty() {
            return Ok(vec![None; batch.len()]);
        }
        let picked = hidden.index_select(&Tensor::new(rows.as_slice(), &self.device)?, 0)?;
        let logits = self.logits_from_hidden(&picked, true)?;
        let mut offset = 0;
        let mut out = Vec::with_capacity(batch.len());
        for (step, span) in batch.iter().zip(spans) {
            let n = match step.logits {
                LogitsFor::None => 0,
                LogitsFor::Last => 1,
                LogitsFor::All => span.len,
            };
            out.push(if n == 0 {
                None
            } else {
                Some(logits.narrow(0, offset, n)?)
            });
            offset += n;
        }
        Ok(out)
    }
}

/// Whether a hook of any sequence in the batch acts at `point` of `layer`.
fn wants_row_hooks(batch: &[SequenceStep<'_>], point: HookPoint, layer: usize) -> bool {
    batch
        .iter()
        .any(|s| s.hooks.as_ref().is_some_and(|h| h.wants(point, layer)))
}

/// Rows of a 2-D f32 CPU tensor whose rows are contiguous (e.g. a column range of a wider
/// tensor), read in place.
struct HostRows<'a> {
    data: &'a [f32],
    offset: usize,
    stride: usize,
    width: usize,
}

impl<'a> HostRows<'a> {
    fn new(storage: &'a Storage, layout: &Layout) -> Result<Self> {
        let Storage::Cpu(CpuStorage::F32(data)) = storage else {
            candle_core::bail!("expected an f32 CPU tensor");
        };
        match (layout.shape().dims(), layout.stride()) {
            (&[_, width], &[stride, 1]) => Ok(Self {
                data,
                offset: layout.start_offset(),
                stride,
                width,
            }),
            _ => candle_core::bail!("expected a 2-D tensor with contiguous rows"),
        }
    }

    fn row(&self, r: usize) -> &'a [f32] {
        let start = self.offset + r * self.stride;
        &self.data[start..start + self.width]
    }
}

/// The values of a contiguous f32 or f16 CPU tensor (a KV cache buffer).
fn cpu_kv<'a>(storage: &'a Storage, layout: &Layout) -> Result<KvValues<'a>> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::msg("expected a contiguous tensor"))?;
    Ok(match storage {
        Storage::Cpu(CpuStorage::F32(data)) => KvValues::F32(&data[start..end]),
        Storage::Cpu(CpuStorage::F16(data)) => KvValues::F16(&data[start..end]),
        _ => candle_core::bail!("expected an f32 or f16 CPU tensor"),
    })
}
