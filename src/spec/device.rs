//! The device a run uses.

use serde::{Deserialize, Serialize};

use super::{UnknownName, parse_exact, spellings};

/// What kind of device a run uses (a profile's devices are all of one kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// The host CPU.
    Cpu,
    /// An NVIDIA GPU through CUDA.
    Cuda,
}

spellings!(DeviceKind { Cpu => "cpu", Cuda => "cuda" });

impl std::str::FromStr for DeviceKind {
    type Err = UnknownName;

    /// Accepts `cpu` or `cuda`.
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        parse_exact(&Self::ALL, Self::as_str, s, "device kind", "cpu or cuda")
    }
}

/// One device slot (profile `run.devices`): `cpu` or `cuda:N`, N being the NVML (physical,
/// PCI bus order) index of the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Device {
    /// The host CPU.
    Cpu,
    /// The GPU of this NVML index.
    Cuda(u32),
}

impl Device {
    /// Parses `cpu` or `cuda:N` (N decimal digits only); `None` for anything else.
    pub fn parse(s: &str) -> Option<Device> {
        if s == "cpu" {
            return Some(Device::Cpu);
        }
        let n = s.strip_prefix("cuda:")?;
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        n.parse().ok().map(Device::Cuda)
    }

    /// CPU or CUDA.
    pub fn kind(self) -> DeviceKind {
        match self {
            Device::Cpu => DeviceKind::Cpu,
            Device::Cuda(_) => DeviceKind::Cuda,
        }
    }
}

impl std::fmt::Display for Device {
    /// `cpu` or `cuda:N`, as [`Device::parse`] reads it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = UnknownName;

    /// As [`Device::parse`].
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        Device::parse(s).ok_or_else(|| UnknownName {
            what: "device",
            given: s.to_string(),
            expected: "cpu or cuda:N",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_print() {
        for d in [Device::Cpu, Device::Cuda(0), Device::Cuda(12)] {
            assert_eq!(d.to_string().parse::<Device>().unwrap(), d);
        }
        for bad in ["cuda", "cuda:", "cuda:+1", "gpu0", "CPU"] {
            assert!(Device::parse(bad).is_none(), "{bad}");
        }
    }
}
