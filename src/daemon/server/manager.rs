//! The manager: owns the queued sweeps (the jobs) and runs them one after another through
//! [`run_sweep`](crate::orchestrator::run_sweep), each on all of its devices. It takes the
//! connections' requests ([`Ctl`]), forwards queue commands to the running sweep, publishes
//! the sweep's events through the [`Hub`], and rewrites `state.json` on every change.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::hub::{Bcast, Ended, Hub};
use super::log;
use super::plan::{Prepared, prepare};
use crate::daemon::error::DaemonError;
use crate::daemon::protocol::{Submit, SweepInfo};
use crate::daemon::state::{Job, Persisted, STATE_VERSION};
use crate::orchestrator::preflight::{load_profile, preflight, profile_key};
use crate::orchestrator::{
    self, Command, EntryState, Event, OrchestratorConfig, QueueError, Request,
};
use crate::store::Store;

/// Requests from connections to the manager, each with its reply. A reply dropped
/// unanswered means the request was not applied (the sweep ended first).
pub(super) enum Ctl {
    /// Queue a sweep: its id and position.
    Submit(
        Box<Submit>,
        oneshot::Sender<Result<(i64, usize), DaemonError>>,
    ),
    /// A queue command for the running sweep.
    Command(Command, oneshot::Sender<Result<(), DaemonError>>),
    /// Stop the daemon (`true`: once the running runs have finished); the reply says what
    /// happens.
    Stop(bool, oneshot::Sender<String>),
}

/// Owns the jobs; runs them one at a time.
pub(super) struct Manager {
    pub hub: Arc<Hub>,
    pub jobs: VecDeque<Job>,
    /// `queue pause` in force.
    pub paused: bool,
    /// A stop was asked for: `Some(finish)`.
    pub stop: Option<bool>,
    pub state_path: PathBuf,
    pub cfg: OrchestratorConfig,
    /// A test worker stands in for the engine: skip the engine's preflight checks.
    pub worker_overridden: bool,
}

/// Sends the orchestrator's answer to a forwarded command on to the connection that asked;
/// a reply the orchestrator drops (the sweep ended first) is dropped here too.
fn relay(
    reply: oneshot::Sender<Result<(), DaemonError>>,
) -> oneshot::Sender<Result<(), QueueError>> {
    let (tx, rx) = oneshot::channel::<Result<(), QueueError>>();
    tokio::spawn(async move {
        if let Ok(r) = rx.await {
            let _ = reply.send(r.map_err(DaemonError::from));
        }
    });
    tx
}

impl Manager {
    /// Writes `state.json` (errors are logged: the daemon keeps running).
    pub fn persist(&self) {
        let p = Persisted {
            version: STATE_VERSION,
            paused: self.paused,
            jobs: self.jobs.iter().cloned().collect(),
        };
        if let Err(e) = p.save(&self.state_path) {
            log(&format!("cannot save the state: {e}"));
        }
    }

    /// Copies what connections show from the manager's state, and wakes waiters.
    pub fn sync(&self, busy: bool) {
        {
            let mut sh = self.hub.lock();
            sh.busy = busy;
            sh.paused = self.paused;
            sh.pending = self
                .jobs
                .iter()
                .skip(usize::from(busy))
                .map(|j| j.info.clone())
                .collect();
            sh.stopping = self.stop.map(|finish| {
                if finish {
                    "finishing the running runs, then stopping".to_string()
                } else {
                    "interrupting the running runs, then stopping".to_string()
                }
            });
        }
        self.hub.bump();
    }

    /// Runs the jobs until a stop is asked for (or every request sender is gone).
    pub async fn run(mut self, mut ctl: mpsc::UnboundedReceiver<Ctl>) {
        self.persist();
        self.sync(false);
        while self.stop.is_none() {
            if self.jobs.is_empty() {
                let Some(c) = ctl.recv().await else { break };
                match c {
                    Ctl::Submit(s, reply) => {
                        let _ = reply.send(self.submit(&s, false));
                    }
                    Ctl::Command(cmd, reply) => {
                        let _ = reply.send(match cmd {
                            Command::Pause | Command::Resume => {
                                self.paused = cmd == Command::Pause;
                                self.persist();
                                Ok(())
                            }
                            Command::Retry { .. } => Err(DaemonError::NoSweepToRetry),
                            _ => Err(DaemonError::NoSweep),
                        });
                    }
                    Ctl::Stop(finish, reply) => {
                        self.stop = Some(finish);
                        let _ = reply.send("stopping: no sweep is running".into());
                    }
                }
                self.sync(false);
                continue;
            }
            self.run_front(&mut ctl).await;
        }
        self.persist();
        self.sync(false);
    }

    /// Queues a sweep; returns its id and position.
    ///
    /// Errors: the profile does not load or fails its checks, the database fails, or (with
    /// `resume`) the sweep is already queued.
    fn submit(&mut self, s: &Submit, busy: bool) -> Result<(i64, usize), DaemonError> {
        let lp = load_profile(s.profile.as_deref())?;
        if !self.worker_overridden {
            preflight(&lp)?;
        }
        let store = Store::open(&s.db)?;
        let key = profile_key(&lp);
        let existing = if s.resume {
            store.latest_sweep_for(&key)?
        } else {
            None
        };
        let sweep_id = match existing {
            Some(sw) => {
                if self
                    .jobs
                    .iter()
                    .any(|j| j.info.sweep_id == sw.id && j.info.db == s.db)
                {
                    return Err(DaemonError::AlreadyQueued(sw.id));
                }
                sw.id
            }
            None => store.create_sweep(&lp.name(), &key, &lp.source)?,
        };
        let base_dir = std::path::absolute(&lp.base_dir).unwrap_or(lp.base_dir.clone());
        self.jobs.push_back(Job {
            info: SweepInfo {
                sweep_id,
                name: lp.name(),
                profile_path: lp.path.display().to_string(),
                profile_source: lp.source.clone(),
                base_dir,
                db: s.db.clone(),
            },
            retry_failed: s.retry_failed,
            queue: None,
        });
        self.persist();
        log(&format!("queued sweep {sweep_id} ({})", lp.name()));
        let position = self.jobs.len() - 1;
        self.sync(busy);
        Ok((sweep_id, position))
    }

    fn on_event(&mut self, ev: Event) {
        if let Event::QueueChanged { queue } = &ev
            && let Some(job) = self.jobs.front_mut()
        {
            job.queue = Some(queue.clone());
            self.persist();
        }
        self.hub.publish(ev);
    }

    /// Whether runs are in flight, per the latest snapshot.
    fn any_running(&self) -> bool {
        self.jobs
            .front()
            .and_then(|j| j.queue.as_ref())
            .is_some_and(|q| {
                q.entries
                    .iter()
                    .any(|e| matches!(e.state, EntryState::Running { .. }))
            })
    }

    /// Runs the first job until it ends or the daemon is stopped.
    async fn run_front(&mut self, ctl: &mut mpsc::UnboundedReceiver<Ctl>) {
        let Some(job) = self.jobs.front().cloned() else {
            return;
        };
        let sweep_id = job.info.sweep_id;
        let Prepared {
            plan,
            mut store,
            history,
        } = match prepare(&job, self.hub.now()) {
            Ok(p) => p,
            Err(e) => {
                log(&format!("sweep {sweep_id} cannot start: {e}; dropped"));
                self.jobs.pop_front();
                self.persist();
                self.hub.lock().set_ended(
                    job.info.db.clone(),
                    sweep_id,
                    Ended {
                        complete: false,
                        error: Some(e.to_string()),
                    },
                );
                self.sync(false);
                return;
            }
        };
        log(&format!(
            "sweep {sweep_id} ({}): {} run(s) to go, {} already done",
            job.info.name,
            plan.runs.len(),
            plan.already_done
        ));
        {
            let mut sh = self.hub.lock();
            sh.history = Some(history);
            sh.seq += 1;
            let _ = self.hub.tx.send((sh.seq, Bcast::NewSweep));
        }
        self.sync(true);
        let (ctx, crx) = mpsc::unbounded_channel::<Request>();
        let (etx, mut erx) = mpsc::unbounded_channel::<Event>();
        if self.paused {
            let _ = ctx.send(Command::Pause.into());
        }
        let cfg = self.cfg.clone();
        let mut shutdown_sent = false;
        let result = {
            let sweep = orchestrator::run_sweep(plan, &mut store, &cfg, crx, etx);
            tokio::pin!(sweep);
            loop {
                tokio::select! {
                    r = &mut sweep => break r,
                    Some(ev) = erx.recv() => {
                        self.on_event(ev);
                        if self.stop == Some(true) && !shutdown_sent && !self.any_running() {
                            let _ = ctx.send(Command::Shutdown.into());
                            shutdown_sent = true;
                        }
                    }
                    c = ctl.recv() => match c {
                        None => {}
                        Some(Ctl::Submit(s, reply)) => {
                            let _ = reply.send(self.submit(&s, true));
                        }
                        Some(Ctl::Command(Command::Shutdown, reply)) => {
                            let _ = reply.send(Err(DaemonError::ShutdownCommand));
                        }
                        Some(Ctl::Command(cmd, reply)) => {
                            if matches!(cmd, Command::Pause | Command::Resume) {
                                self.paused = cmd == Command::Pause;
                                self.persist();
                                self.sync(true);
                            }
                            let _ = ctx.send(Request { command: cmd, reply: Some(relay(reply)) });
                        }
                        Some(Ctl::Stop(finish, reply)) => {
                            // Only ever from finish to interrupt, never back.
                            let finish = finish && self.stop != Some(false);
                            self.stop = Some(finish);
                            // Take the events already emitted, so the snapshot is current.
                            while let Ok(ev) = erx.try_recv() {
                                self.on_event(ev);
                            }
                            let msg = if finish {
                                let _ = ctx.send(Command::Pause.into());
                                if !self.any_running() && !shutdown_sent {
                                    let _ = ctx.send(Command::Shutdown.into());
                                    shutdown_sent = true;
                                }
                                "stopping once the running runs have finished; nothing new starts"
                            } else {
                                if !shutdown_sent {
                                    let _ = ctx.send(Command::Shutdown.into());
                                    shutdown_sent = true;
                                }
                                "stopping: the running runs are interrupted and re-queued for the next start"
                            };
                            log(msg);
                            self.sync(true);
                            let _ = reply.send(msg.to_string());
                        }
                    },
                }
            }
        };
        while let Ok(ev) = erx.try_recv() {
            self.on_event(ev);
        }
        let complete = match result {
            Ok(outcome) if !outcome.shutdown => {
                if let Err(e) = store.finish_sweep(sweep_id) {
                    log(&format!("sweep {sweep_id}: {e}"));
                }
                self.jobs.pop_front();
                log(&format!("sweep {sweep_id} finished: {:?}", outcome.counts));
                true
            }
            Ok(_) => {
                // Stopped: the job stays, with its last queue, for the next start.
                log(&format!(
                    "sweep {sweep_id} stopped; it continues at the next start"
                ));
                false
            }
            Err(e) => {
                log(&format!("sweep {sweep_id} aborted: {e}; dropped"));
                self.hub.publish(Event::Warning {
                    id: None,
                    message: format!("sweep {sweep_id} aborted: {e}"),
                });
                self.jobs.pop_front();
                false
            }
        };
        self.persist();
        {
            let mut sh = self.hub.lock();
            if let Some(h) = sh.history.as_mut() {
                h.ended = true;
            }
            sh.set_ended(
                job.info.db.clone(),
                sweep_id,
                Ended {
                    complete,
                    error: None,
                },
            );
        }
        self.sync(false);
    }
}
