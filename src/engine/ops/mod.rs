//! Autograd ops with their own backward, where candle's generic ones would keep too much or
//! compute gradients nobody needs, and the custom-op glue they share.
//!
//! candle's `Tensor::matmul` backward computes a gradient for *both* operands, so a frozen base
//! weight would get a full (out x in) gradient every step; its fast softmax / RMSNorm / RoPE
//! kernels record no backward at all. The ops here are candle custom ops whose backward returns
//! only the gradients that LoRA training needs:
//!
//! - [`FrozenLinear`]: `y = x W^T + b` with `W`, `b` frozen; backward gives `dx = dy W` only.
//! - [`RmsNorm`]: Hugging Face `Qwen2RMSNorm` / `LlamaRMSNorm` (f32 statistics), `dx` only.
//! - [`apply_rope`] / [`rope_backward`]: Hugging Face `apply_rotary_pos_emb`.
//! - [`causal_attention`]: causal grouped-query attention, PyTorch
//!   `scaled_dot_product_attention(is_causal=True)` with HF `repeat_kv`.
//! - [`swiglu`]: the MLP gate `silu(gate) * up` of HF `Qwen2MLP` / `LlamaMLP`.
//! - [`geglu`]: Gemma's gate `gelu_tanh(gate) * up` (generic candle code on both devices).
//! - [`ChunkedCrossEntropy`]: `lm_head` fused with PyTorch's `CrossEntropyLoss`, chunked.
//! - [`softcap`]: Gemma's final-logit soft-capping (the loss applies it per chunk).
//!
//! Every op file has the same parts in this order: the module doc (the maths and the source it
//! matches); the public forward/backward API; the graph-node glue (candle `CustomOp` impls);
//! `mod cpu`, the CPU loops of the fused kernels; `mod generic`, the candle composition that
//! runs where the fused path does not (see [`crate::engine::cuda::fused_path`]: the CPU model,
//! and CUDA with `LORASCOPE_FUSED=0`) and that the tests compare the fused path against;
//! `#[cfg(feature = "cuda")] mod cuda`, the kernel launchers only (kernels in
//! `cuda/kernels/*.cu`); `#[cfg(test)] mod tests`, fast path against `generic` over dtypes.
//!
//! The glue here: [`InputGradOp`] (an op whose backward is its input's gradient only) and
//! [`apply`]; the storage/tensor conversions of custom-op bodies; [`contiguous_range`]; and
//! [`CpuLoops`] / [`cpu_map`], the dtype dispatch of CPU loops.

mod attention;
mod cross_entropy;
mod frozen_linear;
mod geglu;
mod rms_norm;
mod rope;
mod row_copy;
mod softcap;
mod swiglu;

pub(crate) use attention::causal_attention_backward;
pub use attention::{
    AttentionSpec, CausalSoftmax, CausalSoftmaxGrad, QUERY_CHUNK, causal_attention, query_chunk,
    query_chunks,
};
pub use cross_entropy::{
    CAPPED_CHUNK_DIV, ChunkedCrossEntropy, IGNORE_INDEX, RowGrad, RowLoss, chunk_rows,
};
pub use frozen_linear::FrozenLinear;
pub use geglu::geglu;
pub(crate) use geglu::geglu_backward;
pub use rms_norm::RmsNorm;
pub(crate) use rope::rope_backward;
pub use rope::{apply_rope, rope_tables};
pub use row_copy::row_copy;
pub use softcap::softcap;
pub use swiglu::swiglu;
#[cfg(feature = "cuda")]
pub(crate) use swiglu::swiglu_storages;
pub(crate) use swiglu::{swiglu_backward, swiglu_backward_owned};

use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor, WithDType,
};

/// Dtype for statistics (softmax, norms, loss): f32, or f64 when computing in f64 (tests).
pub fn stat_dtype(dt: DType) -> DType {
    if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// The `(start, end)` element range of a contiguous layout in its storage.
///
/// Errors: a non-contiguous layout, naming `what`.
pub(crate) fn contiguous_range(l: &Layout, what: &str) -> Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: input must be contiguous")))
}

/// Wrap a contiguous storage view as an untracked tensor.
fn wrap(storage: Storage, l: &Layout) -> Result<Tensor> {
    let (start, end) = contiguous_range(l, "custom op")?;
    let t = Tensor::from_storage(storage, end, BackpropOp::none(), false);
    t.narrow(0, start, end - start)?.reshape(l.shape())
}

/// A custom op's CPU input as an untracked tensor (a copy of the storage).
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

/// A custom op's CUDA input as an untracked tensor (a device copy of the storage).
#[cfg(feature = "cuda")]
pub(crate) fn cuda_in(s: &candle_core::CudaStorage, l: &Layout) -> Result<Tensor> {
    use candle_core::backend::BackendStorage;
    wrap(Storage::Cuda(s.try_clone(l)?), l)
}

/// Extract a CUDA storage from an (untracked) result tensor.
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

/// The data of a contiguous CUDA tensor as a kernel argument, borrowed (the caller keeps `t`
/// alive until the kernels using it are queued).
///
/// Errors: `t` is not a contiguous CUDA tensor (naming `what`), an unsupported dtype.
#[cfg(feature = "cuda")]
pub(crate) fn cuda_buf(t: &Tensor, what: &str) -> Result<crate::engine::cuda::launch::Buf> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cuda(c) => crate::engine::cuda::launch::Buf::view(c, contiguous_range(l, what)?),
        _ => candle_core::bail!("{what}: expected a CUDA tensor"),
    }
}

/// The CPU loops of a custom op over inputs of one float dtype (f32, f64, f16, bf16): the
/// CPU counterpart of candle's CUDA `Map1`/`Map2`. [`cpu_map`] slices every input to its
/// contiguous range, checks that they share a dtype, and calls [`CpuLoops::f`] with it.
pub(crate) trait CpuLoops {
    /// The op's name, for errors.
    const NAME: &'static str;
    /// The output elements from the inputs' elements (each input's contiguous range).
    fn f<T: WithDType>(&self, xs: &[&[T]]) -> Result<Vec<T>>;
}

/// Run `op`'s CPU loops on `xs` (storage and layout of each input) and wrap the result in a
/// storage of their dtype.
///
/// Errors: inputs of different or non-float dtypes, a non-contiguous input, the loops' errors.
pub(crate) fn cpu_map<O: CpuLoops>(op: &O, xs: &[(&CpuStorage, &Layout)]) -> Result<CpuStorage> {
    use candle_core::backend::BackendStorage;
    fn slices<'a, T: WithDType, O: CpuLoops>(
        xs: &[(&'a CpuStorage, &Layout)],
    ) -> Result<Vec<&'a [T]>> {
        xs.iter()
            .map(|(s, l)| {
                let (a, b) = contiguous_range(l, O::NAME)?;
                Ok(&s.as_slice::<T>()?[a..b])
            })
            .collect()
    }
    let Some((first, _)) = xs.first() else {
        candle_core::bail!("{}: no input", O::NAME);
    };
    let dt = first.dtype();
    if xs.iter().any(|(s, _)| s.dtype() != dt) {
        let dts: Vec<DType> = xs.iter().map(|(s, _)| s.dtype()).collect();
        candle_core::bail!("{}: inputs must share a float dtype, got {dts:?}", O::NAME);
    }
    Ok(match dt {
        DType::F32 => CpuStorage::F32(op.f(&slices::<f32, O>(xs)?)?),
        DType::F64 => CpuStorage::F64(op.f(&slices::<f64, O>(xs)?)?),
        DType::F16 => CpuStorage::F16(op.f(&slices::<half::f16, O>(xs)?)?),
        DType::BF16 => CpuStorage::BF16(op.f(&slices::<half::bf16, O>(xs)?)?),
        other => candle_core::bail!("{}: unsupported dtype {other:?}", O::NAME),
    })
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
        cuda_out(crate::engine::profiler::section(
            T::NAME,
            "fwd",
            &dev,
            || self.0.plain(&x),
        )?)
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // candle hands backward the *tracked* forward input: detach it, or every tensor
        // computed from it would carry a graph that keeps its intermediates alive for as long
        // as the gradient is stored.
        let (x, grad) = (x.detach(), grad.detach());
        crate::engine::profiler::section(T::NAME, "bwd", x.device(), || {
            self.0.input_grad(&x, &grad)
        })
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
