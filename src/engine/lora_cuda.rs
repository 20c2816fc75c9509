//! CUDA path of [`super::lora::LoraProjection`]: the adapted projection as direct cuBLAS
//! `GemmEx` calls and three small NVRTC kernels, without candle tensor ops in between.
//!
//! Why: at batch 2 x 2048 with gradient checkpointing the step was host-bound (H200, session 3:
//! the host took 364 ms to issue a 365 ms step). Each candle op costs the host tens of
//! microseconds (tensor bookkeeping, layout copies, a fresh allocation), and the adapted
//! projection was ~11 of them forward and ~18 backward, plus a device copy of its input and
//! output at the custom-op boundary. Here forward is 5-7 launches and backward 9-10, the
//! scaling and residual adds ride on cuBLAS's `alpha`/`beta`, and the adapter gradients come
//! out of cuBLAS in f32 directly (PEFT: f32 master weights, fp32 gradient accumulation).
//!
//! Maths (row-major; `d(x) = mask * x / (1 - p)`, the regenerable [`super::lora::dropout_keep`]
//! mask; `s = alpha / r`; `A` (r, in), `B` (out, r) f32 masters cast to the compute dtype):
//! - forward: `y = x W^T + b + (d(x) A^T) (s B)^T`;
//! - backward: `du = dy (s B)`, `dB = s dy^T (d(x) A^T)`, `dA = du^T d(x)`,
//!   `dx = dy W + mask * (du A) / (1 - p)`.
//!
//! GEMMs run with `CUBLAS_COMPUTE_32F` (f32 accumulation, as PyTorch's default for 16-bit
//! matmuls), inputs and outputs in the compute dtype except the f32 adapter gradients.

use super::kernels::{self, PRELUDE};
use super::lora::{BaseLinear, LoraProjection};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::{result as blas, sys as bsys};
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Storage, Tensor};

const MODULE: &str = "lorascope_lora";
const SRC: &str = r#"
__device__ __forceinline__ bool keep(unsigned long long seed, unsigned long long i,
                                     unsigned long long thr) {
    unsigned long long z = seed + (i + 1ull) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (z >> 40) >= thr;
}
#define GRID_STRIDE(i, n) \
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; \
         i < (n); i += (unsigned long long)gridDim.x * blockDim.x)
#define LORA_KERNELS(SUF, T)                                                                   \
extern "C" __global__ void lora_cast_##SUF(const float* src, T* dst, unsigned long long n,     \
                                           float scale) {                                      \
    GRID_STRIDE(i, n) st(dst + i, src[i] * scale);                                             \
}                                                                                              \
extern "C" __global__ void lora_bias_rows_##SUF(T* y, const T* b, unsigned long long n,        \
                                                unsigned long long cols) {                     \
    GRID_STRIDE(i, n) y[i] = b[i % cols];                                                      \
}                                                                                              \
extern "C" __global__ void lora_dropout_##SUF(const T* x, T* y, unsigned long long n,          \
        unsigned long long seed, unsigned long long thr, float inv) {                          \
    GRID_STRIDE(i, n) st(y + i, keep(seed, i, thr) ? ld(x[i]) * inv : 0.f);                    \
}                                                                                              \
extern "C" __global__ void lora_dropout_add_##SUF(T* acc, const T* t, unsigned long long n,    \
        unsigned long long seed, unsigned long long thr, float inv) {                          \
    GRID_STRIDE(i, n) if (keep(seed, i, thr)) st(acc + i, ld(acc[i]) + ld(t[i]) * inv);        \
}
LORA_KERNELS(f32, float)
LORA_KERNELS(f16, f16_t)
LORA_KERNELS(bf16, bf16_t)
"#;

/// Whether the direct path takes inputs of compute dtype `dt` (f32/f16/bf16, fused kernels on).
/// The caller checks that they are on a CUDA device.
pub(crate) fn supported(dt: DType) -> bool {
    matches!(dt, DType::F32 | DType::F16 | DType::BF16) && kernels::fused_kernels()
}

fn blas_type(dt: DType) -> Result<bsys::cudaDataType> {
    Ok(match dt {
        DType::F32 => bsys::cudaDataType::CUDA_R_32F,
        DType::F16 => bsys::cudaDataType::CUDA_R_16F,
        DType::BF16 => bsys::cudaDataType::CUDA_R_16BF,
        other => candle_core::bail!("lora cuda: unsupported dtype {other:?}"),
    })
}

/// A device buffer: its address, dtype and the storage that owns it (None for borrowed
/// buffers, which the caller keeps alive).
struct Buf {
    ptr: u64,
    dt: DType,
    owned: Option<CudaStorage>,
}

impl Buf {
    /// A fresh, uninitialised buffer of `n` elements of `dt`.
    fn alloc(dev: &CudaDevice, dt: DType, n: usize) -> Result<Self> {
        let stream = dev.cuda_stream();
        macro_rules! go {
            ($t:ty) => {{
                // SAFETY: every user writes the buffer before reading it.
                let s = unsafe { dev.alloc::<$t>(n.max(1)) }?;
                let ptr = s.device_ptr(&stream).0;
                (ptr, CudaStorage::wrap_cuda_slice(s, dev.clone()))
            }};
        }
        let (ptr, storage) = match dt {
            DType::F32 => go!(f32),
            DType::F16 => go!(half::f16),
            DType::BF16 => go!(half::bf16),
            other => candle_core::bail!("lora cuda: cannot allocate {other:?}"),
        };
        Ok(Self {
            ptr,
            dt,
            owned: Some(storage),
        })
    }

    /// The contiguous data of storage `s` under layout `l`, borrowed.
    fn view(s: &CudaStorage, l: &Layout) -> Result<Self> {
        let (start, _) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("lora cuda: input must be contiguous".into()))?;
        let stream = s.device().cuda_stream();
        let dt = s.dtype();
        let base = match dt {
            DType::F32 => s.as_cuda_slice::<f32>()?.device_ptr(&stream).0,
            DType::F16 => s.as_cuda_slice::<half::f16>()?.device_ptr(&stream).0,
            DType::BF16 => s.as_cuda_slice::<half::bf16>()?.device_ptr(&stream).0,
            other => candle_core::bail!("lora cuda: unsupported dtype {other:?}"),
        };
        Ok(Self {
            ptr: base + (start * dt.size_in_bytes()) as u64,
            dt,
            owned: None,
        })
    }

    /// The data of a contiguous CUDA tensor, borrowed (the caller keeps `t` alive).
    fn of(t: &Tensor) -> Result<Self> {
        let (s, l) = t.storage_and_layout();
        match &*s {
            Storage::Cuda(c) => Self::view(c, l),
            _ => candle_core::bail!("lora cuda: expected a CUDA tensor"),
        }
    }

    /// The owned storage as an untracked tensor of `shape`.
    fn into_tensor(self, shape: impl Into<candle_core::Shape>) -> Result<Tensor> {
        let s = self
            .owned
            .ok_or_else(|| candle_core::Error::Msg("lora cuda: borrowed buffer".into()))?;
        Ok(Tensor::from_storage(
            Storage::Cuda(s),
            shape,
            BackpropOp::none(),
            false,
        ))
    }
}

/// Row-major `C (m x n) = alpha op(A) op(B) + beta C` with f32 accumulation; `op(A)` is
/// (m x k), stored (k x m) when `ta`; `op(B)` is (k x n), stored (n x k) when `tb`. All three
/// contiguous. cuBLAS is column-major, so this computes `C^T = op(B)^T op(A)^T`.
#[allow(clippy::too_many_arguments)]
fn gemm(
    dev: &CudaDevice,
    (m, n, k): (usize, usize, usize),
    a: &Buf,
    ta: bool,
    b: &Buf,
    tb: bool,
    c: &Buf,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    use bsys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
    let dim = |v: usize| i32::try_from(v).map_err(kernels::err);
    let (transa, lda) = if tb {
        (CUBLAS_OP_T, k)
    } else {
        (CUBLAS_OP_N, n)
    };
    let (transb, ldb) = if ta {
        (CUBLAS_OP_T, m)
    } else {
        (CUBLAS_OP_N, k)
    };
    let blas_handle = dev.cublas_handle();
    // SAFETY: the buffers hold (m x k), (k x n) and (m x n) elements of their dtypes (checked by
    // the callers' shapes) and live until the stream has run the call; alpha/beta are f32 as
    // CUBLAS_COMPUTE_32F requires.
    unsafe {
        blas::gemm_ex(
            *blas_handle.handle(),
            transa,
            transb,
            dim(n)?,
            dim(m)?,
            dim(k)?,
            &alpha as *const f32 as *const _,
            b.ptr as *const _,
            blas_type(b.dt)?,
            dim(lda)?,
            a.ptr as *const _,
            blas_type(a.dt)?,
            dim(ldb)?,
            &beta as *const f32 as *const _,
            c.ptr as *mut _,
            blas_type(c.dt)?,
            dim(n)?,
            bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
        )
    }
    .map_err(kernels::err)
}

/// Launch elementwise kernel `name_<dtype>` over `n` elements: arguments are the pointers,
/// `n`, then the `u64` and the `f32` trailing scalars, in that order.
fn launch(
    dev: &CudaDevice,
    name: &str,
    dt: DType,
    n: usize,
    ptrs: &[u64],
    u64s: &[u64],
    f32s: &[f32],
) -> Result<()> {
    let full = format!("{name}_{}", kernels::dtype_suffix(dt, "lora projection")?);
    let func = dev.get_or_load_custom_func(&full, MODULE, kernels::ptx(MODULE, PRELUDE, SRC)?)?;
    let blocks = n.div_ceil(256).clamp(1, 65_535 * 16) as u32;
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let n64 = n as u64;
    let mut lb = func.builder();
    for p in ptrs {
        lb.arg(p);
    }
    lb.arg(&n64);
    for v in u64s {
        lb.arg(v);
    }
    for v in f32s {
        lb.arg(v);
    }
    // SAFETY: the pointers address at least `n` elements of the kernel's element type, and the
    // trailing arguments match the kernel signatures in SRC.
    unsafe { lb.launch(cfg) }.map_err(kernels::err)?;
    Ok(())
}

/// `A` (r, in) or `s B` (out, r), f32 masters, in the compute dtype.
fn cast(dev: &CudaDevice, src: &Buf, n: usize, dt: DType, scale: f64) -> Result<Buf> {
    if src.dt != DType::F32 {
        candle_core::bail!(
            "lora cuda: adapter weights must be f32 masters, got {:?}",
            src.dt
        );
    }
    let out = Buf::alloc(dev, dt, n)?;
    launch(
        dev,
        "lora_cast",
        dt,
        n,
        &[src.ptr, out.ptr],
        &[],
        &[scale as f32],
    )?;
    Ok(out)
}

/// Dropout parameters of the kernels: (seed, threshold on the top 24 hash bits, 1/(1-p)).
fn dropout_args(op: &LoraProjection) -> (u64, u64, f32) {
    (
        op.seed,
        (op.dropout * 16_777_216.0).round() as u64,
        (1.0 / (1.0 - op.dropout)) as f32,
    )
}

/// `d(x)`, or `x` itself (borrowed) without dropout.
fn dropped(dev: &CudaDevice, op: &LoraProjection, x: &Buf, n: usize) -> Result<Buf> {
    if op.dropout <= 0.0 {
        return Ok(Buf {
            ptr: x.ptr,
            dt: x.dt,
            owned: None,
        });
    }
    let out = Buf::alloc(dev, x.dt, n)?;
    let (seed, thr, inv) = dropout_args(op);
    launch(
        dev,
        "lora_dropout",
        x.dt,
        n,
        &[x.ptr, out.ptr],
        &[seed, thr],
        &[inv],
    )?;
    Ok(out)
}

/// The base weight (out, in) in `dt` (NF4: a fresh dequantised copy) and its bias.
fn base_weight(base: &BaseLinear, dt: DType) -> Result<(Tensor, Option<Tensor>)> {
    let w = base.weight(dt)?.contiguous()?;
    let b = base
        .bias()
        .map(|b| b.to_dtype(dt)?.contiguous())
        .transpose()?;
    Ok((w, b))
}

/// Forward on CUDA storages: `x` (tokens, in), `A` (r, in) f32, `B` (out, r) f32, all
/// contiguous. Returns `y` (tokens, out) in `x`'s dtype.
///
/// Errors: shapes that do not match the base weight, unsupported dtypes, device errors.
pub(crate) fn forward(
    op: &LoraProjection,
    (sx, lx): (&CudaStorage, &Layout),
    (sa, la): (&CudaStorage, &Layout),
    (sb, lb): (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let dev = sx.device().clone();
    let dt = sx.dtype();
    let (tokens, inp) = lx.shape().dims2()?;
    let (r, inp_a) = la.shape().dims2()?;
    let (out, r_b) = lb.shape().dims2()?;
    let (w_out, w_in) = op.base.shape();
    if inp_a != inp || r_b != r || w_in != inp || w_out != out {
        candle_core::bail!(
            "lora cuda: x {:?}, A {:?}, B {:?}, base ({w_out}, {w_in})",
            lx.shape(),
            la.shape(),
            lb.shape()
        );
    }
    if sa.dtype() != DType::F32 || sb.dtype() != DType::F32 {
        candle_core::bail!("lora cuda: adapter weights must be f32 masters");
    }
    let x = Buf::view(sx, lx)?;
    let y = Buf::alloc(&dev, dt, tokens * out)?;
    let (w, bias) = base_weight(&op.base, dt)?;
    let beta = match &bias {
        Some(b) if b.elem_count() != out => {
            candle_core::bail!("lora cuda: bias {:?} for {out} outputs", b.shape())
        }
        Some(b) => {
            let b = Buf::of(b)?;
            let ptrs = [y.ptr, b.ptr];
            launch(
                &dev,
                "lora_bias_rows",
                dt,
                tokens * out,
                &ptrs,
                &[out as u64],
                &[],
            )?;
            1.0
        }
        None => 0.0,
    };
    gemm(
        &dev,
        (tokens, out, inp),
        &x,
        false,
        &Buf::of(&w)?,
        true,
        &y,
        1.0,
        beta,
    )?;
    drop(w);
    let ac = cast(&dev, &Buf::view(sa, la)?, r * inp, dt, 1.0)?;
    let bc = cast(&dev, &Buf::view(sb, lb)?, out * r, dt, op.scale)?;
    let xd = dropped(&dev, op, &x, tokens * inp)?;
    let u = Buf::alloc(&dev, dt, tokens * r)?;
    gemm(&dev, (tokens, r, inp), &xd, false, &ac, true, &u, 1.0, 0.0)?;
    gemm(&dev, (tokens, out, r), &u, false, &bc, true, &y, 1.0, 1.0)?;
    y.owned
        .ok_or_else(|| candle_core::Error::Msg("lora cuda: output not owned".into()))
}

/// Backward on detached CUDA tensors: `x` (tokens, in), `a` (r, in) f32, `b` (out, r) f32,
/// `dy` (tokens, out). Returns `(dx, dA, dB)`: `dx` in `x`'s dtype, `dA`, `dB` f32.
///
/// Errors: shapes that do not match, unsupported dtypes, device errors.
pub(crate) fn backward(
    op: &LoraProjection,
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    dy: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let candle_core::Device::Cuda(dev) = x.device() else {
        candle_core::bail!("lora cuda: expected a CUDA tensor");
    };
    let dt = x.dtype();
    let x = x.contiguous()?;
    let dy = dy.to_dtype(dt)?.contiguous()?;
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let (tokens, inp) = x.dims2()?;
    let (r, _) = a.dims2()?;
    let (out, r_b) = b.dims2()?;
    if dy.dims2()? != (tokens, out)
        || a.dims2()? != (r, inp)
        || r_b != r
        || op.base.shape() != (out, inp)
        || a.dtype() != DType::F32
        || b.dtype() != DType::F32
    {
        candle_core::bail!(
            "lora cuda backward: x {:?}, dy {:?}, A {:?}, B {:?}",
            x.shape(),
            dy.shape(),
            a.shape(),
            b.shape()
        );
    }
    let (xb, dyb) = (Buf::of(&x)?, Buf::of(&dy)?);
    let dx = Buf::alloc(dev, dt, tokens * inp)?;
    let w = op.base.weight(dt)?.contiguous()?;
    gemm(
        dev,
        (tokens, inp, out),
        &dyb,
        false,
        &Buf::of(&w)?,
        false,
        &dx,
        1.0,
        0.0,
    )?;
    drop(w);
    let ac = cast(dev, &Buf::of(&a)?, r * inp, dt, 1.0)?;
    let bc = cast(dev, &Buf::of(&b)?, out * r, dt, op.scale)?;
    let xd = dropped(dev, op, &xb, tokens * inp)?;
    let u = Buf::alloc(dev, dt, tokens * r)?;
    gemm(dev, (tokens, r, inp), &xd, false, &ac, true, &u, 1.0, 0.0)?;
    let du = Buf::alloc(dev, dt, tokens * r)?;
    gemm(
        dev,
        (tokens, r, out),
        &dyb,
        false,
        &bc,
        false,
        &du,
        1.0,
        0.0,
    )?;
    let db = Buf::alloc(dev, DType::F32, out * r)?;
    gemm(
        dev,
        (out, r, tokens),
        &dyb,
        true,
        &u,
        false,
        &db,
        op.scale as f32,
        0.0,
    )?;
    let da = Buf::alloc(dev, DType::F32, r * inp)?;
    gemm(dev, (r, inp, tokens), &du, true, &xd, false, &da, 1.0, 0.0)?;
    drop(xd);
    if op.dropout > 0.0 {
        let t = Buf::alloc(dev, dt, tokens * inp)?;
        gemm(dev, (tokens, inp, r), &du, false, &ac, false, &t, 1.0, 0.0)?;
        let (seed, thr, inv) = dropout_args(op);
        let ptrs = [dx.ptr, t.ptr];
        launch(
            dev,
            "lora_dropout_add",
            dt,
            tokens * inp,
            &ptrs,
            &[seed, thr],
            &[inv],
        )?;
    } else {
        gemm(dev, (tokens, inp, r), &du, false, &ac, false, &dx, 1.0, 1.0)?;
    }
    Ok((
        dx.into_tensor((tokens, inp))?,
        da.into_tensor((r, inp))?,
        db.into_tensor((out, r))?,
    ))
}
