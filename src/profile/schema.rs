//! The serde types of a profile, one per TOML section, with their defaults. Unknown keys are
//! rejected everywhere (`deny_unknown_fields`); what serde cannot check (ranges, emptiness,
//! consistency) is checked by [`super::validate`].

use serde::{Deserialize, Serialize};

use crate::spec::{Card, DataFormat, LoraModule, LoraTarget, Optimizer, Precision, Quant};

/// A parsed, validated profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Optional human name; defaults to the file stem.
    #[serde(default)]
    pub name: Option<String>,
    /// `[model]` (required).
    pub model: ModelSection,
    /// `[data]` (required).
    pub data: DataSection,
    /// `[lora]` (optional: rank 16, alpha 32, no dropout, q/k/v/o).
    #[serde(default)]
    pub lora: LoraSection,
    /// `[run]` (required: at least `steps`).
    pub run: RunSection,
    /// `[grid]` (optional: one point of default axis values).
    #[serde(default)]
    pub grid: GridSection,
    /// `[slurm]` (optional): how `run.backend = "slurm"` submits. Only read by that backend;
    /// a `[slurm]` table with `backend = "local"` is refused (it would be silently unused).
    #[serde(default)]
    pub slurm: Option<SlurmSection>,
}

/// Where a sweep's runs execute (`run.backend`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Child processes on this machine, one at a time per entry of `run.devices`.
    #[default]
    Local,
    /// One Slurm job array per submission, one task per point (`[slurm]`).
    Slurm,
}

/// `[slurm]`: the `sbatch` options of the one job array a submission makes. Every key is
/// optional; absent ones leave the cluster's default (partition, account, QOS, time limit).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmSection {
    /// `--partition` (default: the cluster's default partition).
    #[serde(default)]
    pub partition: Option<String>,
    /// `--gres` per task (default `gpu:1`; `""` = no gres, for CPU partitions).
    #[serde(default = "default_gres")]
    pub gres: String,
    /// `--time` per task, in Slurm's syntax (`MM`, `HH:MM:SS`, `D-HH`...).
    #[serde(default)]
    pub time: Option<String>,
    /// `--account`.
    #[serde(default)]
    pub account: Option<String>,
    /// `--qos`.
    #[serde(default)]
    pub qos: Option<String>,
    /// At most this many tasks of the array run at once (`--array=...%N`; default: no limit).
    #[serde(default)]
    pub array_parallelism: Option<u32>,
    /// Options passed to `sbatch` verbatim, after the generated ones (e.g. `["--mem=16G"]`).
    #[serde(default)]
    pub extra_args: Vec<String>,
    /// A directory every node sees, for the batch scripts, the workers' JSON lines and their
    /// logs (`<workdir>/<sweep id>/`). Default: `lorascope-slurm/` next to the results
    /// database. Relative paths are relative to the profile.
    #[serde(default)]
    pub workdir: Option<String>,
}

fn default_gres() -> String {
    "gpu:1".to_string()
}

impl Default for SlurmSection {
    fn default() -> Self {
        SlurmSection {
            partition: None,
            gres: default_gres(),
            time: None,
            account: None,
            qos: None,
            array_parallelism: None,
            extra_args: Vec::new(),
            workdir: None,
        }
    }
}

/// `[model]`: a preset name (e.g. `tiny`, `qwen2.5-1.5b`) or a model directory. Exactly one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A model preset of the engine (`tiny`, or a published config in `src/engine/presets/`).
    #[serde(default)]
    pub preset: Option<String>,
    /// A directory with `config.json` and safetensors weights, relative to the profile.
    #[serde(default)]
    pub path: Option<String>,
}

/// `[data]`: dataset path (`"sample"` = the bundled sample), format and packing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// A JSONL file relative to the profile, or `"sample"`.
    pub path: String,
    /// How records are read (`auto` detects it from the first record).
    #[serde(default)]
    pub format: DataFormat,
    /// Pack several records into one sequence (default true).
    #[serde(default = "default_true")]
    pub packing: bool,
}

fn default_true() -> bool {
    true
}

/// `[lora]`: adapter settings. `rank` is the default of the `grid.lora_rank` axis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    /// Adapter rank r (> 0) when `grid.lora_rank` is absent.
    #[serde(default = "default_rank")]
    pub rank: u32,
    /// Scaling numerator (> 0): the adapter's output is scaled by `alpha / r` (PEFT's
    /// `lora_alpha`).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Dropout probability on the adapter input, in [0, 1) (PEFT's `lora_dropout`).
    #[serde(default)]
    pub dropout: f64,
    /// Modules that get an adapter, as PEFT names them (`q` or `q_proj` ... `down`,
    /// Phi-3's `qkv_proj` and `gate_up_proj`, `all-linear`); non-empty, no duplicates.
    #[serde(default = "default_targets")]
    pub targets: Vec<LoraModule>,
}

fn default_rank() -> u32 {
    16
}
fn default_alpha() -> f64 {
    32.0
}
pub(super) fn default_targets() -> Vec<LoraModule> {
    [LoraTarget::Q, LoraTarget::K, LoraTarget::V, LoraTarget::O]
        .map(LoraModule::One)
        .to_vec()
}

impl Default for LoraSection {
    fn default() -> Self {
        LoraSection {
            rank: default_rank(),
            alpha: default_alpha(),
            dropout: 0.0,
            targets: default_targets(),
        }
    }
}

/// `[run]`: settings shared by every point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// Optimizer steps per run (> 0).
    pub steps: u32,
    /// Steps excluded from the timed window.
    #[serde(default)]
    pub warmup_steps: u32,
    /// Runs per point (> 0); the report gives the median and min-max.
    #[serde(default = "default_repeats")]
    pub repeats: u32,
    /// Seed of the data order, adapter init, dropout and synthetic (preset) weights.
    #[serde(default)]
    pub seed: u64,
    /// e.g. `"8GiB"` or a card name (`"rtx4060"`, [`crate::spec::Card`]): passed to the
    /// worker as `--vram-limit`, which emulates a card of that
    /// size by reserving the rest of the GPU's free memory before the model loads (capacity
    /// only: bandwidth and compute are the real card's). CUDA devices only. The accepted
    /// sizes are those of [`parse_bytes`].
    #[serde(default)]
    pub vram_limit: Option<String>,
    /// `["cpu"]` or `["cuda:0", "cuda:1", ...]`: one run at a time per device.
    #[serde(default = "default_devices")]
    pub devices: Vec<String>,
    /// Learning rate; the worker's default when absent.
    #[serde(default)]
    pub lr: Option<f64>,
    /// Run CUDA points that the memory model predicts over their VRAM limit (by more than
    /// its stated error) instead of recording them `predicted-oom`, to check the prediction.
    #[serde(default)]
    pub verify_oom: bool,
    /// `local` (default) or `slurm` (see `[slurm]`). With `slurm`, `devices` names the one
    /// device each task uses (`["cpu"]` or `["cuda:0"]`, the GPU Slurm gives the task).
    #[serde(default)]
    pub backend: Backend,
}

fn default_repeats() -> u32 {
    1
}
fn default_devices() -> Vec<String> {
    vec!["cpu".to_string()]
}

/// `[grid]`: axes (each a list) plus `exclude` / `include` point tables. An absent axis has
/// one value, see [`Axes`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GridSection {
    /// Sequences per step; `"max"` ([`AXIS_MAX`]): the largest that fits the point's limit.
    #[serde(default, with = "max_axis")]
    pub batch_size: Option<Vec<u32>>,
    /// Tokens per sequence; `"max"` ([`AXIS_MAX`]) as for `batch_size`.
    #[serde(default, with = "max_axis")]
    pub seq_len: Option<Vec<u32>>,
    /// Optimizers.
    #[serde(default)]
    pub optimizer: Option<Vec<Optimizer>>,
    /// Compute precisions.
    #[serde(default)]
    pub precision: Option<Vec<Precision>>,
    /// Base-weight quantisations.
    #[serde(default)]
    pub quant: Option<Vec<Quant>>,
    /// Adapter ranks (absent: `lora.rank`).
    #[serde(default)]
    pub lora_rank: Option<Vec<u32>>,
    /// Activation checkpointing off / on.
    #[serde(default)]
    pub grad_checkpointing: Option<Vec<bool>>,
    /// Cards to emulate by name ([`Card`]: `"rtx4060"`, `"a100-40g"`, ...): each point runs
    /// once per card under that card's memory as its VRAM limit (capacity only; speed and
    /// power are the real GPU's). Excludes `run.vram_limit`.
    #[serde(default)]
    pub card: Option<Vec<Card>>,
    /// Factorial points matching every key of an entry are removed.
    #[serde(default)]
    pub exclude: Vec<PartialPoint>,
    /// Points added before the factorial ones; unset keys take each axis's first value.
    #[serde(default)]
    pub include: Vec<PartialPoint>,
}

/// The value of a `batch_size` or `seq_len` entry written `"max"`: the largest value whose
/// run fits the point's memory limit, predicted by the memory model and confirmed by short
/// probe runs when the sweep reaches the point ([`crate::orchestrator::fit`]).
pub const AXIS_MAX: u32 = u32::MAX;

/// (De)serialisation of an axis of integers that may hold `"max"` ([`AXIS_MAX`]).
mod max_axis {
    use super::AXIS_MAX;
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Deserialize, Serialize)]
    #[serde(untagged)]
    enum Value {
        Number(u32),
        Word(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u32>>, D::Error> {
        let Some(v) = Option::<Vec<Value>>::deserialize(d)? else {
            return Ok(None);
        };
        v.into_iter()
            .map(|x| match x {
                Value::Number(n) if n != AXIS_MAX => Ok(n),
                Value::Word(w) if w == "max" => Ok(AXIS_MAX),
                Value::Number(n) => Err(D::Error::custom(format!("{n} is too large"))),
                Value::Word(w) => Err(D::Error::custom(format!(
                    "expected a positive integer or \"max\", got {w:?}"
                ))),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    pub fn serialize<S: Serializer>(v: &Option<Vec<u32>>, s: S) -> Result<S::Ok, S::Error> {
        v.as_ref()
            .map(|v| {
                v.iter()
                    .map(|&n| match n {
                        AXIS_MAX => Value::Word("max".into()),
                        n => Value::Number(n),
                    })
                    .collect::<Vec<_>>()
            })
            .serialize(s)
    }
}

/// A point with some axes set (an `exclude` or `include` entry); `None` = not set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialPoint {
    /// See [`GridSection::batch_size`].
    #[serde(default)]
    pub batch_size: Option<u32>,
    /// See [`GridSection::seq_len`].
    #[serde(default)]
    pub seq_len: Option<u32>,
    /// See [`GridSection::optimizer`].
    #[serde(default)]
    pub optimizer: Option<Optimizer>,
    /// See [`GridSection::precision`].
    #[serde(default)]
    pub precision: Option<Precision>,
    /// See [`GridSection::quant`].
    #[serde(default)]
    pub quant: Option<Quant>,
    /// See [`GridSection::lora_rank`].
    #[serde(default)]
    pub lora_rank: Option<u32>,
    /// See [`GridSection::grad_checkpointing`].
    #[serde(default)]
    pub grad_checkpointing: Option<bool>,
    /// See [`GridSection::card`].
    #[serde(default)]
    pub card: Option<Card>,
}

/// The axes of `[grid]` with the defaults applied: every axis has at least one value, in the
/// order written. An absent (or empty) axis has one value: batch_size 1, seq_len 256,
/// optimizer adamw, precision fp32, quant none, lora_rank = `lora.rank`,
/// grad_checkpointing false, card none. The points themselves (the factorial product, includes and
/// excludes) are [`crate::grid`]'s.
#[derive(Debug, Clone, PartialEq)]
pub struct Axes {
    /// See [`GridSection::batch_size`].
    pub batch_size: Vec<u32>,
    /// See [`GridSection::seq_len`].
    pub seq_len: Vec<u32>,
    /// See [`GridSection::optimizer`].
    pub optimizer: Vec<Optimizer>,
    /// See [`GridSection::precision`].
    pub precision: Vec<Precision>,
    /// See [`GridSection::quant`].
    pub quant: Vec<Quant>,
    /// See [`GridSection::lora_rank`].
    pub lora_rank: Vec<u32>,
    /// See [`GridSection::grad_checkpointing`].
    pub grad_checkpointing: Vec<bool>,
    /// See [`GridSection::card`]; `[None]` when absent (the point's limit is `run.vram_limit`).
    pub card: Vec<Option<Card>>,
}

impl Axes {
    /// Axis values from `[grid]`; absent (or empty) axes get their single default
    /// (`default_rank` for `lora_rank`: the profile's `lora.rank`).
    pub fn from_grid(g: &GridSection, default_rank: u32) -> Axes {
        fn or<T: Clone>(v: &Option<Vec<T>>, d: T) -> Vec<T> {
            match v {
                Some(v) if !v.is_empty() => v.clone(),
                _ => vec![d],
            }
        }
        Axes {
            batch_size: or(&g.batch_size, 1),
            seq_len: or(&g.seq_len, 256),
            optimizer: or(&g.optimizer, Optimizer::AdamW),
            precision: or(&g.precision, Precision::Fp32),
            quant: or(&g.quant, Quant::None),
            lora_rank: or(&g.lora_rank, default_rank),
            grad_checkpointing: or(&g.grad_checkpointing, false),
            card: match &g.card {
                Some(v) if !v.is_empty() => v.iter().copied().map(Some).collect(),
                _ => vec![None],
            },
        }
    }
}

impl Axes {
    /// `(axis name, number of values)` for every axis, in [`Axes`] order.
    pub fn lens(&self) -> [(&'static str, usize); 8] {
        [
            ("batch_size", self.batch_size.len()),
            ("seq_len", self.seq_len.len()),
            ("optimizer", self.optimizer.len()),
            ("precision", self.precision.len()),
            ("quant", self.quant.len()),
            ("lora_rank", self.lora_rank.len()),
            ("grad_checkpointing", self.grad_checkpointing.len()),
            ("card", self.card.len()),
        ]
    }

    /// The number of points of the factorial product (saturating at `u64::MAX`), computed
    /// from the axis lengths without building a point.
    pub fn factorial_len(&self) -> u64 {
        self.lens()
            .iter()
            .fold(1u64, |acc, (_, n)| acc.saturating_mul(*n as u64))
    }
}

/// Parses a byte size such as `8GiB`, `512 MiB`, `8GB` or `1024` (bytes), or a card name of
/// [`Card`] (`rtx4060`: its memory capacity).
/// Binary units: KiB MiB GiB TiB; decimal units: KB MB GB TB; `B` or none = bytes.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    if let Some(card) = Card::parse(s) {
        return Some(card.bytes());
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "TiB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        _ => return None,
    };
    let v = num * mult;
    if !v.is_finite() || v < 1.0 {
        return None;
    }
    Some(v.round() as u64)
}
