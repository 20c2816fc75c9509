//! The report's tests: rows from runs, the table at 80/120/200 columns for sweeps where one
//! axis alone tells the points apart, the exports' axis fields and metadata, and the Pareto
//! chart's marks.

use std::path::Path;

use super::*;
use crate::grid::{RunSpec, expand_profile};
use crate::profile::parse_str;
use crate::summary::{RunStatus, RunSummary};

fn specs(grid: &str, run: &str) -> Vec<RunSpec> {
    let src = format!(
        "[model]\npreset = \"tiny\"\n[data]\npath = \"sample\"\n[run]\nsteps = 8\n\
         warmup_steps = 2\n{run}\n[grid]\n{grid}\n"
    );
    let p = parse_str(&src, "t.toml").unwrap();
    expand_profile(&p, Path::new("."))
}

/// A run of `spec` with tokens/s `tps`, peak `mem_mib`, on a GPU (power, energy) or CPU.
fn run(id: i64, spec: &RunSpec, repeat: u32, status: RunStatus, tps: f64, mem_mib: u64) -> RunRow {
    let ok = status == RunStatus::Ok;
    RunRow {
        id,
        sweep_id: 1,
        spec_id: spec.id.clone(),
        repeat,
        grid_index: spec.index,
        label: spec.label(),
        device: "cuda:0".into(),
        config: serde_json::to_value(&spec.config).unwrap(),
        status,
        cause: (!ok).then(|| {
            "CUDA out of memory: tried to allocate 2.00 GiB with 1.12 GiB free on the device"
                .to_string()
        }),
        started_at: 0.0,
        finished_at: None,
        header: Some(serde_json::json!({
            "params_trainable": 1000, "optimizer_state_bytes": 8000, "synthetic_weights": true
        })),
        summary: Some(RunSummary {
            status: Some(status),
            tokens_per_s: ok.then_some(tps),
            s_per_10k_tokens: ok.then_some(10_000.0 / tps),
            peak_mem_bytes: ok.then_some(mem_mib << 20),
            peak_mem_kind: ok.then(|| "vram_process".into()),
            predicted_peak_bytes: Some((mem_mib + 40) << 20),
            prediction_error: ok.then_some(mem_mib as f64 / (mem_mib + 40) as f64 - 1.0),
            mean_w: ok.then_some(200.0 + tps / 10.0),
            j_per_token: ok.then_some((200.0 + tps / 10.0) / tps),
            final_loss: ok.then_some(5.25),
            ..Default::default()
        }),
    }
}

/// A sweep of the points of `grid` at batch 2 x 1024, the last one out of memory when there
/// are more than two.
fn sweep(grid: &str) -> Vec<RunRow> {
    let s = specs(
        &format!("batch_size = [2]\nseq_len = [1024]\n{grid}"),
        "vram_limit = \"8GiB\"\ndevices = [\"cuda:0\"]",
    );
    let n = s.len();
    s.iter()
        .enumerate()
        .map(|(i, sp)| {
            let st = if n > 2 && i + 1 == n {
                RunStatus::Oom
            } else {
                RunStatus::Ok
            };
            run(
                i as i64 + 1,
                sp,
                0,
                st,
                1500.0 + 350.0 * i as f64,
                5000 + 2900 * i as u64,
            )
        })
        .collect()
}

fn one_axis_sweeps() -> Vec<(&'static str, Vec<RunRow>)> {
    vec![
        (
            "quant",
            sweep("quant = [\"none\", \"nf4\"]\nprecision = [\"bf16\"]"),
        ),
        (
            "optimizer",
            sweep("optimizer = [\"adamw\", \"adamw8bit\", \"paged_adamw\", \"paged_adamw8bit\"]"),
        ),
        (
            "precision",
            sweep("precision = [\"fp32\", \"fp16\", \"bf16\"]"),
        ),
    ]
}

#[test]
fn rows_use_latest_run_per_repeat() {
    let s = specs("batch_size = [1, 2]", "");
    let runs = vec![
        run(1, &s[0], 0, RunStatus::Ok, 100.0, 300),
        run(2, &s[0], 1, RunStatus::Interrupted, 0.0, 0),
        run(5, &s[0], 1, RunStatus::Ok, 120.0, 300),
        run(3, &s[0], 2, RunStatus::Ok, 90.0, 300),
        run(4, &s[1], 0, RunStatus::Oom, 0.0, 0),
    ];
    let r = rows(&runs);
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].runs, 3);
    assert_eq!(r[0].status, "ok");
    let t = r[0].tokens_per_s.unwrap();
    assert_eq!((t.median, t.min, t.max), (100.0, 90.0, 120.0));
    assert_eq!(r[1].status, "oom");
    assert_eq!(r[1].tokens_per_s, None);
    assert!(
        r[1].cause
            .as_deref()
            .unwrap()
            .starts_with("CUDA out of memory")
    );
    assert_eq!(r[0].point.unwrap().batch_size, 1);
    assert_eq!(r[0].device, "cuda:0");
    let table = Table::build(&r, &TableOptions::default());
    assert_eq!(table.axes.varying, vec![Axis::BatchSize]);
    assert!(table.notes[0].contains("median"), "{:?}", table.notes);
    assert!(table.render_text(200).contains("100.0 [90.0–120.0]"));
}

/// The table at 80, 120 and 200 columns for sweeps where quant, optimizer or precision alone
/// differs: that axis is a column (so rows are told apart), the others are in the header,
/// and no line is longer than the width.
#[test]
fn one_axis_tables_at_three_widths() {
    for (axis, runs) in one_axis_sweeps() {
        let r = rows(&runs);
        let t = Table::build(&r, &TableOptions::default());
        assert_eq!(
            t.axes.varying.iter().map(|a| a.key()).collect::<Vec<_>>(),
            vec![axis]
        );
        for width in [80usize, 120, 200] {
            let text = t.render_text(width);
            for line in text.lines() {
                assert!(
                    line.chars().count() <= width,
                    "{axis} at {width}: {} > {width}: {line}",
                    line.chars().count()
                );
            }
            // Every row's varying value is on its line: rows are told apart.
            let layout = t.layout(width, 2);
            let k = layout
                .columns
                .iter()
                .position(|&c| t.columns[c].col == table::Col::Axis(t.axes.varying[0]))
                .expect("the varying axis is never dropped");
            let vals: Vec<String> = (0..t.rows.len())
                .map(|r| t.cell_text(&layout, r, k))
                .collect();
            let mut distinct = vals.clone();
            distinct.sort();
            distinct.dedup();
            assert_eq!(distinct.len(), vals.len(), "{axis} at {width}: {vals:?}");
            insta::assert_snapshot!(format!("table_{axis}_{width}"), text);
        }
    }
}

#[test]
fn winners_and_best_markers() {
    let r = rows(&sweep(
        "quant = [\"none\", \"nf4\"]\nprecision = [\"bf16\"]\noptimizer = [\"adamw\", \"adamw8bit\"]",
    ));
    let t = Table::build(&r, &TableOptions::default());
    // Points 1-3 ok (1500, 1850, 2200 tok/s; 5000, 7900, 10800 MiB), point 4 oom.
    assert!(t.winners[0].starts_with("fastest: "), "{:?}", t.winners);
    assert!(t.winners[0].contains("2200.0 tok/s"), "{:?}", t.winners);
    assert!(
        t.winners[1].starts_with("fewest J/token: "),
        "{:?}",
        t.winners
    );
    assert!(
        t.winners[2].starts_with("fastest under vram_limit (8.00 GiB): ")
            && t.winners[2].contains("1850.0 tok/s"),
        "{:?}",
        t.winners
    );
    let k = t
        .columns
        .iter()
        .position(|c| c.col == table::Col::TokensPerS)
        .unwrap();
    let best: Vec<&str> = t
        .rows
        .iter()
        .filter(|r| r.cells[k].best)
        .map(|r| r.cells[k].text.as_str())
        .collect();
    assert_eq!(best, vec!["2200.0*"]);
    // The 8-bit rows' state is 8 bytes per trainable parameter: the note says why.
    assert!(
        t.notes
            .iter()
            .any(|n| n.contains("fewer than 4,096 elements")),
        "{:?}",
        t.notes
    );
    // Without a limit the third line is left out.
    let mut r = r;
    for row in &mut r {
        row.vram_limit_bytes = None;
    }
    let t = Table::build(&r, &TableOptions::default());
    assert_eq!(t.winners.len(), 2, "{:?}", t.winners);
}

#[test]
fn rising_memory_replaces_the_peak() {
    let mut runs = sweep("quant = [\"none\", \"nf4\"]");
    let g = crate::summary::MemoryGrowth {
        bytes: 660 << 20,
        steps: 24,
        source: crate::summary::GrowthSource::Steps,
    };
    runs[0].summary.as_mut().unwrap().mem_growth = Some(g);
    let r = rows(&runs);
    let t = Table::build(&r, &TableOptions::default());
    assert!(t.render_text(200).contains("grew +660.0 MiB/24 steps"));
    let meta = SweepMeta::default();
    let csv = export::csv(&meta, &r);
    let line = csv.lines().find(|l| l.starts_with("1,")).unwrap();
    assert!(line.contains(&format!(",{},24,", 660u64 << 20)), "{line}");
    let j: serde_json::Value = serde_json::from_str(&export::json(&meta, &r)).unwrap();
    assert_eq!(j["runs"][0]["mem_growth"]["bytes"], 660u64 << 20);
    assert!(j["runs"][1]["mem_growth"].is_null());
}

/// JSON and CSV carry one field per axis and the metadata block.
#[test]
fn exports_have_axis_fields_and_metadata() {
    let runs = sweep("quant = [\"none\", \"nf4\"]\nprecision = [\"bf16\"]");
    let r = rows(&runs);
    let sweep_row = crate::store::SweepRow {
        id: 3,
        name: "q".into(),
        profile_path: "/p.toml".into(),
        profile_toml: String::new(),
        started_at: 1_764_467_890.0,
        finished_at: None,
    };
    let pairs = vec![
        ("gpu".to_string(), "NVIDIA H200".to_string()),
        ("gpu_driver".to_string(), "580.159.04".to_string()),
        ("cpu_model".to_string(), "AMD EPYC".to_string()),
    ];
    let meta = meta::sweep_meta(&sweep_row, &pairs, &runs, r.len(), Some(700.0));
    let j: serde_json::Value = serde_json::from_str(&export::json(&meta, &r)).unwrap();
    let m = &j["meta"];
    assert_eq!(m["gpu"][0], "NVIDIA H200");
    assert_eq!(m["gpu_driver"], "580.159.04");
    assert_eq!(m["power_limit_w"], 700.0);
    assert_eq!(m["steps"], 8);
    assert_eq!(m["warmup_steps"], 2);
    assert_eq!(
        m["lora_ranks"],
        serde_json::json!([r[0].point.unwrap().lora_rank])
    );
    assert_eq!(m["model"], "tiny");
    assert_eq!(m["started_at"], "2025-11-30T01:58:10.000Z");
    assert!(m["lorascope_version"].is_string());
    let run0 = &j["runs"][0];
    assert_eq!(run0["batch_size"], 2);
    assert_eq!(run0["seq_len"], 1024);
    assert_eq!(run0["optimizer"], "adamw");
    assert_eq!(run0["precision"], "bf16");
    assert_eq!(run0["quant"], "none");
    assert_eq!(j["runs"][1]["quant"], "nf4");
    assert_eq!(run0["lora_rank"], r[0].point.unwrap().lora_rank);
    assert_eq!(run0["device"], "cuda:0");
    let csv = export::csv(&meta, &r);
    assert!(csv.contains("# gpu: NVIDIA H200\n"), "{csv}");
    assert!(csv.contains("# steps: 8\n"), "{csv}");
    let header = csv.lines().find(|l| !l.starts_with('#')).unwrap();
    let cols: Vec<&str> = header.split(',').collect();
    for k in [
        "batch_size",
        "seq_len",
        "optimizer",
        "precision",
        "quant",
        "lora_rank",
    ] {
        assert!(cols.contains(&k), "{header}");
    }
    let qi = cols.iter().position(|c| *c == "quant").unwrap();
    let second: Vec<&str> = csv
        .lines()
        .filter(|l| !l.starts_with('#'))
        .nth(2)
        .unwrap()
        .split(',')
        .collect();
    assert_eq!(second[qi], "nf4");
}

#[test]
fn slurm_device_splits_into_node_and_job() {
    assert_eq!(
        rows::split_device("node1 (slurm 7_0)"),
        ("node1".to_string(), Some("7_0".to_string()))
    );
    assert_eq!(rows::split_device("cuda:1"), ("cuda:1".to_string(), None));
}

#[test]
fn pareto_front_keeps_undominated_points() {
    let f = charts::pareto_front(&[
        (1.0, 10.0),
        (2.0, 8.0),
        (2.0, 20.0),
        (3.0, 15.0),
        (4.0, 30.0),
    ]);
    assert_eq!(f, vec![(1.0, 10.0), (2.0, 20.0), (4.0, 30.0)]);
}

/// The SVG Pareto chart has one mark per ok point, and every chart draws.
#[test]
fn pareto_svg_has_one_mark_per_ok_point() {
    let r = rows(&sweep(
        "optimizer = [\"adamw\", \"adamw8bit\", \"paged_adamw\", \"paged_adamw8bit\"]",
    ));
    let t = Table::build(&r, &TableOptions::default());
    let d = ChartData {
        rows: &r,
        axes: &t.axes,
        limit: Some((8 << 30, "vram_limit")),
        curves: &[],
    };
    let svg = charts::svg(ChartKind::Pareto, &d).unwrap();
    assert_eq!(svg.matches("<g class=\"mark\"").count(), 3, "{svg}");
    assert!(svg.contains("vram_limit 8.00 GiB"));
    for k in [ChartKind::Jtoken, ChartKind::S10k, ChartKind::Curves] {
        assert!(charts::svg(k, &d).unwrap().starts_with("<svg"));
    }
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("p.png");
    charts::png(ChartKind::Pareto, &d, &png).unwrap();
    assert_eq!(&std::fs::read(&png).unwrap()[1..4], b"PNG");
}

/// A `"max"` axis without a recorded value is exported as `"max"`, not as its sentinel.
#[test]
fn unresolved_max_axis_exports_as_max() {
    let runs = sweep("quant = [\"none\", \"nf4\"]");
    let mut r = rows(&runs);
    if let Some(p) = r[0].point.as_mut() {
        p.batch_size = crate::profile::AXIS_MAX;
    }
    let j = export::row_json(&r[0]);
    assert_eq!(j["batch_size"], "max", "{j}");
    assert_eq!(j["seq_len"], 1024);
    let csv = export::csv(&SweepMeta::default(), &r);
    let line = csv.lines().find(|l| l.starts_with("1,")).unwrap();
    assert!(line.contains(",max,1024,"), "{line}");
}
