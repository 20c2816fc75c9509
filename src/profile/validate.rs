//! The checks the schema cannot make: ranges, emptiness, duplicates, consistency between
//! sections, and that `[grid]` keeps at least one point. Each failure names the key path at
//! fault; [`super::load::parse_str`] turns it into `file:line:column`.

use std::fmt;

use super::devices::ALL_GPUS;
use super::error::{KeySeg, k};
use super::schema::{Axes, Backend, GridSection, PartialPoint, Profile, parse_bytes};
use crate::spec::Device;

/// A key path at fault and what is wrong there.
pub(super) type Invalid = (Vec<KeySeg>, String);

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
pub(super) fn validate(p: &Profile) -> Result<(), Invalid> {
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
            "expected at least one of q, k, v, o, gate, up, down (or PEFT names: q_proj ..., qkv_proj, gate_up_proj, all-linear)".into(),
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
            format!(
                "expected a size such as \"8GiB\" or \"512MiB\", or a card ({}), got {v:?}",
                crate::spec::Card::expected()
            ),
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
    if let Some(cards) = &p.grid.card
        && !cards.is_empty()
    {
        if r.vram_limit.is_some() {
            return Err((
                vec![k("grid"), k("card")],
                "grid.card sets each point's VRAM limit: remove run.vram_limit (or the card axis)"
                    .into(),
            ));
        }
        if seen.contains(&Device::Cpu) {
            return Err((
                vec![k("grid"), k("card")],
                "grid.card emulates cards' memory and needs CUDA devices (devices = [\"cuda:0\"]); remove it for CPU runs".into(),
            ));
        }
    }
    if r.vram_limit.is_some() && seen.contains(&Device::Cpu) {
        return Err((
            vec![k("run"), k("vram_limit")],
            "vram_limit emulates a smaller GPU and needs CUDA devices (devices = [\"cuda:0\"]); remove it for CPU runs".into(),
        ));
    }
    check_slurm(p)?;
    let g = &p.grid;
    let has_max = |a: &Option<Vec<u32>>| a.as_ref().is_some_and(|v| v.contains(&super::AXIS_MAX));
    if has_max(&g.batch_size) && has_max(&g.seq_len) {
        return Err((
            vec![k("grid"), k("seq_len")],
            "\"max\" can be searched on one axis at a time: give seq_len numbers when batch_size has \"max\" (or the other way round)".into(),
        ));
    }
    check_size(g, l.rank)?;
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
    check_points(g, l.rank)
}

/// The most points a grid may have: the factorial product of its axes (counted before
/// `exclude`) plus its `include` entries. A sweep of this many runs is already days of
/// compute; a bigger one is almost always a typo (a range written out by a script).
pub const MAX_GRID_POINTS: u64 = 100_000;

/// Refuses a grid over [`MAX_GRID_POINTS`], counted from the axis lengths alone (no point
/// is built, so an 8x10^8-point grid is refused at once and allocates nothing).
fn check_size(g: &GridSection, default_rank: u32) -> Result<(), Invalid> {
    let axes = Axes::from_grid(g, default_rank);
    let count = axes.factorial_len().saturating_add(g.include.len() as u64);
    if count <= MAX_GRID_POINTS {
        return Ok(());
    }
    let lens = axes.lens();
    let factors: Vec<String> = lens
        .iter()
        .filter(|(_, n)| *n > 1)
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
    let mut how = factors.join(" x ");
    if !g.include.is_empty() {
        how.push_str(&format!(" + {} include", g.include.len()));
    }
    Err((
        vec![k("grid")],
        format!(
            "the grid has {} points ({how}, before exclude); at most {} are allowed: \
             trim an axis or split the sweep into several profiles",
            thousands(count),
            thousands(MAX_GRID_POINTS)
        ),
    ))
}

/// `1234567` -> `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The number of `[grid]` axes.
const AXES: usize = 7;

/// Where an `exclude` entry sits in the grid: per axis (in [`Axes`] order), the position of
/// its value on that axis, `None` where the entry leaves the axis unset.
type Cell = [Option<usize>; AXES];

/// The entry's [`Cell`], or `None` when a value it sets is not on its axis (then it matches
/// no point of the factorial product: the axes vary independently).
fn cell(axes: &Axes, p: &PartialPoint) -> Option<Cell> {
    fn on<T: PartialEq>(axis: &[T], v: &Option<T>) -> Option<Option<usize>> {
        match v {
            None => Some(None),
            Some(v) => axis.iter().position(|a| a == v).map(Some),
        }
    }
    Some([
        on(&axes.batch_size, &p.batch_size)?,
        on(&axes.seq_len, &p.seq_len)?,
        on(&axes.optimizer, &p.optimizer)?,
        on(&axes.precision, &p.precision)?,
        on(&axes.quant, &p.quant)?,
        on(&axes.lora_rank, &p.lora_rank)?,
        on(&axes.grad_checkpointing, &p.grad_checkpointing)?,
    ])
}

/// Whether the `cells` together cover every point of the product of axes of lengths `lens`,
/// deciding axis by axis (no point is built).
fn covers(cells: &[&Cell], lens: &[usize; AXES], axis: usize) -> bool {
    if cells.is_empty() {
        return false;
    }
    if axis == AXES || cells.iter().any(|c| c[axis..].iter().all(Option::is_none)) {
        return true;
    }
    (0..lens[axis]).all(|v| {
        let here: Vec<&Cell> = cells
            .iter()
            .copied()
            .filter(|c| c[axis].is_none_or(|x| x == v))
            .collect();
        covers(&here, lens, axis + 1)
    })
}

/// Every `exclude` entry matches some point of the factorial product, and the grid keeps at
/// least one point: an `include`, or a factorial point no exclude matches. These are the
/// rules of the grid's `expand_points`, decided here from the axes alone because the profile
/// sits below the grid; a test of the grid checks that both agree.
fn check_points(g: &GridSection, default_rank: u32) -> Result<(), Invalid> {
    let axes = Axes::from_grid(g, default_rank);
    let mut cells = Vec::with_capacity(g.exclude.len());
    for (i, ex) in g.exclude.iter().enumerate() {
        let Some(c) = cell(&axes, ex) else {
            return Err((
                vec![k("grid"), k("exclude"), KeySeg::Index(i)],
                "this exclude entry matches no point of the grid (check the values)".into(),
            ));
        };
        cells.push(c);
    }
    let lens = [
        axes.batch_size.len(),
        axes.seq_len.len(),
        axes.optimizer.len(),
        axes.precision.len(),
        axes.quant.len(),
        axes.lora_rank.len(),
        axes.grad_checkpointing.len(),
    ];
    let cells: Vec<&Cell> = cells.iter().collect();
    if g.include.is_empty() && covers(&cells, &lens, 0) {
        return Err((
            vec![k("grid")],
            "the grid has no points left after `exclude`".into(),
        ));
    }
    Ok(())
}

/// `run.backend` and `[slurm]`: a `[slurm]` table needs `backend = "slurm"`; on Slurm each task
/// uses one device (`cpu` or `cuda:0`, the GPU Slurm gives it); no key may be empty.
fn check_slurm(p: &Profile) -> Result<(), Invalid> {
    if p.run.backend != Backend::Slurm {
        if p.slurm.is_none() {
            return Ok(());
        }
        return Err((
            vec![k("slurm")],
            "a [slurm] table is only used with `backend = \"slurm\"` in [run]: add it, or remove [slurm]".into(),
        ));
    }
    let one = p.run.devices.len() == 1 && matches!(p.run.devices[0].as_str(), "cpu" | "cuda:0");
    if !one {
        return Err((
            vec![k("run"), k("devices")],
            "with backend = \"slurm\" each task uses one device: devices = [\"cuda:0\"] (the GPU Slurm gives it) or [\"cpu\"]; parallelism is slurm.array_parallelism".into(),
        ));
    }
    let Some(s) = &p.slurm else {
        return Ok(());
    };
    if s.array_parallelism == Some(0) {
        return Err((
            vec![k("slurm"), k("array_parallelism")],
            "array_parallelism must be > 0, got 0 (leave it out for no limit)".into(),
        ));
    }
    for (key, v) in [
        ("partition", &s.partition),
        ("time", &s.time),
        ("account", &s.account),
        ("qos", &s.qos),
        ("workdir", &s.workdir),
    ] {
        if v.as_deref().is_some_and(|v| v.trim().is_empty()) {
            return Err((
                vec![k("slurm"), k(key)],
                format!("must not be empty: leave `{key}` out for the cluster's default"),
            ));
        }
    }
    Ok(())
}
