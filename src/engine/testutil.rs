//! Helpers shared by the engine's unit tests (CPU, f64).

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

/// A CPU f64 tensor of `shape` with entries uniform in `[lo, hi)`, deterministic in `seed`.
pub fn rand_uniform(shape: &[usize], seed: u64, lo: f64, hi: f64) -> Tensor {
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| r.random_range(lo..hi)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Largest absolute elementwise difference, compared in f64 (any dtype, same shape).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}
