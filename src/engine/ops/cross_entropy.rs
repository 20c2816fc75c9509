//! Causal-LM cross-entropy fused with the `lm_head` projection, computed in token chunks.
//!
//! The loss is `mean over targets != -100 of (logsumexp(z_i) - z_i[target_i])` with
//! `z = h W^T` (PyTorch `CrossEntropyLoss(ignore_index=-100, reduction="mean")` on HF's shifted
//! labels). Logits are formed `chunk` rows at a time, in f32, and discarded: the full
//! (tokens x vocab) f32 matrix never exists (Qwen's vocab is 151,936: one 2 x 2048 batch would be
//! 2.5 GB). Backward recomputes each chunk's logits and returns only the gradient of the hidden
//! states (`lm_head` is frozen), as Liger-Kernel's fused linear cross-entropy does.
//!
//! On the fused path ([`crate::engine::cuda::fused_path`]: CUDA, f32/f16/bf16, unless
//! `LORASCOPE_FUSED=0`) each chunk's logits stay in the compute dtype as cuBLAS writes them,
//! and the per-row work is one NVRTC kernel pass (`cuda/kernels/cross_entropy.cu`) instead of
//! ~8 candle passes: [`RowLoss`] (one block per row: logsumexp and the target logit, f32) in
//! forward, [`RowGrad`] (`dz = (softmax(z) - onehot(target)) * w`, written straight in the
//! compute dtype) in backward. Elsewhere the generic candle code runs; the CPU loops of the two
//! row ops mirror the kernels and are what the unit tests check against the generic code.
//!
//! With final-logit soft-capping (Gemma 2 `final_logit_softcapping`, [`ChunkedCrossEntropy::with_softcap`])
//! each chunk's logits become `z' = cap * tanh(z / cap)` in f32 before the row ops, and backward
//! multiplies the row gradient by `dz'/dz = 1 - (z' / cap)^2`; the chunks are a quarter of the
//! plain size ([`CAPPED_CHUNK_DIV`]), since a capped chunk holds several f32 copies at once.

use super::{CpuLoops, InputGradOp, apply, contiguous_range, cpu_map, stat_dtype};
use crate::engine::cuda::fused_path;
use candle_core::{CpuStorage, CustomOp3, Device, Layout, Result, Shape, Tensor, WithDType};

/// Ignored target id, as PyTorch's `ignore_index` default.
pub const IGNORE_INDEX: i64 = -100;

/// Number of logit elements (rows x vocab) materialised at once: 32 Mi f32 = 128 MiB.
const CHUNK_ELEMS: usize = 32 << 20;

/// Soft-capped chunks hold `CHUNK_ELEMS / CAPPED_CHUNK_DIV` logits: up to five f32 copies of a
/// chunk are alive together (`z'`, the row gradient, the cap's derivative and its parts).
pub const CAPPED_CHUNK_DIV: usize = 4;

/// Logit elements (rows x vocab) per chunk for a vocabulary of `vocab` (soft-capped or not):
/// the engine's chunking, shared with the memory model. At least one row.
pub fn chunk_rows(vocab: usize, capped: bool) -> usize {
    let elems = if capped {
        CHUNK_ELEMS / CAPPED_CHUNK_DIV
    } else {
        CHUNK_ELEMS
    };
    (elems / vocab.max(1)).max(1)
}

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
    /// Final-logit soft-cap `c` (`z' = c tanh(z / c)`), if any.
    softcap: Option<f64>,
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
            chunk: chunk_rows(vocab, false),
            softcap: None,
        })
    }

    /// Soft-cap the logits before the loss (transformers' Gemma 2 `final_logit_softcapping`:
    /// `logits = tanh(logits / cap) * cap`, here in f32); chunks shrink to
    /// [`chunk_rows`]`(vocab, true)`.
    ///
    /// Errors: a cap that is not finite and > 0.
    pub fn with_softcap(mut self, cap: f64) -> Result<Self> {
        if !(cap.is_finite() && cap > 0.0) {
            candle_core::bail!("final_logit_softcapping must be a positive number, got {cap}");
        }
        self.softcap = Some(cap);
        self.chunk = chunk_rows(self.lm_head.dim(0)?, true);
        Ok(self)
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
        apply(self, h)
    }

    /// Logits of rows `start..start + len`, (len, vocab) in the compute dtype; soft-capped
    /// ones in the statistics dtype (f32, f64 for f64).
    fn logits_raw(&self, h: &Tensor, start: usize, len: usize) -> Result<Tensor> {
        let z = h.narrow(0, start, len)?.matmul(&self.lm_head.t()?)?;
        match self.softcap {
            Some(cap) => super::softcap(&z.to_dtype(stat_dtype(h.dtype()))?, cap),
            None => Ok(z),
        }
    }

    /// The gradient of the capped logits `dz'` taken back to the raw logits: `dz' * (1 -
    /// (z' / cap)^2)` (the derivative of `cap * tanh(z / cap)`), in the compute dtype of `h`;
    /// `dz'` itself without a cap.
    fn uncap_grad(&self, dz: Tensor, z: &Tensor, dt: candle_core::DType) -> Result<Tensor> {
        match self.softcap {
            Some(cap) => {
                let t = z.affine(1.0 / cap, 0.0)?;
                let d = t.sqr()?.affine(-1.0, 1.0)?;
                (dz * d)?.to_dtype(dt)
            }
            None => dz.to_dtype(dt),
        }
    }

    /// [`Self::loss`] through [`RowLoss`]: per-row `mask * (lse - z[target])` per chunk, summed.
    fn loss_fused(&self, h: &Tensor) -> Result<Tensor> {
        let n = h.dim(0)?;
        let mut parts = Vec::new();
        let mut start = 0;
        while start < n {
            let len = self.chunk.min(n - start);
            let z = self.logits_raw(h, start, len)?;
            let idx = self.idx.narrow(0, start, len)?;
            let m = self.mask.narrow(0, start, len)?;
            parts.push(z.apply_op3_no_bwd(&idx, &m, &RowLoss)?);
            start += len;
        }
        Tensor::cat(&parts, 0)?
            .sum_all()?
            .affine(1.0 / self.count as f64, 0.0)
    }

    /// [`Self::grad`] through [`RowGrad`], with per-row weights `mask * grad_out / count`.
    fn grad_fused(&self, h: &Tensor, grad_out: &Tensor) -> Result<Tensor> {
        let n = h.dim(0)?;
        let f = stat_dtype(h.dtype());
        let g = grad_out.to_dtype(f)?.affine(1.0 / self.count as f64, 0.0)?;
        let w = self.mask.to_dtype(f)?.broadcast_mul(&g)?;
        let mut parts = Vec::new();
        let mut start = 0;
        while start < n {
            let len = self.chunk.min(n - start);
            let z = self.logits_raw(h, start, len)?;
            let idx = self.idx.narrow(0, start, len)?;
            let dz = z.apply_op3_no_bwd(&idx, &w.narrow(0, start, len)?, &RowGrad)?;
            let dz = self.uncap_grad(dz, &z, h.dtype())?;
            drop(z);
            parts.push(dz.matmul(&self.lm_head)?);
            start += len;
        }
        Tensor::cat(&parts, 0)
    }

    /// The mean loss: [`Self::loss_fused`] on the fused path, [`generic::loss`] otherwise.
    fn loss(&self, h: &Tensor) -> Result<Tensor> {
        if fused_path(h.dtype(), h.device()) {
            return self.loss_fused(h);
        }
        generic::loss(self, h)
    }

    /// The gradient of the hidden states: [`Self::grad_fused`] on the fused path,
    /// [`generic::grad`] otherwise.
    fn grad(&self, h: &Tensor, grad_out: &Tensor) -> Result<Tensor> {
        if fused_path(h.dtype(), h.device()) {
            return self.grad_fused(h, grad_out);
        }
        generic::grad(self, h, grad_out)
    }
}

impl InputGradOp for ChunkedCrossEntropy {
    const NAME: &'static str = "chunked-cross-entropy";
    fn plain(&self, h: &Tensor) -> Result<Tensor> {
        self.loss(h)
    }
    fn input_grad(&self, h: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.grad(h, grad)?))
    }
}

/// Per-row cross-entropy of one logits chunk (PyTorch `cross_entropy(reduction="none")` times
/// a row mask): `loss[i] = mask[i] * (logsumexp(z[i, :]) - z[i, target[i]])`, and 0 where
/// `mask[i] == 0`.
///
/// Inputs: `z` (rows, vocab) logits in the compute dtype (f32/f16/bf16; f64 on CPU), `target`
/// (rows) u32 (< vocab), `mask` (rows) f32 (f32 or f64 on CPU). Output (rows) f32 (f64 for f64
/// logits). Statistics in f32 on CUDA (online max/sum, one pass over the row), f64 on CPU.
pub struct RowLoss;

/// Per-row gradient of the cross-entropy with respect to the logits, scaled by a row weight:
/// `dz[i, j] = (softmax(z[i, :])[j] - [j == target[i]]) * w[i]` (0 where `w[i] == 0`).
///
/// Inputs: `z` (rows, vocab) in the compute dtype, `target` (rows) u32, `w` (rows) f32 (f32 or
/// f64 on CPU; `mask * grad_out / count` for the mean loss). Output (rows, vocab) in `z`'s
/// dtype. Statistics in f32 on CUDA, f64 on CPU.
pub struct RowGrad;

/// Checks `z` (rows, vocab), `target` (rows), `w` (rows); returns (rows, vocab) and the three
/// contiguous ranges.
#[allow(clippy::type_complexity)]
fn row_args(
    name: &str,
    l1: &Layout,
    l2: &Layout,
    l3: &Layout,
) -> Result<((usize, usize), [(usize, usize); 3])> {
    let (rows, vocab) = l1.shape().dims2()?;
    if l2.shape().dims() != [rows] || l3.shape().dims() != [rows] {
        candle_core::bail!(
            "{name}: logits {:?}, targets {:?}, weights {:?}",
            l1.shape(),
            l2.shape(),
            l3.shape()
        );
    }
    let range = |l: &Layout| contiguous_range(l, name);
    Ok(((rows, vocab), [range(l1)?, range(l2)?, range(l3)?]))
}

/// [`RowGrad`]'s CPU loops over the logits, with the rows' targets and weights.
struct GradLoops<'a> {
    targets: &'a [u32],
    weights: Vec<f64>,
    vocab: usize,
}

impl CpuLoops for GradLoops<'_> {
    const NAME: &'static str = "cross-entropy-rows-grad";
    fn f<T: WithDType>(&self, xs: &[&[T]]) -> Result<Vec<T>> {
        Ok(cpu::grad(xs[0], self.targets, &self.weights, self.vocab))
    }
}

impl CustomOp3 for RowLoss {
    fn name(&self) -> &'static str {
        "cross-entropy-rows"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ((rows, vocab), [r1, r2, r3]) = row_args(self.name(), l1, l2, l3)?;
        let (t, w) = (cpu::targets(s2, r2)?, cpu::weights(s3, r3)?);
        let f32s = |v: Vec<f64>| CpuStorage::F32(v.into_iter().map(|x| x as f32).collect());
        let out = match s1 {
            CpuStorage::F64(z) => CpuStorage::F64(cpu::loss(&z[r1.0..r1.1], t, &w, vocab)),
            CpuStorage::F32(z) => f32s(cpu::loss(&z[r1.0..r1.1], t, &w, vocab)),
            CpuStorage::F16(z) => f32s(cpu::loss(&z[r1.0..r1.1], t, &w, vocab)),
            CpuStorage::BF16(z) => f32s(cpu::loss(&z[r1.0..r1.1], t, &w, vocab)),
            _ => candle_core::bail!("cross-entropy-rows: unsupported logits dtype"),
        };
        Ok((out, Shape::from(rows)))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let ((rows, vocab), ranges) = row_args(self.name(), l1, l2, l3)?;
        let out = cuda::rows(cuda::Kind::Loss, [s1, s2, s3], ranges, rows, vocab)?;
        Ok((out, Shape::from(rows)))
    }
}

impl CustomOp3 for RowGrad {
    fn name(&self) -> &'static str {
        "cross-entropy-rows-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ((rows, vocab), [_, r2, r3]) = row_args(self.name(), l1, l2, l3)?;
        let (targets, weights) = (cpu::targets(s2, r2)?, cpu::weights(s3, r3)?);
        let loops = GradLoops {
            targets,
            weights,
            vocab,
        };
        Ok((cpu_map(&loops, &[(s1, l1)])?, Shape::from((rows, vocab))))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let ((rows, vocab), ranges) = row_args(self.name(), l1, l2, l3)?;
        let out = cuda::rows(cuda::Kind::Grad, [s1, s2, s3], ranges, rows, vocab)?;
        Ok((out, Shape::from((rows, vocab))))
    }
}

mod cpu {
    //! Loops mirroring the CUDA kernels (f64 statistics).
    use candle_core::{CpuStorage, Result, WithDType};

    pub fn weights(s: &CpuStorage, (a, b): (usize, usize)) -> Result<Vec<f64>> {
        Ok(match s {
            CpuStorage::F32(v) => v[a..b].iter().map(|&x| x as f64).collect(),
            CpuStorage::F64(v) => v[a..b].to_vec(),
            _ => candle_core::bail!("cross-entropy rows: weights must be f32 or f64"),
        })
    }

    pub fn targets(s: &CpuStorage, (a, b): (usize, usize)) -> Result<&[u32]> {
        match s {
            CpuStorage::U32(v) => Ok(&v[a..b]),
            _ => candle_core::bail!("cross-entropy rows: targets must be u32"),
        }
    }

    /// (max, sum of exp(z - max)) of a row.
    fn lse<T: WithDType>(r: &[T]) -> (f64, f64) {
        let m = r
            .iter()
            .map(|x| x.to_f64())
            .fold(f64::NEG_INFINITY, f64::max);
        (m, r.iter().map(|x| (x.to_f64() - m).exp()).sum())
    }

    pub fn loss<T: WithDType>(z: &[T], t: &[u32], w: &[f64], vocab: usize) -> Vec<f64> {
        z.chunks(vocab)
            .zip(t.iter().zip(w))
            .map(|(r, (&t, &w))| {
                if w == 0.0 {
                    return 0.0;
                }
                let (m, s) = lse(r);
                w * (m + s.ln() - r[t as usize].to_f64())
            })
            .collect()
    }

    pub fn grad<T: WithDType>(z: &[T], t: &[u32], w: &[f64], vocab: usize) -> Vec<T> {
        let mut out = vec![T::from_f64(0.0); z.len()];
        for ((r, o), (&t, &w)) in z
            .chunks(vocab)
            .zip(out.chunks_mut(vocab))
            .zip(t.iter().zip(w))
        {
            if w == 0.0 {
                continue;
            }
            let (m, s) = lse(r);
            for (j, (x, y)) in r.iter().zip(o.iter_mut()).enumerate() {
                let p = (x.to_f64() - m).exp() / s;
                let hot = if j == t as usize { 1.0 } else { 0.0 };
                *y = T::from_f64((p - hot) * w);
            }
        }
        out
    }
}

mod generic {
    //! The candle composition (the CPU model, CUDA with `LORASCOPE_FUSED=0`, the tests'
    //! reference): each chunk's logits in f32 (f64 for f64), then candle ops.
    use super::super::stat_dtype;
    use super::ChunkedCrossEntropy;
    use candle_core::{D, Result, Tensor};

    /// Logits of rows `start..start + len` in the statistics dtype.
    fn logits(ce: &ChunkedCrossEntropy, h: &Tensor, start: usize, len: usize) -> Result<Tensor> {
        ce.logits_raw(h, start, len)?
            .to_dtype(stat_dtype(h.dtype()))
    }

    /// The mean loss: per chunk, logsumexp minus the target logit, masked, summed.
    pub fn loss(ce: &ChunkedCrossEntropy, h: &Tensor) -> Result<Tensor> {
        let n = h.dim(0)?;
        let f = stat_dtype(h.dtype());
        let mut total = Tensor::zeros((), f, h.device())?;
        let mut start = 0;
        while start < n {
            let len = ce.chunk.min(n - start);
            let z = logits(ce, h, start, len)?;
            let max = z.max_keepdim(D::Minus1)?;
            let lse = (z
                .broadcast_sub(&max)?
                .exp()?
                .sum_keepdim(D::Minus1)?
                .log()?
                + &max)?;
            let idx = ce.idx.narrow(0, start, len)?.unsqueeze(1)?;
            let picked = z.gather(&idx, 1)?;
            let per = (lse - picked)?.squeeze(1)?;
            let m = ce.mask.narrow(0, start, len)?.to_dtype(f)?;
            total = (total + (per * m)?.sum_all()?)?;
            start += len;
        }
        total.affine(1.0 / ce.count as f64, 0.0)
    }

    /// The hidden states' gradient: per chunk, `(softmax(z) - onehot) * mask * g / count`,
    /// times `lm_head`.
    pub fn grad(ce: &ChunkedCrossEntropy, h: &Tensor, grad_out: &Tensor) -> Result<Tensor> {
        let n = h.dim(0)?;
        let f = stat_dtype(h.dtype());
        let g = grad_out.to_dtype(f)?.affine(1.0 / ce.count as f64, 0.0)?;
        let vocab = ce.lm_head.dim(0)?;
        let mut parts = Vec::new();
        let mut start = 0;
        while start < n {
            let len = ce.chunk.min(n - start);
            let z = logits(ce, h, start, len)?;
            let max = z.max_keepdim(D::Minus1)?;
            let e = z.broadcast_sub(&max)?.exp()?;
            let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
            let idx = ce.idx.narrow(0, start, len)?.unsqueeze(1)?;
            let onehot = Tensor::ones((len, 1), f, h.device())?;
            let hot = Tensor::zeros((len, vocab), f, h.device())?.scatter_add(&idx, &onehot, 1)?;
            let m = ce.mask.narrow(0, start, len)?.unsqueeze(1)?.to_dtype(f)?;
            let dz = (p - hot)?.broadcast_mul(&m)?.broadcast_mul(&g)?;
            parts.push(ce.uncap_grad(dz, &z, h.dtype())?.matmul(&ce.lm_head)?);
            start += len;
        }
        Tensor::cat(&parts, 0)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    //! Launcher of `cuda/kernels/cross_entropy.cu`: one block of 1024 threads per logits row.
    use crate::engine::cuda::launch::{Arg, Buf, Module, launch, per_row};
    use crate::engine::cuda::{kernel_name, source};
    use candle_core::backend::BackendStorage;
    use candle_core::{CudaStorage, DType, Result};

    static MODULE: Module = Module::new("lorascope_cross_entropy", source::CROSS_ENTROPY);

    /// Which kernel: per-row loss (f32 out, (rows)) or logits gradient (`z`'s dtype, (rows, vocab)).
    #[derive(Clone, Copy)]
    pub enum Kind {
        Loss,
        Grad,
    }

    /// Launch the `kind` kernel on `[z, target, w]` (each sliced to its range).
    pub fn rows(
        kind: Kind,
        [z, t, w]: [&CudaStorage; 3],
        [r1, r2, r3]: [(usize, usize); 3],
        rows: usize,
        vocab: usize,
    ) -> Result<CudaStorage> {
        let root = match kind {
            Kind::Loss => "ce_rows_loss",
            Kind::Grad => "ce_rows_grad",
        };
        let name = kernel_name(root, z.dtype(), "cross-entropy rows")?;
        if t.dtype() != DType::U32 || w.dtype() != DType::F32 {
            candle_core::bail!(
                "cross-entropy rows: targets {:?} / weights {:?}, expected u32 / f32",
                t.dtype(),
                w.dtype()
            );
        }
        if rows == 0 || vocab == 0 || vocab > i32::MAX as usize || rows > u32::MAX as usize {
            candle_core::bail!("cross-entropy rows: unsupported shape ({rows}, {vocab})");
        }
        let dev = z.device();
        let out = match kind {
            Kind::Loss => Buf::alloc(dev, DType::F32, rows)?,
            Kind::Grad => Buf::alloc(dev, z.dtype(), rows * vocab)?,
        };
        let args = [
            Buf::view(z, r1)?.arg(),
            Buf::view(t, r2)?.arg(),
            Buf::view(w, r3)?.arg(),
            out.arg(),
            Arg::I32(vocab as i32),
        ];
        launch(dev, &MODULE, &name, per_row(rows, 1024), &args)?;
        out.into_storage()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testutil::max_abs_diff as max_diff;
    use candle_core::DType;

    fn setup(dt: DType) -> (Tensor, ChunkedCrossEntropy, Vec<i64>) {
        let dev = Device::Cpu;
        let (n, h, v) = (9, 6, 37);
        let hid = Tensor::randn(0f64, 1.5, (n, h), &dev).unwrap();
        let w = Tensor::randn(0f64, 1.0, (v, h), &dev).unwrap();
        let mut targets: Vec<i64> = (0..n as i64).map(|i| (i * 11 + 3) % v as i64).collect();
        targets[2] = IGNORE_INDEX;
        targets[7] = IGNORE_INDEX;
        targets[8] = v as i64 - 1;
        let ce = ChunkedCrossEntropy::new(&w.to_dtype(dt).unwrap(), &targets, &dev).unwrap();
        (hid.to_dtype(dt).unwrap(), ce, targets)
    }

    /// The row ops (whose CPU loops mirror the CUDA kernels) give the generic path's loss and
    /// gradient, for every chunking, in f64 (to rounding), f32, and bf16 (to the dtype's
    /// rounding of dz).
    #[test]
    fn fused_row_ops_match_the_generic_path() {
        for (dt, tol_loss, tol_grad) in [
            (DType::F64, 1e-12, 1e-14),
            (DType::F32, 1e-5, 1e-7),
            (DType::BF16, 1e-4, 2e-3),
        ] {
            let (h, ce, _) = setup(dt);
            let g = Tensor::new(0.75f64, &Device::Cpu)
                .unwrap()
                .to_dtype(stat_dtype(dt))
                .unwrap();
            for chunk in [1, 4, 100] {
                let ce = ce.clone().with_chunk(chunk);
                let (a, b) = (ce.loss(&h).unwrap(), ce.loss_fused(&h).unwrap());
                assert_eq!(a.dtype(), b.dtype());
                let d = max_diff(&a, &b);
                assert!(d < tol_loss, "{dt:?} chunk {chunk}: loss diff {d}");
                let (a, b) = (ce.grad(&h, &g).unwrap(), ce.grad_fused(&h, &g).unwrap());
                assert_eq!(a.dtype(), dt);
                assert_eq!(b.dtype(), dt);
                assert_eq!(a.dims(), b.dims());
                let d = max_diff(&a, &b);
                assert!(d < tol_grad, "{dt:?} chunk {chunk}: grad diff {d}");
            }
        }
    }

    /// Ignored rows contribute nothing: their loss entry and their logits gradient are zero.
    #[test]
    fn ignored_rows_are_zero_in_the_row_ops() {
        let (h, ce, targets) = setup(DType::F32);
        let z = ce.logits_raw(&h, 0, h.dim(0).unwrap()).unwrap();
        let per: Vec<f32> = z
            .apply_op3_no_bwd(&ce.idx, &ce.mask, &RowLoss)
            .unwrap()
            .to_vec1()
            .unwrap();
        let dz: Vec<Vec<f32>> = z
            .apply_op3_no_bwd(&ce.idx, &ce.mask, &RowGrad)
            .unwrap()
            .to_vec2()
            .unwrap();
        for (i, t) in targets.iter().enumerate() {
            if *t == IGNORE_INDEX {
                assert_eq!(per[i], 0.0);
                assert!(dz[i].iter().all(|&x| x == 0.0));
            } else {
                assert!(per[i] > 0.0);
                // softmax - onehot sums to zero over the row.
                let s: f32 = dz[i].iter().sum();
                assert!(s.abs() < 1e-5, "row {i} sums to {s}");
                assert!(dz[i][*t as usize] < 0.0);
            }
        }
    }
}
