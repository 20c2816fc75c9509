// NF4 quantisation (nf4/quantize.rs), compiled with --fmad=false so every product rounds as
// the CPU code's does. The generated header (nf4/cuda.rs) defines `NF4[16]` (bitsandbytes'
// NF4 values, ascending) and NF4_BLOCK. Both kernels read the weight in its storage dtype and
// compute in f32, exactly as the CPU loops in nf4/quantize.rs:
//   nf4_absmax_*: one warp per 64-block, absmax = max |w| (NaN ignored, as Rust's f32::max);
//   nf4_codes_*:  one thread per output byte (two weights): code of clamp(w / absmax, -1, 1)
//                 nearest in NF4 (ties to the lower index, NaN as 0), first weight in the high
//                 nibble; an odd count pads the last low nibble with the code of 0.0 (7).
__device__ __forceinline__ unsigned int nf4_nearest(float x) {
    if (isnan(x)) x = 0.0f;
    int hi = 0;
    while (hi < 16 && NF4[hi] < x) ++hi;
    if (hi == 0) return 0;
    if (hi == 16) return 15;
    int lo = hi - 1;
    return (x - NF4[lo]) <= (NF4[hi] - x) ? (unsigned int)lo : (unsigned int)hi;
}

__device__ __forceinline__ float nf4_scaled(float v, float inv) {
    float y = v * inv;
    return isnan(y) ? y : fminf(fmaxf(y, -1.0f), 1.0f);
}

#define NF4_QUANT_KERNELS(SUFFIX, T)                                                      \
extern "C" __global__ void nf4_absmax_##SUFFIX(const T* w, float* absmax,                 \
                                              unsigned long long n) {                     \
    unsigned long long warp =                                                             \
        ((unsigned long long)blockIdx.x * blockDim.x + threadIdx.x) / 32;                 \
    unsigned int lane = threadIdx.x & 31;                                                 \
    unsigned long long start = warp * NF4_BLOCK;                                          \
    if (start >= n) return;                                                               \
    float m = 0.0f;                                                                       \
    for (unsigned int j = lane; j < NF4_BLOCK; j += 32) {                                 \
        unsigned long long e = start + j;                                                 \
        if (e < n) m = fmaxf(m, fabsf(ld(w[e])));                                         \
    }                                                                                     \
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));    \
    if (lane == 0) absmax[warp] = m;                                                      \
}                                                                                         \
extern "C" __global__ void nf4_codes_##SUFFIX(const T* w, const float* absmax,            \
                                             unsigned char* packed, unsigned long long n) { \
    unsigned long long k = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;     \
    unsigned long long e = 2 * k;                                                         \
    if (e >= n) return;                                                                   \
    float m = absmax[e / NF4_BLOCK];                                                      \
    float inv = m > 0.0f ? 1.0f / m : 0.0f;                                               \
    unsigned int hi = nf4_nearest(nf4_scaled(ld(w[e]), inv));                             \
    unsigned int lo = e + 1 < n ? nf4_nearest(nf4_scaled(ld(w[e + 1]), inv)) : 7u;        \
    packed[k] = (unsigned char)((hi << 4) | lo);                                          \
}

NF4_QUANT_KERNELS(f32, float)
NF4_QUANT_KERNELS(f16, f16_t)
NF4_QUANT_KERNELS(bf16, bf16_t)
