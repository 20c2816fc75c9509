// RoPE and its adjoint (ops/rope.rs): one thread per element, grid-stride, f32 arithmetic.
// `rope8_*`: eight consecutive elements of a row per thread with 16-byte accesses (d a
// multiple of 16, so a group never straddles the two halves; aligned buffers; the launcher
// picks), the same arithmetic per element.
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

#define ROPE8_KERNEL(SUF, T)                                                                  \
extern "C" __global__ void rope8_##SUF(const T* x, const T* c, const T* s, T* y,            \
                                       unsigned long long n, int t, int d, int transpose) {  \
    VEC8_INDEX(i, n)                                                                          \
    int h = d >> 1;                                                                           \
    unsigned long long row = i / (unsigned long long)d;                                       \
    int j = (int)(i - row * (unsigned long long)d);                                           \
    long long k = (long long)(row % (unsigned long long)t) * d + j;                           \
    bool first = j < h;                                                                       \
    float xv[8], pv[8], cv[8], sv[8], out[8];                                                 \
    ld8(x + i, xv);                                                                           \
    ld8(first ? x + i + h : x + i - h, pv);                                                   \
    ld8(c + k, cv);                                                                           \
    ld8(transpose ? (first ? s + k + h : s + k - h) : s + k, sv);                            \
    _Pragma("unroll") for (int q = 0; q < 8; ++q) {                                           \
        float rot;                                                                            \
        if (!transpose) rot = first ? -pv[q] * sv[q] : pv[q] * sv[q];                         \
        else rot = first ? pv[q] * sv[q] : -pv[q] * sv[q];                                    \
        out[q] = xv[q] * cv[q] + rot;                                                         \
    }                                                                                         \
    st8(y + i, out);                                                                          \
}

ROPE8_KERNEL(f32, float)
ROPE8_KERNEL(f16, f16_t)
ROPE8_KERNEL(bf16, bf16_t)
