//! Keys -> what happens: [`App::on_key`] looks a key up in [`super::keys`] and carries out
//! the [`Cmd`] on the state, returning the [`Action`] (an orchestrator [`Command`], a save,
//! quitting) that the event loop must perform. Dialogs read their keys here too.

use std::path::PathBuf;

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use super::app::{Action, App, Column, Modal, View};
use super::keys::{self, Cmd, SelectTo};
use crate::orchestrator::{Command, EntryId, EntryState, MoveTo};
use crate::summary::RunStatus;

impl App {
    /// Handles a key press; returns what the event loop must do. A dialog takes every key
    /// but Ctrl-C; a key that means nothing here changes nothing (and asks for no redraw).
    pub fn on_key(&mut self, key: KeyEvent) -> Option<Action> {
        if key.kind == KeyEventKind::Release {
            return None;
        }
        self.dirty = true;
        let cmd = keys::command(&key);
        if cmd == Some(Cmd::QuitNow) {
            return self.quit_now();
        }
        if let Some(modal) = self.modal.clone() {
            return self.on_modal_key(modal, key);
        }
        self.message = None;
        match cmd {
            Some(cmd) => self.run(cmd),
            None => {
                self.dirty = false;
                None
            }
        }
    }

    /// Carries out a command outside dialogs.
    fn run(&mut self, cmd: Cmd) -> Option<Action> {
        let table = self.view == View::Table;
        if self.read_only && super::keys::changes_queue(cmd) {
            self.say(
                "read-only: a recorded sweep (`lorascope run PROFILE --resume` continues it)",
                true,
            );
            return None;
        }
        match cmd {
            Cmd::Help => self.modal = Some(Modal::Help),
            Cmd::QuitNow => return self.quit_now(),
            Cmd::Quit | Cmd::Detach if self.attached => return self.quit_now(),
            Cmd::Detach => {
                self.say(
                    "not attached to a daemon: `lorascope run PROFILE --detach` starts sweeps that outlive the terminal",
                    true,
                );
            }
            Cmd::Quit => {
                if self.sweep_finished {
                    return self.quit_now();
                }
                self.modal = Some(Modal::ConfirmQuit);
            }
            Cmd::Show(view) => self.view = view,
            Cmd::NextView => {
                self.view = match self.view {
                    View::Queue => View::Live,
                    View::Live => View::Table,
                    View::Table => View::Chart,
                    View::Chart | View::Detail => View::Queue,
                }
            }
            Cmd::Detail => {
                if self.target().is_some() {
                    if table {
                        self.selected = self.table_selected.clone();
                    }
                    self.view = View::Detail;
                }
            }
            Cmd::Back => {
                if self.view == View::Detail {
                    self.view = View::Queue;
                }
            }
            Cmd::Move(to) => return self.move_cmd(to),
            Cmd::Select(to) => {
                let rows = if table {
                    self.table_rows()
                } else {
                    self.rows()
                };
                let n = rows.len() as isize;
                let delta = match to {
                    SelectTo::Prev => -1,
                    SelectTo::Next => 1,
                    SelectTo::First => -n,
                    SelectTo::Last => n,
                };
                self.move_selection(&rows, delta, table);
            }
            Cmd::PauseResume => {
                if self.sweep_finished {
                    self.say("the sweep has finished", true);
                    return None;
                }
                let cmd = if self.queue.paused {
                    Command::Resume
                } else {
                    Command::Pause
                };
                return Some(Action::Send(cmd));
            }
            Cmd::Skip => {
                let id = self.target()?;
                let skipped = Some(EntryState::Done {
                    status: RunStatus::Skipped,
                });
                if self.state(&id) == skipped && !self.sweep_finished {
                    // Un-skip: queued again at the end (and recorded so).
                    return Some(Action::Send(Command::Retry { id }));
                }
                if self.state(&id) != Some(EntryState::Queued) {
                    self.say(
                        "only a queued run can be skipped (s on a skipped one un-skips it)",
                        true,
                    );
                    return None;
                }
                return Some(Action::Send(Command::Skip { id }));
            }
            Cmd::Cancel => {
                let id = self.target()?;
                match self.state(&id) {
                    Some(EntryState::Running { .. }) => {
                        self.modal = Some(Modal::ConfirmCancel(id));
                    }
                    Some(EntryState::Queued) => {
                        return Some(Action::Send(Command::Cancel { id }));
                    }
                    _ => self.say("only a running or queued run can be cancelled", true),
                }
            }
            Cmd::Retry => {
                let id = self.target()?;
                if !matches!(self.state(&id), Some(EntryState::Done { .. })) {
                    self.say("only a finished run can be retried", true);
                    return None;
                }
                if self.sweep_finished {
                    self.say("the sweep has finished: run it again with --resume", true);
                    return None;
                }
                return Some(Action::Send(Command::Retry { id }));
            }
            Cmd::Save => {
                self.modal = Some(Modal::SaveAs(format!("{}-saved.toml", self.name)));
            }
            // Sorting keys mean nothing outside the table.
            Cmd::SortPrev | Cmd::SortNext | Cmd::SortReverse if !table => self.dirty = false,
            Cmd::SortPrev => self.sort_by(Column::ALL.len() - 1),
            Cmd::SortNext => self.sort_by(1),
            Cmd::SortReverse => self.sort_desc = !self.sort_desc,
            Cmd::Baseline => {
                let id = self.target()?;
                if self
                    .runs
                    .get(&id)
                    .and_then(|r| r.summary.as_ref())
                    .is_none()
                {
                    self.say("the baseline must be a finished run", true);
                    return None;
                }
                self.say(format!("baseline: {id}"), false);
                self.baseline = Some(id);
            }
        }
        None
    }

    /// Sorts by the column `step` places after the current one (cyclically), in that
    /// column's better-first order.
    fn sort_by(&mut self, step: usize) {
        let i = Column::ALL
            .iter()
            .position(|c| *c == self.sort)
            .unwrap_or(0);
        self.sort = Column::ALL[(i + step) % Column::ALL.len()];
        self.sort_desc = self.sort.higher_is_better();
    }

    fn say(&mut self, msg: impl Into<String>, err: bool) {
        self.message = Some((msg.into(), err));
    }

    fn move_selection(&mut self, rows: &[EntryId], delta: isize, table: bool) {
        if rows.is_empty() {
            return;
        }
        let cur = if table {
            &self.table_selected
        } else {
            &self.selected
        };
        let pos = cur
            .as_ref()
            .and_then(|s| rows.iter().position(|r| r == s))
            .unwrap_or(0) as isize;
        let new = (pos + delta).clamp(0, rows.len() as isize - 1) as usize;
        let id = Some(rows[new].clone());
        if table {
            self.table_selected = id;
        } else {
            self.selected = id;
        }
    }

    fn move_cmd(&mut self, to: MoveTo) -> Option<Action> {
        let id = self.target()?;
        if self.state(&id) != Some(EntryState::Queued) {
            self.say("only a queued run can be moved", true);
            return None;
        }
        Some(Action::Send(Command::Move { id, to }))
    }

    fn quit_now(&mut self) -> Option<Action> {
        self.modal = None;
        self.quitting = true;
        if self.attached {
            // Detach: the daemon keeps the sweep.
            return Some(Action::Quit);
        }
        if self.sweep_finished {
            Some(Action::Quit)
        } else {
            self.say("stopping the sweep…", false);
            Some(Action::Send(Command::Shutdown))
        }
    }

    fn on_modal_key(&mut self, modal: Modal, key: KeyEvent) -> Option<Action> {
        let yes = matches!(key.code, KeyCode::Char('y') | KeyCode::Char('Y'));
        match modal {
            Modal::Help => {
                self.modal = None;
                None
            }
            Modal::ConfirmQuit => {
                self.modal = None;
                if yes { self.quit_now() } else { None }
            }
            Modal::ConfirmCancel(id) => {
                self.modal = None;
                if yes {
                    Some(Action::Send(Command::Cancel { id }))
                } else {
                    None
                }
            }
            Modal::SaveAs(mut name) => match key.code {
                KeyCode::Esc => {
                    self.modal = None;
                    None
                }
                KeyCode::Enter => {
                    self.modal = None;
                    let name = name.trim().to_string();
                    if name.is_empty() {
                        self.say("save cancelled: no file name", true);
                        return None;
                    }
                    Some(Action::Save(PathBuf::from(name)))
                }
                KeyCode::Backspace => {
                    name.pop();
                    self.modal = Some(Modal::SaveAs(name));
                    None
                }
                KeyCode::Char('u') if key.modifiers.contains(KeyModifiers::CONTROL) => {
                    self.modal = Some(Modal::SaveAs(String::new()));
                    None
                }
                KeyCode::Char(c) if !c.is_control() => {
                    name.push(c);
                    self.modal = Some(Modal::SaveAs(name));
                    None
                }
                _ => {
                    self.modal = Some(Modal::SaveAs(name));
                    None
                }
            },
        }
    }
}
