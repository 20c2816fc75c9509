//! Causal-LM cross-entropy fused with the `lm_head` projection, computed in token chunks.
//!
//! The loss is `mean over targets != -100 of (logsumexp(z_i) - z_i[target_i])` with
//! `z = h W^T` (PyTorch `CrossEntropyLoss(ignore_index=-100, reduction="mean")` on HF's shifted
//! labels). Logits are formed `chunk` rows at a time, in f32, and discarded: the full
//! (tokens x vocab) f32 matrix never exists (Qwen's vocab is 151,936: one 2 x 2048 batch would be
//! 2.5 GB). Backward recomputes each chunk's logits and returns only the gradient of the hidden
//! states (`lm_head` is frozen), as Liger-Kernel's fused linear cross-entropy does.
//!
//! On CUDA (f32/f16/bf16, unless `LORASCOPE_FUSED=0`) each chunk's logits stay in the compute
//! dtype as cuBLAS writes them, and the per-row work is one NVRTC kernel pass instead of ~8
//! candle passes: [`RowLoss`] (one block per row: logsumexp and the target logit, f32) in
//! forward, [`RowGrad`] (`dz = (softmax(z) - onehot(target)) * w`, written straight in the
//! compute dtype) in backward. Elsewhere the generic candle code runs; the CPU loops of the two
//! row ops mirror the kernels and are what the unit tests check against the generic code.

use super::kernels::map_cpu_float;
use candle_core::{CpuStorage, CustomOp3, D, DType, Device, Layout, Result, Shape, Tensor};

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

    /// Logits of rows `start..start + len`, (len, vocab) in the compute dtype.
    fn logits_raw(&self, h: &Tensor, start: usize, len: usize) -> Result<Tensor> {
        h.narrow(0, start, len)?.matmul(&self.lm_head.t()?)
    }

    fn logits(&self, h: &Tensor, start: usize, len: usize) -> Result<Tensor> {
        self.logits_raw(h, start, len)?
            .to_dtype(super::ops::stat_dtype(h.dtype()))
    }

    /// Whether `h` runs through the fused row kernels: CUDA, f32/f16/bf16, and
    /// [`super::kernels::fused_kernels`].
    fn use_fused(h: &Tensor) -> bool {
        h.device().is_cuda()
            && matches!(h.dtype(), DType::F32 | DType::F16 | DType::BF16)
            && super::kernels::fused_kernels()
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
        let f = super::ops::stat_dtype(h.dtype());
        let g = grad_out.to_dtype(f)?.affine(1.0 / self.count as f64, 0.0)?;
        let w = self.mask.to_dtype(f)?.broadcast_mul(&g)?;
        let mut parts = Vec::new();
        let mut start = 0;
        while start < n {
            let len = self.chunk.min(n - start);
            let z = self.logits_raw(h, start, len)?;
            let idx = self.idx.narrow(0, start, len)?;
            let dz = z.apply_op3_no_bwd(&idx, &w.narrow(0, start, len)?, &RowGrad)?;
            drop(z);
            parts.push(dz.matmul(&self.lm_head)?);
            start += len;
        }
        Tensor::cat(&parts, 0)
    }

    fn loss(&self, h: &Tensor) -> Result<Tensor> {
        if Self::use_fused(h) {
            return self.loss_fused(h);
        }
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
        if Self::use_fused(h) {
            return self.grad_fused(h, grad_out);
        }
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
    let range = |l: &Layout| {
        l.contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg(format!("{name}: inputs must be contiguous")))
    };
    Ok(((rows, vocab), [range(l1)?, range(l2)?, range(l3)?]))
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
        let ((rows, vocab), [r1, r2, r3]) = row_args(self.name(), l1, l2, l3)?;
        let (t, w) = (cpu::targets(s2, r2)?, cpu::weights(s3, r3)?);
        let out = map_cpu_float!(
            "cross-entropy-rows-grad: unsupported logits dtype",
            (s1 => z),
            T => cpu::grad(&z[r1.0..r1.1], t, &w, vocab)
        );
        Ok((out, Shape::from((rows, vocab))))
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

#[cfg(feature = "cuda")]
mod cuda {
    //! NVRTC kernels: one block of 1024 threads per logits row, one online (max, sum-exp) pass
    //! over the row in f32, merged across the block; backward makes a second pass writing dz.
    use super::super::kernels::{self, PRELUDE};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::{CudaStorage, DType, Result};

    const MODULE: &str = "lorascope_cross_entropy";
    pub(super) const SRC: &str = r#"
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
    float mm = fmaxf(m, m2);
    if (mm == NEG_INF) { m = mm; s = 0.f; return; }
    s = s * expf(m - mm) + s2 * expf(m2 - mm);
    m = mm;
}

// Online (max, sum exp(x - max)) of this thread's elements, then of the whole block.
template <typename T>
__device__ __forceinline__ void row_lse(const T* r, int vocab, float& m, float& s) {
    __shared__ float sm[32];
    __shared__ float ss[32];
    m = NEG_INF; s = 0.f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        float x = ld(r[j]);
        if (x > m) { s = s * expf(m - x) + 1.f; m = x; }
        else s += expf(x - m);
    }
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o);
        float s2 = __shfl_xor_sync(0xffffffffu, s, o);
        lse_merge(m, s, m2, s2);
    }
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) { sm[wid] = m; ss[wid] = s; }
    __syncthreads();
    if (wid == 0) {
        int nw = (blockDim.x + 31) >> 5;
        m = lane < nw ? sm[lane] : NEG_INF;
        s = lane < nw ? ss[lane] : 0.f;
        for (int o = 16; o > 0; o >>= 1) {
            float m2 = __shfl_xor_sync(0xffffffffu, m, o);
            float s2 = __shfl_xor_sync(0xffffffffu, s, o);
            lse_merge(m, s, m2, s2);
        }
        if (lane == 0) { sm[0] = m; ss[0] = s; }
    }
    __syncthreads();
    m = sm[0]; s = ss[0];
}

#define CE_KERNELS(SUF, T)                                                                    \
extern "C" __global__ void __launch_bounds__(1024) ce_rows_loss_##SUF(const T* z,            \
        const unsigned int* tgt, const float* w, float* loss, int vocab) {                    \
    long long row = blockIdx.x;                                                               \
    float c = w[row];                                                                         \
    if (c == 0.f) { if (threadIdx.x == 0) loss[row] = 0.f; return; }                          \
    const T* r = z + row * (long long)vocab;                                                  \
    float m, s;                                                                               \
    row_lse(r, vocab, m, s);                                                                  \
    if (threadIdx.x == 0) loss[row] = c * (m + logf(s) - ld(r[tgt[row]]));                    \
}                                                                                             \
extern "C" __global__ void __launch_bounds__(1024) ce_rows_grad_##SUF(const T* z,            \
        const unsigned int* tgt, const float* w, T* dz, int vocab) {                          \
    long long row = blockIdx.x;                                                               \
    float c = w[row];                                                                         \
    const T* r = z + row * (long long)vocab;                                                  \
    T* d = dz + row * (long long)vocab;                                                       \
    if (c == 0.f) {                                                                           \
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) st(d + j, 0.f);                 \
        return;                                                                               \
    }                                                                                         \
    float m, s;                                                                               \
    row_lse(r, vocab, m, s);                                                                  \
    float k = c / s;                                                                          \
    int t = (int)tgt[row];                                                                    \
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {                                   \
        float p = expf(ld(r[j]) - m) * k;                                                     \
        st(d + j, j == t ? p - c : p);                                                        \
    }                                                                                         \
}

CE_KERNELS(f32, float)
CE_KERNELS(f16, f16_t)
CE_KERNELS(bf16, bf16_t)
"#;

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
        let suf = kernels::dtype_suffix(z.dtype(), "cross-entropy rows")?;
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
        let dev = z.device().clone();
        let name = match kind {
            Kind::Loss => format!("ce_rows_loss_{suf}"),
            Kind::Grad => format!("ce_rows_grad_{suf}"),
        };
        let func =
            dev.get_or_load_custom_func(&name, MODULE, kernels::ptx(MODULE, PRELUDE, SRC)?)?;
        let tv = t.as_cuda_slice::<u32>()?.slice(r2.0..r2.1);
        let wv = w.as_cuda_slice::<f32>()?.slice(r3.0..r3.1);
        let v32 = vocab as i32;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        macro_rules! go {
            ($ty:ty, $out:ty, $n:expr) => {{
                let zv = z.as_cuda_slice::<$ty>()?.slice(r1.0..r1.1);
                // SAFETY: the kernel writes every element (one per row, or every logit).
                let mut out = unsafe { dev.alloc::<$out>($n) }?;
                let mut lb = func.builder();
                lb.arg(&zv);
                lb.arg(&tv);
                lb.arg(&wv);
                lb.arg(&mut out);
                lb.arg(&v32);
                // SAFETY: argument types match the kernel signature.
                unsafe { lb.launch(cfg) }.map_err(kernels::err)?;
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let all = rows * vocab;
        Ok(match (kind, z.dtype()) {
            (Kind::Loss, DType::F32) => go!(f32, f32, rows),
            (Kind::Loss, DType::F16) => go!(half::f16, f32, rows),
            (Kind::Loss, _) => go!(half::bf16, f32, rows),
            (Kind::Grad, DType::F32) => go!(f32, f32, all),
            (Kind::Grad, DType::F16) => go!(half::f16, half::f16, all),
            (Kind::Grad, _) => go!(half::bf16, half::bf16, all),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::max_abs_diff as max_diff;
    use super::*;

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
                .to_dtype(super::super::ops::stat_dtype(dt))
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
