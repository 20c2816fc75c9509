// The causal row softmax of attention scores and its backward (ops/attention/softmax.rs): one
// 256-thread block per score row of `keys` entries, f32 statistics. Row `row` is query
// position i = q0 + row % t (a chunk of t queries starting at q0); it sees keys lo <= j <= i
// with lo = max(0, i + 1 - window) when window > 0 (a sliding window of `window` keys),
// lo = 0 otherwise.
//
// `*8_*`: the same rows held in registers, loaded and stored with 16-byte accesses (8 values
// per access, up to SM_GROUPS accesses per thread: rows of up to 8 * 256 * SM_GROUPS keys,
// `keys` a multiple of 8, aligned buffers; the launcher picks). Each row is read once instead
// of three times; the statistics are the same f32 sums in another order.
#define SM_GROUPS 4
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

#define SOFTMAX8_KERNELS(SUF, T)                                                              \
extern "C" __global__ void causal_softmax8_##SUF(const T* s, T* p, int t, int keys, int q0, \
                                                int window) {                                 \
    long long row = blockIdx.x;                                                               \
    int valid = q0 + (int)(row % t) + 1;                                                      \
    int lo = (window > 0 && valid > window) ? valid - window : 0;                             \
    const T* x = s + row * keys; T* y = p + row * keys;                                       \
    float v[8 * SM_GROUPS];                                                                   \
    float m = NEG_INF;                                                                        \
    _Pragma("unroll") for (int g = 0; g < SM_GROUPS; ++g) {                                   \
        int j0 = 8 * (threadIdx.x + g * blockDim.x);                                          \
        if (j0 < keys) {                                                                      \
            ld8(x + j0, v + 8 * g);                                                           \
            _Pragma("unroll") for (int k = 0; k < 8; ++k) {                                   \
                int j = j0 + k;                                                               \
                if (j < lo || j >= valid) v[8 * g + k] = NEG_INF;                             \
                m = fmaxf(m, v[8 * g + k]);                                                   \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
    m = block_reduce(m, true);                                                                \
    float sum = 0.f;                                                                          \
    _Pragma("unroll") for (int g = 0; g < SM_GROUPS; ++g) {                                   \
        if (8 * (threadIdx.x + g * blockDim.x) < keys) {                                      \
            _Pragma("unroll") for (int k = 0; k < 8; ++k) {                                   \
                float e = v[8 * g + k] == NEG_INF ? 0.f : __expf(v[8 * g + k] - m);           \
                v[8 * g + k] = e; sum += e;                                                   \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
    sum = block_reduce(sum, false);                                                           \
    float inv = 1.f / sum;                                                                    \
    _Pragma("unroll") for (int g = 0; g < SM_GROUPS; ++g) {                                   \
        int j0 = 8 * (threadIdx.x + g * blockDim.x);                                          \
        if (j0 < keys) {                                                                      \
            _Pragma("unroll") for (int k = 0; k < 8; ++k) v[8 * g + k] *= inv;                \
            st8(y + j0, v + 8 * g);                                                           \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
extern "C" __global__ void causal_softmax_grad8_##SUF(const T* p, const T* dp, T* ds, int t, \
                                                     int keys, int q0, float scale,           \
                                                     int window) {                            \
    long long row = blockIdx.x;                                                               \
    int valid = q0 + (int)(row % t) + 1;                                                      \
    int lo = (window > 0 && valid > window) ? valid - window : 0;                             \
    const T* a = p + row * keys; const T* gr = dp + row * keys; T* y = ds + row * keys;       \
    float pa[8 * SM_GROUPS], pg[8 * SM_GROUPS];                                               \
    float delta = 0.f;                                                                        \
    _Pragma("unroll") for (int g = 0; g < SM_GROUPS; ++g) {                                   \
        int j0 = 8 * (threadIdx.x + g * blockDim.x);                                          \
        if (j0 < keys) {                                                                      \
            ld8(a + j0, pa + 8 * g); ld8(gr + j0, pg + 8 * g);                                \
            _Pragma("unroll") for (int k = 0; k < 8; ++k) {                                   \
                int j = j0 + k;                                                               \
                if (j >= lo && j < valid) delta += pa[8 * g + k] * pg[8 * g + k];             \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
    delta = block_reduce(delta, false);                                                       \
    _Pragma("unroll") for (int g = 0; g < SM_GROUPS; ++g) {                                   \
        int j0 = 8 * (threadIdx.x + g * blockDim.x);                                          \
        if (j0 < keys) {                                                                      \
            _Pragma("unroll") for (int k = 0; k < 8; ++k) {                                   \
                int j = j0 + k;                                                               \
                pa[8 * g + k] = (j >= lo && j < valid)                                        \
                    ? scale * pa[8 * g + k] * (pg[8 * g + k] - delta) : 0.f;                  \
            }                                                                                 \
            st8(y + j0, pa + 8 * g);                                                          \
        }                                                                                     \
    }                                                                                         \
}

SOFTMAX8_KERNELS(f32, float)
SOFTMAX8_KERNELS(f16, f16_t)
SOFTMAX8_KERNELS(bf16, bf16_t)
