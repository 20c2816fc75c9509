//! Fused CUDA optimizer updates for [`super::AdamW`] and [`super::AdamW8bit`]
//! (`--features cuda`), kernels in `cuda/kernels/optim.cu`:
//!
//! - `lorascope_adamw32`: one pass over f32 parameter, gradient and moments, in f32 with the
//!   exact operation order of the candle tensor ops in [`super::AdamW::step`]
//!   (bitsandbytes' `kOptimizer32bit2State` does the same update).
//! - `lorascope_adamw_f32state`: the same update in f64, as the host loop of
//!   [`super::AdamW8bit`] does for tensors that keep f32 state.
//! - `lorascope_adamw8_blockwise`: bitsandbytes' `kOptimizerStatic8bit2StateBlockwise` scheme
//!   as the host implementation does it: one thread block per 256-element quantisation block;
//!   each thread dequantises its first moment (signed dynamic map) and second moment
//!   (unsigned dynamic map), updates in f64, the block reduces the new absolute maxima, and
//!   each thread requantises to the nearest map entry (binary search, ties to the lower
//!   entry, NaN as 0) and writes its code; thread 0 writes the two absmax values.
//! - `*_multi`: each of the three over a table of tensors in one launch
//!   ([`crate::engine::cuda::launch::TensorTable`]), the same device function per element or
//!   quantisation block; [`GpuStates::step_all`] uses them unless `LORASCOPE_MULTI_TENSOR=0`.
//!
//! The module is compiled with `--fmad=false`, so no multiply-add is contracted and the GPU
//! arithmetic rounds as the CPU's does: the self-test (`lorascope selftest optim`) measures 0
//! difference from the CPU optimizers (its pass threshold, 1e-5, leaves room for an 8-bit
//! code landing on the other side of a tie).
//!
//! Parameters are updated in place through candle's `InplaceOp2` (no copy of the variable).
//! State lives in [`RawBuf`]s: ordinary device memory, or CUDA unified memory for the paged
//! optimizers' tensors of at least [`super::MIN_PAGED_SIZE`] elements, prefetched to the device
//! on the compute stream before each update.

use super::AdamWConfig;
use super::state::{STATE_BLOCK, StateBytes, state_is_paged, state_is_quantized};
use crate::engine::cuda::launch::{
    Arg, Buf, Module, TensorTable, constant_table, err, launch, per_row, table_arg,
};
use crate::engine::cuda::source;
use crate::engine::cuda::vram::{RawBuf, mib};
use crate::engine::nf4::blockwise::dynamic_map;
use crate::engine::ops::contiguous_range;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig};
use candle_core::{CpuStorage, CudaStorage, DType, InplaceOp2, Layout, Result, Tensor, Var};

/// The optimizer kernels, compiled with `--fmad=false` (see the module docs).
static MODULE: Module = Module::new("lorascope_optim", source::OPTIM)
    .with_header(header)
    .without_fmad();

/// The 8-bit state maps and the block size of `optim.cu`.
fn header() -> String {
    format!(
        "{}{}#define STATE_BLOCK {STATE_BLOCK}\n",
        constant_table("QMAP_S", &dynamic_map(true)),
        constant_table("QMAP_U", &dynamic_map(false)),
    )
}

/// Thread blocks per gradient in [`sum_squares`] (fewer for small tensors).
const SUMSQ_MAX_BLOCKS: usize = 64;

/// `sum((g * factor)^2)` over every element of the f32 CUDA tensors `grads`, in f64: one
/// multi-tensor launch (one per tensor with `LORASCOPE_MULTI_TENSOR=0`; the same partials)
/// writes one partial sum per thread block, and the host adds the partials in order after a
/// single read-back, so the result is the same on every run (no atomics). The
/// global gradient norm's square, for clipping and overflow detection; inf/NaN gradients give
/// inf/NaN.
///
/// Errors: a tensor that is not f32 on `grads[0]`'s CUDA device, launch or copy failures.
pub(crate) fn sum_squares(grads: &[&Tensor], factor: f64) -> Result<f64> {
    let Some(first) = grads.first() else {
        return Ok(0.0);
    };
    let candle_core::Device::Cuda(dev) = first.device() else {
        candle_core::bail!("sum_squares: expected CUDA tensors");
    };
    let blocks_of = |n: usize| n.div_ceil(256).clamp(1, SUMSQ_MAX_BLOCKS);
    let mut total_blocks = 0;
    for g in grads {
        if !g.device().same_device(first.device()) || g.dtype() != DType::F32 {
            candle_core::bail!("sum_squares: every gradient must be f32 on one CUDA device");
        }
        total_blocks += blocks_of(g.elem_count());
    }
    let partials = dev.alloc_zeros::<f64>(total_blocks.max(1))?;
    let base = partials.device_ptr(&dev.cuda_stream()).0;
    if multi_tensor() {
        // One launch: partial[j] is what the per-tensor launch below writes for block j.
        let mut table = TensorTable::new(3);
        let mut keep = Vec::with_capacity(grads.len());
        for g in grads {
            let g = g.contiguous()?;
            let n = g.elem_count();
            let ptr = device_ptr(&g, n, "gradient")?;
            let blocks = blocks_of(n) as u64;
            table.push(&[ptr, n as u64, blocks], blocks)?;
            keep.push(g);
        }
        let (rows, count, cfg) = table.upload(dev, 256)?;
        let args = [
            table_arg(dev, &rows),
            count,
            Arg::F64(factor),
            Arg::Ptr(base),
        ];
        launch(dev, &MODULE, "lorascope_sumsq_multi", cfg, &args)?;
        let host = dev.clone_dtoh(&partials)?;
        drop(keep);
        return Ok(host.iter().sum());
    }
    let mut offset = 0;
    for g in grads {
        let g = g.contiguous()?;
        let (s, l) = g.storage_and_layout();
        let candle_core::Storage::Cuda(c) = &*s else {
            candle_core::bail!("sum_squares: expected CUDA tensors");
        };
        let (a, b) = range(l, l.shape().elem_count(), "gradient")?;
        let blocks = blocks_of(b - a);
        let out = Arg::Ptr(base + (offset * std::mem::size_of::<f64>()) as u64);
        offset += blocks;
        if a == b {
            continue;
        }
        let n = (b - a) as u64;
        let cfg = per_row(blocks, 256);
        // `view` holds n f32 values and `out` one f64 per block of the grid.
        let args = [
            Buf::view(c, (a, b))?.arg(),
            Arg::U64(n),
            Arg::F64(factor),
            out,
        ];
        launch(dev, &MODULE, "lorascope_sumsq", cfg, &args)?;
    }
    let host = dev.clone_dtoh(&partials)?;
    Ok(host.iter().sum())
}

/// Update arithmetic: `F32` is [`super::AdamW`]'s (f32 tensor ops), `F64` is
/// [`super::AdamW8bit`]'s host loop (f64).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Math {
    F32,
    F64,
}

/// One step's scalars, f64 as the CPU computes them.
#[derive(Debug, Clone, Copy)]
pub(super) struct Hyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// `1 - beta1^t`.
    pub bc1: f64,
    /// `1 - beta2^t`.
    pub bc2: f64,
    /// Gradient multiplier (unscaling times clipping).
    pub grad_scale: f64,
}

impl Hyper {
    /// The scalars of one step with learning rate `lr`, bias corrections `bc1 = 1 - beta1^t`,
    /// `bc2 = 1 - beta2^t` and gradient multiplier `grad_scale`.
    pub(super) fn new(c: &AdamWConfig, lr: f64, bc1: f64, bc2: f64, grad_scale: f64) -> Self {
        Self {
            lr,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            weight_decay: c.weight_decay,
            bc1,
            bc2,
            grad_scale,
        }
    }
}

/// One variable's state on the GPU.
enum Slot {
    /// f32 moments.
    F32 { m: RawBuf, v: RawBuf },
    /// u8 codes and f32 absmax per [`STATE_BLOCK`], for m and v.
    Q8 {
        mc: RawBuf,
        ma: RawBuf,
        vc: RawBuf,
        va: RawBuf,
    },
}

impl Slot {
    fn bufs(&self) -> Vec<&RawBuf> {
        match self {
            Slot::F32 { m, v } => vec![m, v],
            Slot::Q8 { mc, ma, vc, va } => vec![mc, ma, vc, va],
        }
    }
}

/// The GPU state of one optimizer: a [`Slot`] per variable, all on the variables' device.
pub(crate) struct GpuStates {
    slots: Vec<Slot>,
    paged: Vec<bool>,
}

impl GpuStates {
    /// Allocate zeroed state for `vars` (f32, on one CUDA device): 8-bit block-wise moments for
    /// tensors of at least `MIN_8BIT_SIZE` elements when `quantize`, f32 otherwise; unified
    /// memory for tensors of at least [`super::MIN_PAGED_SIZE`] elements when `paged`.
    ///
    /// Errors: the paged state would not fit in the device's free memory (one line, sizes and
    /// what to do), or an allocation fails (out of memory).
    pub(crate) fn new(vars: &[Var], quantize: bool, paged: bool) -> Result<Self> {
        let Some(first) = vars.first() else {
            return Ok(Self {
                slots: Vec::new(),
                paged: Vec::new(),
            });
        };
        let dev = first.device().as_cuda_device()?.clone();
        let stream = dev.cuda_stream();
        let ctx = stream.context().clone();
        let sizes = |n: usize| -> Vec<usize> {
            if quantize && state_is_quantized(n) {
                let blocks = n.div_ceil(STATE_BLOCK);
                vec![n, 4 * blocks, n, 4 * blocks]
            } else {
                vec![4 * n, 4 * n]
            }
        };
        // bitsandbytes pages a tensor's state only from 1e5 elements; never ask the driver for
        // more managed memory than the card reports free.
        let managed_total: usize = vars
            .iter()
            .filter(|v| state_is_paged(v.elem_count(), paged))
            .map(|v| sizes(v.elem_count()).iter().sum::<usize>())
            .sum();
        if managed_total > 0 {
            ctx.bind_to_thread().map_err(err)?;
            let (free, _) = cudarc::driver::result::mem_get_info().map_err(err)?;
            if managed_total > free {
                candle_core::bail!(
                    "paged optimizer out of memory: its state needs {} of CUDA managed memory but the GPU reports only {} free (bitsandbytes would page it out; lorascope never asks for more managed memory than is free); use a smaller --lora-rank or a larger --vram-limit",
                    mib(managed_total as u64),
                    mib(free as u64)
                );
            }
        }
        let alloc = |bytes: usize, managed: bool| -> Result<RawBuf> {
            let b = if managed {
                RawBuf::managed(&ctx, bytes)
            } else {
                RawBuf::device(&ctx, bytes)
            }
            .map_err(|e| {
                candle_core::Error::Msg(format!(
                    "allocating {} of optimizer state: {e}",
                    mib(bytes as u64)
                ))
            })?;
            b.zero(&stream).map_err(err)?;
            Ok(b)
        };
        let mut slots = Vec::with_capacity(vars.len());
        let mut paged_flags = Vec::with_capacity(vars.len());
        for var in vars {
            if var.dtype() != DType::F32 || !var.device().same_device(first.device()) {
                candle_core::bail!("optimizer variables must be f32 on one CUDA device");
            }
            let n = var.elem_count();
            let managed = state_is_paged(n, paged);
            let s = sizes(n);
            let slot = if s.len() == 4 {
                Slot::Q8 {
                    mc: alloc(s[0], managed)?,
                    ma: alloc(s[1], managed)?,
                    vc: alloc(s[2], managed)?,
                    va: alloc(s[3], managed)?,
                }
            } else {
                Slot::F32 {
                    m: alloc(s[0], managed)?,
                    v: alloc(s[1], managed)?,
                }
            };
            slots.push(slot);
            paged_flags.push(managed);
        }
        stream.synchronize().map_err(err)?;
        Ok(Self {
            slots,
            paged: paged_flags,
        })
    }

    /// Bytes held, split into ordinary device memory and unified (managed) memory.
    pub(crate) fn bytes(&self) -> StateBytes {
        let mut out = StateBytes::default();
        for b in self.slots.iter().flat_map(Slot::bufs) {
            if b.is_managed() {
                out.managed += b.bytes();
            } else {
                out.device += b.bytes();
            }
        }
        out
    }

    /// Whether variable `i`'s state is in unified memory.
    pub(crate) fn is_paged(&self, i: usize) -> bool {
        self.paged[i]
    }

    /// Whether variable `i`'s state is 8-bit.
    pub(crate) fn is_quantized(&self, i: usize) -> bool {
        matches!(self.slots[i], Slot::Q8 { .. })
    }

    /// Update every variable of `vars` (index `i` owning state slot `i`) that has a gradient
    /// in `grads`, in place; the others stay as they are.
    ///
    /// By default in at most two launches (one over the f32-state tensors, one over the
    /// 8-bit ones: [`TensorTable`] kernels computing per element exactly what the per-tensor
    /// kernels compute); with `LORASCOPE_MULTI_TENSOR=0`, one launch per tensor.
    pub(crate) fn step_all(
        &self,
        vars: &[Var],
        grads: &candle_core::backprop::GradStore,
        math: Math,
        h: &Hyper,
    ) -> Result<()> {
        if !multi_tensor() {
            for (i, var) in vars.iter().enumerate() {
                if let Some(g) = grads.get(var.as_tensor()) {
                    self.step_var(i, var, g, math, h)?;
                }
            }
            return Ok(());
        }
        let Some(first) = vars.first() else {
            return Ok(());
        };
        let dev = first.device().as_cuda_device()?.clone();
        let stream = dev.cuda_stream();
        let mut f32_rows = TensorTable::new(5);
        let mut q8_rows = TensorTable::new(7);
        // The f32 gradients stay alive until both launches are queued.
        let mut keep = Vec::with_capacity(vars.len());
        for (i, var) in vars.iter().enumerate() {
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            let n = var.elem_count();
            let g = grad.to_dtype(DType::F32)?.contiguous()?;
            let gp = device_ptr(&g, n, "gradient")?;
            // The kernel writes the parameter in place, as `StepOp` does through candle's
            // `InplaceOp2`: no host-side reference to its data exists meanwhile.
            let pp = device_ptr(var.as_tensor(), n, "parameter")?;
            let slot = &self.slots[i];
            for b in slot.bufs() {
                b.prefetch(&stream).map_err(err)?;
            }
            let blocks = n.div_ceil(256).max(1) as u64;
            match slot {
                Slot::F32 { m, v } => {
                    f32_rows.push(&[pp, gp, m.ptr(), v.ptr(), n as u64], blocks)?
                }
                Slot::Q8 { mc, ma, vc, va } => q8_rows.push(
                    &[pp, gp, mc.ptr(), ma.ptr(), vc.ptr(), va.ptr(), n as u64],
                    n.div_ceil(STATE_BLOCK).max(1) as u64,
                )?,
            }
            keep.push(g);
        }
        if !f32_rows.is_empty() {
            let (rows, count, cfg) = f32_rows.upload(&dev, 256)?;
            let mut args = vec![table_arg(&dev, &rows), count];
            let kernel = match math {
                Math::F32 => {
                    args.extend(f32_scalars(h));
                    "lorascope_adamw32_multi"
                }
                Math::F64 => {
                    args.extend(f64_scalars(h));
                    "lorascope_adamw_f32state_multi"
                }
            };
            launch(&dev, &MODULE, kernel, cfg, &args)?;
        }
        if !q8_rows.is_empty() {
            let (rows, count, cfg) = q8_rows.upload(&dev, STATE_BLOCK as u32)?;
            let mut args = vec![table_arg(&dev, &rows), count];
            args.extend(f64_scalars(h));
            launch(
                &dev,
                &MODULE,
                "lorascope_adamw8_blockwise_multi",
                cfg,
                &args,
            )?;
        }
        drop(keep);
        Ok(())
    }

    /// Update variable `i` in place from `grad` (any float dtype, same shape).
    fn step_var(&self, i: usize, var: &Var, grad: &Tensor, math: Math, h: &Hyper) -> Result<()> {
        let g = grad.to_dtype(DType::F32)?.contiguous()?;
        let op = StepOp {
            slot: &self.slots[i],
            n: var.elem_count(),
            math,
            h: *h,
        };
        var.as_tensor().inplace_op2(&g, &op)
    }
}

/// Whether the optimizer and the gradient norm run as multi-tensor launches (on unless
/// `LORASCOPE_MULTI_TENSOR=0`, read once; both forms compute the same bits).
fn multi_tensor() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    crate::engine::cuda::kernel_switch(&ON, "LORASCOPE_MULTI_TENSOR")
}

/// The f32 kernels' (`lorascope_adamw32*`) scalars after the tensors: gradient scale, beta1,
/// 1 - beta1, beta2, 1 - beta2, the reciprocals of the two bias corrections, eps, the decay
/// factor `1 - lr * weight_decay` and the learning rate, each rounded to f32.
fn f32_scalars(h: &Hyper) -> [Arg; 10] {
    [
        h.grad_scale,
        h.beta1,
        1.0 - h.beta1,
        h.beta2,
        1.0 - h.beta2,
        1.0 / h.bc1,
        1.0 / h.bc2,
        h.eps,
        1.0 - h.lr * h.weight_decay,
        h.lr,
    ]
    .map(|x| Arg::F32(x as f32))
}

/// The f64 kernels' scalars after the tensors: gradient scale, beta1, 1 - beta1, beta2,
/// 1 - beta2, the two bias corrections, eps, the decay factor `1 - lr * weight_decay` and the
/// learning rate.
fn f64_scalars(h: &Hyper) -> [Arg; 10] {
    let decay = 1.0 - h.lr * h.weight_decay;
    [
        h.grad_scale,
        h.beta1,
        1.0 - h.beta1,
        h.beta2,
        1.0 - h.beta2,
        h.bc1,
        h.bc2,
        h.eps,
        decay,
        h.lr,
    ]
    .map(Arg::F64)
}

/// The device address of the contiguous f32 CUDA tensor `t` of `n` elements.
///
/// Errors: another device or dtype, a layout that is not contiguous with `n` elements.
fn device_ptr(t: &Tensor, n: usize, what: &str) -> Result<u64> {
    let (s, l) = t.storage_and_layout();
    let candle_core::Storage::Cuda(c) = &*s else {
        candle_core::bail!("optimizer: the {what} is not on a CUDA device");
    };
    if c.dtype() != DType::F32 {
        candle_core::bail!("optimizer: the {what} must be f32");
    }
    Ok(Buf::view(c, range(l, n, what)?)?.ptr())
}

/// The in-place update of one parameter tensor (dst) from its gradient (src).
struct StepOp<'a> {
    slot: &'a Slot,
    n: usize,
    math: Math,
    h: Hyper,
}

/// The contiguous range of `l`, which must hold `n` elements.
fn range(l: &Layout, n: usize, what: &str) -> Result<(usize, usize)> {
    match contiguous_range(l, what) {
        Ok((a, b)) if b - a == n => Ok((a, b)),
        _ => candle_core::bail!("optimizer: {what} must be contiguous with {n} elements"),
    }
}

impl InplaceOp2 for StepOp<'_> {
    fn name(&self) -> &'static str {
        "lorascope-optimizer-step"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        candle_core::bail!("the fused optimizer step runs on CUDA only (CPU uses AdamW::step)")
    }

    fn cuda_fwd(
        &self,
        s1: &mut CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        let dev = s1.device().clone();
        let stream = dev.cuda_stream();
        for b in self.slot.bufs() {
            b.prefetch(&stream).map_err(err)?;
        }
        let (pa, pb) = range(l1, self.n, "parameter")?;
        let (ga, gb) = range(l2, self.n, "gradient")?;
        let g = Buf::view(s2, (ga, gb))?.arg();
        let p = Buf::view_mut_f32(s1, (pa, pb))?.arg();
        let n = Arg::U64(self.n as u64);
        let h = self.h;
        // One thread per element, grid-stride beyond 2^30 elements.
        let elementwise = LaunchConfig::for_num_elems((self.n.min(1 << 30) as u32).max(1));
        match (self.slot, self.math) {
            (Slot::F32 { m, v }, Math::F32) => {
                let mut args = vec![p, g, Arg::Ptr(m.ptr()), Arg::Ptr(v.ptr()), n];
                args.extend(f32_scalars(&h));
                // m and v hold n f32 each; work is ordered on candle's stream.
                launch(&dev, &MODULE, "lorascope_adamw32", elementwise, &args)?;
            }
            (slot, _) => {
                let scalars = f64_scalars(&h);
                match slot {
                    Slot::F32 { m, v } => {
                        let mut args = vec![p, g, Arg::Ptr(m.ptr()), Arg::Ptr(v.ptr()), n];
                        args.extend(scalars);
                        launch(
                            &dev,
                            &MODULE,
                            "lorascope_adamw_f32state",
                            elementwise,
                            &args,
                        )?;
                    }
                    Slot::Q8 { mc, ma, vc, va } => {
                        let mut args = vec![p, g];
                        args.extend([mc, ma, vc, va].map(|b| Arg::Ptr(b.ptr())));
                        args.push(n);
                        args.extend(scalars);
                        // Codes hold n bytes, absmax ceil(n/256) f32; one block per 256-block.
                        let blocks = per_row(self.n.div_ceil(STATE_BLOCK), STATE_BLOCK as u32);
                        launch(&dev, &MODULE, "lorascope_adamw8_blockwise", blocks, &args)?;
                    }
                }
            }
        }
        Ok(())
    }
}
