//! A strided view made contiguous, differentiably: [`row_copy`] is `x.contiguous()` (PyTorch
//! `.contiguous()`, the identity on values; backward passes the gradient through), with a CUDA
//! kernel for the 4-D views attention makes (`(b, t, h, d)` seen as `(b, h, t, d)`, and the
//! reverse; a query chunk `narrow(2, q0, tq)` of `(b, h, t, d)`): rows of `d` contiguous
//! elements gathered with 16-byte accesses (`cuda/kernels/row_copy.cu`). Every other view, and
//! every view on the CPU, is copied by candle.

#[cfg(feature = "cuda")]
use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use candle_core::{Result, Tensor};

/// `x` as a contiguous tensor of the same shape and dtype: `x` itself (a cheap clone) when it
/// already is, else a copy. Tracked inputs stay tracked (the gradient passes through).
///
/// Errors: device errors.
pub fn row_copy(x: &Tensor) -> Result<Tensor> {
    if x.is_contiguous() {
        return Ok(x.clone());
    }
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && cuda::enabled() && cuda::plan(x.layout(), x.dtype()).is_some() {
        return if x.track_op() {
            x.apply_op1(RowCopy)
        } else {
            x.apply_op1_no_bwd(&RowCopy)
        };
    }
    x.contiguous()
}

/// The CUDA row-copy as a candle op (only built for views [`cuda::plan`] accepts).
#[cfg(feature = "cuda")]
struct RowCopy;

#[cfg(feature = "cuda")]
impl CustomOp1 for RowCopy {
    fn name(&self) -> &'static str {
        "row-copy"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("row-copy: the CPU copies through candle (ops::row_copy)")
    }

    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda::copy(s, l)?, l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.clone()))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    //! Launcher of `cuda/kernels/row_copy.cu`.
    use crate::engine::cuda::launch::{Arg, Buf, Module, launch};
    use crate::engine::cuda::{kernel_name, source};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
    use candle_core::{CudaStorage, DType, Layout, Result};

    static MODULE: Module = Module::new("lorascope_row_copy", source::ROW_COPY);

    /// `LORASCOPE_ROW_COPY=0` leaves every copy to candle (A/B timing; same values). Read once.
    pub(super) fn enabled() -> bool {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        crate::engine::cuda::kernel_switch(&ON, "LORASCOPE_ROW_COPY")
    }

    /// (dims, strides, offset) of a 4-D view the kernel copies: unit stride on the last
    /// dimension, which with the other strides and the offset is a multiple of 8 elements;
    /// f32, f16 or bf16. None for anything else.
    pub(super) fn plan(l: &Layout, dt: DType) -> Option<([usize; 4], [usize; 3], usize)> {
        if !matches!(dt, DType::F32 | DType::F16 | DType::BF16) {
            return None;
        }
        let (dims, st) = (l.dims(), l.stride());
        if dims.len() != 4 || st[3] != 1 || dims.contains(&0) {
            return None;
        }
        let eight = |v: usize| v.is_multiple_of(8);
        if ![dims[3], st[0], st[1], st[2], l.start_offset()]
            .into_iter()
            .all(eight)
        {
            return None;
        }
        Some((
            [dims[0], dims[1], dims[2], dims[3]],
            [st[0], st[1], st[2]],
            l.start_offset(),
        ))
    }

    /// The contiguous copy of the view `l` of `s`.
    ///
    /// Errors: a view [`plan`] refuses, misaligned buffers, device errors.
    pub(super) fn copy(s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
        let Some((d, st, off)) = plan(l, s.dtype()) else {
            candle_core::bail!(
                "row-copy: unsupported view {:?} / {:?}",
                l.dims(),
                l.stride()
            );
        };
        let extent = off + (0..3).map(|i| (d[i] - 1) * st[i]).sum::<usize>() + d[3];
        let x = Buf::view(s, (off, extent))?;
        let n = d.iter().product::<usize>();
        let y = Buf::alloc(s.device(), s.dtype(), n)?;
        if !(x.ptr().is_multiple_of(16) && y.ptr().is_multiple_of(16)) {
            candle_core::bail!("row-copy: buffers not 16-byte aligned");
        }
        let n8 = n / 8;
        let blocks = u32::try_from(n8.div_ceil(256).max(1))
            .map_err(|_| candle_core::Error::Msg("row-copy: too many elements".into()))?;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let u = |v: usize| Arg::U64(v as u64);
        let args = [
            x.arg(),
            y.arg(),
            u(n8),
            u(d[3] / 8),
            u(d[1]),
            u(d[2]),
            u(st[0]),
            u(st[1]),
            u(st[2]),
        ];
        let name = kernel_name("row_copy8", s.dtype(), "row-copy")?;
        launch(s.device(), &MODULE, &name, cfg, &args)?;
        y.into_storage()
    }
}
