// The LoRA family (lora/): inverted dropout with the mask of the hash `keep` (dropout_keep.cuh,
// mirrored by lora/dropout.rs `dropout_keep`), and the elementwise steps of the direct
// LoRA projection (f32 master cast, bias rows); `lora_cast_multi_*` casts a table of masters
// at once (rows: src, dst, n, scale as f32 bits, first block; one thread per element, no
// stride loop). The others: one thread per element, grid-stride; the dropout and the bias rows
// also eight per thread with 16-byte accesses (`*8_*`, aligned buffers; the launcher picks),
// the same mask and arithmetic per element. `hash_dropout_*` may write over its input
// (`x == y`: each element is read before it is written).
#define GRID_STRIDE(i, n) \
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; \
         i < (n); i += (unsigned long long)gridDim.x * blockDim.x)
#define LORA_KERNELS(SUF, T)                                                                   \
extern "C" __global__ void lora_cast_##SUF(const float* src, T* dst, unsigned long long n,     \
                                           float scale) {                                      \
    GRID_STRIDE(i, n) st(dst + i, src[i] * scale);                                             \
}                                                                                              \
extern "C" __global__ void lora_cast_multi_##SUF(const unsigned long long* table,              \
                                                 unsigned int count) {                         \
    const unsigned long long* r = table + 5ull * table_row(table, 5, count, blockIdx.x);      \
    unsigned long long i = ((unsigned long long)blockIdx.x - r[4]) * blockDim.x + threadIdx.x; \
    if (i < r[2])                                                                              \
        st((T*)r[1] + i, ((const float*)r[0])[i] * __uint_as_float((unsigned int)r[3]));     \
}                                                                                              \
extern "C" __global__ void lora_bias_rows_##SUF(T* y, const T* b, unsigned long long n,        \
                                                unsigned long long cols) {                     \
    GRID_STRIDE(i, n) y[i] = b[i % cols];                                                      \
}                                                                                              \
extern "C" __global__ void hash_dropout_##SUF(const T* x, T* y, unsigned long long n,          \
        unsigned long long seed, unsigned long long thr, float inv) {                          \
    GRID_STRIDE(i, n) st(y + i, keep(seed, i, thr) ? ld(x[i]) * inv : 0.f);                    \
}                                                                                              \
extern "C" __global__ void lora_bias_rows8_##SUF(T* y, const T* b, unsigned long long n,       \
                                                 unsigned long long cols) {                    \
    VEC8_INDEX(i, n)                                                                           \
    *(uint4*)(y + i) = *(const uint4*)(b + i % cols);                                          \
    if (sizeof(T) == 4) *((uint4*)(y + i) + 1) = *((const uint4*)(b + i % cols) + 1);         \
}                                                                                              \
extern "C" __global__ void hash_dropout8_##SUF(const T* x, T* y, unsigned long long n,         \
        unsigned long long seed, unsigned long long thr, float inv) {                          \
    VEC8_INDEX(i, n)                                                                           \
    if (VEC8_FULL(i, n)) {                                                                     \
        float v[8];                                                                            \
        ld8(x + i, v);                                                                         \
        _Pragma("unroll") for (int j = 0; j < 8; ++j) v[j] = keep(seed, i + j, thr) ? v[j] * inv : 0.f; \
        st8(y + i, v);                                                                         \
    } else {                                                                                   \
        for (unsigned long long k = i; k < n; ++k)                                             \
            st(y + k, keep(seed, k, thr) ? ld(x[k]) * inv : 0.f);                              \
    }                                                                                          \
}
LORA_KERNELS(f32, float)
LORA_KERNELS(f16, f16_t)
LORA_KERNELS(bf16, bf16_t)
