//! The comparison table model, shared by `report --format table|md|html`, the table printed
//! when a sweep ends and the dashboard's table view.
//!
//! [`Table::build`] turns [`PointRow`]s into columns (one per varying axis, then the metrics,
//! units in the titles), cells (full and abbreviated text, the best value per column marked
//! with [`BEST`]), the winner lines, notes and a legend. [`Table::layout`] fits it to a width
//! without wrapping: first every column in full, then abbreviated titles and values, then
//! columns dropped in [`DROP_ORDER`]; a line that still does not fit is cut with `…`.

use super::axes::{Axes, Axis};
use super::rows::PointRow;
use super::{gib, sig};
use crate::summary::Spread;

/// The marker appended to the best value of a column (plain text keeps it).
pub const BEST: char = '*';

/// A column of the comparison table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Col {
    /// The point's 1-based position in the grid.
    Index,
    /// The point's stable id.
    Id,
    /// A varying axis.
    Axis(Axis),
    /// Real tokens per second (median over repeats).
    TokensPerS,
    /// tokens/s divided by the baseline's.
    Ratio,
    /// Seconds per 10,000 real tokens.
    SPer10k,
    /// Peak memory (GiB): process VRAM, device VRAM or RSS.
    PeakMem,
    /// The memory model's predicted peak (GiB).
    Predicted,
    /// `measured / predicted - 1`.
    PredErr,
    /// Mean board power (W).
    MeanW,
    /// Energy per real token (J).
    JPerToken,
    /// The last reported loss.
    Loss,
    /// `ok`, `oom`, `predicted-oom`, `failed`, ...
    Status,
    /// Why it is not ok.
    Cause,
}

/// The order columns are dropped in when a table does not fit its width even abbreviated
/// (first dropped first). The axis columns (other than device), tokens/s, peak memory,
/// J/token and status are never dropped.
pub const DROP_ORDER: [Col; 10] = [
    Col::Cause,
    Col::Id,
    Col::SPer10k,
    Col::PredErr,
    Col::Predicted,
    Col::Index,
    Col::MeanW,
    Col::Ratio,
    Col::Loss,
    Col::Axis(Axis::Device),
];

/// A column's titles, alignment and legend entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    /// Which column.
    pub col: Col,
    /// The full title, units included (`peak VRAM GiB`).
    pub title: String,
    /// The abbreviated title (`VRAM GiB`).
    pub short: String,
    /// Numbers: right-aligned.
    pub right: bool,
    /// What the column means (one line of the legend).
    pub legend: String,
}

/// One cell: full and abbreviated text; `best` when it holds its column's best value.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    /// The full text (with [`BEST`] appended when best).
    pub text: String,
    /// The abbreviated text (with [`BEST`] when best).
    pub short: String,
    /// The best value of its column among ok points.
    pub best: bool,
    /// The number shown, for sorting (None for text and missing values).
    pub value: Option<f64>,
}

/// One row of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Position in the input rows.
    pub input: usize,
    /// The point named by its varying axes (`nf4 bf16`).
    pub name: String,
    /// One cell per [`Table::columns`] entry.
    pub cells: Vec<Cell>,
    /// The point has ok runs.
    pub ok: bool,
    /// Why it is not ok (oom, failed, predicted-oom, ...).
    pub cause: Option<String>,
}

/// What the table needs besides the rows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TableOptions {
    /// The row whose tokens/s the `x base` column divides by (default: the first ok row).
    pub baseline: Option<usize>,
    /// The limit of "fastest under vram_limit" (default: the rows' `vram_limit_bytes`).
    pub vram_limit_bytes: Option<u64>,
}

/// The comparison table of a sweep (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// Which axes vary (columns) and which do not (the header line).
    pub axes: Axes,
    /// Every column, in order.
    pub columns: Vec<Column>,
    /// The rows, in input order.
    pub rows: Vec<Row>,
    /// `fastest: ...`, `fewest J/token: ...`, `fastest under vram_limit (8.00 GiB): ...`.
    pub winners: Vec<String>,
    /// Notes on the whole table (repeats, synthetic weights, 8-bit state kept f32, ...).
    pub notes: Vec<String>,
}

/// A table fitted to a width: which columns, abbreviated or not, and each column's width.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// Indices into [`Table::columns`], in order.
    pub columns: Vec<usize>,
    /// Abbreviated titles and values.
    pub short: bool,
    /// The width of each shown column (characters).
    pub widths: Vec<usize>,
    /// Spaces between columns.
    pub spacing: usize,
    /// The causes are not all shown in full in the table (print them below).
    pub causes_below: bool,
}

/// A status as narrow columns show it (`predicted-oom` becomes `pred-oom`).
pub fn short_status(status: &str) -> String {
    status.replace("predicted-oom", "pred-oom")
}

/// Bytes in `unit` (`MiB` with one decimal, else GiB with two).
fn mem_text(b: u64, unit: &str) -> String {
    if unit == "MiB" {
        format!("{:.1}", b as f64 / (1u64 << 20) as f64)
    } else {
        gib(b)
    }
}

fn spread_text(s: &Option<Spread>, f: &dyn Fn(f64) -> String) -> (String, String) {
    match s {
        None => ("-".into(), "-".into()),
        Some(s) if s.n <= 1 || f(s.min) == f(s.max) => (f(s.median), f(s.median)),
        Some(s) => (
            format!("{} [{}–{}]", f(s.median), f(s.min), f(s.max)),
            f(s.median),
        ),
    }
}

fn column(col: Col, mem_title: &str, unit: &str) -> Column {
    let c = |title: &str, short: &str, right: bool, legend: &str| Column {
        col,
        title: title.into(),
        short: short.into(),
        right,
        legend: legend.into(),
    };
    match col {
        Col::Index => c("#", "#", true, "#: the point's position in the grid"),
        Col::Id => c(
            "id",
            "id",
            false,
            "id: the point's stable id (same point, same id)",
        ),
        Col::Axis(a) => c(a.title(), a.short_title(), false, &a.legend()),
        Col::TokensPerS => c(
            "tok/s",
            "tok/s",
            true,
            "tok/s: real (non-pad) tokens per second over the timed steps; [min–max] over repeats",
        ),
        Col::Ratio => c(
            "x base",
            "xbase",
            true,
            "x base: tok/s divided by the baseline point's tok/s",
        ),
        Col::SPer10k => c(
            "s/10k tok",
            "s/10k",
            true,
            "s/10k tok: seconds to train on 10,000 real tokens",
        ),
        Col::PeakMem => {
            let legend = format!(
                "{mem_title}: peak memory (process VRAM on GPUs, peak RSS on CPU), {unit}; \
                 `grew`: it rose over the timed steps (a leak's figure, not the point's cost)"
            );
            Column {
                col,
                title: mem_title.into(),
                short: mem_title.replace("peak ", ""),
                right: true,
                legend,
            }
        }
        Col::Predicted => c(
            &format!("pred {unit}"),
            "pred",
            true,
            &format!("pred {unit}: the memory model's predicted peak (lorascope estimate)"),
        ),
        Col::PredErr => c(
            "pred err",
            "err",
            true,
            "pred err: measured peak / predicted - 1",
        ),
        Col::MeanW => c(
            "mean W",
            "W",
            true,
            "mean W: mean board power over the timed steps (NVML)",
        ),
        Col::JPerToken => c(
            "J/token",
            "J/tok",
            true,
            "J/token: energy over the timed steps per real token (NVML counter, else integrated power)",
        ),
        Col::Loss => c(
            "final loss",
            "loss",
            true,
            "final loss: the last step's loss",
        ),
        Col::Status => c(
            "status",
            "status",
            false,
            "status: ok, oom (ran out of memory), predicted-oom or pred-oom (not run: predicted over vram_limit), failed, cancelled, interrupted (stopped with the sweep; --resume re-runs it), skipped, queued",
        ),
        Col::Cause => c("cause", "cause", false, "cause: why a point is not ok"),
    }
}

/// A metric's best direction: `Some(true)` larger is better, `Some(false)` smaller.
fn best_direction(col: Col) -> Option<bool> {
    match col {
        Col::TokensPerS => Some(true),
        // Mean W is not a figure of merit (J/token is): no best mark.
        Col::SPer10k | Col::PeakMem | Col::JPerToken | Col::Loss => Some(false),
        _ => None,
    }
}

fn cell(text: String, short: String, value: Option<f64>) -> Cell {
    Cell {
        text,
        short,
        best: false,
        value,
    }
}

fn cell_of(col: Col, r: &PointRow, base_tps: Option<f64>, unit: &str) -> Cell {
    let mem = |b: u64| mem_text(b, unit);
    let med = |s: &Option<Spread>| s.map(|s| s.median);
    let sp = |s: &Option<Spread>, f: &dyn Fn(f64) -> String| {
        let (t, short) = spread_text(s, f);
        cell(t, short, med(s))
    };
    match col {
        Col::Index => cell(
            (r.index + 1).to_string(),
            (r.index + 1).to_string(),
            Some(r.index as f64),
        ),
        Col::Id => cell(r.spec_id.clone(), r.spec_id.chars().take(8).collect(), None),
        // Numeric axes (batch, seq, rank) carry their number, so the HTML table sorts 2 < 16.
        Col::Axis(a) => {
            let v = a.value(r);
            let n = v.parse::<f64>().ok();
            cell(v, a.short_value(r), n)
        }
        Col::TokensPerS => sp(&r.tokens_per_s, &|v| format!("{v:.1}")),
        Col::Ratio => {
            let v = match (med(&r.tokens_per_s), base_tps) {
                (Some(v), Some(b)) if b > 0.0 => Some(v / b),
                _ => None,
            };
            let t = v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
            cell(t.clone(), t, v)
        }
        Col::SPer10k => sp(&r.s_per_10k_tokens, &|v| format!("{v:.2}")),
        Col::PeakMem => match (&r.mem_growth, r.peak_mem_bytes) {
            (Some(g), _) => cell(format!("grew {}", g.short()), "grew".into(), None),
            (None, Some(b)) => cell(mem(b), mem(b), Some(b as f64)),
            (None, None) => cell("-".into(), "-".into(), None),
        },
        Col::Predicted => match r.predicted_peak_bytes {
            Some(b) => cell(mem(b), mem(b), Some(b as f64)),
            None => cell("-".into(), "-".into(), None),
        },
        Col::PredErr => sp(&r.prediction_error, &|v| format!("{:+.1}%", v * 100.0)),
        Col::MeanW => sp(&r.mean_w, &|v| format!("{v:.1}")),
        Col::JPerToken => sp(&r.j_per_token, &sig),
        Col::Loss => sp(&r.final_loss, &|v| format!("{v:.4}")),
        Col::Status => {
            let short = short_status(&r.status);
            cell(r.status.clone(), short, None)
        }
        Col::Cause => {
            // One line per row: a multi-line cause (a worker's message) is joined with spaces.
            let c = r
                .cause
                .as_deref()
                .unwrap_or_default()
                .replace(['\n', '\r'], " ");
            cell(c.clone(), c, None)
        }
    }
}

impl Table {
    /// The table of `rows` (see the module docs). Columns that no row has a value for
    /// (predicted, power and energy on CPU, cause when all are ok) are left out.
    pub fn build(rows: &[PointRow], opts: &TableOptions) -> Table {
        let axes = Axes::of(rows);
        let kinds: Vec<&str> = rows
            .iter()
            .filter_map(|r| r.peak_mem_kind.as_deref())
            .collect();
        // MiB when every figure is under 1 GiB (CPU runs of small models), else GiB.
        let mut mem_bytes = rows
            .iter()
            .flat_map(|r| [r.peak_mem_bytes, r.predicted_peak_bytes])
            .flatten()
            .peekable();
        let unit = if mem_bytes.peek().is_some() && mem_bytes.all(|b| b < 1 << 30) {
            "MiB"
        } else {
            "GiB"
        };
        let what = if !kinds.is_empty() && kinds.iter().all(|k| *k == "rss") {
            "peak RSS"
        } else if kinds.contains(&"rss") {
            "peak mem"
        } else {
            "peak VRAM"
        };
        let mem_title = format!("{what} {unit}");
        let mem_title = mem_title.as_str();
        let any = |f: &dyn Fn(&PointRow) -> bool| rows.iter().any(f);
        let mut cols = vec![Col::Index, Col::Id];
        cols.extend(axes.varying.iter().map(|a| Col::Axis(*a)));
        cols.extend([Col::TokensPerS, Col::Ratio, Col::SPer10k, Col::PeakMem]);
        if any(&|r| r.predicted_peak_bytes.is_some()) {
            cols.extend([Col::Predicted, Col::PredErr]);
        }
        if any(&|r| r.mean_w.is_some()) {
            cols.push(Col::MeanW);
        }
        if any(&|r| r.j_per_token.is_some()) {
            cols.push(Col::JPerToken);
        }
        cols.extend([Col::Loss, Col::Status]);
        if any(&|r| r.cause.is_some()) {
            cols.push(Col::Cause);
        }
        let columns: Vec<Column> = cols.iter().map(|c| column(*c, mem_title, unit)).collect();
        let base = opts
            .baseline
            .or_else(|| rows.iter().position(|r| r.tokens_per_s.is_some()));
        let base_tps = base
            .and_then(|i| rows.get(i))
            .and_then(|r| r.tokens_per_s.map(|s| s.median));
        let mut out: Vec<Row> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| Row {
                input: i,
                name: axes.name(r),
                cells: cols
                    .iter()
                    .map(|c| cell_of(*c, r, base_tps, unit))
                    .collect(),
                ok: r.is_ok(),
                cause: r.cause.clone(),
            })
            .collect();
        for (k, c) in cols.iter().enumerate() {
            let Some(higher) = best_direction(*c) else {
                continue;
            };
            let vals: Vec<f64> = out
                .iter()
                .filter(|r| r.ok)
                .filter_map(|r| r.cells[k].value)
                .collect();
            if vals.len() < 2 {
                continue;
            }
            let best = vals.iter().copied().fold(vals[0], |m, v| {
                if (higher && v > m) || (!higher && v < m) {
                    v
                } else {
                    m
                }
            });
            for r in out.iter_mut() {
                let ok = r.ok;
                let cell = &mut r.cells[k];
                if ok && cell.value == Some(best) {
                    cell.best = true;
                    cell.text.push(BEST);
                    cell.short.push(BEST);
                } else {
                    // A space where the mark would be, so right-aligned digits line up.
                    cell.text.push(' ');
                    cell.short.push(' ');
                }
            }
        }
        Table {
            winners: winners(rows, &axes, opts.vram_limit_bytes),
            notes: notes(rows, &axes),
            axes,
            columns,
            rows: out,
        }
    }

    /// The legend: one line per shown column of `layout` (all columns without one), then the
    /// best marker.
    pub fn legend(&self, layout: Option<&Layout>) -> Vec<String> {
        let shown: Vec<usize> = match layout {
            Some(l) => l.columns.clone(),
            None => (0..self.columns.len()).collect(),
        };
        let short = layout.is_some_and(|l| l.short);
        let mut out: Vec<String> = shown
            .iter()
            .map(|&k| &self.columns[k])
            .filter(|c| !c.legend.is_empty())
            .map(|c| {
                // Name the column as the table heads it (`xbase`, `J/tok`) when abbreviated.
                match c.legend.strip_prefix(&format!("{}:", c.title)) {
                    Some(rest) if short && c.short != c.title => {
                        format!("{} ({}):{rest}", c.short, c.title)
                    }
                    _ => c.legend.clone(),
                }
            })
            .collect();
        out.push(format!(
            "{BEST}: the best value of its column among ok points"
        ));
        out
    }

    /// The cell text of row `r`, shown column `k` of `layout`, cut to the column's width.
    pub fn cell_text(&self, layout: &Layout, r: usize, k: usize) -> String {
        let col = layout.columns[k];
        let c = &self.rows[r].cells[col];
        let t = if layout.short { &c.short } else { &c.text };
        cut(t, layout.widths[k])
    }

    /// The title of shown column `k` of `layout`.
    pub fn title(&self, layout: &Layout, k: usize) -> &str {
        let c = &self.columns[layout.columns[k]];
        if layout.short { &c.short } else { &c.title }
    }

    pub(super) fn widths(&self, cols: &[usize], short: bool) -> Vec<usize> {
        cols.iter()
            .map(|&k| {
                let c = &self.columns[k];
                let title = if short { &c.short } else { &c.title };
                self.rows
                    .iter()
                    .map(|r| {
                        let cell = &r.cells[k];
                        len(if short { &cell.short } else { &cell.text })
                    })
                    .chain(std::iter::once(len(title)))
                    .max()
                    .unwrap_or(0)
            })
            .collect()
    }

    /// Fits the table to `width` characters with `spacing` spaces between columns: every
    /// column in full if that fits, else abbreviated, else columns dropped in [`DROP_ORDER`]
    /// (the cause column is first cut, to no less than 12 characters, then dropped).
    pub fn layout(&self, width: usize, spacing: usize) -> Layout {
        let mut cols: Vec<usize> = (0..self.columns.len()).collect();
        let total = |w: &[usize]| w.iter().sum::<usize>() + spacing * w.len().saturating_sub(1);
        let has_cause = self.columns.iter().any(|c| c.col == Col::Cause);
        let fit = |cols: &[usize], short: bool| -> Option<Layout> {
            let mut widths = self.widths(cols, short);
            let mut causes_below =
                has_cause && !cols.iter().any(|&k| self.columns[k].col == Col::Cause);
            if total(&widths) > width {
                let last = cols.len().checked_sub(1)?;
                if self.columns[cols[last]].col != Col::Cause {
                    return None;
                }
                let rest = total(&widths[..last]) + spacing;
                if rest + 12 > width {
                    return None;
                }
                widths[last] = width - rest;
                causes_below = true;
            }
            Some(Layout {
                columns: cols.to_vec(),
                short,
                widths,
                spacing,
                causes_below,
            })
        };
        if let Some(l) = fit(&cols, false) {
            return l;
        }
        for drop in DROP_ORDER {
            if let Some(l) = fit(&cols, true) {
                return l;
            }
            cols.retain(|&k| self.columns[k].col != drop);
        }
        fit(&cols, true).unwrap_or_else(|| Layout {
            widths: self.widths(&cols, true),
            columns: cols,
            short: true,
            spacing,
            causes_below: has_cause,
        })
    }
}

use super::text::len;
pub use super::text::{cut, wrap};
use super::winners::{notes, winners};
