//! Tests of config parsing, presets, RoPE resolution and refusals.
use super::*;

const LLAMA: &str = include_str!("../presets/llama-3.2-1b.json");
const QWEN: &str = include_str!("../presets/qwen2.5-0.5b.json");

fn with(base: &str, key: &str, value: &str) -> String {
    let mut v: Value = serde_json::from_str(base).unwrap();
    v.as_object_mut()
        .unwrap()
        .insert(key.into(), serde_json::from_str(value).unwrap());
    v.to_string()
}

fn refusal(text: &str) -> String {
    let msg = ModelConfig::from_json(text, "m/config.json")
        .unwrap_err()
        .to_string();
    assert!(!msg.contains('\n'), "{msg}");
    assert!(msg.contains("m/config.json"), "{msg}");
    msg
}

#[test]
fn unknown_math_keys_are_refused_by_name() {
    for key in [
        "attn_logit_softcapping",
        "rope_interleaved",
        "qk_layernorm",
        "embedding_multiplier_scale",
        "lm_head_bias",
        "sliding_window_size",
        "num_experts",
    ] {
        let msg = refusal(&with(LLAMA, key, "1"));
        assert!(msg.contains(&format!("`{key}`")), "{key}: {msg}");
    }
    // An unknown key that says nothing about maths is left alone.
    ModelConfig::from_json(&with(LLAMA, "license", "\"x\""), "t").unwrap();
}

#[test]
fn neutral_only_keys_are_refused_at_other_values() {
    assert!(refusal(&with(LLAMA, "attention_dropout", "0.1")).contains("attention_dropout"));
    let phi = include_str!("../presets/phi-3-mini-4k.json");
    assert!(refusal(&with(phi, "resid_pdrop", "0.1")).contains("resid_pdrop"));
    assert!(refusal(&with(LLAMA, "hidden_act", "\"relu\"")).contains("relu"));
    let gemma = include_str!("../presets/gemma-3-1b.json");
    let msg = refusal(&with(gemma, "use_bidirectional_attention", "true"));
    assert!(msg.contains("use_bidirectional_attention"), "{msg}");
}

#[test]
fn rope_dictionaries_are_checked_key_by_key() {
    let msg = refusal(&with(
        LLAMA,
        "rope_scaling",
        r#"{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "beta": 2}"#,
    ));
    assert!(msg.contains("rope_scaling.beta"), "{msg}");
    let msg = refusal(&with(LLAMA, "rope_scaling", r#"{"rope_type": "mrope"}"#));
    assert!(msg.contains("mrope"), "{msg}");
    let msg = refusal(&with(
        LLAMA,
        "rope_parameters",
        r#"{"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.75}"#,
    ));
    assert!(msg.contains("partial_rotary_factor"), "{msg}");
    // rope_type wins over type.
    let c = ModelConfig::from_json(
        &with(
            QWEN,
            "rope_scaling",
            r#"{"type": "dynamic", "rope_type": "linear", "factor": 2.0}"#,
        ),
        "t",
    )
    .unwrap();
    assert_eq!(c.rope.scaling, RopeScaling::Linear { factor: 2.0 });
}

#[test]
fn qwen_sliding_window_needs_use_sliding_window() {
    let c = ModelConfig::from_json(QWEN, "t").unwrap();
    assert_eq!(c.sliding_window, None);
    assert!(c.layer_types.iter().all(|k| *k == LayerKind::Full));
    let on = with(QWEN, "use_sliding_window", "true");
    let c = ModelConfig::from_json(&with(&on, "max_window_layers", "20"), "t").unwrap();
    assert_eq!(c.sliding_window, Some(32768));
    assert_eq!(c.layer_types[19], LayerKind::Full);
    assert_eq!(c.layer_types[20], LayerKind::Sliding);
}

#[test]
fn unknown_and_multimodal_model_types_are_refused() {
    assert!(refusal(&with(LLAMA, "model_type", "\"gpt2\"")).contains("gpt2"));
    assert!(refusal(&with(LLAMA, "model_type", "\"gemma3\"")).contains("gemma3_text"));
}

/// `--lora-targets` against each family's modules: PEFT's names resolve to the projections
/// they adapt; a fused name on a split model, or part of a fused module, is one line naming
/// the model's valid targets.
#[test]
fn lora_targets_are_checked_against_the_family_modules() {
    use crate::spec::{LoraModule, LoraTarget as T};
    let parse = |s: &str| LoraModule::parse_list(s).unwrap();
    let llama = ModelSource::resolve("llama-3.2-1b").unwrap().config;
    let phi = ModelSource::resolve("phi-3.5-mini").unwrap().config;
    assert_eq!(
        llama.lora_targets(&parse("q_proj,v")).unwrap(),
        [T::Q, T::V]
    );
    assert_eq!(
        llama.lora_targets(&parse("all-linear")).unwrap(),
        T::ALL.to_vec()
    );
    assert_eq!(
        phi.lora_targets(&parse("qkv_proj,o_proj")).unwrap(),
        [T::Q, T::K, T::V, T::O]
    );
    assert_eq!(
        phi.lora_targets(&parse("q,k,v,o,gate,up,down")).unwrap(),
        T::ALL.to_vec()
    );
    assert_eq!(
        phi.lora_targets(&parse("gate_up_proj")).unwrap(),
        [T::Gate, T::Up]
    );
    assert_eq!(
        phi.lora_module_names(),
        [
            "qkv_proj",
            "o_proj",
            "gate_up_proj",
            "down_proj",
            "all-linear"
        ]
    );
    let err = |c: &ModelConfig, s: &str| c.lora_targets(&parse(s)).unwrap_err().to_string();
    let e = err(&llama, "qkv_proj");
    assert!(
        e.contains("`qkv_proj`")
            && e.contains("LlamaForCausalLM")
            && e.contains(
                "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, all-linear"
            ),
        "{e}"
    );
    let e = err(&phi, "q_proj,o_proj");
    assert!(
        e.contains("`q_proj`")
            && e.contains("as one module `qkv_proj`")
            && e.contains("gate_up_proj"),
        "{e}"
    );
    let e = err(&phi, "gate,down");
    assert!(
        e.contains("`gate_proj`") && e.contains("`gate_up_proj`"),
        "{e}"
    );
    assert!(!e.contains('\n'));
}
