//! The dialogs that ask something: cancel a running run, quit a running sweep, the file name
//! to save the sweep as. Their keys are read by [`crate::ui::App::on_key`].

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::text::{Line, Span};

use super::super::app::Modal;
use super::super::theme::Theme;
use super::widgets::dialog;

/// Draws dialog `m` centred in `area` (the help overlay is [`super::help`]'s).
pub(super) fn draw(f: &mut Frame, t: Theme, m: &Modal, area: Rect) {
    let (title, lines, w): (&str, Vec<Line>, u16) = match m {
        Modal::Help => return,
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
    dialog(f, t, area, title, lines, w);
}
