//! Tests of loading, validation and error locations.

use super::schema::default_targets;
use super::*;
use crate::spec::Device;

const GOOD: &str = r#"
[model]
preset = "tiny"

[data]
path = "sample"

[lora]
rank = 8
alpha = 16.0

[run]
steps = 12
warmup_steps = 2
devices = ["cpu"]

[grid]
batch_size = [1, 2]
seq_len = [64, 128]
"#;

fn err(src: &str) -> String {
    match parse_str(src, "p.toml") {
        Ok(_) => panic!("expected an error for:\n{src}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn parses_good_profile() {
    let p = parse_str(GOOD, "p.toml").unwrap();
    assert_eq!(p.model.preset.as_deref(), Some("tiny"));
    assert_eq!(p.run.steps, 12);
    assert_eq!(p.grid.batch_size, Some(vec![1, 2]));
    assert_eq!(p.lora.targets, default_targets());
    assert!(p.data.packing);
}

#[test]
fn bytes() {
    assert_eq!(parse_bytes("8GiB"), Some(8 << 30));
    assert_eq!(parse_bytes("512 MiB"), Some(512 << 20));
    assert_eq!(parse_bytes("8GB"), Some(8_000_000_000));
    assert_eq!(parse_bytes("1024"), Some(1024));
    assert_eq!(parse_bytes("eight"), None);
    assert_eq!(parse_bytes("8 GiBs"), None);
}

#[test]
fn line_col_counts_chars() {
    assert_eq!(line_col("a\nbé c", 6), (2, 4));
    assert_eq!(line_col("abc", 0), (1, 1));
}

#[test]
fn malformed_profiles() {
    let cases: Vec<(&str, String)> = vec![
        ("unknown_top_key", format!("{GOOD}\n[extra]\nx = 1\n")),
        (
            "unknown_run_key",
            GOOD.replace("steps = 12", "steps = 12\nstepz = 3"),
        ),
        (
            "bad_optimizer",
            format!("{GOOD}optimizer = [\"adamw\", \"adam\"]\n"),
        ),
        ("bad_precision", format!("{GOOD}precision = [\"fp8\"]\n")),
        (
            "seq_len_zero",
            GOOD.replace("seq_len = [64, 128]", "seq_len = [64, 0]"),
        ),
        (
            "empty_axis",
            GOOD.replace("batch_size = [1, 2]", "batch_size = []"),
        ),
        (
            "duplicate_axis_value",
            GOOD.replace("batch_size = [1, 2]", "batch_size = [2, 2]"),
        ),
        (
            "wrong_type",
            GOOD.replace("steps = 12", "steps = \"twelve\""),
        ),
        ("negative_steps", GOOD.replace("steps = 12", "steps = -1")),
        ("steps_zero", GOOD.replace("steps = 12", "steps = 0")),
        ("missing_steps", GOOD.replace("steps = 12\n", "")),
        (
            "missing_model",
            GOOD.replace("[model]\npreset = \"tiny\"\n", ""),
        ),
        (
            "model_both",
            GOOD.replace("preset = \"tiny\"", "preset = \"tiny\"\npath = \"m\""),
        ),
        (
            "bad_device",
            GOOD.replace("devices = [\"cpu\"]", "devices = [\"gpu0\"]"),
        ),
        (
            "bad_vram_limit",
            GOOD.replace(
                "warmup_steps = 2",
                "warmup_steps = 2\nvram_limit = \"8 gigs\"",
            ),
        ),
        (
            "bad_target",
            GOOD.replace("alpha = 16.0", "alpha = 16.0\ntargets = [\"q\", \"qkvo\"]"),
        ),
        (
            "dropout_range",
            GOOD.replace("alpha = 16.0", "alpha = 16.0\ndropout = 1.5"),
        ),
        ("syntax_error", GOOD.replace("steps = 12", "steps = 12 13")),
        (
            "unclosed_array",
            GOOD.replace("seq_len = [64, 128]", "seq_len = [64, 128"),
        ),
        (
            "exclude_unknown_key",
            format!("{GOOD}\n[[grid.exclude]]\nbatch = 2\n"),
        ),
        (
            "exclude_matches_nothing",
            format!("{GOOD}\n[[grid.exclude]]\nbatch_size = 4\n"),
        ),
        (
            "include_zero",
            format!("{GOOD}\n[[grid.include]]\nseq_len = 0\n"),
        ),
        (
            "bad_format",
            GOOD.replace("path = \"sample\"", "path = \"sample\"\nformat = \"json\""),
        ),
    ];
    let mut out = String::new();
    for (name, src) in &cases {
        out.push_str(&format!("{name}: {}\n", err(src)));
    }
    insta::assert_snapshot!(out);
}

#[test]
fn vram_limit_needs_a_cuda_device() {
    let src = GOOD.replace(
        "warmup_steps = 2",
        "warmup_steps = 2\nvram_limit = \"8GiB\"",
    );
    let e = err(&src);
    assert!(e.contains("vram_limit") && e.contains("CUDA"), "{e}");
    // line:column of the key, as other profile errors.
    let line = src
        .lines()
        .position(|l| l.starts_with("vram_limit"))
        .unwrap()
        + 1;
    assert!(e.contains(&format!(":{line}:")), "{e}");
    let ok = src.replace("devices = [\"cpu\"]", "devices = [\"cuda:0\"]");
    assert!(parse_str(&ok, "p.toml").is_ok());
}

#[test]
fn bytes_for_vram_limits() {
    assert_eq!(parse_bytes("7800MiB"), Some(7800 << 20));
    assert_eq!(parse_bytes("8GiB"), Some(8 << 30));
    assert_eq!(parse_bytes("8GB"), Some(8_000_000_000));
    assert_eq!(parse_bytes("0"), None);
}

#[test]
fn errors_are_one_line() {
    let e = err(&GOOD.replace("steps = 12", "steps = 12 13"));
    assert!(!e.contains('\n'), "{e}");
}

#[test]
fn embedded_quickstart_is_valid() {
    let lp = load_embedded().expect("embedded quickstart parses");
    assert_eq!(lp.profile.run.devices, vec!["cpu".to_string()]);
    assert_eq!(lp.source, EMBEDDED_QUICKSTART);
}

#[test]
fn all_visible_gpus() {
    let all = vec![ALL_GPUS.to_string()];
    let never = || -> Result<u32, String> { panic!("not asked") };
    assert_eq!(
        resolve_devices_with(&all, Some("2,3"), never),
        Ok(vec![Device::Cuda(2), Device::Cuda(3)])
    );
    assert_eq!(
        resolve_devices_with(&all, None, || Ok(2)),
        Ok(vec![Device::Cuda(0), Device::Cuda(1)])
    );
    // UUIDs in CUDA_VISIBLE_DEVICES: fall back to NVML's count.
    assert_eq!(
        resolve_devices_with(&all, Some("GPU-1a2b"), || Ok(1)),
        Ok(vec![Device::Cuda(0)])
    );
    assert!(
        resolve_devices_with(&all, None, || Ok(0))
            .unwrap_err()
            .contains("no GPU")
    );
    assert!(
        resolve_devices_with(&all, None, || Err("no driver".into()))
            .unwrap_err()
            .contains("no driver")
    );
    let listed = vec!["cuda:1".to_string(), "cuda:0".to_string()];
    assert_eq!(
        resolve_devices_with(&listed, Some("5"), never),
        Ok(vec![Device::Cuda(1), Device::Cuda(0)])
    );
    let p = parse_str(
        &GOOD.replace("devices = [\"cpu\"]", "devices = [\"cuda\"]"),
        "g.toml",
    );
    assert!(p.is_ok(), "{p:?}");
    let e = parse_str(
        &GOOD.replace("devices = [\"cpu\"]", "devices = [\"cuda\", \"cuda:0\"]"),
        "g.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("must be the only device"), "{e}");
}

/// `batch_size = ["max"]` parses to the search sentinel and serialises back as "max"; a word
/// other than "max", or "max" on both axes, is refused.
#[test]
fn max_axis_values() {
    let base = "[model]\npreset = \"tiny\"\n[data]\npath = \"sample\"\n[run]\nsteps = 2\n[grid]\n";
    let p = parse_str(&format!("{base}batch_size = [1, \"max\"]\n"), "p.toml").unwrap();
    assert_eq!(p.grid.batch_size, Some(vec![1, crate::profile::AXIS_MAX]));
    let back = toml::to_string(&p.grid).unwrap();
    assert!(back.contains("\"max\""), "{back}");
    let e = parse_str(&format!("{base}batch_size = [\"big\"]\n"), "p.toml").unwrap_err();
    assert!(e.to_string().contains("batch_size"), "{e}");
    let both = format!("{base}batch_size = [\"max\"]\nseq_len = [\"max\"]\n");
    let e = parse_str(&both, "p.toml").unwrap_err().to_string();
    assert!(e.contains("one axis at a time"), "{e}");
}

#[test]
fn duplicate_and_conflicting_keys_are_named() {
    let dup =
        "[model]\npreset = \"tiny\"\n[data]\npath = \"sample\"\n[run]\nsteps = 2\nsteps = 3\n";
    let e = err(dup);
    assert!(
        e.starts_with("p.toml:7:1: run.steps: duplicate key `run.steps`"),
        "{e}"
    );
    let dotted = "lora = 16\nlora.rank = 8\n[model]\npreset = \"tiny\"\n";
    let e = err(dotted);
    assert!(
        e.contains("lora.rank") && e.contains("`lora` is already set to a value of type integer"),
        "{e}"
    );
    let table = "[model]\npreset = \"tiny\"\n[model]\npreset = \"x\"\n";
    let e = err(table);
    assert!(e.contains("duplicate key `model`"), "{e}");
}

#[test]
fn grid_over_the_cap_is_refused_with_its_count() {
    let axis = |n: u32| {
        let v: Vec<String> = (1..=n).map(|i| i.to_string()).collect();
        format!("[{}]", v.join(", "))
    };
    let src = format!(
        "{GOOD}lora_rank = {}\ngrad_checkpointing = [false, true]\n",
        axis(30_000)
    );
    let e = err(&src.replace("seq_len = [64, 128]\n", "seq_len = [64]\n"));
    assert!(
        e.contains("grid: the grid has 120,000 points (batch_size 2 x lora_rank 30000 x grad_checkpointing 2, before exclude); at most 100,000"),
        "{e}"
    );
    // At the cap: accepted.
    let ok = format!("{GOOD}lora_rank = {}\n", axis(25_000));
    assert!(parse_str(&ok, "p.toml").is_ok());
}

#[test]
fn card_axis_needs_cuda_and_excludes_vram_limit() {
    let src = format!("{GOOD}card = [\"rtx4060\"]\n");
    let e = err(&src);
    assert!(e.contains("grid.card") && e.contains("CUDA"), "{e}");
    let cuda = src.replace("devices = [\"cpu\"]", "devices = [\"cuda:0\"]");
    assert!(parse_str(&cuda, "p.toml").is_ok());
    let both = cuda.replace(
        "warmup_steps = 2",
        "warmup_steps = 2\nvram_limit = \"8GiB\"",
    );
    let e = err(&both);
    assert!(e.contains("remove run.vram_limit"), "{e}");
    let unknown = cuda.replace("rtx4060", "rtx9999");
    let e = err(&unknown);
    assert!(e.contains("unknown card `rtx9999`"), "{e}");
}
