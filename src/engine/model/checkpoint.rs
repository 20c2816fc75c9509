//! Gradient checkpointing of decoder layers (`torch.utils.checkpoint` semantics): each layer
//! is one graph node over its input ([`LayerCheckpoint`]); only the input is kept, and the
//! layer runs again in backward. The adapter gradients found there wait in a [`GradStash`]
//! until [`super::Model::backward`] merges them into candle's gradient store.

use super::layer::{DecoderLayer, HeadLayout, Pass};
use crate::engine::lora::DropoutRng;
use crate::engine::ops::InputGradOp;
use crate::engine::profiler;
use candle_core::{Result, Tensor, TensorId};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Adapter gradients computed while recomputing checkpointed layers in backward, keyed by the
/// adapter variable's id, waiting to be merged into the main `GradStore`.
#[derive(Default)]
pub(crate) struct GradStash(Mutex<HashMap<TensorId, Tensor>>);

impl GradStash {
    /// Add `g` to the gradient stashed for `id`. `g` is detached first: a gradient that still
    /// carried its graph would keep every saved intermediate of the layer alive for as long as
    /// the gradient (or an optimizer moment built from it) lives.
    ///
    /// Errors: a poisoned lock, or a shape mismatch with the gradient already stashed.
    pub(crate) fn add(&self, id: TensorId, g: Tensor) -> Result<()> {
        let g = g.detach();
        let mut m = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg("gradient stash poisoned".into()))?;
        let g = match m.remove(&id) {
            Some(prev) => (prev + g)?,
            None => g,
        };
        m.insert(id, g);
        Ok(())
    }

    /// Remove and return the gradient stashed for `id`.
    pub(crate) fn take(&self, id: TensorId) -> Option<Tensor> {
        self.0.lock().ok()?.remove(&id)
    }

    /// Drop every stashed gradient.
    pub(crate) fn clear(&self) {
        if let Ok(mut m) = self.0.lock() {
            m.clear();
        }
    }
}

/// One checkpointed decoder layer as a custom op over the layer input: forward runs the layer
/// detached ([`Pass::Detached`]), so only the input stays alive for backward; backward runs
/// it again keeping its intermediates ([`DecoderLayer::record`]), back-propagates the incoming
/// gradient through them by hand ([`DecoderLayer::backward`]), returns the input gradient and
/// stashes the adapter gradients. Dropout masks are reproduced from a snapshot of the
/// generator taken before the forward pass.
pub(crate) struct LayerCheckpoint {
    layer: Arc<DecoderLayer>,
    layout: HeadLayout,
    /// The run's dropout generator (None: no dropout, e.g. evaluation).
    rng: Option<Arc<DropoutRng>>,
    /// `rng`'s state before this layer's forward drew from it.
    snapshot: Option<ChaCha8Rng>,
    stash: Arc<GradStash>,
}

impl LayerCheckpoint {
    /// Checkpoint `layer` for one forward with `layout`, drawing dropout seeds from `rng`
    /// (snapshotted now, before the forward draws) and stashing adapter gradients in `stash`.
    ///
    /// Errors: a poisoned generator.
    pub(crate) fn new(
        layer: Arc<DecoderLayer>,
        layout: HeadLayout,
        rng: Option<Arc<DropoutRng>>,
        stash: Arc<GradStash>,
    ) -> Result<Self> {
        let snapshot = match &rng {
            Some(r) => Some(
                r.0.lock()
                    .map_err(|_| candle_core::Error::Msg("rng poisoned".into()))?
                    .clone(),
            ),
            None => None,
        };
        Ok(Self {
            layer,
            layout,
            rng,
            snapshot,
            stash,
        })
    }
}

impl InputGradOp for LayerCheckpoint {
    const NAME: &'static str = "checkpointed-decoder-layer";
    fn plain(&self, x: &Tensor) -> Result<Tensor> {
        self.layer
            .forward(x, &self.layout, self.rng.as_deref(), Pass::Detached, None)
    }
    fn input_grad(&self, x: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (layer, layout) = (&self.layer, &self.layout);
        profiler::note_used("max at ckpt-layer bwd start", x.device());
        let rng = self.snapshot.clone().map(|s| DropoutRng(Mutex::new(s)));
        let x = x.detach();
        // One cast of the adapters for the recompute and the backward.
        let _casts = layer.cast_scope(&x)?;
        let saved = profiler::section("ckpt-layer", "recompute", x.device(), || {
            layer.record(&x, layout, rng.as_ref())
        })?;
        profiler::note_used("max after ckpt recompute", x.device());
        let dx = profiler::section("ckpt-layer", "inner-backward", x.device(), || {
            layer.backward(saved, layout, &x, &grad.detach(), &mut |id, g| {
                self.stash.add(id, g)
            })
        })?;
        profiler::note_used("max after ckpt inner bwd", x.device());
        Ok(Some(dx))
    }
}
