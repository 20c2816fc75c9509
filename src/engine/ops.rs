//! Autograd ops with their own backward, where candle's generic ones would keep too much or
//! compute gradients nobody needs.
//!
//! candle's `Tensor::matmul` backward computes a gradient for *both* operands, so a frozen base
//! weight would get a full (out x in) gradient every step; its fast softmax / RMSNorm / RoPE
//! kernels record no backward at all. The ops here are `CustomOp`s whose forward runs ordinary
//! (untracked) tensor code on the op's inputs, and whose backward returns only the gradients
//! that LoRA training needs:
//!
//! - [`FrozenLinear`]: `y = x W^T + b` with `W`, `b` frozen; backward gives `dx = dy W` only.
//! - [`RmsNorm`]: Hugging Face `Qwen2RMSNorm` / `LlamaRMSNorm` (f32 statistics); backward gives
//!   `dx` only (the norm weight is frozen).
//! - [`causal_attention`]: softmax(QK^T / sqrt(d) + causal mask) V with grouped-query
//!   attention; the (T x T) probabilities are recomputed in backward instead of being kept, so
//!   the activations saved for backward are O(T d) per head rather than O(T^2). The forward
//!   and backward still form the full (T x T) f32 scores transiently (one layer at a time);
//!   tiling over queries is future work (issue 3).

use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, D, DType, Layout, Result, Shape, Storage, Tensor,
};

/// Dtype for statistics (softmax, norms, loss): f32, or f64 when computing in f64 (tests).
pub fn stat_dtype(dt: DType) -> DType {
    if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Wrap a contiguous storage view as an untracked tensor.
fn wrap(storage: Storage, l: &Layout) -> Result<Tensor> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("custom op input must be contiguous".into()))?;
    let t = Tensor::from_storage(storage, end, BackpropOp::none(), false);
    t.narrow(0, start, end - start)?.reshape(l.shape())
}

pub(crate) fn cpu_in(s: &CpuStorage, l: &Layout) -> Result<Tensor> {
    wrap(Storage::Cpu(s.clone()), l)
}

/// Extract a fresh CPU storage from an (untracked) result tensor.
pub(crate) fn cpu_out(t: Tensor) -> Result<(CpuStorage, Shape)> {
    let t = if t.layout().start_offset() == 0 && t.is_contiguous() {
        t
    } else {
        t.copy()?.contiguous()?
    };
    let shape = t.shape().clone();
    let (s, _) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => Ok((c.clone(), shape)),
        _ => candle_core::bail!("expected a cpu tensor"),
    }
}

#[cfg(feature = "cuda")]
pub(crate) fn cuda_in(s: &candle_core::CudaStorage, l: &Layout) -> Result<Tensor> {
    use candle_core::backend::BackendStorage;
    wrap(Storage::Cuda(s.try_clone(l)?), l)
}

#[cfg(feature = "cuda")]
pub(crate) fn cuda_out(t: Tensor) -> Result<(candle_core::CudaStorage, Shape)> {
    use candle_core::backend::BackendStorage;
    let t = if t.layout().start_offset() == 0 && t.is_contiguous() {
        t
    } else {
        t.copy()?.contiguous()?
    };
    let shape = t.shape().clone();
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cuda(c) => Ok((c.try_clone(l)?, shape)),
        _ => candle_core::bail!("expected a cuda tensor"),
    }
}

/// An op whose forward is ordinary untracked tensor code on its single input and whose backward
/// returns only the input's gradient (frozen parameters it holds get none). [`apply`] turns it
/// into a graph node through [`InputGradCustomOp`].
pub(crate) trait InputGradOp: Send + Sync + 'static {
    /// Op name, for candle's error messages.
    const NAME: &'static str;
    /// The forward computation on an untracked (contiguous) input.
    fn plain(&self, x: &Tensor) -> Result<Tensor>;
    /// Gradient of the input given the forward input `x` and the output gradient `grad`.
    fn input_grad(&self, x: &Tensor, grad: &Tensor) -> Result<Option<Tensor>>;
}

/// The candle `CustomOp1` of an [`InputGradOp`].
pub(crate) struct InputGradCustomOp<T>(pub(crate) T);

impl<T: InputGradOp> CustomOp1 for InputGradCustomOp<T> {
    fn name(&self) -> &'static str {
        T::NAME
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_out(self.0.plain(&cpu_in(s, l)?)?)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda_out(self.0.plain(&cuda_in(s, l)?)?)
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        self.0.input_grad(x, grad)
    }
}

/// Run `op` on `x`: as a graph node (input gradient only) when `x` is tracked, as plain tensor
/// code otherwise.
pub(crate) fn apply<T: InputGradOp + Clone>(op: &T, x: &Tensor) -> Result<Tensor> {
    if x.track_op() {
        x.contiguous()?.apply_op1(InputGradCustomOp(op.clone()))
    } else {
        op.plain(x)
    }
}

/// Apply a projection op of shape `(out, in)` to `x` (..., in) -> (..., out): flattened to
/// (tokens, in) for the op, reshaped back after.
pub(crate) fn apply_projection<T: InputGradOp + Clone>(
    op: &T,
    x: &Tensor,
    (out, inp): (usize, usize),
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let lead: usize = dims[..dims.len() - 1].iter().product();
    let y = apply(op, &x.reshape((lead, inp))?)?;
    let mut out_dims = dims;
    *out_dims.last_mut().expect("rank >= 1") = out;
    y.reshape(out_dims)
}

/// `y + bias` broadcast over rows, or `y` without a bias.
pub(crate) fn add_bias(y: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// A frozen linear projection `y = x W^T + b` whose backward returns only `dx`.
///
/// `weight`: (out, in), `bias`: (out), both in the compute dtype, never trained. Input `x`:
/// (..., in) in the same dtype; output (..., out). Matches `torch.nn.Linear` with
/// `requires_grad=False` parameters.
#[derive(Debug, Clone)]
pub struct FrozenLinear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl FrozenLinear {
    /// Build from a weight (out, in) and an optional bias (out).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// The weight, (out, in).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, (out), if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `(out_features, in_features)`.
    pub fn shape(&self) -> (usize, usize) {
        let d = self.weight.dims();
        (d[0], d[1])
    }

    /// Apply to `x` (..., in) -> (..., out). Records a graph node only when `x` is tracked.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        apply_projection(self, x, self.shape())
    }
}

impl InputGradOp for FrozenLinear {
    const NAME: &'static str = "frozen-linear";
    fn plain(&self, x2: &Tensor) -> Result<Tensor> {
        add_bias(x2.matmul(&self.weight.t()?)?, self.bias.as_ref())
    }
    fn input_grad(&self, _x: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.weight)?))
    }
}

/// Root-mean-square layer norm with a frozen weight, as Hugging Face `Qwen2RMSNorm`:
/// `y = weight * (x * rsqrt(mean(x^2, -1) + eps))`, statistics in f32, the normalised value
/// cast back to the input dtype before the weight multiply.
///
/// `weight`: (hidden) in the compute dtype. Input (..., hidden); output same shape and dtype.
/// Backward returns only `dx`.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// Build from the weight (hidden) and epsilon.
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps }
    }

    /// The weight, (hidden).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Apply to `x` (..., hidden).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        apply(self, x)
    }
}

impl RmsNorm {
    /// `rsqrt(mean(x^2, -1) + eps)`, (..., 1), in `x`'s dtype.
    fn inv_rms(&self, x: &Tensor) -> Result<Tensor> {
        (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()
    }
}

impl InputGradOp for RmsNorm {
    const NAME: &'static str = "rms-norm";
    fn plain(&self, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        let x32 = x.to_dtype(stat_dtype(dt))?;
        let r = self.inv_rms(&x32)?;
        let xhat = x32.broadcast_mul(&r)?.to_dtype(dt)?;
        xhat.broadcast_mul(&self.weight)
    }
    fn input_grad(&self, x: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // dx = r * (g*w - xhat * mean(g*w*xhat)), with r = rsqrt(mean(x^2)+eps), xhat = x r.
        let dt = x.dtype();
        let f = stat_dtype(dt);
        let x32 = x.to_dtype(f)?;
        let r = self.inv_rms(&x32)?;
        let xhat = x32.broadcast_mul(&r)?;
        let gw = grad.to_dtype(f)?.broadcast_mul(&self.weight.to_dtype(f)?)?;
        let m = (&gw * &xhat)?.mean_keepdim(D::Minus1)?;
        let dx = gw.sub(&xhat.broadcast_mul(&m)?)?.broadcast_mul(&r)?;
        Ok(Some(dx.to_dtype(dt)?))
    }
}

/// Rotary position embedding tables (`cos`, `sin`), each (seq_len, head_dim) in f32, as
/// Hugging Face `Qwen2RotaryEmbedding` (`inv_freq = theta^(-2i/d)`, halves concatenated).
pub fn rope_tables(
    seq_len: usize,
    head_dim: usize,
    theta: f64,
    device: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32)
        .collect();
    let mut freqs = Vec::with_capacity(seq_len * head_dim);
    for t in 0..seq_len {
        for k in 0..head_dim {
            freqs.push(t as f32 * inv[k % half]);
        }
    }
    let f = Tensor::from_vec(freqs, (seq_len, head_dim), device)?;
    Ok((f.cos()?, f.sin()?))
}

/// Apply RoPE to `x` (batch, heads, seq, head_dim): `x * cos + rotate_half(x) * sin`, where
/// `rotate_half([x1, x2]) = [-x2, x1]` (Hugging Face `apply_rotary_pos_emb`). Built from
/// differentiable primitives. `cos`/`sin`: (seq, head_dim) in `x`'s dtype.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?
}

/// Causal scaled-dot-product attention with grouped-query attention.
///
/// `q`: (batch, q_heads, seq, head_dim); `k`, `v`: (batch, kv_heads, seq, head_dim) with
/// `q_heads % kv_heads == 0` (query head `h` reads kv head `h / (q_heads / kv_heads)`, as HF
/// `repeat_kv`). Scores and softmax are computed in f32; output (batch, q_heads, seq, head_dim)
/// in `q`'s dtype. Equivalent to `torch.nn.functional.scaled_dot_product_attention(...,
/// is_causal=True)`. Backward recomputes the probabilities (no (seq x seq) tensor is kept).
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let op = Attention;
    if q.track_op() || k.track_op() || v.track_op() {
        q.contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
    } else {
        op.forward(q, k, v)
    }
}

struct Attention;

impl Attention {
    /// Returns (q grouped as (b, kvh, g*t, d), probabilities f32 (b, kvh, g*t, t)).
    fn probs(&self, q: &Tensor, k: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, qh, t, d) = q.dims4()?;
        let kvh = k.dim(1)?;
        let g = qh / kvh;
        let qg = q.reshape((b, kvh, g * t, d))?;
        let scale = 1.0 / (d as f64).sqrt();
        let f = stat_dtype(q.dtype());
        let s = qg
            .to_dtype(f)?
            .matmul(&k.to_dtype(f)?.t()?)?
            .affine(scale, 0.0)?;
        let mask = causal_bias(t, f, q.device())?;
        let s = s
            .reshape((b, kvh, g, t, t))?
            .broadcast_add(&mask)?
            .reshape((b, kvh, g * t, t))?;
        let max = s.max_keepdim(D::Minus1)?;
        let e = s.broadcast_sub(&max)?.exp()?;
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        Ok((qg, p))
    }

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (b, qh, t, d) = q.dims4()?;
        let (_, p) = self.probs(q, k)?;
        let o = p.to_dtype(v.dtype())?.matmul(v)?;
        o.reshape((b, qh, t, d))
    }
}

/// Additive causal mask (t, t) in `dtype`, built on the device: 0 where key <= query
/// position, -1e30 above the diagonal.
fn causal_bias(t: usize, dtype: DType, dev: &candle_core::Device) -> Result<Tensor> {
    let r = Tensor::arange(0u32, t as u32, dev)?;
    let above = r.unsqueeze(0)?.broadcast_gt(&r.unsqueeze(1)?)?;
    above.to_dtype(dtype)?.affine(-1e30, 0.0)
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
        cuda_out(self.forward(&cuda_in(s1, l1)?, &cuda_in(s2, l2)?, &cuda_in(s3, l3)?)?)
    }
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, qh, t, d) = q.dims4()?;
        let kvh = k.dim(1)?;
        let g = qh / kvh;
        let scale = 1.0 / (d as f64).sqrt();
        let (qg, p) = self.probs(q, k)?;
        let f = stat_dtype(q.dtype());
        let go = grad.to_dtype(f)?.reshape((b, kvh, g * t, d))?;
        let og = o.to_dtype(f)?.reshape((b, kvh, g * t, d))?;
        // dV = P^T dO ; dP = dO V^T ; dS = P * (dP - rowsum(dO * O)) ; dQ = dS K s ; dK = dS^T Q s
        let dv = p.t()?.matmul(&go)?;
        let dp = go.matmul(&v.to_dtype(f)?.t()?)?;
        let delta = (&go * &og)?.sum_keepdim(D::Minus1)?;
        let ds = (p * dp.broadcast_sub(&delta)?)?.affine(scale, 0.0)?;
        let dq = ds.matmul(&k.to_dtype(f)?)?.reshape((b, qh, t, d))?;
        let dk = ds.t()?.matmul(&qg.to_dtype(f)?)?;
        let dt = q.dtype();
        Ok((
            Some(dq.to_dtype(dt)?),
            Some(dk.to_dtype(dt)?),
            Some(dv.to_dtype(dt)?),
        ))
    }
}
