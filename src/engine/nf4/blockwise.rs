//! bitsandbytes' 8-bit block-wise quantisation (`functional.py`: `create_dynamic_map`,
//! `quantize_blockwise`, `dequantize_blockwise`): a 256-entry dynamic map (Dettmers 2015) and,
//! per block of elements, one f32 absmax and one 8-bit code per element.
//!
//! Used twice: for the double-quantised NF4 block statistics (`super`, 256 absmax values per
//! block) and for the 8-bit optimizer moments (`optim`, 256 elements per block).

use std::sync::OnceLock;

/// Index of the entry of the ascending table `code` nearest to `x`; ties go to the lower index.
/// NaN maps to the entry nearest 0.
pub(crate) fn nearest_sorted(code: &[f32], x: f32) -> usize {
    let x = if x.is_nan() { 0.0 } else { x };
    let hi = code.partition_point(|&c| c < x);
    if hi == 0 {
        return 0;
    }
    if hi == code.len() {
        return code.len() - 1;
    }
    let lo = hi - 1;
    if (x - code[lo]) <= (code[hi] - x) {
        lo
    } else {
        hi
    }
}

/// bitsandbytes' `create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)`: 256 ascending
/// f32 values in [-1, 1] (signed) or [0, 1] (unsigned) made of a decimal exponent
/// `10^(i-6)`, i = 0..6, times the midpoints of an even split of [0.1, 1] with `2^i` (signed)
/// or `2^(i+1)` (unsigned) intervals, plus 0 and 1 (Dettmers 2015, "8-Bit Approximations for
/// Parallelism in Deep Learning"). Computed in f32 as torch does (`linspace`, midpoints, scale),
/// so entries agree with bitsandbytes' to within an f32 rounding.
pub fn dynamic_map(signed: bool) -> [f32; 256] {
    let max_exp = 7i32;
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..max_exp {
        let items = if signed {
            (1usize << i) + 1
        } else {
            (1usize << (i + 1)) + 1
        };
        let bounds = linspace_f32(0.1, 1.0, items);
        let scale = 10f64.powi(i - (max_exp - 1)) as f32;
        for w in bounds.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            if signed {
                data.push(-scale * mean);
            }
        }
    }
    data.push(0.0);
    data.push(1.0);
    debug_assert_eq!(data.len(), 256);
    data.sort_by(|a, b| a.total_cmp(b));
    let mut out = [0f32; 256];
    out.copy_from_slice(&data);
    out
}

/// `torch.linspace(start, end, steps)` in f32: the first half stepped from `start`, the second
/// half stepped back from `end`.
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (steps - 1 - i) as f32
            }
        })
        .collect()
}

/// bitsandbytes' `quantize_blockwise(x, code, blocksize)`: per block of `block` elements, the
/// absolute maximum, and each element divided by it and replaced by the index of the nearest
/// `code` entry (`code` ascending, 256 entries). A final partial block has its own absmax. An
/// all-zero block gets absmax 0 and the code index nearest 0.
///
/// Returns (codes, one per element; absmax, one f32 per block).
pub fn quantize_blockwise(x: &[f32], code: &[f32; 256], block: usize) -> (Vec<u8>, Vec<f32>) {
    let mut q = Vec::with_capacity(x.len());
    let mut absmax = Vec::with_capacity(x.len().div_ceil(block));
    for chunk in x.chunks(block) {
        let m = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax.push(m);
        let inv = if m > 0.0 { 1.0 / m } else { 0.0 };
        q.extend(
            chunk
                .iter()
                .map(|v| nearest_sorted(code, (v * inv).clamp(-1.0, 1.0)) as u8),
        );
    }
    (q, absmax)
}

/// bitsandbytes' `dequantize_blockwise`: `code[q[i]] * absmax[i / block]`, f32.
pub fn dequantize_blockwise(q: &[u8], absmax: &[f32], code: &[f32; 256], block: usize) -> Vec<f32> {
    q.iter()
        .enumerate()
        .map(|(i, &c)| code[c as usize] * absmax[i / block])
        .collect()
}

/// [`dynamic_map`]`(true)`, computed once.
pub(crate) fn signed_map() -> &'static [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    MAP.get_or_init(|| dynamic_map(true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_maps_follow_the_definition() {
        let s = dynamic_map(true);
        let u = dynamic_map(false);
        for m in [&s, &u] {
            assert!(m.windows(2).all(|w| w[0] <= w[1]));
            assert_eq!(m[255], 1.0);
            assert!(m.contains(&0.0));
        }
        assert!((s[0] + 0.992_968_75).abs() < 1e-6, "signed min {}", s[0]);
        assert_eq!(u[0], 0.0);
        // Smallest magnitudes: 1e-6 * midpoint of [0.1, 1] = 0.55e-6 (signed, 2 bounds);
        // unsigned: 1e-6 * midpoint of [0.1, 0.55] = 0.325e-6.
        let min_pos_s = s.iter().copied().filter(|&v| v > 0.0).fold(1.0, f32::min);
        let min_pos_u = u.iter().copied().filter(|&v| v > 0.0).fold(1.0, f32::min);
        assert!((min_pos_s - 0.55e-6).abs() < 1e-12);
        assert!((min_pos_u - 0.325e-6).abs() < 1e-12);
        // Signed: 127 positive, 127 negative, zero, one.
        assert_eq!(s.iter().filter(|&&v| v > 0.0).count(), 128);
        assert_eq!(s.iter().filter(|&&v| v < 0.0).count(), 127);
        // Largest below 1 in the signed map: 0.1 exponent level, 64 midpoints of [0.1, 1].
        let step = 0.9f32 / 64.0;
        assert!((s[254] - (1.0 - step / 2.0)).abs() < 1e-6, "{}", s[254]);
    }

    #[test]
    fn blockwise_8bit_roundtrip_is_nearest() {
        let map = dynamic_map(true);
        let x: Vec<f32> = (0..600)
            .map(|k| ((k * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let (q, a) = quantize_blockwise(&x, &map, 256);
        assert_eq!(a.len(), 3);
        let d = dequantize_blockwise(&q, &a, &map, 256);
        for (k, (&xv, &dv)) in x.iter().zip(&d).enumerate() {
            let s = xv / a[k / 256];
            let best = map
                .iter()
                .map(|c| (c - s).abs())
                .fold(f32::INFINITY, f32::min);
            assert!(((dv / a[k / 256]) - s).abs() <= best + 1e-7);
        }
    }

    /// The dynamic maps follow bitsandbytes' `create_dynamic_map` definition level by level:
    /// exponent level i (0..6) holds 2^i (signed, per sign) or 2^(i+1) (unsigned) evenly spaced
    /// values in [0.1, 1) x 10^(i-6), the midpoints of that many equal steps.
    #[test]
    fn dynamic_maps_hold_the_defined_levels() {
        for signed in [true, false] {
            let map = dynamic_map(signed);
            let pos: Vec<f64> = map
                .iter()
                .filter(|&&x| x > 0.0 && x < 1.0)
                .map(|&x| x as f64)
                .collect();
            for i in 0..7i32 {
                let scale = 10f64.powi(i - 6);
                let count = if signed {
                    1usize << i
                } else {
                    1usize << (i + 1)
                };
                let level: Vec<f64> = pos
                    .iter()
                    .copied()
                    .filter(|&x| x >= 0.1 * scale * 0.999_99 && x < scale * 0.999_99)
                    .collect();
                assert_eq!(level.len(), count, "signed {signed} level {i}");
                let step = 0.9 * scale / count as f64;
                for (k, x) in level.iter().enumerate() {
                    let want = 0.1 * scale + step * (k as f64 + 0.5);
                    assert!(
                        (x - want).abs() <= 1e-6 * scale,
                        "signed {signed} level {i} k {k}: {x} vs {want}"
                    );
                }
            }
            if signed {
                let neg: Vec<f32> = map.iter().filter(|&&x| x < 0.0).map(|x| -x).collect();
                assert_eq!(
                    neg.len(),
                    127,
                    "the signed map mirrors all positives but the top one"
                );
            }
        }
    }
}
