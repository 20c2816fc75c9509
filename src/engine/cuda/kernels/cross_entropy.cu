// Per-row cross-entropy and its logits gradient (ops/cross_entropy.rs): one 1024-thread
// block per logits row, one online (max, sum-exp) pass in f32; the gradient makes a second pass.
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
    float mm = fmaxf(m, m2);
    if (mm == NEG_INF) { m = mm; s = 0.f; return; }
    s = s * expf(m - mm) + s2 * expf(m2 - mm);
    m = mm;
}

// Online (max, sum exp(x - max)) of this thread's elements, then of the whole block.
template <typename T>
__device__ __forceinline__ void row_lse(const T* r, int vocab, float& m, float& s) {
    __shared__ float sm[32];
    __shared__ float ss[32];
    m = NEG_INF; s = 0.f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        float x = ld(r[j]);
        if (x > m) { s = s * expf(m - x) + 1.f; m = x; }
        else s += expf(x - m);
    }
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o);
        float s2 = __shfl_xor_sync(0xffffffffu, s, o);
        lse_merge(m, s, m2, s2);
    }
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) { sm[wid] = m; ss[wid] = s; }
    __syncthreads();
    if (wid == 0) {
        int nw = (blockDim.x + 31) >> 5;
        m = lane < nw ? sm[lane] : NEG_INF;
        s = lane < nw ? ss[lane] : 0.f;
        for (int o = 16; o > 0; o >>= 1) {
            float m2 = __shfl_xor_sync(0xffffffffu, m, o);
            float s2 = __shfl_xor_sync(0xffffffffu, s, o);
            lse_merge(m, s, m2, s2);
        }
        if (lane == 0) { sm[0] = m; ss[0] = s; }
    }
    __syncthreads();
    m = sm[0]; s = ss[0];
}

#define CE_KERNELS(SUF, T)                                                                    \
extern "C" __global__ void __launch_bounds__(1024) ce_rows_loss_##SUF(const T* z,            \
        const unsigned int* tgt, const float* w, float* loss, int vocab) {                    \
    long long row = blockIdx.x;                                                               \
    float c = w[row];                                                                         \
    if (c == 0.f) { if (threadIdx.x == 0) loss[row] = 0.f; return; }                          \
    const T* r = z + row * (long long)vocab;                                                  \
    float m, s;                                                                               \
    row_lse(r, vocab, m, s);                                                                  \
    if (threadIdx.x == 0) loss[row] = c * (m + logf(s) - ld(r[tgt[row]]));                    \
}                                                                                             \
extern "C" __global__ void __launch_bounds__(1024) ce_rows_grad_##SUF(const T* z,            \
        const unsigned int* tgt, const float* w, T* dz, int vocab) {                          \
    long long row = blockIdx.x;                                                               \
    float c = w[row];                                                                         \
    const T* r = z + row * (long long)vocab;                                                  \
    T* d = dz + row * (long long)vocab;                                                       \
    if (c == 0.f) {                                                                           \
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) st(d + j, 0.f);                 \
        return;                                                                               \
    }                                                                                         \
    float m, s;                                                                               \
    row_lse(r, vocab, m, s);                                                                  \
    float k = c / s;                                                                          \
    int t = (int)tgt[row];                                                                    \
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {                                   \
        float p = expf(ld(r[j]) - m) * k;                                                     \
        st(d + j, j == t ? p - c : p);                                                        \
    }                                                                                         \
}

CE_KERNELS(f32, float)
CE_KERNELS(f16, f16_t)
CE_KERNELS(bf16, bf16_t)
