//! Telemetry while a run is in flight: an NVML sampler per GPU run (>= 10 Hz) or, for CPU
//! runs, the child's resident set size from `/proc/<pid>/status`. The orchestrator samples
//! its children with it (local backend); `lorascope train --telemetry` samples itself with it
//! (a cluster node, where no orchestrator runs) and writes the samples as
//! [`crate::spec::wire`] `telemetry` lines.
//!
//! Every sample field is optional: what could not be read is `None`. When NVML cannot be
//! loaded (no driver: CPU machines, CI), GPU fields stay `None` and the reason is recorded once
//! in the sampler's note (`NVML unavailable: <error>`). When the total-energy counter is not
//! supported, `energy_mj` stays `None` and the summary integrates power instead (its
//! `energy_source` says which).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::spec::Device;
pub use crate::spec::wire::TelemetrySample;

/// Default sampling period (10 Hz).
pub const SAMPLE_PERIOD: Duration = Duration::from_millis(100);

/// Reads `VmRSS` and `VmHWM` (bytes) of a process from `/proc/<pid>/status`.
pub fn read_proc_rss(pid: u32) -> (Option<u64>, Option<u64>) {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return (None, None);
    };
    parse_proc_status(&text)
}

/// Parses `VmRSS:   1234 kB` / `VmHWM:` lines of a `/proc/<pid>/status` text (bytes).
pub fn parse_proc_status(text: &str) -> (Option<u64>, Option<u64>) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn nvml() -> &'static Result<nvml_wrapper::Nvml, String> {
    static NVML: OnceLock<Result<nvml_wrapper::Nvml, String>> = OnceLock::new();
    NVML.get_or_init(|| nvml_wrapper::Nvml::init().map_err(|e| e.to_string()))
}

/// Whether NVML loaded, or why not (`NVML unavailable: <error>`).
pub fn nvml_status() -> Result<(), String> {
    match nvml() {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("NVML unavailable: {e}")),
    }
}

/// A GPU as NVML names it: model name, driver version and memory capacity (bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuIdentity {
    /// `NVIDIA H200`.
    pub name: String,
    /// `580.159.04`.
    pub driver: String,
    /// Total device memory, bytes.
    pub total_bytes: u64,
}

/// The identity of GPU `index` (NVML, physical index), or None without NVML.
pub fn gpu_identity(index: u32) -> Option<GpuIdentity> {
    let nvml = nvml().as_ref().ok()?;
    let dev = nvml.device_by_index(index).ok()?;
    Some(GpuIdentity {
        name: dev.name().ok()?,
        driver: nvml.sys_driver_version().ok()?,
        total_bytes: dev.memory_info().ok()?.total,
    })
}

/// How many GPUs NVML reports.
///
/// Errors: NVML cannot be loaded (no driver) or cannot count.
pub fn gpu_count() -> Result<u32, String> {
    match nvml() {
        Ok(n) => n.device_count().map_err(|e| e.to_string()),
        Err(e) => Err(format!("NVML unavailable: {e}")),
    }
}

/// Reads one GPU sample of device `index`, attributing process memory to `pid`.
/// Returns the sample and notes about unsupported fields.
fn sample_gpu(index: u32, pid: u32, t: f64) -> (TelemetrySample, Vec<String>) {
    use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
    use nvml_wrapper::enums::device::UsedGpuMemory;
    let mut s = TelemetrySample {
        t,
        gpu: Some(index),
        ..Default::default()
    };
    let mut notes = Vec::new();
    let nvml = match nvml() {
        Ok(n) => n,
        Err(e) => return (s, vec![format!("NVML unavailable: {e}")]),
    };
    let dev = match nvml.device_by_index(index) {
        Ok(d) => d,
        Err(e) => return (s, vec![format!("NVML device {index} unavailable: {e}")]),
    };
    s.power_w = dev.power_usage().ok().map(|mw| mw as f64 / 1000.0);
    match dev.total_energy_consumption() {
        Ok(mj) => s.energy_mj = Some(mj as f64),
        Err(e) => notes.push(format!(
            "energy counter unsupported ({e}): energy integrated from power"
        )),
    }
    s.mem_used_bytes = dev.memory_info().ok().map(|m| m.used);
    s.proc_mem_bytes = dev.running_compute_processes().ok().and_then(|ps| {
        ps.iter()
            .find(|p| p.pid == pid)
            .and_then(|p| match p.used_gpu_memory {
                UsedGpuMemory::Used(b) => Some(b),
                UsedGpuMemory::Unavailable => None,
            })
    });
    s.util_pct = dev.utilization_rates().ok().map(|u| u.gpu);
    s.sm_clock_mhz = dev.clock_info(Clock::SM).ok();
    s.temp_c = dev.temperature(TemperatureSensor::Gpu).ok();
    s.power_limit_w = dev.enforced_power_limit().ok().map(|mw| mw as f64 / 1000.0);
    (s, notes)
}

/// Takes one sample of the run with child `pid` on `device`.
/// CPU runs: RSS only. GPU runs: NVML fields plus the child's RSS.
pub fn sample_once(device: Device, pid: u32, t: f64) -> (TelemetrySample, Vec<String>) {
    let (mut s, notes) = match device {
        Device::Cpu => (
            TelemetrySample {
                t,
                ..Default::default()
            },
            Vec::new(),
        ),
        Device::Cuda(i) => sample_gpu(i, pid, t),
    };
    (s.rss_bytes, s.hwm_bytes) = read_proc_rss(pid);
    (s, notes)
}

/// A background sampler thread for one run.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    samples: Arc<Mutex<Vec<TelemetrySample>>>,
    notes: Arc<Mutex<Vec<String>>>,
}

impl Sampler {
    /// Starts sampling `pid` on `device` every `period`; `t` is measured from `t0`.
    /// `on_sample` is called from the sampler thread for each sample (e.g. to emit events).
    pub fn start(
        device: Device,
        pid: u32,
        t0: Instant,
        period: Duration,
        on_sample: Box<dyn Fn(&TelemetrySample) + Send>,
    ) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let notes: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
        let (stop2, samples2, notes2) = (stop.clone(), samples.clone(), notes.clone());
        let handle = std::thread::Builder::new()
            .name(format!("telemetry-{device}"))
            .spawn(move || {
                let mut next = Instant::now();
                while !stop2.load(Ordering::Relaxed) {
                    let (s, ns) = sample_once(device, pid, t0.elapsed().as_secs_f64());
                    on_sample(&s);
                    if let Ok(mut v) = samples2.lock() {
                        v.push(s);
                    }
                    if let Ok(mut v) = notes2.lock() {
                        for n in ns {
                            if !v.contains(&n) {
                                v.push(n);
                            }
                        }
                    }
                    next += period;
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    } else {
                        next = now;
                    }
                }
            })
            .ok();
        Sampler {
            stop,
            handle,
            samples,
            notes,
        }
    }

    /// Stops the thread; returns the samples (sorted by `t`) and the notes joined by `; `.
    pub fn finish(mut self) -> (Vec<TelemetrySample>, Option<String>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        let samples = self.samples.lock().map(|v| v.clone()).unwrap_or_default();
        let notes = self.notes.lock().map(|v| v.clone()).unwrap_or_default();
        let note = if notes.is_empty() {
            None
        } else {
            Some(notes.join("; "))
        };
        (samples, note)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_status() {
        let text = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n";
        assert_eq!(
            parse_proc_status(text),
            (Some(1024 * 1024), Some(2048 * 1024))
        );
        assert_eq!(parse_proc_status("Name: x\n"), (None, None));
    }

    #[test]
    fn samples_own_process_rss() {
        let pid = std::process::id();
        let (s, notes) = sample_once(Device::Cpu, pid, 0.0);
        assert!(s.rss_bytes.unwrap() > 0);
        assert!(notes.is_empty());
        let sampler = Sampler::start(
            Device::Cpu,
            pid,
            Instant::now(),
            Duration::from_millis(10),
            Box::new(|_| {}),
        );
        std::thread::sleep(Duration::from_millis(60));
        let (samples, _) = sampler.finish();
        assert!(samples.len() >= 2);
    }

    /// On a GPU machine: NVML fields are read (run with `--nocapture` to see a sample).
    #[test]
    fn gpu_sample_with_nvml() {
        if nvml_status().is_err() {
            return;
        }
        let (s, notes) = sample_once(Device::Cuda(0), std::process::id(), 0.0);
        println!("{s:?} {notes:?}");
        assert!(s.power_w.is_some_and(|w| w > 0.0));
        assert!(s.mem_used_bytes.is_some());
        assert!(s.power_limit_w.is_some());
        assert!(s.sm_clock_mhz.is_some());
        assert!(s.temp_c.is_some());
    }

    #[test]
    fn gpu_fields_null_without_nvml() {
        if nvml_status().is_ok() {
            return; // a GPU machine: nothing to check here
        }
        let (s, notes) = sample_once(Device::Cuda(0), std::process::id(), 0.0);
        assert_eq!(s.power_w, None);
        assert!(notes[0].starts_with("NVML unavailable"), "{notes:?}");
    }
}
