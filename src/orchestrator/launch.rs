//! What happens at a point's launch besides starting its worker: recording a point that is not
//! run (`predicted-oom`), and resolving a `"max"` axis by short probe runs.
//!
//! **Probes.** A point with `batch_size = "max"` (or `seq_len`) starts from the memory model's
//! largest value predicted to fit its limit and runs the worker at that value for
//! [`PROBE_STEPS`] steps under the same `--vram-limit`: if it ends `ok`, the value plus 1, 2,
//! 4, ... until one ends `oom` (or the engine's cap); if it ends `oom`, values below; then
//! bisection between the largest `ok` and the smallest `oom`, at most [`MAX_PROBES`] runs. A
//! probe that ends `ok` only because some of its steps were retried after an out-of-memory
//! (the engine's retry, see `engine::train`) counts as not fitting: `ok only with retries` in
//! the note. The point then runs in full at the value found, and its note records the
//! prediction and every probe. CPU points take
//! the predicted value without probing (a host out-of-memory is not something to provoke).

use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

use super::fit::{MaxAxis, Prediction};
use super::process::{self, RunRequest, RunResult};
use crate::grid::RunSpec;
use crate::spec::wire;
use crate::store::{FinishedRun, Store, StoreError};
use crate::summary::{RunStatus, RunSummary};

/// Probe runs per `"max"` point at most.
pub const MAX_PROBES: usize = 8;

/// Steps of a probe run: the first compiles kernels and allocates most of the peak; the next
/// two are the steady state the full run repeats (a step that runs out of memory once is
/// retried after the pool is trimmed, in probes and runs alike).
const PROBE_STEPS: &str = "3";

/// Record `summary` as the outcome of `spec` (repeat `repeat`, on `device`) without running
/// it; returns the run id.
///
/// Errors: the store cannot record it.
pub(super) fn record_not_run(
    store: &mut Store,
    sweep_id: i64,
    spec: &RunSpec,
    repeat: u32,
    device: &str,
    summary: &RunSummary,
) -> Result<i64, StoreError> {
    let run_id = store.start_run(sweep_id, spec, repeat, device, &spec.train_args())?;
    let fin = FinishedRun {
        summary,
        header: None,
        worker_summary: None,
        steps: &[],
        samples: &[],
    };
    store.finish_run(run_id, &fin)?;
    Ok(run_id)
}

/// Whether `spec` is recorded without running, with which status and cause: a point the
/// memory model puts over its limit (`predicted-oom`, see [`Prediction::refusal`]), or a
/// `"max"` point without a prediction (`failed`: no limit to search under).
pub(super) fn refusal(
    prediction: &Result<Prediction, String>,
    spec: &RunSpec,
) -> Option<(RunStatus, String)> {
    match prediction {
        Ok(p) => p
            .refusal(spec.verify_oom)
            .map(|c| (RunStatus::PredictedOom, c)),
        Err(e) if MaxAxis::of(spec).is_some() => Some((RunStatus::Failed, e.clone())),
        Err(_) => None,
    }
}

/// Set the value after `flag` in `argv` (appending the pair when absent).
pub(super) fn set_arg(argv: &mut Vec<String>, flag: &str, value: &str) {
    match argv.iter().position(|a| a == flag) {
        Some(i) if i + 1 < argv.len() => argv[i + 1] = value.to_string(),
        _ => {
            argv.push(flag.to_string());
            argv.push(value.to_string());
        }
    }
}

/// How to resolve a `"max"` point: the axis, the predicted value, the engine's cap, and
/// whether to confirm by probes (CUDA) or take the prediction (CPU).
#[derive(Debug, Clone, Copy)]
pub(super) struct MaxPlan {
    pub axis: MaxAxis,
    pub predicted: u32,
    pub cap: u32,
    pub probe: bool,
}

impl MaxPlan {
    /// The plan of a prediction with a `"max"` axis resolved to a value above 0.
    pub fn of(p: &Prediction, probe: bool) -> Option<MaxPlan> {
        match p.resolved {
            Some((axis, v)) if v > 0 => Some(MaxPlan {
                axis,
                predicted: v,
                cap: p.max_cap.max(v),
                probe,
            }),
            _ => None,
        }
    }
}

/// The value a `"max"` search found and how.
pub(super) enum Found {
    /// Run at `value`; `note` says how it was found.
    Value { value: u32, note: String },
    /// Nothing to run: the result to record (no value fits, a probe failed, or a kill).
    Outcome(Box<RunResult>),
}

/// Resolve `plan` for the worker request `base` (see the module docs). `kill` is the run's
/// kill request, honoured between and during probes; `armed` is cleared when it has been
/// consumed without a kill.
pub(super) async fn resolve_max(
    base: &RunRequest,
    plan: MaxPlan,
    kill: &mut oneshot::Receiver<()>,
    armed: &mut bool,
) -> Found {
    let key = plan.axis.key();
    if !plan.probe {
        return Found::Value {
            value: plan.predicted,
            note: format!(
                "{key} = max: {} (predicted; not probed on the CPU)",
                plan.predicted
            ),
        };
    }
    let mut probes: Vec<(u32, String)> = Vec::new();
    let mut probe = async |v: u32, probes: &mut Vec<(u32, String)>| -> Result<bool, Found> {
        let mut req = base.clone();
        set_arg(&mut req.argv, plan.axis.flag(), &v.to_string());
        set_arg(&mut req.argv, "--steps", PROBE_STEPS);
        set_arg(&mut req.argv, "--warmup-steps", "1");
        let (_never, prx) = oneshot::channel();
        let (sink, _drop) = mpsc::unbounded_channel();
        let fut = process::execute(req, prx, sink);
        tokio::pin!(fut);
        let r = loop {
            tokio::select! {
                r = &mut fut => break r,
                k = &mut *kill, if *armed => {
                    *armed = false;
                    if k.is_ok() {
                        let summary = RunSummary {
                            status: Some(RunStatus::Cancelled),
                            cause: Some(format!("cancelled while probing {key} = max")),
                            ..RunSummary::default()
                        };
                        return Err(Found::Outcome(Box::new(RunResult { summary, ..RunResult::default() })));
                    }
                }
            }
        };
        let status = r.summary.status.unwrap_or(RunStatus::Failed);
        // A probe that finished only by retrying steps after an out-of-memory is at the edge,
        // not inside it: the run would pay for a failed attempt at many of its steps.
        let retried = status == RunStatus::Ok
            && r.worker_summary
                .as_ref()
                .and_then(|w| wire::Summary::deserialize(w).ok())
                .is_some_and(|w| w.oom_retries > 0);
        probes.push((
            v,
            if retried {
                "ok only with retries".into()
            } else {
                status.to_string()
            },
        ));
        match status {
            RunStatus::Ok => Ok(!retried),
            RunStatus::Oom => Ok(false),
            _ => {
                let mut r = r;
                r.summary.cause = Some(format!(
                    "probe of {key} = {v} failed: {}",
                    r.summary.cause.clone().unwrap_or_default()
                ));
                Err(Found::Outcome(Box::new(r)))
            }
        }
    };
    // lo: largest value seen ok (0: none); hi: smallest seen oom (cap + 1: none).
    let (mut lo, mut hi) = (0u32, plan.cap.saturating_add(1));
    let start = plan.predicted.min(plan.cap);
    match probe(start, &mut probes).await {
        Err(f) => return f,
        Ok(true) => {
            lo = start;
            let mut step = 1u32;
            while probes.len() < MAX_PROBES && lo < plan.cap {
                let v = lo.saturating_add(step).min(plan.cap);
                match probe(v, &mut probes).await {
                    Err(f) => return f,
                    Ok(true) => {
                        lo = v;
                        step = step.saturating_mul(2);
                    }
                    Ok(false) => {
                        hi = v;
                        break;
                    }
                }
            }
        }
        Ok(false) => hi = start,
    }
    while hi - lo > 1 && probes.len() < MAX_PROBES {
        let mid = lo + (hi - lo) / 2;
        match probe(mid, &mut probes).await {
            Err(f) => return f,
            Ok(true) => lo = mid,
            Ok(false) => hi = mid,
        }
    }
    let list = probes
        .iter()
        .map(|(v, s)| format!("{v} {s}"))
        .collect::<Vec<_>>()
        .join(", ");
    let budget = if hi - lo > 1 {
        format!("; stopped after {MAX_PROBES} probes")
    } else {
        String::new()
    };
    if lo == 0 {
        let summary = RunSummary {
            status: Some(RunStatus::Oom),
            cause: Some(format!(
                "{key} = max: no value fits (predicted {}; probes: {list}{budget})",
                plan.predicted
            )),
            ..RunSummary::default()
        };
        return Found::Outcome(Box::new(RunResult {
            summary,
            ..RunResult::default()
        }));
    }
    Found::Value {
        value: lo,
        note: format!(
            "{key} = max: {lo} (predicted {}; probes: {list}{budget})",
            plan.predicted
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::set_arg;

    #[test]
    fn arguments_are_replaced_or_appended() {
        let mut a: Vec<String> = ["train", "--batch-size", "9", "--json"]
            .map(String::from)
            .to_vec();
        set_arg(&mut a, "--batch-size", "3");
        set_arg(&mut a, "--steps", "2");
        assert_eq!(a, ["train", "--batch-size", "3", "--json", "--steps", "2"]);
    }
}
