//! Reading the worker's JSON lines (the records of [`crate::spec::wire`]) and the per-run
//! summary computed from them plus telemetry.
//!
//! Throughput is computed here from the step records, not taken from the worker: the timed
//! window is every step after the first `warmup_steps` (if `steps <= warmup_steps`, all steps,
//! and [`RunSummary::note`] says so).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::spec::wire::{self, MemoryReport, PhaseRecord, StepRecord};
use crate::telemetry::TelemetrySample;

mod growth;
mod samples;

use samples::{integrate, interp};

pub use growth::{
    GrowthSource, MIN_GROWTH_BYTES, MIN_GROWTH_FRACTION, MemoryGrowth, memory_growth,
};

/// How a run ended (or that it is still running / was skipped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// In flight (or its row was left by a killed orchestrator).
    Running,
    /// Finished all its steps.
    Ok,
    /// Ran out of memory (the worker exited with the OOM exit code of [`crate::spec::wire`]).
    Oom,
    /// Not run: the memory model predicted it over its VRAM limit by more than the model's
    /// stated error (`run.verify_oom = true` runs such points instead).
    #[serde(rename = "predicted-oom")]
    PredictedOom,
    /// Any other failure: another non-zero exit code, or killed by a signal.
    Failed,
    /// Cancelled by the user.
    Cancelled,
    /// The orchestrator stopped while it was in flight.
    Interrupted,
    /// Skipped by the user before it ran.
    Skipped,
    /// Queued again by the user (retry, un-skip) and not started before the sweep stopped:
    /// `--resume` runs it.
    Queued,
}

impl RunStatus {
    /// The lower-case name, as stored and printed (`ok`, `oom`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Ok => "ok",
            RunStatus::Oom => "oom",
            RunStatus::PredictedOom => "predicted-oom",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
            RunStatus::Interrupted => "interrupted",
            RunStatus::Skipped => "skipped",
            RunStatus::Queued => "queued",
        }
    }

    /// The status named `s` (an [`RunStatus::as_str`] name), else `None`.
    pub fn parse(s: &str) -> Option<RunStatus> {
        Some(match s {
            "running" => RunStatus::Running,
            "ok" => RunStatus::Ok,
            "oom" => RunStatus::Oom,
            "predicted-oom" => RunStatus::PredictedOom,
            "failed" => RunStatus::Failed,
            "cancelled" => RunStatus::Cancelled,
            "interrupted" => RunStatus::Interrupted,
            "skipped" => RunStatus::Skipped,
            "queued" => RunStatus::Queued,
            _ => return None,
        })
    }

    /// Whether `--resume` treats a point whose latest run has this status as done.
    /// Policy: ok, oom, failed and cancelled are outcomes (a failure or OOM is deterministic;
    /// a cancel was a person's choice) and are not re-run; interrupted, skipped, queued (a
    /// retry or un-skip the sweep stopped before) and running (a row left by a killed
    /// orchestrator) are re-run. `--retry-failed` also re-runs failed,
    /// cancelled and predicted-oom points (the last after `run.verify_oom = true`, say).
    pub fn is_finished(self, retry_failed: bool) -> bool {
        match self {
            RunStatus::Ok | RunStatus::Oom => true,
            RunStatus::Failed | RunStatus::Cancelled | RunStatus::PredictedOom => !retry_failed,
            RunStatus::Running
            | RunStatus::Interrupted
            | RunStatus::Skipped
            | RunStatus::Queued => false,
        }
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A classified stdout line of the worker.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerLine {
    /// The `header` record, as JSON.
    Header(Value),
    /// A `step` record (`t` as written: 0 unless the worker stamps its own clock).
    Step(StepRecord),
    /// A `telemetry` record of a worker that samples itself (`--telemetry`).
    Telemetry(TelemetrySample),
    /// A `phase` record (what the worker is doing before and between steps).
    Phase(PhaseRecord),
    /// The `summary` record, as JSON.
    Summary(Value),
    /// A JSON object of another (or no) type: ignored.
    Other(Value),
    /// Not JSON, or a malformed step: kept as a warning.
    Warning(String),
}

/// Classifies one stdout line by its `"type"` (the tags of [`wire::Event`]); lenient:
/// unknown fields and types are ignored. A step's `t` is kept as written (a local caller
/// stamps the arrival time over it).
pub fn parse_worker_line(line: &str) -> WorkerLine {
    let trimmed = line.trim();
    let v: Value = match serde_json::from_str(trimmed) {
        Ok(v @ Value::Object(_)) => v,
        _ => return WorkerLine::Warning(format!("non-JSON worker output: {trimmed}")),
    };
    match v.get("type").and_then(Value::as_str) {
        Some("header") => WorkerLine::Header(v),
        Some("summary") => WorkerLine::Summary(v),
        Some("step") => match serde_json::from_value::<StepRecord>(v) {
            Ok(s) => WorkerLine::Step(s),
            Err(e) => WorkerLine::Warning(format!("malformed step line ({e}): {trimmed}")),
        },
        Some("telemetry") => match serde_json::from_value::<TelemetrySample>(v) {
            Ok(s) => WorkerLine::Telemetry(s),
            Err(e) => WorkerLine::Warning(format!("malformed telemetry line ({e}): {trimmed}")),
        },
        // A phase this reader does not know (a newer worker) is an unknown line.
        Some("phase") => match serde_json::from_value::<PhaseRecord>(v.clone()) {
            Ok(p) => WorkerLine::Phase(p),
            Err(_) => WorkerLine::Other(v),
        },
        _ => WorkerLine::Other(v),
    }
}

/// The per-run result. Rates are over the timed window; peaks over the whole run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// How the run ended (`None` until known).
    pub status: Option<RunStatus>,
    /// Why it is not ok (the worker's last stderr line, "cancelled by user", ...).
    pub cause: Option<String>,
    /// The worker's exit code, if it exited.
    pub exit_code: Option<i32>,
    /// Step records received.
    pub steps: u64,
    /// Steps in the timed window.
    pub timed_steps: u64,
    /// Real tokens in the timed window.
    pub tokens: u64,
    /// Tokens including padding in the timed window (`padded_tokens` of a step, else its
    /// `tokens`).
    pub padded_tokens: u64,
    /// Sum of `step_seconds` over the timed window (s).
    pub timed_seconds: f64,
    /// `tokens / timed_seconds` (tokens/s).
    pub tokens_per_s: Option<f64>,
    /// `padded_tokens / timed_seconds` (tokens/s).
    pub padded_tokens_per_s: Option<f64>,
    /// Seconds per 10,000 real tokens.
    pub s_per_10k_tokens: Option<f64>,
    /// The headline peak: process VRAM, else device VRAM, else peak RSS (bytes).
    pub peak_mem_bytes: Option<u64>,
    /// `vram_process`, `vram_device` or `rss`.
    pub peak_mem_kind: Option<String>,
    /// Memory still rising over the timed window ([`memory_growth`]'s rule): the peak is then
    /// not the point's steady cost, and reports show the rise instead.
    pub mem_growth: Option<MemoryGrowth>,
    /// Peak device memory of the worker's process (NVML, else the worker's own report),
    /// less the `--vram-limit` reservation (bytes).
    pub peak_vram_process_bytes: Option<u64>,
    /// Peak device memory used by all processes, less the reservation (bytes).
    pub peak_vram_device_bytes: Option<u64>,
    /// Peak resident set size of the worker (VmRSS / VmHWM, or its own report) (bytes).
    pub peak_rss_bytes: Option<u64>,
    /// Mean board power over the timed window's samples (all samples if none fall in it) (W).
    pub mean_w: Option<f64>,
    /// Maximum of the same samples (W).
    pub max_w: Option<f64>,
    /// Energy over the timed window (J), from `energy_source`.
    pub energy_j: Option<f64>,
    /// `counter` (NVML total-energy counter) or `integrated` (power samples, trapezoid rule).
    pub energy_source: Option<String>,
    /// Energy from integrated power, always computed when power was sampled (J).
    pub energy_j_integrated: Option<f64>,
    /// `energy_j / tokens` (J per real token).
    pub j_per_token: Option<f64>,
    /// The loss of the last step that reported one.
    pub final_loss: Option<f64>,
    /// fp16 steps skipped by the loss scaler (whole run).
    pub skipped_steps: u64,
    /// Wall time from spawn to exit (s).
    pub wall_seconds: f64,
    /// `--vram-limit` of the run (bytes), as the worker reported it.
    pub vram_limit_bytes: Option<u64>,
    /// Device memory the worker reserved to emulate `--vram-limit` (bytes). Already subtracted
    /// from `peak_vram_process_bytes`, `peak_vram_device_bytes` and `peak_mem_bytes`.
    pub vram_reserved_bytes: Option<u64>,
    /// Optimizer state bytes (device + managed + host), as the worker reported them.
    pub optimizer_state_bytes: Option<u64>,
    /// The part of `optimizer_state_bytes` in CUDA unified memory (paged optimizers).
    pub optimizer_state_managed_bytes: Option<u64>,
    /// The memory model's predicted peak (process VRAM for CUDA runs, peak RSS for CPU
    /// runs), bytes ([`crate::engine::memory`]).
    #[serde(default)]
    pub predicted_peak_bytes: Option<u64>,
    /// `measured / predicted - 1` for that peak (0.05: measured 5% above the prediction).
    #[serde(default)]
    pub prediction_error: Option<f64>,
    /// The value a `"max"` axis resolved to (batch size or sequence length) for the run that
    /// used it: the probes' result, or the prediction on the CPU.
    #[serde(default)]
    pub max_value: Option<u32>,
    /// Notes: e.g. "steps <= warmup_steps: all steps timed", telemetry unavailability.
    pub note: Option<String>,
}

fn push_note(note: &mut Option<String>, s: &str) {
    match note {
        Some(n) => {
            n.push_str("; ");
            n.push_str(s);
        }
        None => *note = Some(s.to_string()),
    }
}

/// Inputs of [`summarize`] besides the records.
#[derive(Debug, Clone, Default)]
pub struct RunOutcome {
    /// How the run ended, as the orchestrator classified it.
    pub status: Option<RunStatus>,
    /// Why it is not ok.
    pub cause: Option<String>,
    /// The worker's exit code.
    pub exit_code: Option<i32>,
    /// Wall time from spawn to exit (s).
    pub wall_seconds: f64,
    /// The worker's `summary` line, if any.
    pub worker_summary: Option<Value>,
    /// The worker's `header` line, if any (for the VRAM reservation when no summary came).
    pub worker_header: Option<Value>,
    /// Telemetry notes (e.g. "NVML unavailable: ...").
    pub telemetry_note: Option<String>,
}

/// Computes the per-run summary from step records (with arrival times), telemetry samples
/// (sorted by `t`) and the outcome.
pub fn summarize(
    steps: &[StepRecord],
    samples: &[TelemetrySample],
    warmup_steps: u32,
    outcome: &RunOutcome,
) -> RunSummary {
    let mut s = RunSummary {
        status: outcome.status,
        cause: outcome.cause.clone(),
        exit_code: outcome.exit_code,
        steps: steps.len() as u64,
        wall_seconds: outcome.wall_seconds,
        ..Default::default()
    };
    let w = warmup_steps as usize;
    let timed: &[StepRecord] = if steps.len() > w {
        &steps[w..]
    } else {
        if !steps.is_empty() {
            push_note(&mut s.note, "steps <= warmup_steps: all steps timed");
        }
        steps
    };
    s.timed_steps = timed.len() as u64;
    s.tokens = timed.iter().map(|r| r.tokens).sum();
    s.padded_tokens = timed
        .iter()
        .map(|r| r.padded_tokens.unwrap_or(r.tokens))
        .sum();
    s.timed_seconds = timed.iter().map(|r| r.step_seconds).sum();
    if s.timed_seconds > 0.0 && s.tokens > 0 {
        s.tokens_per_s = Some(s.tokens as f64 / s.timed_seconds);
        s.padded_tokens_per_s = Some(s.padded_tokens as f64 / s.timed_seconds);
        s.s_per_10k_tokens = Some(s.timed_seconds * 10_000.0 / s.tokens as f64);
    }
    s.final_loss = steps.iter().rev().find_map(|r| r.loss);
    s.skipped_steps = steps.iter().filter(|r| r.skipped).count() as u64;

    // Peaks over the whole run.
    s.peak_vram_process_bytes = samples.iter().filter_map(|x| x.proc_mem_bytes).max();
    s.peak_vram_device_bytes = samples.iter().filter_map(|x| x.mem_used_bytes).max();
    let ws = outcome
        .worker_summary
        .as_ref()
        .map(|v| wire::Summary::deserialize(v).unwrap_or_default());
    s.peak_rss_bytes = samples
        .iter()
        .flat_map(|x| [x.rss_bytes, x.hwm_bytes])
        .flatten()
        .chain(ws.as_ref().and_then(|w| w.peak_rss_bytes))
        .max();
    if s.peak_vram_process_bytes.is_none() {
        s.peak_vram_process_bytes = ws.as_ref().and_then(|w| w.peak_vram_bytes);
    }
    if let Some(n) = ws.as_ref().map(|w| w.oom_retries).filter(|&n| n > 0) {
        let steps = if n == 1 { "step" } else { "steps" };
        push_note(
            &mut s.note,
            &format!(
                "{n} {steps} ran out of memory once and ran again after the CUDA pool's cached blocks were freed"
            ),
        );
    }
    // Worker-reported memory facts: from the summary, else the header (a run that ran out of
    // memory after starting has a header but no summary).
    let header_memory = outcome
        .worker_header
        .as_ref()
        .map(|v| MemoryReport::deserialize(v).unwrap_or_default());
    let reported = |field: fn(&MemoryReport) -> Option<u64>| {
        ws.as_ref()
            .and_then(|w| field(&w.memory))
            .or_else(|| header_memory.as_ref().and_then(field))
    };
    s.vram_limit_bytes = reported(|m| m.vram_limit_bytes);
    s.vram_reserved_bytes = reported(|m| m.vram_reserved_bytes);
    s.optimizer_state_managed_bytes = reported(|m| m.optimizer_state_managed_bytes);
    s.optimizer_state_bytes = match (
        reported(|m| m.optimizer_state_device_bytes),
        s.optimizer_state_managed_bytes,
        reported(|m| m.optimizer_state_host_bytes),
    ) {
        (None, None, None) => None,
        (d, m, h) => Some(d.unwrap_or(0) + m.unwrap_or(0) + h.unwrap_or(0)),
    };
    // The --vram-limit reservation is an ordinary allocation of the worker, so NVML counts it
    // in process and device memory: take it out, leaving what the run itself used.
    if let Some(r) = s.vram_reserved_bytes.filter(|&r| r > 0) {
        s.peak_vram_process_bytes = s.peak_vram_process_bytes.map(|v| v.saturating_sub(r));
        s.peak_vram_device_bytes = s.peak_vram_device_bytes.map(|v| v.saturating_sub(r));
        push_note(
            &mut s.note,
            &format!(
                "VRAM peaks exclude the {:.0} MiB --vram-limit reservation; capacity emulated, bandwidth and compute are not",
                r as f64 / 1048576.0
            ),
        );
    }
    (s.peak_mem_bytes, s.peak_mem_kind) = if let Some(v) = s.peak_vram_process_bytes {
        (Some(v), Some("vram_process".into()))
    } else if let Some(v) = s.peak_vram_device_bytes {
        (Some(v), Some("vram_device".into()))
    } else if let Some(v) = s.peak_rss_bytes {
        (Some(v), Some("rss".into()))
    } else {
        (None, None)
    };

    // The timed window in arrival seconds.
    let window = timed.first().zip(timed.last()).map(|(first, last)| {
        let t_start = if steps.len() > w && w > 0 {
            steps[w - 1].t
        } else {
            (first.t - first.step_seconds).max(0.0)
        };
        (t_start, last.t)
    });
    s.mem_growth = growth::of_run(timed, window, samples);
    if let Some(g) = s.mem_growth {
        push_note(
            &mut s.note,
            &format!(
                "{}: still rising, so the peak is not the point's cost",
                g.describe()
            ),
        );
    }

    // Power and energy over the timed window.
    if let Some((t_start, t_end)) = window {
        let power: Vec<(f64, f64)> = samples
            .iter()
            .filter_map(|x| x.power_w.map(|p| (x.t, p)))
            .collect();
        let in_window: Vec<f64> = power
            .iter()
            .filter(|p| p.0 >= t_start && p.0 <= t_end)
            .map(|p| p.1)
            .collect();
        let pw: Vec<f64> = if in_window.is_empty() {
            power.iter().map(|p| p.1).collect()
        } else {
            in_window
        };
        if !pw.is_empty() {
            s.mean_w = Some(pw.iter().sum::<f64>() / pw.len() as f64);
            s.max_w = pw.iter().copied().reduce(f64::max);
        }
        s.energy_j_integrated = integrate(&power, t_start, t_end);
        let counter: Vec<(f64, f64)> = samples
            .iter()
            .filter_map(|x| x.energy_mj.map(|e| (x.t, e)))
            .collect();
        let from_counter = if counter.len() >= 2 {
            match (interp(&counter, t_start), interp(&counter, t_end)) {
                (Some(a), Some(b)) if b >= a => Some((b - a) / 1000.0),
                _ => None,
            }
        } else {
            None
        };
        (s.energy_j, s.energy_source) = match (from_counter, s.energy_j_integrated) {
            (Some(e), _) => (Some(e), Some("counter".into())),
            (None, Some(e)) => (Some(e), Some("integrated".into())),
            _ => (None, None),
        };
        if let Some(e) = s.energy_j
            && s.tokens > 0
        {
            s.j_per_token = Some(e / s.tokens as f64);
        }
    }
    if let Some(n) = &outcome.telemetry_note {
        push_note(&mut s.note, n);
    }
    s
}

/// Median, min and max of a set of values (for repeats).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    /// The median.
    pub median: f64,
    /// The smallest value.
    pub min: f64,
    /// The largest value.
    pub max: f64,
    /// How many (finite) values.
    pub n: usize,
}

impl Spread {
    /// `None` for no values. The median of an even count is the mean of the middle two.
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(i: u64, t: f64, secs: f64, tokens: u64) -> StepRecord {
        StepRecord {
            step: i,
            tokens,
            padded_tokens: Some(tokens + 10),
            target_tokens: None,
            step_seconds: secs,
            loss: Some(10.0 - i as f64),
            lr: None,
            grad_norm: None,
            loss_scale: None,
            skipped: i == 2,
            mem_bytes: None,
            t,
        }
    }

    #[test]
    fn parse_lines() {
        let l = r#"{"type":"step","step":1,"tokens":256,"padded_tokens":256,"target_tokens":200,"step_seconds":0.12,"loss":5.6,"lr":0.0001,"loss_scale":null,"skipped":false,"new_field":1}"#;
        match parse_worker_line(l) {
            WorkerLine::Step(s) => {
                assert_eq!(s.tokens, 256);
                assert_eq!(s.loss, Some(5.6));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(parse_worker_line("hello"), WorkerLine::Warning(_)));
        assert!(matches!(
            parse_worker_line(r#"{"type":"step","step":"x"}"#),
            WorkerLine::Warning(_)
        ));
        assert!(matches!(
            parse_worker_line(r#"{"type":"header","model":"tiny"}"#),
            WorkerLine::Header(_)
        ));
        assert!(matches!(
            parse_worker_line(r#"{"type":"eval"}"#),
            WorkerLine::Other(_)
        ));
    }

    #[test]
    fn timed_window_and_energy() {
        // 4 steps of 1 s each, 100 tokens; warm-up 1 => timed steps 2..4, window t=1..4.
        let steps: Vec<StepRecord> = (1..=4).map(|i| step(i, i as f64, 1.0, 100)).collect();
        // Constant 100 W, counter rising 100 J/s (in mJ).
        let samples: Vec<TelemetrySample> = (0..=50)
            .map(|i| {
                let t = i as f64 * 0.1;
                TelemetrySample {
                    t,
                    power_w: Some(100.0),
                    energy_mj: Some(1e6 + t * 100_000.0),
                    proc_mem_bytes: Some(1000 + i),
                    ..Default::default()
                }
            })
            .collect();
        let s = summarize(&steps, &samples, 1, &RunOutcome::default());
        assert_eq!(s.timed_steps, 3);
        assert_eq!(s.tokens, 300);
        assert_eq!(s.padded_tokens, 330);
        assert!((s.tokens_per_s.unwrap() - 100.0).abs() < 1e-9);
        assert!((s.s_per_10k_tokens.unwrap() - 100.0).abs() < 1e-9);
        assert_eq!(s.energy_source.as_deref(), Some("counter"));
        assert!((s.energy_j.unwrap() - 300.0).abs() < 1e-6);
        assert!((s.energy_j_integrated.unwrap() - 300.0).abs() < 1e-6);
        assert!((s.j_per_token.unwrap() - 1.0).abs() < 1e-9);
        assert_eq!(s.peak_mem_bytes, Some(1050));
        assert_eq!(s.peak_mem_kind.as_deref(), Some("vram_process"));
        assert_eq!(s.final_loss, Some(6.0));
        assert_eq!(s.skipped_steps, 1);
        assert_eq!(s.note, None);
    }

    /// A worker summary that counts out-of-memory retries puts them in the run's note.
    #[test]
    fn oom_retries_are_noted() {
        let steps: Vec<StepRecord> = (1..=3).map(|i| step(i, i as f64, 1.0, 100)).collect();
        let outcome = |n: u64| RunOutcome {
            worker_summary: Some(
                serde_json::json!({"type": "summary", "status": "ok", "oom_retries": n}),
            ),
            ..RunOutcome::default()
        };
        let s = summarize(&steps, &[], 1, &outcome(2));
        let note = s.note.unwrap_or_default();
        assert!(note.contains("2 steps ran out of memory once"), "{note}");
        let s = summarize(&steps, &[], 1, &outcome(0));
        assert!(!s.note.unwrap_or_default().contains("out of memory"));
    }

    #[test]
    fn all_steps_when_warmup_covers_run() {
        let steps: Vec<StepRecord> = (1..=2).map(|i| step(i, i as f64, 0.5, 50)).collect();
        let samples = vec![TelemetrySample {
            t: 1.0,
            rss_bytes: Some(10),
            hwm_bytes: Some(20),
            ..Default::default()
        }];
        let s = summarize(&steps, &samples, 5, &RunOutcome::default());
        assert_eq!(s.timed_steps, 2);
        assert!((s.tokens_per_s.unwrap() - 100.0).abs() < 1e-9);
        assert_eq!(
            s.note.as_deref(),
            Some("steps <= warmup_steps: all steps timed")
        );
        assert_eq!(s.peak_mem_kind.as_deref(), Some("rss"));
        assert_eq!(s.peak_mem_bytes, Some(20));
        assert_eq!(s.energy_j, None);
    }

    /// The `--vram-limit` reservation (from the worker's header when no summary came) is taken
    /// out of the NVML process and device peaks, and the note says so.
    #[test]
    fn vram_reservation_is_subtracted_from_peaks() {
        let samples = vec![TelemetrySample {
            t: 1.0,
            proc_mem_bytes: Some(100 << 30),
            mem_used_bytes: Some(101 << 30),
            ..Default::default()
        }];
        let header = serde_json::json!({
            "type": "header",
            "vram_limit_bytes": 8u64 << 30,
            "vram_reserved_bytes": 94u64 << 30,
            "optimizer_state_device_bytes": 1000,
            "optimizer_state_managed_bytes": 24,
            "optimizer_state_host_bytes": 0
        });
        let outcome = RunOutcome {
            worker_header: Some(header),
            ..Default::default()
        };
        let s = summarize(&[], &samples, 0, &outcome);
        assert_eq!(s.peak_vram_process_bytes, Some(6 << 30));
        assert_eq!(s.peak_vram_device_bytes, Some(7 << 30));
        assert_eq!(s.peak_mem_bytes, Some(6 << 30));
        assert_eq!(s.vram_limit_bytes, Some(8 << 30));
        assert_eq!(s.optimizer_state_bytes, Some(1024));
        assert_eq!(s.optimizer_state_managed_bytes, Some(24));
        assert!(s.note.unwrap().contains("bandwidth and compute are not"));
        // Without a reservation nothing changes.
        let s = summarize(&[], &samples, 0, &RunOutcome::default());
        assert_eq!(s.peak_vram_process_bytes, Some(100 << 30));
        assert_eq!(s.optimizer_state_bytes, None);
        assert_eq!(s.note, None);
    }

    #[test]
    fn spread() {
        assert_eq!(Spread::of(&[]), None);
        let s = Spread::of(&[3.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.5, 1.0, 10.0, 4));
    }
}
