//! The chart view (key `4`): the sweep's trade-off at a glance. Above, a Pareto scatter of
//! tokens/s against peak memory of the runs that finished ok, one dataset (marker and colour)
//! per value of the first axis of precision, optimizer and quant that varies, and a vertical
//! line at the profile's `vram_limit`; below, J/token per run as horizontal bars (fewest
//! first).

use ratatui::Frame;
use ratatui::layout::{Constraint, Direction, Layout, Rect};
use ratatui::symbols::Marker;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Axis, Bar, BarChart, Block, Chart, Dataset, GraphType, Paragraph};

use super::super::app::App;
use super::super::theme::Theme;
use super::{fmt_num, short_label};
use crate::grid::Point;
use crate::orchestrator::short_id;
use crate::summary::RunStatus;

const GIB: f64 = (1u64 << 30) as f64;

/// The markers of the datasets, in order (told apart without colour too).
const MARKERS: [char; 6] = ['●', '▲', '■', '◆', '+', 'x'];

/// One ok run as the charts show it.
struct Mark {
    id: String,
    label: String,
    group: String,
    mem_gib: f64,
    tokens_per_s: f64,
    j_per_token: Option<f64>,
    rss: bool,
}

/// The ok runs with tokens/s and a peak, in queue order.
fn marks(app: &App) -> Vec<Mark> {
    let group_of = grouping(app);
    app.queue
        .entries
        .iter()
        .filter_map(|e| {
            let s = app.runs.get(&e.id)?.summary.as_ref()?;
            if s.status != Some(RunStatus::Ok) {
                return None;
            }
            let spec = app.specs.get(e.spec_index)?;
            Some(Mark {
                id: short_id(&e.id),
                label: short_label(app, e.spec_index),
                group: group_of.map(|g| g(&spec.config.point)).unwrap_or_default(),
                mem_gib: s.peak_mem_bytes? as f64 / GIB,
                tokens_per_s: s.tokens_per_s?,
                j_per_token: s.j_per_token,
                rss: s.peak_mem_kind.as_deref() == Some("rss"),
            })
        })
        .collect()
}

type GroupOf = fn(&Point) -> String;

/// The axis the datasets split by: the first of precision, optimizer, quant that varies.
fn grouping(app: &App) -> Option<GroupOf> {
    let axes: [GroupOf; 3] = [
        |p| p.precision.to_string(),
        |p| p.optimizer.to_string(),
        |p| p.quant.to_string(),
    ];
    let first = app.specs.first()?;
    axes.into_iter().find(|g| {
        app.specs
            .iter()
            .any(|s| g(&s.config.point) != g(&first.config.point))
    })
}

/// Draws the Pareto scatter and the J/token bars.
pub(super) fn draw(f: &mut Frame, app: &App, t: Theme, area: Rect) {
    let marks = marks(app);
    if marks.is_empty() {
        f.render_widget(
            Paragraph::new("no run has finished ok yet: the chart shows tokens/s against peak memory of ok runs")
                .style(t.dim())
                .block(Block::bordered().title(Span::styled(" Chart ", t.title()))),
            area,
        );
        return;
    }
    let with_j = marks.iter().filter(|m| m.j_per_token.is_some()).count() as u16;
    let bars_h = if with_j == 0 {
        3
    } else {
        (with_j + 2).min(area.height / 3).max(3)
    };
    let [top, bottom] =
        Layout::vertical([Constraint::Min(8), Constraint::Length(bars_h)]).areas(area);
    pareto(f, app, t, &marks, top);
    bars(f, t, &marks, bottom);
}

/// `lo`, the middle and `hi` as axis labels.
fn labels(lo: f64, hi: f64) -> Vec<Line<'static>> {
    [lo, (lo + hi) / 2.0, hi]
        .into_iter()
        .map(|v| Line::from(fmt_num(v)))
        .collect()
}

fn pareto(f: &mut Frame, app: &App, t: Theme, marks: &[Mark], area: Rect) {
    let mut groups: Vec<&str> = Vec::new();
    for m in marks {
        if !groups.contains(&m.group.as_str()) {
            groups.push(&m.group);
        }
    }
    let points: Vec<Vec<(f64, f64)>> = groups
        .iter()
        .map(|g| {
            marks
                .iter()
                .filter(|m| m.group == *g)
                .map(|m| (m.mem_gib, m.tokens_per_s))
                .collect()
        })
        .collect();
    let limit = app.vram_limit.map(|b| b as f64 / GIB);
    let x_hi = marks
        .iter()
        .map(|m| m.mem_gib)
        .chain(limit)
        .fold(0.0_f64, f64::max)
        * 1.1;
    let y_hi = marks.iter().map(|m| m.tokens_per_s).fold(0.0_f64, f64::max) * 1.1;
    let limit_line: Vec<(f64, f64)> = limit.map(|l| vec![(l, 0.0), (l, y_hi)]).unwrap_or_default();
    let mut datasets: Vec<Dataset> = groups
        .iter()
        .zip(&points)
        .enumerate()
        .map(|(i, (g, pts))| {
            let marker = MARKERS[i % MARKERS.len()];
            let name = if g.is_empty() {
                format!("{marker} ok runs")
            } else {
                format!("{marker} {g}")
            };
            Dataset::default()
                .name(name)
                .marker(Marker::Custom(marker))
                .graph_type(GraphType::Scatter)
                .style(t.chart(i))
                .data(pts)
        })
        .collect();
    if let Some(l) = app.vram_limit {
        datasets.push(
            Dataset::default()
                .name(format!(
                    "vram_limit {}",
                    crate::report::human_bytes(Some(l))
                ))
                .marker(Marker::Braille)
                .graph_type(GraphType::Line)
                .style(t.bad())
                .data(&limit_line),
        );
    }
    let rss = marks.iter().all(|m| m.rss);
    let x_title = if rss {
        "peak RSS (GiB)"
    } else {
        "peak VRAM (GiB)"
    };
    let chart = Chart::new(datasets)
        .block(Block::bordered().title(Span::styled(
            " Chart: tokens/s against peak memory (up and left is better) ",
            t.title(),
        )))
        .x_axis(
            Axis::default()
                .title(Span::styled(x_title, t.dim()))
                .bounds([0.0, x_hi.max(1e-9)])
                .labels(labels(0.0, x_hi)),
        )
        .y_axis(
            Axis::default()
                .title(Span::styled("tokens/s", t.dim()))
                .bounds([0.0, y_hi.max(1e-9)])
                .labels(labels(0.0, y_hi)),
        )
        .hidden_legend_constraints((Constraint::Percentage(60), Constraint::Percentage(60)));
    f.render_widget(chart, area);
}

fn bars(f: &mut Frame, t: Theme, marks: &[Mark], area: Rect) {
    let block = Block::bordered().title(Span::styled(" J/token (fewer is better) ", t.title()));
    let mut with_j: Vec<&Mark> = marks.iter().filter(|m| m.j_per_token.is_some()).collect();
    if with_j.is_empty() {
        f.render_widget(
            Paragraph::new("no J/token: no power readings (CPU runs, or NVML not available)")
                .style(t.dim())
                .block(block),
            area,
        );
        return;
    }
    with_j.sort_by(|a, b| {
        a.j_per_token
            .partial_cmp(&b.j_per_token)
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let bars: Vec<Bar> = with_j
        .iter()
        .map(|m| {
            let j = m.j_per_token.unwrap_or(0.0);
            // Bars are integers: µJ keeps three digits of a J/token around 0.001.
            Bar::default()
                .label(Line::from(format!("{} {}", m.id, m.label)))
                .value((j * 1e6).round().max(0.0) as u64)
                .text_value(fmt_num(j))
        })
        .collect();
    let chart = BarChart::default()
        .block(block)
        .direction(Direction::Horizontal)
        .bar_width(1)
        .bar_gap(0)
        .bar_style(t.chart(0))
        .value_style(t.text())
        .data(ratatui::widgets::BarGroup::default().bars(&bars));
    f.render_widget(chart, area);
}
