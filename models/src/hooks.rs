//! Hook points inside the decoder, installed per sequence.
//!
//! A hook set says which points it uses ([`SequenceHooks::wants`]); the decoder consults that
//! before doing anything for a hook, so a sequence without hooks pays nothing. Every callback
//! receives a tensor and returns the tensor to continue with: return the input unchanged to
//! only read it.

use candle_core::{Result, Tensor};

/// Where in a forward pass a hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HookPoint {
    /// Attention scores after scaling and masking, before softmax: (heads, q_len, k_len).
    Scores,
    /// Attention probabilities after softmax: (heads, q_len, k_len).
    Probs,
    /// Per-head attention outputs before `o_proj`: (heads, q_len, head_dim). In a batched
    /// step every sequence's outputs of a layer are observed
    /// ([`SequenceHooks::observe_head_outputs`]) before any is rewritten
    /// ([`SequenceHooks::head_outputs`]), so sequences can compare theirs (VHR's lockstep).
    HeadOutputs,
    /// A layer's MLP output before it is added to the residual stream: (q_len, hidden).
    MlpOutput,
    /// The residual stream after `layer` decoder layers (0 = the embeddings, N = the last
    /// layer's output, before the final norm): (q_len, hidden).
    Residual,
    /// Which cached keys a single-query (decode) step attends to.
    KeySelection,
    /// Read-only: the step's queries before RoPE, (heads, q_len, head_dim).
    Queries,
}

/// What a hook is told about the attention call it is in.
#[derive(Debug, Clone, Copy)]
pub struct AttentionSite<'a> {
    pub layer: usize,
    /// Absolute position of the first query row.
    pub query_start: usize,
    pub query_len: usize,
    /// Number of cached keys (all positions so far, including this step's).
    pub key_len: usize,
    /// With a key selection: the attended key positions per KV head, (kv_heads, k) u32; the
    /// last dimension of scores and probs then follows this order.
    pub selected_keys: Option<&'a Tensor>,
}

/// Position information for row-wise hooks (MLP output, residual stream).
#[derive(Debug, Clone, Copy)]
pub struct RowSite {
    pub layer: usize,
    /// Absolute position of the first row.
    pub query_start: usize,
}

/// Scores or probabilities of one attention call in host memory, (heads, query_len, keys)
/// row-major: what [`SequenceHooks::scores_in_place`] and [`SequenceHooks::probs_in_place`]
/// rewrite on CPU f32 models, where building a tensor would cost more than most hooks' work.
pub struct AttentionRows<'a> {
    pub values: &'a mut [f32],
    pub heads: usize,
    pub query_len: usize,
    pub keys: usize,
}

impl AttentionRows<'_> {
    pub fn to_tensor(&self) -> Result<Tensor> {
        Tensor::from_slice(
            self.values,
            (self.heads, self.query_len, self.keys),
            &candle_core::Device::Cpu,
        )
    }

    /// Takes a hook's returned tensor (same shape) back into these rows.
    pub fn set(&mut self, t: &Tensor) -> Result<()> {
        let values = t
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1()?;
        if values.len() != self.values.len() {
            candle_core::bail!("a hook changed the shape of the attention rows");
        }
        self.values.copy_from_slice(&values);
        Ok(())
    }
}

/// What a hook on scores or probabilities does to a decode step's attention, one head's row
/// at a time: the decoder runs it on the CPU workers inside its attention pass (no second
/// pass, no copy of the rows), on CPU f32 models. Rows hold the keys the query sees, in
/// position order (there is no key selection).
pub trait HeadRowRewrite: Sync {
    /// Head `head`'s scaled, masked scores, before the softmax.
    fn scores(&self, _head: usize, _scores: &mut [f32]) {}
    /// Head `head`'s probabilities, after the softmax.
    fn probs(&self, _head: usize, _probs: &mut [f32]) {}
}

/// Callbacks for one sequence. All callbacks default to passing their input through.
pub trait SequenceHooks: Send {
    /// Whether this hook set acts at `point` in `layer` (for `Residual`, `layer` is the depth).
    fn wants(&self, point: HookPoint, layer: usize) -> bool;

    fn scores(&mut self, _site: &AttentionSite, scores: Tensor) -> Result<Tensor> {
        Ok(scores)
    }

    fn probs(&mut self, _site: &AttentionSite, probs: Tensor) -> Result<Tensor> {
        Ok(probs)
    }

    /// [`Self::scores`] on host memory (CPU f32 models): rewrites `scores` and returns true,
    /// or returns false, the default, to be called with a tensor instead. Both must give the
    /// same values.
    fn scores_in_place(
        &mut self,
        _site: &AttentionSite,
        _scores: &mut AttentionRows,
    ) -> Result<bool> {
        Ok(false)
    }

    /// [`Self::probs`] on host memory, as [`Self::scores_in_place`].
    fn probs_in_place(
        &mut self,
        _site: &AttentionSite,
        _probs: &mut AttentionRows,
    ) -> Result<bool> {
        Ok(false)
    }

    /// For a decode step's attention at `site` (one query, all keys): what [`Self::scores`]
    /// and [`Self::probs`] would do there as a [`HeadRowRewrite`], giving the same values, or
    /// `None`, the default, to be called with whole rows. Consulted only where this hook set
    /// wants scores or probabilities.
    fn decode_rewrite(&self, _site: &AttentionSite) -> Option<Box<dyn HeadRowRewrite + '_>> {
        None
    }

    /// Reads the layer's per-head outputs; runs for every sequence of the step before any
    /// sequence's [`Self::head_outputs`].
    fn observe_head_outputs(&mut self, _site: &AttentionSite, _outputs: &Tensor) -> Result<()> {
        Ok(())
    }

    fn head_outputs(&mut self, _site: &AttentionSite, outputs: Tensor) -> Result<Tensor> {
        Ok(outputs)
    }

    fn mlp_output(&mut self, _site: &RowSite, output: Tensor) -> Result<Tensor> {
        Ok(output)
    }

    fn residual(&mut self, _site: &RowSite, hidden: Tensor) -> Result<Tensor> {
        Ok(hidden)
    }

    /// Sees the step's queries before RoPE (read-only); called before [`Self::select_keys`].
    fn queries(&mut self, _site: &AttentionSite, _queries: &Tensor) -> Result<()> {
        Ok(())
    }

    /// Returns the key positions to attend to per KV head, (kv_heads, k) u32, or `None` for all.
    /// Asked only on single-query steps.
    fn select_keys(&mut self, _site: &AttentionSite) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

/// Several hook sets applied in order: each sees what the previous one returned.
#[derive(Default)]
pub struct HookStack(pub Vec<Box<dyn SequenceHooks>>);

impl SequenceHooks for HookStack {
    fn wants(&self, point: HookPoint, layer: usize) -> bool {
        self.0.iter().any(|h| h.wants(point, layer))
    }

    fn scores(&mut self, site: &AttentionSite, mut t: Tensor) -> Result<Tensor> {
        for h in self
            .0
            .iter_mut()
            .filter(|h| h.wants(HookPoint::Scores, site.layer))
        {
            t = h.scores(site, t)?;
        }
        Ok(t)
    }

    fn probs(&mut self, site: &AttentionSite, mut t: Tensor) -> Result<Tensor> {
        for h in self
            .0
            .iter_mut()
            .filter(|h| h.wants(HookPoint::Probs, site.layer))
        {
            t = h.probs(site, t)?;
        }
        Ok(t)
    }

    /// Each hook in place where it can, through a tensor where it cannot.
    fn scores_in_place(&mut self, site: &AttentionSite, rows: &mut AttentionRows) -> Result<bool> {
        for h in self
            .0
            .iter_mut()
            .filter(|h| h.wants(HookPoint::Scores, site.layer))
        {
            if !h.scores_in_place(site, rows)? {
                let t = h.scores(site, rows.to_tensor()?)?;
                rows.set(&t)?;
            }
        }
        Ok(true)
    }

    fn probs_in_place(&mut self, site: &AttentionSite, rows: &mut AttentionRows) -> Result<bool> {
        for h in self
            .0
            .iter_mut()
            .filter(|h| h.wants(HookPoint::Probs, site.layer))
        {
            if !h.probs_in_place(site, rows)? {
                let t = h.probs(site, rows.to_tensor()?)?;
                rows.set(&t)?;
            }
        }
        Ok(true)
    }

    /// The hooks' rewrites in order, when every hook on scores or probabilities here has one.
    fn decode_rewrite(&self, site: &AttentionSite) -> Option<Box<dyn HeadRowRewrite + '_>> {
        let rewrites = self
            .0
            .iter()
            .filter(|h| {
                h.wants(HookPoint::Scores, site.layer) || h.wants(HookPoint::Probs, site.layer)
            })
            .map(|h| h.decode_rewrite(site))
            .collect::<Option<Vec<_>>>()?;
        Some(Box::new(RewritesInOrder(rewrites)))
    }

    fn observe_head_outputs(&mut self, site: &AttentionSite, t: &Tensor) -> Result<()> {
        for h in self
            .0
            .iter_mut()
            .filter(|h| h.wants(HookPoint::HeadOutputs, site.layer))
        {
            h.observe_head_outputs(site, t)?;
        }
        Ok(())
    }

    fn head_outputs(&mut self, site: &AttentionSite, mut t: Tensor) -> Result<Tensor> {
        for h in self
            .0
            .iter_mut()
            .filter(|h| h.wants(HookPoint::HeadOutputs, site.layer))
        {
            t = h.head_outputs(site, t)?;
        }
        Ok(t)
    }

    fn mlp_output(&mut self, site: &RowSite, mut t: Tensor) -> Result<Tensor> {
        for h in self
            .0
            .iter_mut()
            .filter(|h| h.wants(HookPoint::MlpOutput, site.layer))
        {
            t = h.mlp_output(site, t)?;
        }
        Ok(t)
    }

    fn residual(&mut self, site: &RowSite, mut t: Tensor) -> Result<Tensor> {
        for h in self
            .0
            .iter_mut()
            .filter(|h| h.wants(HookPoint::Residual, site.layer))
        {
            t = h.residual(site, t)?;
        }
        Ok(t)
    }

    fn queries(&mut self, site: &AttentionSite, q: &Tensor) -> Result<()> {
        for h in self
            .0
            .iter_mut()
            .filter(|h| h.wants(HookPoint::Queries, site.layer))
        {
            h.queries(site, q)?;
        }
        Ok(())
    }

    /// The first hook set that selects keys wins; selections do not compose.
    fn select_keys(&mut self, site: &AttentionSite) -> Result<Option<Tensor>> {
        for h in self
            .0
            .iter_mut()
            .filter(|h| h.wants(HookPoint::KeySelection, site.layer))
        {
            if let Some(sel) = h.select_keys(site)? {
                return Ok(Some(sel));
            }
        }
        Ok(None)
    }
}

/// Several hook sets' rewrites: every one's scores change, then (after the softmax) every
/// one's probabilities change, as [`HookStack`] applies its hooks.
struct RewritesInOrder<'a>(Vec<Box<dyn HeadRowRewrite + 'a>>);

impl HeadRowRewrite for RewritesInOrder<'_> {
    fn scores(&self, head: usize, scores: &mut [f32]) {
        for r in &self.0 {
            r.scores(head, scores);
        }
    }

    fn probs(&self, head: usize, probs: &mut [f32]) {
        for r in &self.0 {
            r.probs(head, probs);
        }
    }
}
