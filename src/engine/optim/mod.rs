//! AdamW with f32 state on the adapter weights ([`AdamW`]), its 8-bit block-wise variant
//! (bitsandbytes `AdamW8bit`, [`AdamW8bit`]), their paged forms (bitsandbytes `PagedAdamW`,
//! `PagedAdamW8bit`), and the learning-rate schedule ([`lr_at`]).
//!
//! On CPU the updates are candle tensor ops ([`AdamW`]) or a host loop ([`AdamW8bit`]), and
//! paging is emulated as unpaged (there is no device memory to page out of). On CUDA
//! (`--features cuda`) both run as fused kernels over state held outside candle's tensors
//! (`cuda.rs`, kernels in `cuda/kernels/optim.cu`), with the same arithmetic; the paged forms
//! keep the state of tensors of at least [`MIN_PAGED_SIZE`] elements in CUDA unified memory
//! ([`state`]: where state lives).
//!
//! Imports: `adamw`/`adamw8bit` -> `cuda` -> `state`; `selftest` (CUDA) compares the two.

mod adamw;
mod adamw8bit;
#[cfg(feature = "cuda")]
mod cuda;
mod schedule;
#[cfg(feature = "cuda")]
mod selftest;
pub mod state;

pub use adamw::AdamW;
pub use adamw8bit::AdamW8bit;
pub use schedule::{Schedule, lr_at};
#[cfg(feature = "cuda")]
pub use selftest::{SELFTEST_TOL, SelftestCase, selftest};
pub use state::{
    MIN_8BIT_SIZE, MIN_PAGED_SIZE, STATE_BLOCK, StateBytes, memory_report, state_is_paged,
    state_is_quantized,
};

use crate::spec::Optimizer;
use candle_core::{DType, Result, Var, backprop::GradStore};

/// AdamW hyper-parameters. Defaults are PyTorch's `torch.optim.AdamW` (betas (0.9, 0.999),
/// eps 1e-8, weight_decay 0.01) except `lr`, which defaults to 2e-4 (a common LoRA choice).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct AdamWConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay (Loshchilov & Hutter 2019).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 2e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// An optimizer of either kind behind one interface.
pub enum AnyOptimizer {
    /// f32 moments.
    AdamW(AdamW),
    /// 8-bit moments.
    AdamW8bit(AdamW8bit),
}

impl AnyOptimizer {
    /// Build `kind` over `vars` (f32).
    ///
    /// Errors: a variable is not f32.
    pub fn new(kind: Optimizer, vars: Vec<Var>, cfg: AdamWConfig) -> Result<Self> {
        let paged = kind.is_paged();
        // Two moments of at most f32 each, on the host for CPU runs: fail as out of memory
        // rather than abort when they cannot be had.
        if vars.first().is_some_and(|v| v.device().is_cpu()) {
            let n: usize = vars.iter().map(|v| v.elem_count()).sum();
            crate::engine::memory::host::probe(8 * n, "optimizer state")?;
        }
        Ok(match kind {
            Optimizer::AdamW | Optimizer::PagedAdamW => {
                Self::AdamW(AdamW::with_paging(vars, cfg, paged)?)
            }
            Optimizer::AdamW8bit | Optimizer::PagedAdamW8bit => {
                Self::AdamW8bit(AdamW8bit::with_paging(vars, cfg, paged)?)
            }
        })
    }

    /// Bytes of optimizer state.
    pub fn state_bytes(&self) -> usize {
        self.state_bytes_split().total()
    }

    /// Bytes of optimizer state by where they live.
    pub fn state_bytes_split(&self) -> StateBytes {
        match self {
            Self::AdamW(o) => o.state_bytes_split(),
            Self::AdamW8bit(o) => o.state_bytes_split(),
        }
    }

    /// Global gradient norm after multiplying by `factor` (see [`AdamW::grad_norm_scaled`]).
    pub fn grad_norm_scaled(&self, grads: &GradStore, factor: f64) -> Result<f64> {
        let vars = match self {
            Self::AdamW(o) => &o.vars,
            Self::AdamW8bit(o) => &o.vars,
        };
        grad_norm_of(vars, grads, factor)
    }

    /// One update (see [`AdamW::step`]).
    ///
    /// Errors: as the optimizer's, and a step while a decoder-layer pass holds its adapters'
    /// casts on this thread ([`crate::engine::lora::open_cast_scopes`]).
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        if crate::engine::lora::open_cast_scopes() > 0 {
            candle_core::bail!(
                "optimizer step inside a decoder-layer pass: the pass's adapter casts would go stale; step after the backward"
            );
        }
        match self {
            Self::AdamW(o) => o.step(grads, lr, grad_scale),
            Self::AdamW8bit(o) => o.step(grads, lr, grad_scale),
        }
    }
}

/// Whether `vars` live on a CUDA device (the fused-kernel path).
fn on_cuda(vars: &[Var]) -> bool {
    vars.first().is_some_and(|v| v.device().is_cuda())
}

/// Errors unless every optimizer variable is an f32 master weight.
fn ensure_f32_master(vars: &[Var], optimizer: &str) -> Result<()> {
    if let Some(v) = vars.iter().find(|v| v.dtype() != DType::F32) {
        candle_core::bail!(
            "{optimizer} master weights must be f32, got {:?}",
            v.dtype()
        );
    }
    Ok(())
}

/// Global L2 norm of the gradients of `vars` after multiplying them by `factor` (f64
/// accumulation on both devices; inf/NaN gradients give inf/NaN). Variables without a gradient
/// count as zero.
fn grad_norm_of(vars: &[Var], grads: &GradStore, factor: f64) -> Result<f64> {
    #[cfg(feature = "cuda")]
    {
        let gs: Vec<&candle_core::Tensor> = vars
            .iter()
            .filter_map(|v| grads.get(v.as_tensor()))
            .collect();
        if gs.first().is_some_and(|g| g.device().is_cuda())
            && gs.iter().all(|g| g.dtype() == DType::F32)
        {
            return Ok(cuda::sum_squares(&gs, factor)?.sqrt());
        }
    }
    let mut sq = 0f64;
    for var in vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            // f64, as the CUDA path: an f32 square of a large finite gradient must not read as
            // an overflow.
            sq += g
                .to_dtype(DType::F64)?
                .affine(factor, 0.0)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
    }
    Ok(sq.sqrt())
}
