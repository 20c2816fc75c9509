//! Model hyper-parameters from a Hugging Face `config.json` (Qwen2 and Llama families).

use serde::Deserialize;
use std::path::{Path, PathBuf};

use super::EngineError;
use crate::spec::LoraTarget;

/// The `qwen2.5-1.5b` preset: the config of Qwen/Qwen2.5-1.5B-Instruct, shipped in the repo.
const QWEN25_15B: &str = include_str!("presets/qwen2.5-1.5b.json");
/// The `tiny` preset: the Qwen2 family at about 3 M parameters, for CPU runs and tests.
const TINY: &str = include_str!("presets/tiny.json");

/// Names of the built-in presets accepted by `--model`.
pub const PRESETS: &[&str] = &["tiny", "qwen2.5-1.5b"];

/// Architecture family, from `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// `Qwen2ForCausalLM`: q/k/v projections carry biases.
    Qwen2,
    /// `LlamaForCausalLM`: no projection biases (unless `attention_bias` is set).
    Llama,
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    max_position_embeddings: usize,
    rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    rope_theta: f64,
    #[serde(default)]
    tie_word_embeddings: bool,
    attention_bias: Option<bool>,
    hidden_act: Option<String>,
    #[serde(default = "default_init_range")]
    initializer_range: f64,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
}

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_init_range() -> f64 {
    0.02
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
    /// SwiGLU inner width.
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
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v projections have biases (Qwen2: always).
    pub attention_bias: bool,
    /// Std of the normal used for synthetic (random) weights.
    pub initializer_range: f64,
}

impl ModelConfig {
    /// Parse a HF `config.json` text. `origin` names the file in errors.
    ///
    /// Errors: invalid JSON, missing fields, an unknown `model_type` (only `qwen2` and `llama`
    /// are supported), an activation other than SiLU, or inconsistent head counts.
    pub fn from_json(text: &str, origin: &str) -> Result<Self, EngineError> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| EngineError::Config {
            file: origin.to_string(),
            msg: format!("not a valid Hugging Face config.json: {e}"),
        })?;
        let cfg_err = |msg: String| EngineError::Config {
            file: origin.to_string(),
            msg,
        };
        let family = match raw.model_type.as_deref() {
            Some("qwen2") => Family::Qwen2,
            Some("llama") => Family::Llama,
            Some(other) => {
                return Err(cfg_err(format!(
                    "unknown model_type `{other}` (expected `qwen2` or `llama`)"
                )));
            }
            None => {
                return Err(cfg_err(
                    "missing `model_type` (expected `qwen2` or `llama`)".into(),
                ));
            }
        };
        if let Some(act) = raw.hidden_act.as_deref()
            && act != "silu"
        {
            return Err(cfg_err(format!(
                "hidden_act `{act}` is not supported (expected `silu`)"
            )));
        }
        if let Some(rs) = raw.rope_scaling.as_ref().filter(|v| !v.is_null()) {
            return Err(cfg_err(format!(
                "rope_scaling {rs} is not supported yet (only plain RoPE with rope_theta); remove it to profile the short-context shape"
            )));
        }
        let heads = raw.num_attention_heads;
        let kv = raw.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv == 0 || !heads.is_multiple_of(kv) {
            return Err(cfg_err(format!(
                "num_attention_heads ({heads}) must be a positive multiple of num_key_value_heads ({kv})"
            )));
        }
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(cfg_err(format!(
                "head_dim {head_dim} must be a positive even number (RoPE rotates pairs)"
            )));
        }
        Ok(Self {
            family,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            vocab_size: raw.vocab_size,
            max_position_embeddings: raw.max_position_embeddings,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta: raw.rope_theta,
            tie_word_embeddings: raw.tie_word_embeddings,
            attention_bias: raw
                .attention_bias
                .unwrap_or(matches!(family, Family::Qwen2)),
            initializer_range: raw.initializer_range,
        })
    }

    /// Total parameter count of the base model (embeddings, all layers, norms, `lm_head` unless
    /// tied).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let bias = if self.attention_bias { q + 2 * kv } else { 0 };
        let attn = h * q + 2 * h * kv + q * h + bias;
        let mlp = 3 * h * self.intermediate_size;
        let layer = attn + mlp + 2 * h;
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + self.num_hidden_layers * layer + h + head
    }

    /// Whether projection `target` has a bias: q, k and v when `attention_bias` (Qwen2 sets
    /// it; transformers' `attention_bias`), never o or the MLP's.
    pub fn projection_has_bias(&self, target: LoraTarget) -> bool {
        self.attention_bias && matches!(target, LoraTarget::Q | LoraTarget::K | LoraTarget::V)
    }

    /// `(out_features, in_features)` of a projection in one decoder layer.
    pub fn projection_shape(&self, target: LoraTarget) -> (usize, usize) {
        use LoraTarget::*;
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let i = self.intermediate_size;
        match target {
            Q => (q, h),
            K | V => (kv, h),
            O => (h, q),
            Gate | Up => (i, h),
            Down => (h, i),
        }
    }
}

/// Where a model comes from: a preset name, or a directory with `config.json` (and optionally
/// `*.safetensors` weights and `tokenizer.json`).
#[derive(Debug, Clone)]
pub struct ModelSource {
    /// Display name (preset name or directory path).
    pub name: String,
    /// The resolved configuration.
    pub config: ModelConfig,
    /// Directory holding weights / tokenizer, if any.
    pub dir: Option<PathBuf>,
}

impl ModelSource {
    /// Resolve `--model`: a preset name (see [`PRESETS`]) or a directory containing
    /// `config.json`.
    ///
    /// Errors: a path that does not exist or has no `config.json`, or a bad config.
    pub fn resolve(spec: &str) -> Result<Self, EngineError> {
        let preset = match spec {
            "tiny" => Some(TINY),
            "qwen2.5-1.5b" => Some(QWEN25_15B),
            _ => None,
        };
        if let Some(text) = preset {
            let config = ModelConfig::from_json(text, &format!("preset {spec}"))?;
            return Ok(Self {
                name: spec.to_string(),
                config,
                dir: None,
            });
        }
        let dir = Path::new(spec);
        let cfg_path = dir.join("config.json");
        if !dir.is_dir() {
            return Err(EngineError::Config {
                file: spec.to_string(),
                msg: format!(
                    "not a preset ({}) nor a model directory (pass a preset or a folder with config.json)",
                    PRESETS.join(", ")
                ),
            });
        }
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| EngineError::Config {
            file: cfg_path.display().to_string(),
            msg: format!("cannot read ({e}); a model directory needs a Hugging Face config.json"),
        })?;
        let config = ModelConfig::from_json(&text, &cfg_path.display().to_string())?;
        Ok(Self {
            name: spec.to_string(),
            config,
            dir: Some(dir.to_path_buf()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen_preset_has_the_published_parameter_count() {
        let src = ModelSource::resolve("qwen2.5-1.5b").unwrap();
        let c = &src.config;
        assert_eq!(c.family, Family::Qwen2);
        assert_eq!(c.head_dim, 128);
        assert!(c.attention_bias && c.tie_word_embeddings);
        // Qwen2.5-1.5B: 1,543,714,304 parameters (tied embeddings).
        assert_eq!(c.num_parameters(), 1_543_714_304);
    }

    #[test]
    fn unknown_model_type_is_refused_with_the_file_name() {
        let text = TINY.replace("\"qwen2\"", "\"gpt2\"");
        let err = ModelConfig::from_json(&text, "x/config.json").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("x/config.json") && msg.contains("gpt2"),
            "{msg}"
        );
        assert!(!msg.contains('\n'));
    }

    #[test]
    fn rope_scaling_is_refused_not_ignored() {
        let text = TINY.replace(
            "\"model_type\"",
            "\"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 8.0}, \"model_type\"",
        );
        let msg = ModelConfig::from_json(&text, "c.json")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("rope_scaling") && msg.contains("c.json"),
            "{msg}"
        );
    }

    #[test]
    fn llama_defaults_to_no_bias() {
        let text = TINY.replace("\"qwen2\"", "\"llama\"");
        let c = ModelConfig::from_json(&text, "t").unwrap();
        assert_eq!(c.family, Family::Llama);
        assert!(!c.attention_bias);
    }
}
