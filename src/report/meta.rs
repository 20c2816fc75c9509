//! A sweep's metadata, the block that exports and the HTML report carry: lorascope version,
//! where it ran (GPU name, driver and power limit, or the CPU model; Slurm nodes and jobs),
//! steps, warm-up, LoRA settings and dates.
//!
//! Where it ran is recorded once per sweep by [`host_meta`] (the `sweep_meta` table, written
//! when the orchestrator starts the sweep); the rest comes from the profile as run (each run's
//! resolved config) and the runs' telemetry.

use serde::Serialize;

use crate::grid::{ModelRef, ResolvedConfig};
use crate::spec::Device;
use crate::store::{RunRow, SweepRow, utc_timestamp};

/// The metadata block of a sweep (JSON `meta`, CSV `# key: value` lines).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SweepMeta {
    /// The lorascope that ran the sweep (else: the one writing the report).
    pub lorascope_version: String,
    /// The lorascope that wrote this report.
    pub report_version: String,
    /// The sweep's id in its database.
    pub sweep_id: i64,
    /// The profile's name.
    pub sweep_name: String,
    /// The profile's path as recorded.
    pub profile: String,
    /// RFC 3339 UTC.
    pub started_at: String,
    /// RFC 3339 UTC, once every point has an outcome.
    pub finished_at: Option<String>,
    /// The host the orchestrator ran on.
    pub host: Option<String>,
    /// `/proc/cpuinfo`'s model name of that host.
    pub cpu_model: Option<String>,
    /// The GPUs used, `NVIDIA H200` (one entry per distinct model).
    pub gpu: Vec<String>,
    /// NVIDIA driver version.
    pub gpu_driver: Option<String>,
    /// Device memory of the (first) GPU, bytes.
    pub gpu_memory_bytes: Option<u64>,
    /// The board power limit NVML reported during the runs (max over samples), W.
    pub power_limit_w: Option<f64>,
    /// The model as written (`tiny`, a directory).
    pub model: Option<String>,
    /// `data.path` as written.
    pub data: Option<String>,
    /// `run.steps`.
    pub steps: Option<u32>,
    /// `run.warmup_steps` (not timed).
    pub warmup_steps: Option<u32>,
    /// `run.seed`.
    pub seed: Option<u64>,
    /// `run.lr` (None: the worker's default).
    pub lr: Option<f64>,
    /// `lora.alpha`.
    pub lora_alpha: Option<f64>,
    /// `lora.dropout`.
    pub lora_dropout: Option<f64>,
    /// `lora.targets`.
    pub lora_targets: Vec<String>,
    /// The LoRA ranks of the points.
    pub lora_ranks: Vec<u32>,
    /// `run.vram_limit`, bytes: the one limit every point has (None when the points' limits
    /// differ, as with a `card` grid axis, or none is set).
    pub vram_limit_bytes: Option<u64>,
    /// Points of the sweep (rows of the table).
    pub points: usize,
    /// Runs recorded (every attempt).
    pub runs: usize,
    /// The Slurm nodes the runs ran on (Slurm backend).
    pub slurm_nodes: Vec<String>,
    /// The Slurm jobs (`JOB_TASK`) of the runs (Slurm backend).
    pub slurm_jobs: Vec<String>,
}

/// Where a sweep runs, as `sweep_meta` pairs: `lorascope_version`, `host`, `cpu_model`, and
/// for each distinct GPU among `devices` `gpu`, `gpu_driver`, `gpu_memory_bytes` (NVML; absent
/// without it).
pub fn host_meta(devices: &[Device]) -> Vec<(String, String)> {
    let mut out = vec![(
        "lorascope_version".to_string(),
        env!("CARGO_PKG_VERSION").to_string(),
    )];
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        out.push(("host".into(), h.trim().to_string()));
    }
    if let Some(m) = cpu_model(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default()) {
        out.push(("cpu_model".into(), m));
    }
    let mut names: Vec<String> = Vec::new();
    for d in devices {
        let Device::Cuda(i) = d else { continue };
        let Some(g) = crate::telemetry::gpu_identity(*i) else {
            continue;
        };
        if !names.contains(&g.name) {
            names.push(g.name.clone());
        }
        if !out.iter().any(|(k, _)| k == "gpu_driver") {
            out.push(("gpu_driver".into(), g.driver));
            out.push(("gpu_memory_bytes".into(), g.total_bytes.to_string()));
        }
    }
    if !names.is_empty() {
        out.push(("gpu".into(), names.join(", ")));
    }
    out
}

/// The first `model name` line of a `/proc/cpuinfo` text.
pub fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// The metadata of `sweep` from its recorded pairs (`Store::sweep_meta`), its runs, and the
/// power limit seen in telemetry (W).
pub fn sweep_meta(
    sweep: &SweepRow,
    pairs: &[(String, String)],
    runs: &[RunRow],
    points: usize,
    power_limit_w: Option<f64>,
) -> SweepMeta {
    let get = |k: &str| {
        pairs
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    let configs: Vec<ResolvedConfig> = runs
        .iter()
        .filter_map(|r| serde_json::from_value(r.config.clone()).ok())
        .collect();
    let c = configs.first();
    let mut ranks: Vec<u32> = configs.iter().map(|c| c.point.lora_rank).collect();
    ranks.sort_unstable();
    ranks.dedup();
    let mut nodes = Vec::new();
    let mut jobs = Vec::new();
    for r in runs {
        if let (node, Some(job)) = super::rows::split_device(&r.device) {
            if !nodes.contains(&node) {
                nodes.push(node);
            }
            jobs.push(job);
        }
    }
    SweepMeta {
        lorascope_version: get("lorascope_version")
            .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string()),
        report_version: env!("CARGO_PKG_VERSION").to_string(),
        sweep_id: sweep.id,
        sweep_name: sweep.name.clone(),
        profile: sweep.profile_path.clone(),
        started_at: utc_timestamp(sweep.started_at),
        finished_at: sweep.finished_at.map(utc_timestamp),
        host: get("host"),
        cpu_model: get("cpu_model"),
        gpu: get("gpu")
            .map(|g| g.split(", ").map(String::from).collect())
            .unwrap_or_default(),
        gpu_driver: get("gpu_driver"),
        gpu_memory_bytes: get("gpu_memory_bytes").and_then(|v| v.parse().ok()),
        power_limit_w,
        model: c.map(|c| match &c.model {
            ModelRef::Preset(p) | ModelRef::Path(p) => p.clone(),
        }),
        data: c.map(|c| c.data_path.clone()),
        steps: c.map(|c| c.steps),
        warmup_steps: c.map(|c| c.warmup_steps),
        seed: c.map(|c| c.seed),
        lr: c.and_then(|c| c.lr),
        lora_alpha: c.map(|c| c.lora_alpha),
        lora_dropout: c.map(|c| c.lora_dropout),
        lora_targets: c
            .map(|c| {
                c.lora_targets
                    .iter()
                    .map(|t| t.as_str().to_string())
                    .collect()
            })
            .unwrap_or_default(),
        lora_ranks: ranks,
        // One limit for the sweep only when every point has it (a `card` axis gives each its own).
        vram_limit_bytes: c
            .and_then(|c| c.vram_limit_bytes)
            .filter(|l| configs.iter().all(|x| x.vram_limit_bytes == Some(*l))),
        points,
        runs: runs.len(),
        slurm_nodes: nodes,
        slurm_jobs: jobs,
    }
}

impl SweepMeta {
    /// The metadata as `(key, value)` text pairs, in field order, empty values left out
    /// (CSV comment lines, the HTML report's list).
    pub fn pairs(&self) -> Vec<(String, String)> {
        let v = serde_json::to_value(self).unwrap_or_default();
        let mut out = Vec::new();
        if let serde_json::Value::Object(m) = v {
            for (k, v) in m {
                let text = match v {
                    serde_json::Value::Null => continue,
                    serde_json::Value::String(s) => s,
                    serde_json::Value::Array(a) if a.is_empty() => continue,
                    serde_json::Value::Array(a) => a
                        .iter()
                        .map(|x| match x {
                            serde_json::Value::String(s) => s.clone(),
                            x => x.to_string(),
                        })
                        .collect::<Vec<_>>()
                        .join(", "),
                    // Byte counts also in GiB, as the tables show memory.
                    serde_json::Value::Number(n) if k.ends_with("_bytes") => match n.as_u64() {
                        Some(b) => format!("{} GiB ({b} bytes)", super::gib(b)),
                        None => n.to_string(),
                    },
                    v => v.to_string(),
                };
                out.push((k, text));
            }
        }
        out
    }
}
