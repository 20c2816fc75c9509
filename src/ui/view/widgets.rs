//! Small drawing pieces the panels share: sparklines, key/value lines, dialogs.

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, Paragraph, Sparkline};

use super::super::theme::Theme;

/// The last `n` values of `v`.
pub(super) fn tail<T: Copy>(v: &[T], n: usize) -> Vec<T> {
    v[v.len().saturating_sub(n)..].to_vec()
}

/// A sparkline of the last values of `data` that fit, titled, in chart colour `i`; values are
/// multiplied by `scale` before the bars are rounded (so losses around 1 still vary).
pub(super) fn spark(
    f: &mut Frame,
    t: Theme,
    area: Rect,
    title: String,
    data: &[f64],
    scale: f64,
    i: usize,
) {
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

/// A `key   value` line of the detail panel.
pub(super) fn kv<'a>(t: Theme, k: &str, v: String) -> Line<'a> {
    Line::from(vec![
        Span::styled(format!("{k:<16}"), t.dim()),
        Span::raw(v),
    ])
}

/// A `w` x `h` rectangle centred in `area` (clipped to it).
pub(super) fn centered(area: Rect, w: u16, h: u16) -> Rect {
    let w = w.min(area.width);
    let h = h.min(area.height);
    Rect {
        x: area.x + (area.width - w) / 2,
        y: area.y + (area.height - h) / 2,
        width: w,
        height: h,
    }
}

/// A dialog: `lines` in a bordered box titled `title`, `w` columns wide, centred in `area`
/// over whatever is below.
pub(super) fn dialog(f: &mut Frame, t: Theme, area: Rect, title: &str, lines: Vec<Line>, w: u16) {
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
