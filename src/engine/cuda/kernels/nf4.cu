// NF4 dequantisation (nf4/): one thread per packed byte (two weights). The generated header
// (nf4/cuda.rs) defines the code tables `NF4[16]` and `DYN[256]` (bitsandbytes' NF4 values and
// signed dynamic map) and the block sizes NF4_BLOCK and ABSMAX_BLOCK.
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
