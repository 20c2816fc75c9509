//! The comparison table: one row per finished run (skipped ones left out), sorted by the
//! chosen column, drawn from the one table model ([`crate::report::Table`]): the varying axes
//! as columns, units in the titles, the best value per column marked (`*` and colour), `x
//! base` the tokens/s ratio to the baseline run, the layout fitted to the width (columns
//! abbreviated, then dropped in [`crate::report::table::DROP_ORDER`]), the winner lines below
//! when there is room, and the focused row's cause.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Modifier;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Paragraph, Row, Table, TableState};

use super::super::app::{App, Column};
use super::super::theme::Theme;
use super::status_style;
use crate::report::table::{Col, cut};
use crate::report::{PointRow, TableOptions};
use crate::summary::RunStatus;

/// The model column a sort column is shown in.
fn model_col(c: Column) -> Option<Col> {
    Some(match c {
        Column::Point => Col::Index,
        Column::TokensPerS => Col::TokensPerS,
        Column::SPer10k => Col::SPer10k,
        Column::PeakMem => Col::PeakMem,
        Column::MeanW => Col::MeanW,
        Column::JPerToken => Col::JPerToken,
        Column::Loss => Col::Loss,
        Column::Status => Col::Status,
    })
}

/// The comparison table of the finished runs (the report's [`crate::report::Table`]) and the
/// run id of each row.
pub(super) fn model(app: &App) -> (Vec<String>, crate::report::Table) {
    let ids = app.table_rows();
    let mut rows: Vec<PointRow> = Vec::new();
    let mut row_ids = Vec::new();
    for id in &ids {
        let Some(r) = app.runs.get(id) else { continue };
        let (Some(s), Some(spec)) = (r.summary.as_ref(), app.specs.get(r.spec_index)) else {
            continue;
        };
        let mut row = PointRow::from_summary(
            spec.index,
            id,
            spec.config.point,
            r.device.as_deref().unwrap_or(""),
            spec.config.vram_limit_bytes,
            s,
        );
        row.spec_id = id.clone();
        rows.push(row);
        row_ids.push(id.clone());
    }
    let baseline = app
        .baseline
        .as_ref()
        .and_then(|b| row_ids.iter().position(|x| x == b));
    let model = crate::report::Table::build(
        &rows,
        &TableOptions {
            baseline,
            // None: each row's own limit (a `card` axis gives each point one).
            vram_limit_bytes: None,
        },
    );
    (row_ids, model)
}

/// Draws the comparison table: finished runs, sorted, the baseline marked `=`, the winner
/// lines and the focused row's cause below.
pub(super) fn draw(f: &mut Frame, app: &App, t: Theme, area: Rect) {
    let ids = app.table_rows();
    let (row_ids, model) = model(app);
    let baseline = app
        .baseline
        .as_ref()
        .and_then(|b| row_ids.iter().position(|x| x == b));
    let arrow = if app.sort_desc { "↓" } else { "↑" };
    let title = format!(
        " Comparison: {} finished · sort {} {arrow} · = baseline · * best ",
        ids.len(),
        app.sort.title()
    );
    let block = Block::bordered().title(Span::styled(title, t.title()));
    let inner = block.inner(area);
    f.render_widget(block, area);
    // One column for the baseline marker and its space.
    let width = (inner.width as usize).saturating_sub(2);
    let layout = model.layout(width, 1);
    let room = (inner.height as usize).saturating_sub(model.rows.len() + 2);
    let winners: Vec<&String> = if room > model.winners.len() {
        model.winners.iter().collect()
    } else {
        vec![]
    };
    let [tbl, win, info] = Layout::vertical([
        Constraint::Min(1),
        Constraint::Length(winners.len() as u16),
        Constraint::Length(1),
    ])
    .areas(inner);
    let sorted = model_col(app.sort);
    let mut header = vec![Cell::from(" ")];
    for (k, &c) in layout.columns.iter().enumerate() {
        let col = &model.columns[c];
        let style = if Some(col.col) == sorted {
            t.key().add_modifier(Modifier::UNDERLINED)
        } else {
            t.dim().add_modifier(Modifier::BOLD)
        };
        header.push(Cell::from(Span::styled(
            model.title(&layout, k).to_string(),
            style,
        )));
    }
    let mut table_rows = Vec::new();
    for (r, row) in model.rows.iter().enumerate() {
        let status = app
            .runs
            .get(&row_ids[r])
            .and_then(|x| x.summary.as_ref())
            .and_then(|s| s.status)
            .unwrap_or(RunStatus::Failed);
        let mark = if baseline == Some(r) { "=" } else { " " };
        let mut cells = vec![Cell::from(mark)];
        for (k, &c) in layout.columns.iter().enumerate() {
            let text = model.cell_text(&layout, r, k);
            let cell = &row.cells[c];
            let style = match model.columns[c].col {
                Col::Status | Col::Cause => status_style(t, status),
                Col::PeakMem if text.starts_with("grew") => t.bad(),
                _ if cell.best => t.best(),
                _ => t.text(),
            };
            cells.push(Cell::from(Span::styled(text, style)));
        }
        let mut tr = Row::new(cells);
        if app.table_selected.as_ref() == Some(&row_ids[r]) {
            tr = tr.style(t.selected());
        }
        table_rows.push(tr);
    }
    let mut widths = vec![Constraint::Length(1)];
    widths.extend(layout.widths.iter().map(|w| Constraint::Length(*w as u16)));
    let mut state = TableState::default();
    if let Some(sel) = &app.table_selected {
        state.select(row_ids.iter().position(|r| r == sel));
    }
    f.render_stateful_widget(
        Table::new(table_rows, widths)
            .header(Row::new(header))
            .column_spacing(1),
        tbl,
        &mut state,
    );
    let lines: Vec<Line> = winners
        .iter()
        .map(|w| Line::from(Span::styled(cut(w, inner.width as usize), t.text())))
        .collect();
    f.render_widget(Paragraph::new(lines), win);
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
