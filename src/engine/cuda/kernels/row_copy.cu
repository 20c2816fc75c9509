// A 4-D strided view (A, B, C, D) with unit stride along D copied into a contiguous tensor
// (ops/row_copy.rs): the head transposes and query chunks of attention. One thread per 8
// elements of a row, a 16-byte load and store each (32 bytes for f32): candle's generic
// strided copy computes every element's address from all dimensions and moved these tensors
// at 0.3-0.4 TB/s (bytes read plus written) on an H200. The launcher checks D, the strides
// and the offset are multiples of 8 elements and the buffers 16-byte aligned.
#define ROW_COPY(SUF, T, WORDS)                                                                \
extern "C" __global__ void row_copy8_##SUF(const T* x, T* y, unsigned long long n8,            \
        unsigned long long d8, unsigned long long b, unsigned long long c,                     \
        unsigned long long sa, unsigned long long sb, unsigned long long sc) {                 \
    unsigned long long t = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;         \
    if (t >= n8) return;                                                                       \
    unsigned long long r = t / d8, j = (t - r * d8) * 8;                                       \
    unsigned long long ic = r % c, ab = r / c;                                                 \
    unsigned long long ib = ab % b, ia = ab / b;                                               \
    const uint4* src = (const uint4*)(x + ia * sa + ib * sb + ic * sc + j);                    \
    uint4* dst = (uint4*)(y + 8 * t);                                                          \
    _Pragma("unroll") for (int w = 0; w < WORDS; ++w) dst[w] = src[w];                         \
}
ROW_COPY(f32, float, 2)
ROW_COPY(f16, f16_t, 1)
ROW_COPY(bf16, bf16_t, 1)
