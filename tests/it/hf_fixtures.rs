//! lorascope against transformers + PEFT on the fixtures of `tests/fixtures/hf` (written by
//! `scripts/make_hf_fixtures.py`; see its README): for every case, the base model's logits at
//! the listed positions and its mean loss within 1e-5 relative, the adapted loss within 1e-5,
//! and every LoRA gradient within 1e-4 of the tensor's largest magnitude, with and without
//! gradient checkpointing; the resolved RoPE frequencies and parameter counts as transformers
//! reports them.

use candle_core::{DType, Device, Tensor};
use lorascope::engine::config::{LayerKind, ModelConfig, ModelSource};
use lorascope::engine::lora::{LoraConfig, target_modules};
use lorascope::engine::model::Model;
use lorascope::engine::weights::WeightSource;
use lorascope::spec::LoraTarget;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(case)
}

fn expected(case: &str) -> Value {
    let text = std::fs::read_to_string(dir(case).join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// `max |a - b| / max |b|`.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs() as f64));
    let err = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs()));
    err / scale.max(1e-30)
}

fn vec_of(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The fixture's rows (flattened) and the shifted targets (`labels[b][t+1]`, last -100).
fn rows_and_targets(e: &Value) -> (Vec<u32>, Vec<i64>, usize, usize) {
    let rows = e["rows"].as_array().unwrap();
    let labels = e["labels"].as_array().unwrap();
    let (b, t) = (rows.len(), rows[0].as_array().unwrap().len());
    let mut ids = Vec::new();
    let mut targets = Vec::new();
    for (r, l) in rows.iter().zip(labels) {
        let l: Vec<i64> = l
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect();
        ids.extend(
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32),
        );
        targets.extend(l[1..].iter().copied());
        targets.push(-100);
    }
    let shifted: Vec<i64> = e["shift_labels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()))
        .collect();
    assert_eq!(targets, shifted, "shift convention");
    (ids, targets, b, t)
}

fn build(case: &str, e: &Value) -> (ModelConfig, Model) {
    let src = ModelSource::resolve(dir(case).to_str().unwrap()).unwrap();
    let ws = WeightSource::open_dir(&dir(case)).unwrap().unwrap();
    let peft = &e["lora"]["peft_config"];
    let lora = LoraConfig {
        rank: peft["r"].as_u64().unwrap() as usize,
        alpha: peft["lora_alpha"].as_f64().unwrap(),
        dropout: 0.0,
        targets: LoraTarget::ALL.to_vec(),
    };
    let model = Model::new(&src.config, &lora, &ws, DType::F32, &Device::Cpu, 7).unwrap();
    (src.config, model)
}

fn check_case(case: &str) {
    let e = expected(case);
    let (cfg, mut model) = build(case, &e);
    let (ids, targets, b, t) = rows_and_targets(&e);
    assert_eq!(
        cfg.num_parameters() as u64,
        e["resolved"]["num_parameters"].as_u64().unwrap(),
        "{case}: parameter count"
    );
    // RoPE frequencies and attention factor as transformers held them after the forward.
    let tables = e["resolved"]["rope_tables_after_forward"]
        .as_object()
        .unwrap();
    for (kind, tab) in tables {
        let k = if kind == "sliding_attention" {
            LayerKind::Sliding
        } else {
            LayerKind::Full
        };
        let (inv, factor) = cfg.rope_for(k).inv_freq(cfg.head_dim, t);
        let want = f32s(&tab["inv_freq"]);
        assert!(
            rel_err(&inv, &want) < 1e-6,
            "{case} {kind}: inv_freq {inv:?} vs {want:?}"
        );
        let wf = tab["attention_scaling"].as_f64().unwrap();
        assert!(
            (factor - wf).abs() < 1e-6,
            "{case} {kind}: attention factor {factor} vs {wf}"
        );
    }
    // Base model (B = 0 at creation): logits and loss.
    let logits = model.logits(&ids, b, t).unwrap();
    let vocab = cfg.vocab_size;
    for (pos, want) in e["logits_positions"]
        .as_array()
        .unwrap()
        .iter()
        .zip(e["logits"].as_array().unwrap())
    {
        let (bi, ti) = (
            pos[0].as_u64().unwrap() as usize,
            pos[1].as_u64().unwrap() as usize,
        );
        let row = vec_of(&logits.narrow(0, bi * t + ti, 1).unwrap());
        assert_eq!(row.len(), vocab);
        let err = rel_err(&row, &f32s(want));
        assert!(
            err < 1e-5,
            "{case}: logits at [{bi}, {ti}] off by {err:e} (relative)"
        );
    }
    let check_loss = |got: f32, want: f64, what: &str| {
        let rel = ((got as f64 - want) / want).abs();
        assert!(
            rel < 1e-5,
            "{case}: {what} {got} vs transformers {want} ({rel:e})"
        );
    };
    let loss = model.loss(&ids, &targets, b, t, false).unwrap();
    check_loss(
        loss.to_scalar::<f32>().unwrap(),
        e["loss"].as_f64().unwrap(),
        "loss",
    );
    // Adapted model: PEFT's adapter, its loss and gradients.
    model
        .load_peft_adapter(&dir(case).join("adapter_model.safetensors"))
        .unwrap();
    let want_grads =
        candle_core::safetensors::load(dir(case).join("lora_grads.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(
        want_grads.len(),
        2 * model.adapters().len(),
        "{case}: adapter count"
    );
    // The saved adapter's `target_modules` are the family's PEFT module names.
    let peft_targets: Vec<String> = e["lora"]["peft_config"]["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect();
    assert_eq!(target_modules(&model.adapters()), peft_targets, "{case}");
    for ckpt in [false, true] {
        model.set_grad_checkpointing(ckpt);
        let loss = model.loss(&ids, &targets, b, t, false).unwrap();
        let what = format!("adapted loss (checkpointing {ckpt})");
        check_loss(
            loss.to_scalar::<f32>().unwrap(),
            e["lora"]["loss"].as_f64().unwrap(),
            &what,
        );
        let grads = model.backward(&loss).unwrap();
        for ad in model.adapters() {
            for (part, var) in [("lora_A", &ad.a), ("lora_B", &ad.b)] {
                let key = format!("{}.{part}.weight", ad.name);
                let want = vec_of(&want_grads[&key]);
                let got = vec_of(grads.get(var.as_tensor()).unwrap());
                let err = rel_err(&got, &want);
                assert!(
                    err < 1e-4,
                    "{case}: d{key} off by {err:e} (checkpointing {ckpt})"
                );
            }
        }
    }
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
