//! Fused CUDA optimizer updates for [`super::optim::AdamW`] and [`super::optim::AdamW8bit`]
//! (`--features cuda`), NVRTC-compiled once per process like the NF4 dequantise kernel.
//!
//! - `lorascope_adamw32`: one pass over f32 parameter, gradient and moments, in f32 with the
//!   exact operation order of the candle tensor ops in [`super::optim::AdamW::step`]
//!   (bitsandbytes' `kOptimizer32bit2State` does the same update).
//! - `lorascope_adamw_f32state`: the same update in f64, as the host loop of
//!   [`super::optim::AdamW8bit`] does for tensors that keep f32 state.
//! - `lorascope_adamw8_blockwise`: bitsandbytes' `kOptimizerStatic8bit2StateBlockwise` scheme
//!   as the host implementation does it: one thread block per 256-element quantisation block;
//!   each thread dequantises its first moment (signed dynamic map) and second moment
//!   (unsigned dynamic map), updates in f64, the block reduces the new absolute maxima, and
//!   each thread requantises to the nearest map entry (binary search, ties to the lower
//!   entry, NaN as 0) and writes its code; thread 0 writes the two absmax values.
//!
//! The module is compiled with `--fmad=false`, so no multiply-add is contracted and the GPU
//! arithmetic rounds as the CPU's does: the self-test (`lorascope selftest optim`) expects
//! identical parameters.
//!
//! Parameters are updated in place through candle's `InplaceOp2` (no copy of the variable).
//! State lives in [`RawBuf`]s: ordinary device memory, or CUDA unified memory for the paged
//! optimizers' tensors of at least [`super::optim::MIN_PAGED_SIZE`] elements, prefetched to the device on
//! the compute stream before each update.

use super::nf4::dynamic_map;
use super::optim::{STATE_BLOCK, StateBytes, state_is_paged, state_is_quantized};
use super::vram::{RawBuf, mib};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::{CpuStorage, CudaStorage, DType, InplaceOp2, Layout, Result, Tensor, Var};
use std::sync::OnceLock;

fn err(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("optimizer cuda kernel: {e}"))
}

fn table(v: &[f32]) -> String {
    v.iter()
        .map(|x| format!("{x:e}f"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn source() -> String {
    format!(
        r#"
__constant__ float QMAP_S[256] = {{ {signed} }};
__constant__ float QMAP_U[256] = {{ {unsigned} }};

// Index of the entry of the ascending 256-entry table nearest to x; ties to the lower index;
// NaN as 0 (as nf4.rs `nearest_sorted`).
__device__ __forceinline__ unsigned char nearest256(const float* code, float x) {{
    if (x != x) x = 0.0f;
    int lo = 0, hi = 256;
    while (lo < hi) {{
        int mid = (lo + hi) >> 1;
        if (code[mid] < x) lo = mid + 1; else hi = mid;
    }}
    if (lo == 0) return 0;
    if (lo == 256) return 255;
    int l = lo - 1;
    return (unsigned char)(((x - code[l]) <= (code[lo] - x)) ? l : lo);
}}

// AdamW in f32, operation for operation as optim.rs AdamW::step's candle ops.
extern "C" __global__ void lorascope_adamw32(
    float* p, const float* g, float* m, float* v, unsigned long long n,
    float gs, float b1, float omb1, float b2, float omb2,
    float inv_bc1, float inv_bc2, float eps, float decay, float lr) {{
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
         i < n; i += (unsigned long long)gridDim.x * blockDim.x) {{
        float gi = g[i] * gs + 0.0f;
        float mi = (m[i] * b1 + 0.0f) + (gi * omb1 + 0.0f);
        float vi = (v[i] * b2 + 0.0f) + ((gi * gi) * omb2 + 0.0f);
        float denom = sqrtf(vi * inv_bc2 + 0.0f) * 1.0f + eps;
        float upd = (mi * inv_bc1 + 0.0f) / denom;
        p[i] = (p[i] * decay + 0.0f) - (upd * lr + 0.0f);
        m[i] = mi;
        v[i] = vi;
    }}
}}

// One element of the AdamW8bit host loop, in f64.
__device__ __forceinline__ void adam_f64(
    float& p, float g, float& m, float& v,
    double gs, double b1, double omb1, double b2, double omb2,
    double bc1, double bc2, double eps, double decay, double lr) {{
    double gk = (double)g * gs;
    double mk = b1 * (double)m + omb1 * gk;
    double vk = b2 * (double)v + omb2 * gk * gk;
    double upd = (mk / bc1) / (sqrt(vk / bc2) + eps);
    p = (float)((double)p * decay - lr * upd);
    m = (float)mk;
    v = (float)vk;
}}

extern "C" __global__ void lorascope_adamw_f32state(
    float* p, const float* g, float* m, float* v, unsigned long long n,
    double gs, double b1, double omb1, double b2, double omb2,
    double bc1, double bc2, double eps, double decay, double lr) {{
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
         i < n; i += (unsigned long long)gridDim.x * blockDim.x) {{
        float pi = p[i], mi = m[i], vi = v[i];
        adam_f64(pi, g[i], mi, vi, gs, b1, omb1, b2, omb2, bc1, bc2, eps, decay, lr);
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
    }}
}}

// Launched with {blk} threads per block, one block per {blk}-element quantisation block.
extern "C" __global__ void lorascope_adamw8_blockwise(
    float* p, const float* g,
    unsigned char* mc, float* mabs, unsigned char* vc, float* vabs,
    unsigned long long n,
    double gs, double b1, double omb1, double b2, double omb2,
    double bc1, double bc2, double eps, double decay, double lr) {{
    __shared__ float qs[{blk}];
    __shared__ float qu[{blk}];
    __shared__ float red_m[{blk}];
    __shared__ float red_v[{blk}];
    const unsigned int t = threadIdx.x;
    const unsigned long long b = blockIdx.x;
    const unsigned long long i = b * {blk} + t;
    qs[t] = QMAP_S[t];
    qu[t] = QMAP_U[t];
    __syncthreads();
    const bool valid = i < n;
    float mn = 0.0f, vn = 0.0f;
    if (valid) {{
        float pi = p[i];
        mn = qs[mc[i]] * mabs[b];
        vn = qu[vc[i]] * vabs[b];
        adam_f64(pi, g[i], mn, vn, gs, b1, omb1, b2, omb2, bc1, bc2, eps, decay, lr);
        p[i] = pi;
    }}
    red_m[t] = fabsf(mn);
    red_v[t] = fabsf(vn);
    __syncthreads();
    for (unsigned int s = {blk} / 2; s > 0; s >>= 1) {{
        if (t < s) {{
            red_m[t] = fmaxf(red_m[t], red_m[t + s]);
            red_v[t] = fmaxf(red_v[t], red_v[t + s]);
        }}
        __syncthreads();
    }}
    const float am = red_m[0];
    const float av = red_v[0];
    if (valid) {{
        float im = am > 0.0f ? 1.0f / am : 0.0f;
        float iv = av > 0.0f ? 1.0f / av : 0.0f;
        float xm = mn * im;
        float xv = vn * iv;
        if (xm == xm) xm = fminf(fmaxf(xm, -1.0f), 1.0f);
        if (xv == xv) xv = fminf(fmaxf(xv, -1.0f), 1.0f);
        mc[i] = nearest256(qs, xm);
        vc[i] = nearest256(qu, xv);
    }}
    if (t == 0) {{
        mabs[b] = am;
        vabs[b] = av;
    }}
}}

// partial[blockIdx.x] = this block's share of sum((g[i] * factor)^2) over n f32 elements, in
// f64: grid-stride partial sums, then a warp and block reduction in a fixed order. No atomics,
// so the host's in-order sum of the partials is the same on every run.
extern "C" __global__ void lorascope_sumsq(const float* g, unsigned long long n, double factor,
                                           double* partial) {{
    double s = 0.0;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
         i < n; i += (unsigned long long)gridDim.x * blockDim.x) {{
        double v = (double)g[i] * factor;
        s += v * v;
    }}
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    __shared__ double warp_sums[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warp_sums[warp] = s;
    __syncthreads();
    if (warp == 0) {{
        s = lane < (int)((blockDim.x + 31) >> 5) ? warp_sums[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0) partial[blockIdx.x] = s;
    }}
}}
"#,
        signed = table(&dynamic_map(true)),
        unsigned = table(&dynamic_map(false)),
        blk = STATE_BLOCK,
    )
}

fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        let opts = cudarc::nvrtc::CompileOptions {
            fmad: Some(false),
            ..Default::default()
        };
        cudarc::nvrtc::compile_ptx_with_opts(source(), opts)
            .map(|p| p.to_src())
            .map_err(|e| e.to_string())
    })
    .as_deref()
    .map_err(err)
}

const MODULE: &str = "lorascope_optim";

/// Thread blocks per gradient in [`sum_squares`] (fewer for small tensors).
const SUMSQ_MAX_BLOCKS: usize = 64;

/// `sum((g * factor)^2)` over every element of the f32 CUDA tensors `grads`, in f64: one kernel
/// launch per tensor writes one partial sum per thread block, and the host adds the partials in
/// order after a single read-back, so the result is the same on every run (no atomics). The
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
    let func = dev.get_or_load_custom_func("lorascope_sumsq", MODULE, ptx()?)?;
    let mut partials = dev.alloc_zeros::<f64>(total_blocks.max(1))?;
    let mut offset = 0;
    for g in grads {
        let g = g.contiguous()?;
        let (s, l) = g.storage_and_layout();
        let candle_core::Storage::Cuda(c) = &*s else {
            candle_core::bail!("sum_squares: expected CUDA tensors");
        };
        let (a, b) = range(l, l.shape().elem_count(), "gradient")?;
        let blocks = blocks_of(b - a);
        let mut out = partials.slice_mut(offset..offset + blocks);
        offset += blocks;
        if a == b {
            continue;
        }
        let view = c.as_cuda_slice::<f32>()?.slice(a..b);
        let n = (b - a) as u64;
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut lb = func.builder();
        lb.arg(&view);
        lb.arg(&n);
        lb.arg(&factor);
        lb.arg(&mut out);
        // SAFETY: `view` holds n f32 values and `out` one f64 per block of the grid.
        unsafe { lb.launch(cfg) }.map_err(err)?;
    }
    let host = dev.clone_dtoh(&partials)?;
    Ok(host.iter().sum())
}

/// Update arithmetic: `F32` is [`super::optim::AdamW`]'s (f32 tensor ops), `F64` is
/// [`super::optim::AdamW8bit`]'s host loop (f64).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Math {
    F32,
    F64,
}

/// One step's scalars, f64 as the CPU computes them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Hyper {
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
    /// memory for tensors of at least [`super::optim::MIN_PAGED_SIZE`] elements when `paged`.
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
    pub(crate) fn step_all(
        &self,
        vars: &[Var],
        grads: &candle_core::backprop::GradStore,
        math: Math,
        h: &Hyper,
    ) -> Result<()> {
        for (i, var) in vars.iter().enumerate() {
            if let Some(g) = grads.get(var.as_tensor()) {
                self.step_var(i, var, g, math, h)?;
            }
        }
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

/// The in-place update of one parameter tensor (dst) from its gradient (src).
struct StepOp<'a> {
    slot: &'a Slot,
    n: usize,
    math: Math,
    h: Hyper,
}

fn range(l: &Layout, n: usize, what: &str) -> Result<(usize, usize)> {
    match l.contiguous_offsets() {
        Some((a, b)) if b - a == n => Ok((a, b)),
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
        let g = s2.as_cuda_slice::<f32>()?.slice(ga..gb);
        let mut p = s1.as_cuda_slice_mut::<f32>()?.slice_mut(pa..pb);
        let n = self.n as u64;
        let h = self.h;
        let decay = 1.0 - h.lr * h.weight_decay;
        match (self.slot, self.math) {
            (Slot::F32 { m, v }, Math::F32) => {
                let func = dev.get_or_load_custom_func("lorascope_adamw32", MODULE, ptx()?)?;
                let (mp, vp) = (m.ptr(), v.ptr());
                let f = |x: f64| x as f32;
                let args = [
                    f(h.grad_scale),
                    f(h.beta1),
                    f(1.0 - h.beta1),
                    f(h.beta2),
                    f(1.0 - h.beta2),
                    f(1.0 / h.bc1),
                    f(1.0 / h.bc2),
                    f(h.eps),
                    f(decay),
                    f(h.lr),
                ];
                let mut b = func.builder();
                b.arg(&mut p);
                b.arg(&g);
                b.arg(&mp);
                b.arg(&vp);
                b.arg(&n);
                for a in &args {
                    b.arg(a);
                }
                let cfg = LaunchConfig::for_num_elems((self.n.min(1 << 30) as u32).max(1));
                // SAFETY: argument types and order match `lorascope_adamw32`; m and v hold n
                // f32 each; work is ordered on candle's stream.
                unsafe { b.launch(cfg) }.map_err(err)?;
            }
            (slot, _) => {
                let args = [
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
                ];
                match slot {
                    Slot::F32 { m, v } => {
                        let func = dev.get_or_load_custom_func(
                            "lorascope_adamw_f32state",
                            MODULE,
                            ptx()?,
                        )?;
                        let (mp, vp) = (m.ptr(), v.ptr());
                        let mut b = func.builder();
                        b.arg(&mut p);
                        b.arg(&g);
                        b.arg(&mp);
                        b.arg(&vp);
                        b.arg(&n);
                        for a in &args {
                            b.arg(a);
                        }
                        let cfg = LaunchConfig::for_num_elems((self.n.min(1 << 30) as u32).max(1));
                        // SAFETY: as above, for `lorascope_adamw_f32state`.
                        unsafe { b.launch(cfg) }.map_err(err)?;
                    }
                    Slot::Q8 { mc, ma, vc, va } => {
                        let func = dev.get_or_load_custom_func(
                            "lorascope_adamw8_blockwise",
                            MODULE,
                            ptx()?,
                        )?;
                        let ptrs = [mc.ptr(), ma.ptr(), vc.ptr(), va.ptr()];
                        let mut b = func.builder();
                        b.arg(&mut p);
                        b.arg(&g);
                        for q in &ptrs {
                            b.arg(q);
                        }
                        b.arg(&n);
                        for a in &args {
                            b.arg(a);
                        }
                        let blocks = self.n.div_ceil(STATE_BLOCK);
                        let cfg = LaunchConfig {
                            grid_dim: (blocks as u32, 1, 1),
                            block_dim: (STATE_BLOCK as u32, 1, 1),
                            shared_mem_bytes: 0,
                        };
                        // SAFETY: argument types and order match `lorascope_adamw8_blockwise`;
                        // codes hold n bytes, absmax ceil(n/256) f32; one block per 256-block.
                        unsafe { b.launch(cfg) }.map_err(err)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// One case of [`selftest`]: GPU vs CPU after `steps` updates.
#[derive(Debug, Clone)]
pub struct SelftestCase {
    /// `adamw` or `adamw8bit`.
    pub optimizer: &'static str,
    /// State in unified memory requested.
    pub paged: bool,
    /// Elements of the tensor.
    pub elems: usize,
    /// Where the GPU state went: `f32`/`8bit`, `device`/`managed`.
    pub placement: String,
    /// Largest |gpu - cpu| over the parameters.
    pub max_abs: f64,
    /// Largest |gpu - cpu| / max(|cpu|, 1e-3).
    pub max_rel: f64,
    /// Whether the placement is the expected one and the errors are within tolerance.
    pub pass: bool,
}

/// Tolerance of [`selftest`] on parameters (absolute and relative): the arithmetic is the
/// same, so the expected error is 0; this leaves room for one 8-bit code landing on the other
/// side of a tie after an f32 rounding difference.
pub const SELFTEST_TOL: f64 = 1e-5;

/// Run the fused kernels (unpaged and paged) against the CPU optimizers for `steps` updates on
/// random tensors of 1,000, 5,000 and 300,000 elements, on CUDA device `ordinal`.
///
/// Errors: the device cannot be opened, or a kernel fails to compile or launch.
pub fn selftest(ordinal: usize, steps: usize) -> Result<Vec<SelftestCase>> {
    use super::optim::{AdamW, AdamW8bit, AdamWConfig};
    use candle_core::Device;
    use rand::{Rng, SeedableRng};
    let gpu = Device::new_cuda(ordinal)?;
    let cfg = AdamWConfig {
        lr: 1e-2,
        ..AdamWConfig::default()
    };
    let mut out = Vec::new();
    for (oi, name) in ["adamw", "adamw8bit"].into_iter().enumerate() {
        for paged in [false, true] {
            for (si, n) in [1000usize, 5000, 300_000].into_iter().enumerate() {
                let mut rng =
                    rand_chacha::ChaCha8Rng::seed_from_u64((oi * 100 + si * 10) as u64 + 7);
                let x0: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                let vc = Var::from_vec(x0.clone(), n, &Device::Cpu)?;
                let vg = Var::from_vec(x0, n, &gpu)?;
                enum Pair {
                    A(AdamW, AdamW),
                    B(AdamW8bit, AdamW8bit),
                }
                let mut pair = if oi == 0 {
                    Pair::A(
                        AdamW::new(vec![vc.clone()], cfg)?,
                        AdamW::with_paging(vec![vg.clone()], cfg, paged)?,
                    )
                } else {
                    Pair::B(
                        AdamW8bit::new(vec![vc.clone()], cfg)?,
                        AdamW8bit::with_paging(vec![vg.clone()], cfg, paged)?,
                    )
                };
                let (quant, on_managed) = match &pair {
                    Pair::A(_, g) => (false, g.is_paged(0)),
                    Pair::B(_, g) => (g.is_quantized(0), g.is_paged(0)),
                };
                for step in 0..steps {
                    // Gradient = the constant c: d/dx sum(x * c) = c exactly on both devices.
                    let scale = if step % 2 == 0 { 1.0 } else { 0.01 };
                    let c: Vec<f32> = (0..n)
                        .map(|_| scale * rng.random_range(-1.0f32..1.0))
                        .collect();
                    let gc = Tensor::from_vec(c.clone(), n, &Device::Cpu)?;
                    let gg = Tensor::from_vec(c, n, &gpu)?;
                    let grads_c = (vc.as_tensor() * &gc)?.sum_all()?.backward()?;
                    let grads_g = (vg.as_tensor() * &gg)?.sum_all()?.backward()?;
                    let lr = cfg.lr * (1.0 + step as f64) / steps as f64;
                    match &mut pair {
                        Pair::A(c, g) => {
                            c.step(&grads_c, lr, 0.5)?;
                            g.step(&grads_g, lr, 0.5)?;
                        }
                        Pair::B(c, g) => {
                            c.step(&grads_c, lr, 0.5)?;
                            g.step(&grads_g, lr, 0.5)?;
                        }
                    }
                }
                let a: Vec<f32> = vc.as_tensor().to_vec1()?;
                let b: Vec<f32> = vg.as_tensor().to_device(&Device::Cpu)?.to_vec1()?;
                let (mut max_abs, mut max_rel) = (0f64, 0f64);
                for (x, y) in a.iter().zip(&b) {
                    let d = (*x as f64 - *y as f64).abs();
                    let d = if d.is_nan() { f64::INFINITY } else { d };
                    max_abs = max_abs.max(d);
                    max_rel = max_rel.max(d / (x.abs() as f64).max(1e-3));
                }
                let want_quant = oi == 1 && state_is_quantized(n);
                let want_managed = state_is_paged(n, paged);
                out.push(SelftestCase {
                    optimizer: name,
                    paged,
                    elems: n,
                    placement: format!(
                        "{}/{}",
                        if quant { "8bit" } else { "f32" },
                        if on_managed { "managed" } else { "device" }
                    ),
                    max_abs,
                    max_rel,
                    pass: quant == want_quant
                        && on_managed == want_managed
                        && max_abs <= SELFTEST_TOL
                        && max_rel <= SELFTEST_TOL,
                });
            }
        }
    }
    // The gradient norm's sum of squares: GPU (f64 accumulation) against an f64 host sum over
    // three tensors with a factor, and an inf element must give inf.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(99);
    let sizes = [1000usize, 5000, 300_000];
    let host: Vec<Vec<f32>> = sizes
        .iter()
        .map(|&n| (0..n).map(|_| rng.random_range(-3.0f32..3.0)).collect())
        .collect();
    let factor = 1.0 / 65536.0;
    let want: f64 = host
        .iter()
        .flatten()
        .map(|&g| (g as f64 * factor).powi(2))
        .sum();
    let dev_t = host
        .iter()
        .map(|v| Tensor::from_slice(v, v.len(), &gpu))
        .collect::<Result<Vec<_>>>()?;
    let got = sum_squares(&dev_t.iter().collect::<Vec<_>>(), factor)?;
    let mut with_inf = host[0].clone();
    with_inf[17] = f32::INFINITY;
    let inf_t = Tensor::from_slice(&with_inf, with_inf.len(), &gpu)?;
    let got_inf = sum_squares(&[&dev_t[1], &inf_t], factor)?;
    let abs = (got - want).abs();
    let rel = abs / want.abs().max(1e-300);
    out.push(SelftestCase {
        optimizer: "grad-norm",
        paged: false,
        elems: sizes.iter().sum(),
        placement: "f64 sum of squares".into(),
        max_abs: abs,
        max_rel: rel,
        pass: rel <= 1e-9 && got_inf.is_infinite(),
    });
    Ok(out)
}
