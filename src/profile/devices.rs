//! The device slots of `run.devices`: `cpu`, `cuda:N`, or `cuda` for every visible GPU
//! (counted through [`crate::telemetry::gpu_count`], which knows nothing of profiles).

use crate::spec::Device;

/// `run.devices = ["cuda"]`: one slot per GPU this process can see.
pub const ALL_GPUS: &str = "cuda";

/// The device slots of `run.devices` (already validated): each `cpu` / `cuda:N` entry, or for
/// `["cuda"]` every visible GPU: the indices listed in `CUDA_VISIBLE_DEVICES` when it lists
/// numbers, else every GPU that NVML reports (indices 0..n, PCI bus order).
///
/// Errors: `["cuda"]` and no GPU can be seen (the message says why).
pub fn resolve_devices(devices: &[String]) -> Result<Vec<Device>, String> {
    resolve_devices_with(
        devices,
        std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref(),
        crate::telemetry::gpu_count,
    )
}

/// [`resolve_devices`] with the environment and the GPU count passed in (tests).
pub fn resolve_devices_with(
    devices: &[String],
    visible: Option<&str>,
    count: impl FnOnce() -> Result<u32, String>,
) -> Result<Vec<Device>, String> {
    if devices.len() != 1 || devices[0] != ALL_GPUS {
        return Ok(devices.iter().filter_map(|d| Device::parse(d)).collect());
    }
    if let Some(v) = visible.map(str::trim).filter(|v| !v.is_empty()) {
        let listed: Option<Vec<Device>> = v
            .split(',')
            .map(|x| x.trim().parse().ok().map(Device::Cuda))
            .collect();
        if let Some(list) = listed {
            return Ok(list);
        }
    }
    match count() {
        Ok(0) => Err("run.devices = [\"cuda\"]: no GPU is visible; list devices such as [\"cuda:0\"] or use [\"cpu\"]".into()),
        Ok(n) => Ok((0..n).map(Device::Cuda).collect()),
        Err(e) => Err(format!(
            "run.devices = [\"cuda\"]: cannot count the GPUs ({e}); list them, e.g. [\"cuda:0\", \"cuda:1\"]"
        )),
    }
}
