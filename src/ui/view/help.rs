//! The help overlay: every line of [`crate::ui::keys::BINDINGS`], in the daemon client's
//! wording when attached.

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::text::{Line, Span};

use super::super::app::App;
use super::super::keys;
use super::super::theme::Theme;
use super::widgets::dialog;

/// Draws the help overlay centred in `area`.
pub(super) fn draw(f: &mut Frame, app: &App, t: Theme, area: Rect) {
    let lines = keys::help_lines(app.attached)
        .map(|(k, what)| {
            Line::from(vec![
                Span::styled(format!("{k:<15}"), t.key()),
                Span::raw(what),
            ])
        })
        .chain(std::iter::once(Line::styled("any key closes", t.dim())))
        .collect();
    dialog(f, t, area, " Keys ", lines, 52);
}
