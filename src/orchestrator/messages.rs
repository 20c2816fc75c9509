//! What the orchestrator takes and tells: [`Command`]s (with an optional reply, [`Request`]) and
//! [`Event`]s. Both are serde enums, so the daemon sends them over its socket as JSON.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::queue::{EntryId, QueueError, QueueSnapshot};
use crate::spec::wire::{PhaseRecord, StepRecord};
use crate::summary::RunSummary;
use crate::telemetry::TelemetrySample;

/// Where `Move` puts a queued run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MoveTo {
    Up,
    Down,
    Top,
}

/// Commands to a running sweep. JSON: `{"cmd":"move","id":"3f2a9c01b2d4","to":"top"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Start nothing new (running runs continue).
    Pause,
    Resume,
    /// Reorder a queued run.
    Move {
        id: EntryId,
        to: MoveTo,
    },
    /// Drop a queued run (recorded as `skipped`; `--resume` runs it).
    Skip {
        id: EntryId,
    },
    /// Stop the running run (SIGTERM, SIGKILL after the grace period): `cancelled`.
    /// On a queued run, same as `Skip`.
    Cancel {
        id: EntryId,
    },
    /// Queue a finished run again (at the end).
    Retry {
        id: EntryId,
    },
    /// Stop: running runs are killed and recorded `interrupted`; nothing new starts.
    Shutdown,
}

/// Events from a running sweep. JSON: `{"event":"run_started",...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    SweepStarted {
        sweep_id: i64,
        /// Entries to run in this invocation.
        queued: usize,
        /// Entries already finished in the store (`--resume`), not re-run.
        already_done: usize,
    },
    RunQueued {
        id: EntryId,
        spec_id: String,
        label: String,
    },
    RunStarted {
        id: EntryId,
        run_id: i64,
        label: String,
        device: String,
        attempt: u32,
    },
    Step {
        id: EntryId,
        record: StepRecord,
    },
    Telemetry {
        id: EntryId,
        sample: TelemetrySample,
    },
    /// The run's worker moved on to another phase (loading weights, compiling kernels, ...).
    Phase {
        id: EntryId,
        record: PhaseRecord,
    },
    Warning {
        id: Option<EntryId>,
        message: String,
    },
    RunFinished {
        id: EntryId,
        run_id: Option<i64>,
        label: String,
        summary: Box<RunSummary>,
    },
    QueueChanged {
        queue: QueueSnapshot,
    },
    CommandRejected {
        command: Command,
        reason: String,
    },
    SweepFinished {
        sweep_id: i64,
        /// Runs per final status in this invocation.
        counts: BTreeMap<String, usize>,
        /// Ended by `Shutdown` (some points not run).
        shutdown: bool,
    },
}

/// A [`Command`] with an optional reply: `Ok(())` once the queue applied it, the
/// [`QueueError`] when it was rejected (its message is the reason of
/// [`Event::CommandRejected`]). The daemon uses the reply to answer `lorascope queue ...`
/// clients; a plain `Command` converts with no reply. A reply dropped unanswered means the
/// sweep ended before the command was taken.
#[derive(Debug)]
pub struct Request {
    pub command: Command,
    pub reply: Option<oneshot::Sender<Result<(), QueueError>>>,
}

impl From<Command> for Request {
    fn from(command: Command) -> Request {
        Request {
            command,
            reply: None,
        }
    }
}
