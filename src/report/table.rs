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
use crate::spec::Optimizer;
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

fn column(col: Col, mem_title: &str) -> Column {
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
        Col::Axis(a) => c(a.title(), a.short_title(), false, ""),
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
                "{mem_title}: peak memory (process VRAM on GPUs, peak RSS on CPU), GiB; \
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
            "pred GiB",
            "pred",
            true,
            "pred GiB: the memory model's predicted peak (lorascope estimate)",
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
            "status: ok, oom (ran out of memory), predicted-oom (not run: over vram_limit), failed, cancelled",
        ),
        Col::Cause => c("cause", "cause", false, "cause: why a point is not ok"),
    }
}

/// A metric's best direction: `Some(true)` larger is better, `Some(false)` smaller.
fn best_direction(col: Col) -> Option<bool> {
    match col {
        Col::TokensPerS => Some(true),
        Col::SPer10k | Col::PeakMem | Col::MeanW | Col::JPerToken | Col::Loss => Some(false),
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

fn cell_of(col: Col, r: &PointRow, base_tps: Option<f64>) -> Cell {
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
        Col::Axis(a) => cell(a.value(r), a.short_value(r), None),
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
            (None, Some(b)) => cell(gib(b), gib(b), Some(b as f64)),
            (None, None) => cell("-".into(), "-".into(), None),
        },
        Col::Predicted => match r.predicted_peak_bytes {
            Some(b) => cell(gib(b), gib(b), Some(b as f64)),
            None => cell("-".into(), "-".into(), None),
        },
        Col::PredErr => sp(&r.prediction_error, &|v| format!("{:+.1}%", v * 100.0)),
        Col::MeanW => sp(&r.mean_w, &|v| format!("{v:.1}")),
        Col::JPerToken => sp(&r.j_per_token, &sig),
        Col::Loss => sp(&r.final_loss, &|v| format!("{v:.4}")),
        Col::Status => {
            let short = r.status.replace("predicted-oom", "pred-oom");
            cell(r.status.clone(), short, None)
        }
        Col::Cause => {
            let c = r.cause.clone().unwrap_or_default();
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
        let mem_title = if !kinds.is_empty() && kinds.iter().all(|k| *k == "rss") {
            "peak RSS GiB"
        } else if kinds.iter().any(|k| *k == "rss") {
            "peak mem GiB"
        } else {
            "peak VRAM GiB"
        };
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
        let columns: Vec<Column> = cols.iter().map(|c| column(*c, mem_title)).collect();
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
                cells: cols.iter().map(|c| cell_of(*c, r, base_tps)).collect(),
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
            for r in out.iter_mut().filter(|r| r.ok) {
                let cell = &mut r.cells[k];
                if cell.value == Some(best) {
                    cell.best = true;
                    cell.text.push(BEST);
                    cell.short.push(BEST);
                }
            }
        }
        let limit = opts
            .vram_limit_bytes
            .or_else(|| rows.iter().find_map(|r| r.vram_limit_bytes));
        Table {
            winners: winners(rows, &axes, limit),
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
        let mut out: Vec<String> = shown
            .iter()
            .map(|&k| &self.columns[k])
            .filter(|c| !c.legend.is_empty())
            .map(|c| c.legend.clone())
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

    fn widths(&self, cols: &[usize], short: bool) -> Vec<usize> {
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

    /// The table as text lines fitted to `width` (see [`Table::layout`]), no line longer than
    /// `width`: the constant axes, the table, the causes when cut, the winner lines, notes and
    /// the legend.
    pub fn render_text(&self, width: usize) -> String {
        let width = width.max(20);
        let layout = self.layout(width, 2);
        let mut lines: Vec<String> = Vec::new();
        if let Some(h) = self.axes.header_line() {
            lines.extend(wrap(&h, width, "  "));
        }
        let pad = |s: &str, w: usize, right: bool| {
            let n = w.saturating_sub(len(s));
            if right {
                format!("{}{s}", " ".repeat(n))
            } else {
                format!("{s}{}", " ".repeat(n))
            }
        };
        let sep = " ".repeat(layout.spacing);
        let line = |cells: Vec<String>| -> String {
            let parts: Vec<String> = cells
                .iter()
                .enumerate()
                .map(|(k, s)| {
                    let col = &self.columns[layout.columns[k]];
                    pad(s, layout.widths[k], col.right)
                })
                .collect();
            cut(parts.join(&sep).trim_end(), width)
        };
        let titles: Vec<String> = (0..layout.columns.len())
            .map(|k| self.title(&layout, k).to_string())
            .collect();
        lines.push(line(titles));
        let total = layout.widths.iter().sum::<usize>()
            + layout.spacing * layout.widths.len().saturating_sub(1);
        lines.push("-".repeat(total.min(width)));
        for r in 0..self.rows.len() {
            let cells = (0..layout.columns.len())
                .map(|k| self.cell_text(&layout, r, k))
                .collect();
            lines.push(line(cells));
        }
        if layout.causes_below {
            for r in self.rows.iter().filter(|r| r.cause.is_some()) {
                let c = r.cause.as_deref().unwrap_or("");
                lines.extend(wrap(&format!("{}: {c}", r.name), width, "    "));
            }
        }
        let mut rest: Vec<String> = self.winners.clone();
        rest.extend(self.notes.iter().map(|n| format!("note: {n}")));
        if !rest.is_empty() {
            lines.push(String::new());
        }
        for l in rest {
            lines.extend(wrap(&l, width, "  "));
        }
        lines.push(String::new());
        for l in self.legend(Some(&layout)) {
            lines.extend(wrap(&l, width, "    "));
        }
        let mut out = lines.join("\n");
        out.push('\n');
        out
    }

    /// The table as Markdown: every column in full, then the winner lines, notes and legend.
    pub fn render_md(&self) -> String {
        let esc = |s: &str| s.replace('|', "\\|").replace('*', "\\*");
        let mut out = String::new();
        if let Some(h) = self.axes.header_line() {
            out.push_str(&format!("{}\n\n", esc(&h)));
        }
        let titles: Vec<String> = self.columns.iter().map(|c| esc(&c.title)).collect();
        out.push_str(&format!("| {} |\n|", titles.join(" | ")));
        for c in &self.columns {
            out.push_str(if c.right { "---:|" } else { "---|" });
        }
        out.push('\n');
        for r in &self.rows {
            let cells: Vec<String> = r.cells.iter().map(|c| esc(&c.text)).collect();
            out.push_str(&format!("| {} |\n", cells.join(" | ")));
        }
        out.push('\n');
        for w in &self.winners {
            out.push_str(&format!("- {}\n", esc(w)));
        }
        for n in &self.notes {
            out.push_str(&format!("- note: {}\n", esc(n)));
        }
        out.push('\n');
        for l in self.legend(None) {
            out.push_str(&format!("- {}\n", esc(&l)));
        }
        out
    }
}

/// The row of `it` with the best `f` (largest if `higher`), first on ties.
fn best_by<'a>(
    it: impl Iterator<Item = &'a &'a PointRow>,
    f: &dyn Fn(&PointRow) -> Option<f64>,
    higher: bool,
) -> Option<(&'a PointRow, f64)> {
    it.filter_map(|r| f(r).map(|v| (*r, v)))
        .fold(None, |m: Option<(&PointRow, f64)>, (r, v)| match m {
            Some((_, b)) if (higher && v <= b) || (!higher && v >= b) => m,
            _ => Some((r, v)),
        })
}

/// The winner lines of `rows` (ok points only): fastest, fewest J/token, and fastest whose
/// peak memory is within `limit` when a limit is known.
pub fn winners(rows: &[PointRow], axes: &Axes, limit: Option<u64>) -> Vec<String> {
    let ok: Vec<&PointRow> = rows.iter().filter(|r| r.is_ok()).collect();
    let tps = |r: &PointRow| r.tokens_per_s.map(|s| s.median);
    let mut out = Vec::new();
    if let Some((r, v)) = best_by(ok.iter(), &tps, true) {
        out.push(format!("fastest: {} ({v:.1} tok/s)", axes.name(r)));
    }
    let jpt = |r: &PointRow| r.j_per_token.map(|s| s.median);
    if let Some((r, v)) = best_by(ok.iter(), &jpt, false) {
        out.push(format!(
            "fewest J/token: {} ({} J/token)",
            axes.name(r),
            sig(v)
        ));
    }
    if let Some(limit) = limit {
        let fits = ok
            .iter()
            .filter(|r| r.peak_mem_bytes.is_some_and(|b| b <= limit));
        let line = match best_by(fits, &tps, true) {
            Some((r, v)) => format!(
                "fastest under vram_limit ({} GiB): {} ({v:.1} tok/s, peak {} GiB)",
                gib(limit),
                axes.name(r),
                r.peak_mem_bytes.map(gib).unwrap_or_default()
            ),
            None => format!(
                "fastest under vram_limit ({} GiB): none of the ok points",
                gib(limit)
            ),
        };
        out.push(line);
    }
    out
}

/// Whether an 8-bit optimizer's state is all f32: `optimizer_state_bytes` is two f32 moments
/// of every trainable parameter, as when every adapter tensor is under
/// [`crate::engine::optim::MIN_8BIT_SIZE`] elements.
fn eight_bit_state_is_f32(r: &PointRow) -> bool {
    let eight = r.point.is_some_and(|p| {
        matches!(
            p.optimizer,
            Optimizer::AdamW8bit | Optimizer::PagedAdamW8bit
        )
    });
    eight
        && matches!((r.params_trainable, r.optimizer_state_bytes), (Some(n), Some(b)) if n > 0 && b == 8 * n)
}

/// Notes on the whole table.
pub fn notes(rows: &[PointRow], axes: &Axes) -> Vec<String> {
    let mut out = Vec::new();
    if rows.iter().any(|r| r.runs > 1) {
        out.push("with repeats a value is the median, [min–max] when they differ".into());
    }
    let f32_state: Vec<String> = rows
        .iter()
        .filter(|r| eight_bit_state_is_f32(r))
        .map(|r| axes.name(r))
        .collect();
    if !f32_state.is_empty() {
        out.push(format!(
            "8-bit optimizer state is f32 here ({}): every adapter tensor has fewer than {} \
             elements, and bitsandbytes keeps such tensors' state in f32 (min_8bit_size), so \
             adamw8bit measures the same as adamw",
            f32_state.join(", "),
            fmt_thousands(crate::engine::optim::MIN_8BIT_SIZE)
        ));
    }
    if rows.iter().any(|r| r.synthetic_weights) {
        out.push(
            "random base weights (no weight files): speed, memory and energy are representative, \
             loss values are not"
                .into(),
        );
    }
    let mut seen: Vec<(String, Vec<String>)> = Vec::new();
    for r in rows {
        if let Some(n) = &r.note {
            match seen.iter_mut().find(|(t, _)| t == n) {
                Some((_, names)) => names.push(axes.name(r)),
                None => seen.push((n.clone(), vec![axes.name(r)])),
            }
        }
    }
    for (n, names) in seen {
        if names.len() == rows.len() {
            out.push(n);
        } else {
            out.push(format!("{n} ({})", names.join(", ")));
        }
    }
    out
}

fn fmt_thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Characters (not bytes) of `s`.
fn len(s: &str) -> usize {
    s.chars().count()
}

/// `s` cut to `w` characters, the last one `…` when cut.
pub fn cut(s: &str, w: usize) -> String {
    if len(s) <= w {
        return s.to_string();
    }
    if w == 0 {
        return String::new();
    }
    let mut t: String = s.chars().take(w - 1).collect();
    t.push('…');
    t
}

/// `s` broken at spaces into lines of at most `width` characters, continuation lines
/// indented by `indent`; a word longer than a line is cut.
pub fn wrap(s: &str, width: usize, indent: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut line = String::new();
    for word in s.split(' ') {
        let prefix = if out.is_empty() { "" } else { indent };
        let cur = if line.is_empty() {
            len(prefix)
        } else {
            len(&line)
        };
        if !line.is_empty() && cur + 1 + len(word) > width {
            out.push(cut(&line, width));
            line.clear();
        }
        if line.is_empty() {
            line.push_str(if out.is_empty() { "" } else { indent });
            line.push_str(word);
        } else {
            line.push(' ');
            line.push_str(word);
        }
    }
    if !line.is_empty() {
        out.push(cut(&line, width));
    }
    out
}
