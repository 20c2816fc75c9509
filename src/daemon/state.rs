//! What the daemon remembers: the persisted list of sweeps to run (`state.json`, replaced
//! atomically on every change) and, in memory, the compacted event history of the current
//! sweep that attaching clients are rebuilt from.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::error::DaemonError;
use super::protocol::{RunningStatus, Stamped, SweepInfo, SweepStatus};
use crate::orchestrator::{EntryId, EntryState, Event, QueueSnapshot};
use crate::series::{MAX_POINTS, push_bounded};

/// Version of `state.json`.
pub const STATE_VERSION: u32 = 1;

/// Step records kept per run for a replay (as many as the dashboard charts).
pub const STEP_TAIL: usize = MAX_POINTS;

/// Telemetry samples kept per run for a replay (a minute at 10 Hz).
pub const SAMPLE_TAIL: usize = 600;

/// A sweep the daemon owns: queued, running, or interrupted by a stop or a crash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub info: SweepInfo,
    /// Re-run failed and cancelled points when (re)starting.
    pub retry_failed: bool,
    /// The queue as last seen (order, skips, retries, outcomes); `None` before it started.
    #[serde(default)]
    pub queue: Option<QueueSnapshot>,
}

/// The contents of `state.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Persisted {
    pub version: u32,
    /// `lorascope queue pause` in force (also for sweeps that start later).
    pub paused: bool,
    /// In order; the first is the one that runs (or was running).
    pub jobs: Vec<Job>,
}

impl Persisted {
    /// Reads `path`; a missing file is an empty state.
    ///
    /// Errors: [`DaemonError::StateRead`] (unreadable), [`DaemonError::StateParse`] (not a
    /// state file) or [`DaemonError::StateVersion`]; each names the file.
    pub fn load(path: &Path) -> Result<Persisted, DaemonError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Persisted::default()),
            Err(error) => {
                return Err(DaemonError::StateRead {
                    path: path.to_path_buf(),
                    error,
                });
            }
        };
        let p: Persisted =
            serde_json::from_str(&text).map_err(|error| DaemonError::StateParse {
                path: path.to_path_buf(),
                error,
            })?;
        if p.version != STATE_VERSION {
            return Err(DaemonError::StateVersion {
                path: path.to_path_buf(),
                found: p.version,
            });
        }
        Ok(p)
    }

    /// Writes `path` atomically (temporary file, fsync, rename, fsync of the directory), so
    /// a crash leaves either the old or the new state.
    ///
    /// Errors: [`DaemonError::StateWrite`]: the directory is not writable, or the disk is
    /// full.
    pub fn save(&self, path: &Path) -> Result<(), DaemonError> {
        let text = serde_json::to_string_pretty(self).map_err(DaemonError::Encode)?;
        crate::fsutil::write_atomic(path, &text)?;
        crate::fsutil::sync_parent(path);
        Ok(())
    }
}

#[derive(Debug, Clone, Default)]
struct RunTrack {
    label: String,
    device: String,
    attempt: u32,
    started: f64,
    step: u64,
    steps: VecDeque<Stamped>,
    samples: VecDeque<Stamped>,
    /// The latest phase of its latest attempt.
    phase: Option<Stamped>,
}

/// The events of one sweep, compacted for replay: structural events in order (sweep
/// started, runs queued/started/finished, sweep finished), the latest queue, and each run's
/// last [`STEP_TAIL`] steps and [`SAMPLE_TAIL`] samples of its latest attempt.
#[derive(Debug, Clone)]
pub struct History {
    pub info: SweepInfo,
    /// Steps per run (from the profile).
    pub steps_per_run: u32,
    /// The sweep has ended (finished, or stopped).
    pub ended: bool,
    log: Vec<Stamped>,
    queue: Option<Stamped>,
    runs: HashMap<EntryId, RunTrack>,
}

impl History {
    /// An empty history of sweep `info`.
    pub fn new(info: SweepInfo, steps_per_run: u32) -> History {
        History {
            info,
            steps_per_run,
            ended: false,
            log: Vec::new(),
            queue: None,
            runs: HashMap::new(),
        }
    }

    /// Adds an event.
    pub fn record(&mut self, s: &Stamped) {
        match &s.event {
            Event::Step { id, record } => {
                let r = self.runs.entry(id.clone()).or_default();
                r.step = record.step;
                push_bounded(&mut r.steps, s.clone(), STEP_TAIL);
            }
            Event::Telemetry { id, .. } => {
                let r = self.runs.entry(id.clone()).or_default();
                push_bounded(&mut r.samples, s.clone(), SAMPLE_TAIL);
            }
            Event::Phase { id, .. } => {
                self.runs.entry(id.clone()).or_default().phase = Some(s.clone());
            }
            Event::QueueChanged { .. } => self.queue = Some(s.clone()),
            Event::RunQueued { id, label, .. } => {
                self.runs.entry(id.clone()).or_default().label = label.clone();
                self.log.push(s.clone());
            }
            Event::RunStarted {
                id,
                label,
                device,
                attempt,
                ..
            } => {
                let r = self.runs.entry(id.clone()).or_default();
                *r = RunTrack {
                    label: label.clone(),
                    device: device.clone(),
                    attempt: *attempt,
                    started: s.t,
                    ..Default::default()
                };
                self.log.push(s.clone());
            }
            Event::SweepStarted { .. } | Event::RunFinished { .. } => self.log.push(s.clone()),
            Event::SweepFinished { .. } => {
                self.ended = true;
                self.log.push(s.clone());
            }
            // Transient: shown once on the status line of clients attached at the time.
            Event::Warning { .. } | Event::CommandRejected { .. } => {}
        }
    }

    /// The events to rebuild a dashboard from, in an order the dashboard accepts.
    pub fn replay(&self) -> Vec<Stamped> {
        let mut out = self.log.clone();
        out.extend(self.queue.iter().cloned());
        let mut ids: Vec<&EntryId> = self.runs.keys().collect();
        ids.sort();
        for id in ids {
            let r = &self.runs[id];
            out.extend(r.phase.iter().cloned());
            out.extend(r.steps.iter().cloned());
            out.extend(r.samples.iter().cloned());
        }
        out
    }

    /// The latest queue snapshot.
    pub fn queue(&self) -> Option<&QueueSnapshot> {
        match self.queue.as_ref().map(|s| &s.event) {
            Some(Event::QueueChanged { queue }) => Some(queue),
            _ => None,
        }
    }

    /// For `lorascope status`; `now` is the daemon clock.
    pub fn status(&self, now: f64) -> SweepStatus {
        let queue = self.queue().cloned();
        let mut counts = BTreeMap::new();
        let mut running = Vec::new();
        for e in queue.iter().flat_map(|q| &q.entries) {
            let key = match e.state {
                EntryState::Queued => "queued".to_string(),
                EntryState::Running { .. } => {
                    let r = self.runs.get(&e.id).cloned().unwrap_or_default();
                    running.push(RunningStatus {
                        id: e.id.clone(),
                        label: r.label,
                        device: r.device,
                        attempt: r.attempt,
                        step: r.step,
                        steps: self.steps_per_run,
                        elapsed_s: (now - r.started).max(0.0),
                        telemetry: r.samples.back().and_then(|s| match &s.event {
                            Event::Telemetry { sample, .. } => Some(sample.clone()),
                            _ => None,
                        }),
                    });
                    "running".to_string()
                }
                EntryState::Done { status } => status.as_str().to_string(),
            };
            *counts.entry(key).or_default() += 1;
        }
        SweepStatus {
            info: self.info.clone(),
            ended: self.ended,
            queue,
            running,
            counts,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::wire::StepRecord;

    fn info() -> SweepInfo {
        SweepInfo {
            sweep_id: 1,
            name: "t".into(),
            profile_path: "t.toml".into(),
            profile_source: String::new(),
            base_dir: ".".into(),
            db: "r.db".into(),
        }
    }

    fn st(t: f64, event: Event) -> Stamped {
        Stamped { t, event }
    }

    fn step(id: &str, n: u64) -> Event {
        Event::Step {
            id: id.into(),
            record: StepRecord {
                step: n,
                tokens: 1,
                padded_tokens: None,
                target_tokens: None,
                step_seconds: 0.1,
                loss: None,
                lr: None,
                grad_norm: None,
                loss_scale: None,
                skipped: false,
                mem_bytes: None,
                t: 0.0,
            },
        }
    }

    fn started(id: &str, attempt: u32) -> Event {
        Event::RunStarted {
            id: id.into(),
            run_id: 1,
            label: "l".into(),
            device: "cpu".into(),
            attempt,
        }
    }

    #[test]
    fn replay_keeps_the_latest_attempt_tail_after_structure() {
        let mut h = History::new(info(), 10);
        h.record(&st(0.0, started("a", 1)));
        for i in 0..(STEP_TAIL as u64 + 5) {
            h.record(&st(1.0, step("a", i)));
        }
        h.record(&st(2.0, started("a", 2)));
        h.record(&st(3.0, step("a", 1)));
        h.record(&st(
            3.5,
            Event::Warning {
                id: None,
                message: "w".into(),
            },
        ));
        let r = h.replay();
        assert_eq!(r.len(), 3, "{r:?}");
        assert!(matches!(r[1].event, Event::RunStarted { attempt: 2, .. }));
        assert!(matches!(r[2].event, Event::Step { .. }));
        h.record(&st(0.0, started("b", 1)));
        for i in 0..(STEP_TAIL as u64 + 5) {
            h.record(&st(1.0, step("b", i)));
        }
        assert_eq!(h.replay().len(), 4 + STEP_TAIL);
    }

    #[test]
    fn state_file_round_trips_and_rejects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        assert_eq!(Persisted::load(&path).unwrap(), Persisted::default());
        let p = Persisted {
            version: STATE_VERSION,
            paused: true,
            jobs: vec![Job {
                info: info(),
                retry_failed: false,
                queue: None,
            }],
        };
        p.save(&path).unwrap();
        assert_eq!(Persisted::load(&path).unwrap(), p);
        std::fs::write(&path, "{not json").unwrap();
        let e = Persisted::load(&path).unwrap_err().to_string();
        assert!(e.contains("state.json"), "{e}");
    }
}
