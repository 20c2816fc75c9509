//! One row per point of a sweep ([`PointRow`]): the data every report format is made from.
//!
//! Each point uses the latest run of each repeat (an interrupted run that was re-run is not
//! counted). Metrics come from `ok` runs only; with several repeats a metric shows the
//! median and `[min–max]`. Memory is the run's peak: process VRAM on GPUs, else device VRAM,
//! else peak RSS (CPU runs).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::grid::{Point, ResolvedConfig};
use crate::store::RunRow;
use crate::summary::{MemoryGrowth, RunStatus, RunSummary, Spread};

/// One point of the comparison.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PointRow {
    /// Position in the grid.
    pub index: usize,
    /// The point's stable id.
    pub spec_id: String,
    /// The point's label.
    pub label: String,
    /// The point's axis values (None when the stored config does not parse).
    pub point: Option<Point>,
    /// The model as written in the profile (`tiny`, a directory).
    pub model: Option<String>,
    /// Where its (first) run ran: `cpu`, `cuda:N`, or the Slurm node name.
    pub device: String,
    /// The Slurm job (`JOB_TASK`) of its first run, when it ran on Slurm.
    pub slurm_job: Option<String>,
    /// The profile's `run.vram_limit` (bytes).
    pub vram_limit_bytes: Option<u64>,
    /// Runs counted (latest per repeat).
    pub runs: usize,
    /// `ok`, a single other status, or e.g. `ok 2/3, oom 1`.
    pub status: String,
    /// Cause of the first non-ok run.
    pub cause: Option<String>,
    /// Over ok runs (tokens/s); so are the other spreads.
    pub tokens_per_s: Option<Spread>,
    /// Tokens including padding per second.
    pub padded_tokens_per_s: Option<Spread>,
    /// Seconds per 10,000 tokens.
    pub s_per_10k_tokens: Option<Spread>,
    /// Max over ok runs (bytes).
    pub peak_mem_bytes: Option<u64>,
    /// `vram_process`, `vram_device` or `rss`.
    pub peak_mem_kind: Option<String>,
    /// The largest memory rise over the timed window among ok runs: when set, the table shows
    /// it in place of the peak, which is then a leak's and not the point's cost.
    pub mem_growth: Option<MemoryGrowth>,
    /// The memory model's predicted peak (bytes; max over the runs that have one).
    pub predicted_peak_bytes: Option<u64>,
    /// `measured / predicted - 1` of the peak over ok runs.
    pub prediction_error: Option<Spread>,
    /// Mean board power (W).
    pub mean_w: Option<Spread>,
    /// Max over ok runs (W).
    pub max_w: Option<f64>,
    /// Energy over the timed window (J).
    pub energy_j: Option<Spread>,
    /// Energy per real token (J).
    pub j_per_token: Option<Spread>,
    /// Energy from integrated power (J), to check against the counter.
    pub energy_j_integrated: Option<Spread>,
    /// `counter` or `integrated`.
    pub energy_source: Option<String>,
    /// The last reported loss.
    pub final_loss: Option<Spread>,
    /// fp16 steps skipped by the loss scaler, summed over ok runs.
    pub skipped_steps: u64,
    /// The value a `"max"` axis resolved to (from the first run that has one).
    pub max_value: Option<u32>,
    /// The ok runs' notes, joined by `; `.
    pub note: Option<String>,
    /// Trainable (adapter) parameters, from the worker's header.
    pub params_trainable: Option<u64>,
    /// Optimizer state bytes (device + managed + host), from the worker's header.
    pub optimizer_state_bytes: Option<u64>,
    /// The base weights were random (no weight files): loss values are not representative.
    pub synthetic_weights: bool,
}

/// `device` as stored for a run, split into the device (or Slurm node) and the Slurm job:
/// `node1 (slurm 7_0)` gives `("node1", Some("7_0"))`, `cuda:0` gives `("cuda:0", None)`.
pub fn split_device(device: &str) -> (String, Option<String>) {
    match device.split_once(" (slurm ") {
        Some((node, rest)) => (
            node.to_string(),
            Some(rest.trim_end_matches(')').to_string()),
        ),
        None => (device.to_string(), None),
    }
}

/// Builds one row per point from a sweep's runs (ordered by grid index).
pub fn rows(runs: &[RunRow]) -> Vec<PointRow> {
    // Latest run per (spec, repeat): runs come ordered by row id within a repeat.
    let mut latest: BTreeMap<(usize, String, u32), &RunRow> = BTreeMap::new();
    for r in runs {
        let key = (r.grid_index, r.spec_id.clone(), r.repeat);
        match latest.get(&key) {
            Some(prev) if prev.id > r.id => {}
            _ => {
                latest.insert(key, r);
            }
        }
    }
    let mut points: BTreeMap<(usize, String), Vec<&RunRow>> = BTreeMap::new();
    for ((gi, spec, _), r) in latest {
        points.entry((gi, spec)).or_default().push(r);
    }
    points
        .into_iter()
        .map(|((index, spec_id), rs)| point_row(index, spec_id, &rs))
        .collect()
}

fn point_row(index: usize, spec_id: String, rs: &[&RunRow]) -> PointRow {
    let ok: Vec<_> = rs
        .iter()
        .filter(|r| r.status == RunStatus::Ok)
        .filter_map(|r| r.summary.as_ref())
        .collect();
    let mut by_status: BTreeMap<&str, usize> = BTreeMap::new();
    for r in rs {
        *by_status.entry(r.status.as_str()).or_default() += 1;
    }
    let status = if by_status.len() == 1 {
        by_status.keys().next().copied().unwrap_or("").to_string()
    } else {
        // `ok n/N` first (what [`PointRow::is_ok`] reads), then the others by name.
        let n = rs.len();
        let mut parts: Vec<String> = by_status
            .get("ok")
            .map(|c| format!("ok {c}/{n}"))
            .into_iter()
            .collect();
        parts.extend(
            by_status
                .iter()
                .filter(|(s, _)| **s != "ok")
                .map(|(s, c)| format!("{s} {c}")),
        );
        parts.join(", ")
    };
    let cause = rs
        .iter()
        .find(|r| r.status != RunStatus::Ok)
        .and_then(|r| r.cause.clone());
    let spread = |f: fn(&RunSummary) -> Option<f64>| {
        Spread::of(&ok.iter().filter_map(|s| f(s)).collect::<Vec<_>>())
    };
    let mut notes: Vec<String> = ok.iter().filter_map(|s| s.note.clone()).collect();
    notes.dedup();
    let first = rs.first();
    let config: Option<ResolvedConfig> =
        first.and_then(|r| serde_json::from_value(r.config.clone()).ok());
    let (device, slurm_job) = first.map(|r| split_device(&r.device)).unwrap_or_default();
    let header = |key: &str| rs.iter().find_map(|r| r.header.as_ref()?.get(key).cloned());
    PointRow {
        index,
        spec_id,
        label: first.map(|r| r.label.clone()).unwrap_or_default(),
        point: config.as_ref().map(|c| c.point),
        model: config.as_ref().map(|c| match &c.model {
            crate::grid::ModelRef::Preset(p) | crate::grid::ModelRef::Path(p) => p.clone(),
        }),
        device,
        slurm_job,
        vram_limit_bytes: config.as_ref().and_then(|c| c.vram_limit_bytes),
        runs: rs.len(),
        status,
        cause,
        tokens_per_s: spread(|s| s.tokens_per_s),
        padded_tokens_per_s: spread(|s| s.padded_tokens_per_s),
        s_per_10k_tokens: spread(|s| s.s_per_10k_tokens),
        peak_mem_bytes: ok.iter().filter_map(|s| s.peak_mem_bytes).max(),
        peak_mem_kind: ok.iter().find_map(|s| s.peak_mem_kind.clone()),
        mem_growth: ok
            .iter()
            .filter_map(|s| s.mem_growth)
            .max_by_key(|g| g.bytes),
        predicted_peak_bytes: rs
            .iter()
            .filter_map(|r| r.summary.as_ref()?.predicted_peak_bytes)
            .max(),
        prediction_error: spread(|s| s.prediction_error),
        mean_w: spread(|s| s.mean_w),
        max_w: ok.iter().filter_map(|s| s.max_w).reduce(f64::max),
        energy_j: spread(|s| s.energy_j),
        j_per_token: spread(|s| s.j_per_token),
        energy_j_integrated: spread(|s| s.energy_j_integrated),
        energy_source: ok.iter().find_map(|s| s.energy_source.clone()),
        final_loss: spread(|s| s.final_loss),
        skipped_steps: ok.iter().map(|s| s.skipped_steps).sum(),
        // The ok runs' value first (each repeat searches on its own).
        max_value: ok
            .iter()
            .find_map(|s| s.max_value)
            .or_else(|| rs.iter().find_map(|r| r.summary.as_ref()?.max_value)),
        note: if notes.is_empty() {
            None
        } else {
            Some(notes.join("; "))
        },
        params_trainable: header("params_trainable").and_then(|v| v.as_u64()),
        optimizer_state_bytes: header("optimizer_state_bytes").and_then(|v| v.as_u64()),
        synthetic_weights: header("synthetic_weights")
            .and_then(|v| v.as_bool())
            .unwrap_or(false),
    }
}

impl PointRow {
    /// The row of one finished run (the dashboard's table: a row per run, not per point):
    /// its summary's values as spreads of one, `status` from the summary.
    pub fn from_summary(
        index: usize,
        id: &str,
        point: Point,
        device: &str,
        vram_limit_bytes: Option<u64>,
        s: &RunSummary,
    ) -> PointRow {
        let one = |v: Option<f64>| v.and_then(|v| Spread::of(&[v]));
        let status = s.status.unwrap_or(RunStatus::Failed);
        let ok = status == RunStatus::Ok;
        let okv = |v: Option<f64>| if ok { one(v) } else { None };
        let (device, slurm_job) = split_device(device);
        PointRow {
            index,
            spec_id: id.to_string(),
            label: point.label(),
            point: Some(point),
            model: None,
            device,
            slurm_job,
            vram_limit_bytes,
            runs: 1,
            status: status.as_str().to_string(),
            cause: if ok { None } else { s.cause.clone() },
            tokens_per_s: okv(s.tokens_per_s),
            padded_tokens_per_s: okv(s.padded_tokens_per_s),
            s_per_10k_tokens: okv(s.s_per_10k_tokens),
            peak_mem_bytes: s.peak_mem_bytes.filter(|_| ok),
            peak_mem_kind: s.peak_mem_kind.clone().filter(|_| ok),
            mem_growth: s.mem_growth.filter(|_| ok),
            predicted_peak_bytes: s.predicted_peak_bytes,
            prediction_error: okv(s.prediction_error),
            mean_w: okv(s.mean_w),
            max_w: s.max_w.filter(|_| ok),
            energy_j: okv(s.energy_j),
            j_per_token: okv(s.j_per_token),
            energy_j_integrated: okv(s.energy_j_integrated),
            energy_source: s.energy_source.clone().filter(|_| ok),
            final_loss: okv(s.final_loss),
            skipped_steps: if ok { s.skipped_steps } else { 0 },
            max_value: s.max_value,
            note: s.note.clone().filter(|_| ok),
            params_trainable: None,
            optimizer_state_bytes: s.optimizer_state_bytes,
            synthetic_weights: false,
        }
    }

    /// Whether the point has at least one ok run (its metrics come from those).
    pub fn is_ok(&self) -> bool {
        self.status == "ok" || self.status.starts_with("ok ")
    }
}
