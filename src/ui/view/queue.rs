//! The queue panel: started runs in start order, then the queued ones in launch order, then
//! the skipped ones; wide (>= 100 columns) with full point labels and ids.

use ratatui::Frame;
use ratatui::layout::{Constraint, Rect};
use ratatui::style::Modifier;
use ratatui::text::Span;
use ratatui::widgets::{Block, Cell, Row, Table, TableState};

use super::super::app::App;
use super::super::theme::Theme;
use super::{fmt_dur, opt, short_label, status_style};
use crate::orchestrator::EntryState;
use crate::summary::RunStatus;

/// Draws the queue: every entry with its state, point, progress and ETA or result.
pub(super) fn draw(f: &mut Frame, app: &App, t: Theme, area: Rect) {
    let rows_ids = app.rows();
    let wide = area.width >= 100;
    let mut rows = Vec::new();
    for id in &rows_ids {
        let Some(e) = app.queue.entries.iter().find(|e| &e.id == id) else {
            continue;
        };
        let rv = app.runs.get(id);
        let (status, style) = match e.state {
            EntryState::Queued => ("queued".to_string(), t.text()),
            EntryState::Running { .. } => {
                let killing = app.queue.shutting_down;
                (
                    if killing { "stopping" } else { "running" }.to_string(),
                    t.running(),
                )
            }
            // `pred-oom` fits the 9-character column (`predicted-oom` does not).
            EntryState::Done { status } => (
                crate::report::table::short_status(status.as_str()),
                status_style(t, status),
            ),
        };
        let label = if wide {
            app.specs
                .get(e.spec_index)
                .map(|s| s.label())
                .unwrap_or_default()
        } else {
            short_label(app, e.spec_index)
        };
        let (progress, eta) = match e.state {
            EntryState::Queued => (
                format!(
                    "#{}",
                    app.queue.queued.iter().position(|q| q == id).unwrap_or(0) + 1
                ),
                app.queued_eta(id)
                    .map(|s| format!("~{}", fmt_dur(s)))
                    .unwrap_or_else(|| "–".into()),
            ),
            EntryState::Running { .. } => {
                let step = rv.and_then(|r| r.steps.last()).map(|s| s.step).unwrap_or(0);
                (
                    format!("{step}/{}", app.steps_total),
                    app.run_eta(id)
                        .map(|s| format!("~{}", fmt_dur(s)))
                        .unwrap_or_else(|| "–".into()),
                )
            }
            EntryState::Done { .. } => {
                let s = rv.and_then(|r| r.summary.as_ref());
                let res = match s {
                    Some(s) if s.status == Some(RunStatus::Ok) => {
                        format!("{} tok/s", opt(s.tokens_per_s))
                    }
                    Some(s) => s.cause.clone().unwrap_or_default(),
                    None => String::new(),
                };
                (
                    s.map(|s| format!("{}/{}", s.steps, app.steps_total))
                        .unwrap_or_default(),
                    res,
                )
            }
        };
        let mut row = Row::new(vec![
            Cell::from(Span::styled(status, style)),
            Cell::from(Span::styled(id.clone(), t.dim())),
            Cell::from(label),
            Cell::from(progress),
            Cell::from(eta),
        ]);
        if app.selected.as_ref() == Some(id) {
            row = row.style(t.selected());
        }
        rows.push(row);
    }
    let id_w = if wide { 12 } else { 8 };
    let widths = [
        Constraint::Length(9),
        Constraint::Length(id_w),
        Constraint::Min(10),
        Constraint::Length(9),
        Constraint::Length(if wide { 16 } else { 12 }),
    ];
    let title = format!(
        " Queue: {} queued{} ",
        app.queue.queued.len(),
        if app.queue.paused { " (paused)" } else { "" }
    );
    let table = Table::new(rows, widths)
        .header(
            Row::new(vec!["status", "id", "point", "step", "ETA/result"])
                .style(t.dim().add_modifier(Modifier::BOLD)),
        )
        .block(Block::bordered().title(Span::styled(title, t.title())));
    let mut state = TableState::default();
    if let Some(sel) = &app.selected {
        state.select(rows_ids.iter().position(|r| r == sel));
    }
    f.render_stateful_widget(table, area, &mut state);
}
