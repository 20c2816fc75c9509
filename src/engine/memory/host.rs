//! Host memory: what this process may still allocate ([`available`]), the refusal of a CPU
//! run that would not fit ([`check_fits`]), and fallible allocation of the big host buffers
//! ([`try_zeroed`], [`probe`]) so that an allocation that fails anyway is reported as out of
//! memory (exit status 3) rather than aborting the process.

use super::{MemoryEstimate, gib};
use crate::engine::EngineError;
use crate::spec::{Precision, Quant};

/// Environment variable that overrides the available host memory, in bytes (or with a
/// `KiB`/`MiB`/`GiB` suffix): for tests and for a machine whose limits are not visible to the
/// process. `LORASCOPE_MEM_AVAILABLE=unlimited` turns the check off.
pub const AVAILABLE_ENV: &str = "LORASCOPE_MEM_AVAILABLE";

/// Host memory this process may still use, and which limit gave the figure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostAvailable {
    /// Bytes.
    pub bytes: u64,
    /// `MemAvailable`, `cgroup v2 memory.max`, `cgroup v1 memory.limit_in_bytes`,
    /// `RLIMIT_AS` or the override's name.
    pub source: &'static str,
}

/// The smallest of: `MemAvailable` (`/proc/meminfo`); the cgroup's limit minus its usage
/// less reclaimable page cache (v2 `memory.max` / `memory.current` / `inactive_file`, v1
/// `memory.limit_in_bytes` / `memory.usage_in_bytes` / `total_inactive_file`); the address
/// space left under `RLIMIT_AS` (`prlimit --as`, `ulimit -v`). [`AVAILABLE_ENV`] overrides
/// them all. None when nothing can be read (not Linux) or the override is `unlimited`.
pub fn available() -> Option<HostAvailable> {
    if let Ok(v) = std::env::var(AVAILABLE_ENV) {
        if v.eq_ignore_ascii_case("unlimited") {
            return None;
        }
        if let Some(bytes) = parse_size(&v) {
            return Some(HostAvailable {
                bytes,
                source: AVAILABLE_ENV,
            });
        }
        static WARNED: std::sync::Once = std::sync::Once::new();
        // `writeln!`, not `eprintln!`: a closed stderr must not panic the orchestrator.
        WARNED.call_once(|| {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "lorascope: {AVAILABLE_ENV}={v:?} is neither a size (bytes, or with KiB/MiB/GiB, e.g. 8GiB) nor `unlimited`; ignoring it"
            );
        });
    }
    let mut best: Option<HostAvailable> = None;
    let mut offer = |bytes: Option<u64>, source: &'static str| {
        if let Some(bytes) = bytes
            && best.as_ref().is_none_or(|b| bytes < b.bytes)
        {
            best = Some(HostAvailable { bytes, source });
        }
    };
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    offer(kib_field(&meminfo, "MemAvailable:"), "MemAvailable");
    offer(cgroup_v2(), "cgroup v2 memory.max");
    offer(cgroup_v1(), "cgroup v1 memory.limit_in_bytes");
    offer(address_space_left(), "RLIMIT_AS");
    best
}

/// `12345`, `512MiB`, `8GiB`, `64KiB` as bytes.
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mul) = [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)]
        .iter()
        .find_map(|(suf, m)| s.strip_suffix(suf).map(|n| (n.trim(), *m)))
        .unwrap_or((s, 1));
    let v: f64 = num.parse().ok()?;
    (v.is_finite() && v >= 0.0).then_some((v * mul as f64) as u64)
}

/// A `Name:   123 kB` line of `/proc/meminfo` in bytes.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

/// A `name value` line of a cgroup `memory.stat`.
fn stat_field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next()? == name).then(|| it.next()?.parse().ok())?
    })
}

fn read_u64(path: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// This process's cgroup path for `controller` (`""` for the v2 unified line).
fn cgroup_path(controller: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        let hit = if controller.is_empty() {
            ctrls.is_empty()
        } else {
            ctrls.split(',').any(|c| c == controller)
        };
        hit.then(|| path.to_string())
    })
}

/// The directories to look in: the process's cgroup under `root`, then `root` itself (a
/// container sees its own cgroup at the mount's root).
fn cgroup_dirs(root: &str, path: Option<String>) -> Vec<std::path::PathBuf> {
    let mut v = Vec::new();
    if let Some(p) = path {
        let rel = p.trim_start_matches('/');
        if !rel.is_empty() {
            v.push(std::path::Path::new(root).join(rel));
        }
    }
    v.push(std::path::PathBuf::from(root));
    v
}

fn cgroup_v2() -> Option<u64> {
    cgroup_dirs("/sys/fs/cgroup", cgroup_path(""))
        .into_iter()
        .find_map(|d| {
            let max = std::fs::read_to_string(d.join("memory.max")).ok()?;
            let limit: u64 = max.trim().parse().ok()?; // "max": no limit
            let used = read_u64(&d.join("memory.current"))?;
            let stat = std::fs::read_to_string(d.join("memory.stat")).unwrap_or_default();
            let cache = stat_field(&stat, "inactive_file").unwrap_or(0);
            Some(limit.saturating_sub(used.saturating_sub(cache)))
        })
}

fn cgroup_v1() -> Option<u64> {
    cgroup_dirs("/sys/fs/cgroup/memory", cgroup_path("memory"))
        .into_iter()
        .find_map(|d| {
            let limit = read_u64(&d.join("memory.limit_in_bytes"))?;
            if limit >= 1 << 60 {
                return None; // "unlimited" is a huge page-aligned number
            }
            let used = read_u64(&d.join("memory.usage_in_bytes"))?;
            let stat = std::fs::read_to_string(d.join("memory.stat")).unwrap_or_default();
            let cache = stat_field(&stat, "total_inactive_file").unwrap_or(0);
            Some(limit.saturating_sub(used.saturating_sub(cache)))
        })
}

/// `RLIMIT_AS` minus the current virtual size (`VmSize`), when a limit is set.
fn address_space_left() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut lim) } != 0
        || lim.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let used = kib_field(&status, "VmSize:").unwrap_or(0);
    Some(lim.rlim_cur.saturating_sub(used))
}

/// What a CPU run's weights are, for the refusal: `f32 weights`, `nf4 weights`...
fn weights_phrase(precision: Precision, quant: Quant) -> String {
    match quant {
        Quant::Nf4 => "NF4 weights".into(),
        Quant::None => format!("{} weights", precision.as_str().replace("fp", "f")),
    }
}

/// The one-line refusal of a CPU run needing `est` against `avail`, or Ok when it fits.
///
/// Errors: [`EngineError::InsufficientMemory`] with e.g. `needs ~29.6 GiB of host memory
/// (28.4 GiB for f32 weights), 21.8 GiB available (MemAvailable); use --quant nf4, a smaller
/// model or a GPU`.
pub fn check_fits(
    est: &MemoryEstimate,
    avail: &HostAvailable,
    precision: Precision,
    quant: Quant,
) -> Result<(), EngineError> {
    if est.peak <= avail.bytes {
        return Ok(());
    }
    let hint = match quant {
        Quant::None => "use --quant nf4, a smaller model or a GPU",
        Quant::Nf4 => "use a smaller model, --batch-size or --seq-len, or a GPU",
    };
    Err(EngineError::InsufficientMemory(format!(
        "needs ~{} of host memory ({} for {}), {} available ({}); {hint}",
        gib(est.peak),
        gib(est.weights),
        weights_phrase(precision, quant),
        gib(avail.bytes),
        avail.source
    )))
}

/// The message of a host allocation of `bytes` that failed while doing `what`; it contains
/// "out of memory" so [`crate::engine::classify`] reports it as such.
pub fn alloc_failure(bytes: usize, what: &str) -> String {
    format!(
        "out of memory: could not allocate {} of host memory for {what}",
        gib(bytes as u64)
    )
}

/// A vector of `n` copies of `value`, or an error instead of an abort when the allocator
/// refuses (`Vec::try_reserve_exact`).
///
/// Errors: a candle error whose text says "out of memory" (see [`alloc_failure`]).
pub fn try_filled<T: Clone>(n: usize, value: T, what: &str) -> candle_core::Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| candle_core::Error::Msg(alloc_failure(n * size_of::<T>(), what)))?;
    v.resize(n, value);
    Ok(v)
}

/// [`try_filled`] with zeroes.
///
/// Errors: as [`try_filled`].
pub fn try_zeroed<T: Clone + Default>(n: usize, what: &str) -> candle_core::Result<Vec<T>> {
    try_filled(n, T::default(), what)
}

/// Check that `bytes` of host memory can be had right now (reserve and release them) before
/// a library call that would abort if the allocation failed.
///
/// Errors: as [`try_filled`].
pub fn probe(bytes: usize, what: &str) -> candle_core::Result<()> {
    let mut v: Vec<u8> = Vec::new();
    v.try_reserve_exact(bytes)
        .map_err(|_| candle_core::Error::Msg(alloc_failure(bytes, what)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("8GiB"), Some(8 << 30));
        assert_eq!(parse_size("512 MiB"), Some(512 << 20));
        assert_eq!(parse_size("1000"), Some(1000));
        assert_eq!(parse_size("lots"), None);
    }

    #[test]
    fn meminfo_and_stat_fields() {
        let m = "MemTotal: 100 kB\nMemAvailable:   21152640 kB\n";
        assert_eq!(kib_field(m, "MemAvailable:"), Some(21152640 * 1024));
        let s = "cache 5\ntotal_inactive_file 7\ninactive_file 3\n";
        assert_eq!(stat_field(s, "total_inactive_file"), Some(7));
        assert_eq!(stat_field(s, "inactive_file"), Some(3));
    }

    #[test]
    fn an_impossible_allocation_is_an_error_not_an_abort() {
        let e = try_zeroed::<u64>(usize::MAX / 16, "a test buffer").unwrap_err();
        assert!(e.to_string().contains("out of memory"), "{e}");
        assert!(probe(usize::MAX / 2, "x").is_err());
        assert_eq!(try_zeroed::<u8>(3, "x").unwrap(), vec![0, 0, 0]);
    }
}
