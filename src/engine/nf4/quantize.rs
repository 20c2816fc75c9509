//! The first level of NF4 quantisation: per 64-block absmax and the packed 4-bit codes
//! (bitsandbytes `quantize_4bit`, see the module doc of [`super`]). The host loops here are the
//! definition; on CUDA ([`super::cuda`], `cuda/kernels/nf4_quantize.cu`) the same arithmetic
//! runs on the device, so quantising a model does not copy every weight to the host and back.
//! `lorascope selftest engine` checks the two agree byte for byte ([`device_matches_host`]).

use super::{NF4_BLOCK, nearest_nf4};
use crate::engine::memory::host;
use candle_core::{DType, Device, Result, Tensor};

/// Absolute maximum of each [`NF4_BLOCK`]-element block of `x` (the last block may be short);
/// NaN elements are ignored, as by `f32::max`.
pub(super) fn block_absmax(x: &[f32]) -> Vec<f32> {
    x.chunks(NF4_BLOCK)
        .map(|c| c.iter().fold(0f32, |m, v| m.max(v.abs())))
        .collect()
}

/// Packed NF4 codes of `x` against its block `absmax`: element `2k` in the high nibble of byte
/// `k`; each element is `clamp(x / absmax, -1, 1)` (0 when absmax is 0) mapped to its nearest
/// NF4 value. An odd count pads the last low nibble with the code of 0.0, as bitsandbytes pads
/// the scaled values with a zero before packing.
///
/// Errors: the host cannot allocate the codes (out of memory, reported, not aborted).
pub(super) fn pack_codes(x: &[f32], absmax: &[f32]) -> Result<Vec<u8>> {
    let n = x.len();
    let mut packed: Vec<u8> = host::try_zeroed(n.div_ceil(2), "NF4 codes")?;
    for (b, chunk) in x.chunks(NF4_BLOCK).enumerate() {
        let m = absmax[b];
        let inv = if m > 0.0 { 1.0 / m } else { 0.0 };
        for (j, v) in chunk.iter().enumerate() {
            let k = b * NF4_BLOCK + j;
            let q = nearest_nf4((v * inv).clamp(-1.0, 1.0));
            if k.is_multiple_of(2) {
                packed[k / 2] |= q << 4;
            } else {
                packed[k / 2] |= q;
            }
        }
    }
    if !n.is_multiple_of(2) {
        packed[n / 2] |= nearest_nf4(0.0);
    }
    Ok(packed)
}

/// First-level quantisation of a 2-D weight `w` (f32, f16 or bf16 for the device path; any
/// float dtype on the host): the packed codes, u8 `ceil(n/2)` on `w`'s device, and the block
/// absmax values on the host (f32, `ceil(n/64)`), for double quantisation.
///
/// On a CUDA device taking the fused path ([`crate::engine::cuda::fused_path`]) the work runs
/// there; otherwise on the host.
///
/// Errors: a device copy or kernel launch fails.
pub(super) fn first_level(w: &Tensor) -> Result<(Tensor, Vec<f32>)> {
    #[cfg(feature = "cuda")]
    if crate::engine::cuda::fused_path(w.dtype(), w.device()) {
        let flat = w.flatten_all()?.contiguous()?;
        let (packed, absmax) = super::cuda::quantize(&flat)?;
        return Ok((packed, absmax.to_vec1()?));
    }
    on_host(w, w.device())
}

/// [`first_level`] with the arithmetic on the host, the packed codes placed on `dev`.
///
/// Errors: a device copy fails.
pub(super) fn on_host(w: &Tensor, dev: &Device) -> Result<(Tensor, Vec<f32>)> {
    let x: Vec<f32> = w
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let absmax = block_absmax(&x);
    let packed = pack_codes(&x, &absmax)?;
    let len = packed.len();
    Ok((Tensor::from_vec(packed, len, dev)?, absmax))
}

/// Quantises three random weights (64 x 96, 33 x 65 with an odd element count, 256 x 1536), in
/// `dtype`, on `dev` and on the host, and returns the number of packed bytes and block absmax
/// values that differ (0 when the device path is the host arithmetic, as it must be). Weights
/// include zeros, a whole zero block, NaN and infinities, and values halfway between NF4 codes.
///
/// Errors: a device copy or kernel launch fails.
pub fn device_matches_host(dev: &Device, dtype: DType) -> Result<(usize, usize)> {
    let mut mismatched = (0, 0);
    for (o, i, seed) in [(64, 96, 1u64), (33, 65, 2), (256, 1536, 3)] {
        let mut w = Tensor::randn(0f32, 0.02, (o, i), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        // Zeros, a zero block, non-finite values, and exact midpoints between codes.
        w[..NF4_BLOCK].fill(0.0);
        let n = w.len();
        w[n / 2] = f32::NAN;
        w[n / 3] = f32::INFINITY;
        w[n / 3 + 70] = f32::NEG_INFINITY;
        let mid = 0.5 * (super::NF4_CODE[9] + super::NF4_CODE[10]);
        for k in (100..n).step_by(97 + seed as usize) {
            let b = k / NF4_BLOCK * NF4_BLOCK;
            let m = block_absmax(&w[b..(b + NF4_BLOCK).min(n)])[0];
            w[k] = mid * m;
        }
        let t = Tensor::from_vec(w, (o, i), &Device::Cpu)?.to_dtype(dtype)?;
        let on_dev = t.to_device(dev)?;
        let (pd, ad) = first_level(&on_dev)?;
        let (ph, ah) = on_host(&t, &Device::Cpu)?;
        let pd: Vec<u8> = pd.to_device(&Device::Cpu)?.to_vec1()?;
        let ph: Vec<u8> = ph.to_vec1()?;
        mismatched.0 +=
            pd.iter().zip(&ph).filter(|(a, b)| a != b).count() + pd.len().abs_diff(ph.len());
        mismatched.1 += ad
            .iter()
            .zip(&ah)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count()
            + ad.len().abs_diff(ah.len());
    }
    Ok(mismatched)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host loops on hand-checked values: absmax per 64-block, NaN ignored; codes with ties
    /// to the lower index and the odd-count pad.
    #[test]
    fn absmax_and_codes_by_hand() {
        let mut x = vec![0f32; 65];
        x[0] = -2.0;
        x[1] = 1.0;
        x[2] = f32::NAN;
        x[64] = 0.5;
        assert_eq!(block_absmax(&x), vec![2.0, 0.5]);
        let p = pack_codes(&x, &block_absmax(&x)).unwrap();
        // -2/2 = -1 -> 0; 1/2 = 0.5 lies between 0.4407 (12) and 0.5626 (13), nearer 12; NaN -> 7.
        assert_eq!(p[0], 0x0c);
        assert_eq!(p[1] >> 4, 7);
        // Element 64 alone in its block: 0.5/0.5 = 1 -> 15, padded with the code of 0 (7).
        assert_eq!(p[32], 0xf7);
    }

    /// On the CPU the device path is the host path.
    #[test]
    fn cpu_first_level_is_the_host_loops() {
        assert_eq!(
            device_matches_host(&Device::Cpu, DType::F32).unwrap(),
            (0, 0)
        );
        assert_eq!(
            device_matches_host(&Device::Cpu, DType::BF16).unwrap(),
            (0, 0)
        );
    }
}
