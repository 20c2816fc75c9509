//! Grid expansion: a [`Profile`] becomes an ordered list of [`RunSpec`]s, each with a stable id.
//!
//! **Order.** `include` points first (in the order written), then the factorial product of the
//! axes in this nesting (outermost first): batch_size, seq_len, optimizer, precision, quant,
//! lora_rank, grad_checkpointing — each axis in the order written. `exclude` prunes factorial
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

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::profile::{
    ALL_GPUS, Axes, GridSection, LoadedProfile, PartialPoint, Profile, parse_bytes,
};
use crate::spec::{DataFormat, Device, DeviceKind, LoraTarget, Optimizer, Precision, Quant};

/// One point of the grid: a value for every axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Point {
    /// Sequences per step.
    pub batch_size: u32,
    /// Tokens per sequence.
    pub seq_len: u32,
    /// The optimizer.
    pub optimizer: Optimizer,
    /// Compute precision.
    pub precision: Precision,
    /// Base-weight quantisation.
    pub quant: Quant,
    /// Adapter rank r.
    pub lora_rank: u32,
    /// Activation checkpointing on.
    pub grad_checkpointing: bool,
}

impl Point {
    /// Short human label, e.g. `bs2 seq128 adamw fp32 none r8 gc`.
    pub fn label(&self) -> String {
        format!(
            "bs{} seq{} {} {} {} r{}{}",
            self.batch_size,
            self.seq_len,
            self.optimizer,
            self.precision,
            self.quant,
            self.lora_rank,
            if self.grad_checkpointing { " gc" } else { "" }
        )
    }

    /// Whether every key set in `p` equals this point's value.
    pub fn matches(&self, p: &PartialPoint) -> bool {
        p.batch_size.is_none_or(|v| v == self.batch_size)
            && p.seq_len.is_none_or(|v| v == self.seq_len)
            && p.optimizer.is_none_or(|v| v == self.optimizer)
            && p.precision.is_none_or(|v| v == self.precision)
            && p.quant.is_none_or(|v| v == self.quant)
            && p.lora_rank.is_none_or(|v| v == self.lora_rank)
            && p.grad_checkpointing
                .is_none_or(|v| v == self.grad_checkpointing)
    }

    /// The point an `include` entry describes: unset keys take each axis's first value.
    pub fn complete(p: &PartialPoint, axes: &Axes) -> Point {
        Point {
            batch_size: p.batch_size.unwrap_or(axes.batch_size[0]),
            seq_len: p.seq_len.unwrap_or(axes.seq_len[0]),
            optimizer: p.optimizer.unwrap_or(axes.optimizer[0]),
            precision: p.precision.unwrap_or(axes.precision[0]),
            quant: p.quant.unwrap_or(axes.quant[0]),
            lora_rank: p.lora_rank.unwrap_or(axes.lora_rank[0]),
            grad_checkpointing: p.grad_checkpointing.unwrap_or(axes.grad_checkpointing[0]),
        }
    }

    /// This point with every key set (an `include` or `exclude` entry matching it alone).
    pub fn to_partial(&self) -> PartialPoint {
        PartialPoint {
            batch_size: Some(self.batch_size),
            seq_len: Some(self.seq_len),
            optimizer: Some(self.optimizer),
            precision: Some(self.precision),
            quant: Some(self.quant),
            lora_rank: Some(self.lora_rank),
            grad_checkpointing: Some(self.grad_checkpointing),
        }
    }
}

/// The full factorial product of `axes`, in the documented nesting order.
pub fn factorial(axes: &Axes) -> Vec<Point> {
    let mut out = Vec::new();
    for &batch_size in &axes.batch_size {
        for &seq_len in &axes.seq_len {
            for &optimizer in &axes.optimizer {
                for &precision in &axes.precision {
                    for &quant in &axes.quant {
                        for &lora_rank in &axes.lora_rank {
                            for &grad_checkpointing in &axes.grad_checkpointing {
                                out.push(Point {
                                    batch_size,
                                    seq_len,
                                    optimizer,
                                    precision,
                                    quant,
                                    lora_rank,
                                    grad_checkpointing,
                                });
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// Result of [`expand_points`].
#[derive(Debug, Clone, PartialEq)]
pub struct PointExpansion {
    /// Includes, then the factorial minus excludes; no duplicates.
    pub points: Vec<Point>,
    /// Indices of `exclude` entries that matched no factorial point (likely typos).
    pub unmatched_excludes: Vec<usize>,
}

/// Expands `[grid]` into points (see the module docs for the order).
pub fn expand_points(g: &GridSection, default_rank: u32) -> PointExpansion {
    let axes = Axes::from_grid(g, default_rank);
    let all = factorial(&axes);
    let unmatched_excludes = g
        .exclude
        .iter()
        .enumerate()
        .filter(|(_, ex)| !all.iter().any(|p| p.matches(ex)))
        .map(|(i, _)| i)
        .collect();
    let mut points: Vec<Point> = Vec::new();
    let includes = g.include.iter().map(|p| Point::complete(p, &axes));
    let kept = all
        .into_iter()
        .filter(|p| !g.exclude.iter().any(|ex| p.matches(ex)));
    for p in includes.chain(kept) {
        if !points.contains(&p) {
            points.push(p);
        }
    }
    PointExpansion {
        points,
        unmatched_excludes,
    }
}

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
    /// `lora.targets`, sorted and deduplicated.
    pub lora_targets: Vec<LoraTarget>,
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
        let targets: Vec<&str> = c.lora_targets.iter().map(|t| t.as_str()).collect();
        push("--lora-targets", targets.join(","));
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
            vram_limit_bytes: p.run.vram_limit.as_deref().and_then(parse_bytes),
            device_kind,
            point,
        };
        let id = config.stable_id();
        if specs.iter().any(|s| s.id == id) {
            continue;
        }
        specs.push(RunSpec {
            id,
            index: specs.len(),
            config,
            model_arg: model_arg.clone(),
            data_arg: data_arg.clone(),
            vram_limit: p.run.vram_limit.clone(),
        });
    }
    specs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::parse_str;

    const BASE: &str = r#"
[model]
preset = "tiny"
[data]
path = "sample"
[run]
steps = 10
warmup_steps = 2
[grid]
batch_size = [1, 2]
seq_len = [64, 128]
optimizer = ["adamw", "paged_adamw8bit"]
"#;

    fn specs(src: &str) -> Vec<RunSpec> {
        let p = parse_str(src, "t.toml").unwrap();
        expand_profile(&p, Path::new("/profiles"))
    }

    #[test]
    fn factorial_order_and_count() {
        let s = specs(BASE);
        assert_eq!(s.len(), 8);
        let labels: Vec<String> = s.iter().map(|s| s.label()).collect();
        assert_eq!(labels[0], "bs1 seq64 adamw fp32 none r16");
        assert_eq!(labels[1], "bs1 seq64 paged_adamw8bit fp32 none r16");
        assert_eq!(labels[2], "bs1 seq128 adamw fp32 none r16");
        assert_eq!(labels[7], "bs2 seq128 paged_adamw8bit fp32 none r16");
        assert!(s.iter().enumerate().all(|(i, s)| s.index == i));
    }

    #[test]
    fn excludes_and_includes() {
        let src = format!(
            "{BASE}\n[[grid.exclude]]\nbatch_size = 2\nseq_len = 128\n\
             [[grid.exclude]]\noptimizer = \"paged_adamw8bit\"\nseq_len = 64\n\
             [[grid.include]]\nbatch_size = 8\nprecision = \"bf16\"\n\
             [[grid.include]]\nbatch_size = 1\n"
        );
        let s = specs(&src);
        let labels: Vec<String> = s.iter().map(|s| s.label()).collect();
        assert_eq!(
            labels,
            vec![
                "bs8 seq64 adamw bf16 none r16",
                // include {batch_size=1} = the first factorial point: kept once, here
                "bs1 seq64 adamw fp32 none r16",
                "bs1 seq128 adamw fp32 none r16",
                "bs1 seq128 paged_adamw8bit fp32 none r16",
                "bs2 seq64 adamw fp32 none r16",
            ]
        );
    }

    #[test]
    fn ids_are_stable_and_sensitive() {
        let a = specs(BASE);
        let b = specs(BASE);
        assert_eq!(a, b);
        let ids: std::collections::HashSet<_> = a.iter().map(|s| s.id.clone()).collect();
        assert_eq!(ids.len(), a.len());
        assert!(a.iter().all(|s| s.id.len() == 12));
        // Frozen: changing the canonical form must be deliberate (bump the v1 prefix).
        insta::assert_snapshot!(
            a.iter()
                .map(|s| s.id.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        );

        // Name, repeats and device index do not change ids; steps and device kind do.
        let renamed = specs(&format!("name = \"other\"\n{BASE}").replace(
            "warmup_steps = 2",
            "warmup_steps = 2\nrepeats = 3\ndevices = [\"cpu\"]",
        ));
        assert_eq!(renamed[0].id, a[0].id);
        let more_steps = specs(&BASE.replace("steps = 10", "steps = 11"));
        assert_ne!(more_steps[0].id, a[0].id);
        let gpu0 = specs(&BASE.replace(
            "warmup_steps = 2",
            "warmup_steps = 2\ndevices = [\"cuda:0\"]",
        ));
        let gpu1 = specs(&BASE.replace(
            "warmup_steps = 2",
            "warmup_steps = 2\ndevices = [\"cuda:1\", \"cuda:0\"]",
        ));
        assert_ne!(gpu0[0].id, a[0].id);
        assert_eq!(gpu0[0].id, gpu1[0].id);
        // Target order is canonicalised.
        let t1 = specs(&format!("{BASE}\n[lora]\ntargets = [\"v\", \"q\"]\n"));
        let t2 = specs(&format!("{BASE}\n[lora]\ntargets = [\"q\", \"v\"]\n"));
        assert_eq!(t1[0].id, t2[0].id);
    }

    #[test]
    fn train_args() {
        let src = BASE.replace(
            "path = \"sample\"",
            "path = \"data/a.jsonl\"\npacking = false",
        ) + "grad_checkpointing = [true]\nquant = [\"nf4\"]\n";
        let src = src.replace(
            "warmup_steps = 2",
            "warmup_steps = 2\nvram_limit = \"8GiB\"\ndevices = [\"cuda:1\"]\nlr = 0.0002",
        );
        let s = specs(&src);
        insta::assert_snapshot!(s[0].train_args().join(" "), @"train --model tiny --data /profiles/data/a.jsonl --format auto --batch-size 1 --seq-len 64 --steps 10 --warmup-steps 2 --lora-rank 16 --lora-alpha 32 --lora-dropout 0 --lora-targets q,k,v,o --lr 0.0002 --seed 0 --device cuda:0 --precision fp32 --quant nf4 --optimizer adamw --vram-limit 8GiB --no-packing --grad-checkpointing --json");
    }

    #[test]
    fn embedded_quickstart_has_four_points() {
        let lp = crate::profile::load_embedded().expect("embedded quickstart parses");
        assert_eq!(expand(&lp).len(), 4);
    }

    /// The profile decides "an exclude matches nothing" and "no point is left" from the axes
    /// alone; here every small combination of excludes (and an include or none) is checked
    /// against the expansion itself.
    #[test]
    fn profile_validation_agrees_with_the_expansion() {
        let base = parse_str(
            &BASE.replace(
                "optimizer = [\"adamw\", \"paged_adamw8bit\"]",
                "optimizer = [\"adamw\"]",
            ),
            "t.toml",
        )
        .unwrap();
        let pp = |f: &dyn Fn(&mut PartialPoint)| {
            let mut p = PartialPoint::default();
            f(&mut p);
            p
        };
        let candidates = [
            pp(&|p| p.batch_size = Some(1)),
            pp(&|p| p.batch_size = Some(2)),
            pp(&|p| p.batch_size = Some(4)),
            pp(&|p| p.seq_len = Some(64)),
            pp(&|p| p.seq_len = Some(128)),
            pp(&|p| {
                p.batch_size = Some(1);
                p.seq_len = Some(64);
            }),
            pp(&|p| {
                p.batch_size = Some(2);
                p.seq_len = Some(128);
            }),
            pp(&|p| p.optimizer = Some(Optimizer::AdamW)),
            pp(&|p| p.optimizer = Some(Optimizer::AdamW8bit)),
            pp(&|p| p.grad_checkpointing = Some(false)),
            pp(&|p| p.grad_checkpointing = Some(true)),
            pp(&|p| p.lora_rank = Some(16)),
        ];
        let n = candidates.len();
        let mut picks: Vec<Vec<usize>> = vec![vec![]];
        for a in 0..n {
            picks.push(vec![a]);
            for b in a + 1..n {
                picks.push(vec![a, b]);
                for c in b + 1..n {
                    picks.push(vec![a, b, c]);
                }
            }
        }
        let (mut rejected, mut empty) = (0, 0);
        for pick in &picks {
            for include in [None, Some(pp(&|p| p.batch_size = Some(8)))] {
                let mut p = base.clone();
                p.grid.exclude = pick.iter().map(|&i| candidates[i].clone()).collect();
                p.grid.include = include.into_iter().collect();
                let e = expand_points(&p.grid, p.lora.rank);
                let want = match (e.unmatched_excludes.first(), e.points.is_empty()) {
                    (Some(i), _) => Some(format!(
                        "grid.exclude[{i}]: this exclude entry matches no point"
                    )),
                    (None, true) => Some("grid: the grid has no points left".to_string()),
                    (None, false) => None,
                };
                let text = toml::to_string(&p).unwrap();
                let got = parse_str(&text, "t.toml").err().map(|e| e.to_string());
                match (&want, &got) {
                    (None, None) => {}
                    (Some(w), Some(g)) if g.contains(w.as_str()) => {}
                    _ => panic!("excludes {pick:?}: expected {want:?}, got {got:?}\n{text}"),
                }
                rejected += usize::from(want.is_some());
                empty += usize::from(e.points.is_empty());
            }
        }
        // Both kinds of failure, and passes, are among the cases.
        assert!(empty > 0 && rejected > empty && rejected < 2 * picks.len());
    }

    /// Imports point down: the data modules use neither the front ends (cli, ui, daemon, the
    /// worker command) nor the orchestrator; the profile does not use the grid; telemetry
    /// uses only spec.
    #[test]
    fn data_modules_import_down() {
        let files: &[(&str, &str)] = &[
            ("grid.rs", include_str!("grid.rs")),
            ("telemetry.rs", include_str!("telemetry.rs")),
            ("store/mod.rs", include_str!("store/mod.rs")),
            ("store/runs.rs", include_str!("store/runs.rs")),
            ("report.rs", include_str!("report.rs")),
            ("summary.rs", include_str!("summary.rs")),
            ("profile/mod.rs", include_str!("profile/mod.rs")),
            ("profile/schema.rs", include_str!("profile/schema.rs")),
            ("profile/error.rs", include_str!("profile/error.rs")),
            ("profile/validate.rs", include_str!("profile/validate.rs")),
            ("profile/load.rs", include_str!("profile/load.rs")),
            ("profile/devices.rs", include_str!("profile/devices.rs")),
            ("profile/tests.rs", include_str!("profile/tests.rs")),
        ];
        let uses = |src: &str, module: &str| {
            let pat = format!("crate::{module}");
            src.lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .any(|l| l.contains(&pat))
        };
        for (name, src) in files {
            for up in ["cli", "ui", "daemon", "worker", "orchestrator"] {
                assert!(!uses(src, up), "src/{name} uses crate::{up}");
            }
            if name.starts_with("profile/") {
                assert!(!uses(src, "grid"), "src/{name} uses crate::grid");
            }
            if *name == "telemetry.rs" {
                for other in ["profile", "grid", "store", "summary", "report", "engine"] {
                    assert!(!uses(src, other), "src/{name} uses crate::{other}");
                }
            }
        }
    }
}
