// The causal row softmax of attention scores and its backward (ops/attention/softmax.rs): one
// 256-thread block per score row of `keys` entries, f32 statistics. Row `row` is query
// position i = q0 + row % t (a chunk of t queries starting at q0); it sees keys lo <= j <= i
// with lo = max(0, i + 1 - window) when window > 0 (a sliding window of `window` keys),
// lo = 0 otherwise.
__device__ __forceinline__ float block_reduce(float v, bool is_max) {
    __shared__ float shared[32];
    for (int o = 16; o > 0; o >>= 1) {
        float w = __shfl_xor_sync(0xffffffffu, v, o);
        v = is_max ? fmaxf(v, w) : v + w;
    }
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shared[wid] = v;
    __syncthreads();
    int nw = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < nw) ? shared[threadIdx.x] : (is_max ? NEG_INF : 0.f);
    if (wid == 0) {
        for (int o = 16; o > 0; o >>= 1) {
            float w = __shfl_xor_sync(0xffffffffu, v, o);
            v = is_max ? fmaxf(v, w) : v + w;
        }
        if (lane == 0) shared[0] = v;
    }
    __syncthreads();
    float r = shared[0];
    __syncthreads();
    return r;
}

#define SOFTMAX_KERNELS(SUF, T)                                                               \
extern "C" __global__ void causal_softmax_##SUF(const T* s, T* p, int t, int keys, int q0,  \
                                               int window) {                                  \
    long long row = blockIdx.x;                                                               \
    int valid = q0 + (int)(row % t) + 1;                                                      \
    int lo = (window > 0 && valid > window) ? valid - window : 0;                             \
    const T* x = s + row * keys; T* y = p + row * keys;                                       \
    float m = NEG_INF;                                                                      \
    for (int j = lo + threadIdx.x; j < valid; j += blockDim.x) m = fmaxf(m, ld(x[j]));       \
    m = block_reduce(m, true);                                                                \
    float sum = 0.f;                                                                          \
    for (int j = lo + threadIdx.x; j < valid; j += blockDim.x) sum += __expf(ld(x[j]) - m);  \
    sum = block_reduce(sum, false);                                                           \
    float inv = 1.f / sum;                                                                    \
    for (int j = threadIdx.x; j < keys; j += blockDim.x)                                      \
        st(y + j, (j >= lo && j < valid) ? __expf(ld(x[j]) - m) * inv : 0.f);                \
}                                                                                             \
extern "C" __global__ void causal_softmax_grad_##SUF(const T* p, const T* dp, T* ds, int t,  \
                                                    int keys, int q0, float scale,            \
                                                    int window) {                             \
    long long row = blockIdx.x;                                                               \
    int valid = q0 + (int)(row % t) + 1;                                                      \
    int lo = (window > 0 && valid > window) ? valid - window : 0;                             \
    const T* a = p + row * keys; const T* g = dp + row * keys; T* y = ds + row * keys;        \
    float delta = 0.f;                                                                        \
    for (int j = lo + threadIdx.x; j < valid; j += blockDim.x) delta += ld(a[j]) * ld(g[j]); \
    delta = block_reduce(delta, false);                                                       \
    for (int j = threadIdx.x; j < keys; j += blockDim.x)                                      \
        st(y + j, (j >= lo && j < valid) ? scale * ld(a[j]) * (ld(g[j]) - delta) : 0.f);     \
}

SOFTMAX_KERNELS(f32, float)
SOFTMAX_KERNELS(f16, f16_t)
SOFTMAX_KERNELS(bf16, bf16_t)
