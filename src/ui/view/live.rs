//! The live panels: per running run, its progress, memory / power / utilisation gauges from
//! the latest telemetry sample, and sparklines of tokens/s, loss and power.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, LineGauge, Paragraph};

use super::super::app::App;
use super::super::theme::Theme;
use super::widgets::spark;
use super::{fmt_dur, fmt_num};
use crate::orchestrator::EntryState;
use crate::report::human_bytes;

/// Draws a live panel per running run (or the last started one), stacked.
pub(super) fn draw(f: &mut Frame, app: &App, t: Theme, area: Rect) {
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
        one(f, app, t, id, *a);
    }
}

/// One run: step, elapsed and ETA; memory, power and utilisation gauges; charts.
fn one(f: &mut Frame, app: &App, t: Theme, id: &str, area: Rect) {
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
    // Before the first step, what the worker is doing (loading, compiling kernels, ...).
    let phase = match (last, r.phase, state) {
        (None, Some((phase, since)), Some(EntryState::Running { .. })) => Some(Line::from(vec![
            Span::styled("phase: ", t.dim()),
            Span::styled(phase.describe(), t.running()),
            Span::raw(format!(" ({})", fmt_dur(app.now - since))),
            Span::styled("  elapsed ", t.dim()),
            Span::raw(fmt_dur(elapsed)),
        ])),
        _ => None,
    };
    let info_line = phase.unwrap_or_else(|| {
        Line::from(vec![
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
        ])
    });
    f.render_widget(Paragraph::new(info_line), info);
    let s = r.last_sample.as_ref();
    // The point's own limit: `run.vram_limit`, or its card's with a `card` grid axis.
    let point_limit = app
        .specs
        .get(r.spec_index)
        .and_then(|s| s.config.vram_limit_bytes);
    // Memory: VRAM (process and device) against the limit or the card; RSS on CPU.
    let mem = s.and_then(|s| {
        if let Some(dev) = s.mem_used_bytes {
            let limit = point_limit;
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

/// A gauge `name  label` filled to `ratio`, or `n/a (no NVML)` without a value.
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
