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
// Eight consecutive values as f32 and back: one 16-byte access for f16/bf16, two for f32. The
// pointer must be 16-byte aligned (the launchers check with `launch::vec8`); the conversions
// are `ld` and `st`'s, so an 8-wide kernel computes the same bits as its 1-wide twin.
__device__ __forceinline__ void ld8(const float* p, float v[8]) {
    float4 a = ((const float4*)p)[0], b = ((const float4*)p)[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
__device__ __forceinline__ void st8(float* p, const float v[8]) {
    ((float4*)p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    ((float4*)p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
#define HALF8(T)                                                                             \
__device__ __forceinline__ void ld8(const T* p, float v[8]) {                                \
    uint4 u = *(const uint4*)p;                                                              \
    unsigned int w[4] = {u.x, u.y, u.z, u.w};                                                \
    _Pragma("unroll") for (int j = 0; j < 4; ++j) {                                          \
        T lo, hi; lo.x = (unsigned short)(w[j] & 0xffffu); hi.x = (unsigned short)(w[j] >> 16); \
        v[2 * j] = ld(lo); v[2 * j + 1] = ld(hi);                                            \
    }                                                                                        \
}                                                                                            \
__device__ __forceinline__ void st8(T* p, const float v[8]) {                                \
    unsigned int w[4];                                                                       \
    _Pragma("unroll") for (int j = 0; j < 4; ++j) {                                          \
        T lo, hi; st(&lo, v[2 * j]); st(&hi, v[2 * j + 1]);                                  \
        w[j] = (unsigned int)lo.x | ((unsigned int)hi.x << 16);                              \
    }                                                                                        \
    *(uint4*)p = make_uint4(w[0], w[1], w[2], w[3]);                                         \
}
HALF8(f16_t)
HALF8(bf16_t)
// The first of the eight elements of this thread (an 8-wide kernel: one thread per 8 elements,
// launched with `launch::vec8_config`); `VEC8_FULL(i, n)`: all eight are in range (else the
// kernel does the tail one by one).
#define VEC8_INDEX(i, n)                                                                     \
    unsigned long long i = 8ull * ((unsigned long long)blockIdx.x * blockDim.x + threadIdx.x); \
    if (i >= (n)) return;
#define VEC8_FULL(i, n) ((i) + 8 <= (n))
// Multi-tensor kernels (one launch over a list of tensors, `launch::TensorTable`): the table is
// `count` rows of `stride` u64 fields, the last field of each row the row's first block in the
// grid (ascending). The row that owns `block`: the last whose first block is <= `block`
// (binary search; a row of zero blocks is never picked unless every row has none, and the
// kernels guard on the row's length).
__device__ __forceinline__ unsigned int table_row(const unsigned long long* table,
                                                  unsigned int stride, unsigned int count,
                                                  unsigned long long block) {
    unsigned int lo = 0, hi = count;
    while (hi - lo > 1) {
        unsigned int mid = (lo + hi) >> 1;
        if (table[(unsigned long long)mid * stride + stride - 1] <= block) lo = mid; else hi = mid;
    }
    return lo;
}
