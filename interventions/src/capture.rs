//! A read-only hook that keeps the last row of the residual stream at chosen depths, for
//! processors that read intermediate layers' logits (DoLa, VISTA's SLA).

use attune_models::{HookPoint, RowSite, SequenceHooks};
use candle_core::{Result, Tensor};
use std::sync::{Arc, Mutex};

/// Keeps the last row of the residual stream at each depth in `layers` (slot i for layers[i]).
pub(crate) struct CaptureLastRow {
    pub layers: Vec<usize>,
    pub captured: Arc<Mutex<Vec<Option<Tensor>>>>,
}

impl SequenceHooks for CaptureLastRow {
    fn wants(&self, point: HookPoint, layer: usize) -> bool {
        point == HookPoint::Residual && self.layers.contains(&layer)
    }

    fn residual(&mut self, site: &RowSite, hidden: Tensor) -> Result<Tensor> {
        let rows = hidden.dim(0)?;
        let last = hidden.narrow(0, rows - 1, 1)?;
        let mut captured = self.captured.lock().expect("not poisoned");
        for (slot, &l) in captured.iter_mut().zip(&self.layers) {
            if l == site.layer {
                *slot = Some(last.clone());
            }
        }
        Ok(hidden)
    }
}

/// Takes every captured row (one per depth, in order) for this step; `what` names the method in
/// the error when a depth was not reached.
pub(crate) fn take_rows(captured: &Mutex<Vec<Option<Tensor>>>, what: &str) -> Result<Vec<Tensor>> {
    captured
        .lock()
        .expect("not poisoned")
        .iter_mut()
        .map(|slot| {
            slot.take()
                .ok_or_else(|| candle_core::Error::msg(format!("{what}: a layer was not captured")))
        })
        .collect()
}
