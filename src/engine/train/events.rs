//! What a run reports, in order: one [`Header`], one [`StepRecord`] per step and one
//! [`Summary`] (the records of [`wire`], the `--json` lines), and the running totals of the
//! loop that the summary is made from.

use super::TrainOptions;
use crate::engine::profiler::PoolUsage;
use crate::spec::wire::{self, MemoryBreakdown, MemoryReport, Summary};

/// Run header, printed before the first step (`"type": "header"`), with the full options.
pub type Header = wire::Header<TrainOptions>;

/// Events of a run, in order: one header, `steps` steps, one summary (the `--json` lines).
pub type TrainEvent = wire::Event<TrainOptions>;

/// Peak resident set size (VmHWM) of this process in bytes, on Linux.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status_kib("VmHWM:").map(|kb| kb * 1024)
}

/// Resident set size now (VmRSS) of this process in bytes, on Linux.
pub fn rss_bytes() -> Option<u64> {
    proc_status_kib("VmRSS:").map(|kb| kb * 1024)
}

/// The value in kB of the `/proc/self/status` line starting with `key`.
fn proc_status_kib(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The memory a step leaves held, for [`wire::StepRecord::mem_bytes`]: the CUDA pool's bytes
/// in use on a GPU, else the resident set (CPU).
pub(super) fn step_mem_bytes(device: &candle_core::Device) -> Option<u64> {
    match crate::engine::profiler::pool_usage(device) {
        Some(u) => Some(u.used),
        None if device.is_cpu() => rss_bytes(),
        None => None,
    }
}

/// Running totals of the training loop: losses, tokens and seconds over all steps and over
/// the timed steps (those after warm-up).
pub(super) struct Totals {
    warmup_steps: usize,
    first_loss: f64,
    last_loss: f64,
    tokens: usize,
    seconds: f64,
    timed_tokens: usize,
    timed_seconds: f64,
    skipped_steps: usize,
}

impl Totals {
    /// Totals of a run whose first `warmup_steps` steps are not timed.
    pub(super) fn new(warmup_steps: usize) -> Self {
        Self {
            warmup_steps,
            first_loss: f64::NAN,
            last_loss: f64::NAN,
            tokens: 0,
            seconds: 0.0,
            timed_tokens: 0,
            timed_seconds: 0.0,
            skipped_steps: 0,
        }
    }

    /// Count step `step` (1-based): its loss, real (non-pad) tokens, wall seconds, and whether
    /// the optimizer update was skipped (loss-scale overflow).
    pub(super) fn add(
        &mut self,
        step: usize,
        loss: f64,
        tokens: usize,
        seconds: f64,
        skipped: bool,
    ) {
        if step == 1 {
            self.first_loss = loss;
        }
        self.last_loss = loss;
        self.tokens += tokens;
        self.seconds += seconds;
        if step > self.warmup_steps {
            self.timed_tokens += tokens;
            self.timed_seconds += seconds;
        }
        if skipped {
            self.skipped_steps += 1;
        }
    }

    /// The summary of a finished run of `steps` steps. tokens/s is over the timed steps, or
    /// over all of them when warm-up covered every step.
    pub(super) fn summary(
        self,
        steps: usize,
        memory: MemoryReport,
        device_memory: Option<MemoryBreakdown>,
        adapter_dir: Option<String>,
    ) -> Summary {
        let timed_steps = steps.saturating_sub(self.warmup_steps);
        let (timed_tokens, timed_seconds) = if timed_steps == 0 {
            (self.tokens, self.seconds)
        } else {
            (self.timed_tokens, self.timed_seconds)
        };
        Summary {
            status: "ok".into(),
            steps: steps as u64,
            final_loss: self.last_loss,
            first_loss: self.first_loss,
            tokens: self.tokens as u64,
            seconds: self.seconds,
            tokens_per_s: timed_tokens as f64 / timed_seconds.max(1e-12),
            timed_steps: timed_steps as u64,
            skipped_steps: self.skipped_steps as u64,
            oom_retries: 0,
            peak_rss_bytes: peak_rss_bytes(),
            peak_vram_bytes: None,
            adapter_dir,
            memory,
            device_memory,
        }
    }
}

/// Device memory of a run from the pool: `resident` bytes in use before the first step,
/// `end` the pool's usage at the end, `max_seen` the profiler's highest bytes in use, and the
/// header's weight and adapter+optimizer bytes. None without a pool (CPU).
pub(super) fn device_memory(
    resident: Option<u64>,
    end: Option<PoolUsage>,
    max_seen: u64,
    weights_bytes: u64,
    adapters_optimizer_bytes: u64,
) -> Option<MemoryBreakdown> {
    let (resident_bytes, u) = (resident?, end?);
    Some(MemoryBreakdown {
        weights_bytes,
        adapters_optimizer_bytes,
        resident_bytes,
        activations_peak_bytes: u.used_high.max(max_seen).saturating_sub(resident_bytes),
        pool_reserved_peak_bytes: u.reserved_high,
    })
}
