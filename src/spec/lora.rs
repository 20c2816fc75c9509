//! The projections of a decoder layer that can carry a LoRA adapter.

use serde::{Deserialize, Serialize};

use super::{UnknownName, spellings};

/// A projection of a decoder layer that can carry an adapter (profile `lora.targets`, worker
/// `--lora-targets`): Hugging Face PEFT's `target_modules` names without the `_proj` suffix.
/// The order (`Ord`, [`LoraTarget::ALL`]) is the layer's: q, k, v, o, gate, up, down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraTarget {
    /// `self_attn.q_proj`
    Q,
    /// `self_attn.k_proj`
    K,
    /// `self_attn.v_proj`
    V,
    /// `self_attn.o_proj`
    O,
    /// `mlp.gate_proj`
    Gate,
    /// `mlp.up_proj`
    Up,
    /// `mlp.down_proj`
    Down,
}

spellings!(LoraTarget {
    Q => "q",
    K => "k",
    V => "v",
    O => "o",
    Gate => "gate",
    Up => "up",
    Down => "down",
});

impl LoraTarget {
    /// Hugging Face module path inside a decoder layer (transformers' Llama / Qwen2), e.g.
    /// `self_attn.q_proj`.
    pub fn module_path(self) -> &'static str {
        match self {
            LoraTarget::Q => "self_attn.q_proj",
            LoraTarget::K => "self_attn.k_proj",
            LoraTarget::V => "self_attn.v_proj",
            LoraTarget::O => "self_attn.o_proj",
            LoraTarget::Gate => "mlp.gate_proj",
            LoraTarget::Up => "mlp.up_proj",
            LoraTarget::Down => "mlp.down_proj",
        }
    }

    /// PEFT `target_modules` name, e.g. `q_proj`.
    pub fn peft_name(self) -> &'static str {
        self.module_path().rsplit('.').next().unwrap_or("")
    }
}

impl LoraTarget {
    /// Parse one entry of a `--lora-targets` list as PEFT names modules: a single projection
    /// (`q`, `q_proj`, ...), a fused module (`qkv_proj` = q, k, v as Phi-3 stores them;
    /// `gate_up_proj` = gate, up), or `all-linear` (PEFT's shorthand: every projection of the
    /// decoder layers, `lm_head` excluded).
    ///
    /// Errors: an unknown name, listing the accepted ones.
    pub fn parse_module(s: &str) -> Result<Vec<LoraTarget>, UnknownName> {
        use LoraTarget::*;
        match s.trim() {
            "all-linear" | "all_linear" => Ok(Self::ALL.to_vec()),
            "qkv_proj" | "qkv" => Ok(vec![Q, K, V]),
            "gate_up_proj" | "gate_up" => Ok(vec![Gate, Up]),
            other => other.parse::<LoraTarget>().map(|t| vec![t]).map_err(|_| UnknownName {
                what: "LoRA target",
                given: other.to_string(),
                expected: "any of q,k,v,o,gate,up,down (or q_proj ...), qkv_proj, gate_up_proj, all-linear",
            }),
        }
    }
}

impl std::str::FromStr for LoraTarget {
    type Err = UnknownName;

    /// Accepts `q`, `k`, `v`, `o`, `gate`, `up`, `down`, with or without the `_proj` suffix
    /// (`q_proj`), surrounding whitespace ignored.
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        let name = s.trim().trim_end_matches("_proj");
        Self::ALL
            .into_iter()
            .find(|t| t.as_str() == name)
            .ok_or_else(|| UnknownName {
                what: "LoRA target",
                given: name.to_string(),
                expected: "any of q,k,v,o,gate,up,down",
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_names_parse_back() {
        for t in LoraTarget::ALL {
            assert_eq!(t.peft_name().parse::<LoraTarget>().unwrap(), t);
        }
        assert_eq!(" gate ".parse::<LoraTarget>().unwrap(), LoraTarget::Gate);
    }

    #[test]
    fn fused_and_all_linear_module_names_expand() {
        use LoraTarget::*;
        assert_eq!(LoraTarget::parse_module("qkv_proj").unwrap(), [Q, K, V]);
        assert_eq!(
            LoraTarget::parse_module("gate_up_proj").unwrap(),
            [Gate, Up]
        );
        assert_eq!(
            LoraTarget::parse_module("all-linear").unwrap(),
            LoraTarget::ALL
        );
        assert_eq!(LoraTarget::parse_module("o_proj").unwrap(), [O]);
        let e = LoraTarget::parse_module("lm_head").unwrap_err().to_string();
        assert!(e.contains("lm_head") && e.contains("all-linear"), "{e}");
    }
}
