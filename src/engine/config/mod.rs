//! Model hyper-parameters from a Hugging Face `config.json`, read as transformers 5 reads them
//! (both the `rope_parameters` spelling it writes and the `rope_theta` / `rope_scaling` spelling
//! of the published Hub configs), for the families `qwen2`, `qwen3`, `llama`, `mistral`,
//! `gemma2`, `gemma3_text` and `phi3`.
//!
//! Every key is either read (and honoured), known to change nothing lorascope computes
//! ([`keys::HARMLESS`]), or, when its name suggests maths (`*rope*`, `*window*`, `*bias*`,
//! `*norm*`, `*softcap*`, `*scal*`, ...), refused with one line naming it. Keys read but only
//! accepted at their neutral value (dropouts 0, `use_bidirectional_attention` false, ...) are
//! refused by name otherwise.

mod keys;
mod projection;
mod rope;
mod source;

pub use projection::Projection;
pub use rope::{Rope, RopeScaling};
pub use source::{ModelSource, PRESETS, hub_model};

use serde_json::{Map, Value};

use super::EngineError;
use keys::Keys;
use rope::{RopeContext, parse_rope};

/// Architecture family, from `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// `Qwen2ForCausalLM` (Qwen2, Qwen2.5): q/k/v biases, optional sliding window.
    Qwen2,
    /// `Qwen3ForCausalLM`: per-head q/k RMSNorm before RoPE, `attention_bias` on q/k/v/o.
    Qwen3,
    /// `LlamaForCausalLM` (Llama 3.x): `attention_bias` (q/k/v/o), `mlp_bias`.
    Llama,
    /// `MistralForCausalLM`: Llama layout, `sliding_window` on every layer.
    Mistral,
    /// `Gemma2ForCausalLM`: (1 + w) RMSNorm, sandwich norms, GeGLU, scaled embedding,
    /// attention and final soft-capping, alternating sliding/full layers.
    Gemma2,
    /// `Gemma3ForCausalLM` (`gemma3_text`): Gemma 2 plus (1 + w) q/k norms, per-type RoPE, no
    /// attention soft-capping.
    Gemma3,
    /// `Phi3ForCausalLM` (Phi-3, Phi-3.5): fused `qkv_proj` and `gate_up_proj`.
    Phi3,
}

impl Family {
    /// The transformers class name, for messages.
    pub fn class_name(self) -> &'static str {
        match self {
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Gemma2 => "Gemma2ForCausalLM",
            Family::Gemma3 => "Gemma3ForCausalLM",
            Family::Phi3 => "Phi3ForCausalLM",
        }
    }

    /// Gemma's RMSNorm `x * rsqrt(mean(x^2) + eps) * (1 + w)` in f32, sandwich norms around
    /// attention and MLP, embedding scaled by `sqrt(hidden)`.
    pub fn is_gemma(self) -> bool {
        matches!(self, Family::Gemma2 | Family::Gemma3)
    }
}

/// The MLP's activation (`hidden_act`; Gemma: `hidden_activation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `silu`: SwiGLU `down(silu(gate) * up)`.
    Silu,
    /// `gelu_pytorch_tanh`: GeGLU `down(gelu_tanh(gate) * up)`.
    GeluTanh,
}

/// Attention type of one decoder layer (transformers' `layer_types`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerKind {
    /// Causal attention over the whole row.
    Full,
    /// Query `i` sees keys `j` with `i - sliding_window < j <= i`.
    Sliding,
}

/// Resolved decoder-only transformer hyper-parameters.
///
/// Field names follow Hugging Face `config.json`. `head_dim` defaults to
/// `hidden_size / num_attention_heads`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelConfig {
    /// Architecture family (`model_type`).
    pub family: Family,
    /// Model width (d_model).
    pub hidden_size: usize,
    /// Gated MLP inner width.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding and `lm_head`).
    pub vocab_size: usize,
    /// Longest supported sequence, in tokens.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE of the full-attention layers (of every layer unless `rope_sliding` is set).
    pub rope: Rope,
    /// RoPE of the sliding layers when it differs (Gemma 3: `rope_local_base_freq`).
    pub rope_sliding: Option<Rope>,
    /// Attention type per layer.
    pub layer_types: Vec<LayerKind>,
    /// Window of the sliding layers, in keys (None: no layer slides).
    pub sliding_window: Option<usize>,
    /// `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v projections have biases (Qwen2: always; others: `attention_bias`).
    pub attention_bias: bool,
    /// o_proj has a bias (`attention_bias` except in Qwen2).
    pub o_proj_bias: bool,
    /// gate/up/down have biases (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// MLP activation.
    pub hidden_act: Activation,
    /// Per-head RMSNorm on q and k before RoPE (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Attention logit scale: `head_dim ** -0.5`, Gemma `query_pre_attn_scalar ** -0.5`.
    pub attn_scale: f64,
    /// Gemma 2 `attn_logit_softcapping`: scores become `tanh(s / cap) * cap`.
    pub attn_softcap: Option<f64>,
    /// `final_logit_softcapping`: logits become `tanh(z / cap) * cap`.
    pub final_softcap: Option<f64>,
    /// Std of the normal used for synthetic (random) weights.
    pub initializer_range: f64,
}

impl ModelConfig {
    /// Parse a HF `config.json` text. `origin` names the file in errors.
    ///
    /// Errors (one line naming the key): invalid JSON, a missing field, an unknown
    /// `model_type`, an unsupported activation or RoPE type, a math key lorascope does not
    /// implement (see the module doc), inconsistent head counts.
    pub fn from_json(text: &str, origin: &str) -> Result<Self, EngineError> {
        let cfg_err = |msg: String| EngineError::Config {
            file: origin.to_string(),
            msg,
        };
        let v: Value = serde_json::from_str(text)
            .map_err(|e| cfg_err(format!("not a valid Hugging Face config.json: {e}")))?;
        let map = v.as_object().ok_or_else(|| {
            cfg_err("not a valid Hugging Face config.json: expected an object".into())
        })?;
        Self::from_map(map).map_err(cfg_err)
    }

    fn from_map(map: &Map<String, Value>) -> Result<Self, String> {
        let k = Keys {
            map,
            read: Default::default(),
        };
        let expected = "expected qwen2, qwen3, llama, mistral, gemma2, gemma3_text or phi3";
        let family = match k.str("model_type")? {
            Some("qwen2") => Family::Qwen2,
            Some("qwen3") => Family::Qwen3,
            Some("llama") => Family::Llama,
            Some("mistral") => Family::Mistral,
            Some("gemma2") => Family::Gemma2,
            Some("gemma3_text") => Family::Gemma3,
            Some("gemma3") => {
                return Err(
                    "model_type `gemma3` is the multimodal Gemma 3 (vision tower); use a text-only gemma3_text checkpoint such as gemma-3-1b".into(),
                );
            }
            Some("phi3") => Family::Phi3,
            Some(other) => return Err(format!("unknown model_type `{other}` ({expected})")),
            None => return Err(format!("missing `model_type` ({expected})")),
        };
        let hidden_size = k.need_usize("hidden_size")?;
        let heads = k.need_usize("num_attention_heads")?;
        let kv = k.usize("num_key_value_heads")?.unwrap_or(heads);
        if heads == 0 || kv == 0 || !heads.is_multiple_of(kv) {
            return Err(format!(
                "num_attention_heads ({heads}) must be a positive multiple of num_key_value_heads ({kv})"
            ));
        }
        let head_dim = k.usize("head_dim")?.unwrap_or(hidden_size / heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim {head_dim} must be a positive even number (RoPE rotates pairs)"
            ));
        }
        let layers = k.need_usize("num_hidden_layers")?;
        let max_pos = k.need_usize("max_position_embeddings")?;
        let gemma = family.is_gemma();

        // Activation: Gemma reads `hidden_activation` (the published configs also carry
        // `hidden_act`, which the Gemma modules ignore).
        let act_key = if gemma {
            "hidden_activation"
        } else {
            "hidden_act"
        };
        if gemma {
            k.ignore("hidden_act");
        }
        let hidden_act = match k.str(act_key)? {
            None if gemma => Activation::GeluTanh,
            None | Some("silu") => Activation::Silu,
            Some("gelu_pytorch_tanh") => Activation::GeluTanh,
            Some(other) => {
                return Err(format!(
                    "{act_key} `{other}` is not supported (supported: silu, gelu_pytorch_tanh)"
                ));
            }
        };

        k.neutral("attention_dropout", "attention dropout is not implemented")?;
        if gemma {
            k.neutral(
                "use_bidirectional_attention",
                "bidirectional attention is not causal-LM training",
            )?;
        }
        if family == Family::Phi3 {
            k.neutral("resid_pdrop", "residual dropout is not implemented")?;
            k.neutral("embd_pdrop", "embedding dropout is not implemented")?;
        }

        // Biases.
        let (attention_bias, o_proj_bias, mlp_bias) = match family {
            Family::Qwen2 => {
                // Qwen2 always has q/k/v biases and never an o_proj bias; the key is unused.
                k.ignore("attention_bias");
                (true, false, false)
            }
            Family::Llama => {
                let a = k.bool("attention_bias")?.unwrap_or(false);
                (a, a, k.bool("mlp_bias")?.unwrap_or(false))
            }
            Family::Qwen3 | Family::Gemma2 | Family::Gemma3 => {
                let a = k.bool("attention_bias")?.unwrap_or(false);
                (a, a, false)
            }
            Family::Mistral | Family::Phi3 => {
                k.neutral("attention_bias", "this family has no projection biases")?;
                (false, false, false)
            }
        };

        // Sliding windows and layer types.
        let window = k.usize("sliding_window")?;
        let explicit_types = match k.raw("layer_types") {
            None => None,
            Some(v) => {
                let arr = v
                    .as_array()
                    .ok_or_else(|| format!("`layer_types` must be a list, got {v}"))?;
                let t = arr
                    .iter()
                    .map(|x| match x.as_str() {
                        Some("full_attention") => Ok(LayerKind::Full),
                        Some("sliding_attention") => Ok(LayerKind::Sliding),
                        _ => Err(format!(
                            "layer_types entry {x} is not supported (expected full_attention or sliding_attention)"
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                if t.len() != layers {
                    return Err(format!(
                        "layer_types has {} entries for {layers} layers",
                        t.len()
                    ));
                }
                Some(t)
            }
        };
        let (sliding_window, derived): (Option<usize>, Vec<LayerKind>) = match family {
            Family::Qwen2 | Family::Qwen3 => {
                let on = k.bool("use_sliding_window")?.unwrap_or(false);
                let mwl = k.usize("max_window_layers")?.unwrap_or(layers);
                let t = (0..layers)
                    .map(|i| {
                        if on && i >= mwl {
                            LayerKind::Sliding
                        } else {
                            LayerKind::Full
                        }
                    })
                    .collect();
                (if on { window } else { None }, t)
            }
            Family::Mistral | Family::Phi3 => {
                let kind = if window.is_some() {
                    LayerKind::Sliding
                } else {
                    LayerKind::Full
                };
                (window, vec![kind; layers])
            }
            Family::Gemma2 => {
                let t = (0..layers)
                    .map(|i| {
                        if (i + 1) % 2 != 0 {
                            LayerKind::Sliding
                        } else {
                            LayerKind::Full
                        }
                    })
                    .collect();
                (Some(window.unwrap_or(4096)), t)
            }
            Family::Gemma3 => {
                let p = match k.usize("sliding_window_pattern")? {
                    Some(p) => p,
                    None => k.usize("_sliding_window_pattern")?.unwrap_or(6),
                };
                k.ignore("_sliding_window_pattern");
                let t = (0..layers)
                    .map(|i| {
                        if p == 0 || (i + 1) % p != 0 {
                            LayerKind::Sliding
                        } else {
                            LayerKind::Full
                        }
                    })
                    .collect();
                (Some(window.unwrap_or(4096)), t)
            }
            Family::Llama => {
                if let Some(w) = window {
                    return Err(format!(
                        "`sliding_window` = {w} is not used by LlamaForCausalLM; remove it (or use model_type mistral)"
                    ));
                }
                (None, vec![LayerKind::Full; layers])
            }
        };
        let mut layer_types = explicit_types.unwrap_or(derived);
        if sliding_window.is_none() {
            // transformers passes sliding_window=None: every layer attends over the whole row.
            layer_types = vec![LayerKind::Full; layers];
        }
        if sliding_window == Some(0) {
            return Err("`sliding_window` must be at least 1".into());
        }

        // RoPE.
        let cx = RopeContext {
            max_position_embeddings: max_pos,
            head_dim,
            original_max_override: if family == Family::Phi3 {
                k.usize("original_max_position_embeddings")?
            } else {
                None
            },
            phi3_names: family == Family::Phi3,
        };
        let default_theta = if family == Family::Gemma3 { 1e6 } else { 1e4 };
        let theta = k.f64("rope_theta")?.unwrap_or(default_theta);
        let local_theta = if family == Family::Gemma3 {
            Some(k.f64("rope_local_base_freq")?.unwrap_or(1e4))
        } else {
            None
        };
        fn obj<'v>(v: &'v Value, what: &str) -> Result<&'v Map<String, Value>, String> {
            v.as_object()
                .ok_or_else(|| format!("`{what}` must be an object, got {v}"))
        }
        let params = k.raw("rope_parameters");
        let scaling = k.raw("rope_scaling");
        let empty = Map::new();
        let (rope, rope_sliding) = match (params, family) {
            (Some(p), Family::Gemma3)
                if obj(p, "rope_parameters")?.contains_key("full_attention") =>
            {
                let p = obj(p, "rope_parameters")?;
                let part = |name: &str| -> Result<Rope, String> {
                    let d = p
                        .get(name)
                        .map(|v| obj(v, "rope_parameters"))
                        .transpose()?
                        .unwrap_or(&empty);
                    parse_rope(d, theta, &format!("rope_parameters.{name}"), &cx)
                };
                if let Some(x) = p
                    .keys()
                    .find(|x| !["full_attention", "sliding_attention"].contains(&x.as_str()))
                {
                    return Err(format!(
                        "rope_parameters.{x} is not an attention type lorascope knows"
                    ));
                }
                (part("full_attention")?, Some(part("sliding_attention")?))
            }
            (Some(p), _) => {
                let r = parse_rope(obj(p, "rope_parameters")?, theta, "rope_parameters", &cx)?;
                (r, local_theta.map(Rope::plain))
            }
            (None, _) => {
                let d = scaling
                    .map(|v| obj(v, "rope_scaling"))
                    .transpose()?
                    .unwrap_or(&empty);
                let r = parse_rope(d, theta, "rope_scaling", &cx)?;
                // Gemma 3 sliding layers use rope_local_base_freq and never rope_scaling.
                (r, local_theta.map(Rope::plain))
            }
        };

        // Gemma: attention scale and soft-capping.
        let (attn_scale, attn_softcap, final_softcap) = if gemma {
            let s = k.f64("query_pre_attn_scalar")?.unwrap_or(head_dim as f64);
            let attn = k.f64("attn_logit_softcapping")?;
            let fin = k.f64("final_logit_softcapping")?;
            // Gemma 3 stores attn_logit_softcapping but its attention never applies it.
            let attn = if family == Family::Gemma2 { attn } else { None };
            (s.powf(-0.5), attn, fin)
        } else {
            (1.0 / (head_dim as f64).sqrt(), None, None)
        };

        let cfg = Self {
            family,
            hidden_size,
            intermediate_size: k.need_usize("intermediate_size")?,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            vocab_size: k.need_usize("vocab_size")?,
            max_position_embeddings: max_pos,
            rms_norm_eps: k.f64("rms_norm_eps")?.ok_or("missing `rms_norm_eps`")?,
            rope,
            rope_sliding,
            layer_types,
            sliding_window,
            tie_word_embeddings: k.bool("tie_word_embeddings")?.unwrap_or(gemma),
            attention_bias,
            o_proj_bias,
            mlp_bias,
            hidden_act,
            qk_norm: matches!(family, Family::Qwen3 | Family::Gemma3),
            attn_scale,
            attn_softcap,
            final_softcap,
            initializer_range: k.f64("initializer_range")?.unwrap_or(0.02),
        };
        let read = k.read.borrow();
        let mut refused: Vec<&String> = map
            .keys()
            .filter(|x| !read.contains(&x.as_str()) && !keys::HARMLESS.contains(&x.as_str()))
            .filter(|x| keys::looks_like_maths(x))
            .collect();
        refused.sort();
        if let Some(x) = refused.first() {
            return Err(format!(
                "config key `{x}` is not implemented for {} and may change the math; lorascope refuses rather than ignore it (remove it only if you know it is inert)",
                family.class_name()
            ));
        }
        Ok(cfg)
    }

    /// Norm weights per decoder layer, each (hidden) except q/k norms (head_dim).
    fn norm_params_per_layer(&self) -> usize {
        let h = self.hidden_size;
        let sandwich = if self.family.is_gemma() { 4 } else { 2 };
        let qk = if self.qk_norm { 2 * self.head_dim } else { 0 };
        sandwich * h + qk
    }

    /// Total parameter count of the base model (embeddings, all layers, norms, `lm_head` unless
    /// tied), as transformers' `num_parameters()`.
    pub fn num_parameters(&self) -> usize {
        let proj: usize = self
            .projections()
            .iter()
            .map(|&p| {
                let (o, i) = self.projection_dims(p);
                o * i + if self.projection_bias(p) { o } else { 0 }
            })
            .sum();
        let layer = proj + self.norm_params_per_layer();
        let embed = self.vocab_size * self.hidden_size;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + self.num_hidden_layers * layer + self.hidden_size + head
    }

    /// The RoPE of layer kind `kind`.
    pub fn rope_for(&self, kind: LayerKind) -> &Rope {
        match (kind, &self.rope_sliding) {
            (LayerKind::Sliding, Some(r)) => r,
            _ => &self.rope,
        }
    }

    /// Embedding multiplier (Gemma: `sqrt(hidden_size)`, rounded to the compute dtype by the
    /// caller), or None.
    pub fn embed_scale(&self) -> Option<f64> {
        self.family
            .is_gemma()
            .then(|| (self.hidden_size as f64).sqrt())
    }
}

#[cfg(test)]
mod tests;
