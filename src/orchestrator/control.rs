//! What the sweep loop does with a [`Command`]: apply it to the queue, carry out its
//! effects (kill a child, `scancel`/`scontrol` a Slurm task, record a skip), and submit a
//! batch of entries to Slurm.

use std::collections::HashMap;

use tokio::sync::mpsc;

use super::backend::slurm::driver::{Driver, Submit, device_text};
use super::process::RunResult;
use super::{
    Command, Effect, EntryId, Event, InFlight, Internal, KillReason, Queue, QueueError, Request,
    SweepPlan,
};
use crate::store::{Store, StoreError};
use crate::summary::{RunOutcome, RunStatus, summarize};

/// Applies a command to the queue, carries out its effects and reports the result (as an
/// event, and on the request's reply channel if it has one). On Slurm, `Pause`/`Resume` also
/// hold/release the pending tasks, `Move` of a task on Slurm is Slurm's (`scontrol top`,
/// nice), and `Skip` of one is a `Cancel` (`scancel`).
#[allow(clippy::too_many_arguments)]
pub(super) fn handle_command(
    req: Request,
    queue: &mut Queue,
    in_flight: &mut HashMap<EntryId, InFlight>,
    store: &Store,
    plan: &SweepPlan,
    events: &mpsc::UnboundedSender<Event>,
    slurm: &mut Option<Driver>,
    itx: &mpsc::UnboundedSender<Internal>,
) -> Option<StoreError> {
    let mut err = None;
    let Request {
        command: cmd,
        reply,
    } = req;
    // An id may be a unique prefix (the dashboard and `status` show 8 characters).
    let mut cmd = match queue.resolve(&cmd) {
        Ok(c) => c,
        Err(e) => {
            reject(reply, events, cmd, e);
            return None;
        }
    };
    if let Some(drv) = slurm.as_ref() {
        match &cmd {
            Command::Move { id, to } if drv.follows(id) => {
                let r = drv
                    .move_task(id, *to)
                    .map_err(|e| QueueError::Refused(e.to_string()));
                if let Some(reply) = reply {
                    let _ = reply.send(r.clone());
                }
                let _ = match r {
                    Ok(()) => events.send(Event::QueueChanged {
                        queue: queue.snapshot(),
                    }),
                    Err(e) => events.send(Event::CommandRejected {
                        command: cmd,
                        reason: e.to_string(),
                    }),
                };
                return None;
            }
            Command::Skip { id } if drv.follows(id) => cmd = Command::Cancel { id: id.clone() },
            _ => {}
        }
    }
    match queue.apply(&cmd) {
        Ok(effects) => {
            if let Some(r) = reply {
                let _ = r.send(Ok(()));
            }
            if let (Some(drv), Command::Pause | Command::Resume) = (slurm.as_ref(), &cmd)
                && let Err(e) = drv.hold(cmd == Command::Pause)
            {
                let _ = events.send(Event::Warning {
                    id: None,
                    message: e.to_string(),
                });
            }
            for eff in effects {
                if let Some(e) =
                    apply_effect(eff, in_flight, store, plan, queue, slurm, itx, events)
                {
                    err.get_or_insert(e);
                }
            }
            // A retry (or un-skip) is the point's latest state until it starts: recorded, so
            // that quitting first leaves it `queued` in the store and `--resume` runs it.
            if let Command::Retry { id } = &cmd
                && let Some(e) = queue.entry(id)
                && let Err(e) =
                    store.record_queued(plan.sweep_id, &plan.specs[e.spec_index], e.repeat)
            {
                err.get_or_insert(e);
            }
            let _ = events.send(Event::QueueChanged {
                queue: queue.snapshot(),
            });
        }
        Err(e) => reject(reply, events, cmd, e),
    }
    err
}

/// Carries out a queue effect; returns a store error if recording failed. A Slurm task is
/// cancelled with `scancel` (`Cancel`) or left running and no longer followed (`Shutdown`:
/// the orchestrator goes away, `--resume` follows it again).
#[allow(clippy::too_many_arguments)]
pub(super) fn apply_effect(
    eff: Effect,
    in_flight: &mut HashMap<EntryId, InFlight>,
    store: &Store,
    plan: &SweepPlan,
    queue: &Queue,
    slurm: &mut Option<Driver>,
    itx: &mpsc::UnboundedSender<Internal>,
    events: &mpsc::UnboundedSender<Event>,
) -> Option<StoreError> {
    match eff {
        Effect::Kill { id, reason, .. } => {
            if let Some(drv) = slurm.as_mut()
                && drv.follows(&id)
            {
                match reason {
                    KillReason::Cancel => {
                        if let Err(e) = drv.cancel(&id) {
                            let _ = events.send(Event::Warning {
                                id: Some(id),
                                message: e.to_string(),
                            });
                        }
                    }
                    KillReason::Shutdown => {
                        if let Some(key) = drv.detach(&id) {
                            let _ = itx.send(Internal::Detached(id, key));
                        }
                    }
                }
                return None;
            }
            if let Some(k) = in_flight.get_mut(&id).and_then(|f| f.kill.take()) {
                let _ = k.send(());
            }
            None
        }
        Effect::RecordSkipped { id } => {
            let e = queue.entry(&id)?;
            store
                .record_skipped(plan.sweep_id, &plan.specs[e.spec_index], e.repeat)
                .err()
        }
    }
}

/// Submits `batch` (entries with their run rows and attempts) as one Slurm array: records
/// each task in the store and announces it (`RunStarted`, device `slurm JOB_TASK`). A
/// refused submission ends each entry `failed` with Slurm's message.
#[allow(clippy::too_many_arguments)]
pub(super) fn submit_batch(
    drv: &mut Driver,
    batch: &[(Submit, i64, u32)],
    store: &Store,
    plan: &SweepPlan,
    queue: &Queue,
    itx: &mpsc::UnboundedSender<Internal>,
    events: &mpsc::UnboundedSender<Event>,
    store_error: &mut Option<StoreError>,
) {
    let submits: Vec<Submit> = batch.iter().map(|(s, _, _)| s.clone()).collect();
    match drv.submit(&submits) {
        Ok(array) => {
            for (i, (s, run_id, attempt)) in batch.iter().enumerate() {
                let key = format!("{array}_{i}");
                let device = device_text(&key, None);
                let r = store
                    .record_slurm_task(*run_id, &array, i as u32)
                    .and_then(|_| store.set_run_device(*run_id, &device));
                if let Err(e) = r {
                    store_error.get_or_insert(e);
                }
                let label = queue
                    .entry(&s.entry)
                    .map(|e| plan.specs[e.spec_index].label())
                    .unwrap_or_default();
                let _ = events.send(Event::RunStarted {
                    id: s.entry.clone(),
                    run_id: *run_id,
                    label,
                    device,
                    attempt: *attempt,
                });
            }
        }
        Err(e) => {
            let outcome = RunOutcome {
                status: Some(RunStatus::Failed),
                cause: Some(e.to_string()),
                ..RunOutcome::default()
            };
            for (s, _, _) in batch {
                let result = RunResult {
                    summary: summarize(&[], &[], 0, &outcome),
                    ..RunResult::default()
                };
                let _ = itx.send(Internal::Done(s.entry.clone(), Box::new(result)));
            }
        }
    }
    let _ = events.send(Event::QueueChanged {
        queue: queue.snapshot(),
    });
}

/// A command the queue refused: the error to its sender (if it waits for one) and a
/// `CommandRejected` event to the views.
fn reject(
    reply: Option<tokio::sync::oneshot::Sender<Result<(), QueueError>>>,
    events: &mpsc::UnboundedSender<Event>,
    command: Command,
    e: QueueError,
) {
    if let Some(r) = reply {
        let _ = r.send(Err(e.clone()));
    }
    let _ = events.send(Event::CommandRejected {
        command,
        reason: e.to_string(),
    });
}
