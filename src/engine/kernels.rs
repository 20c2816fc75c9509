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
    /// Errors: the NVRTC compile log's first line.
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

/// Whether the engine's fused NVRTC kernels for per-layer ops (RMSNorm, RoPE) run on CUDA:
/// yes unless `LORASCOPE_FUSED=0` is in the environment (read once), which keeps the generic
/// candle code on the GPU too (for comparisons). The CPU always runs the generic code.
pub fn fused_kernels() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("LORASCOPE_FUSED").as_deref() != Ok("0"))
}
