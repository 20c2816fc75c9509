//! Grid expansion: a [`Profile`] becomes an ordered list of [`RunSpec`]s, each with a stable id.
//!
//! **Order.** `include` points first (in the order written), then the factorial product of the
//! axes in this nesting (outermost first): card, batch_size, seq_len, optimizer, precision,
//! quant, lora_rank, grad_checkpointing — each axis in the order written. `exclude` prunes factorial
//! points only (an `include` is always kept). Duplicates (same id) keep their first position.
//!
//! **Stable id.** `id` = the first 12 hex characters of
//! `sha256("lorascope.runspec.v1\n" + json(ResolvedConfig))`, where `json` is serde_json's
//! compact output of [`ResolvedConfig`] (fields in declaration order, lora targets sorted and
//! deduplicated, `vram_limit` as bytes). It covers everything that changes a run's result:
//! model (preset or path, as written), data (path as written, format, packing), LoRA alpha,
//! dropout and targets, steps, warmup steps, seed, lr, VRAM limit, the device *kind*
//! (cpu/cuda) and the point's axis values. It leaves out what does not: the profile's name,
//! `repeats`, which GPU index runs it, and the point's position in the grid. So the same point
//! has the same id across sweeps, profiles and machines.
//!
//! Known limits: the *contents* of a data file or model directory are not hashed (only the
//! path as written), nor is the lorascope version — the same id across engine versions is
//! what lets a benchmark be compared before and after an engine change.

mod points;
#[cfg(test)]
mod tests;

pub use points::{Point, PointExpansion, expand_points, factorial};

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::profile::{ALL_GPUS, LoadedProfile, Profile, parse_bytes};
use crate::spec::{DataFormat, Device, DeviceKind, LoraModule};

/// The model a run trains: a preset name or a directory (as written in the profile).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelRef {
    /// `model.preset`.
    Preset(String),
    /// `model.path`, as written (relative to the profile).
    Path(String),
}

/// Everything that determines a run's result; hashed for [`RunSpec::id`].
/// Field order is part of the id: do not reorder (bump the `v1` prefix instead).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResolvedConfig {
    /// The model, as written.
    pub model: ModelRef,
    /// `data.path`, as written.
    pub data_path: String,
    /// `data.format`.
    pub data_format: DataFormat,
    /// `data.packing`.
    pub packing: bool,
    /// `lora.alpha`.
    pub lora_alpha: f64,
    /// `lora.dropout`.
    pub lora_dropout: f64,
    /// `lora.targets` (PEFT module names), sorted and deduplicated.
    pub lora_targets: Vec<LoraModule>,
    /// `run.steps`.
    pub steps: u32,
    /// `run.warmup_steps`.
    pub warmup_steps: u32,
    /// `run.seed`.
    pub seed: u64,
    /// `run.lr` (`None`: the worker's default).
    pub lr: Option<f64>,
    /// `run.vram_limit` in bytes.
    pub vram_limit_bytes: Option<u64>,
    /// CPU or CUDA (not the GPU index).
    pub device_kind: DeviceKind,
    /// The point's axis values.
    pub point: Point,
}

impl ResolvedConfig {
    /// The stable id: first 12 hex chars of sha256 over the canonical serialisation.
    pub fn stable_id(&self) -> String {
        let json = serde_json::to_string(self).expect("ResolvedConfig serialises");
        let mut h = Sha256::new();
        h.update(b"lorascope.runspec.v1\n");
        h.update(json.as_bytes());
        let digest = h.finalize();
        hex::encode(digest)[..12].to_string()
    }
}

/// One point of a sweep, ready to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    /// Stable id (12 hex chars), see the module docs.
    pub id: String,
    /// Position in the expanded grid (0-based).
    pub index: usize,
    /// What the id hashes.
    pub config: ResolvedConfig,
    /// `--model` value for the worker: the preset, or the directory resolved against the
    /// profile's directory.
    pub model_arg: String,
    /// `--data` value: `sample`, or the path resolved against the profile's directory.
    pub data_arg: String,
    /// `--vram-limit` value as written in the profile.
    pub vram_limit: Option<String>,
    /// `run.verify_oom`: run the point even when predicted over its VRAM limit. Not part of
    /// the id (it decides whether the point runs, not its result).
    #[serde(default)]
    pub verify_oom: bool,
}

impl RunSpec {
    /// Short human label of the point.
    pub fn label(&self) -> String {
        self.config.point.label()
    }

    /// The worker's argv after the program name:
    /// `train --model .. --data .. --batch-size .. ... --json`.
    ///
    /// The device is `cpu`, or `cuda:0` for CUDA runs: the orchestrator pins each child to
    /// its GPU with `CUDA_VISIBLE_DEVICES`, so the child always sees its GPU as device 0.
    pub fn train_args(&self) -> Vec<String> {
        let c = &self.config;
        let p = &c.point;
        let mut a: Vec<String> = Vec::new();
        let mut push = |k: &str, v: String| {
            a.push(k.to_string());
            a.push(v);
        };
        push("--model", self.model_arg.clone());
        push("--data", self.data_arg.clone());
        push("--format", c.data_format.to_string());
        push("--batch-size", p.batch_size.to_string());
        push("--seq-len", p.seq_len.to_string());
        push("--steps", c.steps.to_string());
        push("--warmup-steps", c.warmup_steps.to_string());
        push("--lora-rank", p.lora_rank.to_string());
        push("--lora-alpha", fmt_f64(c.lora_alpha));
        push("--lora-dropout", fmt_f64(c.lora_dropout));
        push("--lora-targets", LoraModule::join(&c.lora_targets));
        if let Some(lr) = c.lr {
            push("--lr", fmt_f64(lr));
        }
        push("--seed", c.seed.to_string());
        let device = match c.device_kind {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda:0",
        };
        push("--device", device.to_string());
        push("--precision", p.precision.to_string());
        push("--quant", p.quant.to_string());
        push("--optimizer", p.optimizer.to_string());
        if let Some(v) = &self.vram_limit {
            push("--vram-limit", v.clone());
        }
        let mut args = vec!["train".to_string()];
        args.extend(a);
        if !c.packing {
            args.push("--no-packing".into());
        }
        if p.grad_checkpointing {
            args.push("--grad-checkpointing".into());
        }
        args.push("--json".into());
        args
    }
}

fn fmt_f64(v: f64) -> String {
    // `{}` on f64 is the shortest representation that round-trips.
    format!("{v}")
}

/// Expands a loaded profile into run specs (see the module docs for order and ids).
pub fn expand(lp: &LoadedProfile) -> Vec<RunSpec> {
    expand_profile(&lp.profile, &lp.base_dir)
}

/// Expands a profile; relative `data.path`/`model.path` are resolved against `base_dir`.
pub fn expand_profile(p: &Profile, base_dir: &Path) -> Vec<RunSpec> {
    let resolve = |s: &str| -> String {
        let path = PathBuf::from(s);
        if path.is_absolute() {
            s.to_string()
        } else {
            base_dir.join(path).display().to_string()
        }
    };
    let (model, model_arg) = match (&p.model.preset, &p.model.path) {
        (Some(preset), _) => (ModelRef::Preset(preset.clone()), preset.clone()),
        (None, Some(path)) => (ModelRef::Path(path.clone()), resolve(path)),
        (None, None) => (ModelRef::Preset(String::new()), String::new()),
    };
    let data_arg = if p.data.path == "sample" {
        "sample".to_string()
    } else {
        resolve(&p.data.path)
    };
    let mut targets = p.lora.targets.clone();
    targets.sort();
    targets.dedup();
    let device_kind = p
        .run
        .devices
        .first()
        .and_then(|d| {
            if d == ALL_GPUS {
                Some(DeviceKind::Cuda)
            } else {
                Device::parse(d).map(Device::kind)
            }
        })
        .unwrap_or(DeviceKind::Cpu);
    let mut specs: Vec<RunSpec> = Vec::new();
    let mut ids: HashSet<String> = HashSet::new();
    for point in expand_points(&p.grid, p.lora.rank).points {
        let config = ResolvedConfig {
            model: model.clone(),
            data_path: p.data.path.clone(),
            data_format: p.data.format,
            packing: p.data.packing,
            lora_alpha: p.lora.alpha,
            lora_dropout: p.lora.dropout,
            lora_targets: targets.clone(),
            steps: p.run.steps,
            warmup_steps: p.run.warmup_steps,
            seed: p.run.seed,
            lr: p.run.lr,
            vram_limit_bytes: match point.card {
                Some(c) => Some(c.bytes()),
                None => p.run.vram_limit.as_deref().and_then(parse_bytes),
            },
            device_kind,
            point,
        };
        let id = config.stable_id();
        if !ids.insert(id.clone()) {
            continue;
        }
        specs.push(RunSpec {
            id,
            index: specs.len(),
            config,
            model_arg: model_arg.clone(),
            data_arg: data_arg.clone(),
            vram_limit: match point.card {
                Some(c) => Some(c.to_string()),
                None => p.run.vram_limit.clone(),
            },
            verify_oom: p.run.verify_oom,
        });
    }
    specs
}

/// The label of `specs[index]` with only the axes that vary over `specs` (`bs2 seq1024 nf4`),
/// as the dashboard and the queue verbs name a point; the full [`RunSpec::label`] when no
/// axis varies; empty for an index out of range.
pub fn varying_label(specs: &[RunSpec], index: usize) -> String {
    let Some(spec) = specs.get(index) else {
        return String::new();
    };
    let p = spec.config.point;
    let varies = |g: &dyn Fn(&Point) -> String| {
        let first = g(&specs[0].config.point);
        specs.iter().any(|s| g(&s.config.point) != first)
    };
    let mut parts = Vec::new();
    if varies(&|p| p.batch_size.to_string()) {
        parts.push(format!("bs{}", p.batch_size));
    }
    if varies(&|p| p.seq_len.to_string()) {
        parts.push(format!("seq{}", p.seq_len));
    }
    if varies(&|p| p.optimizer.to_string()) {
        parts.push(p.optimizer.to_string());
    }
    if varies(&|p| p.precision.to_string()) {
        parts.push(p.precision.to_string());
    }
    if varies(&|p| p.quant.to_string()) {
        parts.push(p.quant.to_string());
    }
    if varies(&|p| p.lora_rank.to_string()) {
        parts.push(format!("r{}", p.lora_rank));
    }
    if varies(&|p| p.grad_checkpointing.to_string()) {
        parts.push(if p.grad_checkpointing { "gc" } else { "no-gc" }.into());
    }
    if parts.is_empty() {
        spec.label()
    } else {
        parts.join(" ")
    }
}
