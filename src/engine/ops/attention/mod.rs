//! Causal grouped-query attention with its own backward.
//!
//! `softmax(cap(scale Q K^T) + causal mask) V`, as `torch.nn.functional.scaled_dot_product_attention(
//! ..., is_causal=True)` and transformers' `eager_attention_forward` with `repeat_kv` head
//! grouping ([`AttentionSpec`]): `scale` is `1/sqrt(d)` (Gemma: `query_pre_attn_scalar ** -0.5`),
//! `cap(s) = tanh(s / c) * c` with Gemma 2's `attn_logit_softcapping` `c` (identity without),
//! and a sliding window `W` restricts query `i` to keys `i - W < j <= i` (transformers'
//! `sliding_window_causal_mask`). Soft-capping runs as candle ops around the softmax kernels
//! (its backward multiplies `dS` by `1 - tanh^2`); the window is an argument of the kernels. The matrix products run
//! through candle's batched matmul (cuBLAS on CUDA, tensor cores in fp16/bf16, f32
//! accumulation) in the compute dtype, like Hugging Face's eager attention; the causal mask,
//! the row softmax (f32 statistics) and the softmax backward are one fused kernel each
//! ([`CausalSoftmax`], [`CausalSoftmaxGrad`]: NVRTC on CUDA, loops on CPU), so the scores
//! are read and written once per pass instead of once per elementwise op.
//!
//! Rows longer than [`QUERY_CHUNK`] positions run in query chunks (see [`Attention`]): chunk
//! `q0..q0 + tq` multiplies keys `0..q0 + tq` only, so the score matrices are (tq x q0 + tq).
//!
//! Backward recomputes the probabilities from Q and K (no score matrix is kept between
//! forward and backward), following FlashAttention's recomputation (Dao et al. 2022):
//! `dV = P^T dO`, `dP = dO V^T`, `dS = P * (dP - rowsum(P * dP))`, `dQ = dS K / sqrt(d)`,
//! `dK = dS^T Q / sqrt(d)`. A chunk's query heads are grouped per key/value head as
//! (batch, kv_heads, group * tq, d), so K and V are never repeated and `dK`, `dV` sum over the
//! group inside the matmul.
//!
//! The softmax kernels are the only path on either device (`LORASCOPE_FUSED=0` leaves
//! attention as it is): CUDA launches `cuda/kernels/attention.cu`, the CPU runs their loops.
//! `generic` (tests only) is attention from differentiable candle primitives, the reference.

#[cfg(feature = "cuda")]
mod direct;
mod softmax;
#[cfg(test)]
mod tests;

pub use softmax::{CausalSoftmax, CausalSoftmaxGrad};

use super::{cpu_in, cpu_out};
use crate::engine::profiler;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

/// The attention variant of one layer: logit scale, sliding window, score soft-capping.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionSpec {
    /// Multiplies `Q K^T` (`1/sqrt(head_dim)` unless the model says otherwise).
    pub scale: f64,
    /// Keys visible to a query, itself included (None: the whole causal prefix).
    pub window: Option<usize>,
    /// Gemma 2 `attn_logit_softcapping`: scores become `tanh(s / cap) * cap` before the mask.
    pub softcap: Option<f64>,
}

impl AttentionSpec {
    /// Plain causal attention with scale `1/sqrt(head_dim)`.
    pub fn causal(head_dim: usize) -> Self {
        Self {
            scale: 1.0 / (head_dim as f64).sqrt(),
            window: None,
            softcap: None,
        }
    }

    /// The kernels' window argument: 0 for none.
    fn window_arg(&self) -> usize {
        self.window.unwrap_or(0)
    }
}

/// Causal scaled-dot-product attention with grouped-query attention, as `spec` says.
///
/// `q`: (batch, q_heads, seq, head_dim); `k`, `v`: (batch, kv_heads, seq, head_dim) with
/// `q_heads % kv_heads == 0` (query head `h` reads kv head `h / (q_heads / kv_heads)`, as HF
/// `repeat_kv`); all in the compute dtype. Output (batch, q_heads, seq, head_dim) in that dtype.
/// Scores and probabilities are held in the compute dtype (softmax statistics in f32), as
/// PyTorch's math attention in fp16/bf16. Backward recomputes the probabilities.
///
/// Errors: mismatched shapes or dtypes, device errors (CUDA: kernel compile/launch, out of
/// memory for the (batch, q_heads, chunk, seq) scores).
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, spec: AttentionSpec) -> Result<Tensor> {
    let (_, qh, _, _) = q.dims4()?;
    let kvh = k.dim(1)?;
    if kvh == 0 || qh % kvh != 0 {
        candle_core::bail!("attention: {qh} query heads do not group over {kvh} kv heads");
    }
    if q.track_op() || k.track_op() || v.track_op() {
        q.contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, Attention::new(spec))
    } else {
        Attention::new(spec).forward(&q.contiguous()?, &k.contiguous()?, &v.contiguous()?)
    }
}

/// Gradients `(dq, dk, dv)` of [`causal_attention`] for the output gradient `grad`
/// (batch, q_heads, seq, head_dim), on untracked inputs (the hand-written backward of a
/// checkpointed layer). Recomputes the probabilities; shapes and dtypes as the inputs.
///
/// Errors: as [`causal_attention`].
pub(crate) fn causal_attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    grad: &Tensor,
    spec: AttentionSpec,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (q, k, v, grad) = (
        q.contiguous()?,
        k.contiguous()?,
        v.contiguous()?,
        grad.contiguous()?,
    );
    let (dq, dk, dv) = profiler::section("causal-attention", "bwd", q.device(), || {
        Attention::new(spec).backward(&q, &k, &v, &grad)
    })?;
    match (dq, dk, dv) {
        (Some(dq), Some(dk), Some(dv)) => Ok((dq, dk, dv)),
        _ => candle_core::bail!("attention backward returned no gradient"),
    }
}

/// Query positions per attention chunk (`LORASCOPE_ATTN_CHUNK` overrides it; 0: one chunk of
/// the whole row, the layout before chunking). See [`Attention`].
pub const QUERY_CHUNK: usize = 512;

/// The query chunk length in force: [`QUERY_CHUNK`], or `LORASCOPE_ATTN_CHUNK` when set (read
/// once per process; 0 turns chunking off). The memory model sizes the score matrices with it.
pub fn query_chunk() -> usize {
    static CHUNK: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CHUNK.get_or_init(|| match std::env::var("LORASCOPE_ATTN_CHUNK") {
        Err(_) => QUERY_CHUNK,
        Ok(v) => v.trim().parse().unwrap_or_else(|_| {
            // `writeln!`, not `eprintln!`: a closed stderr must not panic the orchestrator.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "lorascope: LORASCOPE_ATTN_CHUNK={v:?} is not a number of query positions (0: no chunks); using {QUERY_CHUNK}"
            );
            QUERY_CHUNK
        }),
    })
}

/// Query positions of the chunks of a row of `t` positions under chunk length `chunk` (0: one
/// chunk): `(q0, tq)` pairs covering `0..t` in order.
pub fn query_chunks(t: usize, chunk: usize) -> Vec<(usize, usize)> {
    let c = if chunk == 0 || chunk >= t {
        t.max(1)
    } else {
        chunk
    };
    (0..t).step_by(c).map(|q0| (q0, c.min(t - q0))).collect()
}

/// Causal attention computed in query chunks: chunk `q0..q0 + tq` attends to keys
/// `0..q0 + tq` only, so the key blocks above the diagonal are never multiplied (at 2048
/// positions in chunks of 512, 62.5% of the full square's products) and the score matrices
/// are (tq x q0 + tq) instead of (t x t) (a quarter or less of the transient memory). Each
/// row's softmax sees the same keys as unchunked; `dK` and `dV` sum the chunks in f32 (f64
/// for f64 inputs).
struct Attention {
    spec: AttentionSpec,
    /// Query positions per chunk (0: the whole row).
    chunk: usize,
}

/// One chunk's inputs: queries `q0..q0 + tq` and keys/values `0..q0 + tq`.
struct Chunk {
    q0: usize,
    tq: usize,
    q: Tensor,
    k: Tensor,
    v: Tensor,
}

impl Attention {
    fn new(spec: AttentionSpec) -> Self {
        Self {
            spec,
            chunk: query_chunk(),
        }
    }

    /// The chunks of `q` (b, qh, t, d) and `k`, `v` (b, kvh, t, d); one chunk without copies
    /// when the row is not split.
    fn chunks(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Vec<Chunk>> {
        let t = q.dim(2)?;
        query_chunks(t, self.chunk)
            .into_iter()
            .map(|(q0, tq)| {
                if tq == t {
                    return Ok(Chunk {
                        q0,
                        tq,
                        q: q.clone(),
                        k: k.clone(),
                        v: v.clone(),
                    });
                }
                // Keys and values are leading rows of each head: a view whose batch stride
                // is still one (b, kvh) step, which the batched matmul takes without a copy.
                let keys = q0 + tq;
                Ok(Chunk {
                    q0,
                    tq,
                    q: super::row_copy(&q.narrow(2, q0, tq)?)?,
                    k: k.narrow(2, 0, keys)?,
                    v: v.narrow(2, 0, keys)?,
                })
            })
            .collect()
    }

    /// Probabilities (b, kvh, g*tq, keys) in the compute dtype from grouped, pre-scaled
    /// queries of chunk `q0..q0 + tq` and its keys, with the soft-capped scores divided by
    /// the cap (`tanh(s / cap)`) when capping.
    fn probs(
        &self,
        qs_g: &Tensor,
        k: &Tensor,
        (q0, tq): (usize, usize),
    ) -> Result<(Tensor, Option<Tensor>)> {
        let s = qs_g.matmul(&k.t()?)?;
        let sm = CausalSoftmax {
            t: tq,
            keys: k.dim(2)?,
            q0,
            window: self.spec.window_arg(),
        };
        match self.spec.softcap {
            None => Ok((s.apply_op1_no_bwd(&sm)?, None)),
            Some(cap) => {
                let th = s.affine(1.0 / cap, 0.0)?.tanh()?;
                let p = th.affine(cap, 0.0)?.apply_op1_no_bwd(&sm)?;
                Ok((p, Some(th)))
            }
        }
    }

    /// Queries grouped per kv head, (b, kvh, g*t, d), scaled by the spec's scale.
    fn grouped_scaled(&self, q: &Tensor, kvh: usize) -> Result<Tensor> {
        let (b, qh, t, d) = q.dims4()?;
        q.reshape((b, kvh, (qh / kvh) * t, d))?
            .affine(self.spec.scale, 0.0)
    }

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if direct::applies(self, q) {
            return direct::forward(self, q, k, v);
        }
        let (b, qh, _, d) = q.dims4()?;
        let kvh = k.dim(1)?;
        let mut outs = Vec::new();
        for c in self.chunks(q, k, v)? {
            let (p, _) = self.probs(&self.grouped_scaled(&c.q, kvh)?, &c.k, (c.q0, c.tq))?;
            outs.push(p.matmul(&c.v)?.reshape((b, qh, c.tq, d))?);
        }
        match outs.len() {
            1 => Ok(outs.remove(0)),
            _ => Tensor::cat(&outs, 2),
        }
    }

    fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if direct::applies(self, q) {
            let (dq, dk, dv) = direct::backward(self, q, k, v, grad)?;
            return Ok((Some(dq), Some(dk), Some(dv)));
        }
        let (b, qh, t, d) = q.dims4()?;
        let kvh = k.dim(1)?;
        let g = qh / kvh;
        let scale = self.spec.scale;
        let window = self.spec.window_arg();
        let chunks = self.chunks(q, k, v)?;
        let single = chunks.len() == 1;
        let mut dqs = Vec::new();
        let mut dkv: Option<(Tensor, Tensor)> = None;
        for c in chunks {
            let keys = c.q0 + c.tq;
            let qs = self.grouped_scaled(&c.q, kvh)?;
            let (p, th) = self.probs(&qs, &c.k, (c.q0, c.tq))?;
            drop(qs);
            let go = super::row_copy(&grad.narrow(2, c.q0, c.tq)?.to_dtype(q.dtype())?)?
                .reshape((b, kvh, g * c.tq, d))?;
            let dv = p.t()?.matmul(&go)?;
            let dp = go.matmul(&c.v.t()?)?;
            drop(go);
            // scale * dS, so that dQ = dS' K and dK = dS'^T Q; soft-capping multiplies dS by
            // d cap(s) / ds = 1 - tanh(s / cap)^2.
            let grad_op = CausalSoftmaxGrad {
                t: c.tq,
                keys,
                q0: c.q0,
                scale,
                window,
            };
            let ds = p.apply_op2_no_bwd(&dp, &grad_op)?;
            let ds = match th {
                Some(th) => (ds * (1.0 - th.sqr()?)?)?,
                None => ds,
            };
            drop((p, dp));
            dqs.push(ds.matmul(&c.k)?.reshape((b, qh, c.tq, d))?);
            let qg = c.q.reshape((b, kvh, g * c.tq, d))?;
            let dk = ds.t()?.matmul(&qg)?;
            if single {
                return Ok((Some(dqs.remove(0)), Some(dk), Some(dv)));
            }
            // Keys `0..keys` of this chunk, summed over chunks in f32 (f64 stays f64).
            let acc = match q.dtype() {
                candle_core::DType::F64 => candle_core::DType::F64,
                _ => candle_core::DType::F32,
            };
            let pad = |x: Tensor| x.to_dtype(acc)?.pad_with_zeros(2, 0, t - keys);
            let (dk, dv) = (pad(dk)?, pad(dv)?);
            dkv = Some(match dkv {
                None => (dk, dv),
                Some((ak, av)) => ((ak + dk)?, (av + dv)?),
            });
        }
        let Some((dk, dv)) = dkv else {
            candle_core::bail!("attention backward: no query chunk");
        };
        let dt = q.dtype();
        Ok((
            Some(Tensor::cat(&dqs, 2)?),
            Some(dk.to_dtype(dt)?),
            Some(dv.to_dtype(dt)?),
        ))
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "causal-attention"
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
        cpu_out(self.forward(&cpu_in(s1, l1)?, &cpu_in(s2, l2)?, &cpu_in(s3, l3)?)?)
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
        use super::{cuda_in, cuda_out};
        let q = cuda_in(s1, l1)?;
        let dev = q.device().clone();
        cuda_out(profiler::section("causal-attention", "fwd", &dev, || {
            self.forward(&q, &cuda_in(s2, l2)?, &cuda_in(s3, l3)?)
        })?)
    }
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _o: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Detached: see `InputGradCustomOp::bwd`.
        let (q, k, v, grad) = (q.detach(), k.detach(), v.detach(), grad.detach());
        profiler::section("causal-attention", "bwd", q.device(), || {
            self.backward(&q, &k, &v, &grad)
        })
    }
}
