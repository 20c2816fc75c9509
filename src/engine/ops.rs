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
//!
//! Attention has its own module ([`super::attention`]).

use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CustomOp1, D, DType, Layout, Result, Shape, Storage, Tensor};

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
        let x = cuda_in(s, l)?;
        let dev = x.device().clone();
        cuda_out(super::prof::section(T::NAME, "fwd", &dev, || {
            self.0.plain(&x)
        })?)
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // candle hands backward the *tracked* forward input: detach it, or every tensor
        // computed from it would carry a graph that keeps its intermediates alive for as long
        // as the gradient is stored.
        let (x, grad) = (x.detach(), grad.detach());
        super::prof::section(T::NAME, "bwd", x.device(), || self.0.input_grad(&x, &grad))
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
