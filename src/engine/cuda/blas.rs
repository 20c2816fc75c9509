//! Row-major cuBLAS GEMMs on [`Buf`]s (`--features cuda`): `C = alpha op(A) op(B) + beta C`
//! with f32 accumulation (`CUBLAS_COMPUTE_32F`, as PyTorch's default for 16-bit matmuls), one
//! matrix or a strided batch of them, on candle's cuBLAS handle and stream. The direct LoRA
//! projection (`lora/cuda.rs`) and the direct attention (`ops/attention/direct.rs`) call it.

use super::launch::{Buf, err};
use candle_core::cuda_backend::cudarc::cublas::{result as blas, sys as bsys};
use candle_core::{CudaDevice, DType, Result};

fn blas_type(dt: DType) -> Result<bsys::cudaDataType> {
    Ok(match dt {
        DType::F32 => bsys::cudaDataType::CUDA_R_32F,
        DType::F16 => bsys::cudaDataType::CUDA_R_16F,
        DType::BF16 => bsys::cudaDataType::CUDA_R_16BF,
        other => candle_core::bail!("cuBLAS: unsupported dtype {other:?}"),
    })
}

/// One operand of [`gemm_batched`]: row-major storage, `trans` when the stored matrix is the
/// transpose of the operand, `ld` its row stride and `stride` the elements between batch
/// members (both in elements).
#[derive(Clone, Copy)]
pub(crate) struct Operand<'a> {
    pub buf: &'a Buf,
    pub trans: bool,
    pub ld: usize,
    pub stride: usize,
}

impl<'a> Operand<'a> {
    /// A compact operand: row stride `ld`, batch members `stride` apart.
    pub(crate) fn new(buf: &'a Buf, trans: bool, ld: usize, stride: usize) -> Self {
        Self {
            buf,
            trans,
            ld,
            stride,
        }
    }
}

/// `batch` row-major products `C_i (m x n) = alpha op(A_i) op(B_i) + beta C_i`, `op(A)` (m x k)
/// and `op(B)` (k x n); `c` is the output with row stride `ldc` and batch stride `stride_c`.
/// cuBLAS is column-major, so this computes `C^T = op(B)^T op(A)^T`. Inputs in f32/f16/bf16,
/// the output in any of them (f32 output of 16-bit inputs accumulates in f32 without a
/// rounding in between). One member is a plain `cublasGemmEx`.
///
/// Errors: a dimension over `i32`, an unsupported dtype, a cuBLAS failure.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_batched(
    dev: &CudaDevice,
    (m, n, k): (usize, usize, usize),
    batch: usize,
    a: Operand,
    b: Operand,
    (c, ldc, stride_c): (&Buf, usize, usize),
    alpha: f32,
    beta: f32,
) -> Result<()> {
    use bsys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
    let dim = |v: usize| i32::try_from(v).map_err(err);
    let stride = |v: usize| i64::try_from(v).map_err(err);
    let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
    let handle = dev.cublas_handle();
    if batch == 1 {
        // SAFETY: as below, one member.
        return unsafe {
            blas::gemm_ex(
                *handle.handle(),
                op(b.trans),
                op(a.trans),
                dim(n)?,
                dim(m)?,
                dim(k)?,
                &alpha as *const f32 as *const _,
                b.buf.ptr() as *const _,
                blas_type(b.buf.dtype())?,
                dim(b.ld)?,
                a.buf.ptr() as *const _,
                blas_type(a.buf.dtype())?,
                dim(a.ld)?,
                &beta as *const f32 as *const _,
                c.ptr() as *mut _,
                blas_type(c.dtype())?,
                dim(ldc)?,
                bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
            )
        }
        .map_err(err);
    }
    // SAFETY: the callers size every buffer for `batch` members of their shapes, strides and
    // row strides, and keep them alive until the stream has run the call; alpha/beta are f32
    // as CUBLAS_COMPUTE_32F requires.
    unsafe {
        blas::gemm_strided_batched_ex(
            *handle.handle(),
            op(b.trans),
            op(a.trans),
            dim(n)?,
            dim(m)?,
            dim(k)?,
            &alpha as *const f32 as *const _,
            b.buf.ptr() as *const _,
            blas_type(b.buf.dtype())?,
            dim(b.ld)?,
            stride(b.stride)?,
            a.buf.ptr() as *const _,
            blas_type(a.buf.dtype())?,
            dim(a.ld)?,
            stride(a.stride)?,
            &beta as *const f32 as *const _,
            c.ptr() as *mut _,
            blas_type(c.dtype())?,
            dim(ldc)?,
            stride(stride_c)?,
            dim(batch)?,
            bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
        )
    }
    .map_err(err)
}

/// One compact row-major product: `C (m x n) = alpha op(A) op(B) + beta C`, `op(A)` (m x k),
/// stored (k x m) when `ta`; `op(B)` (k x n), stored (n x k) when `tb`.
///
/// Errors: as [`gemm_batched`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
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
    let a = Operand::new(a, ta, if ta { m } else { k }, m * k);
    let b = Operand::new(b, tb, if tb { k } else { n }, k * n);
    gemm_batched(dev, (m, n, k), 1, a, b, (c, n, m * n), alpha, beta)
}
