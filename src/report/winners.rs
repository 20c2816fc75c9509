//! The lines under the comparison table: the winners (fastest, fewest J/token, fastest under
//! each `vram_limit`) and the notes (why two rows measure the same, random weights).

use super::axes::Axes;
use super::rows::PointRow;
use super::{gib, sig};
use crate::spec::Optimizer;

/// The row of `it` with the best `f` (largest if `higher`), first on ties.
fn best_by<'a>(
    it: impl Iterator<Item = &'a &'a PointRow>,
    f: &dyn Fn(&PointRow) -> Option<f64>,
    higher: bool,
) -> Option<(&'a PointRow, f64)> {
    it.filter_map(|r| f(r).map(|v| (*r, v)))
        .fold(None, |m: Option<(&PointRow, f64)>, (r, v)| match m {
            Some((_, b)) if (higher && v <= b) || (!higher && v >= b) => m,
            _ => Some((r, v)),
        })
}

/// The winner lines of `rows` (ok points only): fastest, fewest J/token, and fastest whose
/// peak memory is within `limit`, else within each point's own `vram_limit_bytes` (one line
/// per distinct limit, e.g. per card of a `card` grid axis, among that limit's points).
pub fn winners(rows: &[PointRow], axes: &Axes, limit: Option<u64>) -> Vec<String> {
    let ok: Vec<&PointRow> = rows.iter().filter(|r| r.is_ok()).collect();
    let tps = |r: &PointRow| r.tokens_per_s.map(|s| s.median);
    let mut out = Vec::new();
    if let Some((r, v)) = best_by(ok.iter(), &tps, true) {
        out.push(format!("fastest: {} ({v:.1} tok/s)", axes.name(r)));
    }
    let jpt = |r: &PointRow| r.j_per_token.map(|s| s.median);
    if let Some((r, v)) = best_by(ok.iter(), &jpt, false) {
        out.push(format!(
            "fewest J/token: {} ({} J/token)",
            axes.name(r),
            sig(v)
        ));
    }
    // One line per limit: a `card` grid axis gives each card's points their own limit (judged
    // among that card's points); otherwise the one limit judges every point.
    let limits: Vec<u64> = match limit {
        Some(l) => vec![l],
        None => {
            let mut v: Vec<u64> = rows.iter().filter_map(|r| r.vram_limit_bytes).collect();
            v.sort_unstable();
            v.dedup();
            v
        }
    };
    let per_point = limit.is_none() && limits.len() > 1;
    for l in limits {
        let fits = ok.iter().filter(|r| {
            (!per_point || r.vram_limit_bytes == Some(l))
                && r.peak_mem_bytes.is_some_and(|b| b <= l)
        });
        let card = rows
            .iter()
            .filter(|r| per_point && r.vram_limit_bytes == Some(l))
            .find_map(|r| r.point.and_then(|p| p.card))
            .map(|c| format!("{c}, "))
            .unwrap_or_default();
        let line = match best_by(fits, &tps, true) {
            Some((r, v)) => format!(
                "fastest under vram_limit ({card}{} GiB): {} ({v:.1} tok/s, peak {} GiB)",
                gib(l),
                axes.name(r),
                r.peak_mem_bytes.map(gib).unwrap_or_default()
            ),
            None => format!(
                "fastest under vram_limit ({card}{} GiB): none of the ok points",
                gib(l)
            ),
        };
        out.push(line);
    }
    out
}

/// Whether an 8-bit optimizer's state is all f32: `optimizer_state_bytes` is two f32 moments
/// of every trainable parameter, as when every adapter tensor is under
/// [`crate::engine::optim::MIN_8BIT_SIZE`] elements.
fn eight_bit_state_is_f32(r: &PointRow) -> bool {
    let eight = r.point.is_some_and(|p| {
        matches!(
            p.optimizer,
            Optimizer::AdamW8bit | Optimizer::PagedAdamW8bit
        )
    });
    eight
        && matches!((r.params_trainable, r.optimizer_state_bytes), (Some(n), Some(b)) if n > 0 && b == 8 * n)
}

/// Notes on the whole table.
pub fn notes(rows: &[PointRow], axes: &Axes) -> Vec<String> {
    let mut out = Vec::new();
    if rows.iter().any(|r| r.runs > 1) {
        out.push("with repeats a value is the median, [min–max] when they differ".into());
    }
    let f32_state: Vec<String> = rows
        .iter()
        .filter(|r| eight_bit_state_is_f32(r))
        .map(|r| axes.name(r))
        .collect();
    if !f32_state.is_empty() {
        out.push(format!(
            "8-bit optimizer state is f32 here ({}): every adapter tensor has fewer than {} \
             elements, and bitsandbytes keeps such tensors' state in f32 (min_8bit_size), so \
             adamw8bit measures the same as adamw",
            f32_state.join(", "),
            fmt_thousands(crate::engine::optim::MIN_8BIT_SIZE)
        ));
    }
    if rows.iter().any(|r| r.synthetic_weights) {
        out.push(
            "random base weights (no weight files): speed, memory and energy are representative, \
             loss values are not"
                .into(),
        );
    }
    let mut seen: Vec<(String, Vec<String>)> = Vec::new();
    for r in rows {
        if let Some(n) = &r.note {
            match seen.iter_mut().find(|(t, _)| t == n) {
                Some((_, names)) => names.push(axes.name(r)),
                None => seen.push((n.clone(), vec![axes.name(r)])),
            }
        }
    }
    for (n, names) in seen {
        if names.len() == rows.len() {
            out.push(n);
        } else {
            out.push(format!("{n} ({})", names.join(", ")));
        }
    }
    out
}

fn fmt_thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
