//! Sweep profiles: the TOML schema (`profiles/*.toml`), validation, and error messages that
//! point at `file:line:column` and the key at fault.
//!
//! A profile has six sections; unknown keys are rejected everywhere:
//!
//! ```toml
//! [model]  preset = "tiny"            # or path = "models/qwen" (a directory); exactly one
//! [data]   path = "sample"            # "sample" = the bundled sample; format = "auto"; packing = true
//! [lora]   rank = 16, alpha = 32.0, dropout = 0.0, targets = ["q", "k", "v", "o"]
//! [run]    steps = 20, warmup_steps = 2, repeats = 1, seed = 0, devices = ["cpu"]
//!          # vram_limit = "8GiB", lr = 1e-4 (both optional)
//! [grid]   batch_size = [1, 2], seq_len = [64, 128], optimizer = ["adamw"], precision = ["fp32"],
//!          quant = ["none"], lora_rank = [8], grad_checkpointing = [false]
//! [[grid.exclude]]  seq_len = 128, batch_size = 2      # prune matching factorial points
//! [[grid.include]]  batch_size = 4                     # add a point (unset axes: first value)
//! ```
//!
//! Every grid axis is optional; an absent axis has one value (batch_size 1, seq_len 256,
//! optimizer adamw, precision fp32, quant none, lora_rank = `lora.rank`, grad_checkpointing
//! false). A present axis must be a non-empty list without duplicates.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::de::{DeTable, DeValue};

use crate::spec::{DataFormat, Device, LoraTarget, Optimizer, Precision, Quant};

/// A parsed, validated profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Optional human name; defaults to the file stem.
    #[serde(default)]
    pub name: Option<String>,
    pub model: ModelSection,
    pub data: DataSection,
    #[serde(default)]
    pub lora: LoraSection,
    pub run: RunSection,
    #[serde(default)]
    pub grid: GridSection,
}

/// `[model]`: a preset name (e.g. `tiny`, `qwen2.5-1.5b`) or a model directory. Exactly one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    #[serde(default)]
    pub preset: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
}

/// `[data]`: dataset path (`"sample"` = the bundled sample), format and packing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    pub path: String,
    #[serde(default)]
    pub format: DataFormat,
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
    #[serde(default = "default_rank")]
    pub rank: u32,
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_targets")]
    pub targets: Vec<LoraTarget>,
}

fn default_rank() -> u32 {
    16
}
fn default_alpha() -> f64 {
    32.0
}
fn default_targets() -> Vec<LoraTarget> {
    vec![LoraTarget::Q, LoraTarget::K, LoraTarget::V, LoraTarget::O]
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
    #[serde(default)]
    pub seed: u64,
    /// e.g. `"8GiB"`: passed to the worker as `--vram-limit`, which emulates a card of that
    /// size by reserving the rest of the GPU's free memory before the model loads (capacity
    /// only: bandwidth and compute are the real card's). CUDA devices only.
    #[serde(default)]
    pub vram_limit: Option<String>,
    /// `["cpu"]` or `["cuda:0", "cuda:1", ...]`: one run at a time per device.
    #[serde(default = "default_devices")]
    pub devices: Vec<String>,
    /// Learning rate; the worker's default when absent.
    #[serde(default)]
    pub lr: Option<f64>,
}

fn default_repeats() -> u32 {
    1
}
fn default_devices() -> Vec<String> {
    vec!["cpu".to_string()]
}

/// `[grid]`: axes (each a list) plus `exclude` / `include` point tables.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GridSection {
    #[serde(default)]
    pub batch_size: Option<Vec<u32>>,
    #[serde(default)]
    pub seq_len: Option<Vec<u32>>,
    #[serde(default)]
    pub optimizer: Option<Vec<Optimizer>>,
    #[serde(default)]
    pub precision: Option<Vec<Precision>>,
    #[serde(default)]
    pub quant: Option<Vec<Quant>>,
    #[serde(default)]
    pub lora_rank: Option<Vec<u32>>,
    #[serde(default)]
    pub grad_checkpointing: Option<Vec<bool>>,
    /// Factorial points matching every key of an entry are removed.
    #[serde(default)]
    pub exclude: Vec<PartialPoint>,
    /// Points added before the factorial ones; unset keys take each axis's first value.
    #[serde(default)]
    pub include: Vec<PartialPoint>,
}

/// A point with some axes set (an `exclude` or `include` entry).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialPoint {
    #[serde(default)]
    pub batch_size: Option<u32>,
    #[serde(default)]
    pub seq_len: Option<u32>,
    #[serde(default)]
    pub optimizer: Option<Optimizer>,
    #[serde(default)]
    pub precision: Option<Precision>,
    #[serde(default)]
    pub quant: Option<Quant>,
    #[serde(default)]
    pub lora_rank: Option<u32>,
    #[serde(default)]
    pub grad_checkpointing: Option<bool>,
}

/// `run.devices = ["cuda"]`: one slot per GPU this process can see.
pub const ALL_GPUS: &str = "cuda";

/// The device slots of `run.devices` (already validated): each `cpu` / `cuda:N` entry, or for
/// `["cuda"]` every visible GPU: the indices listed in `CUDA_VISIBLE_DEVICES` when it lists
/// numbers, else every GPU that NVML reports (indices 0..n, PCI bus order).
///
/// Errors: `["cuda"]` and no GPU can be seen (the message says why).
pub fn resolve_devices(devices: &[String]) -> Result<Vec<Device>, String> {
    resolve_devices_with(
        devices,
        std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref(),
        crate::telemetry::gpu_count,
    )
}

/// [`resolve_devices`] with the environment and the GPU count passed in (tests).
pub fn resolve_devices_with(
    devices: &[String],
    visible: Option<&str>,
    count: impl FnOnce() -> Result<u32, String>,
) -> Result<Vec<Device>, String> {
    if devices.len() != 1 || devices[0] != ALL_GPUS {
        return Ok(devices.iter().filter_map(|d| Device::parse(d)).collect());
    }
    if let Some(v) = visible.map(str::trim).filter(|v| !v.is_empty()) {
        let listed: Option<Vec<Device>> = v
            .split(',')
            .map(|x| x.trim().parse().ok().map(Device::Cuda))
            .collect();
        if let Some(list) = listed {
            return Ok(list);
        }
    }
    match count() {
        Ok(0) => Err("run.devices = [\"cuda\"]: no GPU is visible; list devices such as [\"cuda:0\"] or use [\"cpu\"]".into()),
        Ok(n) => Ok((0..n).map(Device::Cuda).collect()),
        Err(e) => Err(format!(
            "run.devices = [\"cuda\"]: cannot count the GPUs ({e}); list them, e.g. [\"cuda:0\", \"cuda:1\"]"
        )),
    }
}

/// Parses a byte size such as `8GiB`, `512 MiB`, `8GB` or `1024` (bytes).
/// Binary units: KiB MiB GiB TiB; decimal units: KB MB GB TB; `B` or none = bytes.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
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

/// One segment of a key path (`grid.seq_len[1]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySeg {
    Key(String),
    Index(usize),
}

/// Renders a key path as `grid.exclude[0].seq_len`.
pub fn render_key_path(path: &[KeySeg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            KeySeg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            KeySeg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

fn k(s: &str) -> KeySeg {
    KeySeg::Key(s.to_string())
}

/// Errors from loading a profile. `Display` is one line:
/// `profiles/x.toml:12:11: grid.seq_len[1]: seq_len must be > 0`.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The profile file cannot be read.
    #[error("{file}: cannot read profile: {err}")]
    Io {
        /// The profile path as given.
        file: String,
        /// The OS error.
        err: std::io::Error,
    },
    #[error("{file}:{line}:{column}: {}{message}", key.as_ref().map(|k| format!("{k}: ")).unwrap_or_default())]
    Invalid {
        file: String,
        /// 1-based line.
        line: usize,
        /// 1-based column, in characters.
        column: usize,
        /// Dotted key path, when one could be found.
        key: Option<String>,
        /// What was wrong / what was expected.
        message: String,
    },
}

/// A profile loaded from a file, with the directory relative paths are resolved against.
#[derive(Debug, Clone)]
pub struct LoadedProfile {
    /// The path as given.
    pub path: PathBuf,
    /// The profile's directory: `data.path` and `model.path` are relative to it.
    pub base_dir: PathBuf,
    /// The TOML text as read.
    pub source: String,
    pub profile: Profile,
}

impl LoadedProfile {
    /// The profile's name: `name` if set, else the file stem.
    pub fn name(&self) -> String {
        self.profile.name.clone().unwrap_or_else(|| {
            self.path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "profile".to_string())
        })
    }
}

/// The quick-start profile, embedded in the binary: `lorascope run` with no profile runs it.
pub const EMBEDDED_QUICKSTART: &str = include_str!("../profiles/quickstart.toml");

/// The embedded quick-start profile (CPU, `tiny` preset, bundled sample), as if loaded from
/// `profiles/quickstart.toml` in the current directory.
///
/// Errors: none in a correct build (the text is validated by the tests).
pub fn load_embedded() -> Result<LoadedProfile, ProfileError> {
    let file = "profiles/quickstart.toml (embedded)";
    let profile = parse_str(EMBEDDED_QUICKSTART, file)?;
    Ok(LoadedProfile {
        path: PathBuf::from(file),
        base_dir: PathBuf::from("."),
        source: EMBEDDED_QUICKSTART.to_string(),
        profile,
    })
}

/// Reads, parses and validates a profile file.
pub fn load(path: &Path) -> Result<LoadedProfile, ProfileError> {
    let file = path.display().to_string();
    let source = std::fs::read_to_string(path).map_err(|source| ProfileError::Io {
        file: file.clone(),
        err: source,
    })?;
    let profile = parse_str(&source, &file)?;
    let base_dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    Ok(LoadedProfile {
        path: path.to_path_buf(),
        base_dir,
        source,
        profile,
    })
}

/// Parses and validates profile text; `file` is only used in error messages.
pub fn parse_str(source: &str, file: &str) -> Result<Profile, ProfileError> {
    let profile: Profile = toml::from_str(source).map_err(|e| {
        let span = e.span();
        let key = span
            .as_ref()
            .and_then(|sp| key_path_at(source, sp.start))
            .filter(|p| !p.is_empty())
            .map(|p| render_key_path(&p));
        let (line, column) = span.map(|sp| line_col(source, sp.start)).unwrap_or((1, 1));
        let mut message = e.message().trim().replace('\n', " ");
        if key.is_none() {
            message = missing_section_message(&message).unwrap_or(message);
        }
        ProfileError::Invalid {
            file: file.to_string(),
            line,
            column,
            key,
            message,
        }
    })?;
    if let Err((path, message)) = validate(&profile) {
        let (line, column) = span_of_path(source, &path)
            .map(|sp| line_col(source, sp.start))
            .unwrap_or((1, 1));
        return Err(ProfileError::Invalid {
            file: file.to_string(),
            line,
            column,
            key: Some(render_key_path(&path)),
            message,
        });
    }
    Ok(profile)
}

/// A clearer message for a required top-level table that is absent (serde says "missing
/// field `model`" and points at the document's start).
fn missing_section_message(serde_message: &str) -> Option<String> {
    let section = serde_message
        .strip_prefix("missing field `")?
        .strip_suffix('`')?;
    let example = match section {
        "model" => "[model] with preset = \"tiny\" or path = \"DIR\"",
        "data" => "[data] with path = \"FILE\" or \"sample\"",
        "run" => "[run] with at least steps = N",
        _ => return None,
    };
    Some(format!(
        "no [{section}] section: add {example} (profiles/quickstart.toml is a complete example)"
    ))
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let mut off = offset;
    while !source.is_char_boundary(off) {
        off -= 1;
    }
    let before = &source[..off];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let column = source[line_start..off].chars().count() + 1;
    (line, column)
}

/// The key path of the deepest key or value whose span contains `offset`.
fn key_path_at(source: &str, offset: usize) -> Option<Vec<KeySeg>> {
    let (doc, _) = DeTable::parse_recoverable(source);
    let mut path = Vec::new();
    walk_table_at(doc.get_ref(), offset, &mut path);
    Some(path)
}

fn contains(span: &Range<usize>, offset: usize) -> bool {
    span.start <= offset && offset < span.end.max(span.start + 1)
}

fn walk_table_at(table: &DeTable<'_>, offset: usize, path: &mut Vec<KeySeg>) {
    for (key, value) in table.iter() {
        if contains(&key.span(), offset) {
            path.push(KeySeg::Key(key.get_ref().to_string()));
            return;
        }
        if contains(&value.span(), offset) {
            path.push(KeySeg::Key(key.get_ref().to_string()));
            walk_value_at(value.get_ref(), offset, path);
            return;
        }
    }
    // Tables opened by `[header]` have spans that may not cover their body; search children.
    for (key, value) in table.iter() {
        let mut sub = vec![KeySeg::Key(key.get_ref().to_string())];
        let before = sub.len();
        walk_value_at(value.get_ref(), offset, &mut sub);
        if sub.len() > before {
            path.extend(sub);
            return;
        }
    }
}

fn walk_value_at(value: &DeValue<'_>, offset: usize, path: &mut Vec<KeySeg>) {
    match value {
        DeValue::Table(t) => walk_table_at(t, offset, path),
        DeValue::Array(a) => {
            for (i, item) in a.iter().enumerate() {
                if contains(&item.span(), offset) {
                    path.push(KeySeg::Index(i));
                    walk_value_at(item.get_ref(), offset, path);
                    return;
                }
            }
            for (i, item) in a.iter().enumerate() {
                let mut sub = vec![KeySeg::Index(i)];
                walk_value_at(item.get_ref(), offset, &mut sub);
                if sub.len() > 1 {
                    path.extend(sub);
                    return;
                }
            }
        }
        _ => {}
    }
}

/// The span of the value at `path`, or of the deepest existing ancestor key.
fn span_of_path(source: &str, path: &[KeySeg]) -> Option<Range<usize>> {
    let (doc, _) = DeTable::parse_recoverable(source);
    let mut best: Option<Range<usize>> = None;
    let mut cur_table: Option<&DeTable<'_>> = Some(doc.get_ref());
    let mut cur_array: Option<&[toml::Spanned<DeValue<'_>>]> = None;
    for seg in path {
        let next = match (seg, cur_table, cur_array) {
            (KeySeg::Key(name), Some(t), _) => t
                .iter()
                .find(|(key, _)| &**key.get_ref() == name.as_str())
                .map(|(key, v)| {
                    best = Some(key.span());
                    v
                }),
            (KeySeg::Index(i), _, Some(a)) => a.get(*i),
            _ => None,
        };
        let Some(v) = next else { break };
        if matches!(seg, KeySeg::Index(_)) || !matches!(v.get_ref(), DeValue::Table(_)) {
            best = Some(v.span());
        }
        cur_table = None;
        cur_array = None;
        match v.get_ref() {
            DeValue::Table(t) => cur_table = Some(t),
            DeValue::Array(a) => cur_array = Some(&a[..]),
            _ => {}
        }
    }
    best
}

type Invalid = (Vec<KeySeg>, String);

fn check_axis<T: PartialEq + fmt::Display>(
    axis: &Option<Vec<T>>,
    name: &str,
    mut ok: impl FnMut(&T) -> Result<(), String>,
) -> Result<(), Invalid> {
    let Some(values) = axis else { return Ok(()) };
    let path = vec![k("grid"), k(name)];
    if values.is_empty() {
        return Err((
            path,
            format!("axis `{name}` is empty: give at least one value or remove the key"),
        ));
    }
    for (i, v) in values.iter().enumerate() {
        let mut p = path.clone();
        p.push(KeySeg::Index(i));
        ok(v).map_err(|m| (p.clone(), m))?;
        if values[..i].contains(v) {
            return Err((p, format!("duplicate value {v} on axis `{name}`")));
        }
    }
    Ok(())
}

fn positive(name: &'static str) -> impl FnMut(&u32) -> Result<(), String> {
    move |v| {
        if *v == 0 {
            Err(format!("{name} must be > 0, got 0"))
        } else {
            Ok(())
        }
    }
}

/// Checks what the schema cannot: ranges, emptiness, consistency. Returns the key path at
/// fault and a message.
fn validate(p: &Profile) -> Result<(), Invalid> {
    match (&p.model.preset, &p.model.path) {
        (Some(_), Some(_)) => {
            return Err((
                vec![k("model"), k("path")],
                "set either `preset` or `path`, not both".into(),
            ));
        }
        (None, None) => {
            return Err((
                vec![k("model")],
                "expected `preset = \"NAME\"` or `path = \"DIR\"`".into(),
            ));
        }
        (Some(s), None) | (None, Some(s)) if s.trim().is_empty() => {
            let key = if p.model.preset.is_some() {
                "preset"
            } else {
                "path"
            };
            return Err((vec![k("model"), k(key)], "must not be empty".into()));
        }
        _ => {}
    }
    if p.data.path.trim().is_empty() {
        return Err((
            vec![k("data"), k("path")],
            "must not be empty (use \"sample\" for the bundled sample)".into(),
        ));
    }
    let l = &p.lora;
    if l.rank == 0 {
        return Err((vec![k("lora"), k("rank")], "rank must be > 0, got 0".into()));
    }
    if !(l.alpha.is_finite() && l.alpha > 0.0) {
        return Err((
            vec![k("lora"), k("alpha")],
            format!("alpha must be > 0, got {}", l.alpha),
        ));
    }
    if !(l.dropout.is_finite() && (0.0..1.0).contains(&l.dropout)) {
        return Err((
            vec![k("lora"), k("dropout")],
            format!("dropout must be in [0, 1), got {}", l.dropout),
        ));
    }
    if l.targets.is_empty() {
        return Err((
            vec![k("lora"), k("targets")],
            "expected at least one of q, k, v, o, gate, up, down".into(),
        ));
    }
    for (i, t) in l.targets.iter().enumerate() {
        if l.targets[..i].contains(t) {
            return Err((
                vec![k("lora"), k("targets"), KeySeg::Index(i)],
                format!("duplicate target `{t}`"),
            ));
        }
    }
    let r = &p.run;
    if r.steps == 0 {
        return Err((
            vec![k("run"), k("steps")],
            "steps must be > 0, got 0".into(),
        ));
    }
    if r.repeats == 0 {
        return Err((
            vec![k("run"), k("repeats")],
            "repeats must be > 0, got 0".into(),
        ));
    }
    if let Some(v) = &r.vram_limit
        && parse_bytes(v).is_none()
    {
        return Err((
            vec![k("run"), k("vram_limit")],
            format!("expected a size such as \"8GiB\" or \"512MiB\", got {v:?}"),
        ));
    }
    if let Some(lr) = r.lr
        && !(lr.is_finite() && lr > 0.0)
    {
        return Err((vec![k("run"), k("lr")], format!("lr must be > 0, got {lr}")));
    }
    if r.devices.is_empty() {
        return Err((
            vec![k("run"), k("devices")],
            "expected at least one device, e.g. [\"cpu\"] or [\"cuda:0\"]".into(),
        ));
    }
    let mut seen: Vec<Device> = Vec::new();
    for (i, d) in r.devices.iter().enumerate() {
        let path = vec![k("run"), k("devices"), KeySeg::Index(i)];
        if d == ALL_GPUS {
            if r.devices.len() > 1 {
                return Err((
                    path,
                    "\"cuda\" (every visible GPU) must be the only device".into(),
                ));
            }
            continue;
        }
        let Some(dev) = Device::parse(d) else {
            return Err((
                path,
                format!("expected \"cpu\", \"cuda:N\" or \"cuda\" (every visible GPU), got {d:?}"),
            ));
        };
        if seen.contains(&dev) {
            return Err((path, format!("duplicate device {d:?}")));
        }
        if dev == Device::Cpu && r.devices.len() > 1 {
            return Err((path, "\"cpu\" must be the only device".into()));
        }
        seen.push(dev);
    }
    if r.vram_limit.is_some() && seen.contains(&Device::Cpu) {
        return Err((
            vec![k("run"), k("vram_limit")],
            "vram_limit emulates a smaller GPU and needs CUDA devices (devices = [\"cuda:0\"]); remove it for CPU runs".into(),
        ));
    }
    let g = &p.grid;
    check_axis(&g.batch_size, "batch_size", positive("batch_size"))?;
    check_axis(&g.seq_len, "seq_len", positive("seq_len"))?;
    check_axis(&g.optimizer, "optimizer", |_| Ok(()))?;
    check_axis(&g.precision, "precision", |_| Ok(()))?;
    check_axis(&g.quant, "quant", |_| Ok(()))?;
    check_axis(&g.lora_rank, "lora_rank", positive("lora_rank"))?;
    check_axis(&g.grad_checkpointing, "grad_checkpointing", |_| Ok(()))?;
    for (name, list) in [("exclude", &g.exclude), ("include", &g.include)] {
        for (i, pt) in list.iter().enumerate() {
            let base = vec![k("grid"), k(name), KeySeg::Index(i)];
            for (key, v) in [
                ("batch_size", pt.batch_size),
                ("seq_len", pt.seq_len),
                ("lora_rank", pt.lora_rank),
            ] {
                if v == Some(0) {
                    let mut path = base.clone();
                    path.push(k(key));
                    return Err((path, format!("{key} must be > 0, got 0")));
                }
            }
        }
    }
    let expansion = crate::grid::expand_points(g, l.rank);
    if let Some(&i) = expansion.unmatched_excludes.first() {
        return Err((
            vec![k("grid"), k("exclude"), KeySeg::Index(i)],
            "this exclude entry matches no point of the grid (check the values)".into(),
        ));
    }
    if expansion.points.is_empty() {
        return Err((
            vec![k("grid")],
            "the grid has no points left after `exclude`".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) const GOOD: &str = r#"
[model]
preset = "tiny"

[data]
path = "sample"

[lora]
rank = 8
alpha = 16.0

[run]
steps = 12
warmup_steps = 2
devices = ["cpu"]

[grid]
batch_size = [1, 2]
seq_len = [64, 128]
"#;

    fn err(src: &str) -> String {
        match parse_str(src, "p.toml") {
            Ok(_) => panic!("expected an error for:\n{src}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn parses_good_profile() {
        let p = parse_str(GOOD, "p.toml").unwrap();
        assert_eq!(p.model.preset.as_deref(), Some("tiny"));
        assert_eq!(p.run.steps, 12);
        assert_eq!(p.grid.batch_size, Some(vec![1, 2]));
        assert_eq!(p.lora.targets, default_targets());
        assert!(p.data.packing);
    }

    #[test]
    fn bytes() {
        assert_eq!(parse_bytes("8GiB"), Some(8 << 30));
        assert_eq!(parse_bytes("512 MiB"), Some(512 << 20));
        assert_eq!(parse_bytes("8GB"), Some(8_000_000_000));
        assert_eq!(parse_bytes("1024"), Some(1024));
        assert_eq!(parse_bytes("eight"), None);
        assert_eq!(parse_bytes("8 GiBs"), None);
    }

    #[test]
    fn line_col_counts_chars() {
        assert_eq!(line_col("a\nbé c", 6), (2, 4));
        assert_eq!(line_col("abc", 0), (1, 1));
    }

    #[test]
    fn malformed_profiles() {
        let cases: Vec<(&str, String)> = vec![
            ("unknown_top_key", format!("{GOOD}\n[extra]\nx = 1\n")),
            (
                "unknown_run_key",
                GOOD.replace("steps = 12", "steps = 12\nstepz = 3"),
            ),
            (
                "bad_optimizer",
                format!("{GOOD}optimizer = [\"adamw\", \"adam\"]\n"),
            ),
            ("bad_precision", format!("{GOOD}precision = [\"fp8\"]\n")),
            (
                "seq_len_zero",
                GOOD.replace("seq_len = [64, 128]", "seq_len = [64, 0]"),
            ),
            (
                "empty_axis",
                GOOD.replace("batch_size = [1, 2]", "batch_size = []"),
            ),
            (
                "duplicate_axis_value",
                GOOD.replace("batch_size = [1, 2]", "batch_size = [2, 2]"),
            ),
            (
                "wrong_type",
                GOOD.replace("steps = 12", "steps = \"twelve\""),
            ),
            ("negative_steps", GOOD.replace("steps = 12", "steps = -1")),
            ("steps_zero", GOOD.replace("steps = 12", "steps = 0")),
            ("missing_steps", GOOD.replace("steps = 12\n", "")),
            (
                "missing_model",
                GOOD.replace("[model]\npreset = \"tiny\"\n", ""),
            ),
            (
                "model_both",
                GOOD.replace("preset = \"tiny\"", "preset = \"tiny\"\npath = \"m\""),
            ),
            (
                "bad_device",
                GOOD.replace("devices = [\"cpu\"]", "devices = [\"gpu0\"]"),
            ),
            (
                "bad_vram_limit",
                GOOD.replace(
                    "warmup_steps = 2",
                    "warmup_steps = 2\nvram_limit = \"8 gigs\"",
                ),
            ),
            (
                "bad_target",
                GOOD.replace("alpha = 16.0", "alpha = 16.0\ntargets = [\"q\", \"qkv\"]"),
            ),
            (
                "dropout_range",
                GOOD.replace("alpha = 16.0", "alpha = 16.0\ndropout = 1.5"),
            ),
            ("syntax_error", GOOD.replace("steps = 12", "steps = 12 13")),
            (
                "unclosed_array",
                GOOD.replace("seq_len = [64, 128]", "seq_len = [64, 128"),
            ),
            (
                "exclude_unknown_key",
                format!("{GOOD}\n[[grid.exclude]]\nbatch = 2\n"),
            ),
            (
                "exclude_matches_nothing",
                format!("{GOOD}\n[[grid.exclude]]\nbatch_size = 4\n"),
            ),
            (
                "include_zero",
                format!("{GOOD}\n[[grid.include]]\nseq_len = 0\n"),
            ),
            (
                "bad_format",
                GOOD.replace("path = \"sample\"", "path = \"sample\"\nformat = \"json\""),
            ),
        ];
        let mut out = String::new();
        for (name, src) in &cases {
            out.push_str(&format!("{name}: {}\n", err(src)));
        }
        insta::assert_snapshot!(out);
    }

    #[test]
    fn vram_limit_needs_a_cuda_device() {
        let src = GOOD.replace(
            "warmup_steps = 2",
            "warmup_steps = 2\nvram_limit = \"8GiB\"",
        );
        let e = err(&src);
        assert!(e.contains("vram_limit") && e.contains("CUDA"), "{e}");
        // line:column of the key, as other profile errors.
        let line = src
            .lines()
            .position(|l| l.starts_with("vram_limit"))
            .unwrap()
            + 1;
        assert!(e.contains(&format!(":{line}:")), "{e}");
        let ok = src.replace("devices = [\"cpu\"]", "devices = [\"cuda:0\"]");
        assert!(parse_str(&ok, "p.toml").is_ok());
    }

    #[test]
    fn bytes_for_vram_limits() {
        assert_eq!(parse_bytes("7800MiB"), Some(7800 << 20));
        assert_eq!(parse_bytes("8GiB"), Some(8 << 30));
        assert_eq!(parse_bytes("8GB"), Some(8_000_000_000));
        assert_eq!(parse_bytes("0"), None);
    }

    #[test]
    fn errors_are_one_line() {
        let e = err(&GOOD.replace("steps = 12", "steps = 12 13"));
        assert!(!e.contains('\n'), "{e}");
    }
}

#[cfg(test)]
mod embedded_tests {
    use super::tests::GOOD;
    use super::*;

    #[test]
    fn embedded_quickstart_is_valid_and_has_four_points() {
        let lp = super::load_embedded().expect("embedded quickstart parses");
        assert_eq!(crate::grid::expand(&lp).len(), 4);
        assert_eq!(lp.profile.run.devices, vec!["cpu".to_string()]);
    }

    #[test]
    fn all_visible_gpus() {
        let all = vec![ALL_GPUS.to_string()];
        let never = || -> Result<u32, String> { panic!("not asked") };
        assert_eq!(
            resolve_devices_with(&all, Some("2,3"), never),
            Ok(vec![Device::Cuda(2), Device::Cuda(3)])
        );
        assert_eq!(
            resolve_devices_with(&all, None, || Ok(2)),
            Ok(vec![Device::Cuda(0), Device::Cuda(1)])
        );
        // UUIDs in CUDA_VISIBLE_DEVICES: fall back to NVML's count.
        assert_eq!(
            resolve_devices_with(&all, Some("GPU-1a2b"), || Ok(1)),
            Ok(vec![Device::Cuda(0)])
        );
        assert!(
            resolve_devices_with(&all, None, || Ok(0))
                .unwrap_err()
                .contains("no GPU")
        );
        assert!(
            resolve_devices_with(&all, None, || Err("no driver".into()))
                .unwrap_err()
                .contains("no driver")
        );
        let listed = vec!["cuda:1".to_string(), "cuda:0".to_string()];
        assert_eq!(
            resolve_devices_with(&listed, Some("5"), never),
            Ok(vec![Device::Cuda(1), Device::Cuda(0)])
        );
        let p = parse_str(
            &GOOD.replace("devices = [\"cpu\"]", "devices = [\"cuda\"]"),
            "g.toml",
        );
        assert!(p.is_ok(), "{p:?}");
        let e = parse_str(
            &GOOD.replace("devices = [\"cpu\"]", "devices = [\"cuda\", \"cuda:0\"]"),
            "g.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("must be the only device"), "{e}");
    }
}
