//! Loading a PEFT LoRA adapter (`adapter_model.safetensors`, keys
//! `base_model.model.model.layers.{i}.<module>.lora_A.weight` (r, in) and `...lora_B.weight`
//! (out, r)) into a model's adapters, e.g. to continue training one or to check lorascope
//! against PEFT.

use super::Model;
use crate::engine::EngineError;
use candle_core::DType;
use std::collections::HashSet;
use std::path::Path;

impl Model {
    /// Replace every adapter's A and B with the tensors of the PEFT adapter file `file`
    /// (`adapter_model.safetensors`), converted to f32. The file must hold exactly the
    /// adapters this model has (same modules, same rank).
    ///
    /// Errors ([`EngineError::Weights`], naming the key): an unreadable file, a missing key, a
    /// shape that does not match, a key for a module this model does not adapt.
    pub fn load_peft_adapter(&self, file: &Path) -> Result<(), EngineError> {
        let werr = |msg: String| EngineError::Weights {
            file: file.display().to_string(),
            msg,
        };
        let tensors = candle_core::safetensors::load(file, &candle_core::Device::Cpu)
            .map_err(|e| werr(format!("cannot read the adapter ({e})")))?;
        let mut used = HashSet::new();
        for ad in self.adapters() {
            for (part, var) in [("lora_A", &ad.a), ("lora_B", &ad.b)] {
                let key = format!("{}.{part}.weight", ad.name);
                let t = tensors.get(&key).ok_or_else(|| {
                    werr(format!(
                        "key `{key}` is missing (the adapter must target the same modules as --lora-targets)"
                    ))
                })?;
                if t.dims() != var.dims() {
                    return Err(werr(format!(
                        "`{key}` has shape {:?}, expected {:?} (rank and model must match)",
                        t.dims(),
                        var.dims()
                    )));
                }
                let t = t
                    .to_dtype(DType::F32)
                    .and_then(|t| t.to_device(var.device()))
                    .map_err(|e| werr(format!("`{key}`: {e}")))?;
                var.set(&t).map_err(|e| werr(format!("`{key}`: {e}")))?;
                used.insert(key);
            }
        }
        let mut extra: Vec<&String> = tensors.keys().filter(|k| !used.contains(*k)).collect();
        extra.sort();
        if let Some(k) = extra.first() {
            return Err(werr(format!(
                "key `{k}` is for a module this model does not adapt (add it to --lora-targets)"
            )));
        }
        Ok(())
    }
}
