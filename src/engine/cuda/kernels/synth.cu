// Synthetic weights (weights.rs `synth`): each element N(0, std) from a counter-based hash of
// (seed, index), drawn straight into the compute dtype, so no f32 copy of the tensor exists on
// the device. The hash is the splitmix64 finaliser (as `keep` in lora.cu); two 24-bit uniforms
// per element, u1 in (0, 1], u2 in [0, 1), give one Box-Muller normal
// sqrt(-2 ln u1) cos(2 pi u2) (so |z| <= 5.77). One thread per element, grid-stride.
__device__ __forceinline__ unsigned long long synth_mix(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
#define SYNTH_KERNELS(SUF, T)                                                                  \
extern "C" __global__ void synth_normal_##SUF(T* out, unsigned long long n,                    \
                                              unsigned long long seed, float std) {            \
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;     \
         i < n; i += (unsigned long long)gridDim.x * blockDim.x) {                             \
        unsigned long long z = synth_mix(seed + (i + 1ull) * 0x9E3779B97F4A7C15ull);           \
        float u1 = (float)((z >> 40) + 1ull) * (1.0f / 16777216.0f);                          \
        float u2 = (float)(z & 0xFFFFFFull) * (1.0f / 16777216.0f);                            \
        st(out + i, std * sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2));                        \
    }                                                                                          \
}
SYNTH_KERNELS(f32, float)
SYNTH_KERNELS(f16, f16_t)
SYNTH_KERNELS(bf16, bf16_t)
