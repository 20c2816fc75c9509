//! The help overlay: every line of [`crate::ui::keys::BINDINGS`], in the daemon client's
//! wording when attached.

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::text::{Line, Span};

use super::super::app::App;
use super::super::keys;
use super::super::theme::Theme;
use super::widgets::dialog;

/// Draws the help overlay centred in `area`: the keys, then (when the terminal is tall
/// enough) the comparison table's legend, as `lorascope report` prints it.
pub(super) fn draw(f: &mut Frame, app: &App, t: Theme, area: Rect) {
    let mut lines: Vec<Line> = keys::help_lines(app.attached)
        .map(|(k, what)| {
            Line::from(vec![
                Span::styled(format!("{k:<15}"), t.key()),
                Span::raw(what),
            ])
        })
        .collect();
    let mut width = 52u16;
    let w = area.width.saturating_sub(4).min(100);
    let legend: Vec<String> = super::table::model(app)
        .1
        .legend(None)
        .iter()
        .flat_map(|l| crate::report::table::wrap(l, w.saturating_sub(2) as usize, "    "))
        .collect();
    // Keys, a blank line, the title, the legend, the closing line and the border.
    if w >= 52 && lines.len() + legend.len() + 5 <= area.height as usize {
        width = w;
        lines.push(Line::raw(""));
        lines.push(Line::styled("Comparison table", t.title()));
        lines.extend(legend.into_iter().map(Line::raw));
    }
    lines.push(Line::styled("any key closes", t.dim()));
    dialog(f, t, area, " Keys ", lines, width);
}
