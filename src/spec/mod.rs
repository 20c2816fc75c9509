//! The shared vocabulary of the crate, each concept defined once: the device a run uses, its
//! numerics (compute precision, base-weight quantisation), the optimizer, the LoRA target
//! projections, the dataset format, and the worker's JSON-lines records ([`wire`]).
//!
//! A leaf: nothing here imports another module of the crate, and nothing here needs candle.
//! Helpers that need the engine (the candle dtype of a [`Precision`], the optimizer that
//! implements an [`Optimizer`]) live in the engine.
//!
//! Spellings: every enum serialises (serde, as profiles write it in TOML and the worker in
//! JSON), prints ([`std::fmt::Display`]) and parses ([`std::str::FromStr`]) with the same
//! lower-case names the worker's command-line flags take (`fp16`, `nf4`, `paged_adamw8bit`,
//! `gate`, `text`, `cuda:0`, ...). A name that is not one of them is an [`UnknownName`].

mod cards;
mod data;
mod device;
mod lora;
mod numerics;
mod optimizer;
pub mod wire;

pub use cards::Card;
pub use data::DataFormat;
pub use device::{Device, DeviceKind};
pub use lora::{LoraModule, LoraTarget};
pub use numerics::{Precision, Quant};
pub use optimizer::Optimizer;

/// A name that [`std::str::FromStr`] does not know. `Display` is one line, e.g.
/// ``unknown optimizer `adam` (expected adamw, adamw8bit, paged_adamw or paged_adamw8bit)``.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} `{given}` (expected {expected})")]
pub struct UnknownName {
    /// What kind of name was parsed, e.g. `optimizer`, `LoRA target`.
    pub what: &'static str,
    /// The name as given (after any trimming the parser does).
    pub given: String,
    /// The accepted names, as a phrase (`none or nf4`).
    pub expected: &'static str,
}

/// Implements `ALL`, `as_str` and `Display` for a unit-only enum from a table of its variants
/// and their spellings.
macro_rules! spellings {
    ($t:ty { $($v:ident => $s:literal),* $(,)? }) => {
        impl $t {
            /// Every value, in declaration order.
            pub const ALL: [$t; [$($s),*].len()] = [$(<$t>::$v),*];

            /// The spelling used in profiles, JSON and on the worker's command line.
            pub fn as_str(self) -> &'static str {
                match self { $(<$t>::$v => $s),* }
            }
        }

        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
use spellings;

/// The value among `all` whose `name` is exactly `s`, else an [`UnknownName`].
fn parse_exact<T: Copy>(
    all: &[T],
    name: impl Fn(T) -> &'static str,
    s: &str,
    what: &'static str,
    expected: &'static str,
) -> Result<T, UnknownName> {
    all.iter()
        .copied()
        .find(|&v| name(v) == s)
        .ok_or_else(|| UnknownName {
            what,
            given: s.to_string(),
            expected,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fmt::Display;
    use std::str::FromStr;

    /// `Display`, `FromStr` and serde agree on every value's spelling.
    fn spellings_agree<T>(all: &[T])
    where
        T: Copy + Display + FromStr<Err = UnknownName> + PartialEq + std::fmt::Debug,
        T: serde::Serialize + serde::de::DeserializeOwned,
    {
        for &v in all {
            let s = v.to_string();
            assert_eq!(s.parse::<T>().unwrap(), v);
            assert_eq!(serde_json::to_string(&v).unwrap(), format!("\"{s}\""));
            assert_eq!(serde_json::from_str::<T>(&format!("\"{s}\"")).unwrap(), v);
        }
    }

    #[test]
    fn every_enum_has_one_spelling() {
        spellings_agree(&Precision::ALL);
        spellings_agree(&Quant::ALL);
        spellings_agree(&Optimizer::ALL);
        spellings_agree(&LoraTarget::ALL);
        spellings_agree(&DataFormat::ALL);
        spellings_agree(&DeviceKind::ALL);
    }

    /// Nothing in spec imports another module of the crate.
    #[test]
    fn spec_is_a_leaf() {
        let files = [
            ("mod.rs", include_str!("mod.rs")),
            ("data.rs", include_str!("data.rs")),
            ("device.rs", include_str!("device.rs")),
            ("lora.rs", include_str!("lora.rs")),
            ("numerics.rs", include_str!("numerics.rs")),
            ("optimizer.rs", include_str!("optimizer.rs")),
            ("wire.rs", include_str!("wire.rs")),
        ];
        let upward = [concat!("crate", "::"), concat!("super::", "super")];
        for (name, src) in files {
            for pat in upward {
                assert!(!src.contains(pat), "src/spec/{name} uses `{pat}`");
            }
        }
    }

    #[test]
    fn unknown_names_are_one_line() {
        assert_eq!(
            "adam".parse::<Optimizer>().unwrap_err().to_string(),
            "unknown optimizer `adam` (expected adamw, adamw8bit, paged_adamw or paged_adamw8bit)"
        );
        assert_eq!(
            "qkv".parse::<LoraTarget>().unwrap_err().to_string(),
            "unknown LoRA target `qkv` (expected any of q,k,v,o,gate,up,down)"
        );
        assert_eq!(
            "int8".parse::<Quant>().unwrap_err().to_string(),
            "unknown quantisation `int8` (expected none or nf4)"
        );
        assert_eq!(
            "fp8".parse::<Precision>().unwrap_err().to_string(),
            "unknown precision `fp8` (expected fp32, fp16 or bf16)"
        );
    }
}
