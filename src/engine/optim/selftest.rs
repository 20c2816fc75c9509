//! `lorascope selftest optim` (CUDA builds): the fused optimizer kernels ([`super::cuda`])
//! against the CPU optimizers, unpaged and paged, and the GPU gradient norm against an f64 host
//! sum.

use super::cuda::sum_squares;
use super::state::{state_is_paged, state_is_quantized};
use super::{AdamW, AdamW8bit, AdamWConfig};
use candle_core::{Result, Tensor, Var};

/// One case of [`selftest`]: GPU vs CPU after `steps` updates.
#[derive(Debug, Clone)]
pub struct SelftestCase {
    /// `adamw` or `adamw8bit`.
    pub optimizer: &'static str,
    /// State in unified memory requested.
    pub paged: bool,
    /// Elements of the tensor.
    pub elems: usize,
    /// Where the GPU state went: `f32`/`8bit`, `device`/`managed`.
    pub placement: String,
    /// Largest |gpu - cpu| over the parameters.
    pub max_abs: f64,
    /// Largest |gpu - cpu| / max(|cpu|, 1e-3).
    pub max_rel: f64,
    /// Whether the placement is the expected one and the errors are within tolerance.
    pub pass: bool,
}

/// Tolerance of [`selftest`] on parameters (absolute and relative): the arithmetic is the
/// same, so the expected error is 0; this leaves room for one 8-bit code landing on the other
/// side of a tie after an f32 rounding difference.
pub const SELFTEST_TOL: f64 = 1e-5;

/// Run the fused kernels (unpaged and paged) against the CPU optimizers for `steps` updates on
/// random tensors of 1,000, 5,000 and 300,000 elements, on CUDA device `ordinal`.
///
/// Errors: the device cannot be opened, or a kernel fails to compile or launch.
pub fn selftest(ordinal: usize, steps: usize) -> Result<Vec<SelftestCase>> {
    use candle_core::Device;
    use rand::{Rng, SeedableRng};
    let gpu = Device::new_cuda(ordinal)?;
    let cfg = AdamWConfig {
        lr: 1e-2,
        ..AdamWConfig::default()
    };
    let mut out = Vec::new();
    for (oi, name) in ["adamw", "adamw8bit"].into_iter().enumerate() {
        for paged in [false, true] {
            for (si, n) in [1000usize, 5000, 300_000].into_iter().enumerate() {
                let mut rng =
                    rand_chacha::ChaCha8Rng::seed_from_u64((oi * 100 + si * 10) as u64 + 7);
                let x0: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                let vc = Var::from_vec(x0.clone(), n, &Device::Cpu)?;
                let vg = Var::from_vec(x0, n, &gpu)?;
                enum Pair {
                    A(AdamW, AdamW),
                    B(AdamW8bit, AdamW8bit),
                }
                let mut pair = if oi == 0 {
                    Pair::A(
                        AdamW::new(vec![vc.clone()], cfg)?,
                        AdamW::with_paging(vec![vg.clone()], cfg, paged)?,
                    )
                } else {
                    Pair::B(
                        AdamW8bit::new(vec![vc.clone()], cfg)?,
                        AdamW8bit::with_paging(vec![vg.clone()], cfg, paged)?,
                    )
                };
                let (quant, on_managed) = match &pair {
                    Pair::A(_, g) => (false, g.is_paged(0)),
                    Pair::B(_, g) => (g.is_quantized(0), g.is_paged(0)),
                };
                for step in 0..steps {
                    // Gradient = the constant c: d/dx sum(x * c) = c exactly on both devices.
                    let scale = if step % 2 == 0 { 1.0 } else { 0.01 };
                    let c: Vec<f32> = (0..n)
                        .map(|_| scale * rng.random_range(-1.0f32..1.0))
                        .collect();
                    let gc = Tensor::from_vec(c.clone(), n, &Device::Cpu)?;
                    let gg = Tensor::from_vec(c, n, &gpu)?;
                    let grads_c = (vc.as_tensor() * &gc)?.sum_all()?.backward()?;
                    let grads_g = (vg.as_tensor() * &gg)?.sum_all()?.backward()?;
                    let lr = cfg.lr * (1.0 + step as f64) / steps as f64;
                    match &mut pair {
                        Pair::A(c, g) => {
                            c.step(&grads_c, lr, 0.5)?;
                            g.step(&grads_g, lr, 0.5)?;
                        }
                        Pair::B(c, g) => {
                            c.step(&grads_c, lr, 0.5)?;
                            g.step(&grads_g, lr, 0.5)?;
                        }
                    }
                }
                let a: Vec<f32> = vc.as_tensor().to_vec1()?;
                let b: Vec<f32> = vg.as_tensor().to_device(&Device::Cpu)?.to_vec1()?;
                let (mut max_abs, mut max_rel) = (0f64, 0f64);
                for (x, y) in a.iter().zip(&b) {
                    let d = (*x as f64 - *y as f64).abs();
                    let d = if d.is_nan() { f64::INFINITY } else { d };
                    max_abs = max_abs.max(d);
                    max_rel = max_rel.max(d / (x.abs() as f64).max(1e-3));
                }
                let want_quant = oi == 1 && state_is_quantized(n);
                let want_managed = state_is_paged(n, paged);
                out.push(SelftestCase {
                    optimizer: name,
                    paged,
                    elems: n,
                    placement: format!(
                        "{}/{}",
                        if quant { "8bit" } else { "f32" },
                        if on_managed { "managed" } else { "device" }
                    ),
                    max_abs,
                    max_rel,
                    pass: quant == want_quant
                        && on_managed == want_managed
                        && max_abs <= SELFTEST_TOL
                        && max_rel <= SELFTEST_TOL,
                });
            }
        }
    }
    // Many tensors in one optimizer: the multi-tensor launches (one per state kind) find each
    // block's tensor; sizes straddle the 256-element blocks, and adamw8bit mixes f32 state
    // (under 4,096 elements) with 8-bit state.
    let sizes = [1usize, 255, 256, 257, 1000, 4096, 5000, 300_000];
    for (oi, name) in ["adamw", "adamw8bit"].into_iter().enumerate() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(500 + oi as u64);
        let mut vc = Vec::new();
        let mut vg = Vec::new();
        for &n in &sizes {
            let x0: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            vc.push(Var::from_vec(x0.clone(), n, &Device::Cpu)?);
            vg.push(Var::from_vec(x0, n, &gpu)?);
        }
        let (mut a32, mut a8) = (None, None);
        if oi == 0 {
            a32 = Some((AdamW::new(vc.clone(), cfg)?, AdamW::new(vg.clone(), cfg)?));
        } else {
            a8 = Some((
                AdamW8bit::new(vc.clone(), cfg)?,
                AdamW8bit::new(vg.clone(), cfg)?,
            ));
        }
        for step in 0..steps {
            let (mut lc, mut lg) = (Vec::new(), Vec::new());
            for (i, &n) in sizes.iter().enumerate() {
                let c: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                let gc = Tensor::from_vec(c.clone(), n, &Device::Cpu)?;
                let gg = Tensor::from_vec(c, n, &gpu)?;
                lc.push((vc[i].as_tensor() * &gc)?.sum_all()?);
                lg.push((vg[i].as_tensor() * &gg)?.sum_all()?);
            }
            let grads_c = Tensor::stack(&lc, 0)?.sum_all()?.backward()?;
            let grads_g = Tensor::stack(&lg, 0)?.sum_all()?.backward()?;
            let lr = cfg.lr * (1.0 + step as f64) / steps as f64;
            if let Some((c, g)) = &mut a32 {
                c.step(&grads_c, lr, 0.5)?;
                g.step(&grads_g, lr, 0.5)?;
            }
            if let Some((c, g)) = &mut a8 {
                c.step(&grads_c, lr, 0.5)?;
                g.step(&grads_g, lr, 0.5)?;
            }
        }
        let (mut max_abs, mut max_rel) = (0f64, 0f64);
        for (c, g) in vc.iter().zip(&vg) {
            let a: Vec<f32> = c.as_tensor().to_vec1()?;
            let b: Vec<f32> = g.as_tensor().to_device(&Device::Cpu)?.to_vec1()?;
            for (x, y) in a.iter().zip(&b) {
                let d = (*x as f64 - *y as f64).abs();
                let d = if d.is_nan() { f64::INFINITY } else { d };
                max_abs = max_abs.max(d);
                max_rel = max_rel.max(d / (x.abs() as f64).max(1e-3));
            }
        }
        out.push(SelftestCase {
            optimizer: name,
            paged: false,
            elems: sizes.iter().sum(),
            placement: format!("{} tensors in one optimizer", sizes.len()),
            max_abs,
            max_rel,
            pass: max_abs <= SELFTEST_TOL && max_rel <= SELFTEST_TOL,
        });
    }
    // The gradient norm's sum of squares: GPU (f64 accumulation) against an f64 host sum over
    // three tensors with a factor, and an inf element must give inf.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(99);
    let sizes = [1000usize, 5000, 300_000];
    let host: Vec<Vec<f32>> = sizes
        .iter()
        .map(|&n| (0..n).map(|_| rng.random_range(-3.0f32..3.0)).collect())
        .collect();
    let factor = 1.0 / 65536.0;
    let want: f64 = host
        .iter()
        .flatten()
        .map(|&g| (g as f64 * factor).powi(2))
        .sum();
    let dev_t = host
        .iter()
        .map(|v| Tensor::from_slice(v, v.len(), &gpu))
        .collect::<Result<Vec<_>>>()?;
    let got = sum_squares(&dev_t.iter().collect::<Vec<_>>(), factor)?;
    let mut with_inf = host[0].clone();
    with_inf[17] = f32::INFINITY;
    let inf_t = Tensor::from_slice(&with_inf, with_inf.len(), &gpu)?;
    let got_inf = sum_squares(&[&dev_t[1], &inf_t], factor)?;
    let abs = (got - want).abs();
    let rel = abs / want.abs().max(1e-300);
    out.push(SelftestCase {
        optimizer: "grad-norm",
        paged: false,
        elems: sizes.iter().sum(),
        placement: "f64 sum of squares".into(),
        max_abs: abs,
        max_rel: rel,
        pass: rel <= 1e-9 && got_inf.is_infinite(),
    });
    Ok(out)
}
