// Shared by every lorascope NVRTC module (prepended by `cuda::Module`): f16/bf16 storage
// types, `ld(x) -> float` and `st(ptr, float)` for them and for float (f32 arithmetic, round to
// nearest even on store, as PyTorch's casts), and NEG_INF.
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
