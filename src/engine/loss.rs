//! Causal-LM cross-entropy fused with the `lm_head` projection, computed in token chunks.
//!
//! The loss is `mean over targets != -100 of (logsumexp(z_i) - z_i[target_i])` with
//! `z = h W^T` (PyTorch `CrossEntropyLoss(ignore_index=-100, reduction="mean")` on HF's shifted
//! labels). Logits are formed `chunk` rows at a time, in f32, and discarded: the full
//! (tokens x vocab) f32 matrix never exists (Qwen's vocab is 151,936: one 2 x 2048 batch would be
//! 2.5 GB). Backward recomputes each chunk's logits and returns only the gradient of the hidden
//! states (`lm_head` is frozen), as Liger-Kernel's fused linear cross-entropy does.

use candle_core::{D, Device, Result, Tensor};

/// Ignored target id, as PyTorch's `ignore_index` default.
pub const IGNORE_INDEX: i64 = -100;

/// Number of logit elements (rows x vocab) materialised at once: 32 Mi f32 = 128 MiB.
const CHUNK_ELEMS: usize = 32 << 20;

/// Fused `lm_head` + cross-entropy over pre-shifted targets.
#[derive(Clone)]
pub struct ChunkedCrossEntropy {
    /// `lm_head` weight (vocab, hidden), compute dtype, frozen.
    lm_head: Tensor,
    /// Target ids clamped to >= 0, (tokens) u32.
    idx: Tensor,
    /// 1.0 where the target counts, 0.0 where ignored, (tokens) f32.
    mask: Tensor,
    /// Number of counted targets (>= 1).
    count: usize,
    /// Rows per chunk.
    chunk: usize,
}

impl ChunkedCrossEntropy {
    /// Build the loss for `targets` (tokens), each a token id or [`IGNORE_INDEX`].
    ///
    /// Errors: no counted target, or a target >= vocab.
    pub fn new(lm_head: &Tensor, targets: &[i64], device: &Device) -> Result<Self> {
        let vocab = lm_head.dim(0)?;
        let mut idx = Vec::with_capacity(targets.len());
        let mut mask = Vec::with_capacity(targets.len());
        let mut count = 0;
        for &t in targets {
            if t == IGNORE_INDEX {
                idx.push(0u32);
                mask.push(0f32);
            } else if t < 0 || t as usize >= vocab {
                candle_core::bail!("target id {t} outside the vocabulary (0..{vocab})");
            } else {
                idx.push(t as u32);
                mask.push(1f32);
                count += 1;
            }
        }
        if count == 0 {
            candle_core::bail!("batch has no learnable target token");
        }
        let n = targets.len();
        Ok(Self {
            lm_head: lm_head.clone(),
            idx: Tensor::from_vec(idx, n, device)?,
            mask: Tensor::from_vec(mask, n, device)?,
            count,
            chunk: (CHUNK_ELEMS / vocab).max(1),
        })
    }

    /// Override the rows per chunk (tests use it to check chunking does not change the result).
    pub fn with_chunk(mut self, rows: usize) -> Self {
        self.chunk = rows.max(1);
        self
    }

    /// Number of counted targets.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Mean loss (scalar f32; f64 when `h` is f64) for hidden states `h` (tokens, hidden) in the compute dtype.
    pub fn forward(&self, h: &Tensor) -> Result<Tensor> {
        super::ops::apply(self, h)
    }

    fn logits(&self, h: &Tensor, start: usize, len: usize) -> Result<Tensor> {
        h.narrow(0, start, len)?
            .matmul(&self.lm_head.t()?)?
            .to_dtype(super::ops::stat_dtype(h.dtype()))
    }

    fn loss(&self, h: &Tensor) -> Result<Tensor> {
        let n = h.dim(0)?;
        let f = super::ops::stat_dtype(h.dtype());
        let mut total = Tensor::zeros((), f, h.device())?;
        let mut start = 0;
        while start < n {
            let len = self.chunk.min(n - start);
            let z = self.logits(h, start, len)?;
            let max = z.max_keepdim(D::Minus1)?;
            let lse = (z
                .broadcast_sub(&max)?
                .exp()?
                .sum_keepdim(D::Minus1)?
                .log()?
                + &max)?;
            let idx = self.idx.narrow(0, start, len)?.unsqueeze(1)?;
            let picked = z.gather(&idx, 1)?;
            let per = (lse - picked)?.squeeze(1)?;
            let m = self.mask.narrow(0, start, len)?.to_dtype(f)?;
            total = (total + (per * m)?.sum_all()?)?;
            start += len;
        }
        total.affine(1.0 / self.count as f64, 0.0)
    }

    fn grad(&self, h: &Tensor, grad_out: &Tensor) -> Result<Tensor> {
        let n = h.dim(0)?;
        let f = super::ops::stat_dtype(h.dtype());
        let g = grad_out.to_dtype(f)?.affine(1.0 / self.count as f64, 0.0)?;
        let vocab = self.lm_head.dim(0)?;
        let mut parts = Vec::new();
        let mut start = 0;
        while start < n {
            let len = self.chunk.min(n - start);
            let z = self.logits(h, start, len)?;
            let max = z.max_keepdim(D::Minus1)?;
            let e = z.broadcast_sub(&max)?.exp()?;
            let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
            let idx = self.idx.narrow(0, start, len)?.unsqueeze(1)?;
            let onehot = Tensor::ones((len, 1), f, h.device())?;
            let hot = Tensor::zeros((len, vocab), f, h.device())?.scatter_add(&idx, &onehot, 1)?;
            let m = self.mask.narrow(0, start, len)?.unsqueeze(1)?.to_dtype(f)?;
            let dz = (p - hot)?.broadcast_mul(&m)?.broadcast_mul(&g)?;
            parts.push(dz.to_dtype(h.dtype())?.matmul(&self.lm_head)?);
            start += len;
        }
        Tensor::cat(&parts, 0)
    }
}

impl super::ops::InputGradOp for ChunkedCrossEntropy {
    const NAME: &'static str = "chunked-cross-entropy";
    fn plain(&self, h: &Tensor) -> Result<Tensor> {
        self.loss(h)
    }
    fn input_grad(&self, h: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.grad(h, grad)?))
    }
}
