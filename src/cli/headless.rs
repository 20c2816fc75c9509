//! The progress printer of `lorascope run` without the dashboard (`--headless`, or when
//! stdin or stdout is not a terminal): one line per started run, per quarter of its steps,
//! per warning and per finished run, on stderr (stdout keeps the comparison table alone).

use std::collections::HashMap;
use std::io::Write;

use crate::orchestrator::Event;
use crate::report;
use crate::summary::RunStatus;

/// Prints one progress line per few steps and one per finished run (to stderr).
pub struct Headless {
    /// Steps per run.
    steps: u32,
    /// A step line every this many steps (and at the last step).
    every: u64,
    /// Runs to go in this invocation.
    total: usize,
    /// Runs started so far.
    started: usize,
    /// Each started run's number and label.
    pos: HashMap<String, (usize, String)>,
    /// Each entry's latest run id: a second `RunStarted` of the same run (a Slurm task
    /// that was queued and now runs on a node) keeps its number.
    run_of: HashMap<String, i64>,
}

impl Headless {
    /// A printer for runs of `steps` steps: a step line at each quarter.
    pub fn new(steps: u32) -> Headless {
        Headless {
            steps,
            every: u64::from((steps / 4).max(1)),
            total: 0,
            started: 0,
            pos: HashMap::new(),
            run_of: HashMap::new(),
        }
    }

    /// Prints what `e` tells people, if anything. Write errors are ignored.
    pub fn on(&mut self, e: &Event) {
        let mut err = std::io::stderr().lock();
        match e {
            Event::SweepStarted {
                sweep_id,
                queued,
                already_done,
            } => {
                self.total = *queued;
                let _ = if *already_done > 0 {
                    writeln!(
                        err,
                        "sweep {sweep_id}: {queued} run(s) to go, {already_done} already done"
                    )
                } else {
                    writeln!(err, "sweep {sweep_id}: {queued} run(s)")
                };
            }
            Event::RunStarted {
                id,
                label,
                device,
                run_id,
                ..
            } => {
                let n = match self.pos.get(id) {
                    Some((n, _)) if self.run_of.get(id) == Some(run_id) => *n,
                    _ => {
                        self.started += 1;
                        self.started
                    }
                };
                self.pos.insert(id.clone(), (n, label.clone()));
                self.run_of.insert(id.clone(), *run_id);
                let _ = writeln!(
                    err,
                    "[{n}/{}] {id} {label}: started on {device}",
                    self.total
                );
            }
            Event::Step { id, record }
                if record.step % self.every == 0 || record.step == u64::from(self.steps) =>
            {
                let (n, label) = self.pos.get(id).cloned().unwrap_or_default();
                let tps = if record.step_seconds > 0.0 {
                    format!("{:.0} tok/s", record.tokens as f64 / record.step_seconds)
                } else {
                    "-".into()
                };
                let loss = record
                    .loss
                    .map(|l| format!("{l:.4}"))
                    .unwrap_or_else(|| "-".into());
                let _ = writeln!(
                    err,
                    "[{n}/{}] {id} {label}: step {}/{}  loss {loss}  {tps}",
                    self.total, record.step, self.steps
                );
            }
            Event::Warning { id, message } => {
                let _ = writeln!(
                    err,
                    "warning{}: {message}",
                    id.as_ref().map(|i| format!(" ({i})")).unwrap_or_default()
                );
            }
            Event::RunFinished {
                id,
                summary: s,
                label,
                ..
            } => {
                // A point recorded without running (predicted-oom, a "max" point without a
                // limit) never started: it takes the next number here.
                let (n, label) = match self.pos.get(id) {
                    Some(p) => p.clone(),
                    None => {
                        self.started += 1;
                        (self.started, label.clone())
                    }
                };
                let status = s.status.unwrap_or(RunStatus::Failed);
                let detail = if status == RunStatus::Ok {
                    format!(
                        "{} tok/s, peak {}{}{}",
                        s.tokens_per_s
                            .map(|v| format!("{v:.1}"))
                            .unwrap_or_else(|| "-".into()),
                        report::human_bytes(s.peak_mem_bytes),
                        if s.peak_mem_kind.as_deref() == Some("rss") {
                            " RSS"
                        } else {
                            ""
                        },
                        s.mem_growth
                            .map(|g| format!(", {}", g.describe()))
                            .unwrap_or_default()
                    )
                } else {
                    s.cause.clone().unwrap_or_default()
                };
                let _ = writeln!(
                    err,
                    "[{n}/{}] {id} {label}: {status} ({detail}; {:.1} s)",
                    self.total, s.wall_seconds
                );
            }
            Event::Phase { id, record } => {
                let (n, label) = self.pos.get(id).cloned().unwrap_or_default();
                let _ = writeln!(
                    err,
                    "[{n}/{}] {id} {label}: {} ({:.1} s)",
                    self.total,
                    record.phase.describe(),
                    record.t_s
                );
            }
            Event::CommandRejected { command, reason } => {
                let _ = writeln!(err, "command {command:?} rejected: {reason}");
            }
            _ => {}
        }
    }
}
