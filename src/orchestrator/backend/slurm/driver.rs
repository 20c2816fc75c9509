//! The tasks of one sweep on Slurm while the orchestrator follows them: submitting a batch of
//! entries as one array, polling (their files, then one `squeue`/`sacct` call for all
//! arrays), and turning each ended task into a [`RunResult`] as a local child would give.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use super::follow::{Tail, stderr_facts};
use super::script::{ScriptTask, batch_script};
use super::state::{Phase, map_state};
use super::{Attached, SlurmBackend, SlurmError, control};
use crate::orchestrator::MoveTo;
use crate::orchestrator::process::RunResult;
use crate::spec::wire::{StepRecord, TelemetrySample};
use crate::summary::{RunOutcome, RunStatus, summarize};

/// An entry to submit.
#[derive(Debug, Clone)]
pub struct Submit {
    pub entry: String,
    /// `train ... --json` (no program).
    pub argv: Vec<String>,
    pub warmup_steps: u32,
}

/// What a poll found.
#[derive(Debug, Clone)]
pub enum Update {
    Step(String, StepRecord),
    Telemetry(String, TelemetrySample),
    Warning(Option<String>, String),
    /// The task started on a node: its device text (`NODE (slurm JOB_TASK)`).
    Placed(String, String),
    Done(String, Box<RunResult>),
}

/// Polls a task may go unseen by both squeue and sacct before it counts as lost.
const UNSEEN_POLLS: u32 = 5;
/// Polls an ended task may wait for its exit code from sacct (sacct lags squeue).
const EXIT_CODE_POLLS: u32 = 3;

struct Track {
    array: String,
    key: String,
    tail: Tail,
    err: PathBuf,
    warmup_steps: u32,
    node: Option<String>,
    unseen: u32,
    waited_exit: u32,
}

/// The device text of a task: `slurm JOB_TASK` while queued, `NODE (slurm JOB_TASK)` once it
/// runs.
pub fn device_text(key: &str, node: Option<&str>) -> String {
    match node {
        Some(n) if !n.is_empty() => format!("{n} (slurm {key})"),
        _ => format!("slurm {key}"),
    }
}

/// The Slurm tasks of one sweep.
pub struct Driver {
    backend: SlurmBackend,
    sweep_id: i64,
    sweep_name: String,
    worker: PathBuf,
    dir: PathBuf,
    tracks: HashMap<String, Track>,
    submissions: u32,
}

impl Driver {
    /// A driver for sweep `sweep_id`, launching `worker` on the nodes (a path every node
    /// sees).
    pub fn new(backend: SlurmBackend, sweep_id: i64, worker: PathBuf) -> Driver {
        let dir = backend.sweep_dir(sweep_id);
        Driver {
            sweep_name: backend.sweep_name.clone(),
            backend,
            sweep_id,
            worker,
            dir,
            tracks: HashMap::new(),
            submissions: 0,
        }
    }

    /// The time between polls.
    pub fn poll_period(&self) -> std::time::Duration {
        self.backend.poll
    }

    /// The task recorded for `entry` by an earlier orchestrator, if any (taken: once).
    pub fn take_attached(&mut self, entry: &str) -> Option<Attached> {
        self.backend.attach.remove(entry)
    }

    /// Whether `entry` is on Slurm and followed.
    pub fn follows(&self, entry: &str) -> bool {
        self.tracks.contains_key(entry)
    }

    /// Whether any task is followed.
    pub fn busy(&self) -> bool {
        !self.tracks.is_empty()
    }

    /// The `JOB_TASK` key of a followed entry.
    pub fn key(&self, entry: &str) -> Option<&str> {
        self.tracks.get(entry).map(|t| t.key.as_str())
    }

    fn track(&mut self, entry: &str, array: &str, task: u32, warmup_steps: u32) {
        self.tracks.insert(
            entry.to_string(),
            Track {
                array: array.to_string(),
                key: format!("{array}_{task}"),
                tail: Tail::new(self.dir.join(format!("{entry}.jsonl"))),
                err: self.dir.join(format!("{entry}.err")),
                warmup_steps,
                node: None,
                unseen: 0,
                waited_exit: 0,
            },
        );
    }

    /// Follows a task an earlier orchestrator submitted (its file is read from the start).
    pub fn attach(&mut self, entry: &str, a: &Attached, warmup_steps: u32) -> String {
        self.track(entry, &a.array, a.task, warmup_steps);
        format!("{}_{}", a.array, a.task)
    }

    /// Submits `batch` as one job array (task i = batch[i]); an entry's earlier files are
    /// removed first. Returns the array job id.
    pub fn submit(&mut self, batch: &[Submit]) -> Result<String, SlurmError> {
        let werr = |e: std::io::Error| SlurmError::Workdir {
            path: self.dir.clone(),
            error: e.to_string(),
        };
        std::fs::create_dir_all(&self.dir).map_err(werr)?;
        for s in batch {
            for ext in ["jsonl", "err"] {
                let _ = std::fs::remove_file(self.dir.join(format!("{}.{ext}", s.entry)));
            }
        }
        let tasks: Vec<ScriptTask> = batch
            .iter()
            .map(|s| ScriptTask {
                entry: s.entry.clone(),
                argv: s.argv.clone(),
            })
            .collect();
        self.submissions += 1;
        let text = batch_script(
            self.sweep_id,
            &self.sweep_name,
            &self.backend.section,
            &self.dir,
            &self.worker,
            &tasks,
        );
        let path = self.dir.join(format!(
            "submit-{}-{}.sh",
            std::process::id(),
            self.submissions
        ));
        let array = self.backend.submit(&path, &text)?;
        for (i, s) in batch.iter().enumerate() {
            self.track(&s.entry, &array, i as u32, s.warmup_steps);
        }
        Ok(array)
    }

    /// `scancel` of the entry's task (it then ends `CANCELLED`, seen by a later poll).
    pub fn cancel(&self, entry: &str) -> Result<(), SlurmError> {
        match self.key(entry) {
            Some(k) => control("scancel", &[k]),
            None => Ok(()),
        }
    }

    /// Stops following `entry`, leaving its task to Slurm (the orchestrator is going away;
    /// `--resume` attaches again). Returns its `JOB_TASK` key.
    pub fn detach(&mut self, entry: &str) -> Option<String> {
        self.tracks.remove(entry).map(|t| t.key)
    }

    fn arrays(&self) -> Vec<String> {
        let set: BTreeSet<&str> = self.tracks.values().map(|t| t.array.as_str()).collect();
        set.into_iter().map(String::from).collect()
    }

    /// `scontrol hold` (pause: the pending tasks of every array wait; running ones go on) or
    /// `scontrol release` (resume). Arrays that have ended are skipped by Slurm.
    pub fn hold(&self, hold: bool) -> Result<(), SlurmError> {
        let pending: Vec<String> = self
            .tracks
            .values()
            .filter(|t| t.node.is_none())
            .map(|t| t.key.clone())
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        let verb = if hold { "hold" } else { "release" };
        let mut args = vec![verb];
        args.extend(pending.iter().map(String::as_str));
        control("scontrol", &args)
    }

    /// Moves a pending task: `top` = `scontrol top` (needs `enable_user_top` for
    /// non-admins), `up` = nice 0 (undoes a `down`), `down` = nice 100. Slurm's refusal is
    /// the error.
    pub fn move_task(&self, entry: &str, to: MoveTo) -> Result<(), SlurmError> {
        let Some(t) = self.tracks.get(entry) else {
            return Ok(());
        };
        if t.node.is_some() {
            return Err(SlurmError::Command {
                command: "move".into(),
                message: format!("task {} is already running", t.key),
            });
        }
        let job = format!("jobid={}", t.key);
        match to {
            MoveTo::Top => control("scontrol", &["top", &t.key]),
            MoveTo::Up => control("scontrol", &["update", &job, "nice=0"]),
            MoveTo::Down => control("scontrol", &["update", &job, "nice=100"]),
        }
    }

    /// Reads every task's new lines, asks Slurm for their states (one `squeue`, and one
    /// `sacct` when a task ended), and returns what changed; ended tasks are finished and no
    /// longer followed.
    pub async fn poll(&mut self) -> Vec<Update> {
        // `Placed` first: it announces the run, then come its records.
        let mut placed = Vec::new();
        let mut out = Vec::new();
        for (id, t) in self.tracks.iter_mut() {
            match t.tail.read_new() {
                Ok(n) => {
                    out.extend(n.steps.into_iter().map(|s| Update::Step(id.clone(), s)));
                    out.extend(
                        n.samples
                            .into_iter()
                            .map(|s| Update::Telemetry(id.clone(), s)),
                    );
                    out.extend(
                        n.warnings
                            .into_iter()
                            .map(|w| Update::Warning(Some(id.clone()), w)),
                    );
                }
                Err(e) => out.push(Update::Warning(
                    Some(id.clone()),
                    format!("cannot read {}: {e}", t.tail.path.display()),
                )),
            }
        }
        let arrays = self.arrays();
        let need: Vec<String> = self.tracks.values().map(|t| t.key.clone()).collect();
        let states = match self.backend.query(&arrays, &need).await {
            Ok(s) => s,
            Err(e) => {
                out.push(Update::Warning(None, format!("{e} (retrying)")));
                return out;
            }
        };
        let mut ended = Vec::new();
        for (id, t) in self.tracks.iter_mut() {
            let Some(st) = states.get(&t.key) else {
                t.unseen += 1;
                if t.unseen >= UNSEEN_POLLS {
                    ended.push((
                        id.clone(),
                        Phase::Ended {
                            status: RunStatus::Interrupted,
                            cause: Some(format!(
                                "Slurm no longer knows task {} (neither squeue nor sacct)",
                                t.key
                            )),
                            exit_code: None,
                        },
                    ));
                }
                continue;
            };
            t.unseen = 0;
            match map_state(&st.state, st.exit) {
                Phase::Queued => {}
                Phase::Running { .. } => {
                    if t.node.as_deref() != Some(st.node.as_str()) && !st.node.is_empty() {
                        t.node = Some(st.node.clone());
                        placed.push(Update::Placed(
                            id.clone(),
                            device_text(&t.key, Some(&st.node)),
                        ));
                    }
                }
                phase @ Phase::Ended { .. } => {
                    if st.exit.is_none() && st.state == "FAILED" && t.waited_exit < EXIT_CODE_POLLS
                    {
                        t.waited_exit += 1;
                        continue;
                    }
                    // A task that ran and ended between two polls was never seen running:
                    // its node comes from sacct, announced before its records.
                    if t.node.is_none() && !st.node.is_empty() {
                        t.node = Some(st.node.clone());
                        placed.push(Update::Placed(
                            id.clone(),
                            device_text(&t.key, Some(&st.node)),
                        ));
                    }
                    ended.push((id.clone(), phase));
                }
            }
        }
        for (id, phase) in ended {
            let Some(mut t) = self.tracks.remove(&id) else {
                continue;
            };
            if let Ok(n) = t.tail.read_new() {
                out.extend(n.steps.into_iter().map(|s| Update::Step(id.clone(), s)));
                out.extend(
                    n.samples
                        .into_iter()
                        .map(|s| Update::Telemetry(id.clone(), s)),
                );
            }
            out.push(Update::Done(id, Box::new(finish(t, phase))));
        }
        placed.extend(out);
        placed
    }
}

/// The result of an ended task, as [`crate::orchestrator::process::execute`] gives one: the
/// status from Slurm's state and exit code, the cause from the worker's stderr when the
/// worker itself failed, else from Slurm.
fn finish(t: Track, phase: Phase) -> RunResult {
    let Phase::Ended {
        status,
        cause,
        exit_code,
    } = phase
    else {
        return RunResult::default();
    };
    let (stderr_cause, note) = stderr_facts(&t.err);
    let cause = match status {
        RunStatus::Ok => None,
        // The worker exited non-zero by itself: its own line says why.
        RunStatus::Oom | RunStatus::Failed if exit_code.is_some_and(|c| c != 0) => {
            stderr_cause.or(cause)
        }
        _ => cause,
    };
    let outcome = RunOutcome {
        status: Some(status),
        cause,
        exit_code,
        wall_seconds: t.tail.last_t,
        worker_summary: t.tail.summary.clone(),
        worker_header: t.tail.header.clone(),
        telemetry_note: note,
    };
    RunResult {
        summary: summarize(&t.tail.steps, &t.tail.samples, t.warmup_steps, &outcome),
        header: t.tail.header,
        worker_summary: t.tail.summary,
        steps: t.tail.steps,
        samples: t.tail.samples,
    }
}
