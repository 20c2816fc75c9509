//! `lorascope estimate PROFILE [--json]`: the memory model's prediction for every point of a
//! profile, its split into terms, and whether it fits the point's limit. Also the memory
//! column of `profile check` ([`predictions`]).

use std::io::Write;
use std::path::Path;

use anyhow::Result;

use crate::engine::memory::{MemoryEstimate, gib2};
use crate::grid::{self, RunSpec};
use crate::orchestrator::fit::{self, ContextCache, Prediction};
use crate::orchestrator::preflight;
use crate::profile::{self, LoadedProfile};
use crate::spec::{Device, DeviceKind};

/// Predictions for `specs` on the profile's first device, and a line saying where the CUDA
/// context figure comes from (empty for CPU profiles).
pub fn predictions(
    lp: &LoadedProfile,
    specs: &[RunSpec],
) -> (Vec<Result<Prediction, String>>, String) {
    let first = lp
        .profile
        .run
        .devices
        .first()
        .and_then(|d| Device::parse(d));
    let gpu = match first {
        Some(Device::Cuda(i)) => crate::telemetry::gpu_identity(i),
        _ => None,
    };
    let cache_path = crate::daemon::state_dir().join(ContextCache::FILE);
    let cache = ContextCache::load(Some(&cache_path));
    let ctx = gpu
        .as_ref()
        .and_then(|g| cache.get(&fit::gpu_key(&g.name, &g.driver)));
    let wants_cuda = specs
        .iter()
        .any(|s| s.config.device_kind == DeviceKind::Cuda);
    let note = match (&gpu, ctx) {
        _ if !wants_cuda => String::new(),
        (Some(g), Some(c)) => format!(
            "CUDA context {} measured on {} (cached in {})",
            gib2(c),
            fit::gpu_key(&g.name, &g.driver),
            cache_path.display()
        ),
        (Some(g), None) => format!(
            "CUDA context not yet measured on {}: using the default {} until a run on it finishes",
            fit::gpu_key(&g.name, &g.driver),
            gib2(crate::engine::memory::DEFAULT_CUDA_CONTEXT)
        ),
        (None, _) => format!(
            "no GPU visible: CUDA context taken as the default {}",
            gib2(crate::engine::memory::DEFAULT_CUDA_CONTEXT)
        ),
    };
    (
        fit::predict_all(specs, ctx, gpu.map(|g| g.total_bytes)),
        note,
    )
}

/// The `profile check` memory column of one point: the prediction and what a sweep does
/// with it (`-> predicted-oom`, `-> oom`).
pub fn check_column(p: &Result<Prediction, String>, verify_oom: bool) -> String {
    match p {
        Err(e) => format!("no prediction: {e}"),
        Ok(p) => {
            let over = p.limit.as_ref().is_some_and(|l| p.estimate.peak > l.bytes);
            let tail = match (p.estimate.device, over) {
                (DeviceKind::Cpu, true) => " -> oom (refused before loading)",
                (DeviceKind::Cuda, _) if p.refusal(verify_oom).is_some() => " -> predicted-oom",
                _ => "",
            };
            format!("{}{tail}", p.column())
        }
    }
}

fn g(b: u64) -> String {
    format!("{:.2}", b as f64 / (1u64 << 30) as f64)
}

/// One table row of `estimate`.
fn row(s: &RunSpec, e: &MemoryEstimate, p: &Prediction, lw: usize) -> String {
    let (limit, verdict) = match &p.limit {
        Some(l) => (gib2(l.bytes), e.verdict(l.bytes)),
        None => ("-".into(), "no limit known".into()),
    };
    format!(
        "{:>3}  {:<12}  {:<lw$} {:>9} {:>7} {:>8} {:>9} {:>6} {:>11} {:>9} {:>8} {:>8}  {:>10}  {verdict}",
        s.index + 1,
        s.id,
        s.label(),
        g(e.peak),
        g(e.weights),
        g(e.adapters),
        g(e.optimizer_state),
        g(e.adapter_grads),
        g(e.activations),
        g(e.transient),
        g(e.pool_cache),
        g(e.overhead + e.loading),
        limit,
    )
}

/// Prints the prediction of every point of the profile at `path`: a table (GiB) of the
/// predicted peak and its terms, the limit and `fits` / `over by X GiB`; with `json`, one
/// JSON object per point (`id`, `label`, `estimate` with every term in bytes, `limit_bytes`,
/// `verdict`, `refusal`).
///
/// Errors: the profile does not load or its model does not resolve.
pub fn run(path: &Path, json: bool) -> Result<()> {
    let lp = profile::load(path)?;
    let specs = grid::expand(&lp);
    preflight::model_and_data(&lp, &specs)?;
    let (preds, note) = predictions(&lp, &specs);
    let mut out = std::io::stdout().lock();
    if json {
        for (s, p) in specs.iter().zip(&preds) {
            let v = match p {
                Ok(p) => serde_json::json!({
                    "id": s.id, "label": s.label(), "estimate": p.estimate,
                    "stated_error_bytes": p.estimate.stated_error(),
                    "limit_bytes": p.limit.as_ref().map(|l| l.bytes),
                    "verdict": p.limit.as_ref().map(|l| p.estimate.verdict(l.bytes)),
                    "refusal": p.refusal(s.verify_oom),
                }),
                Err(e) => serde_json::json!({"id": s.id, "label": s.label(), "error": e}),
            };
            writeln!(out, "{v}")?;
        }
        return Ok(());
    }
    writeln!(
        out,
        "{}: {} point(s), predicted peak {} per point (GiB; stated error {:.0}% or {} MiB)",
        path.display(),
        specs.len(),
        match specs.first().map(|s| s.config.device_kind) {
            Some(DeviceKind::Cuda) => "process VRAM",
            _ => "RSS (host memory)",
        },
        crate::engine::memory::STATED_ERROR_FRACTION * 100.0,
        crate::engine::memory::STATED_ERROR_FLOOR >> 20
    )?;
    if !note.is_empty() {
        writeln!(out, "{note}")?;
    }
    // The point column as wide as the longest label, so the figures line up.
    let lw = specs
        .iter()
        .map(|s| s.label().chars().count())
        .max()
        .unwrap_or(5)
        .max(5);
    writeln!(
        out,
        "{:>3}  {:<12}  {:<lw$} {:>9} {:>7} {:>8} {:>9} {:>6} {:>11} {:>9} {:>8} {:>8}  {:>10}  verdict",
        "#",
        "id",
        "point",
        "predicted",
        "weights",
        "adapters",
        "optimizer",
        "grads",
        "activations",
        "transient",
        "pool",
        "overhead",
        "limit"
    )?;
    for (s, p) in specs.iter().zip(&preds) {
        match p {
            Ok(p) => writeln!(out, "{}", row(s, &p.estimate, p, lw))?,
            Err(e) => writeln!(
                out,
                "{:>3}  {:<12}  {:<lw$} {e}",
                s.index + 1,
                s.id,
                s.label()
            )?,
        }
    }
    Ok(())
}
