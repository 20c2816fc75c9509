//! Decoder-only transformer covering transformers' `Qwen2ForCausalLM`, `Qwen3ForCausalLM`,
//! `LlamaForCausalLM`, `MistralForCausalLM`, `Gemma2ForCausalLM`, `Gemma3ForCausalLM` and
//! `Phi3ForCausalLM`: token embedding (Gemma: times `sqrt(hidden)` rounded to the compute
//! dtype), `num_hidden_layers` decoder layers (`layer.rs`: RMSNorm -> GQA self-attention with
//! RoPE -> residual -> RMSNorm -> gated MLP -> residual, with each family's variants), final
//! RMSNorm, `lm_head` (tied or separate; Gemma: logits soft-capped when configured).
//!
//! Each layer gets the RoPE tables of its attention type (Gemma 3: full layers use
//! `rope_parameters.full_attention`, sliding layers `rope_local_base_freq`) computed for the
//! batch's row length (dynamic NTK and LongRoPE depend on it), and its sliding window.
//!
//! Written here rather than taken from candle-transformers because that model cannot take LoRA
//! (private fields) and its fused RoPE/softmax/RMSNorm record no backward, so gradients stop
//! silently. Every op here is differentiable with respect to the LoRA weights (checked against
//! finite differences in the tests), and no gradient is computed for base weights.
//!
//! Options: target projections may be stored as NF4 ([`Quant::Nf4`], QLoRA), and decoder
//! layers may be checkpointed ([`Model::set_grad_checkpointing`]): only each layer's input is
//! kept, and the layer is recomputed in backward (`checkpoint.rs`). Gradients must then be
//! taken with [`Model::backward`], which merges the adapter gradients found during
//! recomputation.

mod attention;
mod checkpoint;
mod layer;
mod mlp;
pub(crate) use mlp::gated_down_on;
mod peft;

use checkpoint::{GradStash, LayerCheckpoint};
use layer::{DecoderLayer, HeadLayout, Pass};

use crate::engine::config::{Activation, LayerKind, ModelConfig};
use crate::engine::lora::{DropoutRng, LoraAdapter, LoraConfig};
use crate::engine::ops::ChunkedCrossEntropy;
use crate::engine::ops::{AttentionSpec, InputGradCustomOp, RmsNorm, rope_tables};
use crate::engine::profiler;
use crate::engine::weights::{EMBED, FINAL_NORM, LM_HEAD, LayerNames, WeightSource};
use crate::engine::{CandleContext, EngineError};
use crate::spec::Quant;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

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
    /// adapters (seeded by `seed`) on every module `lora.targets` names. Same as
    /// [`Model::new_quantized`] with [`Quant::None`].
    ///
    /// Errors: missing/mis-shaped weights ([`EngineError::Weights`]), out of memory; a target
    /// this family has no module for ([`EngineError::Invalid`], see
    /// [`ModelConfig::lora_targets`]).
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
        let targets = cfg.lora_targets(&lora.targets)?;
        if !device.is_cpu() {
            // Seeds the device RNG used for LoRA dropout masks (and synthetic weights, which
            // reseed per tensor) so GPU runs are repeatable for a given --seed.
            device.set_seed(seed).ctx("seeding the device RNG")?;
        }
        let get = |name: &str, shape: &[usize]| weights.get(name, shape, cfg, dtype, device);
        let h = cfg.hidden_size;
        let embed = get(EMBED, &[cfg.vocab_size, h])?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                DecoderLayer::load(cfg, lora, &targets, i, quant, &mut rng, device, &get)
                    .map(Arc::new)
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let final_w = get(FINAL_NORM, &[h])?;
        let norm = if cfg.family.is_gemma() {
            RmsNorm::gemma(&final_w, cfg.rms_norm_eps).ctx("forming the final norm weight")?
        } else {
            RmsNorm::new(final_w, cfg.rms_norm_eps)
        };
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            get(LM_HEAD, &[cfg.vocab_size, h])?
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

    /// The dropout generator's state before a step, so that a retried step draws the same
    /// masks ([`Model::restore_dropout`]); None when the generator is poisoned.
    pub fn dropout_snapshot(&self) -> Option<rand_chacha::ChaCha8Rng> {
        self.dropout_rng.snapshot()
    }

    /// Restore a state from [`Model::dropout_snapshot`].
    pub fn restore_dropout(&self, state: rand_chacha::ChaCha8Rng) {
        self.dropout_rng.restore(state)
    }

    /// Backward from a scalar `loss` built by this model: `loss.backward()` plus the adapter
    /// gradients that graph nodes of the model's own compute outside candle's store (layers
    /// recomputed under checkpointing, and the MLP's down projection, `mlp.rs` `GatedDown`,
    /// in every pass). Always use this rather than `loss.backward()`, which misses those.
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

    /// All adapters, layer by layer in the layer's module order.
    pub fn adapters(&self) -> Vec<&LoraAdapter> {
        self.layers
            .iter()
            .flat_map(|l| {
                l.projections()
                    .into_iter()
                    .filter_map(|(_, p)| p.adapter.as_ref())
            })
            .collect()
    }

    /// The parts of this model that run generic candle code on CUDA instead of a fused kernel
    /// (for the run header): GeGLU, attention soft-capping, the soft-capped loss. Empty when
    /// every op has its kernel.
    pub fn generic_fallbacks(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.cfg.hidden_act == Activation::GeluTanh {
            v.push("GeGLU activation");
        }
        if self.cfg.attn_softcap.is_some() {
            v.push("attention soft-capping");
        }
        if self.cfg.final_softcap.is_some() {
            v.push("loss soft-capping (candle ops on each logits chunk)");
        }
        v
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
        for (i, l) in self.layers.iter().enumerate() {
            n += l
                .norms(&LayerNames::new(i))
                .iter()
                .map(|(_, w)| size(w.weight()))
                .sum::<usize>();
            n += l
                .projections()
                .iter()
                .map(|(_, p)| p.base.bytes())
                .sum::<usize>();
        }
        n
    }

    /// Named base tensors as HF names (for checkpoint round trips). NF4 projections are
    /// returned dequantised in the compute dtype.
    ///
    /// Errors: a device error while dequantising.
    pub fn base_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut v = vec![(EMBED.to_string(), self.embed.clone())];
        for (i, l) in self.layers.iter().enumerate() {
            let names = LayerNames::new(i);
            for (name, n) in l.norms(&names) {
                v.push((name, n.stored_weight(self.dtype)?));
            }
            for (p, lin) in l.projections() {
                v.push((names.weight(p), lin.base.weight(self.dtype)?));
                if let Some(b) = lin.base.bias() {
                    v.push((names.bias(p), b.clone()));
                }
            }
        }
        v.push((FINAL_NORM.to_string(), self.norm.stored_weight(self.dtype)?));
        if !self.cfg.tie_word_embeddings {
            v.push((LM_HEAD.to_string(), self.lm_head.clone()));
        }
        Ok(v)
    }

    /// Final hidden states (after the last RMSNorm) for `input_ids` (batch x seq, row-major),
    /// returned as (batch*seq, hidden) in the compute dtype. `train` enables LoRA dropout.
    ///
    /// Errors: an id out of the vocabulary, device errors (including out of memory).
    pub fn hidden_states(
        &self,
        input_ids: &[u32],
        batch: usize,
        seq: usize,
        train: bool,
    ) -> Result<Tensor> {
        let ids = Tensor::from_slice(input_ids, batch * seq, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        if let Some(scale) = self.cfg.embed_scale() {
            // transformers casts sqrt(hidden) to the weight dtype before the multiply.
            let s = Tensor::new(&[scale as f32], &self.device)?.to_dtype(self.dtype)?;
            x = x.broadcast_mul(&s)?;
        }
        let layouts = self.layouts(batch, seq)?;
        if self.grad_checkpointing && !self.adapters().is_empty() {
            // The op needs a tracked input to be recorded; the embedding output is not.
            if !x.track_op() {
                x = Var::from_tensor(&x)?.as_tensor().clone();
            }
            for (layer, layout) in self.layers.iter().zip(&layouts) {
                let op = LayerCheckpoint::new(
                    layer.clone(),
                    layout.clone(),
                    train.then(|| self.dropout_rng.clone()),
                    self.stash.clone(),
                )?;
                x = x.contiguous()?.apply_op1(InputGradCustomOp(op))?;
                profiler::trace("after ckpt layer fwd", &self.device);
            }
        } else {
            let rng = train.then_some(&*self.dropout_rng);
            for (layer, layout) in self.layers.iter().zip(&layouts) {
                x = layer.forward(&x, layout, rng, Pass::Graph, Some(&self.stash))?;
                profiler::trace("after layer fwd", &self.device);
            }
        }
        self.norm.forward(&x)
    }

    /// Logits (batch*seq, vocab) in f32. Materialises the full matrix: for tests and small
    /// models only (training uses [`Model::loss`]).
    ///
    /// Errors: as [`Model::hidden_states`].
    pub fn logits(&self, input_ids: &[u32], batch: usize, seq: usize) -> Result<Tensor> {
        let h = self.hidden_states(input_ids, batch, seq, false)?;
        let z = h.matmul(&self.lm_head.t()?)?.to_dtype(DType::F32)?;
        match self.cfg.final_softcap {
            Some(cap) => crate::engine::ops::softcap(&z, cap),
            None => Ok(z),
        }
    }

    /// The per-layer attention layouts for `batch` x `seq`: RoPE tables of each layer's
    /// attention type (computed once per type) and its window.
    fn layouts(&self, batch: usize, seq: usize) -> Result<Vec<HeadLayout>> {
        let cfg = &self.cfg;
        let tables = |kind: LayerKind| -> Result<(Tensor, Tensor)> {
            let (inv, factor) = cfg.rope_for(kind).inv_freq(cfg.head_dim, seq);
            let (c, s) = rope_tables(seq, &inv, factor, &self.device)?;
            Ok((c.to_dtype(self.dtype)?, s.to_dtype(self.dtype)?))
        };
        let full = tables(LayerKind::Full)?;
        let sliding = if cfg.layer_types.contains(&LayerKind::Sliding) {
            Some(tables(LayerKind::Sliding)?)
        } else {
            None
        };
        let spec = |kind: LayerKind| AttentionSpec {
            scale: cfg.attn_scale,
            window: match kind {
                LayerKind::Sliding => cfg.sliding_window.filter(|&w| w < seq),
                LayerKind::Full => None,
            },
            softcap: cfg.attn_softcap,
        };
        Ok(cfg
            .layer_types
            .iter()
            .map(|&kind| {
                let (c, s) = match (kind, &sliding) {
                    (LayerKind::Sliding, Some(t)) => t.clone(),
                    _ => full.clone(),
                };
                HeadLayout::new(cfg, (batch, seq), c, s, spec(kind))
            })
            .collect())
    }

    /// Mean causal-LM cross-entropy (scalar f32) over `targets` (batch*seq, pre-shifted, -100
    /// ignored), computed in chunks without materialising all logits.
    ///
    /// Errors: as [`Model::hidden_states`], or `targets` of the wrong length.
    pub fn loss(
        &self,
        input_ids: &[u32],
        targets: &[i64],
        batch: usize,
        seq: usize,
        train: bool,
    ) -> Result<Tensor> {
        let h = self.hidden_states(input_ids, batch, seq, train)?;
        match self.cfg.final_softcap {
            Some(cap) => ChunkedCrossEntropy::new(&self.lm_head, targets, &self.device)?
                .with_softcap(cap)?
                .forward(&h),
            None => ChunkedCrossEntropy::new(&self.lm_head, targets, &self.device)?.forward(&h),
        }
    }
}
