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
