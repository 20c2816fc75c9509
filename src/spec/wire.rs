//! The worker's JSON-lines protocol: what `lorascope train --json` prints on stdout, one
//! compact JSON object per line, and the exit status it ends with. The engine writes these
//! records; the orchestrator reads them back with the same types.
//!
//! ```text
//! {"type":"phase","phase":"loading_weights","t_s":0.01}     at each phase change (below)
//! {"type":"header","model":"tiny",...,"options":{...}}      once, before the first step
//! {"type":"step","step":1,"tokens":256,...}                 once per optimizer step
//! {"type":"summary","status":"ok","steps":20,...}           once, after the last step
//! {"type":"telemetry","t":1.2,"power_w":310.5,...}          with --telemetry, ~10 per second
//! ```
//!
//! Phases come in this order, each at most once: `loading_weights` or `quantising` (NF4
//! weights are quantised while they load), then before the first step `compiling_kernels`
//! (CUDA only: the first step is where NVRTC compiles the kernels, or reads them from the PTX
//! cache on disk), `warmup` (the steps left out of tokens/s), `timed`. Older workers write
//! no phase lines; readers take a phase line of an unknown phase as an unknown line.
//!
//! Field names and order are the format: the orchestrator stores header and summary lines
//! as received, and reports read them back. Reading is lenient, because the worker may be a
//! user's command: unknown fields are ignored everywhere; a step needs only `step`, `tokens`
//! and `step_seconds`; every field of a [`Summary`] or a [`MemoryReport`] that is absent or of
//! another type reads as its default (`None`, 0). The memory facts of a header are read by
//! reading its line as a [`MemoryReport`] (flattened into it).

use serde::{Deserialize, Deserializer, Serialize};

use super::{Precision, Quant};

/// Exit status of a run that completed.
pub const EXIT_OK: i32 = 0;
/// Exit status of a run that failed for any reason but memory (cause on stderr's last line).
pub const EXIT_FAILURE: i32 = 1;
/// Exit status of a run that ran out of memory (CUDA or host), recorded as `oom`.
pub const EXIT_OOM: i32 = 3;

/// One line of the worker's output, tagged by `"type"`. `O` is the type of the header's
/// `options` (the engine's full run options).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Event<O> {
    /// Before the first step.
    Header(Box<Header<O>>),
    /// After each step.
    Step(StepRecord),
    /// After the last step.
    Summary(Summary),
    /// A telemetry sample, written by a worker that samples itself (`--telemetry`), between
    /// the other lines.
    Telemetry(TelemetrySample),
    /// The worker moved on to another phase (before the header, and between steps).
    Phase(PhaseRecord),
}

/// What a run is doing, in the order the phases come (`"phase"` of a phase line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Reading the base weights (or making synthetic ones) and building the model.
    LoadingWeights,
    /// Reading the base weights and quantising them to NF4 as they load.
    Quantising,
    /// The first step on a CUDA device: kernels compile (NVRTC) or load from the PTX cache.
    CompilingKernels,
    /// Warm-up steps (left out of tokens/s).
    Warmup,
    /// Timed steps.
    Timed,
}

impl Phase {
    /// For people: `loading weights`, `compiling CUDA kernels`, ...
    pub fn describe(self) -> &'static str {
        match self {
            Phase::LoadingWeights => "loading weights",
            Phase::Quantising => "loading and quantising weights (NF4)",
            Phase::CompilingKernels => "compiling CUDA kernels",
            Phase::Warmup => "warm-up",
            Phase::Timed => "timed steps",
        }
    }
}

/// A phase change (`"type": "phase"`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PhaseRecord {
    /// The phase that starts now.
    pub phase: Phase,
    /// Seconds since the run started (the worker's own clock).
    pub t_s: f64,
}

/// Run header (`"type": "header"`), printed before the first step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header<O> {
    /// Model name (preset or directory).
    pub model: String,
    /// True when base weights are random (no weight files): speed, memory and energy are
    /// representative, loss values are not.
    pub synthetic_weights: bool,
    /// Parameters of the model, adapters included.
    pub params_total: u64,
    /// Trainable (adapter) parameters.
    pub params_trainable: u64,
    /// Bytes of base weights as held: compute dtype, or NF4 codes plus statistics for
    /// quantised projections.
    pub weight_bytes: u64,
    /// Base-weight quantisation.
    pub quant: Quant,
    /// Parts of the model that run generic candle code on the GPU instead of a fused kernel
    /// (e.g. "GeGLU activation"); empty when every op has its kernel, and on the CPU.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub generic_ops: Vec<String>,
    /// Adapter f32 master weights plus optimizer state, bytes.
    pub adapter_and_optimizer_bytes: u64,
    /// Optimizer state alone, bytes.
    pub optimizer_state_bytes: u64,
    /// Device string as given (`cpu`, `cuda:0`).
    pub device: String,
    /// Compute precision.
    pub precision: Precision,
    /// Tokenizer in use.
    pub tokenizer: String,
    /// Examples in the dataset.
    pub examples: u64,
    /// Optimizer-state placement and the VRAM limit.
    #[serde(flatten)]
    pub memory: MemoryReport,
    /// The full run options.
    pub options: O,
}

/// One optimizer step (`"type": "step"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// 1-based step.
    pub step: u64,
    /// Real (non-pad) input tokens in the batch.
    pub tokens: u64,
    /// All input positions (batch x seq), pads included.
    #[serde(default)]
    pub padded_tokens: Option<u64>,
    /// Tokens that carry a loss target.
    #[serde(default)]
    pub target_tokens: Option<u64>,
    /// Wall time of the step (forward, backward, optimizer) measured by the worker, seconds,
    /// device synchronised.
    pub step_seconds: f64,
    /// Mean cross-entropy over target tokens (nats).
    #[serde(default)]
    pub loss: Option<f64>,
    /// Learning rate used for this step.
    #[serde(default)]
    pub lr: Option<f64>,
    /// Global gradient L2 norm before clipping (unscaled; null for inf/NaN, on an overflow
    /// step).
    #[serde(default)]
    pub grad_norm: Option<f64>,
    /// Loss scale used for this step's backward (null without loss scaling).
    #[serde(default)]
    pub loss_scale: Option<f64>,
    /// The update was skipped because a gradient was inf or NaN (fp16 loss scaling only).
    #[serde(default)]
    pub skipped: bool,
    /// Memory the worker holds at the end of the step, after the optimizer update, bytes: the
    /// CUDA pool's bytes in use on a GPU, else the process's resident set (Linux VmRSS).
    /// A series that keeps rising over the timed window is a leak, not the run's cost (see
    /// `summary::memory_growth`). Null when the worker cannot say.
    #[serde(default)]
    pub mem_bytes: Option<u64>,
    /// Seconds since the worker started when the step arrived: stamped by the orchestrator on
    /// arrival (local runs), or written by a worker that samples itself (`--telemetry`,
    /// the clock of its `telemetry` lines). 0 = not known (left out of the JSON).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub t: f64,
}

fn is_zero(t: &f64) -> bool {
    *t == 0.0
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

/// End-of-run summary (`"type": "summary"`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Summary {
    /// `ok` when every step ran.
    #[serde(deserialize_with = "lenient")]
    pub status: String,
    /// Steps run.
    #[serde(deserialize_with = "lenient")]
    pub steps: u64,
    /// Loss of the last step (nats).
    #[serde(deserialize_with = "lenient")]
    pub final_loss: f64,
    /// Loss of the first step (nats).
    #[serde(deserialize_with = "lenient")]
    pub first_loss: f64,
    /// Real tokens over all steps.
    #[serde(deserialize_with = "lenient")]
    pub tokens: u64,
    /// Seconds over all steps.
    #[serde(deserialize_with = "lenient")]
    pub seconds: f64,
    /// Real tokens per second over steps after warm-up (all steps if none remain).
    #[serde(deserialize_with = "lenient")]
    pub tokens_per_s: f64,
    /// Steps after warm-up, the ones `tokens_per_s` is measured over (0: every step was
    /// warm-up, and `tokens_per_s` covers them all).
    #[serde(deserialize_with = "lenient")]
    pub timed_steps: u64,
    /// fp16 steps skipped for overflow.
    #[serde(deserialize_with = "lenient")]
    pub skipped_steps: u64,
    /// Peak resident set size of the worker process, bytes (Linux VmHWM), if known.
    #[serde(deserialize_with = "lenient")]
    pub peak_rss_bytes: Option<u64>,
    /// Peak VRAM of the worker process, bytes, for a worker that measures it itself; used
    /// when the orchestrator has no NVML figure. lorascope's engine leaves it out.
    #[serde(deserialize_with = "lenient", skip_serializing_if = "Option::is_none")]
    pub peak_vram_bytes: Option<u64>,
    /// Steps whose forward/backward ran out of device memory once and ran again after the
    /// CUDA pool's cached free blocks were handed back (their time includes both attempts).
    #[serde(deserialize_with = "lenient", skip_serializing_if = "is_zero_u64")]
    pub oom_retries: u64,
    /// Where adapters were saved.
    #[serde(deserialize_with = "lenient")]
    pub adapter_dir: Option<String>,
    /// Optimizer-state placement and the VRAM limit (as in the header).
    #[serde(flatten)]
    pub memory: MemoryReport,
    /// Device-memory breakdown from the CUDA memory pool (null on CPU).
    #[serde(deserialize_with = "lenient")]
    pub device_memory: Option<MemoryBreakdown>,
}

/// Where the optimizer state lives and the `--vram-limit` emulation, flattened into both the
/// header and the summary.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MemoryReport {
    /// Optimizer state in ordinary GPU memory, bytes.
    #[serde(deserialize_with = "lenient")]
    pub optimizer_state_device_bytes: Option<u64>,
    /// Optimizer state in CUDA unified memory (paged optimizers), bytes.
    #[serde(deserialize_with = "lenient")]
    pub optimizer_state_managed_bytes: Option<u64>,
    /// Optimizer state in host RAM (CPU runs), bytes.
    #[serde(deserialize_with = "lenient")]
    pub optimizer_state_host_bytes: Option<u64>,
    /// How paging was applied, for the paged optimizers.
    #[serde(deserialize_with = "lenient")]
    pub optimizer_note: Option<String>,
    /// `--vram-limit` in bytes, if given.
    #[serde(deserialize_with = "lenient")]
    pub vram_limit_bytes: Option<u64>,
    /// Bytes reserved to emulate the limit (process VRAM figures include them).
    #[serde(deserialize_with = "lenient")]
    pub vram_reserved_bytes: Option<u64>,
    /// What the limit did and does not emulate.
    #[serde(deserialize_with = "lenient")]
    pub vram_note: Option<String>,
}

/// Where device memory went, from the CUDA stream-ordered pool that candle allocates from
/// (bytes). The CUDA context, cuBLAS workspace and loaded kernels are outside the pool: NVML's
/// per-process figure is `pool_reserved_peak_bytes` plus those (typically 0.5-1 GiB).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryBreakdown {
    /// Base weights as held (compute dtype, or NF4 codes and statistics).
    pub weights_bytes: u64,
    /// Adapter f32 master weights plus optimizer state.
    pub adapters_optimizer_bytes: u64,
    /// Pool bytes in use before the first step: weights, adapter master weights, RoPE tables.
    /// (Optimizer state on CUDA is allocated outside candle's pool, see the header's
    /// `optimizer_state_*_bytes`.)
    pub resident_bytes: u64,
    /// Peak pool bytes in use during the steps above `resident_bytes`: activations,
    /// gradients and transients.
    pub activations_peak_bytes: u64,
    /// Peak pool bytes held from the driver (live plus cached free blocks).
    pub pool_reserved_peak_bytes: u64,
}

/// One telemetry sample. Units are in the field names.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TelemetrySample {
    /// Seconds since the worker started: the orchestrator's clock from spawning the child
    /// (local), or the worker's own from its start (`lorascope train --telemetry`).
    pub t: f64,
    /// NVML device index (physical), `None` for CPU runs.
    pub gpu: Option<u32>,
    /// Board power draw (W).
    pub power_w: Option<f64>,
    /// NVML total-energy counter since driver load (mJ); absolute, so use differences.
    pub energy_mj: Option<f64>,
    /// Device memory used by all processes (bytes).
    pub mem_used_bytes: Option<u64>,
    /// Device memory used by the run's process (bytes).
    pub proc_mem_bytes: Option<u64>,
    /// GPU utilisation (%).
    pub util_pct: Option<u32>,
    /// SM clock (MHz).
    pub sm_clock_mhz: Option<u32>,
    /// GPU temperature (°C).
    pub temp_c: Option<u32>,
    /// Enforced power limit (W).
    pub power_limit_w: Option<f64>,
    /// The child's VmRSS (bytes).
    pub rss_bytes: Option<u64>,
    /// The child's VmHWM, peak RSS so far (bytes).
    pub hwm_bytes: Option<u64>,
}

/// A value of `T`, or `T::default()` when the value is of another type.
fn lenient<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either<T> {
        Value(T),
        Other(serde::de::IgnoredAny),
    }
    Ok(match Either::<T>::deserialize(d)? {
        Either::Value(v) => v,
        Either::Other(_) => T::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn step() -> StepRecord {
        StepRecord {
            step: 1,
            tokens: 32,
            padded_tokens: Some(32),
            target_tokens: Some(4),
            step_seconds: 0.05,
            loss: Some(6.5),
            lr: Some(0.0),
            grad_norm: Some(f64::NAN),
            loss_scale: None,
            skipped: false,
            mem_bytes: Some(125829120),
            t: 0.0,
        }
    }

    fn memory() -> MemoryReport {
        MemoryReport {
            optimizer_state_device_bytes: Some(0),
            optimizer_state_managed_bytes: Some(0),
            optimizer_state_host_bytes: Some(2326528),
            ..MemoryReport::default()
        }
    }

    /// The lines as the worker has always written them: names, order, nulls.
    #[test]
    fn lines_are_the_documented_format() {
        let s = serde_json::to_string(&Event::<()>::Step(step())).unwrap();
        assert_eq!(
            s,
            r#"{"type":"step","step":1,"tokens":32,"padded_tokens":32,"target_tokens":4,"step_seconds":0.05,"loss":6.5,"lr":0.0,"grad_norm":null,"loss_scale":null,"skipped":false,"mem_bytes":125829120}"#
        );
        let header = Header {
            model: "tiny".into(),
            synthetic_weights: true,
            params_total: 10,
            params_trainable: 2,
            weight_bytes: 40,
            quant: Quant::None,
            generic_ops: vec![],
            adapter_and_optimizer_bytes: 24,
            optimizer_state_bytes: 16,
            device: "cpu".into(),
            precision: Precision::Fp32,
            tokenizer: "bytes".into(),
            examples: 3,
            memory: memory(),
            options: json!({"seed": 1}),
        };
        let h = serde_json::to_string(&Event::Header(Box::new(header.clone()))).unwrap();
        assert_eq!(
            h,
            r#"{"type":"header","model":"tiny","synthetic_weights":true,"params_total":10,"params_trainable":2,"weight_bytes":40,"quant":"none","adapter_and_optimizer_bytes":24,"optimizer_state_bytes":16,"device":"cpu","precision":"fp32","tokenizer":"bytes","examples":3,"optimizer_state_device_bytes":0,"optimizer_state_managed_bytes":0,"optimizer_state_host_bytes":2326528,"optimizer_note":null,"vram_limit_bytes":null,"vram_reserved_bytes":null,"vram_note":null,"options":{"seed":1}}"#
        );
        assert_eq!(
            serde_json::from_str::<Event<Value>>(&h).unwrap(),
            Event::Header(Box::new(header))
        );
        let summary = Summary {
            status: "ok".into(),
            steps: 2,
            final_loss: 7.25,
            first_loss: 6.5,
            tokens: 64,
            seconds: 0.5,
            tokens_per_s: 128.0,
            timed_steps: 0,
            skipped_steps: 0,
            oom_retries: 0,
            peak_rss_bytes: Some(1024),
            peak_vram_bytes: None,
            adapter_dir: None,
            memory: memory(),
            device_memory: None,
        };
        let s = serde_json::to_string(&Event::<()>::Summary(summary.clone())).unwrap();
        assert_eq!(
            s,
            r#"{"type":"summary","status":"ok","steps":2,"final_loss":7.25,"first_loss":6.5,"tokens":64,"seconds":0.5,"tokens_per_s":128.0,"timed_steps":0,"skipped_steps":0,"peak_rss_bytes":1024,"adapter_dir":null,"optimizer_state_device_bytes":0,"optimizer_state_managed_bytes":0,"optimizer_state_host_bytes":2326528,"optimizer_note":null,"vram_limit_bytes":null,"vram_reserved_bytes":null,"vram_note":null,"device_memory":null}"#
        );
        assert_eq!(
            serde_json::from_str::<Event<Value>>(&s).unwrap(),
            Event::Summary(summary)
        );
    }

    /// The orchestrator's arrival time travels with a record it forwards, and is absent from
    /// what the worker writes.
    #[test]
    fn arrival_time_round_trips() {
        let mut r = step();
        r.grad_norm = Some(1.5);
        r.t = 2.5;
        let j = serde_json::to_string(&r).unwrap();
        assert!(
            j.ends_with(r#""skipped":false,"mem_bytes":125829120,"t":2.5}"#),
            "{j}"
        );
        assert_eq!(serde_json::from_str::<StepRecord>(&j).unwrap(), r);
    }

    /// A user's worker may write any subset of a summary, with odd types: what is usable is
    /// read, the rest is the default.
    #[test]
    fn summary_and_memory_read_leniently() {
        let v = json!({
            "type": "summary", "status": "ok", "steps": "four", "peak_rss_bytes": 1048576,
            "peak_vram_bytes": -1, "vram_limit_bytes": 8.5, "vram_reserved_bytes": 100,
            "device_memory": {"weights_bytes": 1}, "extra": [1]
        });
        let s = Summary::deserialize(&v).unwrap();
        assert_eq!(s.status, "ok");
        assert_eq!(s.steps, 0);
        assert_eq!(s.peak_rss_bytes, Some(1048576));
        assert_eq!(s.peak_vram_bytes, None);
        assert_eq!(s.memory.vram_limit_bytes, None);
        assert_eq!(s.memory.vram_reserved_bytes, Some(100));
        assert_eq!(s.device_memory, None);
        let m = MemoryReport::deserialize(&json!({"type": "header", "model": "tiny"})).unwrap();
        assert_eq!(m, MemoryReport::default());
    }

    /// Phase lines: their format, and old readers' records unchanged beside them.
    #[test]
    fn phase_lines() {
        let p = Event::<()>::Phase(PhaseRecord {
            phase: Phase::CompilingKernels,
            t_s: 1.5,
        });
        let j = serde_json::to_string(&p).unwrap();
        assert_eq!(
            j,
            r#"{"type":"phase","phase":"compiling_kernels","t_s":1.5}"#
        );
        assert_eq!(serde_json::from_str::<Event<()>>(&j).unwrap(), p);
        assert!(
            serde_json::from_str::<Event<()>>(r#"{"type":"phase","phase":"x","t_s":1}"#).is_err()
        );
        assert!(Phase::LoadingWeights < Phase::Quantising && Phase::Warmup < Phase::Timed);
    }

    #[test]
    fn a_step_needs_step_tokens_and_seconds() {
        let r: StepRecord =
            serde_json::from_str(r#"{"step":1,"tokens":2,"step_seconds":0.1}"#).unwrap();
        assert_eq!((r.loss, r.padded_tokens, r.t), (None, None, 0.0));
        assert_eq!(r.mem_bytes, None);
        assert!(serde_json::from_str::<StepRecord>(r#"{"step":"x"}"#).is_err());
    }
}
