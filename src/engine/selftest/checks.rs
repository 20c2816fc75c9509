//! What `selftest engine --fixtures` reports: the variants a case runs in, their fixed
//! tolerances, and the compared quantities ([`Measure`]) of one row ([`Check`]).

use crate::spec::Quant;
use candle_core::{DType, Device};

/// Logits and loss tolerance in fp32 on the CPU (the order of summation is the only
/// difference from PyTorch's CPU kernels).
pub const F32_TOL_CPU: f64 = 1e-5;
/// Logits and loss tolerance in fp32 on CUDA (cuBLAS sums in another order; no TF32).
pub const F32_TOL_CUDA: f64 = 1e-4;
/// LoRA-gradient tolerance in fp32 on any device.
pub const F32_GRAD_TOL: f64 = 1e-4;
/// Logits and loss tolerance in fp16 (11 mantissa bits).
pub const F16_TOL: f64 = 1e-2;
/// Logits and loss tolerance in bf16 (8 mantissa bits: 8x fp16's unit roundoff).
pub const BF16_TOL: f64 = 2.5e-2;
/// LoRA-gradient tolerance in fp16 and bf16.
pub const HALF_GRAD_TOL: f64 = 5e-2;

/// One way of running a case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variant {
    /// Compute dtype: F32, F16 or BF16.
    pub dtype: DType,
    /// Gradient checkpointing of the decoder layers.
    pub checkpointing: bool,
    /// Dense weights (compared with transformers) or NF4 (compared with the CPU NF4 path).
    pub quant: Quant,
}

impl Variant {
    /// Every variant: dense fp32/fp16/bf16 and NF4 fp32/bf16, each without and with
    /// checkpointing.
    pub fn all() -> Vec<Variant> {
        let mut v = Vec::new();
        for (quant, dtypes) in [
            (Quant::None, &[DType::F32, DType::F16, DType::BF16][..]),
            (Quant::Nf4, &[DType::F32, DType::BF16][..]),
        ] {
            for &dtype in dtypes {
                for checkpointing in [false, true] {
                    v.push(Variant {
                        dtype,
                        checkpointing,
                        quant,
                    });
                }
            }
        }
        v
    }

    /// e.g. `bf16 nf4 ckpt`, `fp32 dense`.
    pub fn name(&self) -> String {
        format!(
            "{} {}{}",
            dtype_name(self.dtype),
            if self.quant == Quant::Nf4 {
                "nf4"
            } else {
                "dense"
            },
            if self.checkpointing { " ckpt" } else { "" }
        )
    }

    /// The fixed tolerances on `device` (logits and losses share one).
    pub fn tolerances(&self, device: &Device) -> Tolerances {
        let (tol, grads) = match self.dtype {
            DType::F32 if device.is_cpu() => (F32_TOL_CPU, F32_GRAD_TOL),
            DType::F32 => (F32_TOL_CUDA, F32_GRAD_TOL),
            DType::F16 => (F16_TOL, HALF_GRAD_TOL),
            _ => (BF16_TOL, HALF_GRAD_TOL),
        };
        Tolerances {
            logits: tol,
            loss: tol,
            grads,
        }
    }
}

/// Tolerances of one variant: logits, losses, LoRA gradients (relative, see
/// [`super::fixtures::max_rel`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerances {
    /// Logits.
    pub logits: f64,
    /// Base and adapted loss.
    pub loss: f64,
    /// Gradients of the LoRA weights.
    pub grads: f64,
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "fp32",
        DType::F16 => "fp16",
        DType::BF16 => "bf16",
        _ => "other",
    }
}

/// One compared quantity of a [`Check`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct Measure {
    /// `logits`, `loss`, `grads`, `inv_freq`, ...
    pub what: &'static str,
    /// `max |got - want| / max |want|` (largest over the tensors compared).
    pub rel: f64,
    /// Largest `rel` accepted.
    pub tol: f64,
}

impl Measure {
    /// `rel / tol` (0 for an exact match, infinite past a zero tolerance).
    pub fn ratio(&self) -> f64 {
        if self.rel == 0.0 {
            0.0
        } else if self.tol > 0.0 {
            self.rel / self.tol
        } else {
            f64::INFINITY
        }
    }
}

/// The result of one case in one variant.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    /// Fixture directory name, e.g. `phi3-longrope`.
    pub case: String,
    /// [`Variant::name`], or `config` for [`check_resolved`].
    pub variant: String,
    /// What was compared, with the errors.
    pub measures: Vec<Measure>,
    /// What the comparison was against: `transformers` or `cpu nf4`.
    pub against: &'static str,
}

impl Check {
    /// Every measure within its tolerance (and finite).
    pub fn pass(&self) -> bool {
        self.measures.iter().all(|m| m.rel <= m.tol)
    }

    /// The measure with the largest `rel / tol` (the closest to failing, or the one that
    /// failed).
    pub fn worst(&self) -> Option<&Measure> {
        self.measures
            .iter()
            .max_by(|a, b| a.ratio().total_cmp(&b.ratio()))
    }
}
