//! What a recorded sweep answers: the comparison table, exports, charts and the HTML report.
//!
//! - [`rows`]: one [`PointRow`] per point from the stored runs (the data of every format);
//! - [`axes`]: which axes vary between the points (columns) and which do not (a header line);
//! - [`table`]: the one comparison table model (columns with units, best marked, winner
//!   lines, legend, a width-aware layout), used by `report`, the end-of-sweep print and the
//!   dashboard;
//! - [`export`]: CSV and JSON with one field per axis and the metadata block ([`meta`]);
//! - [`charts`]: Pareto, bars and per-run curves (plotters: SVG and PNG);
//! - [`html`]: the self-contained HTML report.

pub mod axes;
pub mod charts;
pub mod export;
pub mod html;
pub mod meta;
mod render;
pub mod rows;
pub mod table;
#[cfg(test)]
mod tests;
mod text;
pub mod winners;

pub use axes::{Axes, Axis};
pub use charts::{ChartData, ChartKind, RunCurves};
pub use meta::SweepMeta;
pub(crate) use render::md_escape;
pub use rows::{PointRow, rows};
pub use table::{Table, TableOptions};

use crate::store::{RunRow, Store, StoreError, SweepRow};
use crate::summary::RunStatus;

/// Output format of `lorascope report`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned text columns fitted to `--width`, winner lines, notes and legend.
    Table,
    /// A Markdown table (every column), winner lines, notes and legend.
    Md,
    /// CSV: `# key: value` metadata lines, then one line per point (RFC 4180 quoting).
    Csv,
    /// JSON: `{"meta": {...}, "runs": [...]}`.
    Json,
    /// One self-contained HTML file: table, charts, metadata.
    Html,
    /// One chart (`--chart`) as SVG.
    Svg,
    /// One chart (`--chart`) as PNG (needs `--out`).
    Png,
}

/// Bytes as GiB with two decimals (`0.29`), for tables and winner lines.
pub fn gib(b: u64) -> String {
    format!("{:.2}", b as f64 / (1u64 << 30) as f64)
}

/// A number with four significant digits (`0.01234`, `1.234`, `1234`).
pub fn sig(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    if v == 0.0 {
        return "0".into();
    }
    let digits = (3 - v.abs().log10().floor() as i32).max(0) as usize;
    format!("{v:.digits$}")
}

/// Bytes as MiB/GiB (`300.0 MiB`, `1.25 GiB`), `-` for none.
pub fn human_bytes(b: Option<u64>) -> String {
    match b {
        None => "-".into(),
        Some(b) if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        Some(b) => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
    }
}

/// Everything the formats need of one recorded sweep.
#[derive(Debug, Clone)]
pub struct SweepReport {
    /// The sweep.
    pub sweep: SweepRow,
    /// Every run row.
    pub runs: Vec<RunRow>,
    /// One row per point.
    pub rows: Vec<PointRow>,
    /// The metadata block.
    pub meta: SweepMeta,
}

impl SweepReport {
    /// Reads sweep `sweep` back from `store`.
    ///
    /// Errors: the database fails.
    pub fn load(store: &Store, sweep: SweepRow) -> Result<SweepReport, StoreError> {
        let runs = store.runs(sweep.id)?;
        let rows = rows::rows(&runs);
        let pairs = store.sweep_meta(sweep.id)?;
        let mut power_limit: Option<f64> = None;
        if let Some(r) = runs.iter().find(|r| r.status == RunStatus::Ok) {
            for s in store.telemetry(r.id)? {
                if let Some(w) = s.power_limit_w {
                    power_limit = Some(power_limit.map_or(w, |p: f64| p.max(w)));
                }
            }
        }
        let meta = meta::sweep_meta(&sweep, &pairs, &runs, rows.len(), power_limit);
        Ok(SweepReport {
            sweep,
            runs,
            rows,
            meta,
        })
    }

    /// The comparison table (baseline: the first ok point).
    pub fn table(&self) -> Table {
        Table::build(&self.rows, &TableOptions::default())
    }

    /// The Pareto chart's vertical line: `vram_limit`, else the GPU's memory.
    pub fn limit(&self) -> Option<(u64, &'static str)> {
        self.meta
            .vram_limit_bytes
            .map(|b| (b, "vram_limit"))
            .or_else(|| self.meta.gpu_memory_bytes.map(|b| (b, "GPU memory")))
    }

    /// The curves of the latest ok run of each point (its first repeat), named by `axes`.
    ///
    /// Errors: the database fails.
    pub fn curves(&self, store: &Store, axes: &Axes) -> Result<Vec<RunCurves>, StoreError> {
        let mut out = Vec::new();
        for r in &self.rows {
            let Some(run) = self
                .runs
                .iter()
                .filter(|x| x.spec_id == r.spec_id && x.status == RunStatus::Ok)
                .max_by_key(|x| (std::cmp::Reverse(x.repeat), x.id))
            else {
                continue;
            };
            out.push(RunCurves {
                name: axes.name(r),
                steps: store.steps(run.id)?,
                samples: store.telemetry(run.id)?,
                reserved_bytes: run
                    .header
                    .as_ref()
                    .and_then(|h| h.get("vram_reserved_bytes"))
                    .and_then(|v| v.as_u64())
                    .unwrap_or(0),
            });
        }
        Ok(out)
    }
}
