//! The gated MLP of one decoder layer: `down(act(gate(h)) * up(h))` with `act` SiLU (SwiGLU,
//! [`crate::engine::ops::swiglu`]) or tanh-GELU (GeGLU, [`crate::engine::ops::geglu`]), gate
//! and up separate or Phi-3's fused `gate_up_proj` (output `[gate | up]`).

use super::layer::{Pass, project, project_backward, project_backward_owned};
use crate::engine::config::Activation;
use crate::engine::lora::{DropoutRng, LoraLinear, LoraProjection};
use crate::engine::ops::{geglu, geglu_backward, swiglu, swiglu_backward_owned};
use candle_core::{Result, Tensor, TensorId};

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
    /// `act(gate(h)) * up(h)` for `h` (b*t, hidden): the input of `down`, (b*t,
    /// intermediate), with the intermediates (`down_op` not yet drawn).
    pub(crate) fn gated(
        &self,
        h: &Tensor,
        rng: Option<&DropoutRng>,
        pass: Pass,
    ) -> Result<MlpSaved> {
        let (gate, up, gate_up_ops) = match &self.gate_up {
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
        };
        let act = match self.act {
            Activation::Silu => swiglu(&gate, &up)?,
            Activation::GeluTanh => geglu(&gate, &up)?,
        };
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
