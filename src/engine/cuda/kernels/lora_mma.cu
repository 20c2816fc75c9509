// The LoRA projection's first GEMM with its input dropout fused in (lora/cuda.rs `forward`):
// u (tokens, r) = d(x) A^T, d(x) = keep(seed, row * in + col, thr) ? x * inv : 0 (the mask
// and the rounding of `hash_dropout_*`: each kept value is rounded to T once, as d(x) would be
// stored), so d(x) is never written to memory. Tensor cores (mma.sync m16n8k16, sm_80 and
// newer: the module is compiled for compute_80), inputs T, f32 accumulation, u rounded to T
// once, as cuBLAS's CUBLAS_COMPUTE_32F GEMM it replaces.
//
// x (tokens, in), a (r, in) row-major, in % 32 == 0, r <= 64, x and a 16-byte aligned. One
// block of 8 warps per 16 rows; warp w takes the 32-wide k chunks c = w, w + 8, ...; per chunk
// thread (g = lane / 4, t = lane % 4) loads 8 consecutive values of rows g and g + 8 at
// k = 32c + 8t and of rows nt * 8 + g of a, and feeds them as two k16 steps (step 0: the pairs
// at 8t + {0,1} and 8t + {2,3}; step 1: 8t + {4,5}, 8t + {6,7}; one permutation of k for both
// operands, so the products and their sum are those of the GEMM). The 8 warps' partial sums
// meet in shared memory in a fixed order (deterministic).
__device__ __forceinline__ void unpack8(uint4 u, float v[8], const f16_t*) {
    unsigned int w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        f16_t lo, hi; lo.x = (unsigned short)(w[j] & 0xffffu); hi.x = (unsigned short)(w[j] >> 16);
        v[2 * j] = ld(lo); v[2 * j + 1] = ld(hi);
    }
}
__device__ __forceinline__ void unpack8(uint4 u, float v[8], const bf16_t*) {
    unsigned int w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        bf16_t lo, hi; lo.x = (unsigned short)(w[j] & 0xffffu); hi.x = (unsigned short)(w[j] >> 16);
        v[2 * j] = ld(lo); v[2 * j + 1] = ld(hi);
    }
}
template <typename T> __device__ __forceinline__ unsigned int pack2(float a, float b) {
    T lo, hi; st(&lo, a); st(&hi, b);
    return (unsigned int)lo.x | ((unsigned int)hi.x << 16);
}
__device__ __forceinline__ void mma16816(float c[4], const unsigned int a[4], unsigned int b0,
                                         unsigned int b1, const f16_t*) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma16816(float c[4], const unsigned int a[4], unsigned int b0,
                                         unsigned int b1, const bf16_t*) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// 8 values of row `row` at column k0 with dropout, repacked to T pairs (zeros past `tokens`).
template <typename T>
__device__ __forceinline__ uint4 dropped8(const T* x, unsigned long long row,
                                          unsigned long long tokens, unsigned long long in,
                                          unsigned long long k0, unsigned long long seed,
                                          unsigned long long thr, float inv) {
    if (row >= tokens) return make_uint4(0u, 0u, 0u, 0u);
    unsigned long long i = row * in + k0;
    float v[8];
    unpack8(*(const uint4*)(x + i), v, (const T*)0);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = keep(seed, i + j, thr) ? v[j] * inv : 0.f;
    return make_uint4(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]), pack2<T>(v[4], v[5]),
                      pack2<T>(v[6], v[7]));
}
template <typename T>
__device__ __forceinline__ void lora_a_dropout(const T* x, const T* a, T* u,
                                               unsigned long long tokens, unsigned long long in,
                                               unsigned int r, unsigned long long seed,
                                               unsigned long long thr, float inv) {
    __shared__ float red[8][16][64];
    const unsigned int warp = threadIdx.x >> 5, lane = threadIdx.x & 31u;
    const unsigned int g = lane >> 2, t = lane & 3u;
    const unsigned long long m0 = (unsigned long long)blockIdx.x * 16ull;
    float acc[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
    const unsigned long long chunks = in / 32ull;
    for (unsigned long long c = warp; c < chunks; c += 8ull) {
        const unsigned long long k0 = c * 32ull + 8ull * t;
        uint4 xa = dropped8(x, m0 + g, tokens, in, k0, seed, thr, inv);
        uint4 xb = dropped8(x, m0 + g + 8ull, tokens, in, k0, seed, thr, inv);
        const unsigned int s0[4] = {xa.x, xb.x, xa.y, xb.y};
        const unsigned int s1[4] = {xa.z, xb.z, xa.w, xb.w};
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            if ((unsigned int)nt * 8u >= r) break;
            const unsigned int n = (unsigned int)nt * 8u + g;
            uint4 bw = n < r ? *(const uint4*)(a + (unsigned long long)n * in + k0)
                             : make_uint4(0u, 0u, 0u, 0u);
            mma16816(acc[nt], s0, bw.x, bw.y, (const T*)0);
            mma16816(acc[nt], s1, bw.z, bw.w, (const T*)0);
        }
    }
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
        const unsigned int col = (unsigned int)nt * 8u + 2u * t;
        red[warp][g][col] = acc[nt][0];
        red[warp][g][col + 1] = acc[nt][1];
        red[warp][g + 8][col] = acc[nt][2];
        red[warp][g + 8][col + 1] = acc[nt][3];
    }
    __syncthreads();
    for (unsigned int idx = threadIdx.x; idx < 16u * r; idx += blockDim.x) {
        const unsigned int row = idx / r, col = idx % r;
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < 8; ++w) s += red[w][row][col];
        if (m0 + row < tokens) st(u + (m0 + row) * (unsigned long long)r + col, s);
    }
}
#define LORA_MMA(SUF, T)                                                                       \
extern "C" __global__ void __launch_bounds__(256) lora_a_dropout_##SUF(                        \
        const T* x, const T* a, T* u, unsigned long long tokens, unsigned long long in,        \
        int rank, unsigned long long seed, unsigned long long thr, float inv) {                \
    lora_a_dropout(x, a, u, tokens, in, (unsigned int)rank, seed, thr, inv);                   \
}
LORA_MMA(f16, f16_t)
LORA_MMA(bf16, bf16_t)
