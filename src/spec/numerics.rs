//! How a run computes: the precision of activations and dense base weights, and the
//! quantisation of the base weights of the target projections.

use serde::{Deserialize, Serialize};

use super::{UnknownName, parse_exact, spellings};

/// Compute precision of the base weights and activations (profile `grid.precision`, worker
/// `--precision`). Adapter master weights and optimizer state are f32 at every precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// IEEE float32 everywhere.
    Fp32,
    /// float16 compute with dynamic loss scaling (PyTorch GradScaler semantics), f32 master
    /// weights and optimizer state.
    Fp16,
    /// bfloat16 compute, f32 master weights and optimizer state.
    Bf16,
}

spellings!(Precision { Fp32 => "fp32", Fp16 => "fp16", Bf16 => "bf16" });

impl std::str::FromStr for Precision {
    type Err = UnknownName;

    /// Accepts `fp32`, `fp16` or `bf16`.
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        parse_exact(
            &Self::ALL,
            Self::as_str,
            s,
            "precision",
            "fp32, fp16 or bf16",
        )
    }
}

/// Base-weight quantisation of the target projections (profile `grid.quant`, worker
/// `--quant`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Quant {
    /// Keep base weights in the compute dtype.
    #[default]
    None,
    /// NF4 with double-quantised block statistics (QLoRA, Dettmers et al. 2023; the
    /// bitsandbytes `nf4` layout: blocks of 64, absmax statistics quantised to 8 bits in
    /// blocks of 256).
    Nf4,
}

spellings!(Quant { None => "none", Nf4 => "nf4" });

impl std::str::FromStr for Quant {
    type Err = UnknownName;

    /// Accepts `none` or `nf4`.
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        parse_exact(&Self::ALL, Self::as_str, s, "quantisation", "none or nf4")
    }
}
