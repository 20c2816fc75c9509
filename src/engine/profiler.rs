//! The op profiler (engine self-profiling, not the sweep profile of [`crate::profile`]) and CUDA
//! memory-pool control.
//!
//! With `LORASCOPE_PROFILE=1` in the environment, [`section`] synchronises the device around
//! each named piece of work (attention, projections, norms, recomputed layers, the loss, the
//! optimizer) and accumulates wall time (after warm-up) and the memory pool's peak bytes in
//! use per name; [`note_used`] records bytes in use at chosen points. `train` prints the
//! table on stderr at the end of the run. `LORASCOPE_PROFILE=host` times the same sections
//! without synchronising (how long the host takes to issue each one: host-bound when that adds
//! up to the step time). Synchronising serialises the GPU, so profiled runs are slower than normal ones:
//! use the table for proportions, the normal run for tokens/s. Without the variable every call
//! is a branch on a cached flag.
//!
//! [`configure_device`] sets up a CUDA device for training: candle allocates with
//! `cuMemAllocAsync` from the device's default memory pool, whose release threshold is 0, so
//! every synchronisation hands freed memory back to the driver and the next step maps it
//! again. Raising the threshold keeps it pooled for reuse, as PyTorch's caching allocator does;
//! NVML's per-process figure is then the pool's peak reservation.

use candle_core::{Device, Result};
use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// How sections are timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// No profiling.
    Off,
    /// Device-synchronised before and after each section: GPU time per section.
    Sync,
    /// `LORASCOPE_PROFILE=host` (any case): no synchronisation and no pool queries; each
    /// section's time is how long the host took to issue its work (plus any wait the section
    /// itself forces, such as a read-back or a full launch queue). When issue time adds up to
    /// the step time, the step is host-bound.
    Host,
}

fn mode() -> Mode {
    static MODE: OnceLock<Mode> = OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("LORASCOPE_PROFILE") {
        Err(_) => Mode::Off,
        Ok(v) if v.is_empty() || v == "0" => Mode::Off,
        Ok(v) if v.eq_ignore_ascii_case("host") => Mode::Host,
        Ok(_) => Mode::Sync,
    })
}

#[derive(Default)]
struct Stats {
    /// (name, part) -> (calls, seconds, max pool bytes in use during the section)
    time: BTreeMap<(&'static str, &'static str), (u64, f64, u64)>,
    /// label -> max pool bytes in use at a point ([`note_used`])
    mem: BTreeMap<&'static str, u64>,
    /// Peak in use of each open section (innermost last).
    open: Vec<u64>,
    /// Peak in use over everything seen.
    max_seen: u64,
    /// Time is recorded only while active (after warm-up).
    inactive: bool,
}

fn stats() -> &'static Mutex<Stats> {
    static S: OnceLock<Mutex<Stats>> = OnceLock::new();
    S.get_or_init(Mutex::default)
}

/// Turn recording of section times on (`true`) or off (warm-up steps). Memory peaks are
/// recorded either way.
pub fn set_active(active: bool) {
    if let Ok(mut s) = stats().lock() {
        s.inactive = !active;
    }
}

/// Fold the pool's high-water mark since the last reset into every open section.
fn fold_high(s: &mut Stats, dev: &Device) {
    if let Some(h) = pool::usage(dev).map(|u| u.used_high) {
        for m in s.open.iter_mut() {
            *m = (*m).max(h);
        }
        s.max_seen = s.max_seen.max(h);
    }
}

/// Run `f`, and when profiling, add its wall time to `name`/`part` (e.g.
/// `("causal-attention", "bwd")`): device-synchronised before and after, with the pool's peak
/// bytes in use during it (`LORASCOPE_PROFILE=1`), or the host's issue time alone
/// (`LORASCOPE_PROFILE=host`). Nested sections are counted in both.
///
/// Errors: those of `f`, or of synchronising `dev`.
pub fn section<T>(
    name: &'static str,
    part: &'static str,
    dev: &Device,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let sync = match mode() {
        Mode::Off => return f(),
        Mode::Sync => true,
        Mode::Host => false,
    };
    if sync {
        dev.synchronize()?;
        if let Ok(mut s) = stats().lock() {
            fold_high(&mut s, dev);
            s.open.push(0);
            let _ = pool::reset_high(dev);
        }
    }
    let t0 = Instant::now();
    let out = f();
    // Keep f's error rather than one from synchronising after it.
    let synced = if sync { dev.synchronize() } else { Ok(()) };
    let dt = t0.elapsed().as_secs_f64();
    if let Ok(mut s) = stats().lock() {
        let peak = if sync {
            fold_high(&mut s, dev);
            s.open.pop().unwrap_or(0)
        } else {
            0
        };
        let record = !s.inactive;
        let e = s.time.entry((name, part)).or_default();
        if record {
            e.0 += 1;
            e.1 += dt;
        }
        e.2 = e.2.max(peak);
    }
    let out = out?;
    synced?;
    Ok(out)
}

/// Peak pool bytes in use seen by profiled sections (0 when not profiling). Sections reset
/// the pool's own high-water mark, so readers of it combine the two.
pub fn max_seen() -> u64 {
    stats().lock().map(|s| s.max_seen).unwrap_or(0)
}

/// Reset the CUDA pool's high-water marks (no-op on CPU), whether or not profiling.
pub fn reset_pool_high(dev: &Device) {
    let _ = pool::reset_high(dev);
}

/// Hand the memory pool's free bytes back to the driver (CUDA `cuMemPoolTrimTo(pool, 0)`;
/// no-op on CPU). Called once between loading the model and the first step, so the blocks that
/// held start-up transients (dense weights before quantisation) neither count toward the
/// process's peak nor fragment the pool that training then grows.
pub fn trim_pool(dev: &Device) {
    let _ = pool::trim(dev);
}

/// From now on, hand the pool's free bytes back to the driver at every synchronisation (CUDA
/// release threshold 0; no-op on CPU): after a step ran out of memory at the edge of a card,
/// the cached, fragmented free blocks are what ran out, and releasing them at each sync costs
/// about 2% of tokens/s (BENCHMARKS.md, memory model and release threshold).
pub fn release_pool_at_every_sync(dev: &Device) {
    let _ = pool::release_at_every_sync(dev);
}

/// When profiling synchronised (`LORASCOPE_PROFILE=1`) on CUDA, record the pool's bytes in use
/// right now under `label` (the maximum over calls is kept); otherwise nothing.
pub fn note_used(label: &'static str, dev: &Device) {
    if mode() != Mode::Sync {
        return;
    }
    let _ = dev.synchronize();
    if let Some(m) = pool::usage(dev).map(|u| u.used)
        && let Ok(mut s) = stats().lock()
    {
        let e = s.mem.entry(label).or_default();
        *e = (*e).max(m);
    }
}

/// With `LORASCOPE_MEM_TRACE=1`: synchronise and print the pool's bytes in use now, labelled.
pub fn trace(label: &str, dev: &Device) {
    static ON: OnceLock<bool> = OnceLock::new();
    if !*ON.get_or_init(|| std::env::var("LORASCOPE_MEM_TRACE").is_ok_and(|v| v == "1")) {
        return;
    }
    let _ = dev.synchronize();
    if let Some(u) = pool::usage(dev) {
        eprintln!(
            "mem-trace {label:<32} used {:>8.3} GiB",
            u.used as f64 / (1u64 << 30) as f64
        );
    }
}

/// The profile table (empty when profiling is off or nothing was recorded).
pub fn report() -> String {
    let Ok(s) = stats().lock() else {
        return String::new();
    };
    if s.time.is_empty() && s.mem.is_empty() {
        return String::new();
    }
    let mut out = String::from(match mode() {
        Mode::Host => "profile (host issue time, not synchronised; nested sections overlap)\n",
        _ => "profile (device-synchronised; nested sections overlap)\n",
    });
    out.push_str(&format!(
        "{:<34} {:>8} {:>10} {:>10} {:>10}\n",
        "section", "calls", "total s", "ms/call", "peak GiB"
    ));
    let mut rows: Vec<_> = s.time.iter().collect();
    rows.sort_by(|a, b| b.1.1.total_cmp(&a.1.1));
    for ((name, part), (n, t, peak)) in rows {
        let label = format!("{name}.{part}");
        // Host mode runs ahead of the device: no meaningful peak per section.
        let peak = match mode() {
            Mode::Host => "-".to_string(),
            _ => format!("{:.2}", *peak as f64 / (1u64 << 30) as f64),
        };
        out.push_str(&format!(
            "{label:<34} {n:>8} {t:>10.3} {:>10.3} {peak:>10}\n",
            t * 1e3 / (*n).max(1) as f64,
        ));
    }
    for (phase, bytes) in &s.mem {
        out.push_str(&format!(
            "pool bytes in use, {phase:<28} {:>10.2} GiB\n",
            *bytes as f64 / (1u64 << 30) as f64
        ));
    }
    out
}

/// Prepare a device for training (no-op on CPU): on CUDA, keep freed memory in the
/// stream-ordered pool (release threshold = `LORASCOPE_POOL_KEEP_BYTES`, default unlimited)
/// and turn off cudarc's per-allocation event tracking (the engine uses one stream).
///
/// Errors: a CUDA driver error setting the pool attribute.
pub fn configure_device(dev: &Device) -> Result<()> {
    pool::configure(dev)
}

/// Compute capability (major, minor) of a CUDA device; None on CPU.
pub fn compute_capability(dev: &Device) -> Option<(i32, i32)> {
    pool::compute_capability(dev)
}

/// CUDA memory-pool usage in bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct PoolUsage {
    /// Bytes handed out to live allocations now.
    pub used: u64,
    /// High-water mark of `used` since the last reset.
    pub used_high: u64,
    /// Bytes the pool holds from the driver now.
    pub reserved: u64,
    /// High-water mark of `reserved` since the last reset.
    pub reserved_high: u64,
}

/// Usage of `dev`'s default memory pool (None on CPU or when the driver cannot say).
pub fn pool_usage(dev: &Device) -> Option<PoolUsage> {
    pool::usage(dev)
}

#[cfg(feature = "cuda")]
mod pool {
    use super::PoolUsage;
    use candle_core::Device;
    use candle_core::cuda_backend::cudarc::driver::sys;

    fn default_pool(dev: &Device) -> Option<sys::CUmemoryPool> {
        let Device::Cuda(d) = dev else { return None };
        let cu_dev = d.cuda_stream().context().cu_device();
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the device handle comes from a live context.
        let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, cu_dev) };
        (r == sys::CUresult::CUDA_SUCCESS && !pool.is_null()).then_some(pool)
    }

    fn get(pool: sys::CUmemoryPool, attr: sys::CUmemPool_attribute) -> Option<u64> {
        let mut v: u64 = 0;
        // SAFETY: these attributes are cuuint64_t.
        let r = unsafe {
            sys::cuMemPoolGetAttribute(pool, attr, &mut v as *mut u64 as *mut std::ffi::c_void)
        };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(v)
    }

    fn set(pool: sys::CUmemoryPool, attr: sys::CUmemPool_attribute, mut v: u64) -> bool {
        // SAFETY: these attributes are cuuint64_t.
        let r = unsafe {
            sys::cuMemPoolSetAttribute(pool, attr, &mut v as *mut u64 as *mut std::ffi::c_void)
        };
        r == sys::CUresult::CUDA_SUCCESS
    }

    pub fn configure(dev: &Device) -> candle_core::Result<()> {
        let Device::Cuda(d) = dev else { return Ok(()) };
        // SAFETY: the engine issues all work on the device's single stream.
        unsafe { d.disable_event_tracking() };
        let keep = std::env::var("LORASCOPE_POOL_KEEP_BYTES")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(u64::MAX);
        if release_threshold(dev, keep) == Some(false) {
            candle_core::bail!("cannot set the CUDA memory pool's release threshold");
        }
        Ok(())
    }

    /// Set the default pool's release threshold to `bytes`: whether the driver took it (None:
    /// no pool).
    fn release_threshold(dev: &Device, bytes: u64) -> Option<bool> {
        let threshold = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
        default_pool(dev).map(|p| set(p, threshold, bytes))
    }

    pub fn usage(dev: &Device) -> Option<PoolUsage> {
        use sys::CUmemPool_attribute::*;
        let p = default_pool(dev)?;
        Some(PoolUsage {
            used: get(p, CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
            used_high: get(p, CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
            reserved: get(p, CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?,
            reserved_high: get(p, CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
        })
    }

    pub fn compute_capability(dev: &Device) -> Option<(i32, i32)> {
        let Device::Cuda(d) = dev else { return None };
        d.cuda_stream().context().compute_capability().ok()
    }

    pub fn trim(dev: &Device) -> Option<()> {
        let p = default_pool(dev)?;
        // SAFETY: a valid pool handle; trimming only releases memory no allocation uses.
        let r = unsafe { sys::cuMemPoolTrimTo(p, 0) };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(())
    }

    pub fn release_at_every_sync(dev: &Device) -> Option<()> {
        release_threshold(dev, 0)?.then_some(())
    }

    pub fn reset_high(dev: &Device) -> Option<()> {
        use sys::CUmemPool_attribute::*;
        let p = default_pool(dev)?;
        (set(p, CU_MEMPOOL_ATTR_USED_MEM_HIGH, 0) && set(p, CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH, 0))
            .then_some(())
    }
}

#[cfg(not(feature = "cuda"))]
mod pool {
    use super::PoolUsage;
    use candle_core::Device;

    pub fn configure(_dev: &Device) -> candle_core::Result<()> {
        Ok(())
    }

    pub fn usage(_dev: &Device) -> Option<PoolUsage> {
        None
    }

    pub fn trim(_dev: &Device) -> Option<()> {
        None
    }

    pub fn reset_high(_dev: &Device) -> Option<()> {
        None
    }

    pub fn release_at_every_sync(_dev: &Device) -> Option<()> {
        None
    }

    pub fn compute_capability(_dev: &Device) -> Option<(i32, i32)> {
        None
    }
}
