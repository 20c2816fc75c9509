//! The sweep queue as a pure state machine: no processes, no I/O, no clock.
//!
//! The runtime ([`super::run_sweep`]) asks [`Queue::next_launch`] what to start, tells
//! [`Queue::finish`] how a run ended, and forwards [`Command`]s to [`Queue::apply`], carrying
//! out the [`Effect`]s it returns (kill a child, record a skip).

use serde::{Deserialize, Serialize};

use super::{Command, MoveTo};
use crate::summary::RunStatus;

/// Queue entry id: the spec's stable id, or `<id>.<n>` (1-based repeat) when repeats > 1.
pub type EntryId = String;

/// Where an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum EntryState {
    Queued,
    Running { slot: usize },
    Done { status: RunStatus },
}

/// One run to do: a spec (by index into the sweep's specs) and a repeat number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub id: EntryId,
    pub spec_index: usize,
    pub repeat: u32,
    pub state: EntryState,
    /// How many times it has been started.
    pub attempts: u32,
}

/// Why a child is being killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KillReason {
    /// `Cancel`: the run ends `cancelled`.
    Cancel,
    /// `Shutdown`: the run ends `interrupted` (re-run on `--resume`).
    Shutdown,
}

/// Something the runtime must do after a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    Kill {
        id: EntryId,
        slot: usize,
        reason: KillReason,
    },
    RecordSkipped {
        id: EntryId,
    },
}

/// A rejected command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("no run with id {0} (ids: `lorascope status`)")]
    Unknown(EntryId),
    /// The id prefix names several runs: the prefix and the runs' ids.
    #[error("id {0} matches {n} runs: {list}; give more characters", n = .1.len(), list = .1.join(", "))]
    Ambiguous(String, Vec<EntryId>),
    #[error("run {0} is not queued")]
    NotQueued(EntryId),
    #[error("run {0} is running: use cancel")]
    Running(EntryId),
    #[error("run {0} has not finished")]
    NotDone(EntryId),
    #[error("the sweep is shutting down")]
    ShuttingDown,
    /// The backend (e.g. Slurm's policy) refused the command: its message.
    #[error("{0}")]
    Refused(String),
}

/// The entry `id` names: the entry with exactly that id, else the one entry whose id starts
/// with it (the dashboard shows 8-character prefixes).
///
/// Errors: [`QueueError::Unknown`] when none matches, [`QueueError::Ambiguous`] (listing the
/// matches) when several do.
pub fn resolve_id(entries: &[Entry], id: &str) -> Result<EntryId, QueueError> {
    if entries.iter().any(|e| e.id == id) {
        return Ok(id.to_string());
    }
    let matches: Vec<EntryId> = entries
        .iter()
        .filter(|e| !id.is_empty() && e.id.starts_with(id))
        .map(|e| e.id.clone())
        .collect();
    match matches.len() {
        0 => Err(QueueError::Unknown(id.to_string())),
        1 => Ok(matches.into_iter().next().unwrap_or_default()),
        _ => Err(QueueError::Ambiguous(id.to_string(), matches)),
    }
}

/// The id as people read it: its first 8 characters, and the repeat (`.2`) if any.
pub fn short_id(id: &str) -> String {
    let (base, repeat) = match id.split_once('.') {
        Some((b, r)) => (b, Some(r)),
        None => (id, None),
    };
    let head: String = base.chars().take(8).collect();
    match repeat {
        Some(r) => format!("{head}.{r}"),
        None => head,
    }
}

/// A view of the queue for events and UIs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub paused: bool,
    pub shutting_down: bool,
    /// Queued entries in launch order.
    pub queued: Vec<EntryId>,
    /// Every entry (running and done included), in original order.
    pub entries: Vec<Entry>,
}

/// The queue.
#[derive(Debug, Clone)]
pub struct Queue {
    entries: Vec<Entry>,
    order: Vec<EntryId>,
    slots: Vec<Option<EntryId>>,
    killing: Vec<(EntryId, KillReason)>,
    paused: bool,
    shutting_down: bool,
}

impl Queue {
    /// A queue over `entries` (launch order = given order) with `n_slots` device slots.
    /// Entries not in state `Queued` are kept for display only.
    pub fn new(entries: Vec<Entry>, n_slots: usize) -> Queue {
        let order = entries
            .iter()
            .filter(|e| e.state == EntryState::Queued)
            .map(|e| e.id.clone())
            .collect();
        Queue {
            entries,
            order,
            slots: vec![None; n_slots.max(1)],
            killing: Vec::new(),
            paused: false,
            shutting_down: false,
        }
    }

    /// The entry with id `id`, in any state.
    pub fn entry(&self, id: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.id == id)
    }

    fn entry_mut(&mut self, id: &str) -> Result<&mut Entry, QueueError> {
        self.entries
            .iter_mut()
            .find(|e| e.id == id)
            .ok_or_else(|| QueueError::Unknown(id.to_string()))
    }

    /// Whether `Pause` is in force (nothing new starts).
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Whether `Shutdown` was applied (nothing new starts, ever).
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down
    }

    /// Queued ids in launch order.
    pub fn queued(&self) -> &[EntryId] {
        &self.order
    }

    /// Ids running now, by slot.
    pub fn running(&self) -> Vec<(usize, EntryId)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.clone().map(|id| (i, id)))
            .collect()
    }

    /// The queue as events and UIs show it.
    pub fn snapshot(&self) -> QueueSnapshot {
        QueueSnapshot {
            paused: self.paused,
            shutting_down: self.shutting_down,
            queued: self.order.clone(),
            entries: self.entries.clone(),
        }
    }

    /// The next run to start: a free slot and the first queued entry (unless paused or
    /// shutting down). The entry becomes `Running` on that slot.
    pub fn next_launch(&mut self) -> Option<(usize, EntryId)> {
        if self.paused || self.shutting_down || self.order.is_empty() {
            return None;
        }
        let slot = self.slots.iter().position(Option::is_none)?;
        let id = self.order.remove(0);
        self.slots[slot] = Some(id.clone());
        if let Ok(e) = self.entry_mut(&id) {
            e.state = EntryState::Running { slot };
            e.attempts += 1;
        }
        Some((slot, id))
    }

    /// Records how a running entry ended and frees its slot. A run killed for `Cancel` ends
    /// `cancelled` and one killed for `Shutdown` ends `interrupted`, unless it had already
    /// finished `ok` when the kill was requested (that result is kept).
    /// Returns the final status.
    pub fn finish(&mut self, id: &str, status: RunStatus) -> RunStatus {
        let status = match self.killing.iter().position(|(k, _)| k == id) {
            // A run that finished `ok` before the signal landed keeps its result.
            Some(i) => match (self.killing.remove(i).1, status) {
                (_, RunStatus::Ok) => RunStatus::Ok,
                (KillReason::Cancel, _) => RunStatus::Cancelled,
                (KillReason::Shutdown, _) => RunStatus::Interrupted,
            },
            None => status,
        };
        for s in self.slots.iter_mut() {
            if s.as_deref() == Some(id) {
                *s = None;
            }
        }
        if let Ok(e) = self.entry_mut(id) {
            e.state = EntryState::Done { status };
        }
        status
    }

    /// Whether nothing is running and nothing more will start.
    pub fn is_finished(&self) -> bool {
        self.slots.iter().all(Option::is_none) && (self.shutting_down || self.order.is_empty())
    }

    /// Whether a kill has been requested for `id`.
    pub fn kill_reason(&self, id: &str) -> Option<KillReason> {
        self.killing.iter().find(|(k, _)| k == id).map(|(_, r)| *r)
    }

    /// `cmd` with its id prefix (if any) replaced by the full id it names ([`resolve_id`]).
    ///
    /// Errors: as [`resolve_id`].
    pub fn resolve(&self, cmd: &Command) -> Result<Command, QueueError> {
        let full = |id: &EntryId| resolve_id(&self.entries, id);
        Ok(match cmd {
            Command::Move { id, to } => Command::Move {
                id: full(id)?,
                to: *to,
            },
            Command::Skip { id } => Command::Skip { id: full(id)? },
            Command::Cancel { id } => Command::Cancel { id: full(id)? },
            Command::Retry { id } => Command::Retry { id: full(id)? },
            Command::Pause | Command::Resume | Command::Shutdown => cmd.clone(),
        })
    }

    /// Applies a command (an id may be a unique prefix, see [`Queue::resolve`]). Errors
    /// leave the queue unchanged.
    pub fn apply(&mut self, cmd: &Command) -> Result<Vec<Effect>, QueueError> {
        let resolved = self.resolve(cmd)?;
        let cmd = &resolved;
        match cmd {
            Command::Pause => {
                self.paused = true;
                Ok(vec![])
            }
            Command::Resume => {
                self.paused = false;
                Ok(vec![])
            }
            Command::Move { id, to } => {
                self.entry_mut(id)?;
                let pos = self
                    .order
                    .iter()
                    .position(|x| x == id)
                    .ok_or_else(|| QueueError::NotQueued(id.clone()))?;
                match to {
                    MoveTo::Up if pos > 0 => self.order.swap(pos, pos - 1),
                    MoveTo::Down if pos + 1 < self.order.len() => self.order.swap(pos, pos + 1),
                    MoveTo::Top => {
                        let x = self.order.remove(pos);
                        self.order.insert(0, x);
                    }
                    _ => {}
                }
                Ok(vec![])
            }
            Command::Skip { id } => {
                let e = self.entry_mut(id)?;
                match e.state {
                    EntryState::Queued => {
                        e.state = EntryState::Done {
                            status: RunStatus::Skipped,
                        };
                        self.order.retain(|x| x != id);
                        Ok(vec![Effect::RecordSkipped { id: id.clone() }])
                    }
                    EntryState::Running { .. } => Err(QueueError::Running(id.clone())),
                    EntryState::Done { .. } => Err(QueueError::NotQueued(id.clone())),
                }
            }
            Command::Cancel { id } => {
                let state = self.entry_mut(id)?.state;
                match state {
                    // Cancelling a queued run skips it.
                    EntryState::Queued => self.apply(&Command::Skip { id: id.clone() }),
                    EntryState::Running { slot } => {
                        if self.kill_reason(id).is_some() {
                            return Ok(vec![]);
                        }
                        self.killing.push((id.clone(), KillReason::Cancel));
                        Ok(vec![Effect::Kill {
                            id: id.clone(),
                            slot,
                            reason: KillReason::Cancel,
                        }])
                    }
                    EntryState::Done { .. } => Err(QueueError::NotQueued(id.clone())),
                }
            }
            Command::Retry { id } => {
                if self.shutting_down {
                    return Err(QueueError::ShuttingDown);
                }
                let e = self.entry_mut(id)?;
                match e.state {
                    EntryState::Done { .. } => {
                        e.state = EntryState::Queued;
                        self.order.push(id.clone());
                        Ok(vec![])
                    }
                    _ => Err(QueueError::NotDone(id.clone())),
                }
            }
            Command::Shutdown => {
                self.shutting_down = true;
                let mut effects = Vec::new();
                for (slot, id) in self.running() {
                    match self.killing.iter_mut().find(|(k, _)| *k == id) {
                        // Already being cancelled: keep the kill, but it is now a shutdown.
                        Some(k) => k.1 = KillReason::Shutdown,
                        None => {
                            self.killing.push((id.clone(), KillReason::Shutdown));
                            effects.push(Effect::Kill {
                                id,
                                slot,
                                reason: KillReason::Shutdown,
                            });
                        }
                    }
                }
                Ok(effects)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(n: usize, slots: usize) -> Queue {
        let entries = (0..n)
            .map(|i| Entry {
                id: format!("e{i}"),
                spec_index: i,
                repeat: 0,
                state: EntryState::Queued,
                attempts: 0,
            })
            .collect();
        Queue::new(entries, slots)
    }

    fn mv(id: &str, to: MoveTo) -> Command {
        Command::Move { id: id.into(), to }
    }

    #[test]
    fn launches_in_order_one_per_slot() {
        let mut q = q(3, 2);
        assert_eq!(q.next_launch(), Some((0, "e0".into())));
        assert_eq!(q.next_launch(), Some((1, "e1".into())));
        assert_eq!(q.next_launch(), None);
        assert_eq!(q.finish("e1", RunStatus::Ok), RunStatus::Ok);
        assert_eq!(q.next_launch(), Some((1, "e2".into())));
        q.finish("e0", RunStatus::Oom);
        q.finish("e2", RunStatus::Failed);
        assert!(q.is_finished());
        assert_eq!(
            q.entry("e0").unwrap().state,
            EntryState::Done {
                status: RunStatus::Oom
            }
        );
    }

    #[test]
    fn reorder() {
        let mut q = q(4, 1);
        q.apply(&mv("e3", MoveTo::Top)).unwrap();
        assert_eq!(q.queued(), ["e3", "e0", "e1", "e2"]);
        q.apply(&mv("e0", MoveTo::Down)).unwrap();
        assert_eq!(q.queued(), ["e3", "e1", "e0", "e2"]);
        q.apply(&mv("e2", MoveTo::Up)).unwrap();
        assert_eq!(q.queued(), ["e3", "e1", "e2", "e0"]);
        // At the edges: no-ops.
        q.apply(&mv("e3", MoveTo::Up)).unwrap();
        q.apply(&mv("e0", MoveTo::Down)).unwrap();
        assert_eq!(q.queued(), ["e3", "e1", "e2", "e0"]);
        assert_eq!(
            q.apply(&mv("zz", MoveTo::Top)),
            Err(QueueError::Unknown("zz".into()))
        );
        let (_, id) = q.next_launch().unwrap();
        assert_eq!(id, "e3");
        assert_eq!(
            q.apply(&mv("e3", MoveTo::Top)),
            Err(QueueError::NotQueued("e3".into()))
        );
    }

    #[test]
    fn pause_resume() {
        let mut q = q(2, 1);
        q.apply(&Command::Pause).unwrap();
        assert_eq!(q.next_launch(), None);
        assert!(!q.is_finished());
        q.apply(&Command::Resume).unwrap();
        assert_eq!(q.next_launch(), Some((0, "e0".into())));
        // Pausing does not touch the running one.
        q.apply(&Command::Pause).unwrap();
        assert_eq!(q.running(), vec![(0, "e0".to_string())]);
    }

    #[test]
    fn skip_and_cancel() {
        let mut q = q(3, 1);
        assert_eq!(
            q.apply(&Command::Skip { id: "e1".into() }),
            Ok(vec![Effect::RecordSkipped { id: "e1".into() }])
        );
        assert_eq!(q.queued(), ["e0", "e2"]);
        q.next_launch();
        assert_eq!(
            q.apply(&Command::Skip { id: "e0".into() }),
            Err(QueueError::Running("e0".into()))
        );
        assert_eq!(
            q.apply(&Command::Cancel { id: "e0".into() }),
            Ok(vec![Effect::Kill {
                id: "e0".into(),
                slot: 0,
                reason: KillReason::Cancel
            }])
        );
        // A second cancel does nothing more.
        assert_eq!(q.apply(&Command::Cancel { id: "e0".into() }), Ok(vec![]));
        // Killed: whatever the exit status, it ends cancelled.
        assert_eq!(q.finish("e0", RunStatus::Failed), RunStatus::Cancelled);
        // Cancel of a queued run = skip.
        assert_eq!(
            q.apply(&Command::Cancel { id: "e2".into() }),
            Ok(vec![Effect::RecordSkipped { id: "e2".into() }])
        );
        assert!(q.is_finished());
    }

    #[test]
    fn a_run_that_finished_ok_before_the_kill_keeps_its_result() {
        let mut q = q(2, 1);
        q.next_launch();
        q.apply(&Command::Cancel { id: "e0".into() }).unwrap();
        assert_eq!(q.finish("e0", RunStatus::Ok), RunStatus::Ok);
        q.next_launch();
        q.apply(&Command::Shutdown).unwrap();
        assert_eq!(q.finish("e1", RunStatus::Ok), RunStatus::Ok);
    }

    #[test]
    fn retry() {
        let mut q = q(2, 1);
        assert_eq!(
            q.apply(&Command::Retry { id: "e0".into() }),
            Err(QueueError::NotDone("e0".into()))
        );
        q.next_launch();
        q.finish("e0", RunStatus::Failed);
        q.apply(&Command::Retry { id: "e0".into() }).unwrap();
        assert_eq!(q.queued(), ["e1", "e0"]);
        q.next_launch();
        q.finish("e1", RunStatus::Ok);
        assert_eq!(q.next_launch(), Some((0, "e0".into())));
        assert_eq!(q.entry("e0").unwrap().attempts, 2);
    }

    #[test]
    fn shutdown_interrupts_running_and_stops_launching() {
        let mut q = q(4, 2);
        q.next_launch();
        q.next_launch();
        q.apply(&Command::Cancel { id: "e1".into() }).unwrap();
        let effects = q.apply(&Command::Shutdown).unwrap();
        assert_eq!(
            effects,
            vec![Effect::Kill {
                id: "e0".into(),
                slot: 0,
                reason: KillReason::Shutdown
            }]
        );
        assert_eq!(q.next_launch(), None);
        assert_eq!(q.finish("e0", RunStatus::Failed), RunStatus::Interrupted);
        assert_eq!(q.finish("e1", RunStatus::Failed), RunStatus::Interrupted);
        assert!(q.is_finished());
        assert_eq!(
            q.apply(&Command::Retry { id: "e0".into() }),
            Err(QueueError::ShuttingDown)
        );
    }

    #[test]
    fn ids_may_be_unique_prefixes() {
        let mut q = Queue::new(
            [
                "2cafed75aa01",
                "2cafed75aa02",
                "3b000000ffff.1",
                "3b000000ffff.2",
            ]
            .iter()
            .enumerate()
            .map(|(i, id)| Entry {
                id: id.to_string(),
                spec_index: i,
                repeat: 0,
                state: EntryState::Queued,
                attempts: 0,
            })
            .collect(),
            1,
        );
        q.apply(&mv("2cafed75aa02", MoveTo::Top)).unwrap();
        q.apply(&mv("3b000000ffff.2", MoveTo::Top)).unwrap();
        assert_eq!(q.queued()[0], "3b000000ffff.2");
        q.apply(&Command::Skip {
            id: "2cafed75aa0".into(),
        })
        .unwrap_err();
        let err = q.apply(&mv("2cafed75", MoveTo::Top)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "id 2cafed75 matches 2 runs: 2cafed75aa01, 2cafed75aa02; give more characters"
        );
        q.apply(&Command::Skip {
            id: "2cafed75aa01".into(),
        })
        .unwrap();
        assert_eq!(
            q.apply(&Command::Skip { id: "x".into() }),
            Err(QueueError::Unknown("x".into()))
        );
        assert_eq!(short_id("2cafed75aa01"), "2cafed75");
        assert_eq!(short_id("3b000000ffff.2"), "3b000000.2");
    }

    #[test]
    fn commands_are_serde() {
        let c = Command::Move {
            id: "abc".into(),
            to: MoveTo::Top,
        };
        let j = serde_json::to_string(&c).unwrap();
        assert_eq!(j, r#"{"cmd":"move","id":"abc","to":"top"}"#);
        assert_eq!(serde_json::from_str::<Command>(&j).unwrap(), c);
        assert_eq!(
            serde_json::from_str::<Command>(r#"{"cmd":"pause"}"#).unwrap(),
            Command::Pause
        );
    }
}
