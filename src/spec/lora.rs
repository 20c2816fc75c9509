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

/// One entry of `lora.targets` / `--lora-targets` as PEFT's `target_modules` names modules: a
/// single projection (`q`, or PEFT's `q_proj`), one of Phi-3's fused modules (`qkv_proj`,
/// `gate_up_proj`), or `all-linear` (PEFT's shorthand: every linear module of the decoder
/// layers, `lm_head` excluded). Which of them a model has depends on its family (the engine
/// checks: Phi-3 has `qkv_proj` and `gate_up_proj` in place of q/k/v and gate/up).
///
/// Serialised (profiles, run ids, the worker's command line) as [`LoraModule::as_str`]: the
/// short names `q` ... `down` for single projections, `qkv_proj`, `gate_up_proj`, `all-linear`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum LoraModule {
    /// One projection.
    One(LoraTarget),
    /// `self_attn.qkv_proj` (Phi-3): q, k and v under one adapter.
    Qkv,
    /// `mlp.gate_up_proj` (Phi-3): gate and up under one adapter.
    GateUp,
    /// Every projection of the decoder layers.
    AllLinear,
}

/// The accepted spellings, for messages.
const MODULE_NAMES: &str =
    "any of q,k,v,o,gate,up,down (or q_proj ... down_proj), qkv_proj, gate_up_proj, all-linear";

impl LoraModule {
    /// The spelling written in profiles and passed to the worker: `q` ... `down`,
    /// `qkv_proj`, `gate_up_proj`, `all-linear`.
    pub fn as_str(self) -> &'static str {
        match self {
            LoraModule::One(t) => t.as_str(),
            LoraModule::Qkv => "qkv_proj",
            LoraModule::GateUp => "gate_up_proj",
            LoraModule::AllLinear => "all-linear",
        }
    }

    /// PEFT `target_modules` spelling: `q_proj` ... `down_proj`, `qkv_proj`, `gate_up_proj`,
    /// `all-linear`.
    pub fn peft_name(self) -> &'static str {
        match self {
            LoraModule::One(t) => t.peft_name(),
            other => other.as_str(),
        }
    }

    /// The projections this entry adapts (in the layer's order).
    pub fn targets(self) -> &'static [LoraTarget] {
        use LoraTarget::*;
        match self {
            LoraModule::One(t) => match t {
                Q => &[Q],
                K => &[K],
                V => &[V],
                O => &[O],
                Gate => &[Gate],
                Up => &[Up],
                Down => &[Down],
            },
            LoraModule::Qkv => &[Q, K, V],
            LoraModule::GateUp => &[Gate, Up],
            LoraModule::AllLinear => &LoraTarget::ALL,
        }
    }

    /// The projections any of `modules` adapts, in the layer's order, once each.
    pub fn expand(modules: &[LoraModule]) -> Vec<LoraTarget> {
        LoraTarget::ALL
            .into_iter()
            .filter(|t| modules.iter().any(|m| m.targets().contains(t)))
            .collect()
    }

    /// `modules` as the worker's `--lora-targets` value (comma-separated [`Self::as_str`]).
    pub fn join(modules: &[LoraModule]) -> String {
        modules
            .iter()
            .map(|m| m.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Parse a comma-separated list (`q_proj,v_proj`, `qkv_proj,o`, `all-linear`); empty
    /// entries are skipped, repeated ones kept once.
    ///
    /// Errors: an unknown name, listing the accepted ones.
    pub fn parse_list(s: &str) -> Result<Vec<LoraModule>, UnknownName> {
        let mut out = Vec::new();
        for m in s.split(',').filter(|x| !x.trim().is_empty()) {
            let m: LoraModule = m.parse()?;
            if !out.contains(&m) {
                out.push(m);
            }
        }
        Ok(out)
    }
}

impl From<LoraTarget> for LoraModule {
    fn from(t: LoraTarget) -> Self {
        LoraModule::One(t)
    }
}

impl std::fmt::Display for LoraModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for LoraModule {
    type Err = UnknownName;

    /// Accepts a [`LoraTarget`] spelling (`q`, `q_proj`, ...), `qkv_proj` (or `qkv`),
    /// `gate_up_proj` (or `gate_up`), `all-linear` (or `all_linear`); surrounding whitespace
    /// ignored.
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        match s.trim() {
            "all-linear" | "all_linear" => Ok(LoraModule::AllLinear),
            "qkv_proj" | "qkv" => Ok(LoraModule::Qkv),
            "gate_up_proj" | "gate_up" => Ok(LoraModule::GateUp),
            other => other
                .parse::<LoraTarget>()
                .map(LoraModule::One)
                .map_err(|_| UnknownName {
                    what: "LoRA target",
                    given: other.to_string(),
                    expected: MODULE_NAMES,
                }),
        }
    }
}

impl TryFrom<String> for LoraModule {
    type Error = UnknownName;

    fn try_from(s: String) -> Result<Self, UnknownName> {
        s.parse()
    }
}

impl From<LoraModule> for String {
    fn from(m: LoraModule) -> String {
        m.as_str().to_string()
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
        let m = |s: &str| s.parse::<LoraModule>().unwrap();
        assert_eq!(m("qkv_proj"), LoraModule::Qkv);
        assert_eq!(m("qkv_proj").targets(), [Q, K, V]);
        assert_eq!(m("gate_up_proj").targets(), [Gate, Up]);
        assert_eq!(m("all-linear").targets(), LoraTarget::ALL);
        assert_eq!(m("o_proj"), LoraModule::One(O));
        assert_eq!(m(" down "), LoraModule::One(Down));
        let e = "lm_head".parse::<LoraModule>().unwrap_err().to_string();
        assert!(e.contains("lm_head") && e.contains("all-linear"), "{e}");
        assert_eq!(
            LoraModule::expand(&[m("down"), m("qkv_proj"), m("q")]),
            [Q, K, V, Down]
        );
        let list = LoraModule::parse_list("q_proj, v_proj,,q").unwrap();
        assert_eq!(list, [LoraModule::One(Q), LoraModule::One(V)]);
        assert_eq!(LoraModule::join(&list), "q,v");
        assert!(LoraModule::parse_list("q,lm_head").is_err());
    }

    /// Display, FromStr and serde agree; single projections keep their short spelling (run
    /// ids of existing profiles do not change).
    #[test]
    fn module_spellings_agree() {
        let mut all: Vec<LoraModule> = LoraTarget::ALL.into_iter().map(LoraModule::One).collect();
        all.extend([LoraModule::Qkv, LoraModule::GateUp, LoraModule::AllLinear]);
        for m in all {
            let s = m.to_string();
            assert_eq!(s.parse::<LoraModule>().unwrap(), m);
            assert_eq!(serde_json::to_string(&m).unwrap(), format!("\"{s}\""));
            assert_eq!(
                serde_json::from_str::<LoraModule>(&format!("\"{s}\"")).unwrap(),
                m
            );
        }
        assert_eq!(LoraModule::One(LoraTarget::Q).as_str(), "q");
        assert_eq!(LoraModule::One(LoraTarget::Q).peft_name(), "q_proj");
    }
}
