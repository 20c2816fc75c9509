// SwiGLU forward and backward (ops/swiglu.rs), f32 arithmetic: `*_fwd`/`*_bwd` one thread per
// element (any alignment), `*_fwd8`/`*_bwd8` eight per thread with 16-byte accesses (aligned
// buffers; the launcher picks), the same arithmetic per element.
__device__ __forceinline__ float swiglu_y(float x, float u) {
    float s = 1.f / (1.f + expf(-x));
    return x * s * u;
}
__device__ __forceinline__ void swiglu_d(float x, float u, float d, float* dg, float* du) {
    float s = 1.f / (1.f + expf(-x));
    *dg = d * u * s * (1.f + x * (1.f - s));
    *du = d * x * s;
}
#define SWIGLU_KERNELS(SUF, T)                                                                \
extern "C" __global__ void swiglu_fwd_##SUF(const T* g, const T* u, T* y,                    \
                                            unsigned long long n) {                           \
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;        \
    if (i >= n) return;                                                                       \
    st(y + i, swiglu_y(ld(g[i]), ld(u[i])));                                                  \
}                                                                                             \
extern "C" __global__ void swiglu_fwd8_##SUF(const T* g, const T* u, T* y,                   \
                                             unsigned long long n) {                          \
    VEC8_INDEX(i, n)                                                                          \
    if (VEC8_FULL(i, n)) {                                                                    \
        float a[8], b[8], o[8];                                                               \
        ld8(g + i, a); ld8(u + i, b);                                                         \
        _Pragma("unroll") for (int j = 0; j < 8; ++j) o[j] = swiglu_y(a[j], b[j]);            \
        st8(y + i, o);                                                                        \
    } else {                                                                                  \
        for (unsigned long long k = i; k < n; ++k) st(y + k, swiglu_y(ld(g[k]), ld(u[k])));   \
    }                                                                                         \
}                                                                                             \
extern "C" __global__ void swiglu_bwd_##SUF(const T* g, const T* u, const T* dy, T* dg,      \
                                            T* du, unsigned long long n) {                    \
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;        \
    if (i >= n) return;                                                                       \
    float a, b;                                                                               \
    swiglu_d(ld(g[i]), ld(u[i]), ld(dy[i]), &a, &b);                                          \
    st(dg + i, a);                                                                            \
    st(du + i, b);                                                                            \
}                                                                                             \
extern "C" __global__ void swiglu_bwd8_##SUF(const T* g, const T* u, const T* dy, T* dg,     \
                                             T* du, unsigned long long n) {                   \
    VEC8_INDEX(i, n)                                                                          \
    if (VEC8_FULL(i, n)) {                                                                    \
        float x[8], v[8], d[8], a[8], b[8];                                                   \
        ld8(g + i, x); ld8(u + i, v); ld8(dy + i, d);                                         \
        _Pragma("unroll") for (int j = 0; j < 8; ++j) swiglu_d(x[j], v[j], d[j], a + j, b + j); \
        st8(dg + i, a); st8(du + i, b);                                                       \
    } else {                                                                                  \
        for (unsigned long long k = i; k < n; ++k) {                                          \
            float a, b;                                                                       \
            swiglu_d(ld(g[k]), ld(u[k]), ld(dy[k]), &a, &b);                                  \
            st(dg + k, a); st(du + k, b);                                                     \
        }                                                                                     \
    }                                                                                         \
}
SWIGLU_KERNELS(f32, float)
SWIGLU_KERNELS(f16, f16_t)
SWIGLU_KERNELS(bf16, bf16_t)
