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

use super::kernels::map_cpu_float;
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
    /// Whether `x` (and the output gradient `grad`) take the fused CUDA kernels: on CUDA,
    /// [`super::kernels::fused_kernels`] on, f32/f16/bf16 input with a weight (and gradient)
    /// of the same dtype and a weight as long as the last dimension.
    fn fused_here(&self, x: &Tensor, grad: Option<&Tensor>) -> bool {
        let dt = x.dtype();
        fused_ok(x)
            && self.weight.dtype() == dt
            && self.weight.device().same_device(x.device())
            && self.weight.dims() == [x.dims().last().copied().unwrap_or(0)]
            && grad.is_none_or(|g| g.dtype() == dt && g.dims() == x.dims())
    }

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
        if self.fused_here(x, None) {
            return x
                .contiguous()?
                .apply_op2_no_bwd(&self.weight, &RmsNormKernel { eps: self.eps });
        }
        let dt = x.dtype();
        let x32 = x.to_dtype(stat_dtype(dt))?;
        let r = self.inv_rms(&x32)?;
        let xhat = x32.broadcast_mul(&r)?.to_dtype(dt)?;
        xhat.broadcast_mul(&self.weight)
    }
    fn input_grad(&self, x: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // dx = r * (g*w - xhat * mean(g*w*xhat)), with r = rsqrt(mean(x^2)+eps), xhat = x r.
        if self.fused_here(x, Some(grad)) {
            return Ok(Some(x.contiguous()?.apply_op3_no_bwd(
                &self.weight,
                &grad.contiguous()?,
                &RmsNormGradKernel { eps: self.eps },
            )?));
        }
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
/// `rotate_half([x1, x2]) = [-x2, x1]` (Hugging Face `apply_rotary_pos_emb`). `cos`/`sin`:
/// (seq, head_dim) in `x`'s dtype; output like `x`.
///
/// On CUDA (f32/f16/bf16, [`super::kernels::fused_kernels`] on) one fused kernel each way
/// ([`Rope`]: f32 arithmetic, one rounding to `x`'s dtype, backward `dx` only); elsewhere
/// differentiable candle primitives, rounding after each of them.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if fused_ok(x) && Rope::fits(x, cos, sin) {
        return super::prof::section("rope", "fwd", x.device(), || rope_fused(x, cos, sin));
    }
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?
}

/// The adjoint of [`apply_rope`] (its input gradient for the output gradient `grad`
/// (..., seq, head_dim)), on untracked tensors: `dx = dy * cos + rotate_half^T(dy * sin)` with
/// `rotate_half^T([a, b]) = [b, -a]`: the fused [`Rope`] kernel where [`apply_rope`] uses it,
/// candle ops elsewhere. Tables as [`apply_rope`].
///
/// Errors: tables that do not fit `grad`, device errors.
pub(crate) fn rope_backward(grad: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if !Rope::fits(grad, cos, sin) {
        candle_core::bail!(
            "rope backward: tables {:?}/{:?} for gradient {:?}",
            cos.shape(),
            sin.shape(),
            grad.shape()
        );
    }
    if !fused_ok(grad) {
        // Candle ops (CPU, and CUDA with the fused kernels off), as `apply_rope`'s generic path.
        return super::prof::section("rope", "bwd", grad.device(), || {
            let d = grad.dim(D::Minus1)?;
            let gs = grad.broadcast_mul(sin)?;
            let a = gs.narrow(D::Minus1, 0, d / 2)?;
            let b = gs.narrow(D::Minus1, d / 2, d / 2)?;
            grad.broadcast_mul(cos)? + Tensor::cat(&[&b, &a.neg()?], D::Minus1)?
        });
    }
    let adjoint = Rope {
        cos: cos.contiguous()?,
        sin: sin.contiguous()?,
        transpose: true,
    };
    super::prof::section("rope", "bwd", grad.device(), || {
        grad.contiguous()?.apply_op1_no_bwd(&adjoint)
    })
}

/// Whether `x` can take a fused CUDA kernel at all: a non-empty f32/f16/bf16 tensor on a CUDA
/// device, with [`super::kernels::fused_kernels`] on. Never on the CPU.
fn fused_ok(x: &Tensor) -> bool {
    x.device().is_cuda()
        && matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && x.elem_count() > 0
        && super::kernels::fused_kernels()
}

fn contiguous_range(l: &Layout, what: &str) -> Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: input must be contiguous")))
}

/// Row length of an RMSNorm input `x` (..., n) with weight (n).
fn rms_row(x: &Layout, w: &Layout, what: &str) -> Result<usize> {
    let n = x.shape().dims().last().copied().unwrap_or(0);
    if n == 0 || w.shape().dims() != [n] {
        candle_core::bail!("{what}: weight {:?} for input {:?}", w.shape(), x.shape());
    }
    Ok(n)
}

/// Fused [`RmsNorm`] forward on `(x, weight)`, as Hugging Face `Qwen2RMSNorm.forward`: per row
/// of `x` (..., n), `r = 1 / sqrt(mean(x^2) + eps)` in f32 (f64 for f64), then
/// `y = weight * cast(x * r)` where the cast is to `x`'s dtype and the product is rounded to that
/// dtype, as the generic path (`xhat.to_dtype(dt) * weight`). Weight (n) in `x`'s dtype.
///
/// CUDA: one NVRTC kernel, one 256-thread block per row (f32/f16/bf16). CPU: the same formula
/// as loops with f64 statistics, a reference for tests (the CPU model runs the generic code).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RmsNormKernel {
    pub(crate) eps: f64,
}

/// Fused [`RmsNorm`] backward on `(x, weight, dy)`, all (..., n) / (n) in one dtype: per row,
/// `r = 1 / sqrt(mean(x^2) + eps)`, `xhat = x r`, `gw = dy * weight`,
/// `dx = r * (gw - xhat * mean(gw * xhat))`, all in f32 (f64 for f64), `dx` rounded once to
/// `x`'s dtype. Same backends as [`RmsNormKernel`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct RmsNormGradKernel {
    pub(crate) eps: f64,
}

mod reference {
    //! CPU loops of the fused kernels' formulas (f64 arithmetic, the kernels' roundings to the
    //! storage dtype), tested against the generic candle code.
    use candle_core::WithDType;

    pub fn rms_fwd<T: WithDType>(x: &[T], w: &[T], n: usize, eps: f64) -> Vec<T> {
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks(n) {
            let ss: f64 = row.iter().map(|v| v.to_f64() * v.to_f64()).sum();
            let r = 1.0 / (ss / n as f64 + eps).sqrt();
            for (v, w) in row.iter().zip(w) {
                let xhat = T::from_f64(v.to_f64() * r).to_f64();
                out.push(T::from_f64(xhat * w.to_f64()));
            }
        }
        out
    }

    pub fn rms_bwd<T: WithDType>(x: &[T], w: &[T], g: &[T], n: usize, eps: f64) -> Vec<T> {
        let mut out = Vec::with_capacity(x.len());
        for (row, grow) in x.chunks(n).zip(g.chunks(n)) {
            let (mut ss, mut dot) = (0.0, 0.0);
            for ((v, g), w) in row.iter().zip(grow).zip(w) {
                let v = v.to_f64();
                ss += v * v;
                dot += g.to_f64() * w.to_f64() * v;
            }
            let r = 1.0 / (ss / n as f64 + eps).sqrt();
            let m = dot * r / n as f64;
            for ((v, g), w) in row.iter().zip(grow).zip(w) {
                let gw = g.to_f64() * w.to_f64();
                out.push(T::from_f64(r * (gw - v.to_f64() * r * m)));
            }
        }
        out
    }

    /// RoPE over `x` (..., t, d) with tables `c`, `s` (t, d); `transpose`: the adjoint
    /// `dy * c + rotate_half^T(dy * s)` with `rotate_half^T([a, b]) = [b, -a]`.
    pub fn rope<T: WithDType>(x: &[T], c: &[T], s: &[T], t: usize, transpose: bool) -> Vec<T> {
        let d = c.len() / t;
        let h = d / 2;
        (0..x.len())
            .map(|i| {
                let j = i % d;
                let k = ((i / d) % t) * d + j;
                let f = |a: &T| a.to_f64();
                let rot = match (transpose, j < h) {
                    (false, true) => -f(&x[i + h]) * f(&s[k]),
                    (false, false) => f(&x[i - h]) * f(&s[k]),
                    (true, true) => f(&x[i + h]) * f(&s[k + h]),
                    (true, false) => -f(&x[i - h]) * f(&s[k - h]),
                };
                T::from_f64(f(&x[i]) * f(&c[k]) + rot)
            })
            .collect()
    }
}

impl candle_core::CustomOp2 for RmsNormKernel {
    fn name(&self) -> &'static str {
        "rms-norm-fused"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = rms_row(l1, l2, "rms-norm-fused")?;
        let (a, b) = contiguous_range(l1, "rms-norm-fused")?;
        let (wa, wb) = contiguous_range(l2, "rms-norm-fused")?;
        let e = self.eps;
        let out = map_cpu_float!(
            "rms-norm-fused: x and weight must share a float dtype",
            (s1 => x, s2 => w),
            T => reference::rms_fwd(&x[a..b], &w[wa..wb], n, e)
        );
        Ok((out, l1.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let n = rms_row(l1, l2, "rms-norm-fused")?;
        let r1 = contiguous_range(l1, "rms-norm-fused")?;
        let r2 = contiguous_range(l2, "rms-norm-fused")?;
        let out = cuda::rms_norm(s1, r1, s2, r2, None, n, self.eps)?;
        Ok((out, l1.shape().clone()))
    }
}

impl candle_core::CustomOp3 for RmsNormGradKernel {
    fn name(&self) -> &'static str {
        "rms-norm-grad-fused"
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
        const W: &str = "rms-norm-grad-fused";
        let n = rms_row(l1, l2, W)?;
        if l3.shape() != l1.shape() {
            candle_core::bail!("{W}: dy {:?} for x {:?}", l3.shape(), l1.shape());
        }
        let (a, b) = contiguous_range(l1, W)?;
        let (wa, wb) = contiguous_range(l2, W)?;
        let (ga, gb) = contiguous_range(l3, W)?;
        let e = self.eps;
        let out = map_cpu_float!(
            format!("{W}: x, weight and dy must share a float dtype"),
            (s1 => x, s2 => w, s3 => g),
            T => reference::rms_bwd(&x[a..b], &w[wa..wb], &g[ga..gb], n, e)
        );
        Ok((out, l1.shape().clone()))
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
        const W: &str = "rms-norm-grad-fused";
        let n = rms_row(l1, l2, W)?;
        if l3.shape() != l1.shape() {
            candle_core::bail!("{W}: dy {:?} for x {:?}", l3.shape(), l1.shape());
        }
        let r1 = contiguous_range(l1, W)?;
        let r2 = contiguous_range(l2, W)?;
        let r3 = contiguous_range(l3, W)?;
        let out = cuda::rms_norm(s1, r1, s2, r2, Some((s3, r3)), n, self.eps)?;
        Ok((out, l1.shape().clone()))
    }
}

/// RoPE as one graph node, Hugging Face `apply_rotary_pos_emb` on one tensor:
/// `y = x * cos + rotate_half(x) * sin` with `rotate_half([x1, x2]) = [-x2, x1]` over the last
/// dimension, for `x` (..., t, d) and constant tables `cos`, `sin` (t, d) in `x`'s dtype.
///
/// The op is linear in `x`; its backward is the adjoint (`transpose`),
/// `dx = dy * cos + rotate_half^T(dy * sin)` with `rotate_half^T([a, b]) = [b, -a]`, and only
/// `dx` (the tables are constants). Arithmetic in f32 (f64 for f64), one rounding to `x`'s
/// dtype. CUDA: one NVRTC kernel (f32/f16/bf16), one thread per element; CPU: reference loops
/// for tests (the CPU model runs [`apply_rope`]'s generic code).
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    cos: Tensor,
    sin: Tensor,
    transpose: bool,
}

impl Rope {
    /// Whether `x` (..., t, d) and tables (t, d) fit the op: same dtype and device, `d` even.
    fn fits(x: &Tensor, cos: &Tensor, sin: &Tensor) -> bool {
        let xd = x.dims();
        xd.len() >= 2
            && cos.dims() == &xd[xd.len() - 2..]
            && sin.dims() == cos.dims()
            && xd[xd.len() - 1].is_multiple_of(2)
            && cos.dtype() == x.dtype()
            && sin.dtype() == x.dtype()
            && cos.device().same_device(x.device())
            && sin.device().same_device(x.device())
    }

    /// `(t, d)` of the tables, checked against the input layout.
    fn dims(&self, l: &Layout) -> Result<(usize, usize)> {
        let (t, d) = self.cos.dims2()?;
        let xd = l.shape().dims();
        if xd.len() < 2
            || xd[xd.len() - 2..] != [t, d]
            || !d.is_multiple_of(2)
            || self.sin.dims() != [t, d]
        {
            candle_core::bail!(
                "rope: tables {:?}/{:?} for input {:?}",
                self.cos.shape(),
                self.sin.shape(),
                l.shape()
            );
        }
        Ok((t, d))
    }

    fn cpu_tables<T: candle_core::WithDType>(&self) -> Result<(Vec<T>, Vec<T>)> {
        Ok((
            self.cos.flatten_all()?.to_vec1::<T>()?,
            self.sin.flatten_all()?.to_vec1::<T>()?,
        ))
    }
}

/// [`Rope`] on `x` as a graph node (recorded when `x` is tracked).
pub(crate) fn rope_fused(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Rope {
        cos: cos.contiguous()?,
        sin: sin.contiguous()?,
        transpose: false,
    })
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (t, _) = self.dims(l)?;
        let (a, b) = contiguous_range(l, "rope")?;
        let tr = self.transpose;
        let out = map_cpu_float!("rope: unsupported dtype", (s => v), T => {
            let (c, sn) = self.cpu_tables::<T>()?;
            reference::rope(&v[a..b], &c, &sn, t, tr)
        });
        Ok((out, l.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (t, d) = self.dims(l)?;
        let range = contiguous_range(l, "rope")?;
        let out = cuda::rope(s, range, &self.cos, &self.sin, t, d, self.transpose)?;
        Ok((out, l.shape().clone()))
    }
    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // Detached: see `InputGradCustomOp::bwd`. The adjoint of a linear op, untracked.
        let grad = grad.detach();
        let adjoint = Rope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            transpose: !self.transpose,
        };
        super::prof::section("rope", "bwd", grad.device(), || {
            Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&adjoint)?))
        })
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    //! NVRTC kernels of [`super::RmsNormKernel`], [`super::RmsNormGradKernel`] (one 256-thread
    //! block per row, f32 statistics) and [`super::Rope`] (one thread per element, grid-stride).
    use super::super::kernels::{self, PRELUDE};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::{CudaStorage, DType, Result, Storage, Tensor};

    const MODULE: &str = "lorascope_norm_rope";
    pub(super) const SRC: &str = r#"
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float shared[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shared[wid] = v;
    __syncthreads();
    int nw = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < nw) ? shared[threadIdx.x] : 0.f;
    if (wid == 0) {
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) shared[0] = v;
    }
    __syncthreads();
    float r = shared[0];
    __syncthreads();
    return r;
}

#define NORM_ROPE_KERNELS(SUF, T)                                                             \
extern "C" __global__ void rms_norm_fwd_##SUF(const T* x, const T* w, T* y, int n,          \
                                              float inv_n, float eps) {                       \
    long long off = (long long)blockIdx.x * n;                                                \
    const T* xr = x + off; T* yr = y + off;                                                   \
    float ss = 0.f;                                                                           \
    for (int j = threadIdx.x; j < n; j += blockDim.x) { float v = ld(xr[j]); ss += v * v; }  \
    ss = block_sum(ss);                                                                       \
    float r = 1.f / sqrtf(ss * inv_n + eps);                                                  \
    for (int j = threadIdx.x; j < n; j += blockDim.x) {                                       \
        T h; st(&h, ld(xr[j]) * r);                                                           \
        st(yr + j, ld(h) * ld(w[j]));                                                         \
    }                                                                                         \
}                                                                                             \
extern "C" __global__ void rms_norm_bwd_##SUF(const T* x, const T* w, const T* g, T* dx,    \
                                              int n, float inv_n, float eps) {                \
    long long off = (long long)blockIdx.x * n;                                                \
    const T* xr = x + off; const T* gr = g + off; T* o = dx + off;                            \
    float ss = 0.f, dot = 0.f;                                                                \
    for (int j = threadIdx.x; j < n; j += blockDim.x) {                                       \
        float v = ld(xr[j]);                                                                  \
        ss += v * v;                                                                          \
        dot += ld(gr[j]) * ld(w[j]) * v;                                                      \
    }                                                                                         \
    ss = block_sum(ss);                                                                       \
    dot = block_sum(dot);                                                                     \
    float r = 1.f / sqrtf(ss * inv_n + eps);                                                  \
    float m = dot * r * inv_n;                                                                \
    for (int j = threadIdx.x; j < n; j += blockDim.x) {                                       \
        float v = ld(xr[j]);                                                                  \
        st(o + j, r * (ld(gr[j]) * ld(w[j]) - v * r * m));                                    \
    }                                                                                         \
}                                                                                             \
extern "C" __global__ void rope_##SUF(const T* x, const T* c, const T* s, T* y,             \
                                      unsigned long long n, int t, int d, int transpose) {   \
    int h = d >> 1;                                                                           \
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;   \
         i < n; i += (unsigned long long)blockDim.x * gridDim.x) {                            \
        unsigned long long row = i / (unsigned long long)d;                                   \
        int j = (int)(i - row * (unsigned long long)d);                                       \
        long long k = (long long)(row % (unsigned long long)t) * d + j;                       \
        float rot;                                                                            \
        if (!transpose) rot = j < h ? -ld(x[i + h]) * ld(s[k]) : ld(x[i - h]) * ld(s[k]);    \
        else rot = j < h ? ld(x[i + h]) * ld(s[k + h]) : -ld(x[i - h]) * ld(s[k - h]);        \
        st(y + i, ld(x[i]) * ld(c[k]) + rot);                                                 \
    }                                                                                         \
}

NORM_ROPE_KERNELS(f32, float)
NORM_ROPE_KERNELS(f16, f16_t)
NORM_ROPE_KERNELS(bf16, bf16_t)
"#;

    use kernels::dtype_suffix as suffix;

    /// RMSNorm forward (`g: None`) or backward (`g: Some(dy)`) over rows of length `n`.
    pub fn rms_norm(
        x: &CudaStorage,
        (a, b): (usize, usize),
        w: &CudaStorage,
        (wa, wb): (usize, usize),
        g: Option<(&CudaStorage, (usize, usize))>,
        n: usize,
        eps: f64,
    ) -> Result<CudaStorage> {
        let dt = x.dtype();
        if w.dtype() != dt || g.is_some_and(|(g, _)| g.dtype() != dt) {
            candle_core::bail!("rms-norm-fused: mixed dtypes");
        }
        let dev = x.device().clone();
        let name = format!(
            "rms_norm_{}_{}",
            if g.is_some() { "bwd" } else { "fwd" },
            suffix(dt, "rms-norm-fused")?
        );
        let func =
            dev.get_or_load_custom_func(&name, MODULE, kernels::ptx(MODULE, PRELUDE, SRC)?)?;
        let rows = (b - a) / n;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let n32 = n as i32;
        let inv_n = (1.0 / n as f64) as f32;
        let eps = eps as f32;
        macro_rules! go {
            ($ty:ty) => {{
                let xs = x.as_cuda_slice::<$ty>()?.slice(a..b);
                let ws = w.as_cuda_slice::<$ty>()?.slice(wa..wb);
                let gs = match g {
                    Some((g, (ga, gb))) => Some(g.as_cuda_slice::<$ty>()?.slice(ga..gb)),
                    None => None,
                };
                // SAFETY: the kernel writes every element.
                let mut out = unsafe { dev.alloc::<$ty>(b - a) }?;
                let mut lb = func.builder();
                lb.arg(&xs);
                lb.arg(&ws);
                if let Some(gs) = &gs {
                    lb.arg(gs);
                }
                lb.arg(&mut out);
                lb.arg(&n32);
                lb.arg(&inv_n);
                lb.arg(&eps);
                if rows > 0 {
                    // SAFETY: argument types match the kernel signature.
                    unsafe { lb.launch(cfg) }.map_err(kernels::err)?;
                }
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        Ok(match dt {
            DType::F32 => go!(f32),
            DType::F16 => go!(half::f16),
            _ => go!(half::bf16),
        })
    }

    /// RoPE (or its adjoint) over `x` (..., t, d) with tables (t, d).
    pub fn rope(
        x: &CudaStorage,
        (a, b): (usize, usize),
        cos: &Tensor,
        sin: &Tensor,
        t: usize,
        d: usize,
        transpose: bool,
    ) -> Result<CudaStorage> {
        let dt = x.dtype();
        let dev = x.device().clone();
        let name = format!("rope_{}", suffix(dt, "rope")?);
        let func =
            dev.get_or_load_custom_func(&name, MODULE, kernels::ptx(MODULE, PRELUDE, SRC)?)?;
        let (cg, cl) = cos.storage_and_layout();
        let (sg, sl) = sin.storage_and_layout();
        let (ca, cb) = super::contiguous_range(cl, "rope table")?;
        let (sa, sb) = super::contiguous_range(sl, "rope table")?;
        let (Storage::Cuda(cs), Storage::Cuda(ss)) = (&*cg, &*sg) else {
            candle_core::bail!("rope: tables must be on the input's CUDA device");
        };
        if cs.dtype() != dt || ss.dtype() != dt {
            candle_core::bail!("rope: tables must be in the input's dtype");
        }
        let n = (b - a) as u64;
        let blocks = (b - a).div_ceil(256).clamp(1, 1 << 20) as u32;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (t32, d32, tr) = (t as i32, d as i32, transpose as i32);
        macro_rules! go {
            ($ty:ty) => {{
                let xs = x.as_cuda_slice::<$ty>()?.slice(a..b);
                let c = cs.as_cuda_slice::<$ty>()?.slice(ca..cb);
                let s = ss.as_cuda_slice::<$ty>()?.slice(sa..sb);
                // SAFETY: the kernel writes every element.
                let mut out = unsafe { dev.alloc::<$ty>(b - a) }?;
                let mut lb = func.builder();
                lb.arg(&xs);
                lb.arg(&c);
                lb.arg(&s);
                lb.arg(&mut out);
                lb.arg(&n);
                lb.arg(&t32);
                lb.arg(&d32);
                lb.arg(&tr);
                if n > 0 {
                    // SAFETY: argument types match the kernel signature.
                    unsafe { lb.launch(cfg) }.map_err(kernels::err)?;
                }
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        Ok(match dt {
            DType::F32 => go!(f32),
            DType::F16 => go!(half::f16),
            _ => go!(half::bf16),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{max_abs_diff, rand_uniform};
    use super::*;
    use candle_core::{Device, Var};

    fn rand(shape: &[usize], seed: u64, lo: f64, hi: f64) -> Tensor {
        rand_uniform(shape, seed, lo, hi)
    }

    /// (dtype, tolerance of the fused formula against the generic code).
    const DTYPES: [(DType, f64); 4] = [
        (DType::F64, 1e-12),
        (DType::F32, 2e-5),
        (DType::F16, 8e-3),
        (DType::BF16, 6e-2),
    ];

    #[test]
    fn fused_rms_norm_formula_matches_the_generic_forward_and_backward() {
        let (x, w, g) = (
            rand(&[3, 5, 48], 1, -2.0, 2.0),
            rand(&[48], 2, 0.5, 1.5),
            rand(&[3, 5, 48], 3, -1.0, 1.0),
        );
        for (dt, tol) in DTYPES {
            let c = |t: &Tensor| t.to_dtype(dt).unwrap();
            let norm = RmsNorm::new(c(&w), 1e-6);
            let generic = norm.plain(&c(&x)).unwrap();
            let fused = c(&x)
                .apply_op2_no_bwd(&c(&w), &RmsNormKernel { eps: 1e-6 })
                .unwrap();
            assert_eq!(fused.dtype(), dt);
            let err = max_abs_diff(&fused, &generic);
            assert!(err < tol, "{dt:?} forward: max abs error {err}");
            let generic = norm.input_grad(&c(&x), &c(&g)).unwrap().unwrap();
            let fused = c(&x)
                .apply_op3_no_bwd(&c(&w), &c(&g), &RmsNormGradKernel { eps: 1e-6 })
                .unwrap();
            let err = max_abs_diff(&fused, &generic);
            assert!(err < tol, "{dt:?} backward: max abs error {err}");
        }
    }

    #[test]
    fn fused_rms_norm_rounds_the_normalised_value_before_the_weight() {
        // f16: cast(x r) * w, each rounded, must equal the generic path exactly when the
        // statistics agree (a row of equal values has r = 1/|v| up to eps).
        let x = Tensor::new(&[[3.0f32, -3.0, 3.0, -3.0]], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let w = Tensor::new(&[0.1f32, 0.3, 0.7, 1.9], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let generic = RmsNorm::new(w.clone(), 1e-6).plain(&x).unwrap();
        let fused = x
            .apply_op2_no_bwd(&w, &RmsNormKernel { eps: 1e-6 })
            .unwrap();
        assert_eq!(max_abs_diff(&fused, &generic), 0.0);
    }

    #[test]
    fn fused_rms_norm_backward_matches_finite_differences() {
        let (x, w, g) = (
            rand(&[2, 16], 4, -2.0, 2.0),
            rand(&[16], 5, 0.5, 1.5),
            rand(&[2, 16], 6, -1.0, 1.0),
        );
        let op = RmsNormKernel { eps: 1e-6 };
        let loss = |x: &Tensor| -> f64 {
            (x.apply_op2_no_bwd(&w, &op).unwrap() * &g)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let dx = x
            .apply_op3_no_bwd(&w, &g, &RmsNormGradKernel { eps: 1e-6 })
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let xv = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let h = 1e-6;
        for i in 0..xv.len() {
            let at = |delta: f64| {
                let mut v = xv.clone();
                v[i] += delta;
                loss(&Tensor::from_vec(v, x.shape(), &Device::Cpu).unwrap())
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            assert!((fd - dx[i]).abs() < 1e-6, "dx[{i}]: {} vs fd {fd}", dx[i]);
        }
    }

    /// Generic RoPE forward and its autograd gradient of `sum(y * w)`.
    fn rope_generic(x: &Tensor, cos: &Tensor, sin: &Tensor, w: &Tensor) -> (Tensor, Tensor) {
        let v = Var::from_tensor(x).unwrap();
        let y = apply_rope(v.as_tensor(), cos, sin).unwrap();
        let g = (&y * w).unwrap().sum_all().unwrap().backward().unwrap();
        (y.detach(), g.get(v.as_tensor()).unwrap().clone())
    }

    fn rope_fused_with_grad(
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        w: &Tensor,
    ) -> (Tensor, Tensor) {
        let v = Var::from_tensor(x).unwrap();
        let y = rope_fused(v.as_tensor(), cos, sin).unwrap();
        let g = (&y * w).unwrap().sum_all().unwrap().backward().unwrap();
        (y.detach(), g.get(v.as_tensor()).unwrap().clone())
    }

    #[test]
    fn fused_rope_matches_the_generic_forward_and_backward() {
        let shape = [2, 3, 5, 8];
        let x = rand(&shape, 7, -1.0, 1.0);
        let w = rand(&shape, 8, -1.0, 1.0);
        // Random tables (halves differ), so a wrong partner index in the backward shows; and
        // the model's tables.
        let (rc, rs) = (rand(&[5, 8], 9, -1.0, 1.0), rand(&[5, 8], 10, -1.0, 1.0));
        let (qc, qs) = rope_tables(5, 8, 10_000.0, &Device::Cpu).unwrap();
        for (cos, sin) in [(rc, rs), (qc, qs)] {
            for (dt, tol) in DTYPES {
                let c = |t: &Tensor| t.to_dtype(dt).unwrap();
                let (yg, gg) = rope_generic(&c(&x), &c(&cos), &c(&sin), &c(&w));
                let (yf, gf) = rope_fused_with_grad(&c(&x), &c(&cos), &c(&sin), &c(&w));
                assert_eq!((yf.dtype(), gf.dtype()), (dt, dt));
                let err = max_abs_diff(&yf, &yg);
                assert!(err < tol, "{dt:?} forward: max abs error {err}");
                let err = max_abs_diff(&gf, &gg);
                assert!(err < tol, "{dt:?} backward: max abs error {err}");
            }
        }
    }

    #[test]
    fn fused_rope_backward_matches_finite_differences() {
        let shape = [1, 2, 3, 6];
        let x = rand(&shape, 11, -1.0, 1.0);
        let w = rand(&shape, 12, -1.0, 1.0);
        let (cos, sin) = (rand(&[3, 6], 13, -1.0, 1.0), rand(&[3, 6], 14, -1.0, 1.0));
        let (_, dx) = rope_fused_with_grad(&x, &cos, &sin, &w);
        let dx = dx.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let xv = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let loss = |v: Vec<f64>| -> f64 {
            let x = Tensor::from_vec(v, &shape, &Device::Cpu).unwrap();
            (rope_fused(&x, &cos, &sin).unwrap() * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let h = 1e-5;
        for i in 0..xv.len() {
            let (mut p, mut m) = (xv.clone(), xv.clone());
            p[i] += h;
            m[i] -= h;
            let fd = (loss(p) - loss(m)) / (2.0 * h);
            assert!((fd - dx[i]).abs() < 1e-8, "dx[{i}]: {} vs fd {fd}", dx[i]);
        }
    }

    #[test]
    fn cpu_rope_and_rms_norm_keep_the_generic_path() {
        // The fused ops are CUDA-only in the model: on the CPU, apply_rope records the
        // primitives' graph (no "rope" node), which the checks above compare against.
        assert!(!fused_ok(
            &rand(&[2, 4], 15, -1.0, 1.0).to_dtype(DType::F32).unwrap()
        ));
    }
}
