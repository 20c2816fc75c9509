// RoPE and its adjoint (ops/rope.rs): one thread per element, grid-stride, f32 arithmetic.
#define ROPE_KERNEL(SUF, T)                                                                   \
extern "C" __global__ void rope_##SUF(const T* x, const T* c, const T* s, T* y,             \
                                      unsigned long long n, int t, int d, int transpose) {   \
    int h = d >> 1;                                                                           \
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;   \
         i < n; i += (unsigned long long)blockDim.x * gridDim.x) {                            \
        unsigned long long row = i / (unsigned long long)d;                                   \
        int j = (int)(i - row * (unsigned long long)d);                                       \
        long long k = (long long)(row % (unsigned long long)t) * d + j;                       \
        float rot;                                                                            \
        if (!transpose) rot = j < h ? -ld(x[i + h]) * ld(s[k]) : ld(x[i - h]) * ld(s[k]);    \
        else rot = j < h ? ld(x[i + h]) * ld(s[k + h]) : -ld(x[i - h]) * ld(s[k - h]);        \
        st(y + i, ld(x[i]) * ld(c[k]) + rot);                                                 \
    }                                                                                         \
}

ROPE_KERNEL(f32, float)
ROPE_KERNEL(f16, f16_t)
ROPE_KERNEL(bf16, bf16_t)
