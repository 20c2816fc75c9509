//! Every key of the dashboard, in one table: [`BINDINGS`] is what key handling looks a key up
//! in ([`command`]), what the help overlay lists (one line per binding, in table order), and
//! where the footer's hints take their text ([`hint`], in the order of [`footer`]).
//!
//! A key gives a [`Cmd`]; whether it can be carried out (a queued run to skip, the table view
//! to sort) is decided by [`super::App::on_key`]. Dialogs read their keys themselves (`y`,
//! typing a file name): they are not commands.

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use super::app::View;
use crate::orchestrator::MoveTo;

/// What a key asks the dashboard to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmd {
    /// Open the help overlay.
    Help,
    /// Switch to a main view.
    Show(View),
    /// The next of queue / live / table / chart (from the detail: the queue).
    NextView,
    /// The selected run's detail.
    Detail,
    /// From the detail back to the queue.
    Back,
    /// Move the selection (the table's in the table view).
    Select(SelectTo),
    /// Move the selected queued run.
    Move(MoveTo),
    /// Pause the queue, or resume it.
    PauseResume,
    /// Skip the selected queued run.
    Skip,
    /// Cancel the selected run (a running one after a confirmation).
    Cancel,
    /// Run a finished run again.
    Retry,
    /// Save the sweep as a profile (asks for the file name).
    Save,
    /// Table view: sort by the previous column.
    SortPrev,
    /// Table view: sort by the next column.
    SortNext,
    /// Table view: reverse the order.
    SortReverse,
    /// Make the selected finished run the baseline of the ratios.
    Baseline,
    /// Quit: detach when attached; else ask while the sweep runs.
    Quit,
    /// Detach from the daemon (explains itself in a local sweep).
    Detach,
    /// Quit at once, also from a dialog (Ctrl-C).
    QuitNow,
}

/// Where [`Cmd::Select`] moves the selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelectTo {
    /// The row above.
    Prev,
    /// The row below.
    Next,
    /// The first row.
    First,
    /// The last row.
    Last,
}

/// A key as a binding matches it. A more specific pattern wins: `Ctrl` over `Char`, `Shift`
/// over `Code`; otherwise modifiers are ignored (Shift is part of the character: `K`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    /// A character.
    Char(char),
    /// A character with Ctrl held.
    Ctrl(char),
    /// A key that is not a character.
    Code(KeyCode),
    /// A key that is not a character, with Shift held.
    Shift(KeyCode),
}

/// A footer hint: the key as the footer writes it and one word for what it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hint {
    /// The command it stands for (how [`footer`] refers to it).
    pub cmd: Cmd,
    /// The key, e.g. `jk`, `⏎`.
    pub key: &'static str,
    /// What it does, e.g. `select`.
    pub word: &'static str,
    /// The word when attached to the daemon, if different.
    pub attached: Option<&'static str>,
}

/// One line of the help: the keys as shown, what they do, and the key -> command entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    /// The keys as the help shows them (a binding may take more, e.g. `<` for `←`).
    pub keys: &'static str,
    /// What they do.
    pub help: &'static str,
    /// The line instead when attached to the daemon (`lorascope attach`), if different.
    pub attached: Option<(&'static str, &'static str)>,
    /// Each key and the command it gives.
    pub map: &'static [(Key, Cmd)],
    /// The footer hints of these commands.
    pub hints: &'static [Hint],
}

const fn line(
    keys: &'static str,
    help: &'static str,
    map: &'static [(Key, Cmd)],
    hints: &'static [Hint],
) -> Binding {
    Binding {
        keys,
        help,
        attached: None,
        map,
        hints,
    }
}

const fn h(cmd: Cmd, key: &'static str, word: &'static str) -> Hint {
    Hint {
        cmd,
        key,
        word,
        attached: None,
    }
}

use Cmd::*;
use Key::{Char, Code, Ctrl, Shift};

/// Every key, in the order of the help overlay.
pub const BINDINGS: &[Binding] = &[
    line(
        "1 2 3 4 / Tab",
        "queue / live / table / chart view",
        &[
            (Char('1'), Show(View::Queue)),
            (Char('2'), Show(View::Live)),
            (Char('3'), Show(View::Table)),
            (Char('4'), Show(View::Chart)),
            (Code(KeyCode::Tab), NextView),
        ],
        &[],
    ),
    line(
        "j k ↑ ↓ g G",
        "select a run",
        &[
            (Char('k'), Select(SelectTo::Prev)),
            (Code(KeyCode::Up), Select(SelectTo::Prev)),
            (Char('j'), Select(SelectTo::Next)),
            (Code(KeyCode::Down), Select(SelectTo::Next)),
            (Char('g'), Select(SelectTo::First)),
            (Code(KeyCode::Home), Select(SelectTo::First)),
            (Char('G'), Select(SelectTo::Last)),
            (Code(KeyCode::End), Select(SelectTo::Last)),
        ],
        &[h(Select(SelectTo::Next), "jk", "select")],
    ),
    line(
        "Enter, d",
        "run detail (Esc back)",
        &[
            (Code(KeyCode::Enter), Detail),
            (Char('d'), Detail),
            (Code(KeyCode::Esc), Back),
        ],
        &[h(Detail, "⏎", "detail"), h(Back, "esc", "back")],
    ),
    line(
        "K J, Shift+↑↓",
        "move the queued run up / down",
        &[
            (Char('K'), Move(MoveTo::Up)),
            (Shift(KeyCode::Up), Move(MoveTo::Up)),
            (Char('J'), Move(MoveTo::Down)),
            (Shift(KeyCode::Down), Move(MoveTo::Down)),
        ],
        &[h(Move(MoveTo::Up), "JK", "move")],
    ),
    line(
        "t",
        "move the queued run to the top",
        &[(Char('t'), Move(MoveTo::Top))],
        &[h(Move(MoveTo::Top), "t", "top")],
    ),
    line(
        "p",
        "pause / resume the queue",
        &[(Char('p'), PauseResume)],
        &[h(PauseResume, "p", "pause")],
    ),
    line(
        "s",
        "skip the queued run (a skipped one: un-skip)",
        &[(Char('s'), Skip)],
        &[h(Skip, "s", "skip")],
    ),
    line(
        "c",
        "cancel the run (asks if running)",
        &[(Char('c'), Cancel)],
        &[h(Cancel, "c", "cancel")],
    ),
    line(
        "r",
        "retry a finished run",
        &[(Char('r'), Retry)],
        &[h(Retry, "r", "retry")],
    ),
    line(
        "w",
        "save the sweep as a profile",
        &[(Char('w'), Save)],
        &[h(Save, "w", "save")],
    ),
    line(
        "← → h l",
        "table: sort column",
        &[
            (Code(KeyCode::Left), SortPrev),
            (Char('h'), SortPrev),
            (Char('<'), SortPrev),
            (Code(KeyCode::Right), SortNext),
            (Char('l'), SortNext),
            (Char('>'), SortNext),
        ],
        &[h(SortNext, "←→", "sort")],
    ),
    line(
        "o",
        "table: reverse the order",
        &[(Char('o'), SortReverse)],
        &[h(SortReverse, "o", "order")],
    ),
    line(
        "b",
        "set the baseline row",
        &[(Char('b'), Baseline)],
        &[h(Baseline, "b", "baseline")],
    ),
    line(
        "?",
        "this help",
        &[(Char('?'), Help)],
        &[h(Help, "?", "help")],
    ),
    Binding {
        keys: "q, Ctrl-C",
        help: "stop the sweep and quit",
        attached: Some(("q, D, Ctrl-C", "detach (the sweep keeps running)")),
        map: &[(Char('q'), Quit), (Char('D'), Detach), (Ctrl('c'), QuitNow)],
        hints: &[Hint {
            cmd: Quit,
            key: "q",
            word: "quit",
            attached: Some("detach"),
        }],
    },
];

impl Key {
    /// Whether `k` is this key, with the modifiers this pattern asks for.
    fn matches(self, k: &KeyEvent) -> bool {
        let held = |m| k.modifiers.contains(m);
        match self {
            Char(c) => k.code == KeyCode::Char(c),
            Ctrl(c) => k.code == KeyCode::Char(c) && held(KeyModifiers::CONTROL),
            Code(code) => k.code == code,
            Shift(code) => k.code == code && held(KeyModifiers::SHIFT),
        }
    }

    /// Patterns that ask for a modifier win over those that ignore modifiers.
    fn specific(self) -> bool {
        matches!(self, Ctrl(_) | Shift(_))
    }
}

/// The command a key press gives, if any (the most specific matching pattern).
pub fn command(k: &KeyEvent) -> Option<Cmd> {
    let entries = || BINDINGS.iter().flat_map(|b| b.map.iter());
    let find = |specific: bool| {
        entries()
            .find(|(key, _)| key.specific() == specific && key.matches(k))
            .map(|&(_, cmd)| cmd)
    };
    find(true).or_else(|| find(false))
}

/// The help overlay's lines: keys and what they do, `attached` choosing the daemon client's
/// wording where it differs.
pub fn help_lines(attached: bool) -> impl Iterator<Item = (&'static str, &'static str)> {
    BINDINGS.iter().map(move |b| match b.attached {
        Some(alt) if attached => alt,
        _ => (b.keys, b.help),
    })
}

/// The footer's key and word for `cmd`, if it has a hint.
pub fn hint(cmd: Cmd, attached: bool) -> Option<(&'static str, &'static str)> {
    let h = BINDINGS
        .iter()
        .flat_map(|b| b.hints.iter())
        .find(|h| h.cmd == cmd)?;
    let word = if attached {
        h.attached.unwrap_or(h.word)
    } else {
        h.word
    };
    Some((h.key, word))
}

/// Whether `cmd` changes the queue (refused, and not offered, on a read-only recorded sweep).
pub fn changes_queue(cmd: Cmd) -> bool {
    matches!(
        cmd,
        Cmd::Move(_) | Cmd::PauseResume | Cmd::Skip | Cmd::Cancel | Cmd::Retry
    )
}

/// The commands whose hints the footer shows in `view`, in order.
pub fn footer(view: View) -> &'static [Cmd] {
    match view {
        View::Table => &[
            SortNext,
            SortReverse,
            Baseline,
            Detail,
            Retry,
            Save,
            Help,
            Quit,
        ],
        View::Detail => &[Back, Select(SelectTo::Next), Help, Quit],
        View::Chart => &[Help, Quit],
        View::Queue | View::Live => &[
            Select(SelectTo::Next),
            Move(MoveTo::Up),
            Move(MoveTo::Top),
            PauseResume,
            Skip,
            Cancel,
            Retry,
            Save,
            Help,
            Quit,
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No key means two things, and every footer command has a hint.
    #[test]
    fn keys_are_unambiguous_and_hints_exist() {
        let keys: Vec<Key> = BINDINGS
            .iter()
            .flat_map(|b| b.map.iter().map(|&(k, _)| k))
            .collect();
        for (i, k) in keys.iter().enumerate() {
            assert!(!keys[..i].contains(k), "{k:?} is bound twice");
        }
        for view in [
            View::Queue,
            View::Live,
            View::Table,
            View::Chart,
            View::Detail,
        ] {
            for &cmd in footer(view) {
                assert!(hint(cmd, false).is_some(), "no hint for {cmd:?}");
            }
        }
    }

    #[test]
    fn the_specific_pattern_wins() {
        let key = |code, m| KeyEvent::new(code, m);
        let none = KeyModifiers::NONE;
        assert_eq!(
            command(&key(KeyCode::Up, KeyModifiers::SHIFT)),
            Some(Move(MoveTo::Up))
        );
        assert_eq!(
            command(&key(KeyCode::Up, KeyModifiers::CONTROL)),
            Some(Select(SelectTo::Prev))
        );
        assert_eq!(
            command(&key(KeyCode::Char('c'), KeyModifiers::CONTROL)),
            Some(QuitNow)
        );
        assert_eq!(command(&key(KeyCode::Char('c'), none)), Some(Cancel));
        assert_eq!(
            command(&key(KeyCode::Char('K'), KeyModifiers::SHIFT)),
            Some(Move(MoveTo::Up))
        );
        assert_eq!(command(&key(KeyCode::Char('x'), none)), None);
    }
}
