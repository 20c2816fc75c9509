//! The optimizers a run can use (bitsandbytes' names and semantics).

use serde::{Deserialize, Serialize};

use super::{UnknownName, parse_exact, spellings};

/// An optimizer of the adapter weights (profile `grid.optimizer`, worker `--optimizer`): AdamW
/// (Loshchilov & Hutter, decoupled weight decay, as `torch.optim.AdamW`) with f32 or
/// block-wise 8-bit moments, optionally paged.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub enum Optimizer {
    /// AdamW with f32 moments (`torch.optim.AdamW`).
    #[default]
    #[serde(rename = "adamw")]
    AdamW,
    /// AdamW with block-wise 8-bit moments (bitsandbytes `AdamW8bit`: dynamic quantisation
    /// map, blocks of 256).
    #[serde(rename = "adamw8bit")]
    AdamW8bit,
    /// [`Optimizer::AdamW`] with the state of large tensors in CUDA unified memory
    /// (bitsandbytes `PagedAdamW`).
    #[serde(rename = "paged_adamw")]
    PagedAdamW,
    /// [`Optimizer::AdamW8bit`] with the state of large tensors in CUDA unified memory
    /// (bitsandbytes `PagedAdamW8bit`).
    #[serde(rename = "paged_adamw8bit")]
    PagedAdamW8bit,
}

spellings!(Optimizer {
    AdamW => "adamw",
    AdamW8bit => "adamw8bit",
    PagedAdamW => "paged_adamw",
    PagedAdamW8bit => "paged_adamw8bit",
});

impl Optimizer {
    /// The accepted spellings, as a phrase for error messages.
    pub const EXPECTED: &str = "adamw, adamw8bit, paged_adamw or paged_adamw8bit";

    /// Whether this is a paged variant.
    pub fn is_paged(self) -> bool {
        matches!(self, Self::PagedAdamW | Self::PagedAdamW8bit)
    }
}

impl std::str::FromStr for Optimizer {
    type Err = UnknownName;

    /// Accepts `adamw`, `adamw8bit`, `paged_adamw` or `paged_adamw8bit`.
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        parse_exact(&Self::ALL, Self::as_str, s, "optimizer", Self::EXPECTED)
    }
}
