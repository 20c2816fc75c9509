//! The learning-rate schedule: linear warm-up, then constant or cosine decay, as Hugging Face
//! `get_constant_schedule_with_warmup` / `get_cosine_schedule_with_warmup`.

/// Learning-rate schedule after linear warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Constant at the peak.
    Constant,
    /// Cosine decay from the peak to 0 at the last step (HF `get_cosine_schedule_with_warmup`).
    Cosine,
}

/// Learning rate for 1-based optimizer `step` of `total`, as Hugging Face
/// `get_constant_schedule_with_warmup` / `get_cosine_schedule_with_warmup` with
/// `current_step = step - 1`: linear warm-up `peak * (step-1) / warmup` (the first update uses
/// lr 0), then constant, or cosine from the peak towards 0 at `total`.
pub fn lr_at(peak: f64, step: usize, warmup: usize, total: usize, schedule: Schedule) -> f64 {
    let cur = step.saturating_sub(1);
    if cur < warmup {
        return peak * cur as f64 / warmup.max(1) as f64;
    }
    match schedule {
        Schedule::Constant => peak,
        Schedule::Cosine => {
            let span = total.saturating_sub(warmup).max(1) as f64;
            let progress = ((cur - warmup) as f64 / span).min(1.0);
            peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_matches_hugging_face() {
        // warmup 4: HF lr_lambda(0..4) = 0, .25, .5, .75, then 1.
        let l: Vec<f64> = (1..=6)
            .map(|s| lr_at(1.0, s, 4, 10, Schedule::Constant))
            .collect();
        assert_eq!(l, vec![0.0, 0.25, 0.5, 0.75, 1.0, 1.0]);
        // cosine: half-way through the decay span = 0.5 * peak.
        assert!((lr_at(1.0, 1 + 4 + 3, 4, 10, Schedule::Cosine) - 0.5).abs() < 1e-12);
        assert_eq!(lr_at(2.0, 1, 0, 10, Schedule::Cosine), 2.0);
    }
}
