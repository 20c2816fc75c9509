// SwiGLU forward and backward (ops/swiglu.rs): one thread per element, f32 arithmetic.
#define SWIGLU_KERNELS(SUF, T)                                                                \
extern "C" __global__ void swiglu_fwd_##SUF(const T* g, const T* u, T* y,                    \
                                            unsigned long long n) {                           \
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;        \
    if (i >= n) return;                                                                       \
    float x = ld(g[i]);                                                                       \
    float s = 1.f / (1.f + expf(-x));                                                         \
    st(y + i, x * s * ld(u[i]));                                                              \
}                                                                                             \
extern "C" __global__ void swiglu_bwd_##SUF(const T* g, const T* u, const T* dy, T* dg,      \
                                            T* du, unsigned long long n) {                    \
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;        \
    if (i >= n) return;                                                                       \
    float x = ld(g[i]);                                                                       \
    float s = 1.f / (1.f + expf(-x));                                                         \
    float d = ld(dy[i]);                                                                      \
    st(dg + i, d * ld(u[i]) * s * (1.f + x * (1.f - s)));                                     \
    st(du + i, d * x * s);                                                                    \
}
SWIGLU_KERNELS(f32, float)
SWIGLU_KERNELS(f16, f16_t)
SWIGLU_KERNELS(bf16, bf16_t)
