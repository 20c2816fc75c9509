//! What the connections share with the manager: the current sweep's history, the queue of
//! sweeps as clients see it, the broadcast of events to attached clients, and the `wait`
//! bookkeeping. The manager writes it; the handlers read it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::{broadcast, mpsc, watch};

use super::manager::Ctl;
use crate::daemon::error::DaemonError;
use crate::daemon::protocol::{PROTOCOL_VERSION, ServerMsg, Stamped, StatusReport, SweepInfo};
use crate::daemon::state::History;
use crate::orchestrator::Event;

/// Events buffered per client before it counts as fallen behind (and gets a fresh replay).
const BROADCAST_CAPACITY: usize = 8192;

/// What attached clients are sent, numbered by [`Shared::seq`].
#[derive(Debug, Clone)]
pub(super) enum Bcast {
    Event(Stamped),
    /// Another sweep started: attached clients get a fresh replay.
    NewSweep,
}

/// What `wait` learned: `Some((complete, message))` once done, and the results database the
/// awaited sweep id was found in.
pub(super) type WaitState = (Option<(bool, String)>, Option<PathBuf>);

/// How a sweep ended.
#[derive(Debug, Clone)]
pub(super) struct Ended {
    /// Every run finished (false: a stop interrupted it, or it could not start).
    pub complete: bool,
    /// Why it could not start (its profile, devices or database), if so.
    pub error: Option<String>,
}

impl Ended {
    /// What `wait` prints for sweep `id`.
    pub fn message(&self, id: i64) -> String {
        match (&self.error, self.complete) {
            (Some(e), _) => format!("sweep {id} could not start: {e}"),
            (None, true) => format!("sweep {id} finished"),
            (None, false) => {
                format!("sweep {id} ended early (see `lorascope report --sweep {id}`)")
            }
        }
    }
}

/// What connections read; written by the manager.
#[derive(Default)]
pub(super) struct Shared {
    pub history: Option<History>,
    /// A sweep is running.
    pub busy: bool,
    pub pending: Vec<SweepInfo>,
    pub paused: bool,
    pub stopping: Option<String>,
    /// Sweeps that ended in this daemon's life, by (results database, sweep id).
    pub ended: HashMap<(PathBuf, i64), Ended>,
    /// The sweep that ended last.
    pub last_ended: Option<(PathBuf, i64)>,
    /// Sequence number of the last broadcast.
    pub seq: u64,
}

impl Shared {
    /// Records that sweep `sweep_id` of database `db` has ended (for `wait`).
    pub fn set_ended(&mut self, db: PathBuf, sweep_id: i64, ended: Ended) {
        let key = (db, sweep_id);
        self.ended.insert(key.clone(), ended);
        self.last_ended = Some(key);
    }
}

/// The state shared by the manager and every connection (behind an `Arc`).
pub(super) struct Hub {
    start: Instant,
    socket: PathBuf,
    /// Requests to the manager.
    pub ctl: mpsc::UnboundedSender<Ctl>,
    shared: Mutex<Shared>,
    pub tx: broadcast::Sender<(u64, Bcast)>,
    /// Bumped on every change a `wait` may be waiting for.
    pub changed: watch::Sender<u64>,
}

impl Hub {
    /// A hub for the daemon on `socket` whose manager takes requests on `ctl`.
    pub fn new(socket: PathBuf, ctl: mpsc::UnboundedSender<Ctl>) -> Hub {
        Hub {
            start: Instant::now(),
            socket,
            ctl,
            shared: Mutex::new(Shared::default()),
            tx: broadcast::channel(BROADCAST_CAPACITY).0,
            changed: watch::channel(0).0,
        }
    }

    /// The daemon clock: seconds since it started.
    pub fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// The shared state (held briefly: never across an await).
    pub fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic while holding the lock leaves consistent-enough data: keep serving.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records an event of the current sweep and sends it to attached clients.
    pub fn publish(&self, event: Event) {
        let s = Stamped {
            t: self.now(),
            event,
        };
        let mut sh = self.lock();
        if let Some(h) = sh.history.as_mut() {
            h.record(&s);
        }
        sh.seq += 1;
        let _ = self.tx.send((sh.seq, Bcast::Event(s)));
    }

    /// Wakes the connections waiting in `wait`.
    pub fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// The replay for a client and a subscription that continues right after it.
    pub fn attach(&self) -> (ServerMsg, broadcast::Receiver<(u64, Bcast)>, u64) {
        let sh = self.lock();
        let rx = self.tx.subscribe();
        (self.attached_msg(&sh), rx, sh.seq)
    }

    /// [`ServerMsg::Attached`] for the current sweep, from the locked state `sh`.
    pub fn attached_msg(&self, sh: &Shared) -> ServerMsg {
        ServerMsg::Attached {
            now: self.now(),
            sweep: sh.history.as_ref().map(|h| h.info.clone()),
            replay: sh.history.as_ref().map(History::replay).unwrap_or_default(),
        }
    }

    /// `lorascope status`'s report.
    pub fn status(&self) -> StatusReport {
        let sh = self.lock();
        StatusReport {
            version: PROTOCOL_VERSION,
            pid: std::process::id(),
            socket: self.socket.clone(),
            uptime_s: self.now(),
            stopping: sh.stopping.clone(),
            paused: sh.paused,
            current: sh.history.as_ref().map(|h| h.status(self.now())),
            pending: sh.pending.clone(),
        }
    }

    /// `Some((complete, message))` once what `wait` waits for has happened, and the database
    /// sweep `id` was found in (a waiter keeps to it, so a later sweep with the same id from
    /// another database does not make its wait ambiguous). Sweep `id` is looked up in every
    /// results database the daemon has seen, or in `db` alone; an id found in several
    /// databases needs `db`.
    ///
    /// Errors: [`DaemonError::NotQueued`], or [`DaemonError::Ambiguous`] without `db`.
    pub fn wait_state(
        &self,
        sweep: Option<i64>,
        db: Option<&Path>,
    ) -> Result<WaitState, DaemonError> {
        let sh = self.lock();
        let Some(id) = sweep else {
            if sh.busy || !sh.pending.is_empty() {
                return Ok((None, None));
            }
            let last = sh
                .last_ended
                .as_ref()
                .and_then(|k| Some((k.1, sh.ended.get(k)?)));
            return Ok((
                Some(match last {
                    Some((id, e)) => (
                        e.complete,
                        format!(
                            "no sweep running or queued; the last one: {}",
                            e.message(id)
                        ),
                    ),
                    None => (true, "no sweep running or queued".to_string()),
                }),
                None,
            ));
        };
        let wanted = |d: &Path| db.is_none_or(|w| w == d);
        // Databases where sweep `id` is running or queued, then where it has ended.
        let active: Vec<PathBuf> = sh
            .history
            .as_ref()
            .filter(|h| sh.busy && h.info.sweep_id == id && wanted(&h.info.db))
            .map(|h| h.info.db.clone())
            .into_iter()
            .chain(
                sh.pending
                    .iter()
                    .filter(|p| p.sweep_id == id && wanted(&p.db))
                    .map(|p| p.db.clone()),
            )
            .collect();
        let ended = sh
            .ended
            .keys()
            .filter(|(d, i)| *i == id && wanted(d))
            .map(|(d, _)| d.clone());
        let mut dbs: Vec<PathBuf> = active.iter().cloned().chain(ended).collect();
        dbs.sort();
        dbs.dedup();
        match dbs.as_slice() {
            [] => Err(DaemonError::NotQueued(id)),
            // Running or queued again (`run --resume`) counts before an earlier end.
            [d] if active.contains(d) => Ok((None, Some(d.clone()))),
            [d] => Ok((
                sh.ended
                    .get(&(d.clone(), id))
                    .map(|e| (e.complete, e.message(id))),
                Some(d.clone()),
            )),
            several => Err(DaemonError::Ambiguous {
                id,
                dbs: several.to_vec(),
            }),
        }
    }
}
