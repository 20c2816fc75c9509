//! Decoder-only transformer covering Hugging Face `Qwen2ForCausalLM` and `LlamaForCausalLM`:
//! token embedding, `num_hidden_layers` x (RMSNorm -> GQA self-attention with RoPE ->
//! residual -> RMSNorm -> SwiGLU MLP -> residual), final RMSNorm, `lm_head` (tied or separate).
//!
//! Written here rather than taken from candle-transformers because that model cannot take LoRA
//! (private fields) and its fused RoPE/softmax/RMSNorm record no backward, so gradients stop
//! silently. Every op here is differentiable with respect to the LoRA weights (checked against
//! finite differences in the tests), and no gradient is computed for base weights.

use super::config::ModelConfig;
use super::lora::{DropoutRng, LoraAdapter, LoraConfig, LoraLinear, Target, new_adapter};
use super::loss::ChunkedCrossEntropy;
use super::ops::{FrozenLinear, RmsNorm, apply_rope, causal_attention, rope_tables};
use super::weights::WeightSource;
use super::{CandleContext, EngineError};
use candle_core::{DType, Device, Result, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// One decoder layer.
pub struct DecoderLayer {
    input_norm: RmsNorm,
    post_norm: RmsNorm,
    /// Projections in [`Target::ALL`] order: q, k, v, o, gate, up, down.
    proj: Vec<LoraLinear>,
}

/// The model: frozen base weights in the compute dtype plus f32 LoRA adapters.
pub struct Model {
    cfg: ModelConfig,
    lora: LoraConfig,
    embed: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Tensor,
    dtype: DType,
    device: Device,
    dropout_rng: DropoutRng,
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
    /// adapters (seeded by `seed`) on every projection in `lora.targets`.
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
            for t in Target::ALL {
                let (o, n) = cfg.projection_shape(t);
                let w = get(&format!("{p}.{}.weight", t.module_path()), &[o, n])?;
                let b = if cfg.attention_bias && matches!(t, Target::Q | Target::K | Target::V) {
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
                proj.push(LoraLinear {
                    base: FrozenLinear::new(w, b),
                    adapter,
                });
            }
            let post_norm = RmsNorm::new(
                get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                cfg.rms_norm_eps,
            );
            layers.push(DecoderLayer {
                input_norm,
                post_norm,
                proj,
            });
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
            dropout_rng: DropoutRng::new(seed),
        })
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

    /// All adapters, layer by layer in [`Target::ALL`] order.
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

    /// Bytes held by base weights (embedding counted once when tied).
    pub fn base_weight_bytes(&self) -> usize {
        self.cfg.num_parameters() * self.dtype.size_in_bytes()
    }

    /// Named base tensors as HF names (for checkpoint round trips).
    pub fn base_tensors(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![("model.embed_tokens.weight".to_string(), self.embed.clone())];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            v.push((
                format!("{p}.input_layernorm.weight"),
                l.input_norm.weight().clone(),
            ));
            for (t, lin) in Target::ALL.iter().zip(&l.proj) {
                v.push((
                    format!("{p}.{}.weight", t.module_path()),
                    lin.base.weight().clone(),
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
        v
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
        let rng = train.then_some(&self.dropout_rng);
        for layer in &self.layers {
            x = self.layer_forward(layer, &x, batch, seq, &cos, &sin, rng)?;
        }
        self.norm.forward(&x)
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        l: &DecoderLayer,
        x: &Tensor,
        b: usize,
        t: usize,
        cos: &Tensor,
        sin: &Tensor,
        rng: Option<&DropoutRng>,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let (qh, kvh, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let h = l.input_norm.forward(x)?;
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            y.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()
        };
        let q = heads(l.proj[0].forward(&h, rng)?, qh)?;
        let k = heads(l.proj[1].forward(&h, rng)?, kvh)?;
        let v = heads(l.proj[2].forward(&h, rng)?, kvh)?;
        let q = apply_rope(&q, cos, sin)?;
        let k = apply_rope(&k, cos, sin)?;
        let a = causal_attention(&q, &k, &v)?;
        let a = a.transpose(1, 2)?.reshape((b * t, qh * d))?;
        let x = (x + l.proj[3].forward(&a, rng)?)?;
        let h = l.post_norm.forward(&x)?;
        let gate = l.proj[4].forward(&h, rng)?;
        let up = l.proj[5].forward(&h, rng)?;
        let m = l.proj[6].forward(&(gate.silu()? * up)?, rng)?;
        x + m
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
