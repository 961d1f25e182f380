//! Hook wrappers that time each intervention's hooks (`attune_intervention_hook_seconds`).

use attune_models::{
    AttentionRows, AttentionSite, HeadRowRewrite, HookPoint, RowSite, SequenceHooks,
};
use candle_core::{Result as CandleResult, Tensor};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Measures the time an intervention's hooks take (for `attune_intervention_hook_seconds`).
pub struct TimedHooks {
    pub inner: Box<dyn SequenceHooks>,
    pub spent_nanos: Arc<AtomicU64>,
}

impl TimedHooks {
    fn timed<T>(&mut self, f: impl FnOnce(&mut dyn SequenceHooks) -> T) -> T {
        let start = Instant::now();
        let out = f(self.inner.as_mut());
        self.spent_nanos
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        out
    }
}

impl SequenceHooks for TimedHooks {
    fn wants(&self, point: HookPoint, layer: usize) -> bool {
        self.inner.wants(point, layer)
    }
    fn scores(&mut self, site: &AttentionSite, t: Tensor) -> CandleResult<Tensor> {
        self.timed(|h| h.scores(site, t))
    }
    fn probs(&mut self, site: &AttentionSite, t: Tensor) -> CandleResult<Tensor> {
        self.timed(|h| h.probs(site, t))
    }
    fn scores_in_place(
        &mut self,
        site: &AttentionSite,
        r: &mut AttentionRows,
    ) -> CandleResult<bool> {
        self.timed(|h| h.scores_in_place(site, r))
    }
    fn probs_in_place(
        &mut self,
        site: &AttentionSite,
        r: &mut AttentionRows,
    ) -> CandleResult<bool> {
        self.timed(|h| h.probs_in_place(site, r))
    }
    fn decode_rewrite(&self, site: &AttentionSite) -> Option<Box<dyn HeadRowRewrite + '_>> {
        let inner = self.inner.decode_rewrite(site)?;
        Some(Box::new(TimedRewrite {
            inner,
            spent_nanos: &self.spent_nanos,
        }))
    }
    fn observe_head_outputs(&mut self, site: &AttentionSite, t: &Tensor) -> CandleResult<()> {
        self.timed(|h| h.observe_head_outputs(site, t))
    }
    fn head_outputs(&mut self, site: &AttentionSite, t: Tensor) -> CandleResult<Tensor> {
        self.timed(|h| h.head_outputs(site, t))
    }
    fn mlp_output(&mut self, site: &RowSite, t: Tensor) -> CandleResult<Tensor> {
        self.timed(|h| h.mlp_output(site, t))
    }
    fn residual(&mut self, site: &RowSite, t: Tensor) -> CandleResult<Tensor> {
        self.timed(|h| h.residual(site, t))
    }
    fn queries(&mut self, site: &AttentionSite, q: &Tensor) -> CandleResult<()> {
        self.timed(|h| h.queries(site, q))
    }
    fn select_keys(&mut self, site: &AttentionSite) -> CandleResult<Option<Tensor>> {
        self.timed(|h| h.select_keys(site))
    }
}

/// Times a rewrite on the CPU workers (each call adds its own duration).
struct TimedRewrite<'a> {
    inner: Box<dyn HeadRowRewrite + 'a>,
    spent_nanos: &'a AtomicU64,
}

impl TimedRewrite<'_> {
    fn timed(&self, f: impl FnOnce()) {
        let start = Instant::now();
        f();
        self.spent_nanos
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}

impl HeadRowRewrite for TimedRewrite<'_> {
    fn scores(&self, head: usize, scores: &mut [f32]) {
        self.timed(|| self.inner.scores(head, scores))
    }
    fn probs(&self, head: usize, probs: &mut [f32]) {
        self.timed(|| self.inner.probs(head, probs))
    }
}
