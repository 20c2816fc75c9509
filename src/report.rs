//! The comparison table: one row per point of a sweep, as text table, Markdown, CSV or JSON.
//!
//! Each point uses the latest run of each repeat (an interrupted run that was re-run is not
//! counted). Metrics come from `ok` runs only; with several repeats a metric shows the
//! median and `[min–max]`. Memory is the run's peak: process VRAM on GPUs, else device VRAM,
//! else peak RSS (CPU runs).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::store::RunRow;
use crate::summary::{MemoryGrowth, RunStatus, RunSummary, Spread};

/// Output format of `lorascope report`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned text columns for a terminal.
    Table,
    /// A Markdown table.
    Md,
    /// CSV, every field (RFC 4180 quoting).
    Csv,
    /// A JSON array of [`PointRow`]s.
    Json,
}

/// One point of the comparison.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PointRow {
    /// Position in the grid.
    pub index: usize,
    /// The point's stable id.
    pub spec_id: String,
    /// The point's label.
    pub label: String,
    /// Runs counted (latest per repeat).
    pub runs: usize,
    /// `ok`, a single other status, or e.g. `ok 2/3, oom 1`.
    pub status: String,
    /// Cause of the first non-ok run.
    pub cause: Option<String>,
    /// Over ok runs (tokens/s); so are the other spreads.
    pub tokens_per_s: Option<Spread>,
    /// Tokens including padding per second.
    pub padded_tokens_per_s: Option<Spread>,
    /// Seconds per 10,000 tokens.
    pub s_per_10k_tokens: Option<Spread>,
    /// Max over ok runs (bytes).
    pub peak_mem_bytes: Option<u64>,
    /// `vram_process`, `vram_device` or `rss`.
    pub peak_mem_kind: Option<String>,
    /// The largest memory rise over the timed window among ok runs: when set, the table shows
    /// it in place of the peak, which is then a leak's and not the point's cost.
    pub mem_growth: Option<MemoryGrowth>,
    /// The memory model's predicted peak (bytes; max over the runs that have one).
    pub predicted_peak_bytes: Option<u64>,
    /// `measured / predicted - 1` of the peak over ok runs.
    pub prediction_error: Option<Spread>,
    /// Mean board power (W).
    pub mean_w: Option<Spread>,
    /// Max over ok runs (W).
    pub max_w: Option<f64>,
    /// Energy over the timed window (J).
    pub energy_j: Option<Spread>,
    /// Energy per real token (J).
    pub j_per_token: Option<Spread>,
    /// Energy from integrated power (J), to check against the counter.
    pub energy_j_integrated: Option<Spread>,
    /// `counter` or `integrated`.
    pub energy_source: Option<String>,
    /// The last reported loss.
    pub final_loss: Option<Spread>,
    /// fp16 steps skipped by the loss scaler, summed over ok runs.
    pub skipped_steps: u64,
    /// The ok runs' notes, joined by `; `.
    pub note: Option<String>,
}

/// Builds one row per point from a sweep's runs (ordered by grid index).
pub fn rows(runs: &[RunRow]) -> Vec<PointRow> {
    // Latest run per (spec, repeat): runs come ordered by row id within a repeat.
    let mut latest: BTreeMap<(usize, String, u32), &RunRow> = BTreeMap::new();
    for r in runs {
        let key = (r.grid_index, r.spec_id.clone(), r.repeat);
        match latest.get(&key) {
            Some(prev) if prev.id > r.id => {}
            _ => {
                latest.insert(key, r);
            }
        }
    }
    let mut points: BTreeMap<(usize, String), Vec<&RunRow>> = BTreeMap::new();
    for ((gi, spec, _), r) in latest {
        points.entry((gi, spec)).or_default().push(r);
    }
    points
        .into_iter()
        .map(|((index, spec_id), rs)| point_row(index, spec_id, &rs))
        .collect()
}

fn point_row(index: usize, spec_id: String, rs: &[&RunRow]) -> PointRow {
    let ok: Vec<_> = rs
        .iter()
        .filter(|r| r.status == RunStatus::Ok)
        .filter_map(|r| r.summary.as_ref())
        .collect();
    let mut by_status: BTreeMap<&str, usize> = BTreeMap::new();
    for r in rs {
        *by_status.entry(r.status.as_str()).or_default() += 1;
    }
    let status = if by_status.len() == 1 {
        by_status.keys().next().copied().unwrap_or("").to_string()
    } else {
        let n = rs.len();
        by_status
            .iter()
            .map(|(s, c)| {
                if *s == "ok" {
                    format!("ok {c}/{n}")
                } else {
                    format!("{s} {c}")
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let cause = rs
        .iter()
        .find(|r| r.status != RunStatus::Ok)
        .and_then(|r| r.cause.clone());
    let spread = |f: fn(&RunSummary) -> Option<f64>| {
        Spread::of(&ok.iter().filter_map(|s| f(s)).collect::<Vec<_>>())
    };
    let mut notes: Vec<String> = ok.iter().filter_map(|s| s.note.clone()).collect();
    notes.dedup();
    PointRow {
        index,
        spec_id,
        label: rs.first().map(|r| r.label.clone()).unwrap_or_default(),
        runs: rs.len(),
        status,
        cause,
        tokens_per_s: spread(|s| s.tokens_per_s),
        padded_tokens_per_s: spread(|s| s.padded_tokens_per_s),
        s_per_10k_tokens: spread(|s| s.s_per_10k_tokens),
        peak_mem_bytes: ok.iter().filter_map(|s| s.peak_mem_bytes).max(),
        peak_mem_kind: ok.iter().find_map(|s| s.peak_mem_kind.clone()),
        mem_growth: ok
            .iter()
            .filter_map(|s| s.mem_growth)
            .max_by_key(|g| g.bytes),
        predicted_peak_bytes: rs
            .iter()
            .filter_map(|r| r.summary.as_ref()?.predicted_peak_bytes)
            .max(),
        prediction_error: spread(|s| s.prediction_error),
        mean_w: spread(|s| s.mean_w),
        max_w: ok.iter().filter_map(|s| s.max_w).reduce(f64::max),
        energy_j: spread(|s| s.energy_j),
        j_per_token: spread(|s| s.j_per_token),
        energy_j_integrated: spread(|s| s.energy_j_integrated),
        energy_source: ok.iter().find_map(|s| s.energy_source.clone()),
        final_loss: spread(|s| s.final_loss),
        skipped_steps: ok.iter().map(|s| s.skipped_steps).sum(),
        note: if notes.is_empty() {
            None
        } else {
            Some(notes.join("; "))
        },
    }
}

/// Formats a value with `digits` decimals, `-` for none.
fn num(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

fn spread_str(s: &Option<Spread>, digits: usize) -> String {
    match s {
        None => "-".into(),
        Some(s) if s.n <= 1 || num(Some(s.min), digits) == num(Some(s.max), digits) => {
            num(Some(s.median), digits)
        }
        Some(s) => format!(
            "{} [{}–{}]",
            num(Some(s.median), digits),
            num(Some(s.min), digits),
            num(Some(s.max), digits)
        ),
    }
}

/// Bytes as MiB/GiB with one decimal.
pub fn human_bytes(b: Option<u64>) -> String {
    match b {
        None => "-".into(),
        Some(b) if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        Some(b) => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
    }
}

const HEADERS: [&str; 11] = [
    "#",
    "id",
    "point",
    "tokens/s",
    "s/10k tok",
    "peak mem",
    "predicted",
    "mean W",
    "J/token",
    "final loss",
    "status",
];

fn cells(r: &PointRow, max_cause: Option<usize>) -> Vec<String> {
    let mut status = r.status.clone();
    if let Some(c) = &r.cause {
        let c = match max_cause {
            Some(m) if c.chars().count() > m => {
                format!("{}…", c.chars().take(m).collect::<String>())
            }
            _ => c.clone(),
        };
        status = format!("{status}: {c}");
    }
    let mem = match (&r.mem_growth, &r.peak_mem_kind, r.peak_mem_bytes) {
        (Some(g), _, _) => format!("grew {}", g.short()),
        (None, Some(k), Some(_)) if k == "rss" => {
            format!("{} RSS", human_bytes(r.peak_mem_bytes))
        }
        _ => human_bytes(r.peak_mem_bytes),
    };
    let predicted = match (r.predicted_peak_bytes, &r.prediction_error) {
        (None, _) => "-".to_string(),
        (p, None) => human_bytes(p),
        (p, Some(e)) => format!("{} ({:+.1}%)", human_bytes(p), e.median * 100.0),
    };
    vec![
        (r.index + 1).to_string(),
        r.spec_id.clone(),
        r.label.clone(),
        spread_str(&r.tokens_per_s, 1),
        spread_str(&r.s_per_10k_tokens, 2),
        mem,
        predicted,
        spread_str(&r.mean_w, 1),
        spread_str(&r.j_per_token, 4),
        spread_str(&r.final_loss, 4),
        status,
    ]
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Renders rows in a format. Table and Markdown end with a newline; JSON is an array.
pub fn render(rows: &[PointRow], format: Format) -> String {
    match format {
        Format::Json => {
            let mut s = serde_json::to_string_pretty(rows).unwrap_or_else(|_| "[]".into());
            s.push('\n');
            s
        }
        Format::Csv => {
            let mut out = String::from(
                "index,id,point,runs,status,cause,tokens_per_s,tokens_per_s_min,tokens_per_s_max,\
                 padded_tokens_per_s,s_per_10k_tokens,peak_mem_bytes,peak_mem_kind,mean_w,max_w,\
                 energy_j,energy_j_integrated,j_per_token,energy_source,final_loss,skipped_steps,\
                 mem_growth_bytes,mem_growth_steps,predicted_peak_bytes,prediction_error\n",
            );
            let f = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
            let med = |s: &Option<Spread>| f(s.map(|s| s.median));
            for r in rows {
                let fields = [
                    (r.index + 1).to_string(),
                    r.spec_id.clone(),
                    r.label.clone(),
                    r.runs.to_string(),
                    r.status.clone(),
                    r.cause.clone().unwrap_or_default(),
                    med(&r.tokens_per_s),
                    f(r.tokens_per_s.map(|s| s.min)),
                    f(r.tokens_per_s.map(|s| s.max)),
                    med(&r.padded_tokens_per_s),
                    med(&r.s_per_10k_tokens),
                    r.peak_mem_bytes.map(|v| v.to_string()).unwrap_or_default(),
                    r.peak_mem_kind.clone().unwrap_or_default(),
                    med(&r.mean_w),
                    f(r.max_w),
                    med(&r.energy_j),
                    med(&r.energy_j_integrated),
                    med(&r.j_per_token),
                    r.energy_source.clone().unwrap_or_default(),
                    med(&r.final_loss),
                    r.skipped_steps.to_string(),
                    r.mem_growth
                        .map(|g| g.bytes.to_string())
                        .unwrap_or_default(),
                    r.mem_growth
                        .map(|g| g.steps.to_string())
                        .unwrap_or_default(),
                    r.predicted_peak_bytes
                        .map(|v| v.to_string())
                        .unwrap_or_default(),
                    med(&r.prediction_error),
                ];
                let line: Vec<String> = fields.iter().map(|s| csv_field(s)).collect();
                out.push_str(&line.join(","));
                out.push('\n');
            }
            out
        }
        Format::Md => {
            let mut out = format!("| {} |\n", HEADERS.join(" | "));
            out.push_str(&format!(
                "|{}\n",
                HEADERS
                    .iter()
                    .enumerate()
                    .map(|(i, _)| if (3..10).contains(&i) {
                        "---:|"
                    } else {
                        "---|"
                    })
                    .collect::<String>()
            ));
            for r in rows {
                let c: Vec<String> = cells(r, None)
                    .into_iter()
                    .map(|s| s.replace('|', "\\|"))
                    .collect();
                out.push_str(&format!("| {} |\n", c.join(" | ")));
            }
            out
        }
        Format::Table => {
            let all: Vec<Vec<String>> = std::iter::once(HEADERS.map(String::from).to_vec())
                .chain(rows.iter().map(|r| cells(r, Some(60))))
                .collect();
            let widths: Vec<usize> = (0..HEADERS.len())
                .map(|i| all.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
                .collect();
            let mut out = String::new();
            for (n, row) in all.iter().enumerate() {
                let mut line = String::new();
                for (i, cell) in row.iter().enumerate() {
                    let pad = widths[i] - cell.chars().count();
                    let right = (3..10).contains(&i) || i == 0;
                    if i > 0 {
                        line.push_str("  ");
                    }
                    if i == row.len() - 1 {
                        line.push_str(cell);
                    } else if right {
                        line.push_str(&" ".repeat(pad));
                        line.push_str(cell);
                    } else {
                        line.push_str(cell);
                        line.push_str(&" ".repeat(pad));
                    }
                }
                out.push_str(line.trim_end());
                out.push('\n');
                if n == 0 {
                    let total: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
                    out.push_str(&"-".repeat(total));
                    out.push('\n');
                }
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::summary::RunSummary;

    fn run(id: i64, gi: usize, spec: &str, repeat: u32, status: RunStatus, tps: f64) -> RunRow {
        RunRow {
            id,
            sweep_id: 1,
            spec_id: spec.into(),
            repeat,
            grid_index: gi,
            label: format!("bs{} seq64 adamw fp32 none r8", gi + 1),
            device: "cpu".into(),
            config: serde_json::json!({}),
            status,
            cause: (status != RunStatus::Ok).then(|| "CUDA out of memory".to_string()),
            started_at: 0.0,
            finished_at: None,
            header: None,
            summary: Some(RunSummary {
                status: Some(status),
                tokens_per_s: Some(tps),
                s_per_10k_tokens: Some(10_000.0 / tps),
                peak_mem_bytes: Some(300 << 20),
                peak_mem_kind: Some("rss".into()),
                final_loss: Some(5.25),
                ..Default::default()
            }),
        }
    }

    fn sample() -> Vec<RunRow> {
        vec![
            run(1, 0, "aaaaaaaaaaaa", 0, RunStatus::Ok, 100.0),
            run(2, 0, "aaaaaaaaaaaa", 1, RunStatus::Interrupted, 0.0),
            run(5, 0, "aaaaaaaaaaaa", 1, RunStatus::Ok, 120.0),
            run(3, 0, "aaaaaaaaaaaa", 2, RunStatus::Ok, 90.0),
            run(4, 1, "bbbbbbbbbbbb", 0, RunStatus::Oom, 0.0),
        ]
    }

    #[test]
    fn rows_use_latest_run_per_repeat() {
        let r = rows(&sample());
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].runs, 3);
        assert_eq!(r[0].status, "ok");
        let t = r[0].tokens_per_s.unwrap();
        assert_eq!((t.median, t.min, t.max), (100.0, 90.0, 120.0));
        assert_eq!(r[1].status, "oom");
        assert_eq!(r[1].tokens_per_s, None);
        assert_eq!(r[1].cause.as_deref(), Some("CUDA out of memory"));
    }

    /// A point whose memory kept rising shows the rise in place of its peak, in every format.
    #[test]
    fn rising_memory_replaces_the_peak() {
        let mut runs = sample();
        let g = crate::summary::MemoryGrowth {
            bytes: 660 << 20,
            steps: 24,
            source: crate::summary::GrowthSource::Steps,
        };
        runs[0].summary.as_mut().unwrap().mem_growth = Some(g);
        let r = rows(&runs);
        assert_eq!(r[0].mem_growth, Some(g));
        let table = render(&r, Format::Table);
        assert!(table.contains("grew +660.0 MiB/24 steps"), "{table}");
        assert!(
            !table.lines().nth(2).unwrap().contains("300.0 MiB"),
            "{table}"
        );
        let csv = render(&r, Format::Csv);
        assert!(
            csv.lines()
                .nth(1)
                .unwrap()
                .ends_with(&format!(",{},24,,", 660u64 << 20)),
            "{csv}"
        );
        let j: serde_json::Value = serde_json::from_str(&render(&r, Format::Json)).unwrap();
        assert_eq!(j[0]["mem_growth"]["bytes"], 660u64 << 20);
        assert!(j[1]["mem_growth"].is_null());
    }

    #[test]
    fn formats() {
        let r = rows(&sample());
        insta::assert_snapshot!("table", render(&r, Format::Table));
        insta::assert_snapshot!("md", render(&r, Format::Md));
        insta::assert_snapshot!("csv", render(&r, Format::Csv));
        let j: serde_json::Value = serde_json::from_str(&render(&r, Format::Json)).unwrap();
        assert_eq!(j[0]["tokens_per_s"]["median"], 100.0);
    }
}
