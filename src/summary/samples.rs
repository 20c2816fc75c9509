//! Time series of telemetry samples: interpolation and the trapezoid integral.

/// Linear interpolation of `(t, v)` samples (sorted by t) at time `t`, clamped at the ends.
pub(super) fn interp(pts: &[(f64, f64)], t: f64) -> Option<f64> {
    let first = pts.first()?;
    let last = pts.last()?;
    if t <= first.0 {
        return Some(first.1);
    }
    if t >= last.0 {
        return Some(last.1);
    }
    let i = pts.partition_point(|p| p.0 <= t);
    let (a, b) = (pts[i - 1], pts[i]);
    if b.0 <= a.0 {
        return Some(b.1);
    }
    Some(a.1 + (b.1 - a.1) * (t - a.0) / (b.0 - a.0))
}

/// Trapezoid integral of `(t, v)` over `[a, b]` (samples interpolated at the edges).
pub(super) fn integrate(pts: &[(f64, f64)], a: f64, b: f64) -> Option<f64> {
    if pts.is_empty() || b <= a {
        return None;
    }
    let mut xs: Vec<(f64, f64)> = vec![(a, interp(pts, a)?)];
    xs.extend(pts.iter().copied().filter(|p| p.0 > a && p.0 < b));
    xs.push((b, interp(pts, b)?));
    Some(
        xs.windows(2)
            .map(|w| (w[1].0 - w[0].0) * (w[0].1 + w[1].1) / 2.0)
            .sum(),
    )
}
