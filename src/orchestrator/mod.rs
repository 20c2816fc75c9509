//! The orchestrator: runs a sweep's queue of [`RunSpec`]s as child processes, one at a time
//! per device slot (one slot per entry of `run.devices`; CUDA children get
//! `CUDA_VISIBLE_DEVICES` set to their GPU), takes [`Command`]s and emits [`Event`]s.
//! Both are serde enums so they can later cross a Unix socket as JSON.
//!
//! Each finished run is written to the [`Store`] in one transaction before its slot starts
//! the next run.

pub mod backend;
mod control;
pub mod fit;
mod launch;
mod messages;
pub mod preflight;
pub mod process;
pub mod queue;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

pub use backend::Backend;
pub use messages::{Command, Event, MoveTo, Request};
pub use process::{RunRequest, RunResult, WorkerCommand};
pub use queue::{
    Effect, Entry, EntryId, EntryState, KillReason, Queue, QueueError, QueueSnapshot, resolve_id,
    short_id,
};

use crate::grid::RunSpec;
use crate::spec::Device;
use crate::store::{FinishedRun, Store, StoreError};
use crate::summary::{RunStatus, RunSummary};
use backend::slurm::driver::{Driver, Submit, Update, device_text};
use control::{apply_effect, handle_command, submit_batch};
use fit::MemoryCheck;

/// One entry to run: `specs[spec_index]`, repeat `repeat` (0-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedRun {
    pub spec_index: usize,
    pub repeat: u32,
}

/// Every entry of a sweep of `n_specs` points and `repeats` repeats, repeat-major (every
/// point once, then every point again: drift spreads over the repeats), split by `done`:
/// entries it gives a status for are finished (not run again), the others are to run, in
/// this order.
pub fn plan_runs(
    n_specs: usize,
    repeats: u32,
    done: impl Fn(usize, u32) -> Option<RunStatus>,
) -> (Vec<PlannedRun>, Vec<(PlannedRun, RunStatus)>) {
    let mut runs = Vec::new();
    let mut finished = Vec::new();
    for repeat in 0..repeats {
        for spec_index in 0..n_specs {
            let pr = PlannedRun { spec_index, repeat };
            match done(spec_index, repeat) {
                Some(status) => finished.push((pr, status)),
                None => runs.push(pr),
            }
        }
    }
    (runs, finished)
}

/// A sweep ready to run.
#[derive(Debug, Clone)]
pub struct SweepPlan {
    pub sweep_id: i64,
    pub specs: Vec<RunSpec>,
    /// Repeats per point (for entry ids).
    pub repeats: u32,
    /// What to run, in launch order.
    pub runs: Vec<PlannedRun>,
    /// Finished entries skipped (resume), for the `SweepStarted` event.
    pub already_done: usize,
    pub devices: Vec<Device>,
    /// Entries that already have an outcome (a daemon restarting a sweep): kept in queue
    /// snapshots for display and `Retry`, never launched. May be empty.
    pub finished: Vec<(PlannedRun, RunStatus)>,
    /// Where the runs execute (local child processes, or Slurm).
    pub backend: Backend,
}

/// Orchestrator settings.
#[derive(Debug, Clone)]
pub struct OrchestratorConfig {
    pub worker: WorkerCommand,
    /// SIGTERM -> SIGKILL grace period.
    pub grace: Duration,
    pub telemetry_period: Duration,
    /// The measured-CUDA-context cache ([`fit::ContextCache`]; None: not cached).
    pub context_cache: Option<std::path::PathBuf>,
}

/// Entry id of a spec and repeat: the spec id, or `<id>.<n>` (1-based) when repeats > 1.
pub fn entry_id(spec_id: &str, repeat: u32, repeats: u32) -> EntryId {
    if repeats > 1 {
        format!("{spec_id}.{}", repeat + 1)
    } else {
        spec_id.to_string()
    }
}

enum Internal {
    Msg(EntryId, process::RunMsg),
    Done(EntryId, Box<RunResult>),
    /// A Slurm task left running when the orchestrator stops (its `JOB_TASK` key).
    Detached(EntryId, String),
}

struct InFlight {
    run_id: i64,
    kill: Option<oneshot::Sender<()>>,
}

/// The outcome of [`run_sweep`].
#[derive(Debug, Clone, PartialEq)]
pub struct SweepOutcome {
    pub counts: BTreeMap<String, usize>,
    /// True when ended by `Shutdown` (or the command channel's owner asked to stop).
    pub shutdown: bool,
}

/// Runs the plan to completion (or `Shutdown`). Commands arrive on `commands` (plain
/// [`Command`]s or [`Request`]s with a reply); events go to `events` (send errors are
/// ignored: nobody listening is fine). Store errors abort the sweep after killing running
/// children.
pub async fn run_sweep<C: Into<Request>>(
    plan: SweepPlan,
    store: &mut Store,
    cfg: &OrchestratorConfig,
    mut commands: mpsc::UnboundedReceiver<C>,
    events: mpsc::UnboundedSender<Event>,
) -> Result<SweepOutcome, StoreError> {
    let entries: Vec<Entry> = plan
        .runs
        .iter()
        .map(|r| Entry {
            id: entry_id(&plan.specs[r.spec_index].id, r.repeat, plan.repeats),
            spec_index: r.spec_index,
            repeat: r.repeat,
            state: EntryState::Queued,
            attempts: 0,
        })
        .collect();
    let done: Vec<Entry> = plan
        .finished
        .iter()
        .map(|(r, status)| Entry {
            id: entry_id(&plan.specs[r.spec_index].id, r.repeat, plan.repeats),
            spec_index: r.spec_index,
            repeat: r.repeat,
            state: EntryState::Done { status: *status },
            attempts: 1,
        })
        .collect();
    let devices = if plan.devices.is_empty() {
        vec![Device::Cpu]
    } else {
        plan.devices.clone()
    };
    if matches!(plan.backend, Backend::Local) {
        // Where the sweep ran, for the report's metadata; a failure here costs only that.
        let _ = store.set_sweep_meta(plan.sweep_id, &crate::report::meta::host_meta(&devices));
    }
    // Launch order = the order of the queued entries; finished ones are display-only.
    let mut all = entries.clone();
    all.extend(done.iter().cloned());
    // On Slurm every entry can be handed over at once: Slurm (`%N`) limits what runs.
    let mut slurm = match &plan.backend {
        Backend::Local => None,
        Backend::Slurm(b) => Some(Driver::new(
            (**b).clone(),
            plan.sweep_id,
            cfg.worker.program.clone(),
        )),
    };
    let n_slots = match slurm {
        Some(_) => all.len(),
        None => devices.len(),
    };
    let mut queue = Queue::new(all, n_slots);
    let emit = |e: Event| {
        let _ = events.send(e);
    };
    emit(Event::SweepStarted {
        sweep_id: plan.sweep_id,
        queued: entries.len(),
        already_done: plan.already_done,
    });
    for e in entries.iter().chain(&done) {
        let spec = &plan.specs[e.spec_index];
        emit(Event::RunQueued {
            id: e.id.clone(),
            spec_id: spec.id.clone(),
            label: spec.label(),
        });
    }
    let (itx, mut irx) = mpsc::unbounded_channel::<Internal>();
    let mut in_flight: HashMap<EntryId, InFlight> = HashMap::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut commands_open = true;
    let mut store_error: Option<StoreError> = None;
    let mut memory = MemoryCheck::new(cfg.context_cache.as_deref(), &devices);
    // Per launched entry: the predicted peak, the value a "max" axis was predicted at, the slot.
    let mut predicted: HashMap<EntryId, (Option<u64>, Option<u32>, usize)> = HashMap::new();

    loop {
        // Take every command already waiting before launching (e.g. a pause sent up front).
        while commands_open {
            match commands.try_recv() {
                Ok(cmd) => {
                    if let Some(e) = handle_command(
                        cmd.into(),
                        &mut queue,
                        &mut in_flight,
                        store,
                        &plan,
                        &events,
                        &mut slurm,
                        &itx,
                    ) {
                        store_error.get_or_insert(e);
                    }
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => commands_open = false,
            }
        }
        // Launch what can be launched (on Slurm: collect one submission).
        let mut batch: Vec<(Submit, i64, u32)> = Vec::new();
        while store_error.is_none() {
            let Some((slot, id)) = queue.next_launch() else {
                break;
            };
            let Some(entry) = queue.entry(&id).cloned() else {
                break;
            };
            let spec = &plan.specs[entry.spec_index];
            // The memory check and `"max"` probing are local: on Slurm the GPUs are on the nodes.
            let mut max_plan = None;
            if slurm.is_none() {
                let device = devices[slot];
                let prediction = memory.predict(spec, slot);
                let refusal = launch::refusal(&prediction, spec);
                let prediction = prediction.ok();
                predicted.insert(
                    id.clone(),
                    (
                        prediction.as_ref().map(|p| p.estimate.peak),
                        prediction.as_ref().and_then(|p| p.resolved).map(|(_, v)| v),
                        slot,
                    ),
                );
                if let Some((status, cause)) = refusal {
                    let status = queue.finish(&id, status);
                    *counts.entry(status.as_str().to_string()).or_default() += 1;
                    let summary = RunSummary {
                        status: Some(status),
                        cause: Some(cause),
                        predicted_peak_bytes: prediction.as_ref().map(|p| p.estimate.peak),
                        ..RunSummary::default()
                    };
                    let dev = device.to_string();
                    let run_id = launch::record_not_run(
                        store,
                        plan.sweep_id,
                        spec,
                        entry.repeat,
                        &dev,
                        &summary,
                    )
                    .map_err(|e| store_error = Some(e))
                    .ok();
                    emit(Event::RunFinished {
                        id,
                        run_id,
                        label: spec.label(),
                        summary: Box::new(summary),
                    });
                    emit(Event::QueueChanged {
                        queue: queue.snapshot(),
                    });
                    continue;
                }
                max_plan = prediction
                    .as_ref()
                    .and_then(|p| launch::MaxPlan::of(p, matches!(device, Device::Cuda(_))));
            }
            let argv = spec.train_args();
            if let Some(drv) = slurm.as_mut() {
                if let Some(a) = drv.take_attached(&id) {
                    let key = drv.attach(&id, &a, spec.config.warmup_steps);
                    in_flight.insert(
                        id.clone(),
                        InFlight {
                            run_id: a.run_id,
                            kill: None,
                        },
                    );
                    emit(Event::RunStarted {
                        id: id.clone(),
                        run_id: a.run_id,
                        label: spec.label(),
                        device: device_text(&key, None),
                        attempt: a.attempt.max(entry.attempts),
                    });
                    continue;
                }
                match store.start_run(plan.sweep_id, spec, entry.repeat, "slurm", &argv) {
                    Ok(run_id) => {
                        in_flight.insert(id.clone(), InFlight { run_id, kill: None });
                        let warmup_steps = spec.config.warmup_steps;
                        batch.push((
                            Submit {
                                entry: id,
                                argv,
                                warmup_steps,
                            },
                            run_id,
                            entry.attempts,
                        ));
                    }
                    Err(e) => {
                        store_error = Some(e);
                        queue.finish(&id, RunStatus::Interrupted);
                        break;
                    }
                }
                continue;
            }
            let device = devices[slot];
            let run_id = match store.start_run(
                plan.sweep_id,
                spec,
                entry.repeat,
                &device.to_string(),
                &argv,
            ) {
                Ok(r) => r,
                Err(e) => {
                    store_error = Some(e);
                    queue.finish(&id, RunStatus::Interrupted);
                    break;
                }
            };
            emit(Event::RunStarted {
                id: id.clone(),
                run_id,
                label: spec.label(),
                device: device.to_string(),
                attempt: entry.attempts,
            });
            let (ktx, krx) = oneshot::channel();
            in_flight.insert(
                id.clone(),
                InFlight {
                    run_id,
                    kill: Some(ktx),
                },
            );
            let req = RunRequest {
                worker: cfg.worker.clone(),
                argv,
                device,
                warmup_steps: spec.config.warmup_steps,
                grace: cfg.grace,
                telemetry_period: cfg.telemetry_period,
            };
            let itx = itx.clone();
            tokio::spawn(async move {
                let (mut req, mut krx, mut armed) = (req, krx, true);
                let (mut note, mut found) = (None, None);
                if let Some(mp) = max_plan {
                    match launch::resolve_max(&req, mp, &mut krx, &mut armed).await {
                        launch::Found::Value { value, note: n } => {
                            launch::set_arg(&mut req.argv, mp.axis.flag(), &value.to_string());
                            note = Some(n);
                            found = Some(value);
                        }
                        launch::Found::Outcome(r) => {
                            let _ = itx.send(Internal::Done(id, r));
                            return;
                        }
                    }
                }
                if !armed {
                    krx = oneshot::channel().1;
                }
                let (mtx, mut mrx) = mpsc::unbounded_channel();
                let fwd = {
                    let itx = itx.clone();
                    let id = id.clone();
                    tokio::spawn(async move {
                        while let Some(m) = mrx.recv().await {
                            let _ = itx.send(Internal::Msg(id.clone(), m));
                        }
                    })
                };
                let mut result = process::execute(req, krx, mtx).await;
                result.summary.max_value = found;
                if let Some(n) = note {
                    result.summary.note = Some(match result.summary.note.take() {
                        Some(old) => format!("{n}; {old}"),
                        None => n,
                    });
                }
                let _ = fwd.await;
                let _ = itx.send(Internal::Done(id, Box::new(result)));
            });
            emit(Event::QueueChanged {
                queue: queue.snapshot(),
            });
        }
        if let Some(drv) = slurm.as_mut()
            && !batch.is_empty()
        {
            submit_batch(
                drv,
                &batch,
                store,
                &plan,
                &queue,
                &itx,
                &events,
                &mut store_error,
            );
        }
        if store_error.is_some() && !queue.is_shutting_down() {
            for eff in queue.apply(&Command::Shutdown).unwrap_or_default() {
                let _ = apply_effect(
                    eff,
                    &mut in_flight,
                    store,
                    &plan,
                    &queue,
                    &mut slurm,
                    &itx,
                    &events,
                );
            }
        }
        if queue.is_finished() {
            break;
        }
        tokio::select! {
            cmd = commands.recv(), if commands_open => {
                let Some(cmd) = cmd else {
                    // Nobody can send commands any more: keep running the queue.
                    commands_open = false;
                    continue;
                };
                if let Some(e) = handle_command(cmd.into(), &mut queue, &mut in_flight, store, &plan, &events, &mut slurm, &itx) {
                    store_error.get_or_insert(e);
                }
            }
            _ = tokio::time::sleep(slurm.as_ref().map(Driver::poll_period).unwrap_or_default()),
                if slurm.as_ref().is_some_and(Driver::busy) => {
                let updates = match slurm.as_mut() {
                    Some(d) => d.poll().await,
                    None => Vec::new(),
                };
                for u in updates {
                    match u {
                        Update::Step(id, record) => emit(Event::Step { id, record }),
                        Update::Telemetry(id, sample) => emit(Event::Telemetry { id, sample }),
                        Update::Warning(id, message) => emit(Event::Warning { id, message }),
                        Update::Placed(id, device) => {
                            let Some(run_id) = in_flight.get(&id).map(|f| f.run_id) else { continue };
                            if let Err(e) = store.set_run_device(run_id, &device) {
                                store_error.get_or_insert(e);
                            }
                            let (label, attempt) = queue
                                .entry(&id)
                                .map(|e| (plan.specs[e.spec_index].label(), e.attempts))
                                .unwrap_or_default();
                            emit(Event::RunStarted { id, run_id, label, device, attempt });
                        }
                        Update::Done(id, result) => {
                            let _ = itx.send(Internal::Done(id, result));
                        }
                    }
                }
            }
            msg = irx.recv() => {
                let Some(msg) = msg else { break };
                match msg {
                    Internal::Detached(id, key) => {
                        let status = queue.finish(&id, RunStatus::Interrupted);
                        *counts.entry(status.as_str().to_string()).or_default() += 1;
                        let run_id = in_flight.remove(&id).map(|f| f.run_id);
                        let label = queue
                            .entry(&id)
                            .map(|e| plan.specs[e.spec_index].label())
                            .unwrap_or_default();
                        let summary = RunSummary {
                            status: Some(status),
                            cause: Some(format!(
                                "orchestrator stopped: Slurm task {key} goes on; `--resume` follows it again (`scancel {key}` stops it)"
                            )),
                            ..RunSummary::default()
                        };
                        emit(Event::RunFinished { id, run_id, label, summary: Box::new(summary) });
                        emit(Event::QueueChanged { queue: queue.snapshot() });
                    }
                    Internal::Msg(id, process::RunMsg::Step(record)) => emit(Event::Step { id, record }),
                    Internal::Msg(id, process::RunMsg::Telemetry(sample)) => emit(Event::Telemetry { id, sample }),
                    Internal::Msg(id, process::RunMsg::Warning(message)) => emit(Event::Warning { id: Some(id), message }),
                    Internal::Msg(id, process::RunMsg::Phase(record)) => emit(Event::Phase { id, record }),
                    Internal::Done(id, mut result) => {
                        let raw = result.summary.status.unwrap_or(RunStatus::Failed);
                        let status = queue.finish(&id, raw);
                        if status != raw {
                            result.summary.status = Some(status);
                            result.summary.cause = Some(match status {
                                RunStatus::Cancelled => "cancelled by user".to_string(),
                                _ => "orchestrator shut down while the run was in flight".to_string(),
                            });
                        }
                        if let Some((peak, at, slot)) = predicted.remove(&id) {
                            if let Some(p) = peak {
                                fit::annotate(&mut result.summary, p);
                                // The probes moved a "max" point off the predicted value: the
                                // prediction is of another point, so it has no error here.
                                if let (Some(found), Some(at)) = (result.summary.max_value, at)
                                    && found != at
                                {
                                    result.summary.prediction_error = None;
                                }
                            }
                            if let Some(w) = memory.learn(slot, &result) {
                                emit(Event::Warning { id: Some(id.clone()), message: w });
                            }
                        }
                        let fl = in_flight.remove(&id);
                        let run_id = fl.as_ref().map(|f| f.run_id);
                        if let Some(run_id) = run_id {
                            let fin = FinishedRun {
                                summary: &result.summary,
                                header: result.header.as_ref(),
                                worker_summary: result.worker_summary.as_ref(),
                                steps: &result.steps,
                                samples: &result.samples,
                            };
                            // The outcome is told (event, progress line) only once it is
                            // committed: a result that could not be recorded is reported as
                            // what the database holds, a run in flight that `--resume` re-runs.
                            if let Err(e) = store.finish_run(run_id, &fin) {
                                result.summary.status = Some(RunStatus::Interrupted);
                                result.summary.cause = Some(format!(
                                    "its result could not be recorded ({e}); `--resume` runs it again"
                                ));
                                store_error.get_or_insert(e);
                            }
                        }
                        let status = result.summary.status.unwrap_or(RunStatus::Failed);
                        *counts.entry(status.as_str().to_string()).or_default() += 1;
                        let label = queue
                            .entry(&id)
                            .map(|e| plan.specs[e.spec_index].label())
                            .unwrap_or_default();
                        emit(Event::RunFinished { id, run_id, label, summary: Box::new(result.summary.clone()) });
                        emit(Event::QueueChanged { queue: queue.snapshot() });
                    }
                }
            }
        }
    }
    let shutdown = queue.is_shutting_down();
    emit(Event::SweepFinished {
        sweep_id: plan.sweep_id,
        counts: counts.clone(),
        shutdown,
    });
    match store_error {
        Some(e) => Err(e),
        None => Ok(SweepOutcome { counts, shutdown }),
    }
}
