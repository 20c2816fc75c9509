//! Synthetic weights drawn on the GPU straight into the compute dtype
//! (`cuda/kernels/synth.cu`), for `weights.rs` `synth`.
//!
//! Why: drawn with candle (`Tensor::randn` in f32, then cast) every weight briefly exists in
//! f32 beside its compute-dtype copy, on top of everything loaded before it. For an untied
//! `lm_head` loaded last (Llama-3.1-8B: 128,256 x 4,096) that is 2.1 GB more than training
//! ever holds, so the process peak of a synthetic run was its load, not its step (BENCHMARKS.md,
//! "The 8B presets' peak is the load"), which real bf16 weights do not show. Here the only
//! device memory a draw takes is the tensor itself.

use super::launch::{Arg, Buf, Module, grid_stride, launch};
use super::{kernel_name, source};
use candle_core::{CudaDevice, DType, Result, Tensor};

static MODULE: Module = Module::new("lorascope_synth", source::SYNTH);

/// At most this many 256-thread blocks (the grid-stride loop covers the rest).
const MAX_BLOCKS: usize = 65_535 * 16;

/// A tensor of `shape` in `dt` (f32, f16, bf16) on `dev`, each element `std * z` with `z` a
/// standard normal from a hash of (`seed`, element index): deterministic for a seed, the same
/// values on every GPU. Values differ from the CPU's synthetic weights (a ChaCha8 stream).
///
/// Errors: another dtype, out of memory, kernel compile or launch errors.
pub fn normal(dev: &CudaDevice, shape: &[usize], dt: DType, seed: u64, std: f32) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let name = kernel_name("synth_normal", dt, "synthetic weights")?;
    let out = Buf::alloc(dev, dt, n)?;
    let args = [out.arg(), Arg::U64(n as u64), Arg::U64(seed), Arg::F32(std)];
    launch(dev, &MODULE, &name, grid_stride(n, MAX_BLOCKS), &args)?;
    out.into_tensor(shape)
}
