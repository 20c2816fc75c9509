//! NVRTC modules, the PTX cache, device buffers as kernel arguments, and the one launch helper
//! (`--features cuda`).
//!
//! A kernel launch is `launch(dev, &MODULE, &kernel_name(root, dtype, what)?, cfg, &[args])`:
//! the module is compiled at first use (PTX cached per process by source and compile options,
//! loaded once per device by candle), and the arguments are pushed in order as the kernel's
//! parameters: device addresses ([`Buf::arg`], [`Arg::Ptr`]) and scalars of the kernel's C
//! types. Work is ordered on candle's stream of the device.

use super::source::PRELUDE;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::cudarc::driver::{
    DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::CompileOptions;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Result, Shape, Storage, Tensor};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// A CUDA error as a candle error.
pub(crate) fn err(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("lorascope cuda kernel: {e}"))
}

/// One NVRTC module: [`PRELUDE`], an optional generated header (tables and constants computed
/// in Rust), then a `.cu` source; compiled with NVRTC's defaults, or `--fmad=false`, or for a
/// named virtual architecture.
pub(crate) struct Module {
    /// candle's key for the loaded module on each device (unique per module).
    name: &'static str,
    /// The `.cu` text ([`super::source`]).
    source: &'static str,
    /// Declarations placed between the prelude and the source.
    header: Option<fn() -> String>,
    /// Whether NVRTC may contract multiply-adds (its default); false passes `--fmad=false`.
    fmad: bool,
    /// NVRTC's `--gpu-architecture` (e.g. `compute_80` for `mma.sync` with bf16), or its
    /// default.
    arch: Option<&'static str>,
    /// This module's entry of the PTX cache, once compiled.
    ptx: OnceLock<&'static str>,
}

impl Module {
    /// The module `name` of `source`, NVRTC defaults, no header.
    pub(crate) const fn new(name: &'static str, source: &'static str) -> Self {
        Self {
            name,
            source,
            header: None,
            fmad: true,
            arch: None,
            ptx: OnceLock::new(),
        }
    }

    /// The same module with `header()` between the prelude and the source.
    pub(crate) const fn with_header(mut self, header: fn() -> String) -> Self {
        self.header = Some(header);
        self
    }

    /// The same module compiled with `--fmad=false` (no multiply-add contraction, so the GPU
    /// rounds every product and sum as the CPU does).
    pub(crate) const fn without_fmad(mut self) -> Self {
        self.fmad = false;
        self
    }

    /// The same module compiled for the virtual architecture `arch` (`compute_80`: the
    /// kernels use instructions of sm_80 and newer; launch them only on such a GPU).
    pub(crate) const fn for_arch(mut self, arch: &'static str) -> Self {
        self.arch = Some(arch);
        self
    }

    /// The full text handed to NVRTC.
    fn full_source(&self) -> String {
        let header = self.header.map(|h| h()).unwrap_or_default();
        format!("{PRELUDE}\n{header}{}", self.source)
    }

    fn options(&self) -> CompileOptions {
        CompileOptions {
            fmad: (!self.fmad).then_some(false),
            arch: self.arch,
            ..CompileOptions::default()
        }
    }

    /// The module's PTX: compiled on first use, then this module's cache entry.
    ///
    /// Errors: NVRTC fails to compile, with its log.
    pub(crate) fn ptx(&self) -> Result<&'static str> {
        if let Some(p) = self.ptx.get() {
            return Ok(p);
        }
        let p = compiled(self.full_source(), self.options(), self.name)?;
        Ok(self.ptx.get_or_init(|| p))
    }
}

/// The process's PTX cache: one compile per (full source, compile options), backed by the disk
/// cache of [`super::ptx_cache`] across processes.
///
/// Errors: NVRTC fails to compile `source` (module `name`, for the message); failures are not
/// cached.
fn compiled(source: String, options: CompileOptions, name: &str) -> Result<&'static str> {
    type Cache = Mutex<HashMap<(String, CompileOptions), &'static str>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let mut map = CACHE
        .get_or_init(Mutex::default)
        .lock()
        .map_err(|_| candle_core::Error::Msg("kernel cache poisoned".into()))?;
    let key = (source, options);
    if let Some(p) = map.get(&key) {
        return Ok(p);
    }
    // The disk cache (ptx_cache), keyed by source, options and NVRTC version.
    let disk = super::ptx_cache::dir().map(|d| {
        let options = format!("{:?}", key.1);
        let version = nvrtc_version();
        let entry =
            super::ptx_cache::key(&[key.0.as_bytes(), options.as_bytes(), version.as_bytes()]);
        (d, entry)
    });
    let cached = disk
        .as_ref()
        .and_then(|(d, e)| super::ptx_cache::load(d, e));
    let ptx = match cached {
        Some(p) => p,
        None => {
            let p = cudarc::nvrtc::compile_ptx_with_opts(&key.0, key.1.clone())
                .map_err(|e| err(format!("compiling {name}: {e}")))?
                .to_src();
            if let Some((d, e)) = &disk {
                super::ptx_cache::store(d, e, &p);
            }
            p
        }
    };
    let leaked: &'static str = Box::leak(ptx.into_boxed_str());
    map.insert(key, leaked);
    Ok(leaked)
}

/// NVRTC's version as `major.minor` (part of the disk cache key), or `unknown`.
fn nvrtc_version() -> String {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: nvrtcVersion writes two ints through valid pointers.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        format!("{major}.{minor}")
    } else {
        "unknown".to_string()
    }
}

/// One kernel parameter, by its C type: a device address (any `T*`), `unsigned long long`,
/// `int`, `float` or `double`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg {
    /// A device address.
    Ptr(u64),
    /// `unsigned long long`.
    U64(u64),
    /// `int`.
    I32(i32),
    /// `float`.
    F32(f32),
    /// `double`.
    F64(f64),
}

/// Launch `kernel` of `module` on `dev`'s stream with `cfg`, pushing `args` in order as its
/// parameters.
///
/// Safety contract (checked by the callers, not here): `args` match the kernel's signature in
/// number, order and C type, and every address covers the elements the grid touches.
///
/// Errors: compile or load failure, launch failure.
pub(crate) fn launch(
    dev: &CudaDevice,
    module: &Module,
    kernel: &str,
    cfg: LaunchConfig,
    args: &[Arg],
) -> Result<()> {
    // candle loads the module once per device, under its name.
    let func = dev.get_or_load_custom_func(kernel, module.name, module.ptx()?)?;
    let mut lb = func.builder();
    for a in args {
        match a {
            Arg::Ptr(v) | Arg::U64(v) => lb.arg(v),
            Arg::I32(v) => lb.arg(v),
            Arg::F32(v) => lb.arg(v),
            Arg::F64(v) => lb.arg(v),
        };
    }
    // SAFETY: the callers pass the kernel's parameters in order with their C types, and
    // buffers sized for the grid (see above).
    unsafe { lb.launch(cfg) }.map_err(err)?;
    Ok(())
}

/// One block of `threads` threads per row.
pub(crate) fn per_row(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// 256-thread blocks over `n` elements for a grid-stride kernel: `ceil(n / 256)` blocks,
/// clamped to `1..=max_blocks`.
pub(crate) fn grid_stride(n: usize, max_blocks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, max_blocks) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Whether an elementwise op may run its 8-wide kernel (`*8_<dtype>` in `cuda/kernels/`: one
/// thread per eight elements, 16-byte loads and stores) over these buffers: every address
/// 16-byte aligned, and `LORASCOPE_VEC8` not `0` (read once; `0` keeps the 1-wide kernels, for
/// A/B timing: both compute the same bits).
pub(crate) fn vec8<'a>(bufs: impl IntoIterator<Item = &'a Buf>) -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    super::kernel_switch(&ON, "LORASCOPE_VEC8")
        && bufs.into_iter().all(|b| b.ptr().is_multiple_of(16))
}

/// The name of the 8-wide kernel `<root>8_<dtype>` when `wide`, else of the 1-wide
/// `<root>_<dtype>`; `what` names the op in errors.
///
/// Errors: a dtype without a kernel.
pub(crate) fn name8(root: &str, dt: DType, what: &str, wide: bool) -> Result<String> {
    if wide {
        super::kernel_name(&format!("{root}8"), dt, what)
    } else {
        super::kernel_name(root, dt, what)
    }
}

/// Launch configuration of an 8-wide kernel over `n` elements: 256 threads per block, one per
/// eight elements (the last thread of a length not divisible by 8 does the tail one by one).
///
/// Errors: more blocks than a grid holds.
fn vec8_config(n: usize) -> Result<LaunchConfig> {
    let blocks = n.div_ceil(8).div_ceil(256).max(1);
    if blocks > i32::MAX as usize {
        candle_core::bail!("{n} elements is too many for one launch");
    }
    let blocks = blocks as u32;
    Ok(LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// The elementwise kernel to launch over `n` elements of `dt`: the 8-wide `<root>8_<dtype>`
/// with [`vec8_config`] when the op's own condition `wide` holds and [`vec8`] allows `bufs`,
/// else `<root>_<dtype>` with `one` (the 1-wide kernel's configuration). `what` names the op
/// in errors.
///
/// Errors: a dtype without a kernel, a grid too large.
pub(crate) fn vec8_or(
    (root, dt, what): (&str, DType, &str),
    n: usize,
    wide: bool,
    bufs: &[&Buf],
    one: impl FnOnce() -> Result<LaunchConfig>,
) -> Result<(String, LaunchConfig)> {
    let wide = wide && vec8(bufs.iter().copied());
    let cfg = if wide { vec8_config(n)? } else { one()? };
    Ok((name8(root, dt, what, wide)?, cfg))
}

/// A device buffer as a kernel argument: its address and dtype, and the storage that owns it
/// when it is fresh (None for a view of a storage the caller keeps alive).
pub(crate) struct Buf {
    ptr: u64,
    dt: DType,
    owned: Option<CudaStorage>,
}

impl Buf {
    /// A fresh, uninitialised buffer of `n` (at least 1) elements of `dt` (f32, f16, bf16,
    /// f64, u8). The kernel that fills it must write every element read later.
    ///
    /// Errors: another dtype, out of memory.
    pub(crate) fn alloc(dev: &CudaDevice, dt: DType, n: usize) -> Result<Self> {
        fn go<T: candle_core::cuda_backend::CudaDType + cudarc::driver::DeviceRepr>(
            dev: &CudaDevice,
            n: usize,
        ) -> Result<(u64, CudaStorage)> {
            // SAFETY: callers write the buffer before reading it (see above).
            let s = unsafe { dev.alloc::<T>(n.max(1)) }?;
            let ptr = s.device_ptr(&dev.cuda_stream()).0;
            Ok((ptr, CudaStorage::wrap_cuda_slice(s, dev.clone())))
        }
        let (ptr, storage) = match dt {
            DType::F32 => go::<f32>(dev, n)?,
            DType::F16 => go::<half::f16>(dev, n)?,
            DType::BF16 => go::<half::bf16>(dev, n)?,
            DType::F64 => go::<f64>(dev, n)?,
            DType::U8 => go::<u8>(dev, n)?,
            other => candle_core::bail!("cuda buffer: cannot allocate {other:?}"),
        };
        Ok(Self {
            ptr,
            dt,
            owned: Some(storage),
        })
    }

    /// Elements `a..b` of storage `s`, borrowed (the caller keeps `s` alive until the kernels
    /// using it are queued).
    ///
    /// Errors: a range past the storage, an unsupported dtype.
    pub(crate) fn view(s: &CudaStorage, (a, b): (usize, usize)) -> Result<Self> {
        fn base<T: candle_core::cuda_backend::CudaDType>(s: &CudaStorage) -> Result<(u64, usize)> {
            let slice = s.as_cuda_slice::<T>()?;
            Ok((slice.device_ptr(&s.device().cuda_stream()).0, slice.len()))
        }
        let dt = s.dtype();
        let (ptr, len) = match dt {
            DType::U8 => base::<u8>(s)?,
            DType::U32 => base::<u32>(s)?,
            DType::F16 => base::<half::f16>(s)?,
            DType::BF16 => base::<half::bf16>(s)?,
            DType::F32 => base::<f32>(s)?,
            DType::F64 => base::<f64>(s)?,
            other => candle_core::bail!("cuda buffer: unsupported dtype {other:?}"),
        };
        if a > b || b > len {
            candle_core::bail!("cuda buffer: range {a}..{b} of a storage of {len}");
        }
        Ok(Self {
            ptr: ptr + (a * dt.size_in_bytes()) as u64,
            dt,
            owned: None,
        })
    }

    /// Elements `a..b` of the f32 storage `s`, borrowed for writing in place.
    ///
    /// Errors: `s` is not f32, a range past the storage.
    pub(crate) fn view_mut_f32(s: &mut CudaStorage, (a, b): (usize, usize)) -> Result<Self> {
        let stream = s.device().cuda_stream();
        let slice = s.as_cuda_slice_mut::<f32>()?;
        if a > b || b > slice.len() {
            candle_core::bail!(
                "cuda buffer: range {a}..{b} of a storage of {}",
                slice.len()
            );
        }
        let ptr = slice.device_ptr_mut(&stream).0;
        Ok(Self {
            ptr: ptr + (a * 4) as u64,
            dt: DType::F32,
            owned: None,
        })
    }

    /// The same address, borrowed (the original keeps ownership).
    pub(crate) fn borrow(&self) -> Self {
        Self {
            ptr: self.ptr,
            dt: self.dt,
            owned: None,
        }
    }

    /// Elements `offset..` of this buffer, borrowed (the original keeps ownership; the caller
    /// keeps the range inside it).
    pub(crate) fn offset(&self, offset: usize) -> Self {
        Self {
            ptr: self.ptr + (offset * self.dt.size_in_bytes()) as u64,
            dt: self.dt,
            owned: None,
        }
    }

    /// The address as a kernel argument.
    pub(crate) fn arg(&self) -> Arg {
        Arg::Ptr(self.ptr)
    }

    /// The device address (for cuBLAS calls).
    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }

    /// The element dtype.
    pub(crate) fn dtype(&self) -> DType {
        self.dt
    }

    /// The owned storage.
    ///
    /// Errors: a borrowed buffer.
    pub(crate) fn into_storage(self) -> Result<CudaStorage> {
        self.owned
            .ok_or_else(|| candle_core::Error::Msg("cuda buffer: borrowed, not owned".into()))
    }

    /// The owned storage as an untracked tensor of `shape`.
    ///
    /// Errors: a borrowed buffer.
    pub(crate) fn into_tensor(self, shape: impl Into<Shape>) -> Result<Tensor> {
        Ok(Tensor::from_storage(
            Storage::Cuda(self.into_storage()?),
            shape,
            BackpropOp::none(),
            false,
        ))
    }
}

/// The per-tensor rows of a multi-tensor kernel (one launch over a list of tensors instead of
/// one launch each): `stride - 1` u64 fields per tensor (addresses, lengths, ...) followed by
/// the tensor's first block in the grid, which [`TensorTable::push`] computes. The kernels find
/// a block's row with `table_row` (`kernels/prelude.cuh`).
pub(crate) struct TensorTable {
    rows: Vec<u64>,
    stride: usize,
    blocks: u64,
}

impl TensorTable {
    /// An empty table of rows of `fields` fields (plus the first-block column).
    pub(crate) fn new(fields: usize) -> Self {
        Self {
            rows: Vec::new(),
            stride: fields + 1,
            blocks: 0,
        }
    }

    /// Append a tensor's `fields` that takes `blocks` blocks of the grid.
    ///
    /// Errors: a row of the wrong length.
    pub(crate) fn push(&mut self, fields: &[u64], blocks: u64) -> Result<()> {
        if fields.len() + 1 != self.stride {
            candle_core::bail!(
                "tensor table: {} fields in a row of {}",
                fields.len(),
                self.stride - 1
            );
        }
        self.rows.extend_from_slice(fields);
        self.rows.push(self.blocks);
        self.blocks += blocks;
        Ok(())
    }

    /// Rows so far.
    pub(crate) fn len(&self) -> usize {
        self.rows.len() / self.stride
    }

    /// Whether no tensor has been added.
    pub(crate) fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Copy the table to `dev` for one launch of `threads`-thread blocks over every row's
    /// blocks: the device copy (keep it alive until the launch is queued; freeing is ordered on
    /// the stream), the row count as an `unsigned int` argument, and the launch configuration.
    ///
    /// Errors: more blocks or rows than one launch takes, a copy failure.
    pub(crate) fn upload(
        &self,
        dev: &CudaDevice,
        threads: u32,
    ) -> Result<(cudarc::driver::CudaSlice<u64>, Arg, LaunchConfig)> {
        if self.blocks > i32::MAX as u64 || self.len() > i32::MAX as usize {
            candle_core::bail!(
                "{} blocks over {} tensors is too many for one launch",
                self.blocks,
                self.len()
            );
        }
        let table = dev.clone_htod(self.rows.as_slice())?;
        let cfg = LaunchConfig {
            grid_dim: (self.blocks.max(1) as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        Ok((table, Arg::I32(self.len() as i32), cfg))
    }
}

/// The device address of a `u64` table from [`TensorTable::upload`].
pub(crate) fn table_arg(dev: &CudaDevice, t: &cudarc::driver::CudaSlice<u64>) -> Arg {
    Arg::Ptr(t.device_ptr(&dev.cuda_stream()).0)
}

/// A CUDA C++ declaration of a constant f32 table for a generated module header:
/// `__constant__ float NAME[len] = { v0, v1, ... };`, each value written exactly (`{:e}`, the
/// shortest decimal that reads back as the same f32) with an `f` suffix.
pub(crate) fn constant_table(name: &str, values: &[f32]) -> String {
    let items: Vec<String> = values.iter().map(|x| format!("{x:e}f")).collect();
    format!(
        "__constant__ float {name}[{}] = {{ {} }};\n",
        values.len(),
        items.join(", ")
    )
}
