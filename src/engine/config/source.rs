//! Where a model comes from: a built-in preset (a published `config.json` shipped in the repo)
//! or a model directory.

use std::path::{Path, PathBuf};

use super::ModelConfig;
use crate::engine::EngineError;

/// The built-in presets accepted by `--model`: name and the published `config.json` (see
/// `presets/SOURCES.md`); `tiny` is a 3 M-parameter Qwen2 for CPU runs and tests.
const PRESET_TABLE: &[(&str, &str)] = &[
    ("tiny", include_str!("../presets/tiny.json")),
    ("qwen2.5-0.5b", include_str!("../presets/qwen2.5-0.5b.json")),
    ("qwen2.5-1.5b", include_str!("../presets/qwen2.5-1.5b.json")),
    ("qwen2.5-3b", include_str!("../presets/qwen2.5-3b.json")),
    ("qwen2.5-7b", include_str!("../presets/qwen2.5-7b.json")),
    ("qwen3-0.6b", include_str!("../presets/qwen3-0.6b.json")),
    ("qwen3-1.7b", include_str!("../presets/qwen3-1.7b.json")),
    ("qwen3-4b", include_str!("../presets/qwen3-4b.json")),
    ("qwen3-8b", include_str!("../presets/qwen3-8b.json")),
    ("llama-3.2-1b", include_str!("../presets/llama-3.2-1b.json")),
    ("llama-3.2-3b", include_str!("../presets/llama-3.2-3b.json")),
    ("llama-3.1-8b", include_str!("../presets/llama-3.1-8b.json")),
    (
        "mistral-7b-v0.3",
        include_str!("../presets/mistral-7b-v0.3.json"),
    ),
    ("gemma-2-2b", include_str!("../presets/gemma-2-2b.json")),
    ("gemma-3-1b", include_str!("../presets/gemma-3-1b.json")),
    (
        "phi-3-mini-4k",
        include_str!("../presets/phi-3-mini-4k.json"),
    ),
    ("phi-3.5-mini", include_str!("../presets/phi-3.5-mini.json")),
];

/// Names of the built-in presets accepted by `--model`.
pub const PRESETS: &[&str] = &[
    "tiny",
    "qwen2.5-0.5b",
    "qwen2.5-1.5b",
    "qwen2.5-3b",
    "qwen2.5-7b",
    "qwen3-0.6b",
    "qwen3-1.7b",
    "qwen3-4b",
    "qwen3-8b",
    "llama-3.2-1b",
    "llama-3.2-3b",
    "llama-3.1-8b",
    "mistral-7b-v0.3",
    "gemma-2-2b",
    "gemma-3-1b",
    "phi-3-mini-4k",
    "phi-3.5-mini",
];

/// The Hugging Face Hub model whose published `config.json` each preset is (see
/// `presets/SOURCES.md`); `tiny` has none.
const HUB_MODELS: &[(&str, &str)] = &[
    ("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B-Instruct"),
    ("qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B-Instruct"),
    ("qwen2.5-3b", "Qwen/Qwen2.5-3B-Instruct"),
    ("qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct"),
    ("qwen3-0.6b", "Qwen/Qwen3-0.6B"),
    ("qwen3-1.7b", "Qwen/Qwen3-1.7B"),
    ("qwen3-4b", "Qwen/Qwen3-4B"),
    ("qwen3-8b", "Qwen/Qwen3-8B"),
    ("llama-3.2-1b", "meta-llama/Llama-3.2-1B-Instruct"),
    ("llama-3.2-3b", "meta-llama/Llama-3.2-3B-Instruct"),
    ("llama-3.1-8b", "meta-llama/Llama-3.1-8B-Instruct"),
    ("mistral-7b-v0.3", "mistralai/Mistral-7B-Instruct-v0.3"),
    ("gemma-2-2b", "google/gemma-2-2b-it"),
    ("gemma-3-1b", "google/gemma-3-1b-it"),
    ("phi-3-mini-4k", "microsoft/Phi-3-mini-4k-instruct"),
    ("phi-3.5-mini", "microsoft/Phi-3.5-mini-instruct"),
];

/// The Hub model id of preset `name` (e.g. `Qwen/Qwen2.5-0.5B-Instruct` for `qwen2.5-0.5b`),
/// written as a saved adapter's `base_model_name_or_path`; None for `tiny` and for anything
/// that is not a preset.
pub fn hub_model(name: &str) -> Option<&'static str> {
    HUB_MODELS
        .iter()
        .find(|(p, _)| *p == name)
        .map(|(_, id)| *id)
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
        let preset = PRESET_TABLE
            .iter()
            .find(|(name, _)| *name == spec)
            .map(|(_, text)| *text);
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
    use crate::engine::config::{Family, LayerKind, RopeScaling};

    /// `model.num_parameters()` of transformers 5.24 for each preset's config, built on the
    /// meta device (`AutoModelForCausalLM.from_config(cfg)` under `torch.device("meta")`).
    const TRANSFORMERS_COUNTS: &[(&str, usize)] = &[
        ("gemma-2-2b", 2_614_341_888),
        ("gemma-3-1b", 999_885_952),
        ("llama-3.1-8b", 8_030_261_248),
        ("llama-3.2-1b", 1_235_814_400),
        ("llama-3.2-3b", 3_212_749_824),
        ("mistral-7b-v0.3", 7_248_023_552),
        ("phi-3-mini-4k", 3_821_079_552),
        ("phi-3.5-mini", 3_821_079_552),
        ("qwen2.5-0.5b", 494_032_768),
        ("qwen2.5-1.5b", 1_543_714_304),
        ("qwen2.5-3b", 3_085_938_688),
        ("qwen2.5-7b", 7_615_616_512),
        ("qwen3-0.6b", 596_049_920),
        ("qwen3-1.7b", 1_720_574_976),
        ("qwen3-4b", 4_022_468_096),
        ("qwen3-8b", 8_190_735_360),
    ];

    #[test]
    fn every_preset_parses_with_the_parameter_count_transformers_reports() {
        assert_eq!(PRESETS.len(), PRESET_TABLE.len());
        for (name, count) in TRANSFORMERS_COUNTS {
            let src = ModelSource::resolve(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(src.config.num_parameters(), *count, "{name}");
        }
        for name in PRESETS {
            assert!(ModelSource::resolve(name).is_ok(), "{name}");
        }
    }

    /// Every preset but `tiny` names its Hub model; nothing else does.
    #[test]
    fn every_preset_has_its_hub_model() {
        for name in PRESETS {
            assert_eq!(hub_model(name).is_some(), *name != "tiny", "{name}");
        }
        assert_eq!(hub_model("qwen3-8b"), Some("Qwen/Qwen3-8B"));
        assert_eq!(hub_model("./my-model"), None);
    }

    #[test]
    fn presets_resolve_the_published_rope_and_windows() {
        let c = ModelSource::resolve("llama-3.2-1b").unwrap().config;
        assert!(matches!(c.rope.scaling, RopeScaling::Llama3 { factor, .. } if factor == 32.0));
        assert_eq!(c.rope.theta, 500_000.0);
        let c = ModelSource::resolve("qwen2.5-7b").unwrap().config;
        assert_eq!((c.rope.theta, c.sliding_window), (1_000_000.0, None));
        let c = ModelSource::resolve("gemma-3-1b").unwrap().config;
        assert_eq!(c.family, Family::Gemma3);
        assert_eq!(c.sliding_window, Some(512));
        let full: Vec<usize> = (0..c.num_hidden_layers)
            .filter(|&i| c.layer_types[i] == LayerKind::Full)
            .collect();
        assert_eq!(full, [5, 11, 17, 23]);
        assert_eq!(c.rope_for(LayerKind::Sliding).theta, 10_000.0);
        assert_eq!(c.rope_for(LayerKind::Full).theta, 1_000_000.0);
        let c = ModelSource::resolve("phi-3.5-mini").unwrap().config;
        assert!(matches!(
            c.rope.scaling,
            RopeScaling::LongRope {
                original_max_position_embeddings: 4096,
                ..
            }
        ));
        let c = ModelSource::resolve("mistral-7b-v0.3").unwrap().config;
        assert_eq!(c.sliding_window, None);
    }
}
