//! NVRTC plumbing shared by the engine's CUDA kernels (compiled at first use, no nvcc at
//! build time): a C++ prelude with f16/bf16 load/store helpers (f32 arithmetic, round to
//! nearest even on store, as PyTorch's casts), and a per-module compile cache.

/// CUDA C++ prelude: `f16_t`/`bf16_t` storage types, `ld(x) -> float` and `st(ptr, float)`
/// for them and for `float`, and `NEG_INF`.
pub const PRELUDE: &str = r#"
struct f16_t { unsigned short x; };
struct bf16_t { unsigned short x; };
#define NEG_INF __int_as_float(0xff800000)
__device__ __forceinline__ float ld(float v) { return v; }
__device__ __forceinline__ float ld(f16_t v) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.x)); return f;
}
__device__ __forceinline__ float ld(bf16_t v) { return __uint_as_float(((unsigned int)v.x) << 16); }
__device__ __forceinline__ unsigned short f32_to_bf16_bits(float x) {
    unsigned int u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
__device__ __forceinline__ unsigned short f32_to_f16_bits(float x) {
    unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x)); return h;
}
__device__ __forceinline__ void st(float* p, float v) { *p = v; }
__device__ __forceinline__ void st(f16_t* p, float v) { p->x = f32_to_f16_bits(v); }
__device__ __forceinline__ void st(bf16_t* p, float v) { p->x = f32_to_bf16_bits(v); }
"#;

/// The kernel-name suffix of the float dtypes the NVRTC kernels are instantiated for (`f32`,
/// `f16`, `bf16`, as in `swiglu_fwd_bf16`).
///
/// Errors: any other dtype, naming the op (`what`) that has no kernel for it.
pub fn dtype_suffix(dt: candle_core::DType, what: &str) -> candle_core::Result<&'static str> {
    use candle_core::DType;
    Ok(match dt {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => candle_core::bail!("{what}: no CUDA kernel for {other:?}"),
    })
}

/// Whether the fused CUDA kernels are used where an op has them: true unless the environment
/// sets `LORASCOPE_FUSED=0` (read once per process), which makes the GPU run the generic candle
/// code instead (for comparison and as a fallback).
pub fn fused_kernels() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("LORASCOPE_FUSED").as_deref() != Ok("0"))
}

/// Run `$body` on the slices of CPU storages that share one float dtype (f32, f64, f16, bf16)
/// and wrap the `Vec` it returns in a storage of that dtype; inside `$body`, `$T` names the
/// element type. Storages of another dtype, or of different dtypes, fail with `$what`.
///
/// `map_cpu_float!("op: unsupported dtype", (s => v), T => f(&v[a..b]))`
macro_rules! map_cpu_float {
    ($what:expr, ($($s:expr => $v:ident),+), $T:ident => $body:expr) => {{
        use candle_core::CpuStorage as C;
        match ($($s,)+) {
            ($(C::F32($v),)+) => {
                #[allow(dead_code)]
                type $T = f32;
                C::F32($body)
            }
            ($(C::F64($v),)+) => {
                #[allow(dead_code)]
                type $T = f64;
                C::F64($body)
            }
            ($(C::F16($v),)+) => {
                #[allow(dead_code)]
                type $T = half::f16;
                C::F16($body)
            }
            ($(C::BF16($v),)+) => {
                #[allow(dead_code)]
                type $T = half::bf16;
                C::BF16($body)
            }
            _ => candle_core::bail!("{}", $what),
        }
    }};
}
pub(crate) use map_cpu_float;

#[cfg(feature = "cuda")]
pub use cuda::*;

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::Result;
    use candle_core::cuda_backend::cudarc;
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    /// A kernel error as a candle error.
    pub fn err(e: impl std::fmt::Display) -> candle_core::Error {
        candle_core::Error::Msg(format!("lorascope cuda kernel: {e}"))
    }

    /// PTX of `prelude + src`, compiled once per `module` name per process.
    ///
    /// Errors: compile failures, with NVRTC's log.
    pub fn ptx(module: &'static str, prelude: &str, src: &str) -> Result<&'static str> {
        static CACHE: OnceLock<Mutex<HashMap<&'static str, &'static str>>> = OnceLock::new();
        let cache = CACHE.get_or_init(Mutex::default);
        let mut map = cache
            .lock()
            .map_err(|_| candle_core::Error::Msg("kernel cache poisoned".into()))?;
        if let Some(p) = map.get(module) {
            return Ok(p);
        }
        let full = format!("{prelude}\n{src}");
        let ptx = cudarc::nvrtc::compile_ptx(full)
            .map_err(|e| err(format!("compiling {module}: {e}")))?
            .to_src();
        let leaked: &'static str = Box::leak(ptx.into_boxed_str());
        map.insert(module, leaked);
        Ok(leaked)
    }
}

#[cfg(test)]
mod tests {
    use super::dtype_suffix;
    use candle_core::DType;

    /// Kernel names end in the dtype's suffix; other dtypes are refused with the op's name.
    #[test]
    fn dtype_suffixes() {
        assert_eq!(dtype_suffix(DType::F32, "op").unwrap(), "f32");
        assert_eq!(dtype_suffix(DType::F16, "op").unwrap(), "f16");
        assert_eq!(dtype_suffix(DType::BF16, "op").unwrap(), "bf16");
        let e = dtype_suffix(DType::F64, "swiglu").unwrap_err().to_string();
        assert!(e.contains("swiglu: no CUDA kernel for F64"), "{e}");
    }
}
