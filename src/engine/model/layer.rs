//! One decoder layer (Hugging Face `Qwen2DecoderLayer` / `LlamaDecoderLayer`), written once:
//!
//! ```text
//! h1  = input_norm(x)
//! x1  = x + o(attention(rope(q(h1)), rope(k(h1)), v(h1)))        Attention
//! h2  = post_norm(x1)
//! out = x1 + down(silu(gate(h2)) * up(h2))                          Mlp
//! ```
//!
//! [`DecoderLayer::forward`] runs this dataflow either recorded in candle's graph
//! ([`Pass::Graph`], autograd reaches the adapters) or with the adapters as constants
//! ([`Pass::Detached`], the first pass of a checkpointed layer). [`DecoderLayer::record`] runs
//! the same dataflow detached and keeps its intermediates ([`LayerSaved`]), and
//! [`DecoderLayer::backward`] walks the same named parts in reverse, chaining each op's own
//! backward, so gradient checkpointing builds no candle graph when it recomputes a layer.

use crate::engine::config::ModelConfig;
use crate::engine::lora::{
    BaseLinear, DropoutRng, LoraConfig, LoraLinear, LoraProjection, new_adapter,
};
use crate::engine::nf4::{Nf4Linear, Nf4Weight};
use crate::engine::ops::{FrozenLinear, InputGradOp, RmsNorm, apply_rope, rope_backward};
use crate::engine::ops::{causal_attention, causal_attention_backward};
use crate::engine::ops::{swiglu, swiglu_backward};
use crate::engine::profiler;
use crate::engine::weights::LayerNames;
use crate::engine::{CandleContext, EngineError};
use crate::spec::{LoraTarget, Quant};
use candle_core::{Device, Result, Tensor, TensorId};
use rand_chacha::ChaCha8Rng;

/// Self-attention's four projections (`self_attn.{q,k,v,o}_proj`).
pub(crate) struct Attention {
    /// (q_heads * head_dim, hidden); bias when `attention_bias`.
    pub q: LoraLinear,
    /// (kv_heads * head_dim, hidden); bias when `attention_bias`.
    pub k: LoraLinear,
    /// (kv_heads * head_dim, hidden); bias when `attention_bias`.
    pub v: LoraLinear,
    /// (hidden, q_heads * head_dim), no bias.
    pub o: LoraLinear,
}

/// The SwiGLU MLP's three projections (`mlp.{gate,up,down}_proj`), no biases.
pub(crate) struct Mlp {
    /// (intermediate, hidden).
    pub gate: LoraLinear,
    /// (intermediate, hidden).
    pub up: LoraLinear,
    /// (hidden, intermediate).
    pub down: LoraLinear,
}

/// One decoder layer: frozen norms and projections in the compute dtype (projections
/// optionally NF4), f32 adapters on the targeted projections.
pub(crate) struct DecoderLayer {
    /// `input_layernorm`, before attention.
    pub input_norm: RmsNorm,
    /// `self_attn`.
    pub attn: Attention,
    /// `post_attention_layernorm`, before the MLP.
    pub post_norm: RmsNorm,
    /// `mlp`.
    pub mlp: Mlp,
}

/// How [`DecoderLayer::forward`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pass {
    /// Recorded in candle's graph, so `backward` reaches the adapters.
    Graph,
    /// Adapters as constants, nothing recorded (inside a checkpointed layer).
    Detached,
}

/// The batch's layout for attention, shared by every layer of one forward: activations are
/// (batch*seq, heads*head_dim) around the projections and (batch, heads, seq, head_dim) inside
/// attention; `cos`/`sin` are the RoPE tables, (seq, head_dim) in the compute dtype.
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
}

impl HeadLayout {
    /// The layout of `cfg`'s heads for `batch` x `seq` tokens with RoPE tables `cos`, `sin`.
    pub(crate) fn new(
        cfg: &ModelConfig,
        batch: usize,
        seq: usize,
        cos: Tensor,
        sin: Tensor,
    ) -> Self {
        Self {
            batch,
            seq,
            q_heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            cos,
            sin,
        }
    }

    /// (b*t, n*d) -> (b, n, t, d), contiguous.
    fn heads(&self, y: Tensor, n: usize) -> Result<Tensor> {
        y.reshape((self.batch, self.seq, n, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// (b, n, t, d) -> (b*t, n*d).
    fn flat(&self, y: Tensor, n: usize) -> Result<Tensor> {
        y.transpose(1, 2)?
            .reshape((self.batch * self.seq, n * self.head_dim))
    }
}

/// The intermediates of a detached forward of one layer, kept for [`DecoderLayer::backward`].
/// Tensors are (b*t, features) or (b, heads, t, head_dim) in the compute dtype.
pub(crate) struct LayerSaved {
    /// Attention's input and intermediates.
    attn: AttentionSaved,
    /// `x + attention(input_norm(x))`, the input of `post_norm`.
    x1: Tensor,
    /// The MLP's input and intermediates.
    mlp: MlpSaved,
}

/// Attention's intermediates.
struct AttentionSaved {
    /// `input_norm(x)`, the input of q, k and v.
    h: Tensor,
    /// Queries and keys after RoPE, values; (b, heads, t, d).
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// Attention output as (b*t, q_heads*d), the input of o.
    a: Tensor,
    /// Each projection's op with the dropout seed its forward drew.
    ops: AttentionOps,
}

/// The MLP's intermediates.
struct MlpSaved {
    /// `post_norm(x1)`, the input of gate and up.
    h: Tensor,
    /// `gate(h)`, `up(h)` and `swiglu(gate, up)` (the input of down).
    gate: Tensor,
    up: Tensor,
    act: Tensor,
    /// Each projection's op with the dropout seed its forward drew.
    ops: MlpOps,
}

/// The adapted projections of attention as ops with fixed dropout seeds (None: no adapter, or
/// a [`Pass::Graph`] forward, which keeps none).
struct AttentionOps {
    q: Option<LoraProjection>,
    k: Option<LoraProjection>,
    v: Option<LoraProjection>,
    o: Option<LoraProjection>,
}

/// As [`AttentionOps`], for the MLP.
struct MlpOps {
    gate: Option<LoraProjection>,
    up: Option<LoraProjection>,
    down: Option<LoraProjection>,
}

/// `y = lin(h)` for `h` (tokens, in) under `pass`, with the op and dropout seed it used when
/// detached. Dropout draws one seed from `rng` per adapted projection, in the order the layer
/// runs them (q, k, v, o, gate, up, down), in either pass.
fn project(
    lin: &LoraLinear,
    h: &Tensor,
    rng: Option<&DropoutRng>,
    pass: Pass,
) -> Result<(Tensor, Option<LoraProjection>)> {
    match pass {
        Pass::Graph => Ok((lin.forward_with(h, rng, false)?, None)),
        Pass::Detached => {
            let op = lin.fixed(rng)?;
            let y = match (&op, &lin.adapter) {
                (Some(op), Some(ad)) => {
                    op.forward_untracked(h, ad.a.as_tensor(), ad.b.as_tensor())?
                }
                _ => lin.base.plain(h)?,
            };
            Ok((y, op))
        }
    }
}

/// Input gradient of `lin` at input `x` for output gradient `dy` (both untracked), with `op`
/// the projection as run in the forward; the adapter's `dA`, `dB` (f32) go to `grads`.
fn project_backward(
    lin: &LoraLinear,
    op: &Option<LoraProjection>,
    x: &Tensor,
    dy: &Tensor,
    grads: &mut dyn FnMut(TensorId, Tensor) -> Result<()>,
) -> Result<Tensor> {
    match (op, &lin.adapter) {
        (Some(op), Some(ad)) => {
            let (at, bt) = (ad.a.as_tensor(), ad.b.as_tensor());
            let (dx, da, db) = profiler::section("lora-projection", "bwd", x.device(), || {
                op.backward(x, at, bt, dy)
            })?;
            if let Some(da) = da {
                grads(at.id(), da)?;
            }
            if let Some(db) = db {
                grads(bt.id(), db)?;
            }
            dx.ok_or_else(|| candle_core::Error::Msg("projection gave no dx".into()))
        }
        _ => lin
            .base
            .input_grad(x, dy)?
            .ok_or_else(|| candle_core::Error::Msg("projection gave no input gradient".into())),
    }
}

/// Input gradient of RMSNorm `n` at `x` for output gradient `g`.
fn norm_backward(n: &RmsNorm, x: &Tensor, g: &Tensor) -> Result<Tensor> {
    let g = profiler::section("rms-norm", "bwd", x.device(), || n.input_grad(x, g))?;
    g.ok_or_else(|| candle_core::Error::Msg("rms-norm gave no input gradient".into()))
}

impl Attention {
    /// `o(attention(rope(q(h)), rope(k(h)), v(h)))` for `h` (b*t, hidden): (b*t, hidden), with
    /// the intermediates.
    fn forward(
        &self,
        h: &Tensor,
        s: &HeadLayout,
        rng: Option<&DropoutRng>,
        pass: Pass,
    ) -> Result<(Tensor, AttentionSaved)> {
        let (q, q_op) = project(&self.q, h, rng, pass)?;
        let (k, k_op) = project(&self.k, h, rng, pass)?;
        let (v, v_op) = project(&self.v, h, rng, pass)?;
        let q = apply_rope(&s.heads(q, s.q_heads)?, &s.cos, &s.sin)?;
        let k = apply_rope(&s.heads(k, s.kv_heads)?, &s.cos, &s.sin)?;
        let v = s.heads(v, s.kv_heads)?;
        let a = s.flat(causal_attention(&q, &k, &v)?, s.q_heads)?;
        let (y, o_op) = project(&self.o, &a, rng, pass)?;
        let ops = AttentionOps {
            q: q_op,
            k: k_op,
            v: v_op,
            o: o_op,
        };
        let saved = AttentionSaved {
            h: h.clone(),
            q,
            k,
            v,
            a,
            ops,
        };
        Ok((y, saved))
    }

    /// Gradient of attention's input `h` for the output gradient `dy` (b*t, hidden); adapter
    /// gradients go to `grads`. Consumes the intermediates, freeing each when done.
    fn backward(
        &self,
        saved: AttentionSaved,
        s: &HeadLayout,
        dy: &Tensor,
        grads: &mut dyn FnMut(TensorId, Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        let AttentionSaved { h, q, k, v, a, ops } = saved;
        let da = s.heads(project_backward(&self.o, &ops.o, &a, dy, grads)?, s.q_heads)?;
        drop(a);
        let (dq, dk, dv) = causal_attention_backward(&q, &k, &v, &da)?;
        drop((q, k, v, da));
        let dq = s.flat(rope_backward(&dq, &s.cos, &s.sin)?, s.q_heads)?;
        let dk = s.flat(rope_backward(&dk, &s.cos, &s.sin)?, s.kv_heads)?;
        let dv = s.flat(dv, s.kv_heads)?;
        let dh = ((project_backward(&self.q, &ops.q, &h, &dq, grads)?
            + project_backward(&self.k, &ops.k, &h, &dk, grads)?)?
            + project_backward(&self.v, &ops.v, &h, &dv, grads)?)?;
        Ok(dh)
    }
}

impl Mlp {
    /// `swiglu(gate(h), up(h))` for `h` (b*t, hidden): the input of `down`, (b*t,
    /// intermediate), with the intermediates (`ops.down` not yet drawn).
    fn gated(&self, h: &Tensor, rng: Option<&DropoutRng>, pass: Pass) -> Result<MlpSaved> {
        let (gate, gate_op) = project(&self.gate, h, rng, pass)?;
        let (up, up_op) = project(&self.up, h, rng, pass)?;
        let act = swiglu(&gate, &up)?;
        let ops = MlpOps {
            gate: gate_op,
            up: up_op,
            down: None,
        };
        Ok(MlpSaved {
            h: h.clone(),
            gate,
            up,
            act,
            ops,
        })
    }

    /// Gradient of the MLP's input `h` for the output gradient `dy` (b*t, hidden); adapter
    /// gradients go to `grads`. Consumes the intermediates, freeing each when done.
    fn backward(
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
            ops,
        } = saved;
        let dact = project_backward(&self.down, &ops.down, &act, dy, grads)?;
        drop(act);
        let (dgate, dup) = swiglu_backward(&gate, &up, &dact)?;
        drop((gate, up, dact));
        let dh = (project_backward(&self.gate, &ops.gate, &h, &dgate, grads)?
            + project_backward(&self.up, &ops.up, &h, &dup, grads)?)?;
        Ok(dh)
    }
}

impl DecoderLayer {
    /// Load layer `index` (`model.layers.{index}.*` through `get(name, shape)`), quantising
    /// the seven projections when `quant` is [`Quant::Nf4`], and create adapters (A from
    /// `rng`, in q, k, v, o, gate, up, down order) on those in `lora.targets`.
    ///
    /// Errors: from `get` (missing or mis-shaped weights), quantisation or adapter creation.
    pub(crate) fn load<G>(
        cfg: &ModelConfig,
        lora: &LoraConfig,
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
        let norm = |name: String| -> std::result::Result<RmsNorm, EngineError> {
            Ok(RmsNorm::new(get(&name, &[h])?, cfg.rms_norm_eps))
        };
        let mut proj = |t: LoraTarget| -> std::result::Result<LoraLinear, EngineError> {
            let (o, n) = cfg.projection_shape(t);
            let w = get(&names.weight(t), &[o, n])?;
            let b = if cfg.projection_has_bias(t) {
                Some(get(&names.bias(t), &[o])?)
            } else {
                None
            };
            let adapter = if lora.targets.contains(&t) {
                Some(
                    new_adapter(names.adapter(t), o, n, lora, rng, device)
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
        let input_norm = norm(names.input_norm())?;
        let attn = Attention {
            q: proj(LoraTarget::Q)?,
            k: proj(LoraTarget::K)?,
            v: proj(LoraTarget::V)?,
            o: proj(LoraTarget::O)?,
        };
        let mlp = Mlp {
            gate: proj(LoraTarget::Gate)?,
            up: proj(LoraTarget::Up)?,
            down: proj(LoraTarget::Down)?,
        };
        let post_norm = norm(names.post_norm())?;
        Ok(Self {
            input_norm,
            attn,
            post_norm,
            mlp,
        })
    }

    /// The seven projections with their targets, in [`LoraTarget::ALL`] order.
    pub(crate) fn projections(&self) -> [(LoraTarget, &LoraLinear); 7] {
        let (a, m) = (&self.attn, &self.mlp);
        [
            (LoraTarget::Q, &a.q),
            (LoraTarget::K, &a.k),
            (LoraTarget::V, &a.v),
            (LoraTarget::O, &a.o),
            (LoraTarget::Gate, &m.gate),
            (LoraTarget::Up, &m.up),
            (LoraTarget::Down, &m.down),
        ]
    }

    /// The dataflow up to the MLP's down projection, shared by every pass: everything but
    /// `ops.down` and the output `x1 + down(mlp.act)`.
    fn trunk(
        &self,
        x: &Tensor,
        s: &HeadLayout,
        rng: Option<&DropoutRng>,
        pass: Pass,
    ) -> Result<LayerSaved> {
        let h1 = self.input_norm.forward(x)?;
        let (attn_out, attn) = self.attn.forward(&h1, s, rng, pass)?;
        let x1 = (x + attn_out)?;
        let h2 = self.post_norm.forward(&x1)?;
        let mlp = self.mlp.gated(&h2, rng, pass)?;
        Ok(LayerSaved { attn, x1, mlp })
    }

    /// The layer's output for `x` (b*t, hidden) in the compute dtype: (b*t, hidden). `rng`
    /// enables LoRA dropout (one seed drawn per adapted projection).
    ///
    /// Errors: shape, dtype or device errors (including out of memory).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        s: &HeadLayout,
        rng: Option<&DropoutRng>,
        pass: Pass,
    ) -> Result<Tensor> {
        let t = self.trunk(x, s, rng, pass)?;
        let (m, _) = project(&self.mlp.down, &t.mlp.act, rng, pass)?;
        &t.x1 + m
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
        saved.mlp.ops.down = self.mlp.down.fixed(rng)?;
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
        let LayerSaved { attn, x1, mlp } = saved;
        let dout = dout.contiguous()?;
        // out = x1 + mlp(post_norm(x1))
        let dh2 = self.mlp.backward(mlp, &dout, grads)?;
        let dx1 = (&dout + norm_backward(&self.post_norm, &x1, &dh2)?)?;
        drop((x1, dh2, dout));
        // x1 = x + attention(input_norm(x))
        let dh1 = self.attn.backward(attn, s, &dx1, grads)?;
        dx1 + norm_backward(&self.input_norm, x, &dh1)?
    }
}
