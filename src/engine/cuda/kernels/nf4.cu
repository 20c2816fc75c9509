// NF4 dequantisation (nf4/). The generated header (nf4/cuda.rs) defines the code tables
// `NF4[16]` and `DYN[256]` (bitsandbytes' NF4 values and signed dynamic map) and the block sizes
// NF4_BLOCK and ABSMAX_BLOCK. Built without FMA contraction, so the block scale
// `DYN[q] * absmax2 + offset` rounds as the host loop's does and the output is bit-identical.
//
// nf4_dequant_*: one thread per packed byte (two weights), any length (the fallback).
// nf4_dequant8_*: one thread per 4 packed bytes (8 weights, all in one 64-block) with one 32-bit
// load and one 16-byte store (two for f32), and the code tables in shared memory: a table
// indexed by data in __constant__ memory serialises a warp over its distinct addresses.
// Needs n % 8 == 0, `packed` 4-byte and `out` 16-byte aligned (the launcher checks), and
// blockDim.x == 256.
#define NF4_KERNEL(NAME, T, CONV)                                                        \
extern "C" __global__ void NAME(const unsigned char* packed, const unsigned char* qabsmax, \
                                const float* absmax2, float offset, T* out,              \
                                unsigned long long n) {                                  \
    unsigned long long k = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;     \
    unsigned long long e = 2 * k;                                                         \
    if (e >= n) return;                                                                   \
    unsigned long long b = e / NF4_BLOCK;                                                 \
    float a = DYN[qabsmax[b]] * absmax2[b / ABSMAX_BLOCK] + offset;                       \
    unsigned char byte = packed[k];                                                       \
    out[e] = CONV(NF4[byte >> 4] * a);                                                    \
    if (e + 1 < n) out[e + 1] = CONV(NF4[byte & 15] * a);                                 \
}

#define ID(x) (x)
NF4_KERNEL(nf4_dequant_f32, float, ID)
NF4_KERNEL(nf4_dequant_f16, unsigned short, f32_to_f16_bits)
NF4_KERNEL(nf4_dequant_bf16, unsigned short, f32_to_bf16_bits)

// The eight weights of one 32-bit word of codes (byte j: weights 2j (high nibble), 2j + 1),
// scaled by the block's absmax, from shared copies of the tables.
__device__ __forceinline__ void nf4_eight(const unsigned int* packed, const unsigned char* qabsmax,
                                          const float* absmax2, float offset,
                                          unsigned long long k, const float* nf4,
                                          const float* dyn, float v[8]) {
    unsigned long long b = 8 * k / NF4_BLOCK;
    float a = dyn[qabsmax[b]] * absmax2[b / ABSMAX_BLOCK] + offset;
    unsigned int w = packed[k];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        unsigned int byte = (w >> (8 * j)) & 0xffu;
        v[2 * j] = nf4[byte >> 4] * a;
        v[2 * j + 1] = nf4[byte & 15u] * a;
    }
}

#define NF4_TABLES                                                                       \
    __shared__ float nf4[16];                                                            \
    __shared__ float dyn[256];                                                           \
    if (threadIdx.x < 16) nf4[threadIdx.x] = NF4[threadIdx.x];                           \
    dyn[threadIdx.x] = DYN[threadIdx.x];                                                 \
    __syncthreads();                                                                     \
    unsigned long long k = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;     \
    if (k >= n8) return;                                                                  \
    float v[8];                                                                           \
    nf4_eight(packed, qabsmax, absmax2, offset, k, nf4, dyn, v);

extern "C" __global__ void nf4_dequant8_f32(const unsigned int* packed,
                                            const unsigned char* qabsmax, const float* absmax2,
                                            float offset, float4* out, unsigned long long n8) {
    NF4_TABLES
    out[2 * k] = make_float4(v[0], v[1], v[2], v[3]);
    out[2 * k + 1] = make_float4(v[4], v[5], v[6], v[7]);
}

#define NF4_KERNEL8_16(NAME, CONV)                                                       \
extern "C" __global__ void NAME(const unsigned int* packed, const unsigned char* qabsmax, \
                                const float* absmax2, float offset, uint4* out,          \
                                unsigned long long n8) {                                 \
    NF4_TABLES                                                                           \
    unsigned int h[8];                                                                   \
    _Pragma("unroll") for (int j = 0; j < 8; ++j) h[j] = CONV(v[j]);                     \
    out[k] = make_uint4(h[0] | (h[1] << 16), h[2] | (h[3] << 16), h[4] | (h[5] << 16),    \
                        h[6] | (h[7] << 16));                                            \
}

NF4_KERNEL8_16(nf4_dequant8_f16, f32_to_f16_bits)
NF4_KERNEL8_16(nf4_dequant8_bf16, f32_to_bf16_bits)
