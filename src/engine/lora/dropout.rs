//! LoRA dropout with a regenerable mask (PEFT's `lora_dropout` on the adapter input, inverted
//! dropout as `torch.nn.Dropout`): `d(x) = x * keep(seed, i) / (1 - p)` elementwise.
//!
//! The mask is a counter-based hash of (seed, element index), so backward regenerates it instead
//! of storing it: element `i` is kept when the top 24 bits of the SplitMix64 output
//! `mix(seed + (i + 1) * GOLDEN_GAMMA)` (Steele, Lea, Flood 2014; Vigna's `splitmix64.c`) are
//! at least `round(p * 2^24)`. The CUDA kernels compute the same integers: the hash is written
//! once in CUDA, as `keep` in `cuda/kernels/lora.cu`, and [`splitmix64`] mirrors it here; the
//! tests check the Rust against SplitMix64's published outputs and the `.cu` text against these
//! constants (and, on a GPU, the two masks against each other).

use crate::engine::ops::{CpuLoops, cpu_map};
use candle_core::{CpuStorage, Layout, Result, Shape, WithDType};

/// SplitMix64's increment, `2^64 / phi` rounded to odd.
const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
/// SplitMix64's first finaliser multiplier (after `z ^ (z >> 30)`).
const MIX1: u64 = 0xBF58_476D_1CE4_E5B9;
/// SplitMix64's second finaliser multiplier (after `z ^ (z >> 27)`).
const MIX2: u64 = 0x94D0_49BB_1331_11EB;

/// Output `index` of a SplitMix64 generator seeded with `seed`: its state after `index + 1`
/// increments, finalised. `cuda/kernels/lora.cu` `keep` computes the same.
pub fn splitmix64(seed: u64, index: u64) -> u64 {
    let mut z = seed.wrapping_add(index.wrapping_add(1).wrapping_mul(GOLDEN_GAMMA));
    z = (z ^ (z >> 30)).wrapping_mul(MIX1);
    z = (z ^ (z >> 27)).wrapping_mul(MIX2);
    z ^ (z >> 31)
}

/// The keep threshold on the hash's top 24 bits for drop probability `p`: `round(p * 2^24)`.
fn threshold(p: f64) -> u64 {
    (p * 16_777_216.0).round() as u64
}

/// Whether element `index` of a dropout mask seeded with `seed` is kept at drop probability
/// `p`: the top 24 bits of [`splitmix64`]`(seed, index)` compared with `round(p * 2^24)`. The
/// same integer arithmetic runs in the CUDA kernels, so CPU and GPU masks are identical and
/// backward regenerates the mask instead of storing it.
pub fn dropout_keep(seed: u64, index: u64, p: f64) -> bool {
    (splitmix64(seed, index) >> 40) >= threshold(p)
}

/// Inverted dropout with a regenerable mask: `x * keep(seed, i) / (1 - p)` elementwise over the
/// contiguous input (any float dtype; same shape out). See [`dropout_keep`].
#[derive(Debug, Clone, Copy)]
pub struct HashDropout {
    /// Drop probability in [0, 1).
    pub p: f64,
    /// Mask seed.
    pub seed: u64,
}

impl HashDropout {
    /// The kernels' dropout arguments: (seed, threshold on the hash's top 24 bits,
    /// `1 / (1 - p)` in f32).
    #[cfg(feature = "cuda")]
    pub(crate) fn kernel_args(&self) -> (u64, u64, f32) {
        (self.seed, threshold(self.p), (1.0 / (1.0 - self.p)) as f32)
    }
}

impl candle_core::CustomOp1 for HashDropout {
    fn name(&self) -> &'static str {
        <Self as CpuLoops>::NAME
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((cpu_map(self, &[(s, l)])?, l.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let range = crate::engine::ops::contiguous_range(l, "dropout")?;
        Ok((
            super::cuda::hash_dropout(s, range, self)?,
            l.shape().clone(),
        ))
    }
}

impl CpuLoops for HashDropout {
    const NAME: &'static str = "hash-dropout";
    fn f<T: WithDType>(&self, xs: &[&[T]]) -> Result<Vec<T>> {
        let inv = 1.0 / (1.0 - self.p);
        Ok(xs[0]
            .iter()
            .enumerate()
            .map(|(i, x)| {
                if dropout_keep(self.seed, i as u64, self.p) {
                    T::from_f64(x.to_f64() * inv)
                } else {
                    T::from_f64(0.0)
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_keeps_about_one_minus_p_and_is_a_pure_function_of_seed_and_index() {
        let n = 200_000u64;
        for p in [0.05, 0.5] {
            let kept = (0..n).filter(|&i| dropout_keep(42, i, p)).count() as f64 / n as f64;
            assert!((kept - (1.0 - p)).abs() < 0.005, "p {p}: kept {kept}");
        }
        let a: Vec<bool> = (0..64).map(|i| dropout_keep(7, i, 0.3)).collect();
        let b: Vec<bool> = (0..64).map(|i| dropout_keep(7, i, 0.3)).collect();
        let c: Vec<bool> = (0..64).map(|i| dropout_keep(8, i, 0.3)).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!((0..1000).all(|i| dropout_keep(3, i, 0.0)));
    }

    /// The hash is SplitMix64: seeded with 0, its first outputs are the reference generator's
    /// (Vigna's `splitmix64.c`); keep decisions follow the top 24 bits by hand.
    #[test]
    fn the_hash_is_splitmix64() {
        assert_eq!(splitmix64(0, 0), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix64(0, 1), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(splitmix64(0, 2), 0x06C4_5D18_8009_454F);
        // seed 42: top 24 bits 12441394 (0.742 of 2^24) at index 0, 2682851 (0.160) at 1.
        assert_eq!(splitmix64(42, 0) >> 40, 12_441_394);
        assert_eq!(splitmix64(42, 1) >> 40, 2_682_851);
        assert!(dropout_keep(42, 0, 0.5) && !dropout_keep(42, 1, 0.5));
        assert!(dropout_keep(42, 1, 0.15) && !dropout_keep(42, 1, 0.16));
        assert_eq!(threshold(0.3), 5_033_165);
    }

    /// The CUDA `keep` in `dropout_keep.cuh` (the header of `lora.cu` and `lora_mma.cu`) is the
    /// same SplitMix64: the same constants and shifts.
    #[test]
    fn the_cuda_hash_uses_the_same_constants() {
        use crate::engine::cuda::source;
        let cu = source::DROPOUT_KEEP;
        let keep = &cu[cu.find("bool keep(").expect("keep() in dropout_keep.cuh")..];
        let keep = &keep[..keep.find('}').expect("end of keep()")];
        let lit = |k: u64| format!("{k:#X}ull").replace("0X", "0x");
        for k in [GOLDEN_GAMMA, MIX1, MIX2] {
            let lit = lit(k);
            assert!(keep.contains(&lit), "{lit} not in keep(): {keep}");
        }
        for shift in [
            "seed + (i + 1ull) *",
            "z ^ (z >> 30)",
            "z ^ (z >> 27)",
            "z ^= z >> 31",
            "(z >> 40) >= thr",
        ] {
            assert!(keep.contains(shift), "{shift:?} not in keep(): {keep}");
        }
        // One hash: no other copy of the constants in the kernels that use it.
        let gamma = lit(GOLDEN_GAMMA);
        assert_eq!(cu.matches(&gamma).count(), 1);
        for module in [source::LORA, source::LORA_MMA] {
            assert!(!module.contains(&gamma));
            assert!(
                module.contains("keep("),
                "a LoRA module that no longer uses keep()"
            );
        }
    }

    /// On a GPU (CUDA builds with a device), the kernel's mask equals the CPU's.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_and_cpu_masks_agree() {
        use candle_core::{DType, Device, Tensor};
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("no CUDA device: skipped");
            return;
        };
        let op = HashDropout { p: 0.3, seed: 99 };
        let x = Tensor::ones(10_000, DType::F32, &Device::Cpu).unwrap();
        let cpu: Vec<f32> = x.apply_op1_no_bwd(&op).unwrap().to_vec1().unwrap();
        let on_gpu = x.to_device(&gpu).unwrap().apply_op1_no_bwd(&op).unwrap();
        let gpu_v: Vec<f32> = on_gpu.to_device(&Device::Cpu).unwrap().to_vec1().unwrap();
        assert_eq!(cpu, gpu_v);
    }
}
