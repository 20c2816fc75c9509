//! Rendering: [`render`] draws an [`App`] into a frame. Pure: the same state and size give
//! the same cells (the snapshot tests rely on it).
//!
//! Layout: a header line (sweep, tabs, state, ETA), the view, a footer line (message or key
//! hints), and at most one dialog on top. From 120 columns the queue view also shows the live
//! panel, and from 36 rows the comparison table below them.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{
    Block, Borders, Cell, Clear, LineGauge, Paragraph, Row, Sparkline, Table, TableState, Wrap,
};

use super::app::{App, Column, Modal, RunView, View};
use super::theme::Theme;
use crate::orchestrator::EntryState;
use crate::report::human_bytes;
use crate::summary::{RunStatus, RunSummary};

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
                queue_panel(f, app, theme, l);
                live_panels(f, app, theme, r);
                if let Some(b) = bottom {
                    table_panel(f, app, theme, b);
                }
            } else if body.height >= 16 {
                // The queue on top (as tall as it needs, at most half), the live panel below.
                let want = app.rows().len() as u16 + 3;
                let [t, b] = Layout::vertical([
                    Constraint::Length(want.clamp(5, body.height / 2)),
                    Constraint::Min(8),
                ])
                .areas(body);
                queue_panel(f, app, theme, t);
                live_panels(f, app, theme, b);
            } else {
                queue_panel(f, app, theme, body);
            }
        }
        View::Live => live_panels(f, app, theme, body),
        View::Table => table_panel(f, app, theme, body),
        View::Detail => detail_panel(f, app, theme, body),
    }
    footer(f, app, theme, foot);
    if let Some(m) = &app.modal {
        modal(f, app, theme, m, area);
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
            let keys: &[(&str, &str)] = match app.view {
                View::Table => &[
                    ("←→", "sort"),
                    ("o", "order"),
                    ("b", "baseline"),
                    ("⏎", "detail"),
                    ("r", "retry"),
                    ("w", "save"),
                    ("?", "help"),
                    ("q", "quit"),
                ],
                View::Detail => &[
                    ("esc", "back"),
                    ("jk", "select"),
                    ("?", "help"),
                    ("q", "quit"),
                ],
                _ => &[
                    ("jk", "select"),
                    ("JK", "move"),
                    ("t", "top"),
                    ("p", "pause"),
                    ("s", "skip"),
                    ("c", "cancel"),
                    ("r", "retry"),
                    ("w", "save"),
                    ("?", "help"),
                    ("q", "quit"),
                ],
            };
            let mut spans = vec![Span::raw(" ")];
            for (k, what) in keys {
                // Attached to the daemon, q leaves the sweep running.
                let what = if app.attached && *k == "q" {
                    "detach"
                } else {
                    what
                };
                spans.push(Span::styled(*k, t.key()));
                spans.push(Span::raw(format!(" {what}  ")));
            }
            Line::from(spans)
        }
    };
    f.render_widget(Paragraph::new(line), area);
}

fn status_style(t: Theme, s: RunStatus) -> Style {
    match s {
        RunStatus::Ok => t.ok(),
        RunStatus::Running => t.running(),
        RunStatus::Oom | RunStatus::Failed => t.bad(),
        RunStatus::Cancelled | RunStatus::Interrupted => t.warn(),
        RunStatus::Skipped => t.dim(),
    }
}

/// The point's label with only the axes that vary over the grid (all of it if none vary).
fn short_label(app: &App, spec_index: usize) -> String {
    let Some(spec) = app.specs.get(spec_index) else {
        return String::new();
    };
    let p = spec.config.point;
    let mut parts = Vec::new();
    let varies = |g: &dyn Fn(&crate::grid::Point) -> String| {
        let first = g(&app.specs[0].config.point);
        app.specs.iter().any(|s| g(&s.config.point) != first)
    };
    if varies(&|p| p.batch_size.to_string()) {
        parts.push(format!("bs{}", p.batch_size));
    }
    if varies(&|p| p.seq_len.to_string()) {
        parts.push(format!("seq{}", p.seq_len));
    }
    if varies(&|p| p.optimizer.to_string()) {
        parts.push(p.optimizer.to_string());
    }
    if varies(&|p| p.precision.to_string()) {
        parts.push(p.precision.to_string());
    }
    if varies(&|p| p.quant.to_string()) {
        parts.push(p.quant.to_string());
    }
    if varies(&|p| p.lora_rank.to_string()) {
        parts.push(format!("r{}", p.lora_rank));
    }
    if varies(&|p| p.grad_checkpointing.to_string()) {
        parts.push(if p.grad_checkpointing { "gc" } else { "no-gc" }.into());
    }
    if parts.is_empty() {
        spec.label()
    } else {
        parts.join(" ")
    }
}

fn queue_panel(f: &mut Frame, app: &App, t: Theme, area: Rect) {
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
            EntryState::Done { status } => (status.to_string(), status_style(t, status)),
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

fn live_panels(f: &mut Frame, app: &App, t: Theme, area: Rect) {
    let running = app.running();
    let ids: Vec<String> = if running.is_empty() {
        app.start_order.last().cloned().into_iter().collect()
    } else {
        running
    };
    if ids.is_empty() {
        f.render_widget(
            Paragraph::new("nothing has started yet")
                .style(t.dim())
                .block(Block::bordered().title(Span::styled(" Live ", t.title()))),
            area,
        );
        return;
    }
    let areas =
        Layout::vertical(vec![Constraint::Ratio(1, ids.len() as u32); ids.len()]).split(area);
    for (id, a) in ids.iter().zip(areas.iter()) {
        live_panel(f, app, t, id, *a);
    }
}

fn gauge_line(f: &mut Frame, t: Theme, area: Rect, name: &str, value: Option<(f64, String)>) {
    match value {
        Some((ratio, label)) => f.render_widget(
            LineGauge::default()
                .ratio(ratio.clamp(0.0, 1.0))
                .label(Line::from(vec![
                    Span::styled(format!("{name:<6}"), t.dim()),
                    Span::raw(format!("{label:<24}")),
                ]))
                .filled_style(t.gauge())
                .unfilled_style(t.dim()),
            area,
        ),
        None => f.render_widget(
            Paragraph::new(Line::from(vec![
                Span::styled(format!("{name:<6}"), t.dim()),
                Span::styled("n/a (no NVML)", t.dim()),
            ])),
            area,
        ),
    }
}

fn tail<T: Copy>(v: &[T], n: usize) -> Vec<T> {
    v[v.len().saturating_sub(n)..].to_vec()
}

fn spark(f: &mut Frame, t: Theme, area: Rect, title: String, data: &[f64], scale: f64, i: usize) {
    // Bars start a little below the smallest visible value, so variation shows.
    let shown = tail(data, area.width as usize);
    let lo = shown.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = shown.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let floor = if lo.is_finite() && hi > lo {
        (lo - (hi - lo) * 0.1).max(0.0)
    } else {
        0.0
    };
    let vals: Vec<u64> = shown
        .iter()
        .map(|v| ((v - floor) * scale).max(0.0).round() as u64)
        .collect();
    f.render_widget(
        Sparkline::default()
            .block(Block::new().title(Span::styled(title, t.dim())))
            .data(&vals)
            .style(t.chart(i)),
        area,
    );
}

fn live_panel(f: &mut Frame, app: &App, t: Theme, id: &str, area: Rect) {
    let Some(r) = app.runs.get(id) else { return };
    let label = app
        .specs
        .get(r.spec_index)
        .map(|s| s.label())
        .unwrap_or_default();
    let state = app.state(id);
    let title = format!(
        " {} {id} {label} on {} ",
        match state {
            Some(EntryState::Running { .. }) => "▶",
            _ => "■",
        },
        r.device.as_deref().unwrap_or("?")
    );
    let block = Block::bordered().title(Span::styled(title, t.title()));
    let inner = block.inner(area);
    f.render_widget(block, area);
    if inner.height < 4 {
        return;
    }
    let [info, g1, g2, g3, charts] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Min(0),
    ])
    .areas(inner);
    let last = r.steps.last();
    let elapsed = match (r.started_at, r.finished_at) {
        (Some(s), Some(e)) => e - s,
        (Some(s), None) => app.now - s,
        _ => 0.0,
    };
    let eta = if matches!(state, Some(EntryState::Running { .. })) {
        app.run_eta(id).map(fmt_dur).unwrap_or_else(|| "–".into())
    } else {
        r.summary
            .as_ref()
            .and_then(|s| s.status)
            .map(|s| s.to_string())
            .unwrap_or_default()
    };
    let info_line = Line::from(vec![
        Span::styled("step ", t.dim()),
        Span::raw(format!(
            "{}/{}",
            last.map(|s| s.step).unwrap_or(0),
            app.steps_total
        )),
        Span::styled("  elapsed ", t.dim()),
        Span::raw(fmt_dur(elapsed)),
        Span::styled("  ETA ", t.dim()),
        Span::raw(eta),
        Span::styled("  loss scale ", t.dim()),
        Span::raw(
            last.and_then(|s| s.loss_scale)
                .map(fmt_num)
                .unwrap_or_else(|| "–".into()),
        ),
    ]);
    f.render_widget(Paragraph::new(info_line), info);
    let s = r.last_sample.as_ref();
    // Memory: VRAM (process and device) against the limit or the card; RSS on CPU.
    let mem = s.and_then(|s| {
        if let Some(dev) = s.mem_used_bytes {
            let limit = app.vram_limit;
            let proc_ = s.proc_mem_bytes.map(|b| human_bytes(Some(b)));
            let label = format!(
                "proc {} · dev {}{}",
                proc_.unwrap_or_else(|| "–".into()),
                human_bytes(Some(dev)),
                limit
                    .map(|l| format!(" / limit {}", human_bytes(Some(l))))
                    .unwrap_or_default()
            );
            let used = s.proc_mem_bytes.unwrap_or(dev) as f64;
            Some((limit.map(|l| used / l as f64).unwrap_or(0.0), label))
        } else {
            s.rss_bytes.map(|rss| {
                let scale = app.vram_limit.or(app.mem_total);
                let label = format!(
                    "RSS {}{}",
                    human_bytes(Some(rss)),
                    scale
                        .map(|m| format!(" / {}", human_bytes(Some(m))))
                        .unwrap_or_default()
                );
                (scale.map(|m| rss as f64 / m as f64).unwrap_or(0.0), label)
            })
        }
    });
    match mem {
        Some(m) => gauge_line(f, t, g1, "mem", Some(m)),
        None => f.render_widget(
            Paragraph::new(Line::from(vec![
                Span::styled("mem   ", t.dim()),
                Span::styled("no sample yet", t.dim()),
            ])),
            g1,
        ),
    }
    let power = s.and_then(|s| {
        let w = s.power_w?;
        let lim = s.power_limit_w;
        Some((
            lim.map(|l| w / l).unwrap_or(0.0),
            format!(
                "{} W{}",
                fmt_num(w),
                lim.map(|l| format!(" / {} W", fmt_num(l)))
                    .unwrap_or_default()
            ),
        ))
    });
    gauge_line(f, t, g2, "power", power);
    let util = s
        .and_then(|s| s.util_pct)
        .map(|u| (f64::from(u) / 100.0, format!("{u} %")));
    gauge_line(f, t, g3, "util", util);
    if charts.height < 2 {
        return;
    }
    let tps: Vec<f64> = r.steps.iter().map(|s| s.tokens_per_s).collect();
    let loss: Vec<f64> = r.steps.iter().filter_map(|s| s.loss).collect();
    let has_power = !r.power.is_empty();
    let n = if has_power { 3 } else { 2 };
    let parts = Layout::vertical(vec![Constraint::Ratio(1, n); n as usize]).split(charts);
    spark(
        f,
        t,
        parts[0],
        format!(
            "tokens/s  {}",
            tps.last()
                .map(|v| fmt_num(*v))
                .unwrap_or_else(|| "–".into())
        ),
        &tps,
        1.0,
        0,
    );
    spark(
        f,
        t,
        parts[1],
        format!(
            "loss  {}",
            loss.last()
                .map(|v| fmt_num(*v))
                .unwrap_or_else(|| "–".into())
        ),
        &loss,
        1000.0,
        1,
    );
    if has_power {
        spark(
            f,
            t,
            parts[2],
            format!(
                "power W  {}",
                r.power.last().map(|v| fmt_num(*v)).unwrap_or_default()
            ),
            &r.power,
            1.0,
            2,
        );
    }
}

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
    let best = s.status == Some(RunStatus::Ok)
        && v.is_some()
        && app.best(col).is_some_and(|b| Some(b) == v);
    let style = if best { t.best() } else { t.text() };
    Cell::from(Line::from(vec![
        Span::styled(text, style),
        Span::styled(ratio, t.dim()),
    ]))
}

fn table_panel(f: &mut Frame, app: &App, t: Theme, area: Rect) {
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
            RunStatus::Oom | RunStatus::Failed => "✗ ",
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

fn kv<'a>(t: Theme, k: &str, v: String) -> Line<'a> {
    Line::from(vec![
        Span::styled(format!("{k:<16}"), t.dim()),
        Span::raw(v),
    ])
}

fn detail_panel(f: &mut Frame, app: &App, t: Theme, area: Rect) {
    let Some(id) = app.selected.clone() else {
        f.render_widget(Paragraph::new("no run selected"), area);
        return;
    };
    let r: RunView = app.runs.get(&id).cloned().unwrap_or_default();
    let title = format!(" Run {id} ");
    let block = Block::bordered().title(Span::styled(title, t.title()));
    let inner = block.inner(area);
    f.render_widget(block, area);
    let [top, charts] = Layout::vertical([Constraint::Length(13), Constraint::Min(0)]).areas(inner);
    let [cfg_a, sum_a] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(top);
    let mut cfg = vec![Line::styled("configuration", t.title())];
    if let Some(spec) = app.specs.get(r.spec_index) {
        let c = &spec.config;
        let p = c.point;
        cfg.push(kv(t, "model", spec.model_arg.clone()));
        cfg.push(kv(
            t,
            "data",
            format!("{} ({})", spec.data_arg, c.data_format),
        ));
        cfg.push(kv(
            t,
            "batch × seq",
            format!("{} × {}", p.batch_size, p.seq_len),
        ));
        cfg.push(kv(t, "optimizer", p.optimizer.to_string()));
        cfg.push(kv(
            t,
            "precision/quant",
            format!("{} / {}", p.precision, p.quant),
        ));
        cfg.push(kv(
            t,
            "lora",
            format!(
                "r{} α{} {}",
                p.lora_rank,
                c.lora_alpha,
                c.lora_targets
                    .iter()
                    .map(|t| t.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        ));
        cfg.push(kv(t, "grad ckpt", p.grad_checkpointing.to_string()));
        cfg.push(kv(
            t,
            "steps",
            format!("{} ({} warm-up)", c.steps, c.warmup_steps),
        ));
        cfg.push(kv(t, "seed / lr", format!("{} / {}", c.seed, opt(c.lr))));
        cfg.push(kv(
            t,
            "device",
            format!(
                "{} (attempt {})",
                r.device.clone().unwrap_or_else(|| "–".into()),
                r.attempt
            ),
        ));
        cfg.push(kv(t, "spec id", spec.id.clone()));
    }
    f.render_widget(Paragraph::new(cfg), cfg_a);
    let mut sum = vec![Line::styled("summary", t.title())];
    match &r.summary {
        Some(s) => {
            let st = s.status.unwrap_or(RunStatus::Failed);
            sum.push(Line::from(vec![
                Span::styled(format!("{:<16}", "status"), t.dim()),
                Span::styled(st.to_string(), status_style(t, st)),
            ]));
            if let Some(c) = &s.cause {
                sum.push(Line::styled(c.clone(), t.bad()));
            }
            sum.push(kv(t, "tokens/s", opt(s.tokens_per_s)));
            sum.push(kv(t, "s / 10k tokens", opt(s.s_per_10k_tokens)));
            sum.push(kv(
                t,
                "peak memory",
                format!(
                    "{} ({})",
                    human_bytes(s.peak_mem_bytes),
                    s.peak_mem_kind.clone().unwrap_or_else(|| "–".into())
                ),
            ));
            sum.push(kv(
                t,
                "mean / max W",
                format!("{} / {}", opt(s.mean_w), opt(s.max_w)),
            ));
            sum.push(kv(t, "energy J", opt(s.energy_j)));
            sum.push(kv(t, "J / token", opt(s.j_per_token)));
            sum.push(kv(t, "final loss", opt(s.final_loss)));
            sum.push(kv(
                t,
                "steps (timed)",
                format!(
                    "{} ({})  skipped {}",
                    s.steps, s.timed_steps, s.skipped_steps
                ),
            ));
            sum.push(kv(t, "wall", fmt_dur(s.wall_seconds)));
        }
        None => {
            let st = app
                .state(&id)
                .map(|s| match s {
                    EntryState::Queued => "queued".to_string(),
                    EntryState::Running { .. } => "running".to_string(),
                    EntryState::Done { status } => status.to_string(),
                })
                .unwrap_or_default();
            sum.push(kv(t, "status", st));
            if let Some(eta) = app.run_eta(&id).or_else(|| app.queued_eta(&id)) {
                sum.push(kv(t, "ETA", fmt_dur(eta)));
            }
        }
    }
    f.render_widget(Paragraph::new(sum).wrap(Wrap { trim: true }), sum_a);
    if charts.height >= 2 {
        let tps: Vec<f64> = r.steps.iter().map(|s| s.tokens_per_s).collect();
        let loss: Vec<f64> = r.steps.iter().filter_map(|s| s.loss).collect();
        let [a, b] =
            Layout::vertical([Constraint::Ratio(1, 2), Constraint::Ratio(1, 2)]).areas(charts);
        spark(
            f,
            t,
            a,
            format!("tokens/s per step ({} steps)", tps.len()),
            &tps,
            1.0,
            0,
        );
        spark(f, t, b, "loss per step".to_string(), &loss, 1000.0, 1);
    }
}

/// Every key, for the help overlay (and the README).
pub const KEYS: &[(&str, &str)] = &[
    ("1 2 3 / Tab", "queue / live / table view"),
    ("j k ↑ ↓ g G", "select a run"),
    ("Enter, d", "run detail (Esc back)"),
    ("K J, Shift+↑↓", "move the queued run up / down"),
    ("t", "move the queued run to the top"),
    ("p", "pause / resume the queue"),
    ("s", "skip the queued run"),
    ("c", "cancel the run (asks if running)"),
    ("r", "retry a finished run"),
    ("w", "save the sweep as a profile"),
    ("← → h l", "table: sort column"),
    ("o", "table: reverse the order"),
    ("b", "set the baseline row"),
    ("?", "this help"),
    ("q, Ctrl-C", "stop the sweep and quit"),
];

/// The last help line when the dashboard is attached to a daemon (`lorascope attach`).
pub const ATTACHED_QUIT: (&str, &str) = ("q, D, Ctrl-C", "detach (the sweep keeps running)");

fn centered(area: Rect, w: u16, h: u16) -> Rect {
    let w = w.min(area.width);
    let h = h.min(area.height);
    Rect {
        x: area.x + (area.width - w) / 2,
        y: area.y + (area.height - h) / 2,
        width: w,
        height: h,
    }
}

fn modal(f: &mut Frame, app: &App, t: Theme, m: &Modal, area: Rect) {
    let (title, lines, w): (&str, Vec<Line>, u16) = match m {
        Modal::Help => (
            " Keys ",
            KEYS.iter()
                .map(|&(k, what)| {
                    if app.attached && k == KEYS[KEYS.len() - 1].0 {
                        ATTACHED_QUIT
                    } else {
                        (k, what)
                    }
                })
                .map(|(k, what)| {
                    Line::from(vec![
                        Span::styled(format!("{k:<15}"), t.key()),
                        Span::raw(what),
                    ])
                })
                .chain(std::iter::once(Line::styled("any key closes", t.dim())))
                .collect(),
            52,
        ),
        Modal::ConfirmCancel(id) => (
            " Cancel run ",
            vec![
                Line::raw(format!("Cancel the running run {id}?")),
                Line::raw("It will be recorded as cancelled."),
                Line::styled("y: cancel it   any other key: keep it", t.key()),
            ],
            44,
        ),
        Modal::ConfirmQuit => (
            " Quit ",
            vec![
                Line::raw("Stop the sweep and quit?"),
                Line::raw("Runs in flight are recorded interrupted;"),
                Line::raw("`--resume` continues later."),
                Line::styled("y: quit   any other key: stay", t.key()),
            ],
            46,
        ),
        Modal::SaveAs(name) => (
            " Save sweep as profile ",
            vec![
                Line::raw("File name (queue order, skipped excluded):"),
                Line::from(vec![Span::styled(format!("{name}_"), t.selected())]),
                Line::styled("Enter: save   Esc: cancel", t.key()),
            ],
            50,
        ),
    };
    let _ = app;
    let h = lines.len() as u16 + 2;
    let r = centered(area, w, h);
    f.render_widget(Clear, r);
    f.render_widget(
        Paragraph::new(lines).block(
            Block::bordered()
                .borders(Borders::ALL)
                .title(Span::styled(title, t.title())),
        ),
        r,
    );
}
