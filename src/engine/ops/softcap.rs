//! Final-logit soft-capping (Gemma 2 `final_logit_softcapping`): `z' = tanh(z / cap) * cap`,
//! applied to the `lm_head` output before the loss. The training loss applies it to each
//! logits chunk of [`super::ChunkedCrossEntropy`] (`with_softcap`); the tests here check that
//! against the whole-matrix composition (transformers' `Gemma2ForCausalLM.forward`: cap, then
//! `ForCausalLMLoss`, which upcasts the logits to f32).

use candle_core::{Result, Tensor};

/// `tanh(z / cap) * cap`, differentiable, in `z`'s dtype.
///
/// Errors: device errors.
pub fn softcap(z: &Tensor, cap: f64) -> Result<Tensor> {
    z.affine(1.0 / cap, 0.0)?.tanh()?.affine(cap, 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ops::{ChunkedCrossEntropy, FrozenLinear, IGNORE_INDEX};
    use crate::engine::testutil::rand_uniform;
    use candle_core::{D, DType, Device, Var};

    /// The reference: mean cross-entropy of the soft-capped logits of `h` (tokens, hidden)
    /// under `lm_head` (vocab, hidden) against pre-shifted `targets`, the whole (tokens x vocab)
    /// f32 matrix at once, differentiable through candle's autograd.
    fn reference(h: &Tensor, lm_head: &Tensor, targets: &[i64], cap: f64) -> Tensor {
        let dev = h.device();
        let rows: Vec<u32> = (0..targets.len() as u32)
            .filter(|&i| targets[i as usize] != IGNORE_INDEX)
            .collect();
        let picked: Vec<u32> = rows.iter().map(|&i| targets[i as usize] as u32).collect();
        let n = rows.len();
        let rows = Tensor::from_vec(rows, n, dev).unwrap();
        let picked = Tensor::from_vec(picked, (n, 1), dev).unwrap();
        let head = FrozenLinear::new(lm_head.clone(), None);
        let z = head.forward(&h.index_select(&rows, 0).unwrap()).unwrap();
        let z = softcap(&z.to_dtype(DType::F32).unwrap(), cap).unwrap();
        let m = z.max_keepdim(D::Minus1).unwrap().detach();
        let lse = (z
            .broadcast_sub(&m)
            .unwrap()
            .exp()
            .unwrap()
            .sum_keepdim(D::Minus1)
            .unwrap()
            .log()
            .unwrap()
            + m)
            .unwrap();
        let target = z.gather(&picked, D::Minus1).unwrap();
        (lse - target).unwrap().mean_all().unwrap()
    }

    fn inputs() -> (Tensor, Tensor, [i64; 6]) {
        let h = rand_uniform(&[6, 8], 1, -2.0, 2.0)
            .to_dtype(DType::F32)
            .unwrap();
        let w = rand_uniform(&[11, 8], 2, -2.0, 2.0)
            .to_dtype(DType::F32)
            .unwrap();
        (h, w, [3i64, -100, 0, 10, 4, -100])
    }

    /// Loss and gradient of `h` of the chunked capped loss (chunks of `rows`).
    fn chunked(h: &Tensor, w: &Tensor, t: &[i64], cap: f64, rows: usize) -> (f32, Vec<f32>) {
        let v = Var::from_tensor(h).unwrap();
        let loss = ChunkedCrossEntropy::new(w, t, &Device::Cpu)
            .unwrap()
            .with_softcap(cap)
            .unwrap()
            .with_chunk(rows)
            .forward(v.as_tensor())
            .unwrap();
        let g = loss.backward().unwrap();
        let dh = g.get(v.as_tensor()).unwrap().flatten_all().unwrap();
        (loss.to_scalar().unwrap(), dh.to_vec1().unwrap())
    }

    /// The chunked soft-capped loss and its gradient equal the whole-matrix reference, for
    /// a tight cap (where capping matters) and chunks that split the rows unevenly.
    #[test]
    fn chunked_capped_loss_and_gradient_match_the_whole_matrix() {
        let (h, w, t) = inputs();
        for cap in [0.7, 3.0] {
            let v = Var::from_tensor(&h).unwrap();
            let want = reference(v.as_tensor(), &w, &t, cap);
            let g = want.backward().unwrap();
            let want_dh: Vec<f32> = g
                .get(v.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let want: f32 = want.to_scalar().unwrap();
            for rows in [1, 4, 6] {
                let (loss, dh) = chunked(&h, &w, &t, cap, rows);
                assert!(
                    (loss - want).abs() < 1e-5,
                    "cap {cap} rows {rows}: {loss} vs {want}"
                );
                let err = dh
                    .iter()
                    .zip(&want_dh)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(err < 1e-5, "cap {cap} rows {rows}: gradient off by {err}");
            }
        }
    }

    /// A huge cap is the plain loss; a tight one changes it; a bad cap is refused.
    #[test]
    fn a_huge_cap_is_the_plain_loss() {
        let (h, w, t) = inputs();
        let plain = ChunkedCrossEntropy::new(&w, &t, &Device::Cpu)
            .unwrap()
            .forward(&h)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let (capped, _) = chunked(&h, &w, &t, 1e6, 6);
        assert!((plain - capped).abs() < 1e-5, "{plain} vs {capped}");
        let (tight, _) = chunked(&h, &w, &t, 0.5, 6);
        assert!(
            (plain - tight).abs() > 1e-2,
            "capping changed nothing: {tight}"
        );
        for bad in [0.0, -1.0, f64::NAN] {
            let ce = ChunkedCrossEntropy::new(&w, &t, &Device::Cpu).unwrap();
            assert!(ce.with_softcap(bad).is_err(), "cap {bad} accepted");
        }
    }
}
