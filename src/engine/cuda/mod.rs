//! The engine's CUDA layer, below every op: which path an op takes, kernel names, the CUDA C++
//! sources, and (`--features cuda`) the NVRTC compile cache, the one launch helper and device
//! buffers as kernel arguments ([`launch`]); `--vram-limit` ([`vram`]).
//!
//! Kernels are CUDA C++ in `kernels/*.cu`, one file per op family, `include_str!`'d
//! ([`source`]) and compiled by NVRTC at first use (no nvcc at build time), each behind the
//! shared prelude `kernels/prelude.cuh` (f16/bf16 storage types, `ld`/`st` in f32). Every
//! kernel exists for f32, f16 and bf16 storage, named `<root>_<suffix>` ([`kernel_name`]).
//!
//! An op asks [`fused_path`] whether its tensors take its kernels (CUDA, a dtype with a kernel,
//! `LORASCOPE_FUSED` not `0`), plus its own shape check where it has one; otherwise it runs its
//! generic candle code.
//!
//! Imports: nothing above this module (ops, nf4, lora, optim import it).

#[cfg(feature = "cuda")]
pub(crate) mod blas;
#[cfg(feature = "cuda")]
pub(crate) mod launch;
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) mod ptx_cache;
#[cfg(feature = "cuda")]
pub(crate) mod synth;
pub mod vram;

use candle_core::{DType, Device};

/// The CUDA C++ sources, one per op family, compiled by NVRTC at run time (see
/// `launch::Module`: each module is [`PRELUDE`], a generated header where the op has one, then
/// its source).
pub mod source {
    /// `f16_t`/`bf16_t` storage types, `ld(x) -> float` and `st(ptr, float)` for them and for
    /// `float` (round to nearest even on store, as PyTorch's casts), and `NEG_INF`.
    pub const PRELUDE: &str = include_str!("kernels/prelude.cuh");
    /// `rms_norm_fwd_*`, `rms_norm_bwd_*` (`ops::RmsNorm`).
    pub const RMS_NORM: &str = include_str!("kernels/rms_norm.cu");
    /// `rope_*` (`ops::apply_rope`, forward and adjoint).
    pub const ROPE: &str = include_str!("kernels/rope.cu");
    /// `causal_softmax_*`, `causal_softmax_grad_*` (`ops::causal_attention`).
    pub const ATTENTION: &str = include_str!("kernels/attention.cu");
    /// `synth_normal_*` (synthetic weights, `synth`).
    pub const SYNTH: &str = include_str!("kernels/synth.cu");
    /// `swiglu_fwd_*`, `swiglu_bwd_*` (`ops::swiglu`).
    pub const SWIGLU: &str = include_str!("kernels/swiglu.cu");
    /// `row_copy8_*` (`ops::row_copy`).
    pub const ROW_COPY: &str = include_str!("kernels/row_copy.cu");
    /// `ce_rows_loss_*`, `ce_rows_grad_*` (`ops::ChunkedCrossEntropy`).
    pub const CROSS_ENTROPY: &str = include_str!("kernels/cross_entropy.cu");
    /// `hash_dropout_*` and the LoRA projection's `lora_cast_*`, `lora_bias_rows_*`
    /// (`lora`); needs the header [`DROPOUT_KEEP`].
    pub const LORA: &str = include_str!("kernels/lora.cu");
    /// `lora_a_dropout_*`: the LoRA projection's `d(x) A^T` with the dropout fused in, on
    /// tensor cores (`lora`); needs the header [`DROPOUT_KEEP`] and NVRTC arch `compute_80`.
    pub const LORA_MMA: &str = include_str!("kernels/lora_mma.cu");
    /// The dropout mask's hash `keep` (mirrored by `lora::dropout_keep`), the header of
    /// [`LORA`] and [`LORA_MMA`].
    pub const DROPOUT_KEEP: &str = include_str!("kernels/dropout_keep.cuh");
    /// `nf4_dequant_*` (`nf4`); needs the header of NF4 and dynamic-map tables.
    pub const NF4: &str = include_str!("kernels/nf4.cu");
    /// `nf4_absmax_*`, `nf4_codes_*` (`nf4::quantize`); needs the header of the NF4 table,
    /// `--fmad=false`.
    pub const NF4_QUANTIZE: &str = include_str!("kernels/nf4_quantize.cu");
    /// `lorascope_adamw32`, `lorascope_adamw_f32state`, `lorascope_adamw8_blockwise`,
    /// `lorascope_sumsq` (`optim`); needs the header of 8-bit state maps, `--fmad=false`.
    pub const OPTIM: &str = include_str!("kernels/optim.cu");
}

/// Whether tensors of `dtype` on `device` take the engine's fused CUDA kernels: a CUDA device,
/// f32/f16/bf16, and `LORASCOPE_FUSED` not set to `0` (read once per process; `0` makes the
/// GPU run each op's generic candle code instead, for comparison and as a fallback). Always
/// false on the CPU. Ops add their own shape checks on top.
pub fn fused_path(dtype: DType, device: &Device) -> bool {
    device.is_cuda() && has_kernel(dtype) && fused_kernels_on()
}

/// Whether the kernels are instantiated for `dtype` (f32, f16, bf16).
fn has_kernel(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// `LORASCOPE_FUSED` is not `0` (read once per process).
fn fused_kernels_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    kernel_switch(&ON, "LORASCOPE_FUSED")
}

/// Whether attention takes its direct CUDA path (`ops/attention/direct.rs`) where it applies
/// (CUDA, no score soft-capping): the fused kernels on and `LORASCOPE_ATTN_DIRECT` not `0`. The
/// memory model sizes attention's backward with it.
pub fn direct_attention_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    fused_kernels_on() && kernel_switch(&ON, "LORASCOPE_ATTN_DIRECT")
}

/// Whether each decoder-layer pass on CUDA casts its adapters once (`lora::CastScope`): the
/// fused kernels on and `LORASCOPE_LAYER_CASTS` not `0`. The memory model counts the casts
/// with it.
pub fn layer_casts_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    fused_kernels_on() && kernel_switch(&ON, "LORASCOPE_LAYER_CASTS")
}

/// Whether the checkpointed layer's hand-written MLP backward on CUDA reuses buffers it owns
/// (`model/mlp.rs`): the down projection's dropout written over its input, the SwiGLU
/// gradients over gate and up. The fused kernels on and `LORASCOPE_INPLACE_MLP` not `0`. The
/// memory model sizes the MLP's backward with it.
pub fn in_place_mlp_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    fused_kernels_on() && kernel_switch(&ON, "LORASCOPE_INPLACE_MLP")
}

/// Whether synthetic weights on CUDA are drawn by the project's kernel straight into the
/// compute dtype (`synth`): `LORASCOPE_SYNTH_KERNEL` not `0` (then candle's f32 `randn` and a
/// cast, as before). Independent of `LORASCOPE_FUSED`. The memory model sizes the load with it.
pub fn synth_kernel_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    kernel_switch(&ON, "LORASCOPE_SYNTH_KERNEL")
}

/// Whether the LoRA projection's forward on CUDA computes `d(x) A^T` in one tensor-core kernel
/// with the dropout fused in (`lora_mma.cu`), where it applies (compute capability 8.0 or
/// newer, f16/bf16, dropout on, `in % 32 == 0`, rank <= 64, aligned buffers; otherwise the
/// dropout kernel and a cuBLAS GEMM): the fused kernels on and `LORASCOPE_FUSED_LORA_A=1`.
/// Off by default: on an H200 it measured no faster (BENCHMARKS.md, third session of
/// 2026-12-04), which suggests the dropout hash rather than the `d(x)` traffic is what costs
/// (the hash was not timed apart). The forward then writes no `d(x)` copy.
pub fn fused_lora_a_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    fused_kernels_on()
        && *ON.get_or_init(|| std::env::var("LORASCOPE_FUSED_LORA_A").as_deref() == Ok("1"))
}

/// A kernel switch: on unless the environment variable `name` is `0`, read once into `cell`
/// (one `static` per switch: `LORASCOPE_FUSED`, `LORASCOPE_VEC8`, `LORASCOPE_ROW_COPY`,
/// `LORASCOPE_NF4_DEQUANT8`, `LORASCOPE_MULTI_TENSOR`, `LORASCOPE_LAYER_CASTS`,
/// `LORASCOPE_ATTN_DIRECT`, `LORASCOPE_INPLACE_MLP`, `LORASCOPE_SYNTH_KERNEL`; the opt-in
/// `LORASCOPE_FUSED_LORA_A` is the other way round).
pub(crate) fn kernel_switch(cell: &'static std::sync::OnceLock<bool>, name: &str) -> bool {
    *cell.get_or_init(|| std::env::var(name).as_deref() != Ok("0"))
}

/// The kernel-name suffix of the float dtypes the kernels are instantiated for (`f32`, `f16`,
/// `bf16`, as in `swiglu_fwd_bf16`).
///
/// Errors: any other dtype, naming the op (`what`) that has no kernel for it.
pub fn dtype_suffix(dt: DType, what: &str) -> candle_core::Result<&'static str> {
    Ok(match dt {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => candle_core::bail!("{what}: no CUDA kernel for {other:?}"),
    })
}

/// The name of kernel `root` instantiated for `dt`: `<root>_<suffix>` (see [`dtype_suffix`]).
///
/// Errors: as [`dtype_suffix`].
pub fn kernel_name(root: &str, dt: DType, what: &str) -> candle_core::Result<String> {
    Ok(format!("{root}_{}", dtype_suffix(dt, what)?))
}

#[cfg(test)]
mod tests {
    use super::{dtype_suffix, fused_path, kernel_name};
    use candle_core::{DType, Device};

    /// Kernel names end in the dtype's suffix; other dtypes are refused with the op's name.
    #[test]
    fn dtype_suffixes() {
        assert_eq!(dtype_suffix(DType::F32, "op").unwrap(), "f32");
        assert_eq!(dtype_suffix(DType::F16, "op").unwrap(), "f16");
        assert_eq!(dtype_suffix(DType::BF16, "op").unwrap(), "bf16");
        assert_eq!(
            kernel_name("rope", DType::BF16, "rope").unwrap(),
            "rope_bf16"
        );
        let e = dtype_suffix(DType::F64, "swiglu").unwrap_err().to_string();
        assert!(e.contains("swiglu: no CUDA kernel for F64"), "{e}");
    }

    /// The CPU never takes the fused path, whatever the dtype.
    #[test]
    fn cpu_takes_the_generic_path() {
        for dt in [DType::F32, DType::F16, DType::BF16, DType::F64] {
            assert!(!fused_path(dt, &Device::Cpu));
        }
    }
}
