//! Styles from the 16 ANSI colours only (they map onto any 16- or 256-colour palette the
//! terminal has; no RGB), or none at all when `NO_COLOR` is set: then emphasis is carried by
//! bold, underline and reverse video alone.

use ratatui::style::{Color, Modifier, Style};

/// The dashboard's styles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Theme {
    /// Colours on; off: modifiers only.
    pub color: bool,
}

impl Theme {
    /// Colours unless `NO_COLOR` is set to a non-empty value (<https://no-color.org>).
    pub fn from_env() -> Theme {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Theme { color: !no_color }
    }

    fn fg(self, c: Color) -> Style {
        if self.color {
            Style::new().fg(c)
        } else {
            Style::new()
        }
    }

    /// Plain text.
    pub fn text(self) -> Style {
        Style::new()
    }
    /// Secondary text: labels, ids, hints.
    pub fn dim(self) -> Style {
        if self.color {
            Style::new().fg(Color::DarkGray)
        } else {
            Style::new()
        }
    }
    /// Panel and section titles.
    pub fn title(self) -> Style {
        self.fg(Color::Cyan).add_modifier(Modifier::BOLD)
    }
    /// Success: `ok`, confirmations.
    pub fn ok(self) -> Style {
        self.fg(Color::Green)
    }
    /// Something in flight.
    pub fn running(self) -> Style {
        self.fg(Color::Yellow).add_modifier(Modifier::BOLD)
    }
    /// Failures and errors.
    pub fn bad(self) -> Style {
        self.fg(Color::Red).add_modifier(Modifier::BOLD)
    }
    /// Cancelled or interrupted runs.
    pub fn warn(self) -> Style {
        self.fg(Color::Magenta)
    }
    /// The best value of a table column.
    pub fn best(self) -> Style {
        self.fg(Color::Green)
            .add_modifier(Modifier::BOLD | Modifier::UNDERLINED)
    }
    /// The selected row or view tab (reverse video).
    pub fn selected(self) -> Style {
        Style::new().add_modifier(Modifier::REVERSED)
    }
    /// Key names in hints and the help.
    pub fn key(self) -> Style {
        self.fg(Color::Cyan).add_modifier(Modifier::BOLD)
    }
    /// Gauge fill.
    pub fn gauge(self) -> Style {
        self.fg(Color::Blue)
    }
    /// Chart `i`'s colour (cyan, yellow, magenta, repeating).
    pub fn chart(self, i: usize) -> Style {
        self.fg([Color::Cyan, Color::Yellow, Color::Magenta][i % 3])
    }
}
