//! Decoder-only transformer covering Hugging Face `Qwen2ForCausalLM` and `LlamaForCausalLM`:
//! token embedding, `num_hidden_layers` x (RMSNorm -> GQA self-attention with RoPE ->
//! residual -> RMSNorm -> SwiGLU MLP -> residual), final RMSNorm, `lm_head` (tied or separate).
//!
//! Written here rather than taken from candle-transformers because that model cannot take LoRA
//! (private fields) and its fused RoPE/softmax/RMSNorm record no backward, so gradients stop
//! silently. Every op here is differentiable with respect to the LoRA weights (checked against
//! finite differences in the tests), and no gradient is computed for base weights.
//!
//! Options: target projections may be stored as NF4 ([`Quant::Nf4`], QLoRA), and decoder
//! layers may be checkpointed ([`Model::set_grad_checkpointing`]): only each layer's input is
//! kept, and the layer is recomputed in backward. Gradients must then be taken with
//! [`Model::backward`], which merges the adapter gradients found during recomputation.

use super::attention::{causal_attention, causal_attention_backward};
use super::config::ModelConfig;
use super::lora::{
    BaseLinear, DropoutRng, LoraAdapter, LoraConfig, LoraLinear, LoraProjection, new_adapter,
};
use super::loss::ChunkedCrossEntropy;
use super::nf4::{Nf4Linear, Nf4Weight};
use super::ops::{
    FrozenLinear, InputGradCustomOp, InputGradOp, RmsNorm, apply_rope, rope_backward, rope_tables,
};
use super::weights::WeightSource;
use super::{CandleContext, EngineError};
use crate::spec::{LoraTarget, Quant};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// One decoder layer.
pub struct DecoderLayer {
    input_norm: RmsNorm,
    post_norm: RmsNorm,
    /// Projections in [`LoraTarget::ALL`] order: q, k, v, o, gate, up, down.
    proj: Vec<LoraLinear>,
}

/// The model: frozen base weights in the compute dtype plus f32 LoRA adapters.
pub struct Model {
    cfg: ModelConfig,
    lora: LoraConfig,
    embed: Tensor,
    layers: Vec<Arc<DecoderLayer>>,
    norm: RmsNorm,
    lm_head: Tensor,
    dtype: DType,
    device: Device,
    dropout_rng: Arc<DropoutRng>,
    quant: Quant,
    grad_checkpointing: bool,
    stash: Arc<GradStash>,
}

/// Adapter gradients computed while recomputing checkpointed layers in backward, keyed by the
/// adapter variable's id, waiting to be merged into the main [`GradStore`].
#[derive(Default)]
struct GradStash(Mutex<HashMap<candle_core::TensorId, Tensor>>);

impl GradStash {
    /// Add `g` to the gradient stashed for `id`. `g` is detached first: a gradient that still
    /// carried its graph would keep every saved intermediate of the layer alive for as long as
    /// the gradient (or an optimizer moment built from it) lives.
    fn add(&self, id: candle_core::TensorId, g: Tensor) -> Result<()> {
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

    fn take(&self, id: candle_core::TensorId) -> Option<Tensor> {
        self.0.lock().ok()?.remove(&id)
    }

    fn clear(&self) {
        if let Ok(mut m) = self.0.lock() {
            m.clear();
        }
    }
}

/// Parameter counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ParamCounts {
    /// Base parameters plus adapter parameters.
    pub total: usize,
    /// Adapter parameters (the only trainable ones).
    pub trainable: usize,
}

impl Model {
    /// Build the model: load (or synthesise) base weights in `dtype` on `device`, create LoRA
    /// adapters (seeded by `seed`) on every projection in `lora.targets`. Same as
    /// [`Model::new_quantized`] with [`Quant::None`].
    ///
    /// Errors: missing/mis-shaped weights ([`EngineError::Weights`]), out of memory.
    pub fn new(
        cfg: &ModelConfig,
        lora: &LoraConfig,
        weights: &WeightSource,
        dtype: DType,
        device: &Device,
        seed: u64,
    ) -> std::result::Result<Self, EngineError> {
        Self::new_quantized(cfg, lora, weights, dtype, device, seed, Quant::None)
    }

    /// As [`Model::new`], with the seven projections of every decoder layer quantised at load
    /// when `quant` is [`Quant::Nf4`] (each weight is loaded in `dtype`, quantised, and the
    /// dense copy dropped); embeddings, norms, biases and `lm_head` stay in `dtype`.
    ///
    /// Errors: as [`Model::new`].
    pub fn new_quantized(
        cfg: &ModelConfig,
        lora: &LoraConfig,
        weights: &WeightSource,
        dtype: DType,
        device: &Device,
        seed: u64,
        quant: Quant,
    ) -> std::result::Result<Self, EngineError> {
        if lora.rank == 0 {
            return Err(EngineError::Invalid(
                "--lora-rank must be at least 1".into(),
            ));
        }
        if !(0.0..1.0).contains(&lora.dropout) {
            return Err(EngineError::Invalid(format!(
                "--lora-dropout {} must be in [0, 1)",
                lora.dropout
            )));
        }
        if !device.is_cpu() {
            // Seeds the device RNG used for LoRA dropout masks (and synthetic weights, which
            // reseed per tensor) so GPU runs are repeatable for a given --seed.
            device.set_seed(seed).ctx("seeding the device RNG")?;
        }
        let get = |name: &str, shape: &[usize]| weights.get(name, shape, cfg, dtype, device);
        let h = cfg.hidden_size;
        let embed = get("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let input_norm = RmsNorm::new(
                get(&format!("{p}.input_layernorm.weight"), &[h])?,
                cfg.rms_norm_eps,
            );
            let mut proj = Vec::with_capacity(7);
            for t in LoraTarget::ALL {
                let (o, n) = cfg.projection_shape(t);
                let w = get(&format!("{p}.{}.weight", t.module_path()), &[o, n])?;
                let b = if cfg.attention_bias
                    && matches!(t, LoraTarget::Q | LoraTarget::K | LoraTarget::V)
                {
                    Some(get(&format!("{p}.{}.bias", t.module_path()), &[o])?)
                } else {
                    None
                };
                let adapter = if lora.targets.contains(&t) {
                    Some(
                        new_adapter(
                            format!("base_model.model.{p}.{}", t.module_path()),
                            o,
                            n,
                            lora,
                            &mut rng,
                            device,
                        )
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
                proj.push(LoraLinear { base, adapter });
            }
            let post_norm = RmsNorm::new(
                get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                cfg.rms_norm_eps,
            );
            layers.push(Arc::new(DecoderLayer {
                input_norm,
                post_norm,
                proj,
            }));
        }
        let norm = RmsNorm::new(get("model.norm.weight", &[h])?, cfg.rms_norm_eps);
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            get("lm_head.weight", &[cfg.vocab_size, h])?
        };
        Ok(Self {
            cfg: cfg.clone(),
            lora: lora.clone(),
            embed,
            layers,
            norm,
            lm_head,
            dtype,
            device: device.clone(),
            dropout_rng: Arc::new(DropoutRng::new(seed)),
            quant,
            grad_checkpointing: false,
            stash: Arc::new(GradStash::default()),
        })
    }

    /// Base-weight quantisation in use.
    pub fn quant(&self) -> Quant {
        self.quant
    }

    /// Turn gradient checkpointing of decoder layers on or off.
    pub fn set_grad_checkpointing(&mut self, on: bool) {
        self.grad_checkpointing = on;
    }

    /// Whether decoder layers are checkpointed.
    pub fn grad_checkpointing(&self) -> bool {
        self.grad_checkpointing
    }

    /// Backward from a scalar `loss` built by this model: `loss.backward()` plus the adapter
    /// gradients computed while recomputing checkpointed layers. Use this rather than
    /// `loss.backward()` whenever checkpointing may be on.
    ///
    /// Errors: from candle's backward pass (including out of memory).
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        self.stash.clear();
        let mut grads = loss.backward()?;
        for var in self.trainable_vars() {
            if let Some(g) = self.stash.take(var.as_tensor().id()) {
                let g = match grads.remove(var.as_tensor()) {
                    Some(prev) => (prev + g)?,
                    None => g,
                };
                grads.insert(var.as_tensor(), g);
            }
        }
        self.stash.clear();
        Ok(grads)
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The LoRA configuration.
    pub fn lora_config(&self) -> &LoraConfig {
        &self.lora
    }

    /// Compute dtype of the base weights and activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// All adapters, layer by layer in [`LoraTarget::ALL`] order.
    pub fn adapters(&self) -> Vec<&LoraAdapter> {
        self.layers
            .iter()
            .flat_map(|l| l.proj.iter().filter_map(|p| p.adapter.as_ref()))
            .collect()
    }

    /// Trainable variables (A then B of each adapter), f32.
    pub fn trainable_vars(&self) -> Vec<Var> {
        self.adapters()
            .into_iter()
            .flat_map(|a| [a.a.clone(), a.b.clone()])
            .collect()
    }

    /// Parameter counts: base (from the real shape) plus adapters.
    pub fn param_counts(&self) -> ParamCounts {
        let trainable: usize = self
            .trainable_vars()
            .iter()
            .map(|v| v.as_tensor().elem_count())
            .sum();
        ParamCounts {
            total: self.cfg.num_parameters() + trainable,
            trainable,
        }
    }

    /// Bytes held by base weights (embedding counted once when tied): dense tensors at their
    /// dtype's size, NF4 projections as packed codes plus statistics.
    pub fn base_weight_bytes(&self) -> usize {
        let size = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let mut n = size(&self.embed) + size(self.norm.weight());
        if !self.cfg.tie_word_embeddings {
            n += size(&self.lm_head);
        }
        for l in &self.layers {
            n += size(l.input_norm.weight()) + size(l.post_norm.weight());
            n += l.proj.iter().map(|p| p.base.bytes()).sum::<usize>();
        }
        n
    }

    /// Named base tensors as HF names (for checkpoint round trips). NF4 projections are
    /// returned dequantised in the compute dtype.
    ///
    /// Errors: a device error while dequantising.
    pub fn base_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut v = vec![("model.embed_tokens.weight".to_string(), self.embed.clone())];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            v.push((
                format!("{p}.input_layernorm.weight"),
                l.input_norm.weight().clone(),
            ));
            for (t, lin) in LoraTarget::ALL.iter().zip(&l.proj) {
                v.push((
                    format!("{p}.{}.weight", t.module_path()),
                    lin.base.weight(self.dtype)?,
                ));
                if let Some(b) = lin.base.bias() {
                    v.push((format!("{p}.{}.bias", t.module_path()), b.clone()));
                }
            }
            v.push((
                format!("{p}.post_attention_layernorm.weight"),
                l.post_norm.weight().clone(),
            ));
        }
        v.push(("model.norm.weight".to_string(), self.norm.weight().clone()));
        if !self.cfg.tie_word_embeddings {
            v.push(("lm_head.weight".to_string(), self.lm_head.clone()));
        }
        Ok(v)
    }

    /// Final hidden states (after the last RMSNorm) for `input_ids` (batch x seq, row-major),
    /// returned as (batch*seq, hidden) in the compute dtype. `train` enables LoRA dropout.
    pub fn hidden_states(
        &self,
        input_ids: &[u32],
        batch: usize,
        seq: usize,
        train: bool,
    ) -> Result<Tensor> {
        let ids = Tensor::from_slice(input_ids, batch * seq, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        let (cos, sin) = rope_tables(seq, self.cfg.head_dim, self.cfg.rope_theta, &self.device)?;
        let (cos, sin) = (cos.to_dtype(self.dtype)?, sin.to_dtype(self.dtype)?);
        let rng = train.then_some(&*self.dropout_rng);
        if self.grad_checkpointing && !self.adapters().is_empty() {
            // The op needs a tracked input to be recorded; the embedding output is not.
            if !x.track_op() {
                x = Var::from_tensor(&x)?.as_tensor().clone();
            }
            for layer in &self.layers {
                let snapshot = match rng {
                    Some(r) => Some(
                        r.0.lock()
                            .map_err(|_| candle_core::Error::Msg("rng poisoned".into()))?
                            .clone(),
                    ),
                    None => None,
                };
                let op = LayerCheckpoint {
                    ctx: LayerCtx {
                        cfg: self.cfg.clone(),
                        layer: layer.clone(),
                        batch,
                        seq,
                        cos: cos.clone(),
                        sin: sin.clone(),
                    },
                    rng: train.then(|| self.dropout_rng.clone()),
                    snapshot,
                    stash: self.stash.clone(),
                };
                x = x.contiguous()?.apply_op1(InputGradCustomOp(op))?;
                super::prof::trace("after ckpt layer fwd", &self.device);
            }
        } else {
            for layer in &self.layers {
                x = layer_forward(&self.cfg, layer, &x, batch, seq, &cos, &sin, rng, false)?;
                super::prof::trace("after layer fwd", &self.device);
            }
        }
        self.norm.forward(&x)
    }

    /// Logits (batch*seq, vocab) in f32. Materialises the full matrix: for tests and small
    /// models only (training uses [`Model::loss`]).
    pub fn logits(&self, input_ids: &[u32], batch: usize, seq: usize) -> Result<Tensor> {
        let h = self.hidden_states(input_ids, batch, seq, false)?;
        h.matmul(&self.lm_head.t()?)?.to_dtype(DType::F32)
    }

    /// Mean causal-LM cross-entropy (scalar f32) over `targets` (batch*seq, pre-shifted, -100
    /// ignored), computed in chunks without materialising all logits.
    pub fn loss(
        &self,
        input_ids: &[u32],
        targets: &[i64],
        batch: usize,
        seq: usize,
        train: bool,
    ) -> Result<Tensor> {
        let h = self.hidden_states(input_ids, batch, seq, train)?;
        ChunkedCrossEntropy::new(&self.lm_head, targets, &self.device)?.forward(&h)
    }
}

/// One decoder layer: `x + attn(norm(x))`, then `+ mlp(norm(.))`. `x`: (b*t, hidden).
/// `detach` makes adapter weights constants (untracked first pass of checkpointing).
#[allow(clippy::too_many_arguments)]
fn layer_forward(
    c: &ModelConfig,
    l: &DecoderLayer,
    x: &Tensor,
    b: usize,
    t: usize,
    cos: &Tensor,
    sin: &Tensor,
    rng: Option<&DropoutRng>,
    detach: bool,
) -> Result<Tensor> {
    let (qh, kvh, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
    let proj = |i: usize, h: &Tensor| l.proj[i].forward_with(h, rng, detach);
    let h = l.input_norm.forward(x)?;
    let heads = |y: Tensor, n: usize| -> Result<Tensor> {
        y.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()
    };
    let q = heads(proj(0, &h)?, qh)?;
    let k = heads(proj(1, &h)?, kvh)?;
    let v = heads(proj(2, &h)?, kvh)?;
    let q = apply_rope(&q, cos, sin)?;
    let k = apply_rope(&k, cos, sin)?;
    let a = causal_attention(&q, &k, &v)?;
    let a = a.transpose(1, 2)?.reshape((b * t, qh * d))?;
    let x = (x + proj(3, &a)?)?;
    let h = l.post_norm.forward(&x)?;
    let gate = proj(4, &h)?;
    let up = proj(5, &h)?;
    let m = proj(6, &super::swiglu::swiglu(&gate, &up)?)?;
    x + m
}

/// What a checkpointed layer needs to run again.
struct LayerCtx {
    cfg: ModelConfig,
    layer: Arc<DecoderLayer>,
    batch: usize,
    seq: usize,
    cos: Tensor,
    sin: Tensor,
}

/// Gradient checkpointing of one decoder layer as a custom op over the layer input
/// (`torch.utils.checkpoint` semantics): forward runs the layer without recording a graph
/// (adapters detached), so only the input stays alive for backward; backward runs the layer
/// again keeping its intermediates ([`LayerSaved`]), back-propagates the incoming gradient
/// through them by hand, returns the input gradient and stashes the adapter gradients for
/// [`Model::backward`]. Dropout masks are reproduced from a snapshot of the generator taken
/// before the forward pass.
struct LayerCheckpoint {
    ctx: LayerCtx,
    rng: Option<Arc<DropoutRng>>,
    snapshot: Option<ChaCha8Rng>,
    stash: Arc<GradStash>,
}

impl LayerCheckpoint {
    fn run(&self, x: &Tensor) -> Result<Tensor> {
        let c = &self.ctx;
        layer_forward(
            &c.cfg,
            &c.layer,
            x,
            c.batch,
            c.seq,
            &c.cos,
            &c.sin,
            self.rng.as_deref(),
            true,
        )
    }
}

impl InputGradOp for LayerCheckpoint {
    const NAME: &'static str = "checkpointed-decoder-layer";
    fn plain(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x)
    }
    fn input_grad(&self, x: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let c = &self.ctx;
        super::prof::note_used("max at ckpt-layer bwd start", x.device());
        let rng = self.snapshot.clone().map(|s| DropoutRng(Mutex::new(s)));
        let x = x.detach();
        let saved = super::prof::section("ckpt-layer", "recompute", x.device(), || {
            LayerSaved::forward(c, &x, rng.as_ref())
        })?;
        super::prof::note_used("max after ckpt recompute", x.device());
        let dx = super::prof::section("ckpt-layer", "inner-backward", x.device(), || {
            saved.backward(c, &x, &grad.detach(), &self.stash)
        })?;
        super::prof::note_used("max after ckpt inner bwd", x.device());
        Ok(Some(dx))
    }
}

/// A decoder layer's forward intermediates, kept for its hand-written backward (gradient
/// checkpointing recomputes them per layer). Same arithmetic as [`layer_forward`]; the backward
/// chains each op's own gradient ([`LoraProjection::backward`], [`RmsNorm`]'s input gradient,
/// the attention, RoPE and SwiGLU backwards), so no candle graph is built and no gradient
/// passes through candle's per-node zero-fill and accumulate. Tensors are (b*t, features) or
/// (b, heads, t, head_dim) in the compute dtype.
struct LayerSaved {
    /// Each projection's op with its dropout seed (None: no adapter), q k v o gate up down.
    ops: Vec<Option<LoraProjection>>,
    /// input_norm(x)
    h1: Tensor,
    /// Queries and keys after RoPE, values; (b, heads, t, d).
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// Attention output as (b*t, q_heads*d), the input of o_proj.
    a: Tensor,
    /// x + o_proj(a)
    x1: Tensor,
    /// post_norm(x1)
    h2: Tensor,
    /// gate_proj(h2), up_proj(h2), swiglu(gate, up)
    gate: Tensor,
    up: Tensor,
    act: Tensor,
}

impl LayerSaved {
    /// The layer on untracked `x`, dropout masks drawn from `rng` in projection order (as
    /// [`layer_forward`] draws them). Returns the intermediates; the output is not needed.
    fn forward(c: &LayerCtx, x: &Tensor, rng: Option<&DropoutRng>) -> Result<Self> {
        let (l, cfg) = (&c.layer, &c.cfg);
        let (b, t) = (c.batch, c.seq);
        let (qh, kvh, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let ops = l
            .proj
            .iter()
            .map(|p| p.fixed(rng))
            .collect::<Result<Vec<_>>>()?;
        let proj = |i: usize, h: &Tensor| -> Result<Tensor> {
            match (&ops[i], &l.proj[i].adapter) {
                (Some(op), Some(ad)) => op.forward_untracked(h, ad.a.as_tensor(), ad.b.as_tensor()),
                _ => l.proj[i].base.plain(h),
            }
        };
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            y.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()
        };
        let h1 = l.input_norm.plain(x)?;
        let q = apply_rope(&heads(proj(0, &h1)?, qh)?, &c.cos, &c.sin)?;
        let k = apply_rope(&heads(proj(1, &h1)?, kvh)?, &c.cos, &c.sin)?;
        let v = heads(proj(2, &h1)?, kvh)?;
        let a = causal_attention(&q, &k, &v)?
            .transpose(1, 2)?
            .reshape((b * t, qh * d))?;
        let x1 = (x + proj(3, &a)?)?;
        let h2 = l.post_norm.plain(&x1)?;
        let gate = proj(4, &h2)?;
        let up = proj(5, &h2)?;
        let act = super::swiglu::swiglu(&gate, &up)?;
        Ok(Self {
            ops,
            h1,
            q,
            k,
            v,
            a,
            x1,
            h2,
            gate,
            up,
            act,
        })
    }

    /// Input gradient of the layer for the output gradient `dout` (b*t, hidden); adapter
    /// gradients (f32) go to `stash`. Consumes the intermediates, freeing each when done.
    fn backward(
        self,
        c: &LayerCtx,
        x: &Tensor,
        dout: &Tensor,
        stash: &GradStash,
    ) -> Result<Tensor> {
        let (l, cfg) = (&c.layer, &c.cfg);
        let (b, t) = (c.batch, c.seq);
        let (qh, kvh, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let Self {
            ops,
            h1,
            q,
            k,
            v,
            a,
            x1,
            h2,
            gate,
            up,
            act,
        } = self;
        let back = |i: usize, h: &Tensor, dy: &Tensor| -> Result<Tensor> {
            match (&ops[i], &l.proj[i].adapter) {
                (Some(op), Some(ad)) => {
                    let (at, bt) = (ad.a.as_tensor(), ad.b.as_tensor());
                    let (dx, da, db) =
                        super::prof::section("lora-projection", "bwd", h.device(), || {
                            op.backward(h, at, bt, dy)
                        })?;
                    if let Some(da) = da {
                        stash.add(at.id(), da)?;
                    }
                    if let Some(db) = db {
                        stash.add(bt.id(), db)?;
                    }
                    dx.ok_or_else(|| candle_core::Error::Msg("projection gave no dx".into()))
                }
                _ => l.proj[i].base.input_grad(h, dy)?.ok_or_else(|| {
                    candle_core::Error::Msg("projection gave no input gradient".into())
                }),
            }
        };
        let norm_back = |n: &RmsNorm, x: &Tensor, g: &Tensor| -> Result<Tensor> {
            let g = super::prof::section("rms-norm", "bwd", x.device(), || n.input_grad(x, g))?;
            g.ok_or_else(|| candle_core::Error::Msg("rms-norm gave no input gradient".into()))
        };
        let dout = dout.contiguous()?;
        // MLP: out = x1 + down(swiglu(gate(h2), up(h2))), h2 = post_norm(x1).
        let dact = back(6, &act, &dout)?;
        drop(act);
        let (dgate, dup) = super::swiglu::swiglu_backward(&gate, &up, &dact)?;
        drop((gate, up, dact));
        let dh2 = (back(4, &h2, &dgate)? + back(5, &h2, &dup)?)?;
        drop((h2, dgate, dup));
        let dx1 = (&dout + norm_back(&l.post_norm, &x1, &dh2)?)?;
        drop((x1, dh2, dout));
        // Attention: x1 = x + o(attn(rope(q(h1)), rope(k(h1)), v(h1))), h1 = input_norm(x).
        let da = back(3, &a, &dx1)?
            .reshape((b, t, qh, d))?
            .transpose(1, 2)?
            .contiguous()?;
        drop(a);
        let (dq, dk, dv) = causal_attention_backward(&q, &k, &v, &da)?;
        drop((q, k, v, da));
        let flat =
            |g: Tensor, n: usize| -> Result<Tensor> { g.transpose(1, 2)?.reshape((b * t, n * d)) };
        let dq = flat(rope_backward(&dq, &c.cos, &c.sin)?, qh)?;
        let dk = flat(rope_backward(&dk, &c.cos, &c.sin)?, kvh)?;
        let dv = flat(dv, kvh)?;
        let dh1 = ((back(0, &h1, &dq)? + back(1, &h1, &dk)?)? + back(2, &h1, &dv)?)?;
        drop((dq, dk, dv, h1));
        dx1 + norm_back(&l.input_norm, x, &dh1)?
    }
}
