//! Tests of point expansion, stable ids, worker arguments, and the import direction of the
//! data modules.

use std::path::Path;

use super::*;
use crate::profile::{PartialPoint, parse_str};
use crate::spec::Optimizer;

const BASE: &str = r#"
[model]
preset = "tiny"
[data]
path = "sample"
[run]
steps = 10
warmup_steps = 2
[grid]
batch_size = [1, 2]
seq_len = [64, 128]
optimizer = ["adamw", "paged_adamw8bit"]
"#;

fn specs(src: &str) -> Vec<RunSpec> {
    let p = parse_str(src, "t.toml").unwrap();
    expand_profile(&p, Path::new("/profiles"))
}

#[test]
fn factorial_order_and_count() {
    let s = specs(BASE);
    assert_eq!(s.len(), 8);
    let labels: Vec<String> = s.iter().map(|s| s.label()).collect();
    assert_eq!(labels[0], "bs1 seq64 adamw fp32 none r16");
    assert_eq!(labels[1], "bs1 seq64 paged_adamw8bit fp32 none r16");
    assert_eq!(labels[2], "bs1 seq128 adamw fp32 none r16");
    assert_eq!(labels[7], "bs2 seq128 paged_adamw8bit fp32 none r16");
    assert!(s.iter().enumerate().all(|(i, s)| s.index == i));
}

#[test]
fn excludes_and_includes() {
    let src = format!(
        "{BASE}\n[[grid.exclude]]\nbatch_size = 2\nseq_len = 128\n\
         [[grid.exclude]]\noptimizer = \"paged_adamw8bit\"\nseq_len = 64\n\
         [[grid.include]]\nbatch_size = 8\nprecision = \"bf16\"\n\
         [[grid.include]]\nbatch_size = 1\n"
    );
    let s = specs(&src);
    let labels: Vec<String> = s.iter().map(|s| s.label()).collect();
    assert_eq!(
        labels,
        vec![
            "bs8 seq64 adamw bf16 none r16",
            // include {batch_size=1} = the first factorial point: kept once, here
            "bs1 seq64 adamw fp32 none r16",
            "bs1 seq128 adamw fp32 none r16",
            "bs1 seq128 paged_adamw8bit fp32 none r16",
            "bs2 seq64 adamw fp32 none r16",
        ]
    );
}

#[test]
fn ids_are_stable_and_sensitive() {
    let a = specs(BASE);
    let b = specs(BASE);
    assert_eq!(a, b);
    let ids: std::collections::HashSet<_> = a.iter().map(|s| s.id.clone()).collect();
    assert_eq!(ids.len(), a.len());
    assert!(a.iter().all(|s| s.id.len() == 12));
    // Frozen: changing the canonical form must be deliberate (bump the v1 prefix).
    insta::assert_snapshot!(
        a.iter()
            .map(|s| s.id.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    );

    // Name, repeats and device index do not change ids; steps and device kind do.
    let renamed = specs(&format!("name = \"other\"\n{BASE}").replace(
        "warmup_steps = 2",
        "warmup_steps = 2\nrepeats = 3\ndevices = [\"cpu\"]",
    ));
    assert_eq!(renamed[0].id, a[0].id);
    let more_steps = specs(&BASE.replace("steps = 10", "steps = 11"));
    assert_ne!(more_steps[0].id, a[0].id);
    let gpu0 = specs(&BASE.replace(
        "warmup_steps = 2",
        "warmup_steps = 2\ndevices = [\"cuda:0\"]",
    ));
    let gpu1 = specs(&BASE.replace(
        "warmup_steps = 2",
        "warmup_steps = 2\ndevices = [\"cuda:1\", \"cuda:0\"]",
    ));
    assert_ne!(gpu0[0].id, a[0].id);
    assert_eq!(gpu0[0].id, gpu1[0].id);
    // Target order is canonicalised.
    let t1 = specs(&format!("{BASE}\n[lora]\ntargets = [\"v\", \"q\"]\n"));
    let t2 = specs(&format!("{BASE}\n[lora]\ntargets = [\"q\", \"v\"]\n"));
    assert_eq!(t1[0].id, t2[0].id);
}

#[test]
fn train_args() {
    let src = BASE.replace(
        "path = \"sample\"",
        "path = \"data/a.jsonl\"\npacking = false",
    ) + "grad_checkpointing = [true]\nquant = [\"nf4\"]\n";
    let src = src.replace(
        "warmup_steps = 2",
        "warmup_steps = 2\nvram_limit = \"8GiB\"\ndevices = [\"cuda:1\"]\nlr = 0.0002",
    );
    let s = specs(&src);
    insta::assert_snapshot!(s[0].train_args().join(" "), @"train --model tiny --data /profiles/data/a.jsonl --format auto --batch-size 1 --seq-len 64 --steps 10 --warmup-steps 2 --lora-rank 16 --lora-alpha 32 --lora-dropout 0 --lora-targets q,k,v,o --lr 0.0002 --seed 0 --device cuda:0 --precision fp32 --quant nf4 --optimizer adamw --vram-limit 8GiB --no-packing --grad-checkpointing --json");
}

#[test]
fn embedded_quickstart_has_four_points() {
    let lp = crate::profile::load_embedded().expect("embedded quickstart parses");
    assert_eq!(expand(&lp).len(), 4);
}

/// The profile decides "an exclude matches nothing" and "no point is left" from the axes
/// alone; here every small combination of excludes (and an include or none) is checked
/// against the expansion itself.
#[test]
fn profile_validation_agrees_with_the_expansion() {
    let base = parse_str(
        &BASE.replace(
            "optimizer = [\"adamw\", \"paged_adamw8bit\"]",
            "optimizer = [\"adamw\"]",
        ),
        "t.toml",
    )
    .unwrap();
    let pp = |f: &dyn Fn(&mut PartialPoint)| {
        let mut p = PartialPoint::default();
        f(&mut p);
        p
    };
    let candidates = [
        pp(&|p| p.batch_size = Some(1)),
        pp(&|p| p.batch_size = Some(2)),
        pp(&|p| p.batch_size = Some(4)),
        pp(&|p| p.seq_len = Some(64)),
        pp(&|p| p.seq_len = Some(128)),
        pp(&|p| {
            p.batch_size = Some(1);
            p.seq_len = Some(64);
        }),
        pp(&|p| {
            p.batch_size = Some(2);
            p.seq_len = Some(128);
        }),
        pp(&|p| p.optimizer = Some(Optimizer::AdamW)),
        pp(&|p| p.optimizer = Some(Optimizer::AdamW8bit)),
        pp(&|p| p.grad_checkpointing = Some(false)),
        pp(&|p| p.grad_checkpointing = Some(true)),
        pp(&|p| p.lora_rank = Some(16)),
    ];
    let n = candidates.len();
    let mut picks: Vec<Vec<usize>> = vec![vec![]];
    for a in 0..n {
        picks.push(vec![a]);
        for b in a + 1..n {
            picks.push(vec![a, b]);
            for c in b + 1..n {
                picks.push(vec![a, b, c]);
            }
        }
    }
    let (mut rejected, mut empty) = (0, 0);
    for pick in &picks {
        for include in [None, Some(pp(&|p| p.batch_size = Some(8)))] {
            let mut p = base.clone();
            p.grid.exclude = pick.iter().map(|&i| candidates[i].clone()).collect();
            p.grid.include = include.into_iter().collect();
            let e = expand_points(&p.grid, p.lora.rank);
            let want = match (e.unmatched_excludes.first(), e.points.is_empty()) {
                (Some(i), _) => Some(format!(
                    "grid.exclude[{i}]: this exclude entry matches no point"
                )),
                (None, true) => Some("grid: the grid has no points left".to_string()),
                (None, false) => None,
            };
            let text = toml::to_string(&p).unwrap();
            let got = parse_str(&text, "t.toml").err().map(|e| e.to_string());
            match (&want, &got) {
                (None, None) => {}
                (Some(w), Some(g)) if g.contains(w.as_str()) => {}
                _ => panic!("excludes {pick:?}: expected {want:?}, got {got:?}\n{text}"),
            }
            rejected += usize::from(want.is_some());
            empty += usize::from(e.points.is_empty());
        }
    }
    // Both kinds of failure, and passes, are among the cases.
    assert!(empty > 0 && rejected > empty && rejected < 2 * picks.len());
}

/// Imports point down: the data modules use neither the front ends (cli, ui, daemon, the
/// worker command) nor the orchestrator; the profile does not use the grid; telemetry
/// uses only spec.
#[test]
fn data_modules_import_down() {
    let files: &[(&str, &str)] = &[
        ("grid/mod.rs", include_str!("mod.rs")),
        ("grid/points.rs", include_str!("points.rs")),
        ("grid/tests.rs", include_str!("tests.rs")),
        ("telemetry.rs", include_str!("../telemetry.rs")),
        ("store/mod.rs", include_str!("../store/mod.rs")),
        ("store/runs.rs", include_str!("../store/runs.rs")),
        ("report/mod.rs", include_str!("../report/mod.rs")),
        ("report/rows.rs", include_str!("../report/rows.rs")),
        ("report/axes.rs", include_str!("../report/axes.rs")),
        ("report/table.rs", include_str!("../report/table.rs")),
        ("report/export.rs", include_str!("../report/export.rs")),
        ("report/meta.rs", include_str!("../report/meta.rs")),
        ("report/charts.rs", include_str!("../report/charts.rs")),
        ("report/html.rs", include_str!("../report/html.rs")),
        ("report/render.rs", include_str!("../report/render.rs")),
        ("report/winners.rs", include_str!("../report/winners.rs")),
        ("report/text.rs", include_str!("../report/text.rs")),
        ("summary.rs", include_str!("../summary.rs")),
        ("profile/mod.rs", include_str!("../profile/mod.rs")),
        ("profile/schema.rs", include_str!("../profile/schema.rs")),
        ("profile/error.rs", include_str!("../profile/error.rs")),
        (
            "profile/validate.rs",
            include_str!("../profile/validate.rs"),
        ),
        ("profile/load.rs", include_str!("../profile/load.rs")),
        ("profile/devices.rs", include_str!("../profile/devices.rs")),
        ("profile/tests.rs", include_str!("../profile/tests.rs")),
    ];
    let uses = |src: &str, module: &str| {
        let pat = format!("crate::{module}");
        src.lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .any(|l| l.contains(&pat))
    };
    for (name, src) in files {
        for up in ["cli", "ui", "daemon", "worker", "orchestrator"] {
            assert!(!uses(src, up), "src/{name} uses crate::{up}");
        }
        if name.starts_with("profile/") {
            assert!(!uses(src, "grid"), "src/{name} uses crate::grid");
        }
        if *name == "telemetry.rs" {
            for other in ["profile", "grid", "store", "summary", "report", "engine"] {
                assert!(!uses(src, other), "src/{name} uses crate::{other}");
            }
        }
    }
}

#[test]
fn card_axis_sets_each_points_vram_limit_and_keeps_other_ids() {
    let cuda = BASE.replace(
        "warmup_steps = 2",
        "warmup_steps = 2\ndevices = [\"cuda:0\"]",
    );
    let plain = specs(&cuda);
    let with = specs(&format!("{cuda}card = [\"rtx4060\", \"rtx4090\"]\n"));
    assert_eq!(with.len(), 2 * plain.len());
    // card is the outermost axis: every rtx4060 point first, in the plain grid's order.
    for (i, s) in with.iter().enumerate() {
        let card = if i < plain.len() {
            "rtx4060"
        } else {
            "rtx4090"
        };
        let gib = if i < plain.len() { 8u64 } else { 24 };
        assert_eq!(
            s.config.point.card.map(|c| c.to_string()).as_deref(),
            Some(card)
        );
        assert_eq!(s.config.vram_limit_bytes, Some(gib << 30));
        assert_eq!(s.vram_limit.as_deref(), Some(card));
        assert!(s.label().ends_with(&format!(" @{card}")), "{}", s.label());
        let a = s.train_args();
        let at = a.iter().position(|x| x == "--vram-limit").unwrap();
        assert_eq!(a[at + 1], card);
        assert_eq!(s.config.point.card.map(|_| ()), Some(()));
        assert_ne!(s.id, plain[i % plain.len()].id);
    }
    // Points without a card serialise as before: the ids of every existing sweep stand.
    let json = serde_json::to_string(&plain[0].config.point).unwrap();
    assert!(!json.contains("card"), "{json}");
    // An exclude can name a card.
    let ex = specs(&format!(
        "{cuda}card = [\"rtx4060\", \"rtx4090\"]\n[[grid.exclude]]\ncard = \"rtx4090\"\nbatch_size = 2\n"
    ));
    assert_eq!(ex.len(), with.len() - 4);
}
