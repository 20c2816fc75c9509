//! Which `config.json` keys lorascope reads, which it knows change nothing it computes, and
//! the rule that refuses the rest when their name suggests they change the math.

use serde_json::{Map, Value};

/// Keys that never change the function computed in training: ids, provenance, dtype hints,
/// inference-cache settings, the init std (used only for synthetic weights).
pub(crate) const HARMLESS: &[&str] = &[
    "architectures",
    "model_type",
    "_name_or_path",
    "name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sep_token_id",
    "use_cache",
    "cache_implementation",
    "initializer_range",
    "auto_map",
    "pretraining_tp",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "tokenizer_class",
    "id2label",
    "label2id",
    "problem_type",
    "is_decoder",
];

/// Name fragments of keys that change the math: an unknown key containing one is refused.
const MATHS: &[&str] = &[
    "rope",
    "rotary",
    "window",
    "bias",
    "norm",
    "softcap",
    "scal",
    "act",
    "dropout",
    "pdrop",
    "eps",
    "dim",
    "head",
    "expert",
    "moe",
    "attn",
    "attention",
    "layer",
    "freq",
    "factor",
    "position",
    "quant",
    "embed",
    "tie",
    "logit",
    "mlp",
    "hidden",
    "vocab",
    "sparse",
    "shared",
];

/// Whether an unknown key `k` looks like it changes the computed function.
pub(crate) fn looks_like_maths(k: &str) -> bool {
    let k = k.to_ascii_lowercase();
    MATHS.iter().any(|m| k.contains(m))
}

/// The fields of a parsed config, with bookkeeping of which keys were read.
pub(crate) struct Keys<'a> {
    pub(crate) map: &'a Map<String, Value>,
    pub(crate) read: std::cell::RefCell<Vec<&'static str>>,
}

impl<'a> Keys<'a> {
    pub(crate) fn raw(&self, k: &'static str) -> Option<&'a Value> {
        self.read.borrow_mut().push(k);
        self.map.get(k).filter(|v| !v.is_null())
    }
    pub(crate) fn usize(&self, k: &'static str) -> Result<Option<usize>, String> {
        self.raw(k)
            .map(|v| {
                v.as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| format!("`{k}` must be a non-negative integer, got {v}"))
            })
            .transpose()
    }
    pub(crate) fn need_usize(&self, k: &'static str) -> Result<usize, String> {
        self.usize(k)?.ok_or_else(|| format!("missing `{k}`"))
    }
    pub(crate) fn f64(&self, k: &'static str) -> Result<Option<f64>, String> {
        self.raw(k)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| format!("`{k}` must be a number, got {v}"))
            })
            .transpose()
    }
    pub(crate) fn bool(&self, k: &'static str) -> Result<Option<bool>, String> {
        self.raw(k)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| format!("`{k}` must be true or false, got {v}"))
            })
            .transpose()
    }
    pub(crate) fn str(&self, k: &'static str) -> Result<Option<&'a str>, String> {
        self.raw(k)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| format!("`{k}` must be a string, got {v}"))
            })
            .transpose()
    }
    /// Read `k` and accept only its neutral value (a number 0, or `false`).
    pub(crate) fn neutral(&self, k: &'static str, what: &str) -> Result<(), String> {
        match self.raw(k) {
            None => Ok(()),
            Some(Value::Bool(false)) => Ok(()),
            Some(v) if v.as_f64() == Some(0.0) => Ok(()),
            Some(v) => Err(format!(
                "`{k}` = {v} is not supported ({what}); set it to {}",
                if v.is_boolean() { "false" } else { "0" }
            )),
        }
    }
    /// Mark `k` as read without using it (transformers stores it but does not compute with it).
    pub(crate) fn ignore(&self, k: &'static str) {
        self.read.borrow_mut().push(k);
    }
}
