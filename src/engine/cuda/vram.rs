//! `--vram-limit`: emulate a card with less memory on a larger one.
//!
//! After the CUDA context exists and before the model loads, [`reserve`] reads the device's
//! free memory (`cuMemGetInfo`) and takes `free - limit` bytes with one ordinary device
//! allocation (`cuMemAlloc`, outside candle's stream-ordered pool), held until the run ends.
//! Everything the run allocates afterwards (weights, activations, optimizer state, CUDA
//! unified memory that the paged optimizers fault onto the device) competes for the `limit`
//! bytes left, so a point fits or fails with out-of-memory roughly where a card of that size
//! would. Only capacity is emulated: bandwidth, compute and the smaller card's own context
//! overhead are the host card's.
//!
//! The raw allocation helper `RawBuf` (CUDA builds) is also what the fused optimizer kernels
//! (`optim::cuda`) keep their state in, ordinary or managed memory.

use crate::engine::EngineError;
use candle_core::Device;

/// Bytes shown as mebibytes with one decimal, for messages.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1048576.0)
}

/// A held `--vram-limit` reservation (CUDA) and what it did. Dropping it frees the reserved
/// memory; keep it alive for the whole run.
pub struct VramReservation {
    /// The requested limit, bytes.
    pub limit_bytes: u64,
    /// Bytes reserved (`free - limit`, or 0 when the card had no more than `limit` free).
    pub reserved_bytes: u64,
    /// Free device memory before reserving, bytes (`cuMemGetInfo`).
    pub free_before_bytes: u64,
    /// Total device memory, bytes.
    pub total_bytes: u64,
    #[cfg(feature = "cuda")]
    _hold: Option<RawBuf>,
}

/// The limit of the reservation alive in this process, bytes (0: none). Out-of-memory
/// messages quote it instead of the card's total.
static ACTIVE_LIMIT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The `--vram-limit` in force in this process (a [`VramReservation`] that holds memory is
/// alive), bytes.
pub fn active_limit() -> Option<u64> {
    match ACTIVE_LIMIT.load(std::sync::atomic::Ordering::Relaxed) {
        0 => None,
        v => Some(v),
    }
}

impl Drop for VramReservation {
    fn drop(&mut self) {
        if self.reserved_bytes > 0 {
            ACTIVE_LIMIT.store(0, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl VramReservation {
    /// One line for the run header: what was reserved, or why nothing was.
    pub fn note(&self) -> String {
        if self.reserved_bytes == 0 {
            format!(
                "--vram-limit {}: the card had only {} free, nothing reserved (the run already sees less than the limit)",
                mib(self.limit_bytes),
                mib(self.free_before_bytes)
            )
        } else {
            format!(
                "--vram-limit {}: reserved {} of {} free ({} total); capacity only, bandwidth and compute are not emulated",
                mib(self.limit_bytes),
                mib(self.reserved_bytes),
                mib(self.free_before_bytes),
                mib(self.total_bytes)
            )
        }
    }
}

/// The one-line refusal of `--vram-limit` for a CPU device.
pub fn cpu_refusal(limit: &str) -> String {
    format!(
        "--vram-limit {limit}: emulating a smaller card needs a CUDA device (--device cuda:N); remove --vram-limit for CPU runs"
    )
}

/// Reserve `free - limit_bytes` of `device`'s memory (see the module docs).
///
/// Errors: `device` is the CPU ([`cpu_refusal`]); the driver cannot report free memory or
/// refuses the reservation (one line, with the sizes involved).
pub fn reserve(device: &Device, limit_bytes: u64) -> Result<VramReservation, EngineError> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => reserve_cuda(dev, limit_bytes),
        _ => Err(EngineError::Invalid(cpu_refusal(&mib(limit_bytes)))),
    }
}

#[cfg(feature = "cuda")]
fn reserve_cuda(
    dev: &candle_core::CudaDevice,
    limit_bytes: u64,
) -> Result<VramReservation, EngineError> {
    use candle_core::cuda_backend::cudarc::driver::result;
    let ctx = dev.cuda_stream().context().clone();
    let (free, total) = ctx
        .bind_to_thread()
        .and_then(|_| result::mem_get_info())
        .map_err(|e| {
            EngineError::Invalid(format!(
                "--vram-limit: cannot read the GPU's free memory ({e}); check the driver"
            ))
        })?;
    let (free, total) = (free as u64, total as u64);
    let want = free.saturating_sub(limit_bytes);
    let hold = if want == 0 {
        None
    } else {
        Some(RawBuf::device(&ctx, want as usize).map_err(|e| {
            EngineError::Invalid(format!(
                "--vram-limit {}: could not reserve {} of {} free ({e}); is another process using the GPU?",
                mib(limit_bytes),
                mib(want),
                mib(free)
            ))
        })?)
    };
    if want > 0 {
        ACTIVE_LIMIT.store(limit_bytes.max(1), std::sync::atomic::Ordering::Relaxed);
    }
    Ok(VramReservation {
        limit_bytes,
        reserved_bytes: want,
        free_before_bytes: free,
        total_bytes: total,
        _hold: hold,
    })
}

#[cfg(feature = "cuda")]
pub(crate) use raw::RawBuf;

#[cfg(feature = "cuda")]
mod raw {
    use candle_core::cuda_backend::cudarc::driver::{
        CudaContext, CudaStream, DriverError, result, sys,
    };
    use std::sync::Arc;

    /// A raw CUDA allocation outside candle's pool: ordinary device memory (`cuMemAlloc`) or
    /// CUDA unified memory (`cuMemAllocManaged`, attached globally), freed on drop. Kernels
    /// take its address as a `u64` argument; the caller orders work on one stream.
    pub(crate) struct RawBuf {
        ptr: sys::CUdeviceptr,
        bytes: usize,
        managed: bool,
        prefetchable: bool,
        ordinal: i32,
        ctx: Arc<CudaContext>,
    }

    // SAFETY: the pointer is a device (or managed) address owned by this value; the driver
    // calls made with it are thread-safe given the context is bound first.
    unsafe impl Send for RawBuf {}
    unsafe impl Sync for RawBuf {}

    impl RawBuf {
        /// `bytes` (at least 1) of ordinary device memory, uninitialised.
        pub(crate) fn device(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Self, DriverError> {
            ctx.bind_to_thread()?;
            // SAFETY: a plain allocation; the memory is only used as raw bytes.
            let ptr = unsafe { result::malloc_sync(bytes.max(1)) }?;
            Ok(Self {
                ptr,
                bytes,
                managed: false,
                prefetchable: false,
                ordinal: ctx.ordinal() as i32,
                ctx: ctx.clone(),
            })
        }

        /// `bytes` (at least 1) of unified memory that the driver may evict to host RAM,
        /// uninitialised.
        pub(crate) fn managed(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Self, DriverError> {
            ctx.bind_to_thread()?;
            let prefetchable = ctx.attribute(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS,
            )? != 0;
            // SAFETY: a plain allocation; the memory is only used as raw bytes.
            let ptr = unsafe {
                result::malloc_managed(bytes.max(1), sys::CUmemAttach_flags::CU_MEM_ATTACH_GLOBAL)
            }?;
            Ok(Self {
                ptr,
                bytes,
                managed: true,
                prefetchable,
                ordinal: ctx.ordinal() as i32,
                ctx: ctx.clone(),
            })
        }

        /// The device address.
        pub(crate) fn ptr(&self) -> u64 {
            self.ptr
        }

        /// Size in bytes.
        pub(crate) fn bytes(&self) -> usize {
            self.bytes
        }

        /// Whether this is unified (managed) memory.
        pub(crate) fn is_managed(&self) -> bool {
            self.managed
        }

        /// Set every byte to 0, ordered on `stream`.
        pub(crate) fn zero(&self, stream: &CudaStream) -> Result<(), DriverError> {
            self.ctx.bind_to_thread()?;
            // SAFETY: the range is this allocation.
            unsafe { result::memset_d8_async(self.ptr, 0, self.bytes.max(1), stream.cu_stream()) }
        }

        /// Managed memory: ask the driver to migrate the pages to this device, ordered on
        /// `stream` before the work that follows (`cuMemPrefetchAsync`). No-op for ordinary
        /// memory, or where the device cannot prefetch (no concurrent managed access: pages
        /// then migrate on fault).
        pub(crate) fn prefetch(&self, stream: &CudaStream) -> Result<(), DriverError> {
            if !self.managed || !self.prefetchable {
                return Ok(());
            }
            // CUmemLocation is {type: u32 enum, id: i32} in every CUDA 12.2+/13 header, but the
            // id field's Rust name differs between cudarc's bindings of 13.0 and 13.2+: build it
            // from zeroed memory and write the id at its offset.
            const _: () = assert!(std::mem::size_of::<sys::CUmemLocation>() == 8);
            // SAFETY: an all-zero CUmemLocation is valid (type 0 = invalid, overwritten next).
            let mut loc: sys::CUmemLocation = unsafe { std::mem::zeroed() };
            loc.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
            // SAFETY: the id is the i32 at byte offset 4 of the 8-byte struct.
            unsafe {
                (&mut loc as *mut sys::CUmemLocation as *mut i32)
                    .add(1)
                    .write(self.ordinal)
            };
            self.ctx.bind_to_thread()?;
            // SAFETY: the range is this managed allocation.
            unsafe {
                result::mem_prefetch_async(self.ptr, self.bytes.max(1), loc, stream.cu_stream())
            }
        }
    }

    impl Drop for RawBuf {
        fn drop(&mut self) {
            // Work that used the buffer is ordered before any host read of results; make sure
            // it has finished before the memory goes back.
            let _ = self.ctx.bind_to_thread();
            let _ = self.ctx.synchronize();
            // SAFETY: allocated by malloc_sync / malloc_managed above, freed once.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}
