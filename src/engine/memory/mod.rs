//! The memory model of the engine: the bytes a training point needs, predicted from the
//! engine's own shapes before anything is allocated.
//!
//! For a [`MemoryPoint`] (model config, LoRA rank and targets, quantisation, precision, batch,
//! sequence, optimizer, checkpointing, device) [`estimate`] returns a [`MemoryEstimate`]: one
//! [`Term`] per kind of buffer, each the sum of the tensors the engine creates for it, with
//! the shapes of the code that creates them:
//!
//! - **base weights** (`Model::base_weight_bytes`): embedding, norms, `lm_head` unless tied,
//!   and per layer the seven projections, dense in the compute dtype or NF4 (packed codes,
//!   8-bit absmax per 64 weights, f32 second-level absmax per 256 blocks: `nf4/mod.rs`), plus
//!   q/k/v biases;
//! - **adapters**: f32 masters A (r, in) and B (out, r) per targeted projection (`lora/`);
//! - **adapter gradients**: the same shapes in f32, alive from backward to the optimizer step;
//! - **optimizer state** (`optim/`): AdamW two f32 moments; AdamW8bit one byte per element and
//!   one f32 absmax per 256 for tensors of at least 4,096 elements, f32 below (bitsandbytes'
//!   rules); the paged variants put tensors of at least 100,000 elements in CUDA unified
//!   memory (counted on the device: it is prefetched there before every update);
//! - **activations kept for backward**: without checkpointing every intermediate the graph
//!   holds (candle keeps the inputs of every recorded op: `model/layer.rs`); with
//!   checkpointing each layer's input, plus one layer recomputed in backward
//!   (`DecoderLayer::record`'s `LayerSaved`);
//! - **transient peak**: the largest working set on top of that: attention scores and
//!   probabilities (batch, q_heads, query chunk, seq) in the compute dtype (three of them in
//!   backward, `ops/attention/`; the chunk is 512 positions or the whole row), the loss chunk (`ops/cross_entropy.rs`: 32 Mi
//!   logits and their gradient; soft-capped, 8 Mi in five f32 copies), a dequantised NF4 weight, the MLP's backward buffers
//!   (with checkpointing on CUDA written over the recorded gate, up and act: `model/mlp.rs`);
//! - **pool cache** (CUDA): candle allocates from the driver's stream-ordered pool
//!   (`cuMemAllocAsync`), which keeps freed blocks mapped and reuses a block only for a request
//!   that fits in it, so as tensor sizes change over a step the pool's reservation (what NVML
//!   sees) grows past the bytes in use. Counted as one more step working set (the peak phase's
//!   activations and transient again). This is read off measurements, not derived: over the
//!   16 model presets at 1 x 1024 (BENCHMARKS.md, "The pool's reservation in the model") the
//!   reservation above the pool's in-use high-water mark was 0.4 to 1.4 times the measured
//!   working set, and 0.2 to 0.5 at the large working sets of the 1.5B grid points (where the
//!   term over-counts). The pool's own accounting (`USED_MEM_HIGH`) shows no per-tensor page
//!   rounding, so none is counted;
//! - **CUDA context**: the driver context, cuBLAS workspace and loaded modules; not derivable
//!   from shapes, so it is measured once per GPU (peak process VRAM minus the pool's peak
//!   reservation minus optimizer state) and cached by the caller ([`MemoryPoint::cuda_context`]).
//!
//! The peak is the resident terms plus the largest phase (forward, loss backward, backward of
//! the last layer), see [`estimate`]. The model's stated error is [`STATED_ERROR_FRACTION`] of
//! the prediction or [`STATED_ERROR_FLOOR`], whichever is larger.
//!
//! [`host`] holds the host side: the RAM a CPU run (or loading) needs against what the
//! process may use, and fallible allocation of the big host buffers.

pub mod host;
mod terms;

#[cfg(test)]
mod tests;

use crate::engine::config::ModelConfig;
use crate::spec::{DeviceKind, LoraModule, Optimizer, Precision, Quant};
use serde::Serialize;

/// The stated relative error of a device-memory prediction (fraction of the prediction): 30%,
/// from `scripts/gpu_memory_check.sh` and the 16 presets on an H200 (BENCHMARKS.md, "The pool's
/// reservation in the model": measured peak process VRAM from -30.5% to +18.6% of the
/// prediction; the pool cache over-counts at large working sets).
pub const STATED_ERROR_FRACTION: f64 = 0.30;
/// The stated absolute error floor of a device-memory prediction, bytes (150 MiB).
pub const STATED_ERROR_FLOOR: u64 = 150 << 20;

/// The CUDA context, cuBLAS workspace and loaded kernels of one process, bytes, used until a
/// measurement for the GPU is cached: 768 MiB, an H200 (driver 580) measurement (peak
/// process VRAM 3.87 GiB minus a pool peak of 3.06 GiB at nf4 fp16 batch 1 x 512).
pub const DEFAULT_CUDA_CONTEXT: u64 = 768 << 20;

/// Process memory outside the terms (binary, tokenizer, dataset, allocator), bytes: 32 MiB,
/// about the peak RSS of a tiny-preset run minus its terms.
pub const HOST_BASELINE: u64 = 32 << 20;

/// One training point, as the memory model needs it.
#[derive(Debug, Clone)]
pub struct MemoryPoint<'a> {
    /// The model's hyper-parameters.
    pub config: &'a ModelConfig,
    /// LoRA rank r.
    pub lora_rank: usize,
    /// Modules with an adapter, as `--lora-targets` names them.
    pub lora_targets: &'a [LoraModule],
    /// Base-weight quantisation.
    pub quant: Quant,
    /// Compute precision (activations and dense weights).
    pub precision: Precision,
    /// Sequences per step.
    pub batch_size: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// The optimizer.
    pub optimizer: Optimizer,
    /// Decoder layers checkpointed.
    pub grad_checkpointing: bool,
    /// CPU (host RAM) or CUDA (device memory).
    pub device: DeviceKind,
    /// The measured CUDA context of the GPU, bytes (None: [`DEFAULT_CUDA_CONTEXT`]).
    pub cuda_context: Option<u64>,
    /// Weights drawn at random (a preset, or a directory without safetensors) rather than read
    /// from a checkpoint: on CUDA their f32 draws can peak above the step.
    pub synthetic_weights: bool,
}

/// One term of an estimate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Term {
    /// Short name (`base weights`, `activations`, ...).
    pub name: &'static str,
    /// Bytes.
    pub bytes: u64,
    /// What it counts, in a few words.
    pub note: String,
}

/// The predicted memory of a point. All values in bytes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryEstimate {
    /// CPU: host RAM; CUDA: device memory.
    pub device: DeviceKind,
    /// Base weights.
    pub weights: u64,
    /// Adapter master weights (f32).
    pub adapters: u64,
    /// Optimizer state (on CUDA: device plus unified memory; on CPU: host).
    pub optimizer_state: u64,
    /// Adapter gradients (f32), held from backward to the optimizer step.
    pub adapter_grads: u64,
    /// Activations kept for backward at the peak phase.
    pub activations: u64,
    /// The working set of the largest op at the peak phase.
    pub transient: u64,
    /// The peak phase's name (`forward`, `loss backward`, `layer backward`).
    pub peak_phase: &'static str,
    /// CUDA: the pool's reservation above its bytes in use at the peak, counted as the peak
    /// phase's activations and transient once more (see the module docs); CPU: 0.
    pub pool_cache: u64,
    /// CUDA: the context (measured or [`DEFAULT_CUDA_CONTEXT`]); CPU: the process baseline
    /// ([`HOST_BASELINE`]).
    pub overhead: u64,
    /// Whether `overhead` is a measurement of this GPU (CUDA) rather than the default.
    pub overhead_measured: bool,
    /// CPU: the transient of loading the largest weight beyond the weight itself (an f32
    /// copy, and the dense tensor under NF4), where it exceeds the peak phase; CUDA with
    /// synthetic weights: the f32 draws' excess over the loaded model (an untied `lm_head`'s,
    /// typically), where it exceeds what the step adds; else 0.
    pub loading: u64,
    /// The predicted peak: process VRAM (CUDA) or peak RSS (CPU).
    pub peak: u64,
}

impl MemoryEstimate {
    /// The stated error of [`Self::peak`], bytes.
    pub fn stated_error(&self) -> u64 {
        ((self.peak as f64 * STATED_ERROR_FRACTION) as u64).max(STATED_ERROR_FLOOR)
    }

    /// The terms in display order.
    pub fn terms(&self) -> Vec<Term> {
        let t = |name, bytes, note: &str| Term {
            name,
            bytes,
            note: note.to_string(),
        };
        let overhead = match (self.device, self.overhead_measured) {
            (DeviceKind::Cuda, true) => "CUDA context, measured on this GPU",
            (DeviceKind::Cuda, false) => "CUDA context, default (not yet measured on this GPU)",
            (DeviceKind::Cpu, _) => "process baseline",
        };
        vec![
            t("base weights", self.weights, "frozen, dense or NF4"),
            t("adapters", self.adapters, "f32 A and B"),
            t("optimizer state", self.optimizer_state, "moments"),
            t("adapter grads", self.adapter_grads, "f32, backward to step"),
            t("activations", self.activations, "kept for backward"),
            t("transient", self.transient, self.peak_phase),
            t("pool cache", self.pool_cache, "freed blocks the pool keeps"),
            t("overhead", self.overhead, overhead),
            t("loading", self.loading, "largest tensor while loading"),
        ]
    }

    /// `fits` or `over by X GiB` against `limit` bytes.
    pub fn verdict(&self, limit: u64) -> String {
        if self.peak <= limit {
            "fits".into()
        } else {
            format!("over by {}", gib(self.peak - limit))
        }
    }

    /// Whether the prediction exceeds `limit` by more than the stated error.
    pub fn surely_over(&self, limit: u64) -> bool {
        self.peak > limit.saturating_add(self.stated_error())
    }
}

/// Bytes as GiB with one decimal (`29.6 GiB`), for messages and tables.
pub fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Bytes as GiB with two decimals (`4.05 GiB`), for tables.
pub fn gib2(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Predict the memory of `p` (see the module docs for each term).
///
/// The peak is `weights + adapters + optimizer state + max(phase)` where a phase is the
/// tensors alive at once: the forward pass at its last layer, the loss's backward (chunk
/// logits and their gradient over the kept activations), and the backward of the last decoder
/// layer (its recomputed or kept intermediates, the MLP or attention backward buffers and
/// every adapter gradient). On CUDA the pool cache (the peak phase's activations and
/// transient once more) and the context are added, and unified-memory optimizer state counts
/// as device memory; on CPU the process baseline is added, and the loading transient when it
/// is the larger.
pub fn estimate(p: &MemoryPoint) -> MemoryEstimate {
    let cuda = p.device == DeviceKind::Cuda;
    let weights = terms::base_weights(p);
    let adapters = terms::adapters(p);
    let optimizer = terms::optimizer_state(p);
    let phases = terms::phases(p);
    let peak_phase = phases
        .iter()
        .max_by_key(|ph| ph.total() + if cuda { ph.kept + ph.transient } else { 0 })
        .expect("three phases");
    let sum = |a: &[terms::Alloc]| a.iter().map(terms::Alloc::bytes).sum::<u64>();
    let (weights_b, adapters_b, opt_b) = (sum(&weights), sum(&adapters), sum(&optimizer));
    let pool_cache = if cuda {
        peak_phase.kept + peak_phase.transient
    } else {
        0
    };
    let (overhead, overhead_measured) = if cuda {
        match p.cuda_context {
            Some(c) => (c, true),
            None => (DEFAULT_CUDA_CONTEXT, false),
        }
    } else {
        (HOST_BASELINE, false)
    };
    // Loading peaks above the step when its transient exceeds what the step adds on top of
    // the weights and adapters (the optimizer state is made after the model).
    let loading = if cuda {
        terms::device_loading_excess(p).saturating_sub(opt_b + peak_phase.total() + pool_cache)
    } else {
        terms::loading_transient(p).saturating_sub(peak_phase.total())
    };
    let peak =
        weights_b + adapters_b + opt_b + peak_phase.total() + pool_cache + overhead + loading;
    MemoryEstimate {
        device: p.device,
        weights: weights_b,
        adapters: adapters_b,
        optimizer_state: opt_b,
        adapter_grads: peak_phase.grads,
        activations: peak_phase.kept,
        transient: peak_phase.transient,
        peak_phase: peak_phase.name,
        pool_cache,
        overhead,
        overhead_measured,
        loading,
        peak,
    }
}
