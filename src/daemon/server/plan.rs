//! Turning a job back into a runnable sweep: its plan from the queue snapshot the daemon
//! last saved (a restart keeps the order, skips and retries; runs that were in flight go
//! first), or, for a job that never started or whose snapshot no longer matches the grid,
//! from the store. Earlier results become history events, so an attached dashboard shows
//! them.

use super::log;
use crate::daemon::error::DaemonError;
use crate::daemon::protocol::Stamped;
use crate::daemon::state::{History, Job};
use crate::grid::expand_profile;
use crate::orchestrator::{
    EntryState, Event, PlannedRun, QueueSnapshot, SweepPlan, backend, entry_id, plan_runs,
};
use crate::profile;
use crate::store::Store;
use crate::summary::RunStatus;

/// A job ready to run.
pub(super) struct Prepared {
    pub plan: SweepPlan,
    pub store: Store,
    pub history: History,
}

/// Entries to run and entries finished, from a queue snapshot: those that were running (or
/// interrupted) first unless the store has a result for them (`stored`), then the queue in
/// its last order.
fn from_snapshot(
    snap: &QueueSnapshot,
    stored: impl Fn(usize, u32) -> Option<RunStatus>,
) -> (Vec<PlannedRun>, Vec<(PlannedRun, RunStatus)>) {
    let mut runs = Vec::new();
    let mut finished = Vec::new();
    for e in &snap.entries {
        let pr = PlannedRun {
            spec_index: e.spec_index,
            repeat: e.repeat,
        };
        match e.state {
            EntryState::Running { .. }
            | EntryState::Done {
                status: RunStatus::Interrupted,
            } => match stored(e.spec_index, e.repeat) {
                // It finished before the daemon died: keep that result.
                Some(st) => finished.push((pr, st)),
                None => runs.push(pr),
            },
            EntryState::Done { status } => finished.push((pr, status)),
            EntryState::Queued => {}
        }
    }
    for id in &snap.queued {
        if let Some(e) = snap.entries.iter().find(|e| &e.id == id) {
            runs.push(PlannedRun {
                spec_index: e.spec_index,
                repeat: e.repeat,
            });
        }
    }
    (runs, finished)
}

/// Builds the plan of `job` (see the module doc); `now` is the daemon clock that the
/// history events are stamped with. Rows the store left `running` (an earlier daemon died)
/// are marked `interrupted` first.
///
/// Errors: the profile text no longer parses, its devices cannot be resolved, or the
/// results database fails.
pub(super) fn prepare(job: &Job, now: f64) -> Result<Prepared, DaemonError> {
    let info = &job.info;
    let p = profile::parse_str(&info.profile_source, &info.profile_path)?;
    let specs = expand_profile(&p, &info.base_dir);
    let repeats = p.run.repeats;
    let devices = backend::devices(&p).map_err(DaemonError::Devices)?;
    let name = p
        .name
        .clone()
        .unwrap_or_else(|| format!("sweep {}", info.sweep_id));
    let mut backend = backend::for_profile(
        &p,
        &name,
        &info.base_dir,
        &info.db,
        specs.len() * repeats as usize,
    )?;
    let store = Store::open(&info.db)?;
    let sweep = info.sweep_id;
    // On Slurm, rows whose task is recorded are followed again rather than marked.
    let (interrupted, _) = backend::resume_rows(&mut backend, &store, sweep, &specs, repeats)?;
    if interrupted > 0 {
        log(&format!(
            "sweep {sweep}: {interrupted} run(s) left running by an earlier daemon marked interrupted; they run again"
        ));
    }
    let statuses = store.latest_statuses(sweep)?;
    let stored = |spec: usize, repeat: u32| {
        statuses
            .get(&(specs[spec].id.clone(), repeat))
            .copied()
            .filter(|st| st.is_finished(job.retry_failed))
    };
    let valid = |snap: &QueueSnapshot| {
        snap.entries.iter().all(|e| {
            e.spec_index < specs.len()
                && entry_id(&specs[e.spec_index].id, e.repeat, repeats) == e.id
        })
    };
    let (runs, finished) = match &job.queue {
        Some(snap) if valid(snap) => from_snapshot(snap, stored),
        _ => plan_runs(specs.len(), repeats, stored),
    };
    // Earlier results, so that an attached dashboard shows them.
    let mut history = History::new(info.clone(), p.run.steps);
    let rows = store.runs(sweep)?;
    for (pr, _) in &finished {
        let spec = &specs[pr.spec_index];
        let Some(row) = rows
            .iter()
            .filter(|r| r.spec_id == spec.id && r.repeat == pr.repeat)
            .max_by_key(|r| r.id)
        else {
            continue;
        };
        let Some(summary) = row.summary.clone() else {
            continue;
        };
        let id = entry_id(&spec.id, pr.repeat, repeats);
        for event in [
            Event::RunStarted {
                id: id.clone(),
                run_id: row.id,
                label: spec.label(),
                device: row.device.clone(),
                attempt: 1,
            },
            Event::RunFinished {
                id,
                run_id: Some(row.id),
                label: spec.label(),
                summary: Box::new(summary),
            },
        ] {
            history.record(&Stamped { t: now, event });
        }
    }
    Ok(Prepared {
        plan: SweepPlan {
            sweep_id: sweep,
            specs,
            repeats,
            already_done: finished.len(),
            runs,
            devices,
            finished,
            backend,
        },
        store,
        history,
    })
}
