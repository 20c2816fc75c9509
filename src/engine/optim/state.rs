//! Where optimizer state lives and in what form, bitsandbytes' rules: 8-bit block-wise state
//! from [`MIN_8BIT_SIZE`] elements (blocks of [`STATE_BLOCK`]), CUDA unified memory for the
//! paged optimizers from [`MIN_PAGED_SIZE`] elements; the bytes by place ([`StateBytes`]) and the
//! run's memory report.

use crate::engine::cuda::vram::VramReservation;
use crate::spec::Optimizer;
use crate::spec::wire::MemoryReport;
use candle_core::Device;

/// Tensors with fewer elements than this keep f32 optimizer state under [`super::AdamW8bit`]
/// (bitsandbytes' `min_8bit_size = 4096`).
pub const MIN_8BIT_SIZE: usize = 4096;

/// Elements per quantisation block of 8-bit optimizer state (bitsandbytes' blockwise
/// optimizers use 256).
pub const STATE_BLOCK: usize = 256;

/// Tensors with fewer elements than this keep their state in ordinary device memory under the
/// paged optimizers (bitsandbytes' `Optimizer8bit.get_state_buffer`: `p.numel() < 1e5` is not
/// paged).
pub const MIN_PAGED_SIZE: usize = 100_000;

/// Whether a tensor of `n` elements gets 8-bit block-wise state under [`super::AdamW8bit`]
/// (`n >= MIN_8BIT_SIZE`); smaller ones keep f32 state.
pub fn state_is_quantized(n: usize) -> bool {
    n >= MIN_8BIT_SIZE
}

/// Whether a tensor of `n` elements gets its state in CUDA unified memory when the optimizer
/// is `paged` (`n >= MIN_PAGED_SIZE`). On CPU nothing is paged whatever this says.
pub fn state_is_paged(n: usize, paged: bool) -> bool {
    paged && n >= MIN_PAGED_SIZE
}

/// Optimizer-state bytes by where they live.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StateBytes {
    /// Ordinary GPU memory.
    pub device: usize,
    /// CUDA unified memory (paged optimizers): the driver may keep it on the GPU or evict it
    /// to host RAM.
    pub managed: usize,
    /// Host RAM (CPU runs).
    pub host: usize,
}

impl StateBytes {
    /// All bytes.
    pub fn total(&self) -> usize {
        self.device + self.managed + self.host
    }
}

/// The [`MemoryReport`] of the run header and summary: an optimizer of `kind` with state
/// `bytes` on `device`, and the `--vram-limit` reservation.
pub fn memory_report(
    bytes: StateBytes,
    kind: Optimizer,
    device: &Device,
    vram: Option<&VramReservation>,
) -> MemoryReport {
    let optimizer_note = kind.is_paged().then(|| {
        if device.is_cpu() {
            "paged: emulated as unpaged on CPU (no device memory to page out of)".to_string()
        } else {
            format!(
                "paged: state of tensors with at least {MIN_PAGED_SIZE} elements in CUDA unified memory, prefetched before each update"
            )
        }
    });
    MemoryReport {
        optimizer_state_device_bytes: Some(bytes.device as u64),
        optimizer_state_managed_bytes: Some(bytes.managed as u64),
        optimizer_state_host_bytes: Some(bytes.host as u64),
        optimizer_note,
        vram_limit_bytes: vram.map(|v| v.limit_bytes),
        vram_reserved_bytes: vram.map(|v| v.reserved_bytes),
        vram_note: vram.map(VramReservation::note),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{AdamW8bit, AdamWConfig, AnyOptimizer};
    use super::*;
    use candle_core::{DType, Var};

    /// bitsandbytes' thresholds: 8-bit state from 4,096 elements, paged state from 100,000
    /// elements and only for the paged optimizers; on CPU nothing is paged and every byte is
    /// host memory.
    #[test]
    fn thresholds_select_f32_and_unpaged_state() {
        assert!(!state_is_quantized(MIN_8BIT_SIZE - 1));
        assert!(state_is_quantized(MIN_8BIT_SIZE));
        assert!(!state_is_paged(MIN_PAGED_SIZE - 1, true));
        assert!(state_is_paged(MIN_PAGED_SIZE, true));
        assert!(!state_is_paged(10 * MIN_PAGED_SIZE, false));
        let sizes = [4095usize, 4096, 100_000];
        let vars: Vec<Var> = sizes
            .iter()
            .map(|&n| Var::zeros(n, DType::F32, &Device::Cpu).unwrap())
            .collect();
        for kind in [Optimizer::PagedAdamW8bit, Optimizer::AdamW8bit] {
            let o = AdamW8bit::with_paging(vars.clone(), AdamWConfig::default(), kind.is_paged())
                .unwrap();
            let q: Vec<bool> = (0..3).map(|i| o.is_quantized(i)).collect();
            assert_eq!(q, vec![false, true, true]);
            assert!(
                (0..3).all(|i| !o.is_paged(i)),
                "CPU: paged emulated as unpaged"
            );
            let b = o.state_bytes_split();
            let want = 2 * 4 * 4095 + 2 * (4096 + 4 * 16) + 2 * (100_000 + 4 * 391);
            assert_eq!(
                b,
                StateBytes {
                    host: want,
                    ..StateBytes::default()
                }
            );
        }
        let o = AnyOptimizer::new(Optimizer::PagedAdamW, vars, AdamWConfig::default()).unwrap();
        let b = o.state_bytes_split();
        assert_eq!(
            (b.device, b.managed, b.host),
            (0, 0, 8 * (4095 + 4096 + 100_000))
        );
    }
}
