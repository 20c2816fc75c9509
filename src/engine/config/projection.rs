//! The linear modules of a decoder layer as each family stores them ([`Projection`]), their
//! shapes and biases, and which of them a `--lora-targets` list adapts (PEFT's
//! `target_modules` names, checked against the family).

use super::{Family, ModelConfig};
use crate::engine::EngineError;
use crate::spec::{LoraModule, LoraTarget};

/// A linear module of one decoder layer as the checkpoint stores it. Phi-3 stores
/// [`Projection::Qkv`] and [`Projection::GateUp`] in place of q/k/v and gate/up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Projection {
    /// `self_attn.q_proj`.
    Q,
    /// `self_attn.k_proj`.
    K,
    /// `self_attn.v_proj`.
    V,
    /// `self_attn.qkv_proj`: rows q, then k, then v.
    Qkv,
    /// `self_attn.o_proj`.
    O,
    /// `mlp.gate_proj`.
    Gate,
    /// `mlp.up_proj`.
    Up,
    /// `mlp.gate_up_proj`: rows gate, then up.
    GateUp,
    /// `mlp.down_proj`.
    Down,
}

impl Projection {
    /// Module path inside a decoder layer, e.g. `self_attn.qkv_proj`.
    pub fn module_path(self) -> &'static str {
        match self {
            Projection::Q => "self_attn.q_proj",
            Projection::K => "self_attn.k_proj",
            Projection::V => "self_attn.v_proj",
            Projection::Qkv => "self_attn.qkv_proj",
            Projection::O => "self_attn.o_proj",
            Projection::Gate => "mlp.gate_proj",
            Projection::Up => "mlp.up_proj",
            Projection::GateUp => "mlp.gate_up_proj",
            Projection::Down => "mlp.down_proj",
        }
    }

    /// PEFT `target_modules` name, e.g. `qkv_proj`.
    pub fn peft_name(self) -> &'static str {
        self.module_path().rsplit('.').next().unwrap_or("")
    }

    /// The computations of this module as text, e.g. `q, k, v` for `qkv_proj`.
    pub fn targets_text(self) -> String {
        self.targets()
            .iter()
            .map(|t| t.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The [`LoraTarget`]s this module computes.
    pub fn targets(self) -> &'static [LoraTarget] {
        use LoraTarget as T;
        match self {
            Projection::Q => &[T::Q],
            Projection::K => &[T::K],
            Projection::V => &[T::V],
            Projection::Qkv => &[T::Q, T::K, T::V],
            Projection::O => &[T::O],
            Projection::Gate => &[T::Gate],
            Projection::Up => &[T::Up],
            Projection::GateUp => &[T::Gate, T::Up],
            Projection::Down => &[T::Down],
        }
    }
}

impl ModelConfig {
    /// The linear modules of one decoder layer, in the order the layer runs them.
    pub fn projections(&self) -> &'static [Projection] {
        use Projection as P;
        if self.family == Family::Phi3 {
            &[P::Qkv, P::O, P::GateUp, P::Down]
        } else {
            &[P::Q, P::K, P::V, P::O, P::Gate, P::Up, P::Down]
        }
    }

    /// `(out_features, in_features)` of a module in one decoder layer.
    pub fn projection_dims(&self, p: Projection) -> (usize, usize) {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let i = self.intermediate_size;
        match p {
            Projection::Q => (q, h),
            Projection::K | Projection::V => (kv, h),
            Projection::Qkv => (q + 2 * kv, h),
            Projection::O => (h, q),
            Projection::Gate | Projection::Up => (i, h),
            Projection::GateUp => (2 * i, h),
            Projection::Down => (h, i),
        }
    }

    /// Whether module `p` has a bias.
    pub fn projection_bias(&self, p: Projection) -> bool {
        match p {
            Projection::Q | Projection::K | Projection::V | Projection::Qkv => self.attention_bias,
            Projection::O => self.o_proj_bias,
            _ => self.mlp_bias,
        }
    }

    /// `(out_features, in_features)` of the computation of `target` in one layer (a slice of
    /// a fused module for Phi-3).
    pub fn projection_shape(&self, target: LoraTarget) -> (usize, usize) {
        use LoraTarget::*;
        let p = match target {
            Q => Projection::Q,
            K => Projection::K,
            V => Projection::V,
            O => Projection::O,
            Gate => Projection::Gate,
            Up => Projection::Up,
            Down => Projection::Down,
        };
        self.projection_dims(p)
    }

    /// Whether the computation of `target` carries a bias.
    pub fn projection_has_bias(&self, target: LoraTarget) -> bool {
        use LoraTarget::*;
        match target {
            Q | K | V => self.attention_bias,
            O => self.o_proj_bias,
            Gate | Up | Down => self.mlp_bias,
        }
    }

    /// The `--lora-targets` entries this model has, as PEFT names them: its modules' names
    /// (`q_proj` ... `down_proj`, or Phi-3's `qkv_proj`, `o_proj`, `gate_up_proj`,
    /// `down_proj`) and `all-linear`.
    pub fn lora_module_names(&self) -> Vec<&'static str> {
        let mut v: Vec<&'static str> = self.projections().iter().map(|p| p.peft_name()).collect();
        v.push("all-linear");
        v
    }

    /// The projections `modules` adapt in this model, in the layer's order, once each.
    ///
    /// Single projections that together make up one of Phi-3's fused modules (`q,k,v` for
    /// `qkv_proj`) are accepted as that module, so the default `q,k,v,o` works on every family.
    ///
    /// Errors (one line naming the entry and this model's valid targets): a fused name on a
    /// model that stores the projections separately (`qkv_proj` on Llama), or part of a fused
    /// module (`q_proj` without `k_proj` and `v_proj` on Phi-3, which stores q, k and v as one
    /// `qkv_proj` with one adapter). An empty list adapts nothing.
    pub fn lora_targets(&self, modules: &[LoraModule]) -> Result<Vec<LoraTarget>, EngineError> {
        let valid = || self.lora_module_names().join(", ");
        let class = self.family.class_name();
        let expanded = LoraModule::expand(modules);
        let projections = self.projections();
        for &m in modules {
            let missing = match m {
                LoraModule::AllLinear => None,
                LoraModule::Qkv | LoraModule::GateUp => {
                    let p = if m == LoraModule::Qkv {
                        Projection::Qkv
                    } else {
                        Projection::GateUp
                    };
                    (!projections.contains(&p)).then(String::new)
                }
                LoraModule::One(t) => projections
                    .iter()
                    .find(|p| p.targets().contains(&t))
                    .filter(|p| !p.targets().iter().all(|x| expanded.contains(x)))
                    .map(|p| {
                        format!(
                            " (it stores {} as one module `{}` with one adapter: target `{}`)",
                            p.targets_text(),
                            p.peft_name(),
                            p.peft_name()
                        )
                    }),
            };
            if let Some(why) = missing {
                return Err(EngineError::Invalid(format!(
                    "LoRA target `{}`: {class} has no such module{why}; its LoRA targets are {}",
                    m.peft_name(),
                    valid()
                )));
            }
        }
        Ok(expanded)
    }
}
