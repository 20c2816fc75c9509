//! One decoder layer, written once for every family:
//!
//! ```text
//! h1  = input_norm(x)
//! a   = o(attention(rope(norm?(q(h1))), rope(norm?(k(h1))), v(h1)))      attention.rs
//! x1  = x + attn_out_norm?(a)             (Gemma: post_attention_layernorm on a)
//! h2  = mlp_in_norm(x1)                   (post_attention_layernorm; Gemma: pre_feedforward)
//! m   = down(act(gate(h2)) * up(h2))                                     mlp.rs
//! out = x1 + mlp_out_norm?(m)             (Gemma: post_feedforward_layernorm)
//! ```
//!
//! [`DecoderLayer::forward`] runs this dataflow either recorded in candle's graph
//! ([`Pass::Graph`], autograd reaches the adapters) or with the adapters as constants
//! ([`Pass::Detached`], the first pass of a checkpointed layer). [`DecoderLayer::record`] runs
//! the same dataflow detached and keeps its intermediates ([`LayerSaved`]), and
//! [`DecoderLayer::backward`] walks the same named parts in reverse, chaining each op's own
//! backward, so gradient checkpointing builds no candle graph when it recomputes a layer.

use super::attention::{Attention, AttentionSaved, Qkv};
use super::checkpoint::GradStash;
use super::mlp::{GateUp, Mlp, MlpSaved};
use crate::engine::config::{ModelConfig, Projection};
use crate::engine::lora::{
    BaseLinear, CastScope, DropoutRng, LoraConfig, LoraLinear, LoraProjection, cast_scope,
    new_adapter,
};
use crate::engine::nf4::{Nf4Linear, Nf4Weight};
use crate::engine::ops::{AttentionSpec, FrozenLinear, InputGradOp, RmsNorm};
use crate::engine::profiler;
use crate::engine::weights::LayerNames;
use crate::engine::{CandleContext, EngineError};
use crate::spec::{LoraTarget, Quant};
use candle_core::{Device, Result, Tensor, TensorId};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

/// One decoder layer: frozen norms and projections in the compute dtype (projections
/// optionally NF4), f32 adapters on the targeted projections.
pub(crate) struct DecoderLayer {
    /// `input_layernorm`, before attention.
    pub input_norm: RmsNorm,
    /// `self_attn`.
    pub attn: Attention,
    /// Gemma's `post_attention_layernorm`, on the attention output.
    pub attn_out_norm: Option<RmsNorm>,
    /// Before the MLP: `post_attention_layernorm` (Gemma: `pre_feedforward_layernorm`).
    pub mlp_in_norm: RmsNorm,
    /// `mlp`.
    pub mlp: Mlp,
    /// Gemma's `post_feedforward_layernorm`, on the MLP output.
    pub mlp_out_norm: Option<RmsNorm>,
}

/// How [`DecoderLayer::forward`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pass {
    /// Recorded in candle's graph, so `backward` reaches the adapters.
    Graph,
    /// Adapters as constants, nothing recorded (inside a checkpointed layer).
    Detached,
}

/// The batch's layout for attention in one layer: activations are (batch*seq, heads*head_dim)
/// around the projections and (batch, heads, seq, head_dim) inside attention; `cos`/`sin` are
/// the layer's RoPE tables, (seq, head_dim) in the compute dtype; `spec` its attention variant.
#[derive(Clone)]
pub(crate) struct HeadLayout {
    /// Sequences.
    pub batch: usize,
    /// Positions per sequence.
    pub seq: usize,
    /// Query heads.
    pub q_heads: usize,
    /// Key/value heads (GQA: divides `q_heads`).
    pub kv_heads: usize,
    /// Features per head.
    pub head_dim: usize,
    /// RoPE cosines.
    pub cos: Tensor,
    /// RoPE sines.
    pub sin: Tensor,
    /// Scale, window and soft-capping of the layer's attention.
    pub spec: AttentionSpec,
}

impl HeadLayout {
    /// The layout of `cfg`'s heads for `batch` x `seq` tokens with RoPE tables `cos`, `sin`
    /// and attention `spec`.
    pub(crate) fn new(
        cfg: &ModelConfig,
        (batch, seq): (usize, usize),
        cos: Tensor,
        sin: Tensor,
        spec: AttentionSpec,
    ) -> Self {
        Self {
            batch,
            seq,
            q_heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            cos,
            sin,
            spec,
        }
    }

    /// (b*t, n*d) -> (b, n, t, d), contiguous ([`crate::engine::ops::row_copy`]).
    pub(crate) fn heads(&self, y: Tensor, n: usize) -> Result<Tensor> {
        crate::engine::ops::row_copy(
            &y.reshape((self.batch, self.seq, n, self.head_dim))?
                .transpose(1, 2)?,
        )
    }

    /// (b, n, t, d) -> (b*t, n*d), contiguous ([`crate::engine::ops::row_copy`]).
    pub(crate) fn flat(&self, y: Tensor, n: usize) -> Result<Tensor> {
        crate::engine::ops::row_copy(&y.transpose(1, 2)?)?
            .reshape((self.batch * self.seq, n * self.head_dim))
    }
}

/// The intermediates of a detached forward of one layer, kept for [`DecoderLayer::backward`].
/// Tensors are (b*t, features) or (b, heads, t, head_dim) in the compute dtype.
pub(crate) struct LayerSaved {
    /// Attention's input and intermediates.
    attn: AttentionSaved,
    /// The attention output before `attn_out_norm` (only with that norm).
    attn_out: Option<Tensor>,
    /// The residual stream after attention, the input of `mlp_in_norm`.
    x1: Tensor,
    /// The MLP's input and intermediates.
    mlp: MlpSaved,
    /// The MLP output before `mlp_out_norm` (only with that norm).
    mlp_out: Option<Tensor>,
}

/// `y = lin(h)` for `h` (tokens, in) under `pass`, with the op and dropout seed it used when
/// detached. Dropout draws one seed from `rng` per adapted projection, in the order the layer
/// runs them, in either pass.
pub(crate) fn project(
    lin: &LoraLinear,
    h: &Tensor,
    rng: Option<&DropoutRng>,
    pass: Pass,
) -> Result<(Tensor, Option<LoraProjection>)> {
    match pass {
        Pass::Graph => Ok((lin.forward_with(h, rng, false)?, None)),
        Pass::Detached => {
            let op = lin.fixed(rng)?;
            Ok((run_fixed(lin, &op, h)?, op))
        }
    }
}

/// `lin(h)` untracked with the op `op` drawn for it (None: the base projection).
fn run_fixed(lin: &LoraLinear, op: &Option<LoraProjection>, h: &Tensor) -> Result<Tensor> {
    match (op, &lin.adapter) {
        (Some(op), Some(ad)) => op.forward_untracked(h, ad.a.as_tensor(), ad.b.as_tensor()),
        _ => lin.base.plain(h),
    }
}

/// Input gradient of `lin` at input `x` for output gradient `dy` (both untracked), with `op`
/// the projection as run in the forward; the adapter's `dA`, `dB` (f32) go to `grads`.
pub(crate) fn project_backward(
    lin: &LoraLinear,
    op: &Option<LoraProjection>,
    x: &Tensor,
    dy: &Tensor,
    grads: &mut dyn FnMut(TensorId, Tensor) -> Result<()>,
) -> Result<Tensor> {
    match (op, &lin.adapter) {
        (Some(op), Some(ad)) => {
            let (at, bt) = (ad.a.as_tensor(), ad.b.as_tensor());
            let out = profiler::section("lora-projection", "bwd", x.device(), || {
                op.backward(x, at, bt, &dy.contiguous()?)
            })?;
            hand_over(ad, out, grads)
        }
        _ => lin
            .base
            .input_grad(x, &dy.contiguous()?)?
            .ok_or_else(|| candle_core::Error::Msg("projection gave no input gradient".into())),
    }
}

/// [`project_backward`] taking the input by value, for an intermediate the caller holds the
/// only handle on (the MLP's `act`): the projection may reuse its buffer
/// ([`LoraProjection::backward_owned`]) and frees it before the input gradient is allocated.
pub(crate) fn project_backward_owned(
    lin: &LoraLinear,
    op: &Option<LoraProjection>,
    x: Tensor,
    dy: &Tensor,
    grads: &mut dyn FnMut(TensorId, Tensor) -> Result<()>,
) -> Result<Tensor> {
    match (op, &lin.adapter) {
        (Some(op), Some(ad)) => {
            let (at, bt) = (ad.a.as_tensor(), ad.b.as_tensor());
            let dev = x.device().clone();
            let out = profiler::section("lora-projection", "bwd", &dev, || {
                op.backward_owned(x, at, bt, &dy.contiguous()?)
            })?;
            hand_over(ad, out, grads)
        }
        _ => project_backward(lin, op, &x, dy, grads),
    }
}

/// An adapted projection's `(dx, dA, dB)`: the adapter gradients to `grads` under the
/// variables' ids, `dx` returned.
fn hand_over(
    ad: &crate::engine::lora::LoraAdapter,
    (dx, da, db): (Option<Tensor>, Option<Tensor>, Option<Tensor>),
    grads: &mut dyn FnMut(TensorId, Tensor) -> Result<()>,
) -> Result<Tensor> {
    if let Some(da) = da {
        grads(ad.a.as_tensor().id(), da)?;
    }
    if let Some(db) = db {
        grads(ad.b.as_tensor().id(), db)?;
    }
    dx.ok_or_else(|| candle_core::Error::Msg("projection gave no dx".into()))
}

/// Input gradient of RMSNorm `n` at `x` for output gradient `g`.
pub(crate) fn norm_backward(n: &RmsNorm, x: &Tensor, g: &Tensor) -> Result<Tensor> {
    let g = profiler::section("rms-norm", "bwd", x.device(), || {
        n.input_grad(&x.contiguous()?, &g.contiguous()?)
    })?;
    g.ok_or_else(|| candle_core::Error::Msg("rms-norm gave no input gradient".into()))
}

/// `norm(x)` when there is a norm, else `x`.
fn maybe_norm(n: &Option<RmsNorm>, x: &Tensor) -> Result<Tensor> {
    match n {
        Some(n) => n.forward(x),
        None => Ok(x.clone()),
    }
}

impl DecoderLayer {
    /// Load layer `index` (`model.layers.{index}.*` through `get(name, shape)`), quantising
    /// the projections when `quant` is [`Quant::Nf4`], and create adapters (A from `rng`, in
    /// the layer's module order) on the modules whose targets are all in `targets` (resolved
    /// from `lora.targets` by [`ModelConfig::lora_targets`]).
    ///
    /// Errors: from `get` (missing or mis-shaped weights), quantisation or adapter creation; a
    /// fused module (Phi-3 `qkv_proj`, `gate_up_proj`) only partly targeted.
    #[allow(clippy::too_many_arguments)] // the loader's inputs; a struct would only rename them
    pub(crate) fn load<G>(
        cfg: &ModelConfig,
        lora: &LoraConfig,
        targets: &[LoraTarget],
        index: usize,
        quant: Quant,
        rng: &mut ChaCha8Rng,
        device: &Device,
        get: &G,
    ) -> std::result::Result<Self, EngineError>
    where
        G: Fn(&str, &[usize]) -> std::result::Result<Tensor, EngineError>,
    {
        let names = LayerNames::new(index);
        let h = cfg.hidden_size;
        let gemma = cfg.family.is_gemma();
        let norm = |name: String, n: usize| -> std::result::Result<RmsNorm, EngineError> {
            let w = get(&name, &[n])?;
            if gemma {
                RmsNorm::gemma(&w, cfg.rms_norm_eps).ctx("forming the (1 + w) norm weight")
            } else {
                Ok(RmsNorm::new(w, cfg.rms_norm_eps))
            }
        };
        let mut proj = |p: Projection| -> std::result::Result<LoraLinear, EngineError> {
            let (o, n) = cfg.projection_dims(p);
            let w = get(&names.weight(p), &[o, n])?;
            let b = if cfg.projection_bias(p) {
                Some(get(&names.bias(p), &[o])?)
            } else {
                None
            };
            let covered = p.targets().iter().filter(|t| targets.contains(t)).count();
            if covered != 0 && covered != p.targets().len() {
                return Err(EngineError::Invalid(format!(
                    "{} stores {} as one module `{}` with one adapter: target all of them (`{}`) or none",
                    cfg.family.class_name(),
                    p.targets_text(),
                    p.peft_name(),
                    p.peft_name()
                )));
            }
            let adapter = if covered != 0 {
                Some(
                    new_adapter(names.adapter(p), o, n, lora, rng, device)
                        .ctx("creating LoRA adapters")?,
                )
            } else {
                None
            };
            let base = match quant {
                Quant::None => BaseLinear::Dense(FrozenLinear::new(w, b)),
                Quant::Nf4 => BaseLinear::Nf4(Nf4Linear::new(
                    Nf4Weight::quantize(&w).ctx("quantising to NF4")?,
                    b,
                )),
            };
            Ok(LoraLinear { base, adapter })
        };
        let input_norm = norm(names.input_norm(), h)?;
        let fused = cfg.family == crate::engine::config::Family::Phi3;
        let qkv = if fused {
            Qkv::Fused(proj(Projection::Qkv)?)
        } else {
            Qkv::Split {
                q: proj(Projection::Q)?,
                k: proj(Projection::K)?,
                v: proj(Projection::V)?,
            }
        };
        let o = proj(Projection::O)?;
        let qk_norm = if cfg.qk_norm {
            Some((
                norm(names.q_norm(), cfg.head_dim)?,
                norm(names.k_norm(), cfg.head_dim)?,
            ))
        } else {
            None
        };
        let gate_up = if fused {
            GateUp::Fused(proj(Projection::GateUp)?)
        } else {
            GateUp::Split {
                gate: proj(Projection::Gate)?,
                up: proj(Projection::Up)?,
            }
        };
        let mlp = Mlp {
            gate_up,
            down: proj(Projection::Down)?,
            act: cfg.hidden_act,
        };
        let post = norm(names.post_norm(), h)?;
        let (attn_out_norm, mlp_in_norm, mlp_out_norm) = if gemma {
            (
                Some(post),
                norm(names.pre_ffn_norm(), h)?,
                Some(norm(names.post_ffn_norm(), h)?),
            )
        } else {
            (None, post, None)
        };
        Ok(Self {
            input_norm,
            attn: Attention { qkv, o, qk_norm },
            attn_out_norm,
            mlp_in_norm,
            mlp,
            mlp_out_norm,
        })
    }

    /// The linear modules with their checkpoint names, in the layer's order.
    pub(crate) fn projections(&self) -> Vec<(Projection, &LoraLinear)> {
        let mut v = Vec::with_capacity(7);
        match &self.attn.qkv {
            Qkv::Split { q, k, v: vv } => {
                v.extend([(Projection::Q, q), (Projection::K, k), (Projection::V, vv)])
            }
            Qkv::Fused(l) => v.push((Projection::Qkv, l)),
        }
        v.push((Projection::O, &self.attn.o));
        match &self.mlp.gate_up {
            GateUp::Split { gate, up } => {
                v.extend([(Projection::Gate, gate), (Projection::Up, up)])
            }
            GateUp::Fused(l) => v.push((Projection::GateUp, l)),
        }
        v.push((Projection::Down, &self.mlp.down));
        v
    }

    /// A [`CastScope`] over this layer's adapters for input `x`: open it around one pass (a
    /// forward, or a checkpointed layer's recompute and backward).
    ///
    /// Errors: device errors while casting.
    pub(crate) fn cast_scope(&self, x: &Tensor) -> Result<CastScope<'_>> {
        let adapters = self
            .projections()
            .into_iter()
            .filter_map(|(_, l)| l.adapter.as_ref())
            .collect();
        cast_scope(adapters, x)
    }

    /// The layer's norms with their checkpoint names (see [`LayerNames::norms`]).
    pub(crate) fn norms(&self, names: &LayerNames) -> Vec<(String, &RmsNorm)> {
        let mut v = vec![(names.input_norm(), &self.input_norm)];
        if let Some((q, k)) = &self.attn.qk_norm {
            v.push((names.q_norm(), q));
            v.push((names.k_norm(), k));
        }
        match (&self.attn_out_norm, &self.mlp_out_norm) {
            (Some(a), Some(m)) => {
                v.push((names.post_norm(), a));
                v.push((names.pre_ffn_norm(), &self.mlp_in_norm));
                v.push((names.post_ffn_norm(), m));
            }
            _ => v.push((names.post_norm(), &self.mlp_in_norm)),
        }
        v
    }

    /// Attention and the residual after it, the MLP's input norm: attention's intermediates,
    /// the attention output when it has its own norm, `x1` and `h2`.
    #[allow(clippy::type_complexity)] // four named parts of one dataflow
    fn attention_half(
        &self,
        x: &Tensor,
        s: &HeadLayout,
        rng: Option<&DropoutRng>,
        pass: Pass,
    ) -> Result<(AttentionSaved, Option<Tensor>, Tensor, Tensor)> {
        let h1 = self.input_norm.forward(x)?;
        let (a, attn) = self.attn.forward(&h1, s, rng, pass)?;
        let x1 = (x + maybe_norm(&self.attn_out_norm, &a)?)?;
        let attn_out = self.attn_out_norm.is_some().then_some(a);
        let h2 = self.mlp_in_norm.forward(&x1)?;
        Ok((attn, attn_out, x1, h2))
    }

    /// The dataflow up to the MLP's down projection, shared by every pass: everything but
    /// `mlp.down_op`, the MLP output and the layer output.
    fn trunk(
        &self,
        x: &Tensor,
        s: &HeadLayout,
        rng: Option<&DropoutRng>,
        pass: Pass,
    ) -> Result<LayerSaved> {
        let (attn, attn_out, x1, h2) = self.attention_half(x, s, rng, pass)?;
        let mlp = self.mlp.gated(&h2, rng, pass)?;
        Ok(LayerSaved {
            attn,
            attn_out,
            x1,
            mlp,
            mlp_out: None,
        })
    }

    /// The layer's output for `x` (b*t, hidden) in the compute dtype: (b*t, hidden). `rng`
    /// enables LoRA dropout (one seed drawn per adapted projection). In [`Pass::Graph`] with
    /// a `stash`, the MLP's activation and down projection are one graph node
    /// ([`Mlp::forward_graph`]) whose adapter gradients go to `stash`.
    ///
    /// Errors: shape, dtype or device errors (including out of memory).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        s: &HeadLayout,
        rng: Option<&DropoutRng>,
        pass: Pass,
        stash: Option<&Arc<GradStash>>,
    ) -> Result<Tensor> {
        let _casts = self.cast_scope(x)?;
        if let (Pass::Graph, Some(stash)) = (pass, stash) {
            let (_, _, x1, h2) = self.attention_half(x, s, rng, pass)?;
            let m = self.mlp.forward_graph(&h2, rng, stash)?;
            return &x1 + maybe_norm(&self.mlp_out_norm, &m)?;
        }
        let t = self.trunk(x, s, rng, pass)?;
        let (m, _) = project(&self.mlp.down, &t.mlp.act, rng, pass)?;
        &t.x1 + maybe_norm(&self.mlp_out_norm, &m)?
    }

    /// The intermediates of a detached forward on untracked `x`, dropout seeds drawn from
    /// `rng` as [`DecoderLayer::forward`] draws them. The output itself is not computed:
    /// [`DecoderLayer::backward`] does not need it.
    ///
    /// Errors: as [`DecoderLayer::forward`].
    pub(crate) fn record(
        &self,
        x: &Tensor,
        s: &HeadLayout,
        rng: Option<&DropoutRng>,
    ) -> Result<LayerSaved> {
        let mut saved = self.trunk(x, s, rng, Pass::Detached)?;
        let op = self.mlp.down.fixed(rng)?;
        if self.mlp_out_norm.is_some() {
            saved.mlp_out = Some(run_fixed(&self.mlp.down, &op, &saved.mlp.act)?);
        }
        saved.mlp.down_op = op;
        Ok(saved)
    }

    /// Gradient of the layer's input `x` (untracked, as given to [`DecoderLayer::record`]) for
    /// the output gradient `dout` (b*t, hidden); each adapter's `dA`/`dB` (f32) is handed to
    /// `grads` with the adapter variable's id. Consumes the intermediates, freeing each when
    /// done; no candle graph is built.
    ///
    /// Errors: shape, dtype or device errors, or one returned by `grads`.
    pub(crate) fn backward(
        &self,
        saved: LayerSaved,
        s: &HeadLayout,
        x: &Tensor,
        dout: &Tensor,
        grads: &mut dyn FnMut(TensorId, Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        let LayerSaved {
            attn,
            attn_out,
            x1,
            mlp,
            mlp_out,
        } = saved;
        let dout = dout.contiguous()?;
        // out = x1 + mlp_out_norm?(mlp(mlp_in_norm(x1)))
        let dm = match (&self.mlp_out_norm, mlp_out) {
            (Some(n), Some(m)) => norm_backward(n, &m, &dout)?,
            _ => dout.clone(),
        };
        let dh2 = self.mlp.backward(mlp, &dm, grads)?;
        let dx1 = (&dout + norm_backward(&self.mlp_in_norm, &x1, &dh2)?)?;
        drop((x1, dh2, dout, dm));
        // x1 = x + attn_out_norm?(attention(input_norm(x)))
        let da = match (&self.attn_out_norm, attn_out) {
            (Some(n), Some(a)) => norm_backward(n, &a, &dx1)?,
            _ => dx1.clone(),
        };
        let dh1 = self.attn.backward(attn, s, &da, grads)?;
        dx1 + norm_backward(&self.input_norm, x, &dh1)?
    }
}
