//! Will a point fit? The engine's memory model ([`crate::engine::memory`]) applied to a
//! sweep's points, against the limit each one runs under: `run.vram_limit` (a size or a
//! card name), else the GPU's own memory, for CUDA points; the host memory this process may
//! use for CPU points.
//!
//! Also the per-GPU cache of the measured CUDA context ([`ContextCache`]): a run's peak
//! process VRAM minus the pool's peak reservation and the optimizer state held outside the
//! pool is what the process holds besides its tensors; the smallest value seen per GPU model
//! and driver is kept in `cuda-context.json` in the state directory.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::engine::config::{ModelConfig, ModelSource};
use crate::engine::memory::{self, MemoryEstimate, MemoryPoint, gib, host};
use crate::engine::weights::WeightSource;
use crate::grid::RunSpec;
use crate::orchestrator::RunResult;
use crate::profile::AXIS_MAX;
use crate::spec::{Device, DeviceKind};
use crate::summary::{RunStatus, RunSummary};
use crate::telemetry::{self, GpuIdentity};

/// The limit a point is held to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    /// Bytes.
    pub bytes: u64,
    /// What it is, for messages: `the 8.0 GiB vram_limit`, `the GPU's 139.8 GiB`,
    /// `8.0 GiB of host memory available (MemAvailable)`.
    pub what: String,
}

/// A point's prediction and the limit it is checked against.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// The memory model's estimate (for a `"max"` axis: at the value found).
    pub estimate: MemoryEstimate,
    /// The limit, when one is known.
    pub limit: Option<Limit>,
    /// For a point with a `"max"` axis: the axis and the largest value predicted to fit
    /// (0: none fits).
    pub resolved: Option<(MaxAxis, u32)>,
    /// For a point with a `"max"` axis: the largest value the engine accepts there.
    pub max_cap: u32,
}

/// The axis a point searches (`batch_size = "max"` or `seq_len = "max"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxAxis {
    /// `batch_size = "max"`.
    BatchSize,
    /// `seq_len = "max"`.
    SeqLen,
}

impl MaxAxis {
    /// The axis of `spec` written `"max"`, if any.
    pub fn of(spec: &RunSpec) -> Option<MaxAxis> {
        let p = &spec.config.point;
        if p.batch_size == AXIS_MAX {
            Some(MaxAxis::BatchSize)
        } else if p.seq_len == AXIS_MAX {
            Some(MaxAxis::SeqLen)
        } else {
            None
        }
    }

    /// The profile key.
    pub fn key(self) -> &'static str {
        match self {
            MaxAxis::BatchSize => "batch_size",
            MaxAxis::SeqLen => "seq_len",
        }
    }

    /// The worker flag.
    pub fn flag(self) -> &'static str {
        match self {
            MaxAxis::BatchSize => "--batch-size",
            MaxAxis::SeqLen => "--seq-len",
        }
    }

    /// The largest value the engine accepts on this axis for `spec` on a model of `cfg`
    /// (16 Mi tokens per step; `max_position_embeddings`).
    fn cap(self, spec: &RunSpec, cfg: &ModelConfig) -> u32 {
        let p = &spec.config.point;
        let tokens = 1u32 << 24;
        match self {
            MaxAxis::BatchSize => tokens / p.seq_len.max(1),
            MaxAxis::SeqLen => (tokens / p.batch_size.max(1))
                .min(cfg.max_position_embeddings.min(u32::MAX as usize) as u32),
        }
    }
}

/// The largest value of `axis` in `[lo, cap]` whose predicted peak is within `limit`
/// (predictions grow with batch and sequence), 0 if none; bisection over the model.
fn largest_fitting(mut p: MemoryPoint, axis: MaxAxis, cap: u32, limit: u64) -> u32 {
    let mut at = |v: u32| {
        match axis {
            MaxAxis::BatchSize => p.batch_size = v as usize,
            MaxAxis::SeqLen => p.seq_len = v as usize,
        }
        memory::estimate(&p).peak <= limit
    };
    let lo_value = match axis {
        MaxAxis::BatchSize => 1,
        MaxAxis::SeqLen => 2,
    };
    if cap < lo_value || !at(lo_value) {
        return 0;
    }
    let (mut lo, mut hi) = (lo_value, cap.saturating_add(1));
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if at(mid) { lo = mid } else { hi = mid }
    }
    lo
}

impl Prediction {
    /// `~4.10 GiB VRAM, fits 8.0 GiB` / `~29.6 GiB host, over by 21.6 GiB`: the column of
    /// `profile check` and `estimate`.
    pub fn column(&self) -> String {
        let kind = match self.estimate.device {
            DeviceKind::Cuda => "VRAM",
            DeviceKind::Cpu => "host",
        };
        let mut peak = format!("~{} {kind}", memory::gib2(self.estimate.peak));
        if let Some((axis, v)) = self.resolved {
            peak = match v {
                0 => format!("{} = max: no value fits", axis.key()),
                v => format!("{} = max -> {v} predicted, {peak}", axis.key()),
            };
        }
        match &self.limit {
            None => peak,
            Some(l) if self.estimate.peak <= l.bytes => format!("{peak}, fits {}", gib(l.bytes)),
            Some(l) => format!(
                "{peak}, {} of {}",
                self.estimate.verdict(l.bytes),
                gib(l.bytes)
            ),
        }
    }

    /// The status a sweep records without running the point, and its one-line cause:
    /// `oom` for a CPU point over the host memory (the worker would refuse it the same way),
    /// `predicted-oom` for a CUDA point over its limit by more than the model's stated error,
    /// unless `verify_oom` (then it runs and the prediction is checked). None: run it.
    pub fn refusal(&self, verify_oom: bool) -> Option<String> {
        let l = self.limit.as_ref()?;
        let e = &self.estimate;
        if let Some((axis, 0)) = self.resolved {
            return Some(format!(
                "{} = \"max\": no value is predicted to fit {} (at the smallest, ~{})",
                axis.key(),
                l.what,
                memory::gib2(e.peak)
            ));
        }
        if self.resolved.is_some() {
            return None;
        }
        match e.device {
            DeviceKind::Cpu => None,
            DeviceKind::Cuda if verify_oom || !e.surely_over(l.bytes) => None,
            DeviceKind::Cuda => Some(format!(
                "predicted ~{} of device memory (stated error {}) against {}: {}; not run (set run.verify_oom = true to run it)",
                memory::gib2(e.peak),
                memory::gib2(e.stated_error()),
                l.what,
                e.verdict(l.bytes)
            )),
        }
    }
}

/// The memory model's view of `spec` on a model of `cfg`, whose weights are drawn at random
/// when `synthetic_weights` (no checkpoint).
pub fn memory_point<'a>(
    spec: &'a RunSpec,
    cfg: &'a ModelConfig,
    cuda_context: Option<u64>,
    synthetic_weights: bool,
) -> MemoryPoint<'a> {
    let c = &spec.config;
    let p = &c.point;
    MemoryPoint {
        config: cfg,
        lora_rank: p.lora_rank as usize,
        lora_targets: &c.lora_targets,
        quant: p.quant,
        precision: p.precision,
        batch_size: p.batch_size as usize,
        seq_len: p.seq_len as usize,
        optimizer: p.optimizer,
        grad_checkpointing: p.grad_checkpointing,
        device: c.device_kind,
        cuda_context,
        synthetic_weights,
    }
}

/// The limit `spec` runs under: CUDA: `run.vram_limit`, else `gpu_total` (the GPU's memory,
/// when known); CPU: [`host::available`].
pub fn limit(spec: &RunSpec, gpu_total: Option<u64>) -> Option<Limit> {
    match spec.config.device_kind {
        DeviceKind::Cuda => match (spec.config.vram_limit_bytes, gpu_total) {
            (Some(b), _) => Some(Limit {
                bytes: b,
                what: format!(
                    "the {} vram_limit{}",
                    gib(b),
                    spec.vram_limit
                        .as_deref()
                        .filter(|v| crate::spec::Card::parse(v.trim()).is_some())
                        .map(|v| format!(" ({})", v.trim()))
                        .unwrap_or_default()
                ),
            }),
            (None, Some(t)) => Some(Limit {
                bytes: t,
                what: format!("the GPU's {}", gib(t)),
            }),
            (None, None) => None,
        },
        DeviceKind::Cpu => host::available().map(|a| Limit {
            bytes: a.bytes,
            what: format!("{} of host memory available ({})", gib(a.bytes), a.source),
        }),
    }
}

/// Predictions for `specs`, resolving each model once: `cuda_context` is the measured context
/// of the GPU the points run on (None: the default), `gpu_total` its memory.
///
/// Errors: per point, the model does not resolve (one line).
pub fn predict_all(
    specs: &[RunSpec],
    cuda_context: Option<u64>,
    gpu_total: Option<u64>,
) -> Vec<Result<Prediction, String>> {
    let mut models: HashMap<String, Result<(ModelConfig, bool), String>> = HashMap::new();
    specs
        .iter()
        .map(|s| {
            let (cfg, synthetic) = models
                .entry(s.model_arg.clone())
                .or_insert_with(|| {
                    let m = ModelSource::resolve(&s.model_arg).map_err(|e| e.to_string())?;
                    // Synthetic unless the directory holds a checkpoint `train` would read.
                    let synthetic = match m.dir.as_deref() {
                        None => true,
                        Some(d) => !matches!(WeightSource::open_dir(d), Ok(Some(_))),
                    };
                    Ok((m.config, synthetic))
                })
                .clone()?;
            let limit = limit(s, gpu_total);
            let mut point = memory_point(s, &cfg, cuda_context, synthetic);
            let mut max_cap = 0;
            let resolved = match MaxAxis::of(s) {
                None => None,
                Some(axis) => {
                    let l = limit.as_ref().ok_or_else(|| {
                        format!(
                            "{} = \"max\" needs a memory limit: on a GPU set run.vram_limit or let NVML see the card; on the CPU give LORASCOPE_MEM_AVAILABLE a size (e.g. 8GiB) instead of `unlimited`",
                            axis.key()
                        )
                    })?;
                    max_cap = axis.cap(s, &cfg);
                    let v = largest_fitting(point.clone(), axis, max_cap, l.bytes);
                    match axis {
                        MaxAxis::BatchSize => point.batch_size = v.max(1) as usize,
                        MaxAxis::SeqLen => point.seq_len = v.max(2) as usize,
                    }
                    Some((axis, v))
                }
            };
            Ok(Prediction {
                estimate: memory::estimate(&point),
                limit,
                resolved,
                max_cap,
            })
        })
        .collect()
}

/// The sweep's memory checks: each device slot's GPU (NVML) and the context cache.
#[derive(Debug)]
pub struct MemoryCheck {
    cache: ContextCache,
    gpus: Vec<Option<GpuIdentity>>,
}

impl MemoryCheck {
    /// For a sweep on `devices` (one slot each), with the context cache at `cache`.
    pub fn new(cache: Option<&Path>, devices: &[Device]) -> Self {
        Self {
            cache: ContextCache::load(cache),
            gpus: devices
                .iter()
                .map(|d| match d {
                    Device::Cuda(i) => telemetry::gpu_identity(*i),
                    Device::Cpu => None,
                })
                .collect(),
        }
    }

    /// The prediction for `spec` on slot `slot`'s device.
    ///
    /// Errors: its model does not resolve (the worker then reports it), or a `"max"` axis
    /// without a known limit (one line).
    pub fn predict(&self, spec: &RunSpec, slot: usize) -> Result<Prediction, String> {
        let gpu = self.gpus.get(slot).and_then(Option::as_ref);
        let ctx = gpu.and_then(|g| self.cache.get(&gpu_key(&g.name, &g.driver)));
        predict_all(std::slice::from_ref(spec), ctx, gpu.map(|g| g.total_bytes))
            .pop()
            .unwrap_or_else(|| Err("no prediction".into()))
    }

    /// After an `ok` run on slot `slot`'s GPU: cache the context it measured. Returns a
    /// warning line when the cache cannot be written.
    pub fn learn(&mut self, slot: usize, result: &RunResult) -> Option<String> {
        let g = self.gpus.get(slot)?.as_ref()?;
        if result.summary.status != Some(RunStatus::Ok) {
            return None;
        }
        let ctx = measured_context(
            result.summary.peak_vram_process_bytes,
            result.worker_summary.as_ref(),
        )?;
        self.cache.record(&gpu_key(&g.name, &g.driver), ctx).err()
    }
}

/// Put the prediction `predicted` (bytes) and its error against the measured peak (process
/// VRAM, else peak RSS, of an `ok` run) into `s`.
pub fn annotate(s: &mut RunSummary, predicted: u64) {
    s.predicted_peak_bytes = Some(predicted);
    let measured = s.peak_vram_process_bytes.or(s.peak_rss_bytes);
    s.prediction_error = match (s.status, measured) {
        (Some(RunStatus::Ok), Some(m)) if predicted > 0 => Some(m as f64 / predicted as f64 - 1.0),
        _ => None,
    };
}

/// `cuda-context.json`: the measured CUDA context per GPU model and driver, bytes.
#[derive(Debug, Clone, Default)]
pub struct ContextCache {
    path: Option<PathBuf>,
    map: BTreeMap<String, u64>,
}

impl ContextCache {
    /// The file's name in the state directory.
    pub const FILE: &str = "cuda-context.json";

    /// The cache at `path` (None: a cache that is never written). A missing or unreadable
    /// file is an empty cache.
    pub fn load(path: Option<&Path>) -> Self {
        let map = path
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        Self {
            path: path.map(Path::to_path_buf),
            map,
        }
    }

    /// The measured context of the GPU called `key` ([`gpu_key`]).
    pub fn get(&self, key: &str) -> Option<u64> {
        self.map.get(key).copied()
    }

    /// Record a measurement, keeping the smallest per key (the context is the constant part:
    /// larger values include pool growth the model counts elsewhere); written atomically.
    /// A write failure is returned as one line for a warning.
    pub fn record(&mut self, key: &str, bytes: u64) -> Result<(), String> {
        let old = self.map.get(key).copied();
        if old.is_some_and(|o| o <= bytes) {
            return Ok(());
        }
        self.map.insert(key.to_string(), bytes);
        let Some(path) = &self.path else {
            return Ok(());
        };
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let text = serde_json::to_string_pretty(&self.map).unwrap_or_default();
        crate::fsutil::write_atomic(path, &text)
            .map_err(|e| format!("cannot cache the CUDA context in {}: {e}", path.display()))
    }
}

/// The cache key of a GPU: `NVIDIA H200 / driver 580.159.04`.
pub fn gpu_key(name: &str, driver: &str) -> String {
    format!("{name} / driver {driver}")
}

/// The context a finished CUDA run measured: peak process VRAM (the reservation already
/// subtracted) minus the pool's peak reservation and the optimizer state outside the pool.
/// None when a figure is missing or the difference is not positive.
pub fn measured_context(
    peak_vram_process: Option<u64>,
    worker_summary: Option<&serde_json::Value>,
) -> Option<u64> {
    let ws = worker_summary?;
    let get = |v: &serde_json::Value, k: &str| v.get(k).and_then(serde_json::Value::as_u64);
    let pool = get(ws.get("device_memory")?, "pool_reserved_peak_bytes")?;
    let opt = get(ws, "optimizer_state_device_bytes").unwrap_or(0)
        + get(ws, "optimizer_state_managed_bytes").unwrap_or(0);
    peak_vram_process?
        .checked_sub(pool + opt)
        .filter(|&c| c > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_is_peak_minus_pool_and_optimizer() {
        let ws = serde_json::json!({
            "optimizer_state_device_bytes": 10, "optimizer_state_managed_bytes": 5,
            "device_memory": {"pool_reserved_peak_bytes": 100}
        });
        assert_eq!(measured_context(Some(1000), Some(&ws)), Some(885));
        assert_eq!(measured_context(Some(50), Some(&ws)), None);
        assert_eq!(measured_context(None, Some(&ws)), None);
        assert_eq!(measured_context(Some(1000), None), None);
    }

    #[test]
    fn the_cache_keeps_the_smallest_and_survives_a_reload() {
        let dir = std::env::temp_dir().join(format!("lorascope-ctx-{}", std::process::id()));
        let path = dir.join(ContextCache::FILE);
        let mut c = ContextCache::load(Some(&path));
        let k = gpu_key("NVIDIA H200", "580.1");
        c.record(&k, 900).unwrap();
        c.record(&k, 950).unwrap();
        assert_eq!(ContextCache::load(Some(&path)).get(&k), Some(900));
        c.record(&k, 800).unwrap();
        assert_eq!(ContextCache::load(Some(&path)).get(&k), Some(800));
        let _ = std::fs::remove_dir_all(dir);
    }
}
