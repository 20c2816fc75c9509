//! Final-logit soft-capping (Gemma 2 and 3 `final_logit_softcapping`): `z' = tanh(z / cap) *
//! cap`, applied to the `lm_head` output before the loss, and the cross-entropy over the capped
//! logits.
//!
//! - forward: `z = h W^T` ([`FrozenLinear`], dx only), `z' = cap * tanh(z / cap)` in f32, then
//!   `mean over targets != -100 of (logsumexp(z'_i) - z'_i[target_i])`, PyTorch
//!   `CrossEntropyLoss(ignore_index=-100)` on the shifted labels (transformers'
//!   `ForCausalLMLoss`, which upcasts the logits to f32);
//! - backward: candle autograd over these primitives (`d tanh = 1 - tanh^2`).
//!
//! No fused kernel: the full (tokens x vocab) f32 logits are materialised, so this path is for
//! the models that ask for capping, and the run header says it runs generic.

use super::{FrozenLinear, IGNORE_INDEX};
use candle_core::{D, DType, Device, Result, Tensor};

/// `tanh(z / cap) * cap`, differentiable, in `z`'s dtype.
///
/// Errors: device errors.
pub fn softcap(z: &Tensor, cap: f64) -> Result<Tensor> {
    z.affine(1.0 / cap, 0.0)?.tanh()?.affine(cap, 0.0)
}

/// Mean cross-entropy (scalar f32) of the soft-capped logits of `h` (tokens, hidden) under
/// `lm_head` (vocab, hidden, frozen) against pre-shifted `targets` (tokens, -100 ignored).
/// Differentiable with respect to `h` only.
///
/// Errors: `targets` of the wrong length, no counted target, device errors.
pub fn softcapped_cross_entropy(
    h: &Tensor,
    lm_head: &Tensor,
    targets: &[i64],
    cap: f64,
    device: &Device,
) -> Result<Tensor> {
    let (tokens, _) = h.dims2()?;
    if targets.len() != tokens {
        candle_core::bail!(
            "softcapped cross-entropy: {} targets for {tokens} rows",
            targets.len()
        );
    }
    let rows: Vec<u32> = (0..tokens as u32)
        .filter(|&i| targets[i as usize] != IGNORE_INDEX)
        .collect();
    if rows.is_empty() {
        candle_core::bail!("softcapped cross-entropy: every target is ignored");
    }
    let picked: Vec<u32> = rows.iter().map(|&i| targets[i as usize] as u32).collect();
    let n = rows.len();
    let rows = Tensor::from_vec(rows, n, device)?;
    let picked = Tensor::from_vec(picked, (n, 1), device)?;
    let head = FrozenLinear::new(lm_head.clone(), None);
    let z = head.forward(&h.index_select(&rows, 0)?)?;
    let z = softcap(&z.to_dtype(DType::F32)?, cap)?;
    let m = z.max_keepdim(D::Minus1)?.detach();
    let lse = (z.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?.log()? + m)?;
    let target = z.gather(&picked, D::Minus1)?;
    (lse - target)?.mean_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ops::ChunkedCrossEntropy;
    use crate::engine::testutil::rand_uniform;

    #[test]
    fn a_huge_cap_is_the_plain_loss() {
        let h = rand_uniform(&[6, 8], 1, -1.0, 1.0)
            .to_dtype(DType::F32)
            .unwrap();
        let w = rand_uniform(&[11, 8], 2, -1.0, 1.0)
            .to_dtype(DType::F32)
            .unwrap();
        let t = [3i64, -100, 0, 10, 4, -100];
        let plain = ChunkedCrossEntropy::new(&w, &t, &Device::Cpu)
            .unwrap()
            .forward(&h)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let capped = softcapped_cross_entropy(&h, &w, &t, 1e6, &Device::Cpu)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((plain - capped).abs() < 1e-5, "{plain} vs {capped}");
        let tight = softcapped_cross_entropy(&h, &w, &t, 0.5, &Device::Cpu)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            (plain - tight).abs() > 1e-2,
            "capping changed nothing: {tight}"
        );
    }
}
