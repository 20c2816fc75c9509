//! Every model family through the command line, on the tiny transformers fixtures of
//! `tests/fixtures/hf`: QLoRA (`--quant nf4`) training runs with a finite, falling loss; the
//! adapter `--save-adapter` writes has PEFT's names for the family; `--lora-targets` takes PEFT's
//! module names and refuses, in one line naming the valid ones, a module the family lacks; and
//! `selftest engine --fixtures` compares a subset of cases on the CPU, one line per variant.

use std::path::{Path, PathBuf};

use crate::common::tensor_shapes;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_lorascope");

/// One case per family.
const FAMILIES: &[&str] = &[
    "qwen2",
    "qwen3",
    "llama",
    "mistral",
    "gemma2",
    "gemma3-text",
    "phi3",
];

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(case)
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(args: &[&str]) -> Out {
    let o = Command::new(BIN)
        .args(args)
        .output()
        .expect("run lorascope");
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into(),
        stderr: String::from_utf8_lossy(&o.stderr).into(),
    }
}

/// `lorascope train --json` on fixture `case` with `extra` flags; the per-step losses.
fn train_losses(case: &str, extra: &[&str]) -> (Out, Vec<f64>) {
    let model = fixture(case);
    let mut args = vec![
        "train",
        "--model",
        model.to_str().unwrap(),
        "--steps",
        "12",
        "--warmup-steps",
        "0",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--lr",
        "1e-2",
        "--json",
    ];
    // A flag given in `extra` replaces the default above (clap refuses a repeated flag).
    for pair in extra.chunks(2) {
        if let Some(i) = args.iter().position(|a| *a == pair[0])
            && pair.len() == 2
        {
            args.drain(i..i + 2);
        }
    }
    args.extend_from_slice(extra);
    let o = run(&args);
    let losses = o
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "step")
        .filter_map(|v| v["loss"].as_f64())
        .collect();
    (o, losses)
}

/// QLoRA on every family: NF4 base weights, the loss finite at every step, and the mean of the
/// last three steps below the mean of the first three.
#[test]
fn nf4_training_loss_falls_on_every_family() {
    for case in FAMILIES {
        let (o, losses) = train_losses(case, &["--quant", "nf4"]);
        assert_eq!(o.code, 0, "{case}: {}", o.stderr);
        let header: serde_json::Value = o
            .stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["type"] == "header")
            .unwrap_or_default();
        assert_eq!(header["quant"], "nf4", "{case}: {header}");
        assert_eq!(losses.len(), 12, "{case}: {}", o.stdout);
        assert!(losses.iter().all(|l| l.is_finite()), "{case}: {losses:?}");
        let first: f64 = losses[..3].iter().sum::<f64>() / 3.0;
        let last: f64 = losses[losses.len() - 3..].iter().sum::<f64>() / 3.0;
        assert!(last < first, "{case}: loss did not fall: {losses:?}");
    }
}

/// The adapter a run saves has the tensor names, shapes and `target_modules` of the adapter
/// PEFT saved for the same model (Phi-3: `qkv_proj`, `gate_up_proj`), and names the model
/// directory as `base_model_name_or_path`.
#[test]
fn saved_adapter_has_peft_names_on_every_family() {
    for case in FAMILIES {
        let out = tempfile::tempdir().unwrap();
        let dir = out.path().join("adapter");
        let (o, _) = train_losses(
            case,
            &[
                "--steps",
                "1",
                "--lora-rank",
                "4",
                "--lora-targets",
                "all-linear",
                "--save-adapter",
                dir.to_str().unwrap(),
            ],
        );
        assert_eq!(o.code, 0, "{case}: {}", o.stderr);
        assert_eq!(
            tensor_shapes(&dir.join("adapter_model.safetensors")),
            tensor_shapes(&fixture(case).join("adapter_model.safetensors")),
            "{case}"
        );
        let read = |f: PathBuf| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap()
        };
        let ours = read(dir.join("adapter_config.json"));
        let peft = read(fixture(case).join("adapter_config.json"));
        assert_eq!(ours["target_modules"], peft["target_modules"], "{case}");
        assert_eq!(
            ours["base_model_name_or_path"],
            fixture(case).to_str().unwrap(),
            "{case}"
        );
    }
}

/// A preset's saved adapter names its Hub model, so `PeftModel.from_pretrained` finds the base.
#[test]
fn saved_adapter_of_a_preset_names_the_hub_model() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("adapter");
    let o = run(&[
        "train",
        "--model",
        "tiny",
        "--steps",
        "1",
        "--seq-len",
        "16",
        "--batch-size",
        "1",
        "--save-adapter",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    // `tiny` is no Hub model: named as given.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["base_model_name_or_path"], "tiny");
    assert_eq!(
        cfg["lora_alpha"], 32,
        "an integral alpha is written as PEFT writes it"
    );
}

/// `--lora-targets` with PEFT's names: Phi-3's fused modules train; a fused name on a family
/// without it, or part of a fused module, fails with one line naming the family's targets.
#[test]
fn lora_targets_follow_the_family_modules() {
    let (o, losses) = train_losses(
        "phi3",
        &["--steps", "2", "--lora-targets", "qkv_proj,o_proj"],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(losses.len(), 2);
    let (o, _) = train_losses(
        "llama",
        &["--steps", "2", "--lora-targets", "q_proj,v_proj"],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    for (case, targets, needles) in [
        (
            "llama",
            "qkv_proj",
            &[
                "`qkv_proj`",
                "LlamaForCausalLM",
                "q_proj, k_proj, v_proj, o_proj",
            ][..],
        ),
        (
            "qwen2",
            "gate_up_proj,down",
            &["`gate_up_proj`", "Qwen2ForCausalLM", "gate_proj, up_proj"][..],
        ),
        (
            "phi3",
            "q_proj,v_proj",
            &[
                "`q_proj`",
                "Phi3ForCausalLM",
                "qkv_proj",
                "o_proj, gate_up_proj, down_proj, all-linear",
            ][..],
        ),
        ("phi3", "lm_head", &["lm_head", "all-linear"][..]),
    ] {
        let (o, _) = train_losses(case, &["--lora-targets", targets]);
        assert_ne!(o.code, 0, "{case} {targets}: {}", o.stdout);
        assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
        let lines: Vec<&str> = o.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{case} {targets}: {}", o.stderr);
        for n in needles {
            assert!(
                lines[0].contains(n),
                "{case} {targets}: `{n}` not in {}",
                lines[0]
            );
        }
    }
}

/// `selftest engine --device cpu --fixtures DIR --cases ...`: a config line and ten variant
/// lines per case, each PASS with its errors under tolerance; an unknown case is one line.
#[test]
fn selftest_engine_fixtures_on_cpu() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf");
    let o = run(&[
        "selftest",
        "engine",
        "--device",
        "cpu",
        "--fixtures",
        root.to_str().unwrap(),
        "--cases",
        "qwen3,phi3",
    ]);
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    let rows: Vec<&str> = o
        .stdout
        .lines()
        .filter(|l| l.starts_with("qwen3 ") || l.starts_with("phi3 "))
        .collect();
    // config, six dense variants, two NF4 with checkpointing (on the CPU the NF4 reference
    // itself is not listed).
    assert_eq!(rows.len(), 2 * 9, "{}", o.stdout);
    for r in &rows {
        assert!(r.ends_with("PASS"), "{r}");
    }
    for v in [
        "fp32 dense ",
        "bf16 dense ckpt",
        "fp16 dense",
        "bf16 nf4 ckpt",
        "config",
    ] {
        assert!(
            rows.iter().any(|r| r.contains(v)),
            "no `{v}` line:\n{}",
            o.stdout
        );
    }
    assert!(
        o.stdout.lines().last().unwrap().starts_with("all PASS"),
        "{}",
        o.stdout
    );
    let o = run(&[
        "selftest",
        "engine",
        "--device",
        "cpu",
        "--fixtures",
        root.to_str().unwrap(),
        "--cases",
        "qwen9",
    ]);
    assert_eq!(o.code, 1);
    assert_eq!(o.stderr.lines().count(), 1, "{}", o.stderr);
    assert!(
        o.stderr.contains("qwen9") && o.stderr.contains("phi3"),
        "{}",
        o.stderr
    );
}
