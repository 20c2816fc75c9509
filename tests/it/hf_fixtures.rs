//! lorascope against transformers + PEFT on the fixtures of `tests/fixtures/hf` (written by
//! `scripts/make_hf_fixtures.py`; see its README), through the library the
//! `lorascope selftest engine --fixtures` command runs: for every case on the CPU in fp32, with
//! and without gradient checkpointing, the base model's logits at the listed positions and its
//! mean loss within 1e-5 relative, the adapted loss within 1e-5, every LoRA gradient within 1e-4
//! of the tensor's largest magnitude; the resolved RoPE frequencies and parameter counts as
//! transformers reports them; and the adapter lorascope saves has PEFT's key names and
//! `target_modules` for the family.

use candle_core::{DType, Device};
use lorascope::engine::lora::save_peft;
use lorascope::engine::model::Model;
use lorascope::engine::selftest::fixtures::{Fixture, Variant, check_resolved, run_case};
use lorascope::engine::weights::WeightSource;
use lorascope::spec::Quant;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf")
}

fn check_case(case: &str) {
    let fx = Fixture::load(&root(), case).unwrap();
    let mut checks = vec![check_resolved(&fx).unwrap()];
    let fp32: Vec<Variant> = [false, true]
        .into_iter()
        .map(|checkpointing| Variant {
            dtype: DType::F32,
            checkpointing,
            quant: Quant::None,
        })
        .collect();
    checks.extend(run_case(&fx, &Device::Cpu, &fp32).unwrap());
    assert_eq!(checks.len(), 3);
    for c in &checks {
        assert!(c.pass(), "{case} {}: {:?}", c.variant, c.measures);
    }
    check_saved_adapter(&fx);
}

/// lorascope's saved adapter has exactly the tensor names of PEFT's adapter for the same
/// model (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`, Phi-3's
/// `qkv_proj` / `gate_up_proj`), the same shapes, and PEFT's `target_modules`.
fn check_saved_adapter(fx: &Fixture) {
    let dir = root().join(&fx.name);
    let ws = WeightSource::open_dir(&dir).unwrap().unwrap();
    let peft_cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    let lora = lorascope::engine::lora::LoraConfig {
        rank: peft_cfg["r"].as_u64().unwrap() as usize,
        alpha: peft_cfg["lora_alpha"].as_f64().unwrap(),
        dropout: 0.0,
        targets: vec![lorascope::spec::LoraModule::AllLinear],
    };
    let model = Model::new(fx.config(), &lora, &ws, DType::F32, &Device::Cpu, 7).unwrap();
    let out = tempfile::tempdir().unwrap();
    save_peft(out.path(), &model.adapters(), &lora, "fixture").unwrap();
    assert_eq!(
        crate::common::tensor_shapes(&out.path().join("adapter_model.safetensors")),
        crate::common::tensor_shapes(&dir.join("adapter_model.safetensors")),
        "{}: saved adapter keys",
        fx.name
    );
    let ours: Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    let mut want: Vec<&str> = peft_cfg["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    want.sort();
    assert_eq!(
        ours["target_modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap())
            .collect::<Vec<_>>(),
        want,
        "{}: target_modules",
        fx.name
    );
    for key in [
        "peft_type",
        "task_type",
        "r",
        "lora_alpha",
        "bias",
        "fan_in_fan_out",
    ] {
        assert_eq!(
            ours[key], peft_cfg[key],
            "{}: adapter_config.json `{key}`",
            fx.name
        );
    }
    assert_eq!(ours["base_model_name_or_path"], "fixture");
}

macro_rules! cases {
    ($($name:ident => $case:literal),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                check_case($case);
            }
        )*
        /// Every case directory has a test above.
        #[test]
        fn every_fixture_case_is_tested() {
            let listed = [$($case),*];
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf");
            for entry in std::fs::read_dir(root).unwrap() {
                let p = entry.unwrap().path();
                if p.join("expected.json").exists() && p.join("config.json").exists() {
                    let name = p.file_name().unwrap().to_str().unwrap().to_string();
                    assert!(listed.contains(&name.as_str()), "fixture {name} has no test");
                }
            }
        }
    };
}

cases! {
    qwen2 => "qwen2",
    qwen2_untied => "qwen2-untied",
    qwen2_legacy_rope_theta => "qwen2-legacy-rope-theta",
    qwen2_sliding => "qwen2-sliding",
    qwen2_sliding_legacy => "qwen2-sliding-legacy",
    llama => "llama",
    llama_bias => "llama-bias",
    llama_gelu_tanh => "llama-gelu-tanh",
    llama_rope_linear => "llama-rope-linear",
    llama_linear_legacy_type => "llama-linear-legacy-type",
    llama_rope_dynamic => "llama-rope-dynamic",
    llama3 => "llama3",
    llama3_legacy_spelling => "llama3-legacy-spelling",
    llama_yarn => "llama-yarn",
    qwen3 => "qwen3",
    qwen3_yarn => "qwen3-yarn",
    mistral => "mistral",
    gemma2 => "gemma2",
    gemma2_legacy => "gemma2-legacy",
    gemma3_text => "gemma3-text",
    gemma3_text_legacy => "gemma3-text-legacy",
    gemma3_text_softcap => "gemma3-text-softcap",
    gemma3_text_rope_linear => "gemma3-text-rope-linear",
    phi3 => "phi3",
    phi3_longrope => "phi3-longrope",
    phi3_longrope_short => "phi3-longrope-short",
    phi3_longrope_legacy => "phi3-longrope-legacy",
}
