//! Self-attention of one decoder layer: q/k/v projections (separate, or Phi-3's fused
//! `qkv_proj` whose output rows are q, then k, then v), optional per-head q/k RMSNorm before
//! RoPE (Qwen3; Gemma 3 in its `(1 + w)` form), RoPE, causal GQA attention
//! ([`crate::engine::ops::causal_attention`] with the layer's [`AttentionSpec`]), `o_proj`.

use super::layer::{HeadLayout, Pass, norm_backward, project, project_backward};
use crate::engine::lora::{DropoutRng, LoraLinear, LoraProjection};
use crate::engine::ops::rope_backward;
use crate::engine::ops::{RmsNorm, apply_rope, causal_attention, causal_attention_backward};
use candle_core::{Result, Tensor, TensorId};

/// The q/k/v projections as the checkpoint stores them.
pub(crate) enum Qkv {
    /// `q_proj` (q_heads * d, hidden), `k_proj`, `v_proj` (kv_heads * d, hidden).
    Split {
        q: LoraLinear,
        k: LoraLinear,
        v: LoraLinear,
    },
    /// Phi-3 `qkv_proj` ((q_heads + 2 kv_heads) * d, hidden), one adapter for all three.
    Fused(LoraLinear),
}

/// Self-attention's modules.
pub(crate) struct Attention {
    /// q, k, v.
    pub qkv: Qkv,
    /// `o_proj` (hidden, q_heads * d); bias when the config says so.
    pub o: LoraLinear,
    /// Per-head norms over head_dim applied to q and k before RoPE.
    pub qk_norm: Option<(RmsNorm, RmsNorm)>,
}

/// Attention's intermediates for the hand-written backward.
pub(crate) struct AttentionSaved {
    /// The input of q, k and v, (b*t, hidden).
    h: Tensor,
    /// q and k before their norms, (b, heads, t, d) (only with q/k norms).
    pre_norm: Option<(Tensor, Tensor)>,
    /// Queries and keys after RoPE, values; (b, heads, t, d).
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// Attention output as (b*t, q_heads*d), the input of o.
    a: Tensor,
    /// The q/k/v projections' ops (3 split, 1 fused) and o's, with their dropout seeds.
    qkv_ops: Vec<Option<LoraProjection>>,
    o_op: Option<LoraProjection>,
}

impl Attention {
    /// `(q, k, v)` as (b*t, features) each, with the projections' ops.
    fn project_qkv(
        &self,
        h: &Tensor,
        s: &HeadLayout,
        rng: Option<&DropoutRng>,
        pass: Pass,
    ) -> Result<(Tensor, Tensor, Tensor, Vec<Option<LoraProjection>>)> {
        match &self.qkv {
            Qkv::Split { q, k, v } => {
                let (q, q_op) = project(q, h, rng, pass)?;
                let (k, k_op) = project(k, h, rng, pass)?;
                let (v, v_op) = project(v, h, rng, pass)?;
                Ok((q, k, v, vec![q_op, k_op, v_op]))
            }
            Qkv::Fused(lin) => {
                let (y, op) = project(lin, h, rng, pass)?;
                let (qd, kvd) = (s.q_heads * s.head_dim, s.kv_heads * s.head_dim);
                let q = y.narrow(1, 0, qd)?.contiguous()?;
                let k = y.narrow(1, qd, kvd)?.contiguous()?;
                let v = y.narrow(1, qd + kvd, kvd)?.contiguous()?;
                Ok((q, k, v, vec![op]))
            }
        }
    }

    /// `o(attention(rope(norm(q(h))), rope(norm(k(h))), v(h)))` for `h` (b*t, hidden):
    /// (b*t, hidden), with the intermediates.
    pub(crate) fn forward(
        &self,
        h: &Tensor,
        s: &HeadLayout,
        rng: Option<&DropoutRng>,
        pass: Pass,
    ) -> Result<(Tensor, AttentionSaved)> {
        let (q, k, v, qkv_ops) = self.project_qkv(h, s, rng, pass)?;
        let (q, k) = (s.heads(q, s.q_heads)?, s.heads(k, s.kv_heads)?);
        let (q, k, pre_norm) = match &self.qk_norm {
            Some((qn, kn)) => {
                let (qq, kk) = (qn.forward(&q)?, kn.forward(&k)?);
                (qq, kk, Some((q, k)))
            }
            None => (q, k, None),
        };
        let q = apply_rope(&q, &s.cos, &s.sin)?;
        let k = apply_rope(&k, &s.cos, &s.sin)?;
        let v = s.heads(v, s.kv_heads)?;
        let a = s.flat(causal_attention(&q, &k, &v, s.spec)?, s.q_heads)?;
        let (y, o_op) = project(&self.o, &a, rng, pass)?;
        let saved = AttentionSaved {
            h: h.clone(),
            pre_norm,
            q,
            k,
            v,
            a,
            qkv_ops,
            o_op,
        };
        Ok((y, saved))
    }

    /// Gradient of attention's input `h` for the output gradient `dy` (b*t, hidden); adapter
    /// gradients go to `grads`. Consumes the intermediates, freeing each when done.
    pub(crate) fn backward(
        &self,
        saved: AttentionSaved,
        s: &HeadLayout,
        dy: &Tensor,
        grads: &mut dyn FnMut(TensorId, Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        let AttentionSaved {
            h,
            pre_norm,
            q,
            k,
            v,
            a,
            qkv_ops,
            o_op,
        } = saved;
        let da = s.heads(project_backward(&self.o, &o_op, &a, dy, grads)?, s.q_heads)?;
        drop(a);
        let (dq, dk, dv) = causal_attention_backward(&q, &k, &v, &da, s.spec)?;
        drop((q, k, v, da));
        let mut dq = rope_backward(&dq, &s.cos, &s.sin)?;
        let mut dk = rope_backward(&dk, &s.cos, &s.sin)?;
        if let (Some((qn, kn)), Some((q0, k0))) = (&self.qk_norm, pre_norm) {
            dq = norm_backward(qn, &q0, &dq)?;
            dk = norm_backward(kn, &k0, &dk)?;
        }
        let dq = s.flat(dq, s.q_heads)?;
        let dk = s.flat(dk, s.kv_heads)?;
        let dv = s.flat(dv, s.kv_heads)?;
        match &self.qkv {
            Qkv::Split { q, k, v } => {
                let op = |i: usize| qkv_ops.get(i).cloned().flatten();
                let dh = (project_backward(q, &op(0), &h, &dq, grads)?
                    + project_backward(k, &op(1), &h, &dk, grads)?)?;
                dh + project_backward(v, &op(2), &h, &dv, grads)?
            }
            Qkv::Fused(lin) => {
                let dy = Tensor::cat(&[dq, dk, dv], 1)?;
                let op = qkv_ops.into_iter().next().flatten();
                project_backward(lin, &op, &h, &dy, grads)
            }
        }
    }
}
