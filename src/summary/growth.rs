//! Memory that keeps rising over a run's timed window. A run whose memory still climbs at
//! its last steps has no steady cost yet: its peak is the leak's (or a still-filling cache's)
//! and grows with the step count, so a sweep must flag it instead of comparing it.
//!
//! The rule: split the timed window's per-step samples into thirds and compare the peak of the
//! last third with the peak of the first third. Memory rose when the difference is above
//! [`MIN_GROWTH_BYTES`] and above [`MIN_GROWTH_FRACTION`] of the first third's peak. Peaks of
//! thirds rather than single samples, because a steady run's memory moves a little from step
//! to step (allocator caching, a varying batch); the thresholds are well above what steady
//! runs show (peak RSS moved by at most 2.6 MiB between runs of 2 and 8 steps over every CPU
//! combination of the tiny preset, `leak::` integration tests).

use serde::{Deserialize, Serialize};

use crate::spec::wire::StepRecord;
use crate::telemetry::TelemetrySample;

/// Growth below this is never flagged (bytes): 16 MiB, above the step-to-step movement of a
/// steady run's resident set (a few MiB on the tiny preset).
pub const MIN_GROWTH_BYTES: u64 = 16 << 20;

/// Growth below this fraction of the first third's peak is never flagged: 1 %, so that a large
/// run's allocator noise does not read as a leak.
pub const MIN_GROWTH_FRACTION: f64 = 0.01;

/// Which samples showed the rise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrowthSource {
    /// The worker's per-step `mem_bytes` (CUDA pool bytes in use, or the resident set).
    Steps,
    /// The orchestrator's telemetry (NVML process memory, or the worker's resident set).
    Telemetry,
}

/// Memory that rose over the timed window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryGrowth {
    /// Peak of the last third minus peak of the first third (bytes).
    pub bytes: u64,
    /// Steps from the first third's peak to the last third's peak.
    pub steps: u64,
    /// Which samples these are.
    pub source: GrowthSource,
}

impl MemoryGrowth {
    /// `memory grew X MiB over N steps`.
    pub fn describe(&self) -> String {
        format!(
            "memory grew {:.1} MiB over {} steps",
            self.bytes as f64 / 1048576.0,
            self.steps
        )
    }

    /// The short form for a table cell: `+X MiB/N steps`.
    pub fn short(&self) -> String {
        format!(
            "+{:.1} MiB/{} steps",
            self.bytes as f64 / 1048576.0,
            self.steps
        )
    }
}

/// The rise of `series` (`(step, bytes)` over the timed window, in step order) by the rule of
/// this module, or `None` when it did not rise or has fewer than 3 samples (no thirds).
pub fn memory_growth(series: &[(u64, u64)], source: GrowthSource) -> Option<MemoryGrowth> {
    let n = series.len();
    if n < 3 {
        return None;
    }
    let k = n / 3;
    // The first sample holding the maximum of a third.
    let peak = |xs: &[(u64, u64)]| {
        xs.iter()
            .copied()
            .reduce(|a, b| if b.1 > a.1 { b } else { a })
    };
    let (s0, m0) = peak(&series[..k])?;
    let (s1, m1) = peak(&series[n - k..])?;
    let rise = m1.saturating_sub(m0);
    let bound = MIN_GROWTH_BYTES.max((m0 as f64 * MIN_GROWTH_FRACTION) as u64);
    (rise > bound).then_some(MemoryGrowth {
        bytes: rise,
        steps: s1.saturating_sub(s0),
        source,
    })
}

/// The rise of a run's memory over its timed window `timed` (`[t_start, t_end]` in arrival
/// seconds): the worker's per-step `mem_bytes` when the steps carry them (the CUDA pool's bytes
/// in use, or the resident set on the CPU), else telemetry in the window (NVML process memory if
/// any sample has it, else the resident set), each sample counted at the number of steps that
/// had arrived by then. On a GPU the NVML figure is the pool's *reservation*, which a caching
/// allocator grows in chunks towards a steady state while the bytes in use stay flat: that is
/// not a leak, so it is only used when the worker reports nothing better.
pub(super) fn of_run(
    timed: &[StepRecord],
    window: Option<(f64, f64)>,
    samples: &[TelemetrySample],
) -> Option<MemoryGrowth> {
    let steps: Vec<(u64, u64)> = timed
        .iter()
        .filter_map(|r| r.mem_bytes.map(|m| (r.step, m)))
        .collect();
    if steps.len() >= 3 {
        return memory_growth(&steps, GrowthSource::Steps);
    }
    window.and_then(|(a, b)| {
        let vram = samples.iter().any(|x| x.proc_mem_bytes.is_some());
        let first_step = timed.first().map(|r| r.step.saturating_sub(1)).unwrap_or(0);
        let series: Vec<(u64, u64)> = samples
            .iter()
            .filter(|x| x.t >= a && x.t <= b)
            .filter_map(|x| {
                let m = if vram { x.proc_mem_bytes } else { x.rss_bytes }?;
                let done = timed.partition_point(|r| r.t <= x.t) as u64;
                Some((first_step + done, m))
            })
            .collect();
        memory_growth(&series, GrowthSource::Telemetry)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::summary::{RunOutcome, summarize};

    const MIB: u64 = 1 << 20;

    fn step(i: u64, t: f64) -> StepRecord {
        StepRecord {
            step: i,
            tokens: 100,
            padded_tokens: None,
            target_tokens: None,
            step_seconds: 1.0,
            loss: None,
            lr: None,
            grad_norm: None,
            loss_scale: None,
            skipped: false,
            mem_bytes: None,
            t,
        }
    }

    fn series(f: impl Fn(u64) -> u64, n: u64) -> Vec<(u64, u64)> {
        (1..=n).map(|i| (i, f(i))).collect()
    }

    #[test]
    fn a_steady_run_is_not_flagged() {
        // 120 MiB with +-3 MiB of step-to-step movement, and a spike early on.
        let s = series(|i| 120 * MIB + (i % 3) * 3 * MIB, 30);
        assert_eq!(memory_growth(&s, GrowthSource::Steps), None);
        let mut s = series(|_| 120 * MIB, 9);
        s[1].1 = 400 * MIB;
        assert_eq!(memory_growth(&s, GrowthSource::Steps), None);
    }

    #[test]
    fn a_linear_leak_is_flagged_with_its_rise_and_steps() {
        // 110 MiB per step from 265 MiB, as the checkpointed AdamW leak on the CPU did.
        let s = series(|i| 155 * MIB + 110 * MIB * i, 9);
        let g = memory_growth(&s, GrowthSource::Steps).unwrap();
        // First third: steps 1-3 (peak at 3); last third: steps 7-9 (peak at 9).
        assert_eq!(g.bytes, 6 * 110 * MIB);
        assert_eq!(g.steps, 6);
        assert_eq!(g.describe(), "memory grew 660.0 MiB over 6 steps");
        assert_eq!(g.short(), "+660.0 MiB/6 steps");
    }

    #[test]
    fn thresholds_are_absolute_and_relative() {
        // 20 MiB over the window: above 16 MiB and above 1 % of 100 MiB.
        let s = vec![(1, 100 * MIB), (2, 110 * MIB), (3, 120 * MIB)];
        assert_eq!(
            memory_growth(&s, GrowthSource::Telemetry).map(|g| g.bytes),
            Some(20 * MIB)
        );
        // 15 MiB is under the absolute bound.
        let s = vec![(1, 100 * MIB), (2, 110 * MIB), (3, 115 * MIB)];
        assert_eq!(memory_growth(&s, GrowthSource::Steps), None);
        // 50 MiB on 10 GiB is under 1 %.
        let g = 10 << 30;
        let s = vec![(1, g), (2, g + 25 * MIB), (3, g + 50 * MIB)];
        assert_eq!(memory_growth(&s, GrowthSource::Steps), None);
        // Falling memory and too few samples are not growth.
        let s = series(|i| 1000 * MIB - i * 50 * MIB, 9);
        assert_eq!(memory_growth(&s, GrowthSource::Steps), None);
        assert_eq!(
            memory_growth(&[(1, 0), (2, 1 << 40)], GrowthSource::Steps),
            None
        );
    }

    /// A run whose per-step memory rises through the timed window is flagged with the rise
    /// and a note; warm-up steps do not count, and a run that levels off after warm-up is not
    /// flagged. Without per-step memory, telemetry in the window is used.
    #[test]
    fn rising_memory_is_flagged() {
        let steps: Vec<StepRecord> = (1..=13)
            .map(|i| StepRecord {
                mem_bytes: Some(100 * MIB + 20 * MIB * i),
                ..step(i, i as f64)
            })
            .collect();
        let s = summarize(&steps, &[], 1, &RunOutcome::default());
        // Timed steps 2..13: first third 2..5 (peak at 5), last third 10..13 (peak at 13).
        let g = s.mem_growth.unwrap();
        assert_eq!(
            (g.bytes, g.steps, g.source),
            (160 * MIB, 8, GrowthSource::Steps)
        );
        assert!(
            s.note.as_deref().unwrap().contains(
                "memory grew 160.0 MiB over 8 steps: still rising, so the peak is not the point's cost"
            ),
            "{:?}",
            s.note
        );
        // Memory that rises only during warm-up, then levels off.
        let flat: Vec<StepRecord> = steps
            .iter()
            .map(|r| StepRecord {
                mem_bytes: Some(if r.step <= 2 { 50 * MIB } else { 300 * MIB }),
                ..r.clone()
            })
            .collect();
        let s = summarize(&flat, &[], 2, &RunOutcome::default());
        assert_eq!((s.mem_growth, s.note), (None, None));
        // Telemetry only: RSS rising 30 MiB per second over steps 2..13 (t = 1..13).
        let no_mem: Vec<StepRecord> = steps
            .iter()
            .map(|r| StepRecord {
                mem_bytes: None,
                ..r.clone()
            })
            .collect();
        let samples: Vec<TelemetrySample> = (0..=26)
            .map(|i| TelemetrySample {
                t: i as f64 * 0.5,
                rss_bytes: Some(100 * MIB + 15 * MIB * i),
                ..Default::default()
            })
            .collect();
        let g = summarize(&no_mem, &samples, 1, &RunOutcome::default())
            .mem_growth
            .unwrap();
        assert_eq!(g.source, GrowthSource::Telemetry);
        assert!(g.bytes > 200 * MIB, "{g:?}");
        // A GPU run: NVML's figure (the pool's reservation) grows in chunks while the worker's
        // bytes in use stay flat. The per-step bytes decide: not flagged.
        let gpu: Vec<TelemetrySample> = (0..=26)
            .map(|i| TelemetrySample {
                t: i as f64 * 0.5,
                proc_mem_bytes: Some(3000 * MIB + 64 * MIB * (i / 6)),
                ..Default::default()
            })
            .collect();
        let s = summarize(&flat, &gpu, 2, &RunOutcome::default());
        assert_eq!(s.mem_growth, None);
    }
}
