//! 4-bit NormalFloat (NF4) weights with double-quantised statistics, bit-compatible in layout
//! with bitsandbytes' `quantize_4bit(..., quant_type="nf4", blocksize=64,
//! compress_statistics=True)` (bitsandbytes `functional.py` and `backends/default/ops.py`):
//!
//! - the weight is flattened row-major and cut into blocks of [`NF4_BLOCK`] = 64 elements; each
//!   block keeps its absolute maximum `absmax`;
//! - each element is divided by its block's absmax and replaced by the index of the nearest of the
//!   16 [`NF4_CODE`] values (Dettmers et al. 2023, "QLoRA", appendix E);
//! - two indices share a byte, the first element in the high nibble (`packed = q[0::2] << 4 |
//!   q[1::2]`); an odd element count is padded with the code of 0.0 in the last low nibble;
//! - double quantisation: `offset = mean(absmax)`, then `absmax - offset` is quantised
//!   block-wise to 8 bits with [`ABSMAX_BLOCK`] = 256 entries per block against bitsandbytes'
//!   signed dynamic map ([`blockwise::dynamic_map`]`(true)`), one f32 absmax per 256-block.
//!
//! Dequantisation is `NF4_CODE[q] * (DYN[qabsmax[b]] * absmax2[b / 256] + offset)` with
//! `b = i / 64`, computed in f32 and cast to the requested dtype, as bitsandbytes'
//! `dequantize_4bit` after `dequantize_blockwise(qabsmax, state2) + offset`.
//!
//! One deliberate difference: a block whose elements are all zero has absmax 0, and every element
//! is stored as the code for 0.0 (bitsandbytes divides by zero there).
//!
//! The CPU path is plain loops over slices; the CUDA path (`--features cuda`) is a dequantise
//! kernel and two quantise kernels compiled at run time with NVRTC (`cuda/kernels/nf4.cu`,
//! `cuda/kernels/nf4_quantize.cu`, launched from `nf4/cuda.rs`; [`quantize`]).
//! The 8-bit block-wise quantisation of the statistics is [`blockwise`], shared with the 8-bit
//! optimizers.

pub mod blockwise;
#[cfg(feature = "cuda")]
mod cuda;
pub mod quantize;

use crate::engine::ops::{InputGradOp, add_bias, apply_projection, contiguous_range};
use crate::engine::profiler;
use blockwise::{dequantize_blockwise, nearest_sorted, quantize_blockwise, signed_map};
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};

/// Elements per NF4 block (bitsandbytes' default `blocksize=64` for 4-bit weights).
pub const NF4_BLOCK: usize = 64;

/// Block absmax values per 8-bit block in double quantisation (bitsandbytes uses 256).
pub const ABSMAX_BLOCK: usize = 256;

/// The 16 NormalFloat4 values, ascending, exactly as bitsandbytes' NF4 table (float32): the
/// quantiles of N(0, 1) normalised to [-1, 1] with an exact zero (QLoRA appendix E).
#[allow(clippy::excessive_precision)] // bitsandbytes' table, digit for digit
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// Index of the NF4 value nearest to `x` (expected in [-1, 1]; values outside clamp to the
/// ends, as bitsandbytes' `clamp(-1, 1)`). Ties go to the lower index (`argmin`'s rule).
pub fn nearest_nf4(x: f32) -> u8 {
    nearest_sorted(&NF4_CODE, x) as u8
}

/// A weight matrix stored as NF4 with double-quantised block statistics.
///
/// All tensors live on the device the weight was quantised for. Memory: `ceil(n/2)` bytes of
/// codes, one byte per 64 elements of quantised absmax, 4 bytes per 256 x 64 elements of
/// second-level absmax, and the 4-byte offset: about 0.516 byte per parameter.
#[derive(Debug, Clone)]
pub struct Nf4Weight {
    /// Packed 4-bit codes, u8, `ceil(n/2)` elements; element `2k` in the high nibble of byte
    /// `k`, element `2k+1` in the low nibble.
    pub packed: Tensor,
    /// 8-bit codes of `absmax - offset` against [`blockwise::dynamic_map`]`(true)`, u8, one
    /// per 64-block.
    pub qabsmax: Tensor,
    /// Absolute maximum of each 256-block of `absmax - offset`, f32.
    pub absmax2: Tensor,
    /// Mean of the first-level absmax values, added back after dequantising them.
    pub offset: f32,
    /// `(out_features, in_features)` of the original weight.
    pub shape: (usize, usize),
}

impl Nf4Weight {
    /// Quantise a 2-D weight (out, in) of any float dtype on any device, in f32 arithmetic. On
    /// a CUDA device taking the fused path the block statistics and codes are computed there
    /// (the 8-bit double quantisation of the absmax values, one per 64 weights, on the host);
    /// otherwise everything runs on the host. The result is on `w`'s device.
    ///
    /// Errors: `w` is not 2-D, or a device copy fails.
    pub fn quantize(w: &Tensor) -> Result<Self> {
        let (o, i) = w.dims2()?;
        let (packed, absmax) = quantize::first_level(w)?;
        Self::with_statistics(packed, &absmax, (o, i), w.device())
    }

    /// Double-quantise the block `absmax` values (on the host: one value per 64 weights) and
    /// assemble the weight from its packed codes.
    fn with_statistics(
        packed: Tensor,
        absmax: &[f32],
        shape: (usize, usize),
        dev: &Device,
    ) -> Result<Self> {
        let offset =
            (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len().max(1) as f64) as f32;
        let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
        let (qabsmax, absmax2) = quantize_blockwise(&centred, signed_map(), ABSMAX_BLOCK);
        Ok(Self {
            packed,
            qabsmax: Tensor::from_vec(qabsmax, absmax.len(), dev)?,
            absmax2: Tensor::from_vec(absmax2.clone(), absmax2.len(), dev)?,
            offset,
            shape,
        })
    }

    /// Number of weight elements.
    pub fn elem_count(&self) -> usize {
        self.shape.0 * self.shape.1
    }

    /// Bytes held: packed codes + quantised absmax + f32 second-level absmax + the f32 offset.
    pub fn bytes(&self) -> usize {
        self.packed.elem_count() + self.qabsmax.elem_count() + 4 * self.absmax2.elem_count() + 4
    }

    /// The first-level block absmax values after double quantisation (what dequantisation
    /// uses), f32, one per 64-block, on the host.
    ///
    /// Errors: a device copy fails.
    pub fn block_absmax(&self) -> Result<Vec<f32>> {
        let q: Vec<u8> = self.qabsmax.to_device(&Device::Cpu)?.to_vec1()?;
        let a2: Vec<f32> = self.absmax2.to_device(&Device::Cpu)?.to_vec1()?;
        Ok(dequantize_blockwise(&q, &a2, signed_map(), ABSMAX_BLOCK)
            .into_iter()
            .map(|a| a + self.offset)
            .collect())
    }

    /// Dequantise to a fresh (out, in) tensor of `dtype` (f32, f16, bf16 or f64) on the
    /// weight's device. Values are computed in f32 and then rounded to `dtype`. The result is
    /// untracked and owned by the caller: nothing is cached.
    ///
    /// Errors: an unsupported dtype, a device error (CUDA: kernel compile or launch).
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        let op = Dequant {
            n: self.elem_count(),
            offset: self.offset,
            dtype,
        };
        let flat = self
            .packed
            .apply_op3_no_bwd(&self.qabsmax, &self.absmax2, &op)?;
        flat.reshape(self.shape)
    }
}

/// NF4 dequantisation on `dev` against the host loop, value for value (bit patterns), in
/// `dtype` (f32, f16 or bf16): random weights quantised on the host, their codes and
/// statistics copied to `dev`, dequantised on both. The shapes cover the CUDA launcher's two
/// kernels: lengths divisible by 8 (eight weights per thread) and an odd one (one packed byte
/// per thread). Returns the number of values that differ (0 on the CPU, where both are the
/// host loop).
///
/// Errors: device copies or the dequantisation itself failing.
pub fn dequant_device_matches_host(dev: &Device, dtype: DType) -> Result<usize> {
    let mut differ = 0;
    for (o, i) in [(64, 96), (33, 65), (256, 1536), (3, 8)] {
        let w = Tensor::randn(0f32, 0.02, (o, i), &Device::Cpu)?;
        let host = Nf4Weight::quantize(&w)?;
        let on_dev = Nf4Weight {
            packed: host.packed.to_device(dev)?,
            qabsmax: host.qabsmax.to_device(dev)?,
            absmax2: host.absmax2.to_device(dev)?,
            ..host.clone()
        };
        let bits = |t: Tensor| -> Result<Vec<u32>> {
            let t = t.to_device(&Device::Cpu)?.flatten_all()?;
            Ok(match dtype {
                DType::F32 => t.to_vec1::<f32>()?.iter().map(|x| x.to_bits()).collect(),
                DType::F16 => t
                    .to_vec1::<half::f16>()?
                    .iter()
                    .map(|x| x.to_bits() as u32)
                    .collect(),
                DType::BF16 => t
                    .to_vec1::<half::bf16>()?
                    .iter()
                    .map(|x| x.to_bits() as u32)
                    .collect(),
                other => candle_core::bail!("nf4 dequantize check: unsupported dtype {other:?}"),
            })
        };
        let (a, b) = (
            bits(on_dev.dequantize(dtype)?)?,
            bits(host.dequantize(dtype)?)?,
        );
        differ += a.iter().zip(&b).filter(|(x, y)| x != y).count() + a.len().abs_diff(b.len());
    }
    Ok(differ)
}

/// Dequantisation as a candle op over (packed, qabsmax, absmax2), so that CPU and CUDA take
/// the same entry point.
struct Dequant {
    n: usize,
    offset: f32,
    dtype: DType,
}

fn cpu_slice<'a, T: candle_core::WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let (a, b) = contiguous_range(l, "nf4 buffers")?;
    Ok(&s.as_slice::<T>()?[a..b])
}

impl Dequant {
    fn f32_values(&self, packed: &[u8], qabsmax: &[u8], absmax2: &[f32]) -> Vec<f32> {
        let map = signed_map();
        let absmax: Vec<f32> = qabsmax
            .iter()
            .enumerate()
            .map(|(b, &q)| map[q as usize] * absmax2[b / ABSMAX_BLOCK] + self.offset)
            .collect();
        let mut out = Vec::with_capacity(self.n);
        for k in 0..self.n {
            let byte = packed[k / 2];
            let q = if k.is_multiple_of(2) {
                byte >> 4
            } else {
                byte & 0x0f
            };
            out.push(NF4_CODE[q as usize] * absmax[k / NF4_BLOCK]);
        }
        out
    }
}

impl CustomOp3 for Dequant {
    fn name(&self) -> &'static str {
        "nf4-dequantize"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let v = self.f32_values(
            cpu_slice::<u8>(s1, l1)?,
            cpu_slice::<u8>(s2, l2)?,
            cpu_slice::<f32>(s3, l3)?,
        );
        let storage = match self.dtype {
            DType::F32 => CpuStorage::F32(v),
            DType::F64 => CpuStorage::F64(v.into_iter().map(f64::from).collect()),
            DType::F16 => CpuStorage::F16(v.into_iter().map(half::f16::from_f32).collect()),
            DType::BF16 => CpuStorage::BF16(v.into_iter().map(half::bf16::from_f32).collect()),
            other => candle_core::bail!("nf4: cannot dequantise to {other:?}"),
        };
        Ok((storage, Shape::from(self.n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::dequantize(self, (s1, l1), (s2, l2), (s3, l3))
    }
}

/// A frozen linear projection `y = x W^T + b` whose weight is an [`Nf4Weight`]: the QLoRA base
/// layer (bitsandbytes `Linear4bit` with `requires_grad=False`).
///
/// Forward dequantises `W` into a transient (out, in) buffer in `x`'s dtype, multiplies, and
/// drops it; backward dequantises again and returns only `dx = dy W`. The op keeps only the
/// packed weight (and the bias) between forward and backward; no weight gradient exists.
/// `bias`: (out) in the compute dtype. Input (..., in), output (..., out).
#[derive(Debug, Clone)]
pub struct Nf4Linear {
    weight: std::sync::Arc<Nf4Weight>,
    bias: Option<Tensor>,
}

impl Nf4Linear {
    /// Build from a quantised weight and an optional bias (out).
    pub fn new(weight: Nf4Weight, bias: Option<Tensor>) -> Self {
        Self {
            weight: std::sync::Arc::new(weight),
            bias,
        }
    }

    /// The quantised weight.
    pub fn weight(&self) -> &Nf4Weight {
        &self.weight
    }

    /// The bias, (out), if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `(out_features, in_features)`.
    pub fn shape(&self) -> (usize, usize) {
        self.weight.shape
    }

    /// Apply to `x` (..., in) -> (..., out). Records a graph node only when `x` is tracked.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        apply_projection(self, x, self.shape())
    }
}

impl InputGradOp for Nf4Linear {
    const NAME: &'static str = "nf4-linear";
    fn plain(&self, x2: &Tensor) -> Result<Tensor> {
        let w = profiler::section("nf4", "dequant", x2.device(), || {
            self.weight.dequantize(x2.dtype())
        })?;
        let y = x2.matmul(&w.t()?)?;
        drop(w);
        add_bias(y, self.bias.as_ref())
    }
    fn input_grad(&self, _x: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let w = profiler::section("nf4", "dequant", grad.device(), || {
            self.weight.dequantize(grad.dtype())
        })?;
        Ok(Some(grad.matmul(&w)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rand_weight(o: usize, i: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..o * i)
            .map(|_| {
                // Roughly normal, with occasional outliers so block absmax values vary.
                let s: f32 = (0..4).map(|_| rng.random_range(-1.0f32..1.0)).sum();
                let big = if rng.random_range(0..50) == 0 {
                    8.0
                } else {
                    1.0
                };
                0.02 * s * big
            })
            .collect()
    }

    #[test]
    fn code_table_is_bitsandbytes_nf4() {
        // QLoRA's definition: 8 positive quantiles of N(0,1) over linspace(0.9677083, 0.5, 9),
        // 7 negative over linspace(0.9677083, 0.5, 8), zero, normalised by the maximum.
        assert_eq!(NF4_CODE.len(), 16);
        assert_eq!(NF4_CODE[0], -1.0);
        assert_eq!(NF4_CODE[7], 0.0);
        assert_eq!(NF4_CODE[15], 1.0);
        assert!(NF4_CODE.windows(2).all(|w| w[0] < w[1]));
        // 8 positive, 7 negative values.
        assert_eq!(NF4_CODE.iter().filter(|&&v| v > 0.0).count(), 8);
        assert_eq!(NF4_CODE.iter().filter(|&&v| v < 0.0).count(), 7);
    }

    #[test]
    fn packing_puts_the_first_element_in_the_high_nibble() {
        // Row [-1, 1, 0, 1] in one block: absmax 1, codes 0, 15, 7, 15.
        let w = Tensor::from_vec(vec![-1f32, 1.0, 0.0, 1.0], (1, 4), &Device::Cpu).unwrap();
        let q = Nf4Weight::quantize(&w).unwrap();
        let p: Vec<u8> = q.packed.to_vec1().unwrap();
        assert_eq!(p, vec![0x0f, 0x7f]);
        // Odd count: last low nibble is padding.
        let w = Tensor::from_vec(vec![1f32, -1.0, 0.5], (1, 3), &Device::Cpu).unwrap();
        let q = Nf4Weight::quantize(&w).unwrap();
        let p: Vec<u8> = q.packed.to_vec1().unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0], 0xf0);
        assert_eq!(p[1] >> 4, nearest_nf4(0.5));
        assert_eq!(p[1] & 15, 7);
        assert_eq!(nearest_nf4(0.5), 12); // 0.4407 is nearer than 0.5626
    }

    /// Every element is within half the widest gap between neighbouring codes (times the
    /// block absmax, plus the absmax's own double-quantisation error) of its input, and equals
    /// the nearest code times the dequantised absmax exactly.
    #[test]
    fn quantise_dequantise_matches_the_codebook_definition() {
        let (o, i) = (48, 200); // 9600 elements: 150 blocks, 1 partial 256-block of absmax
        let x = rand_weight(o, i, 3);
        let w = Tensor::from_vec(x.clone(), (o, i), &Device::Cpu).unwrap();
        let q = Nf4Weight::quantize(&w).unwrap();
        assert_eq!(q.packed.elem_count(), o * i / 2);
        assert_eq!(q.qabsmax.elem_count(), (o * i).div_ceil(64));
        assert_eq!(q.absmax2.elem_count(), 1);
        let deq: Vec<f32> = q
            .dequantize(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let dq_absmax = q.block_absmax().unwrap();
        let true_absmax: Vec<f32> = x
            .chunks(64)
            .map(|c| c.iter().fold(0f32, |m, v| m.max(v.abs())))
            .collect();
        // Double-quantised absmax: error at most half a step of the dynamic map near the
        // value, bounded by (1 - 0.9953) / 2 ~ 0.0071 of the 256-block's absmax, relative.
        let a2: Vec<f32> = q.absmax2.to_vec1().unwrap();
        for (b, (d, t)) in dq_absmax.iter().zip(&true_absmax).enumerate() {
            let tol = 0.0071 * a2[b / 256] + 1e-7;
            assert!((d - t).abs() <= tol, "block {b}: {d} vs {t} (tol {tol})");
        }
        let max_gap = NF4_CODE
            .windows(2)
            .map(|w| w[1] - w[0])
            .fold(0f32, f32::max);
        let packed: Vec<u8> = q.packed.to_vec1().unwrap();
        for (k, (&xv, &dv)) in x.iter().zip(&deq).enumerate() {
            let b = k / 64;
            let code = if k.is_multiple_of(2) {
                packed[k / 2] >> 4
            } else {
                packed[k / 2] & 15
            };
            // The stored code is the nearest to x / true absmax.
            assert_eq!(code, nearest_nf4(xv / true_absmax[b]), "elem {k}");
            // Dequantised value is the code times the dequantised absmax.
            assert_eq!(dv, NF4_CODE[code as usize] * dq_absmax[b]);
            // Error bound.
            let bound =
                0.5 * max_gap * true_absmax[b] + (dq_absmax[b] - true_absmax[b]).abs() + 1e-6;
            assert!((xv - dv).abs() <= bound, "elem {k}: {xv} vs {dv}");
        }
    }

    /// Inputs that are codebook values times a block absmax that the double quantisation
    /// represents exactly come back exactly.
    #[test]
    fn codebook_multiples_round_trip_exactly() {
        // Every block has absmax 0.5 -> offset 0.5, centred absmax all 0 -> exact.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let (o, i) = (8, 128);
        let mut x = Vec::with_capacity(o * i);
        for k in 0..o * i {
            let c = if k % 64 == 0 {
                15
            } else {
                rng.random_range(0..16)
            };
            x.push(NF4_CODE[c] * 0.5);
        }
        let w = Tensor::from_vec(x.clone(), (o, i), &Device::Cpu).unwrap();
        let q = Nf4Weight::quantize(&w).unwrap();
        assert_eq!(q.offset, 0.5);
        let deq: Vec<f32> = q
            .dequantize(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(deq, x);
        // f64, f16 and bf16 outputs are the f32 values rounded.
        let d64: Vec<f64> = q
            .dequantize(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(d64.iter().zip(&x).all(|(a, b)| *a == *b as f64));
        let d16: Vec<half::f16> = q
            .dequantize(DType::F16)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            d16.iter()
                .zip(&x)
                .all(|(a, b)| *a == half::f16::from_f32(*b))
        );
    }

    #[test]
    fn bytes_are_about_half_a_byte_per_parameter() {
        let w = Tensor::zeros((256, 1024), DType::F32, &Device::Cpu).unwrap();
        let q = Nf4Weight::quantize(&w).unwrap();
        let n: usize = 256 * 1024;
        assert_eq!(q.bytes(), n / 2 + n / 64 + 4 * (n / 64).div_ceil(256) + 4);
        let per = q.bytes() as f64 / n as f64;
        assert!((0.51..0.52).contains(&per), "{per}");
        // All-zero weight dequantises to zeros.
        let d = q.dequantize(DType::F32).unwrap();
        assert_eq!(
            d.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }
}
