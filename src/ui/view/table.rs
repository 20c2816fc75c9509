//! The comparison table: one row per finished run (skipped ones left out), sortable by any
//! column, best values marked, ratios to the baseline run.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Modifier;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Paragraph, Row, Table, TableState};

use super::super::app::{App, Column};
use super::super::theme::Theme;
use super::{fmt_num, short_label, status_style};
use crate::report::human_bytes;
use crate::summary::{RunStatus, RunSummary};

/// One metric of a run, best values highlighted, with `×` its ratio to `base` if `ratios`.
fn metric_cell(
    app: &App,
    t: Theme,
    s: &RunSummary,
    col: Column,
    base: Option<&RunSummary>,
    ratios: bool,
) -> Cell<'static> {
    let v = col.value(s);
    let text = match (col, v) {
        (Column::PeakMem, Some(b)) => human_bytes(Some(b as u64)),
        (_, Some(v)) => fmt_num(v),
        (_, None) => "–".into(),
    };
    let ratio = match (ratios, v, base.and_then(|b| col.value(b))) {
        (true, Some(v), Some(b)) if b != 0.0 => format!(" {:.2}×", v / b),
        _ => String::new(),
    };
    // A peak that was still rising is a leak's, not the run's: marked, never "best".
    let rising = col == Column::PeakMem && s.mem_growth.is_some();
    let text = if rising { format!("{text} ↗") } else { text };
    let best = s.status == Some(RunStatus::Ok)
        && v.is_some()
        && !rising
        && app.best(col).is_some_and(|b| Some(b) == v);
    let style = match (rising, best) {
        (true, _) => t.bad(),
        (false, true) => t.best(),
        (false, false) => t.text(),
    };
    Cell::from(Line::from(vec![
        Span::styled(text, style),
        Span::styled(ratio, t.dim()),
    ]))
}

/// Draws the comparison table: finished runs, sorted, with ratios to the baseline when
/// wide, and the focused row's cause below.
pub(super) fn draw(f: &mut Frame, app: &App, t: Theme, area: Rect) {
    let ids = app.table_rows();
    let wide = area.width >= 120;
    let base = app
        .baseline
        .as_ref()
        .and_then(|b| app.runs.get(b))
        .and_then(|r| r.summary.as_ref());
    let metrics = [
        Column::TokensPerS,
        Column::SPer10k,
        Column::PeakMem,
        Column::MeanW,
        Column::JPerToken,
        Column::Loss,
    ];
    let mut header = vec![Cell::from(" point")];
    for c in metrics {
        header.push(Cell::from(c.title()));
    }
    header.push(Cell::from("status"));
    if !wide {
        header.push(Cell::from("×base"));
    } else {
        header.push(Cell::from("cause"));
    }
    let header: Vec<Cell> = header
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let col = match i {
                0 => Some(Column::Point),
                1..=6 => Some(metrics[i - 1]),
                7 => Some(Column::Status),
                _ => None,
            };
            if col == Some(app.sort) {
                c.style(t.key().add_modifier(Modifier::UNDERLINED))
            } else {
                c.style(t.dim().add_modifier(Modifier::BOLD))
            }
        })
        .collect();
    let mut rows = Vec::new();
    for id in &ids {
        let Some(r) = app.runs.get(id) else { continue };
        let Some(s) = r.summary.as_ref() else {
            continue;
        };
        let status = s.status.unwrap_or(RunStatus::Failed);
        let is_base = app.baseline.as_ref() == Some(id);
        let label = if wide {
            app.specs
                .get(r.spec_index)
                .map(|s| s.label())
                .unwrap_or_default()
        } else {
            short_label(app, r.spec_index)
        };
        let mut cells = vec![Cell::from(format!(
            "{}{label}",
            if is_base { "*" } else { " " }
        ))];
        for c in metrics {
            cells.push(metric_cell(app, t, s, c, base, wide));
        }
        let mark = match status {
            RunStatus::Oom | RunStatus::PredictedOom | RunStatus::Failed => "✗ ",
            _ => "",
        };
        cells.push(Cell::from(Span::styled(
            format!("{mark}{status}"),
            status_style(t, status),
        )));
        if wide {
            cells.push(Cell::from(Span::styled(
                s.cause.clone().unwrap_or_default(),
                status_style(t, status),
            )));
        } else {
            let ratio = match (s.tokens_per_s, base.and_then(|b| b.tokens_per_s)) {
                (Some(v), Some(b)) if b > 0.0 => format!("{:.2}×", v / b),
                _ => "–".into(),
            };
            cells.push(Cell::from(ratio));
        }
        let mut row = Row::new(cells);
        if app.table_selected.as_ref() == Some(id) {
            row = row.style(t.selected());
        }
        rows.push(row);
    }
    let widths: Vec<Constraint> = if wide {
        vec![
            Constraint::Length(31),
            Constraint::Length(13),
            Constraint::Length(12),
            Constraint::Length(16),
            Constraint::Length(12),
            Constraint::Length(12),
            Constraint::Length(11),
            Constraint::Length(11),
            Constraint::Min(10),
        ]
    } else {
        vec![
            Constraint::Min(10),
            Constraint::Length(6),
            Constraint::Length(6),
            Constraint::Length(9),
            Constraint::Length(5),
            Constraint::Length(6),
            Constraint::Length(5),
            Constraint::Length(8),
            Constraint::Length(6),
        ]
    };
    let arrow = if app.sort_desc { "↓" } else { "↑" };
    let title = format!(
        " Comparison: {} finished · sort {} {arrow} · * baseline ",
        ids.len(),
        app.sort.title()
    );
    let block = Block::bordered().title(Span::styled(title, t.title()));
    let inner = block.inner(area);
    f.render_widget(block, area);
    let [tbl, info] = Layout::vertical([Constraint::Min(1), Constraint::Length(1)]).areas(inner);
    let mut state = TableState::default();
    if let Some(sel) = &app.table_selected {
        state.select(ids.iter().position(|r| r == sel));
    }
    f.render_stateful_widget(
        Table::new(rows, widths)
            .header(Row::new(header))
            .column_spacing(1),
        tbl,
        &mut state,
    );
    // The selected (else first non-ok) row's cause, and the baseline.
    let focus = app.table_selected.clone().or_else(|| {
        ids.iter()
            .find(|id| {
                app.runs
                    .get(*id)
                    .and_then(|r| r.summary.as_ref())
                    .is_some_and(|s| s.status != Some(RunStatus::Ok))
            })
            .cloned()
    });
    let mut spans = vec![];
    if let Some(id) = focus
        && let Some(s) = app.runs.get(&id).and_then(|r| r.summary.as_ref())
        && let Some(c) = &s.cause
    {
        spans.push(Span::styled(format!("{id}: {c}"), t.bad()));
        spans.push(Span::raw("  "));
    }
    spans.push(Span::styled(
        match &app.baseline {
            Some(b) => format!("baseline {b}"),
            None => "no baseline (b on a row)".into(),
        },
        t.dim(),
    ));
    f.render_widget(Paragraph::new(Line::from(spans)), info);
}
