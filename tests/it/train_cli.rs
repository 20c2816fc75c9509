//! `lorascope train` as a user (and the orchestrator) runs it: JSON lines on stdout, and one-line
//! errors with a non-zero exit for bad input, never a panic.

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_lorascope");

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    /// stdout of a `--json` run, one value per line, phase lines included.
    fn all_json_lines(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).expect("every stdout line is JSON"))
            .collect()
    }

    /// [`Out::all_json_lines`] less the phase lines: header, steps, summary.
    fn json_lines(&self) -> Vec<serde_json::Value> {
        let mut v = self.all_json_lines();
        v.retain(|l| l["type"] != "phase");
        v
    }
}

fn train(args: &[&str]) -> Out {
    train_env(args, &[])
}

/// [`train`] with environment variables set (`Some`) or removed (`None`).
fn train_env(args: &[&str], env: &[(&str, Option<&str>)]) -> Out {
    let mut cmd = Command::new(BIN);
    cmd.arg("train");
    for (flag, value) in [("--steps", "2"), ("--seq-len", "32"), ("--batch-size", "1")] {
        if !args.contains(&flag) {
            cmd.args([flag, value]);
        }
    }
    for (key, value) in env {
        match value {
            Some(v) => cmd.env(key, v),
            None => cmd.env_remove(key),
        };
    }
    let o = cmd.args(args).output().expect("run lorascope");
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into(),
        stderr: String::from_utf8_lossy(&o.stderr).into(),
    }
}

/// Assert a failure with exactly one stderr line containing every `needle`.
fn assert_one_line_error(o: &Out, needles: &[&str]) {
    assert_ne!(o.code, 0, "expected failure, stderr: {}", o.stderr);
    assert!(!o.stderr.contains("panicked"), "panic: {}", o.stderr);
    assert!(!o.stderr.contains("stack backtrace"), "{}", o.stderr);
    let lines: Vec<&str> = o.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {}", o.stderr);
    for n in needles {
        assert!(lines[0].contains(n), "`{n}` not in: {}", lines[0]);
    }
    assert!(o.stdout.is_empty() || o.stdout.lines().all(|l| l.starts_with('{')));
}

#[test]
fn json_output_is_header_steps_summary() {
    let o = train(&["--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    // Phase lines aside (see `json_output_has_phases_in_order`).
    let (phases, lines): (Vec<_>, Vec<_>) = o
        .all_json_lines()
        .into_iter()
        .partition(|l| l["type"] == "phase");
    assert!(!phases.is_empty());
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[0]["type"], "header");
    assert_eq!(lines[0]["synthetic_weights"], true);
    assert_eq!(lines[1]["type"], "step");
    assert_eq!(lines[1]["step"], 1);
    for k in ["tokens", "padded_tokens", "step_seconds", "loss", "lr"] {
        assert!(lines[1].get(k).is_some(), "missing {k}");
    }
    assert_eq!(lines[3]["type"], "summary");
    assert_eq!(lines[3]["status"], "ok");
}

#[test]
fn human_output_says_synthetic_weights() {
    let o = train(&[]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.is_empty());
    assert!(o.stderr.contains("synthetic weights"), "{}", o.stderr);
}

/// `LORASCOPE_PROFILE=1` and `=host` print the section table after the run (timed steps only),
/// with the step's parts and the engine's ops; host mode prints no per-section pool peak.
#[test]
fn profile_modes_print_section_tables() {
    for (mode, title) in [
        ("1", "profile (device-synchronised"),
        ("HOST", "profile (host issue time"),
    ] {
        let o = Command::new(BIN)
            .args([
                "train",
                "--steps",
                "3",
                "--warmup-steps",
                "1",
                "--seq-len",
                "32",
            ])
            .args(["--grad-checkpointing", "--lora-dropout", "0.1"])
            .env("LORASCOPE_PROFILE", mode)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        assert!(err.contains(title), "{mode}: {err}");
        for section in [
            "step.forward ",
            "step.backward ",
            "ckpt-layer.recompute ",
            "rms-norm.bwd ",
        ] {
            let line = err
                .lines()
                .find(|l| l.starts_with(section))
                .unwrap_or_else(|| panic!("{mode}: no {section} in {err}"));
            // 2 timed steps of the 4-layer tiny preset.
            let calls: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
            if section.starts_with("step.") {
                assert_eq!(calls, 2, "{mode}: warm-up steps are not timed: {line}");
            } else {
                assert!(calls >= 8, "{mode}: {line}");
            }
            let peak = line.split_whitespace().last().unwrap();
            assert_eq!(peak == "-", mode == "HOST", "{mode}: {line}");
        }
    }
}

fn model_dir(dir: &Path, config: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config).unwrap();
}

const TINY: &str = include_str!("../../src/engine/presets/tiny.json");

#[test]
fn unknown_model_type() {
    let d = tempfile::tempdir().unwrap();
    model_dir(d.path(), &TINY.replace("\"qwen2\"", "\"mamba\""));
    let o = train(&["--model", d.path().to_str().unwrap()]);
    assert_one_line_error(&o, &["config.json", "mamba", "qwen2"]);
}

#[test]
fn missing_model_directory() {
    let o = train(&["--model", "/nonexistent/model"]);
    assert_one_line_error(&o, &["/nonexistent/model", "preset"]);
}

/// Write a real tiny checkpoint with `lorascope`'s own saver through a short training run is not
/// possible from the CLI, so build one by hand with the safetensors crate.
fn write_checkpoint(
    dir: &Path,
    f: impl Fn(&str, &[usize]) -> Option<(safetensors::Dtype, Vec<usize>)>,
) {
    use lorascope::engine::config::ModelConfig;
    use lorascope::engine::weights::tensor_names;
    let cfg = ModelConfig::from_json(TINY, "tiny").unwrap();
    let mut bufs: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, shape) in tensor_names(&cfg) {
        let Some((dt, shape)) = f(&name, &shape) else {
            continue;
        };
        let n: usize = shape.iter().product();
        let bytes = vec![0u8; n * dt.bitsize() / 8];
        bufs.push((name, dt, shape, bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = bufs
        .iter()
        .map(|(n, dt, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*dt, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

#[test]
fn truncated_safetensors() {
    let d = tempfile::tempdir().unwrap();
    model_dir(d.path(), TINY);
    write_checkpoint(d.path(), |_, s| Some((safetensors::Dtype::F32, s.to_vec())));
    let p = d.path().join("model.safetensors");
    let len = std::fs::metadata(&p).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(len / 2).unwrap();
    let o = train(&["--model", d.path().to_str().unwrap()]);
    assert_one_line_error(&o, &["model.safetensors", "truncated"]);
}

#[test]
fn missing_tensor() {
    let d = tempfile::tempdir().unwrap();
    model_dir(d.path(), TINY);
    write_checkpoint(d.path(), |n, s| {
        (n != "model.layers.2.mlp.up_proj.weight").then(|| (safetensors::Dtype::F32, s.to_vec()))
    });
    let o = train(&["--model", d.path().to_str().unwrap()]);
    assert_one_line_error(
        &o,
        &[
            "model.safetensors",
            "model.layers.2.mlp.up_proj.weight",
            "missing",
        ],
    );
}

#[test]
fn wrong_shape_tensor() {
    let d = tempfile::tempdir().unwrap();
    model_dir(d.path(), TINY);
    write_checkpoint(d.path(), |n, s| {
        let mut s = s.to_vec();
        if n == "model.layers.0.self_attn.k_proj.weight" {
            s[0] += 1;
        }
        Some((safetensors::Dtype::F32, s))
    });
    let o = train(&["--model", d.path().to_str().unwrap()]);
    assert_one_line_error(&o, &["k_proj.weight", "[65, 256]", "expected [64, 256]"]);
}

#[test]
fn wrong_dtype_tensor() {
    let d = tempfile::tempdir().unwrap();
    model_dir(d.path(), TINY);
    write_checkpoint(d.path(), |n, s| {
        let dt = if n == "model.norm.weight" {
            safetensors::Dtype::I64
        } else {
            safetensors::Dtype::BF16
        };
        Some((dt, s.to_vec()))
    });
    let o = train(&["--model", d.path().to_str().unwrap()]);
    assert_one_line_error(&o, &["model.norm.weight", "I64", "bf16, f16 or f32"]);
}

#[test]
fn missing_shard() {
    let d = tempfile::tempdir().unwrap();
    model_dir(d.path(), TINY);
    std::fs::write(
        d.path().join("model.safetensors.index.json"),
        r#"{"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let o = train(&["--model", d.path().to_str().unwrap()]);
    assert_one_line_error(&o, &["model-00001-of-00002.safetensors", "missing"]);
}

#[test]
fn dataset_line_not_json() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("bad.jsonl");
    std::fs::write(&p, "{\"text\": \"ok\"}\n{not json\n").unwrap();
    let o = train(&["--data", p.to_str().unwrap()]);
    assert_one_line_error(&o, &["bad.jsonl", "line 2"]);
}

#[test]
fn dataset_missing_field() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.json");
    std::fs::write(
        &p,
        r#"[{"instruction": "x", "output": "y"}, {"instruction": "z"}]"#,
    )
    .unwrap();
    let o = train(&["--data", p.to_str().unwrap()]);
    assert_one_line_error(&o, &["a.json", "output"]);
}

#[test]
fn dataset_empty() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("empty.jsonl");
    std::fs::write(&p, "\n").unwrap();
    let o = train(&["--data", p.to_str().unwrap()]);
    assert_one_line_error(&o, &["empty.jsonl", "empty"]);
}

#[test]
fn dataset_missing_file() {
    let o = train(&["--data", "/no/such/data.jsonl"]);
    assert_one_line_error(&o, &["/no/such/data.jsonl"]);
}

#[test]
fn seq_len_above_max_positions() {
    let o = train(&["--seq-len", "4096"]);
    assert_one_line_error(&o, &["4096", "max_position_embeddings", "2048"]);
}

#[test]
fn unsupported_option_is_refused_clearly() {
    let o = train(&["--quant", "int3"]);
    assert_one_line_error(&o, &["int3", "nf4"]);
    let o = train(&["--device", "cuda:0"]);
    assert_one_line_error(&o, &["cuda"]);
}

/// `--optimizer paged_adamw8bit` runs on CPU; the header says paging is emulated as unpaged
/// and puts all optimizer state in host memory; the summary repeats the split.
#[test]
fn paged_optimizer_runs_on_cpu_as_unpaged() {
    let o = train(&["--optimizer", "paged_adamw8bit", "--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let lines = o.json_lines();
    let h = &lines[0];
    assert_eq!(h["options"]["optimizer"], "paged_adamw8bit");
    let note = h["optimizer_note"].as_str().unwrap();
    assert!(note.contains("emulated as unpaged on CPU"), "{note}");
    assert_eq!(h["optimizer_state_managed_bytes"], 0);
    assert_eq!(h["optimizer_state_device_bytes"], 0);
    let host = h["optimizer_state_host_bytes"].as_u64().unwrap();
    assert!(host > 0);
    assert_eq!(h["optimizer_state_bytes"].as_u64().unwrap(), host);
    assert!(h["vram_limit_bytes"].is_null());
    let s = lines.last().unwrap();
    assert_eq!(s["type"], "summary");
    assert_eq!(s["optimizer_state_host_bytes"].as_u64().unwrap(), host);
    // Human output says it too.
    let o = train(&["--optimizer", "paged_adamw"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stderr.contains("emulated as unpaged on CPU"),
        "{}",
        o.stderr
    );
}

/// `--vram-limit` needs a CUDA device: on CPU it is refused with one line; a malformed size
/// and an unknown optimizer are refused the same way.
#[test]
fn vram_limit_on_cpu_and_bad_values_are_refused() {
    let o = train(&["--vram-limit", "8GiB"]);
    assert_one_line_error(&o, &["--vram-limit 8GiB", "CUDA", "remove --vram-limit"]);
    let o = train(&["--vram-limit", "8 gigs", "--device", "cuda:0"]);
    assert_one_line_error(&o, &["--vram-limit 8 gigs", "8GiB"]);
    let o = train(&["--optimizer", "lion"]);
    assert_one_line_error(&o, &["lion", "paged_adamw8bit"]);
}

/// The `qwen2.5-1.5b` preset (synthetic weights of the real shape) runs one CPU step at batch 1,
/// seq 64, and reports the architecture's parameter counts: 1,543,714,304 base parameters plus
/// 18,464,768 for LoRA r=16 on all seven projections of 28 layers. Needs ~7.5 GB of RAM.
#[test]
fn qwen_1_5b_preset_runs_one_cpu_step() {
    let o = train(&[
        "--model",
        "qwen2.5-1.5b",
        "--seq-len",
        "64",
        "--steps",
        "1",
        "--warmup-steps",
        "0",
        "--json",
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let lines = o.json_lines();
    assert_eq!(lines[0]["params_total"], 1_543_714_304u64 + 18_464_768);
    assert_eq!(lines[0]["params_trainable"], 18_464_768u64);
    assert_eq!(lines[0]["synthetic_weights"], true);
    let loss = lines[1]["loss"].as_f64().unwrap();
    // Near-uniform prediction over 151,936 tokens: ln(151936) = 11.93.
    assert!(
        loss.is_finite() && (loss - 11.93).abs() < 1.5,
        "loss {loss}"
    );
}

/// `selftest engine` runs the whole model in fp32 (checkpointed), fp16 and bf16, dense and
/// NF4, with and without checkpointing, on the chosen device and compares it with the CPU path. On the CPU the
/// same-precision comparison is exact, so the test checks the table and the cost of half
/// precision against f32 (fp16 dense logits within 1e-2 of f32; bf16 within 5e-2).
#[test]
fn selftest_engine_on_cpu_compares_half_precision_with_f32() {
    let o = std::process::Command::new(BIN)
        .args(["selftest", "engine", "--device", "cpu"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The lines `pick` selects: `count` of them, each saying `says` and ending in `ok`.
    let checked = |pick: fn(&str) -> bool, count: usize, says: &str| -> Vec<&str> {
        let lines: Vec<&str> = stdout.lines().filter(|l| pick(l)).collect();
        assert_eq!(lines.len(), count, "{stdout}");
        for l in &lines {
            assert!(l.contains(says) && l.ends_with("ok"), "{stdout}");
        }
        lines
    };
    // NF4 quantisation and dequantisation on the device against the host loops, and the kernel
    // checks (SwiGLU, dropout, RMSNorm, RoPE, the row copy): on the CPU both sides are the CPU
    // code, so nothing may differ.
    checked(
        |l| l.starts_with("nf4 quantize"),
        3,
        " 0 packed bytes and 0 block absmax values differ",
    );
    checked(|l| l.starts_with("nf4 dequantize"), 3, " 0 values differ");
    checked(|l| l.starts_with("synthetic weights"), 1, "|mean| / std0");
    let kernels = checked(|l| l.contains("max rel error"), 22, "max rel error 0.0e0");
    for name in [
        "swiglu fwd",
        "swiglu bwd",
        "swiglu bwd in place",
        "lora dropout",
        "rms norm",
        "rope",
        "row copy",
    ] {
        assert!(
            kernels.iter().any(|l| l.starts_with(name)),
            "{name}: {stdout}"
        );
    }
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .skip(1)
        .filter(|l| {
            !l.starts_with("nf4 ")
                && !l.starts_with("synthetic weights")
                && !l.contains("max rel error")
        })
        .map(|l| l.split_whitespace().collect())
        .collect();
    // fp32 ckpt, fp16, fp16 ckpt, bf16, bf16 ckpt; dense and NF4.
    assert_eq!(rows.len(), 10, "{stdout}");
    for r in &rows {
        assert_eq!(r.last(), Some(&"ok"), "{stdout}");
        let vs_f32: f64 = r[r.len() - 2].parse().unwrap();
        let bound = match r[0] {
            "fp32" => 1e-6,
            "fp16" => 1e-2,
            _ => 5e-2,
        };
        if r[1] == "dense" {
            assert!(vs_f32 < bound, "{}: logits vs f32 {vs_f32}", r.join(" "));
        }
    }
}

/// `selftest optim` in a build without CUDA says so in one line (exit 1).
#[cfg(not(feature = "cuda"))]
#[test]
fn selftest_optim_without_cuda_says_so() {
    let o = Command::new(BIN)
        .args(["selftest", "optim"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--features cuda"), "{err}");
}

/// tokens/s is measured after warm-up; when warm-up covers every step the summary says so.
#[test]
fn tokens_per_s_says_when_every_step_was_warm_up() {
    let o = train(&["--steps", "2", "--warmup-steps", "5"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stderr.contains("every step was warm-up"), "{}", o.stderr);
    let o = train(&["--steps", "3", "--warmup-steps", "1", "--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let summary = o.json_lines().pop().unwrap();
    assert_eq!(summary["timed_steps"], 2, "{summary}");
}

/// Phase lines come in order, each once, at rising times: the weights load before the
/// header, then warm-up, then the timed steps (on CPU no kernels compile).
#[test]
fn json_output_has_phases_in_order() {
    let o = train(&["--json", "--steps", "3", "--warmup-steps", "1"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let lines = o.all_json_lines();
    let kinds: Vec<String> = lines
        .iter()
        .map(|l| match l["type"].as_str().unwrap() {
            "phase" => l["phase"].as_str().unwrap().to_string(),
            t => t.to_string(),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "loading_weights",
            "header",
            "warmup",
            "step",
            "timed",
            "step",
            "step",
            "summary"
        ]
    );
    let times: Vec<f64> = lines
        .iter()
        .filter(|l| l["type"] == "phase")
        .map(|l| l["t_s"].as_f64().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
}

/// A step whose backward runs out of memory once is run again (after the step's tensors are
/// freed and the pool is trimmed) and the run goes on: the same losses as a run without the
/// failure (the retry draws the same dropout masks), the summary counts the retry, and stderr
/// says so.
#[test]
fn a_step_that_runs_out_of_memory_once_is_retried() {
    let run = |inject: bool| {
        let out = train_env(
            &[
                "--json",
                "--steps",
                "3",
                "--lora-dropout",
                "0.1",
                "--lr",
                "1e-2",
            ],
            &[("LORASCOPE_TEST_ONLY_OOM_STEP", inject.then_some("2"))],
        );
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert_eq!(
            out.stderr.contains("step 2: out of memory"),
            inject,
            "{}",
            out.stderr
        );
        out.json_lines()
    };
    let (plain, retried) = (run(false), run(true));
    let losses = |v: &[serde_json::Value]| -> Vec<f64> {
        v.iter()
            .filter(|l| l["type"] == "step")
            .map(|l| l["loss"].as_f64().unwrap())
            .collect()
    };
    assert_eq!(losses(&plain).len(), 3);
    assert_eq!(losses(&plain), losses(&retried));
    let summary = |v: &[serde_json::Value]| v.last().unwrap().clone();
    assert_eq!(
        summary(&retried)["oom_retries"],
        1,
        "{:?}",
        summary(&retried)
    );
    assert!(summary(&plain).get("oom_retries").is_none());
}

/// A value of `LORASCOPE_ATTN_CHUNK` or `LORASCOPE_MEM_AVAILABLE` that does not parse is named
/// in one warning line (and the default used), not silently ignored.
#[test]
fn bad_environment_values_are_named() {
    let o = train_env(
        &["--steps", "1", "--json"],
        &[
            ("LORASCOPE_ATTN_CHUNK", Some("abc")),
            ("LORASCOPE_MEM_AVAILABLE", Some("lots")),
        ],
    );
    let stderr = &o.stderr;
    assert_eq!(o.code, 0, "{stderr}");
    let warned = |needle: &str| stderr.lines().filter(|l| l.contains(needle)).count();
    assert_eq!(
        warned("LORASCOPE_ATTN_CHUNK=\"abc\" is not a number"),
        1,
        "{stderr}"
    );
    assert_eq!(
        warned("LORASCOPE_MEM_AVAILABLE=\"lots\" is neither a size"),
        1,
        "{stderr}"
    );
}
