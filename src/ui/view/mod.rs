//! Rendering: [`render`] draws an [`App`] into a frame. Pure: the same state and size give
//! the same cells (the snapshot tests rely on it).
//!
//! Layout: a header line (sweep, tabs, state, ETA), the view, a footer line (message or key
//! hints), and at most one dialog on top. From 120 columns the queue view also shows the live
//! panel, and from 36 rows the comparison table below them.
//!
//! One file per panel (`queue`, `live`, `table`, `chart`, `detail`), the help overlay
//! (`help`, from [`super::keys`]), the other dialogs (`modals`), and the shared pieces
//! (`widgets`); this file lays them out and draws the header and footer.

mod chart;
mod detail;
mod help;
mod live;
mod modals;
mod queue;
mod table;
mod widgets;

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Paragraph, Wrap};

use super::app::{App, Modal, View};
use super::keys;
use super::theme::Theme;
use crate::orchestrator::EntryState;
use crate::summary::RunStatus;

/// `8s`, `1m05s`, `2h03m`.
pub fn fmt_dur(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "–".into();
    }
    let s = secs.round() as u64;
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

/// A number with about four significant digits: `12345`, `123.4`, `1.234`, `0.0123`.
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if !v.is_finite() {
        "–".into()
    } else if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else if a == 0.0 {
        "0".into()
    } else if a >= 0.001 {
        format!("{v:.4}")
    } else {
        format!("{v:.2e}")
    }
}

/// [`fmt_num`] of a value, `–` without one.
fn opt(v: Option<f64>) -> String {
    v.map(fmt_num).unwrap_or_else(|| "–".into())
}

/// Draws the whole dashboard.
pub fn render(f: &mut Frame, app: &App) {
    let theme = Theme { color: app.color };
    let area = f.area();
    if area.width < 40 || area.height < 10 {
        f.render_widget(
            Paragraph::new("terminal too small (need 40x10); q quits").wrap(Wrap { trim: true }),
            area,
        );
        return;
    }
    let [head, body, foot] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(1),
        Constraint::Length(1),
    ])
    .areas(area);
    header(f, app, theme, head);
    match app.view {
        View::Queue => {
            if body.width >= 120 {
                let (top, bottom) = if body.height >= 34 {
                    let [t, b] = Layout::vertical([Constraint::Percentage(55), Constraint::Min(8)])
                        .areas(body);
                    (t, Some(b))
                } else {
                    (body, None)
                };
                let [l, r] =
                    Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)])
                        .areas(top);
                queue::draw(f, app, theme, l);
                live::draw(f, app, theme, r);
                if let Some(b) = bottom {
                    table::draw(f, app, theme, b);
                }
            } else if body.height >= 16 {
                // The queue on top (as tall as it needs, at most half), the live panel below.
                let want = app.rows().len() as u16 + 3;
                let [t, b] = Layout::vertical([
                    Constraint::Length(want.clamp(5, body.height / 2)),
                    Constraint::Min(8),
                ])
                .areas(body);
                queue::draw(f, app, theme, t);
                live::draw(f, app, theme, b);
            } else {
                queue::draw(f, app, theme, body);
            }
        }
        View::Live => live::draw(f, app, theme, body),
        View::Table => table::draw(f, app, theme, body),
        View::Chart => chart::draw(f, app, theme, body),
        View::Detail => detail::draw(f, app, theme, body),
    }
    footer(f, app, theme, foot);
    match &app.modal {
        Some(Modal::Help) => help::draw(f, app, theme, area),
        Some(m) => modals::draw(f, theme, m, area),
        None => {}
    }
}

fn header(f: &mut Frame, app: &App, t: Theme, area: Rect) {
    let mut spans = vec![
        Span::styled(" lorascope ", t.title()),
        Span::raw(app.name.clone()),
    ];
    if let Some(id) = app.sweep_id {
        spans.push(Span::styled(format!(" #{id}"), t.dim()));
    }
    spans.push(Span::raw("  "));
    for (i, (v, name)) in [
        (View::Queue, "Queue"),
        (View::Live, "Live"),
        (View::Table, "Table"),
        (View::Chart, "Chart"),
    ]
    .iter()
    .enumerate()
    {
        let label = format!("{}:{name}", i + 1);
        let style = if app.view == *v {
            t.selected()
        } else {
            t.dim()
        };
        spans.push(Span::styled(label, style));
        spans.push(Span::raw(" "));
    }
    if app.view == View::Detail {
        spans.push(Span::styled("Detail", t.selected()));
        spans.push(Span::raw(" "));
    }
    spans.push(Span::raw(" "));
    let state = if app.sweep_finished {
        Span::styled("FINISHED", t.ok())
    } else if app.queue.shutting_down {
        Span::styled("STOPPING", t.bad())
    } else if app.queue.paused {
        Span::styled("PAUSED", t.warn().add_modifier(Modifier::BOLD))
    } else {
        Span::styled("RUNNING", t.running())
    };
    spans.push(state);
    let done = app
        .queue
        .entries
        .iter()
        .filter(|e| matches!(e.state, EntryState::Done { .. }))
        .count();
    spans.push(Span::raw(format!(
        "  {done}/{} done",
        app.queue.entries.len()
    )));
    if !app.sweep_finished
        && let Some(eta) = app.sweep_eta()
    {
        spans.push(Span::raw(format!("  ETA {}", fmt_dur(eta))));
    }
    f.render_widget(Paragraph::new(Line::from(spans)), area);
}

fn footer(f: &mut Frame, app: &App, t: Theme, area: Rect) {
    let line = match &app.message {
        Some((m, err)) => Line::styled(format!(" {m}"), if *err { t.bad() } else { t.ok() }),
        None => {
            // The hints of this view, in the daemon client's words when attached.
            let mut spans = vec![Span::raw(" ")];
            for (k, what) in keys::footer(app.view)
                .iter()
                .filter(|&&cmd| !(app.read_only && keys::changes_queue(cmd)))
                .filter_map(|&cmd| keys::hint(cmd, app.attached))
            {
                spans.push(Span::styled(k, t.key()));
                spans.push(Span::raw(format!(" {what}  ")));
            }
            Line::from(spans)
        }
    };
    f.render_widget(Paragraph::new(line), area);
}

/// The colour of a run status.
fn status_style(t: Theme, s: RunStatus) -> Style {
    match s {
        RunStatus::Ok => t.ok(),
        RunStatus::Running => t.running(),
        RunStatus::Oom | RunStatus::PredictedOom | RunStatus::Failed => t.bad(),
        RunStatus::Cancelled | RunStatus::Interrupted => t.warn(),
        RunStatus::Skipped => t.dim(),
        RunStatus::Queued => t.text(),
    }
}

/// The point's label with only the axes that vary over the grid ([`crate::grid::varying_label`]).
fn short_label(app: &App, spec_index: usize) -> String {
    crate::grid::varying_label(&app.specs, spec_index)
}
