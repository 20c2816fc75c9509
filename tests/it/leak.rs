//! Peak memory is the run's, not a leak's: for every CPU combination of optimizer x precision
//! x gradient checkpointing x quantisation, a run of `4N` steps peaks no higher than a run of
//! `N` steps (beyond a small bound); and a sweep over a worker that really leaks flags the
//! point instead of reporting its last peak.

use std::process::Command;
use std::thread;

const BIN: &str = env!("CARGO_BIN_EXE_lorascope");

/// Steps of the short run; the long run has four times as many.
const N: usize = 2;
/// Tokens per sequence. The checkpointed-gradient leak (adapter gradients stashed with their
/// graph, kept alive through the AdamW moments) grew peak RSS by 67-87 MiB from 2 to 8 steps
/// already at 16 tokens, so the shortest useful sequence keeps the 96 runs fast.
const SEQ_LEN: &str = "16";
/// Allowed rise of peak RSS from `N` to `4N` steps, 8 MiB: a steady run's VmHWM moves between
/// two processes by allocator placement only (at most 2.6 MiB over all 48 combinations,
/// measured), while the leak added 67 MiB or more at these settings.
const BOUND_BYTES: u64 = 8 << 20;

/// One combination of the matrix.
#[derive(Debug, Clone, Copy)]
struct Combo {
    optimizer: &'static str,
    precision: &'static str,
    checkpointing: bool,
    quant: &'static str,
}

impl Combo {
    fn name(&self) -> String {
        format!(
            "{} {} {} {}",
            self.optimizer,
            self.precision,
            if self.checkpointing {
                "ckpt"
            } else {
                "no-ckpt"
            },
            self.quant
        )
    }
}

fn matrix() -> Vec<Combo> {
    let mut v = Vec::new();
    for optimizer in ["adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit"] {
        for precision in ["fp32", "fp16", "bf16"] {
            for checkpointing in [false, true] {
                for quant in ["none", "nf4"] {
                    v.push(Combo {
                        optimizer,
                        precision,
                        checkpointing,
                        quant,
                    });
                }
            }
        }
    }
    v
}

/// Peak RSS (the summary's `peak_rss_bytes`, VmHWM) of a `lorascope train --json` run.
fn peak_rss(c: &Combo, steps: usize) -> Result<u64, String> {
    let mut cmd = Command::new(BIN);
    cmd.args(["train", "--json", "--model", "tiny", "--batch-size", "1"])
        .args(["--seq-len", SEQ_LEN, "--warmup-steps", "0", "--seed", "3"])
        .args(["--steps", &steps.to_string()])
        .args(["--optimizer", c.optimizer, "--precision", c.precision])
        .args(["--quant", c.quant])
        .env_remove("LORASCOPE_TEST_ONLY_LEAK_STEPS")
        .env_remove("LORASCOPE_PROFILE");
    if c.checkpointing {
        cmd.arg("--grad-checkpointing");
    }
    let o = cmd.output().map_err(|e| format!("{}: {e}", c.name()))?;
    if !o.status.success() {
        return Err(format!(
            "{}: exit {:?}: {}",
            c.name(),
            o.status.code(),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    let stdout = String::from_utf8_lossy(&o.stdout);
    let summary: serde_json::Value = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["type"] == "summary")
        .ok_or_else(|| format!("{}: no summary line", c.name()))?;
    summary["peak_rss_bytes"]
        .as_u64()
        .ok_or_else(|| format!("{}: no peak_rss_bytes", c.name()))
}

/// For every CPU combination, peak RSS after `4N` steps is within [`BOUND_BYTES`] of the
/// peak after `N` steps. Runs two workers at a time.
#[test]
fn peak_rss_does_not_grow_with_steps_on_cpu() {
    let combos = matrix();
    let results: Vec<Result<(Combo, u64, u64), String>> = thread::scope(|s| {
        let (a, b) = combos.split_at(combos.len() / 2);
        let work = |part: &[Combo]| {
            part.iter()
                .map(|c| Ok((*c, peak_rss(c, N)?, peak_rss(c, 4 * N)?)))
                .collect::<Vec<_>>()
        };
        let ha = s.spawn(move || work(a));
        let hb = s.spawn(move || work(b));
        let mut r = ha.join().expect("worker thread");
        r.extend(hb.join().expect("worker thread"));
        r
    });
    let mut failures = Vec::new();
    let mut table = String::new();
    for r in results {
        match r {
            Ok((c, short, long)) => {
                let rise = long.saturating_sub(short);
                table.push_str(&format!(
                    "{:<40} {:>8.1} MiB {:>8.1} MiB {:>+7.1} MiB\n",
                    c.name(),
                    short as f64 / 1048576.0,
                    long as f64 / 1048576.0,
                    (long as f64 - short as f64) / 1048576.0
                ));
                if rise > BOUND_BYTES {
                    failures.push(c.name());
                }
            }
            Err(e) => failures.push(e),
        }
    }
    // The table, for `-- --nocapture` (BENCHMARKS.md records it).
    println!(
        "{:<40} {:>12} {:>12} {:>11}\n{table}",
        "combination", "peak N", "peak 4N", "rise"
    );
    assert!(
        failures.is_empty(),
        "peak RSS grew by more than {} MiB from {N} to {} steps: {failures:?}\n{table}",
        BOUND_BYTES >> 20,
        4 * N
    );
}

/// Runs a one-point sweep of the real engine (tiny preset, 12 steps at seq 64) with
/// `leak` setting the test-only switch that keeps every step's graph alive, and returns the
/// report's JSON row and text table.
fn sweep(leak: bool) -> (serde_json::Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("p.toml");
    std::fs::write(
        &profile,
        "[model]\npreset = \"tiny\"\n[data]\npath = \"sample\"\n[run]\nsteps = 12\nwarmup_steps = 1\n\
         [grid]\nbatch_size = [1]\nseq_len = [64]\n",
    )
    .unwrap();
    let db = dir.path().join("r.db");
    let mut cmd = Command::new(BIN);
    cmd.arg("run").arg(&profile).arg("--db").arg(&db);
    cmd.env_remove("LORASCOPE_WORKER");
    if leak {
        cmd.env("LORASCOPE_TEST_ONLY_LEAK_STEPS", "1");
    } else {
        cmd.env_remove("LORASCOPE_TEST_ONLY_LEAK_STEPS");
    }
    let o = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{stderr}");
    let report = |fmt: &str| {
        let o = Command::new(BIN)
            .args(["report", "--format", fmt, "--db"])
            .arg(&db)
            .output()
            .unwrap();
        assert!(o.status.success());
        String::from_utf8(o.stdout).unwrap()
    };
    let json: serde_json::Value = serde_json::from_str(&report("json")).unwrap();
    (
        json["runs"][0].clone(),
        format!("{}\n{stderr}", report("table")),
    )
}

/// A worker that really leaks (the engine keeping each step's graph) is flagged with the
/// rise, in the report's row, table and the headless progress line; the same sweep without
/// the leak is not.
#[test]
fn a_sweep_flags_memory_that_keeps_rising() {
    let (row, text) = sweep(true);
    assert_eq!(row["status"], "ok", "{text}");
    let g = &row["mem_growth"];
    let bytes = g["bytes"].as_u64().unwrap_or(0);
    assert!(bytes > 16 << 20, "{row}\n{text}");
    assert!(
        matches!(g["source"].as_str(), Some("steps" | "telemetry")),
        "{row}"
    );
    assert!(g["steps"].as_u64().unwrap_or(0) >= 6, "{row}");
    assert!(text.contains("grew +"), "{text}");
    assert!(text.contains("memory grew "), "{text}");
    assert!(
        row["note"].as_str().unwrap_or("").contains("memory grew"),
        "{row}"
    );

    let (row, text) = sweep(false);
    assert_eq!(row["status"], "ok", "{text}");
    assert!(row["mem_growth"].is_null(), "{row}\n{text}");
    assert!(!text.contains("memory grew"), "{text}");
}
