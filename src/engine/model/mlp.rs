//! The gated MLP of one decoder layer: `down(act(gate(h)) * up(h))` with `act` SiLU (SwiGLU,
//! [`crate::engine::ops::swiglu`]) or tanh-GELU (GeGLU, [`crate::engine::ops::geglu`]), gate
//! and up separate or Phi-3's fused `gate_up_proj` (output `[gate | up]`).

use super::checkpoint::GradStash;
use super::layer::{Pass, project, project_backward, project_backward_owned};
use crate::engine::config::Activation;
use crate::engine::lora::{BaseLinear, DropoutRng, LoraLinear, LoraProjection};
use crate::engine::ops::{
    cpu_in, cpu_out, geglu, geglu_backward, swiglu, swiglu_backward, swiglu_backward_owned,
};
use crate::engine::profiler;
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor, TensorId};
use std::sync::Arc;

/// Whether the MLP without checkpointing runs its activation and down projection as one graph
/// node ([`GatedDown`]): on unless `LORASCOPE_GATED_DOWN` is `0` (read once). The memory model
/// counts the kept activations with it.
pub(crate) fn gated_down_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    crate::engine::cuda::kernel_switch(&ON, "LORASCOPE_GATED_DOWN")
}

/// gate and up as the checkpoint stores them.
pub(crate) enum GateUp {
    /// `gate_proj`, `up_proj`, (intermediate, hidden) each.
    Split { gate: LoraLinear, up: LoraLinear },
    /// Phi-3 `gate_up_proj` (2 * intermediate, hidden), one adapter for both.
    Fused(LoraLinear),
}

/// The MLP's modules.
pub(crate) struct Mlp {
    /// gate and up.
    pub gate_up: GateUp,
    /// `down_proj` (hidden, intermediate).
    pub down: LoraLinear,
    /// The gate's activation.
    pub act: Activation,
}

/// The MLP's intermediates.
pub(crate) struct MlpSaved {
    /// The input of gate and up.
    h: Tensor,
    /// `gate(h)`, `up(h)` and `act(gate) * up` (the input of down).
    gate: Tensor,
    up: Tensor,
    pub(crate) act: Tensor,
    /// gate/up ops (2 split, 1 fused) with their dropout seeds.
    gate_up_ops: Vec<Option<LoraProjection>>,
    /// down's op, drawn after the gate (see `DecoderLayer::record`).
    pub(crate) down_op: Option<LoraProjection>,
}

impl Mlp {
    /// gate(h) and up(h) for `h` (b*t, hidden) under `pass`: (b*t, intermediate) each, with
    /// the ops (and dropout seeds) they ran with.
    fn gate_up(
        &self,
        h: &Tensor,
        rng: Option<&DropoutRng>,
        pass: Pass,
    ) -> Result<(Tensor, Tensor, Vec<Option<LoraProjection>>)> {
        Ok(match &self.gate_up {
            GateUp::Split { gate, up } => {
                let (g, g_op) = project(gate, h, rng, pass)?;
                let (u, u_op) = project(up, h, rng, pass)?;
                (g, u, vec![g_op, u_op])
            }
            GateUp::Fused(lin) => {
                let (y, op) = project(lin, h, rng, pass)?;
                let i = y.dim(1)? / 2;
                let g = y.narrow(1, 0, i)?.contiguous()?;
                let u = y.narrow(1, i, i)?.contiguous()?;
                (g, u, vec![op])
            }
        })
    }

    /// The MLP's output `down(act(gate(h)) * up(h))` for `h` (b*t, hidden) in candle's graph
    /// ([`Pass::Graph`]): (b*t, hidden). When gate or up is tracked, the activation and the
    /// down projection are one node over gate and up ([`GatedDown`]), which keeps those two
    /// and not their product: one (b*t, intermediate) tensor per layer less kept for
    /// backward. down's adapter gradients then go to `stash` (merged by `Model::backward`).
    /// Dropout seeds are drawn gate, up, down, as in every pass.
    ///
    /// Errors: shape, dtype or device errors (including out of memory).
    pub(crate) fn forward_graph(
        &self,
        h: &Tensor,
        rng: Option<&DropoutRng>,
        stash: &Arc<GradStash>,
    ) -> Result<Tensor> {
        let (gate, up, _) = self.gate_up(h, rng, Pass::Graph)?;
        if !(gate.track_op() || up.track_op()) || !gated_down_on() {
            let act = self.activation(&gate, &up)?;
            return project(&self.down, &act, rng, Pass::Graph).map(|(y, _)| y);
        }
        let op = GatedDown {
            act: self.act,
            op: self.down.fixed(rng)?,
            base: self.down.base.clone(),
            ab: self
                .down
                .adapter
                .as_ref()
                .map(|ad| (ad.a.as_tensor().clone(), ad.b.as_tensor().clone())),
            stash: stash.clone(),
        };
        gate.apply_op2(&up, op)
    }

    /// `act(gate) * up` (untracked inputs: untracked output).
    fn activation(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        match self.act {
            Activation::Silu => swiglu(gate, up),
            Activation::GeluTanh => geglu(gate, up),
        }
    }

    /// `act(gate(h)) * up(h)` for `h` (b*t, hidden): the input of `down`, (b*t,
    /// intermediate), with the intermediates (`down_op` not yet drawn).
    pub(crate) fn gated(
        &self,
        h: &Tensor,
        rng: Option<&DropoutRng>,
        pass: Pass,
    ) -> Result<MlpSaved> {
        let (gate, up, gate_up_ops) = self.gate_up(h, rng, pass)?;
        let act = self.activation(&gate, &up)?;
        Ok(MlpSaved {
            h: h.clone(),
            gate,
            up,
            act,
            gate_up_ops,
            down_op: None,
        })
    }

    /// Gradient of the MLP's input `h` for the output gradient `dy` (b*t, hidden); adapter
    /// gradients go to `grads`. Consumes the intermediates, freeing each when done.
    pub(crate) fn backward(
        &self,
        saved: MlpSaved,
        dy: &Tensor,
        grads: &mut dyn FnMut(TensorId, Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        let MlpSaved {
            h,
            gate,
            up,
            act,
            gate_up_ops,
            down_op,
        } = saved;
        // `act`, `gate` and `up` are this function's alone: the down projection may write its
        // dropout over `act` and frees it before `dact` exists, the SwiGLU gradients may be
        // written over gate and up (`cuda::in_place_mlp_on`).
        let dact = project_backward_owned(&self.down, &down_op, act, dy, grads)?;
        let (dgate, dup) = match self.act {
            Activation::Silu => swiglu_backward_owned(gate, up, &dact)?,
            Activation::GeluTanh => geglu_backward(&gate, &up, &dact)?,
        };
        drop(dact);
        match &self.gate_up {
            GateUp::Split { gate, up } => {
                let op = |i: usize| gate_up_ops.get(i).cloned().flatten();
                project_backward(gate, &op(0), &h, &dgate, grads)?
                    + project_backward(up, &op(1), &h, &dup, grads)?
            }
            GateUp::Fused(lin) => {
                let dy = Tensor::cat(&[dgate, dup], 1)?;
                let op = gate_up_ops.into_iter().next().flatten();
                project_backward(lin, &op, &h, &dy, grads)
            }
        }
    }
}

/// `down(act(gate) * up)` as one graph node over gate and up, for the MLP without
/// checkpointing ([`Mlp::forward_graph`]). candle keeps every op's inputs for backward, so
/// `act(gate) * up` as its own node's output and the down projection's input would be kept
/// beside gate and up until backward; here only gate and up are kept and the product is
/// recomputed in backward (one elementwise pass). Same values as the separate ops: forward
/// `y = down(act(g) * u)` with down's adapter and dropout seed as drawn for this pass; backward
/// `dact` from down's backward ([`LoraProjection::backward_owned`]: `dA`, `dB` to the stash under the
/// adapter variables' ids), then `(dg, du)` from the activation's backward.
#[derive(Clone)]
pub(crate) struct GatedDown {
    act: Activation,
    /// down's adapted projection as drawn for this pass (None: down has no adapter).
    op: Option<LoraProjection>,
    /// down's frozen base (the projection when there is no adapter).
    base: BaseLinear,
    /// down's adapter variables A (r, intermediate), B (hidden, r), f32.
    ab: Option<(Tensor, Tensor)>,
    stash: Arc<GradStash>,
}

impl GatedDown {
    /// The forward on untracked tensors.
    fn plain(&self, g: &Tensor, u: &Tensor) -> Result<Tensor> {
        self.down(&self.plain_act(g, u)?)
    }

    /// `act(g) * u` of untracked tensors.
    fn plain_act(&self, g: &Tensor, u: &Tensor) -> Result<Tensor> {
        match self.act {
            Activation::Silu => swiglu(g, u),
            Activation::GeluTanh => geglu(g, u),
        }
    }

    /// down of an untracked `act`.
    fn down(&self, act: &Tensor) -> Result<Tensor> {
        match (&self.op, &self.ab) {
            (Some(op), Some((a, b))) => op.forward_untracked(act, a, b),
            _ => self.base.plain(act),
        }
    }
}

impl candle_core::CustomOp2 for GatedDown {
    fn name(&self) -> &'static str {
        "gated-down"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_out(self.plain(&cpu_in(s1, l1)?, &cpu_in(s2, l2)?)?)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::engine::ops::{cuda_in, cuda_out};
        use candle_core::backend::BackendStorage;
        let dev = candle_core::Device::Cuda(s1.device().clone());
        profiler::section("gated-down", "fwd", &dev, || {
            // SwiGLU by the fused kernel straight from the storages, then down's direct
            // projection on the product: no copy of gate, up or the output.
            if self.act == Activation::Silu
                && let Some(act) = crate::engine::ops::swiglu_storages((s1, l1), (s2, l2))?
            {
                let lay = Layout::contiguous(l1.shape());
                if let (Some(op), Some((a, b))) = (&self.op, &self.ab)
                    && let Some(y) = op.forward_cuda_storage((&act, &lay), a, b)?
                {
                    let rows = l1.shape().elem_count() / l1.dims().last().copied().unwrap_or(1);
                    return Ok((y, Shape::from((rows, self.base.shape().0))));
                }
                let act = Tensor::from_storage(
                    candle_core::Storage::Cuda(act),
                    l1.shape(),
                    candle_core::op::BackpropOp::none(),
                    false,
                );
                return cuda_out(self.down(&act)?);
            }
            cuda_out(self.plain(&cuda_in(s1, l1)?, &cuda_in(s2, l2)?)?)
        })
    }
    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // An input without a graph gets no gradient (candle would keep it in the store).
        let (g_tracked, u_tracked) = (g.track_op(), u.track_op());
        // Detached: see `ops::InputGradCustomOp::bwd`.
        let (g, u, grad) = (g.detach(), u.detach(), grad.detach().contiguous()?);
        profiler::section("gated-down", "bwd", g.device(), || {
            let dact = match (&self.op, &self.ab) {
                (Some(op), Some((a, b))) => {
                    // A fresh product, this call's alone: down may write its dropout over it.
                    let act = self.plain_act(&g, &u)?;
                    let (dx, da, db) = op.backward_owned(act, &a.detach(), &b.detach(), &grad)?;
                    if let Some(da) = da {
                        self.stash.add(a.id(), da)?;
                    }
                    if let Some(db) = db {
                        self.stash.add(b.id(), db)?;
                    }
                    dx.ok_or_else(|| candle_core::Error::Msg("gated down gave no dx".into()))?
                }
                // The frozen projection's input gradient does not read its input.
                _ => self.base.input_grad(&grad, &grad)?.ok_or_else(|| {
                    candle_core::Error::Msg("gated down: no input gradient".into())
                })?,
            };
            let (dg, du) = match self.act {
                Activation::Silu => swiglu_backward(&g, &u, &dact)?,
                Activation::GeluTanh => geglu_backward(&g, &u, &dact)?,
            };
            Ok((g_tracked.then_some(dg), u_tracked.then_some(du)))
        })
    }
}
