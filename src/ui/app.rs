//! The dashboard's state: built from orchestrator [`Event`]s, changed by key presses
//! (`input`), and rendered by [`super::view`]. Nothing here does I/O or reads a
//! clock: the event loop sets [`App::now`] and carries out the [`Action`]s that keys return.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::grid::RunSpec;
use crate::orchestrator::{Command, EntryId, EntryState, Event, QueueSnapshot};
use crate::profile::Profile;
use crate::series::MAX_POINTS;
use crate::spec::wire::Phase;
use crate::summary::{RunStatus, RunSummary};
use crate::telemetry::TelemetrySample;

/// What the event loop must do after a key.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send to the orchestrator.
    Send(Command),
    /// Save the sweep as a profile at this path.
    Save(PathBuf),
    /// Leave the dashboard (after `Shutdown` was sent, if the sweep was still running).
    Quit,
}

/// The main views.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// The queue (with the live panel and the table beside / below when there is room).
    Queue,
    /// The live panels of the running runs.
    Live,
    /// The comparison table.
    Table,
    /// The Pareto chart of tokens/s against peak memory, and J/token bars.
    Chart,
    /// One run's configuration, summary and charts.
    Detail,
}

/// A dialog on top of the view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Modal {
    /// The key help.
    Help,
    /// Cancel this running entry?
    ConfirmCancel(EntryId),
    /// Stop the running sweep and quit?
    ConfirmQuit,
    /// File name being typed.
    SaveAs(String),
}

/// Columns of the comparison table (sortable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    /// The point (sorts by queue position).
    Point,
    /// [`RunSummary::tokens_per_s`].
    TokensPerS,
    /// [`RunSummary::s_per_10k_tokens`].
    SPer10k,
    /// [`RunSummary::peak_mem_bytes`].
    PeakMem,
    /// [`RunSummary::mean_w`].
    MeanW,
    /// [`RunSummary::j_per_token`].
    JPerToken,
    /// [`RunSummary::final_loss`].
    Loss,
    /// The run status (sorts by name).
    Status,
}

impl Column {
    /// Every column, in table order (the sort keys step through it).
    pub const ALL: [Column; 8] = [
        Column::Point,
        Column::TokensPerS,
        Column::SPer10k,
        Column::PeakMem,
        Column::MeanW,
        Column::JPerToken,
        Column::Loss,
        Column::Status,
    ];

    /// The column's header.
    pub fn title(self) -> &'static str {
        match self {
            Column::Point => "point",
            Column::TokensPerS => "tok/s",
            Column::SPer10k => "s/10k",
            Column::PeakMem => "peak mem",
            Column::MeanW => "mean W",
            Column::JPerToken => "J/tok",
            Column::Loss => "loss",
            Column::Status => "status",
        }
    }

    /// The numeric value of a summary in this column, if any.
    pub fn value(self, s: &RunSummary) -> Option<f64> {
        match self {
            Column::TokensPerS => s.tokens_per_s,
            Column::SPer10k => s.s_per_10k_tokens,
            Column::PeakMem => s.peak_mem_bytes.map(|b| b as f64),
            Column::MeanW => s.mean_w,
            Column::JPerToken => s.j_per_token,
            Column::Loss => s.final_loss,
            Column::Point | Column::Status => None,
        }
    }

    /// Whether a larger value is better (tokens/s); else smaller is better.
    pub fn higher_is_better(self) -> bool {
        self == Column::TokensPerS
    }
}

/// One step as the charts need it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepPoint {
    /// 1-based optimizer step.
    pub step: u64,
    /// The step's real tokens / its seconds (0 for a zero-length step).
    pub tokens_per_s: f64,
    /// Training loss, when reported.
    pub loss: Option<f64>,
    /// fp16 loss scale, when used.
    pub loss_scale: Option<f64>,
    /// Wall time of the step (s).
    pub step_seconds: f64,
}

/// What the dashboard knows about one queue entry.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunView {
    /// Index of its point in [`App::specs`].
    pub spec_index: usize,
    /// `cpu` / `cuda:N` once started.
    pub device: Option<String>,
    /// 1-based attempt of the latest start (retries count up).
    pub attempt: u32,
    /// [`App::now`] when it started.
    pub started_at: Option<f64>,
    /// [`App::now`] when it finished.
    pub finished_at: Option<f64>,
    /// The latest [`MAX_POINTS`] steps of the current attempt.
    pub steps: Vec<StepPoint>,
    /// The latest [`MAX_POINTS`] power samples (W).
    pub power: Vec<f64>,
    /// The latest telemetry sample (the gauges).
    pub last_sample: Option<TelemetrySample>,
    /// Its summary once finished.
    pub summary: Option<RunSummary>,
    /// The worker's latest phase and [`App::now`] when it began.
    pub phase: Option<(Phase, f64)>,
}

/// The dashboard state.
#[derive(Debug, Clone)]
pub struct App {
    /// The sweep's (profile's) name.
    pub name: String,
    /// The profile as loaded (to save the sweep).
    pub profile: Profile,
    /// The grid's points, in grid order.
    pub specs: Vec<RunSpec>,
    /// `run.steps`: steps per run.
    pub steps_total: u32,
    /// `run.vram_limit` (bytes): the scale of the memory gauge.
    pub vram_limit: Option<u64>,
    /// Host memory (bytes), the scale of the RSS gauge on CPU.
    pub mem_total: Option<u64>,
    /// The store's sweep id, once started.
    pub sweep_id: Option<i64>,
    /// The orchestrator's latest queue.
    pub queue: QueueSnapshot,
    /// What is known about each entry.
    pub runs: HashMap<EntryId, RunView>,
    /// Entries in the order they (last) started.
    pub start_order: Vec<EntryId>,
    /// The view shown.
    pub view: View,
    /// The selected entry of the queue (and the detail's run).
    pub selected: Option<EntryId>,
    /// The selected row of the comparison table.
    pub table_selected: Option<EntryId>,
    /// The table's sort column.
    pub sort: Column,
    /// Descending (for numbers: larger first).
    pub sort_desc: bool,
    /// The run the table's ratios divide by.
    pub baseline: Option<EntryId>,
    /// The dialog shown, if any.
    pub modal: Option<Modal>,
    /// Status line message and whether it is an error.
    pub message: Option<(String, bool)>,
    /// The sweep has finished (or the event stream ended).
    pub sweep_finished: bool,
    /// Quit requested; leave once the sweep has finished.
    pub quitting: bool,
    /// Seconds since the dashboard started (set by the event loop).
    pub now: f64,
    /// Whether anything changed since the last draw.
    pub dirty: bool,
    /// Colours on (false with `NO_COLOR`).
    pub color: bool,
    /// A client of the daemon (`lorascope attach`): quitting detaches and never stops the
    /// sweep; losing the terminal only ends this client.
    pub attached: bool,
    /// A recorded sweep browsed with `lorascope view`: keys that would change the queue say
    /// so and do nothing.
    pub read_only: bool,
    /// Seconds added to the event loop's clock: the daemon clock at attach time, so that
    /// elapsed times of runs that started before the attach are right.
    pub clock_base: f64,
}

fn tokens_per_s(tokens: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        tokens as f64 / secs
    } else {
        0.0
    }
}

impl App {
    /// A dashboard for `specs` (the grid of `profile`) named `name`.
    pub fn new(name: String, profile: Profile, specs: Vec<RunSpec>) -> App {
        let steps_total = profile.run.steps;
        let vram_limit = profile
            .run
            .vram_limit
            .as_deref()
            .and_then(crate::profile::parse_bytes);
        App {
            name,
            profile,
            specs,
            steps_total,
            vram_limit,
            mem_total: None,
            sweep_id: None,
            queue: QueueSnapshot {
                paused: false,
                shutting_down: false,
                queued: vec![],
                entries: vec![],
            },
            runs: HashMap::new(),
            start_order: vec![],
            view: View::Queue,
            selected: None,
            table_selected: None,
            sort: Column::Point,
            sort_desc: false,
            baseline: None,
            modal: None,
            message: None,
            sweep_finished: false,
            quitting: false,
            now: 0.0,
            dirty: true,
            color: true,
            attached: false,
            read_only: false,
            clock_base: 0.0,
        }
    }

    fn run_mut(&mut self, id: &str) -> &mut RunView {
        self.runs.entry(id.to_string()).or_default()
    }

    /// Updates the state from an orchestrator event.
    pub fn on_event(&mut self, e: &Event) {
        self.dirty = true;
        match e {
            Event::SweepStarted { sweep_id, .. } => self.sweep_id = Some(*sweep_id),
            Event::RunQueued { id, spec_id, .. } => {
                let idx = self.specs.iter().position(|s| &s.id == spec_id);
                let r = self.run_mut(id);
                if let Some(i) = idx {
                    r.spec_index = i;
                }
                if self.selected.is_none() {
                    self.selected = Some(id.clone());
                }
            }
            Event::RunStarted {
                id,
                device,
                attempt,
                ..
            } => {
                let now = self.now;
                let r = self.run_mut(id);
                r.device = Some(device.clone());
                r.attempt = *attempt;
                r.started_at = Some(now);
                r.finished_at = None;
                r.steps.clear();
                r.power.clear();
                r.last_sample = None;
                r.summary = None;
                r.phase = None;
                self.start_order.retain(|x| x != id);
                self.start_order.push(id.clone());
            }
            Event::Step { id, record } => {
                let r = self.run_mut(id);
                if r.steps.len() >= MAX_POINTS {
                    r.steps.remove(0);
                }
                r.steps.push(StepPoint {
                    step: record.step,
                    tokens_per_s: tokens_per_s(record.tokens, record.step_seconds),
                    loss: record.loss,
                    loss_scale: record.loss_scale,
                    step_seconds: record.step_seconds,
                });
            }
            Event::Telemetry { id, sample } => {
                let r = self.run_mut(id);
                if let Some(w) = sample.power_w {
                    if r.power.len() >= MAX_POINTS {
                        r.power.remove(0);
                    }
                    r.power.push(w);
                }
                r.last_sample = Some(sample.clone());
            }
            Event::Phase { id, record } => {
                let now = self.now;
                self.run_mut(id).phase = Some((record.phase, now));
            }
            Event::Warning { id, message } => {
                let who = id.as_deref().map(|i| format!("{i}: ")).unwrap_or_default();
                self.message = Some((format!("warning: {who}{message}"), true));
            }
            Event::RunFinished { id, summary, .. } => {
                let now = self.now;
                let r = self.run_mut(id);
                r.summary = Some((**summary).clone());
                r.finished_at = Some(now);
                if self.baseline.is_none() && summary.status == Some(RunStatus::Ok) {
                    self.baseline = Some(id.clone());
                }
            }
            Event::QueueChanged { queue } => {
                self.queue = queue.clone();
                for e in &queue.entries {
                    self.run_mut(&e.id).spec_index = e.spec_index;
                }
                if self.selected.is_none() {
                    self.selected = self.rows().first().cloned();
                }
            }
            Event::CommandRejected { reason, .. } => {
                self.message = Some((format!("rejected: {reason}"), true));
            }
            Event::SweepFinished { shutdown, .. } => {
                self.sweep_finished = true;
                // The comparison table is what a finished sweep is for: show it, unless the
                // user is reading a run's detail.
                if !*shutdown && matches!(self.view, View::Live | View::Queue) {
                    self.view = View::Table;
                }
                self.message = Some((
                    if *shutdown {
                        "sweep stopped".to_string()
                    } else {
                        "sweep finished: q to quit".to_string()
                    },
                    false,
                ));
            }
        }
    }

    /// The state of an entry.
    pub fn state(&self, id: &str) -> Option<EntryState> {
        self.queue
            .entries
            .iter()
            .find(|e| e.id == id)
            .map(|e| e.state)
    }

    /// Queue panel rows: started entries in start order, then queued ones in launch order,
    /// then skipped ones.
    pub fn rows(&self) -> Vec<EntryId> {
        let mut rows: Vec<EntryId> = self
            .start_order
            .iter()
            .filter(|id| {
                matches!(
                    self.state(id),
                    Some(EntryState::Running { .. }) | Some(EntryState::Done { .. })
                ) && self.state(id)
                    != Some(EntryState::Done {
                        status: RunStatus::Skipped,
                    })
            })
            .cloned()
            .collect();
        rows.extend(self.queue.queued.iter().cloned());
        for e in &self.queue.entries {
            if !rows.contains(&e.id) {
                rows.push(e.id.clone());
            }
        }
        rows
    }

    /// Entries running now.
    pub fn running(&self) -> Vec<EntryId> {
        self.queue
            .entries
            .iter()
            .filter(|e| matches!(e.state, EntryState::Running { .. }))
            .map(|e| e.id.clone())
            .collect()
    }

    /// The point an entry runs.
    pub fn spec_of(&self, id: &str) -> Option<&RunSpec> {
        let i = self.queue.entries.iter().find(|e| e.id == id)?.spec_index;
        self.specs.get(i)
    }

    /// Finished entries with a summary (skipped excluded), sorted by the chosen column.
    pub fn table_rows(&self) -> Vec<EntryId> {
        let mut rows: Vec<EntryId> = self
            .queue
            .entries
            .iter()
            .filter(
                |e| matches!(e.state, EntryState::Done { status } if status != RunStatus::Skipped),
            )
            .filter(|e| self.runs.get(&e.id).is_some_and(|r| r.summary.is_some()))
            .map(|e| e.id.clone())
            .collect();
        let col = self.sort;
        let summary = |id: &EntryId| self.runs.get(id).and_then(|r| r.summary.as_ref());
        let index = |id: &EntryId| {
            self.queue
                .entries
                .iter()
                .position(|e| &e.id == id)
                .unwrap_or(0)
        };
        rows.sort_by(|a, b| {
            let ord = match col {
                Column::Point => index(a).cmp(&index(b)),
                Column::Status => {
                    let st = |id: &EntryId| {
                        summary(id)
                            .and_then(|s| s.status)
                            .map(|s| s.as_str())
                            .unwrap_or("")
                    };
                    st(a).cmp(st(b))
                }
                _ => {
                    let va = summary(a).and_then(|s| col.value(s));
                    let vb = summary(b).and_then(|s| col.value(s));
                    match (va, vb) {
                        // Missing values always sort last.
                        (Some(x), Some(y)) => {
                            let o = x.partial_cmp(&y).unwrap_or(std::cmp::Ordering::Equal);
                            if self.sort_desc { o.reverse() } else { o }
                        }
                        (Some(_), None) => std::cmp::Ordering::Less,
                        (None, Some(_)) => std::cmp::Ordering::Greater,
                        (None, None) => std::cmp::Ordering::Equal,
                    }
                }
            };
            if matches!(col, Column::Point | Column::Status) && self.sort_desc {
                ord.reverse()
            } else {
                ord
            }
        });
        rows
    }

    /// The best value of a column over ok runs.
    pub fn best(&self, col: Column) -> Option<f64> {
        let vals = self
            .runs
            .values()
            .filter_map(|r| r.summary.as_ref())
            .filter(|s| s.status == Some(RunStatus::Ok))
            .filter_map(|s| col.value(s));
        if col.higher_is_better() {
            vals.fold(None, |m, v| Some(m.map_or(v, |m: f64| m.max(v))))
        } else {
            vals.fold(None, |m, v| Some(m.map_or(v, |m: f64| m.min(v))))
        }
    }

    /// Seconds left of a running run, from the mean of its last steps.
    pub fn run_eta(&self, id: &str) -> Option<f64> {
        let r = self.runs.get(id)?;
        let last = r.steps.last()?;
        let tail = &r.steps[r.steps.len().saturating_sub(10)..];
        let mean = tail.iter().map(|s| s.step_seconds).sum::<f64>() / tail.len() as f64;
        let left = u64::from(self.steps_total).saturating_sub(last.step);
        Some(mean * left as f64)
    }

    /// Typical duration of one run: the mean wall time of finished ok runs, else the
    /// projected total of a running one.
    pub fn typical_run_seconds(&self) -> Option<f64> {
        let ok: Vec<f64> = self
            .runs
            .values()
            .filter_map(|r| r.summary.as_ref())
            .filter(|s| s.status == Some(RunStatus::Ok))
            .map(|s| s.wall_seconds)
            .collect();
        if !ok.is_empty() {
            return Some(ok.iter().sum::<f64>() / ok.len() as f64);
        }
        self.running().iter().find_map(|id| {
            let eta = self.run_eta(id)?;
            let started = self.runs.get(id)?.started_at?;
            Some(self.now - started + eta)
        })
    }

    /// Seconds until a queued entry finishes (its ETA), assuming one slot per device.
    pub fn queued_eta(&self, id: &str) -> Option<f64> {
        let pos = self.queue.queued.iter().position(|x| x == id)?;
        let per = self.typical_run_seconds()?;
        let slots = self.profile.run.devices.len().max(1) as f64;
        let running_left = self
            .running()
            .iter()
            .filter_map(|r| self.run_eta(r))
            .fold(0.0_f64, f64::max);
        Some(running_left + per * ((pos / slots as usize) as f64 + 1.0))
    }

    /// Seconds until the whole queue is done.
    pub fn sweep_eta(&self) -> Option<f64> {
        match self.queue.queued.last() {
            Some(id) => self.queued_eta(id),
            None => self
                .running()
                .iter()
                .filter_map(|r| self.run_eta(r))
                .reduce(f64::max),
        }
    }

    /// The entry the queue commands act on: the table's selection in the table view.
    pub fn target(&self) -> Option<EntryId> {
        match self.view {
            View::Table => self.table_selected.clone(),
            _ => self.selected.clone(),
        }
    }

    /// Spec indices in run order (started, running, queued) and the skipped ones, for
    /// [`super::save::profile_text`].
    pub fn save_order(&self) -> (Vec<usize>, Vec<usize>) {
        let mut order = Vec::new();
        let mut skipped = Vec::new();
        for id in self.rows() {
            let Some(e) = self.queue.entries.iter().find(|e| e.id == id) else {
                continue;
            };
            if e.state
                == (EntryState::Done {
                    status: RunStatus::Skipped,
                })
            {
                if !skipped.contains(&e.spec_index) {
                    skipped.push(e.spec_index);
                }
            } else if !order.contains(&e.spec_index) {
                order.push(e.spec_index);
            }
        }
        // A point skipped in one repeat but run in another is kept.
        skipped.retain(|i| !order.contains(i));
        (order, skipped)
    }
}
