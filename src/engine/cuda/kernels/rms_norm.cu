// RMSNorm forward and backward (ops/rms_norm.rs): one 256-thread block per row, f32
// statistics, for f32 / f16 / bf16 storage. `*8_*`: the row held in registers (8 values per
// 16-byte access, up to RMS_GROUPS accesses per thread: rows of up to 8 * 256 * RMS_GROUPS,
// a multiple of 8, aligned buffers; the launcher picks), read once instead of twice; the same
// arithmetic per element, the sums in another order.
#define RMS_GROUPS 4
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float shared[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shared[wid] = v;
    __syncthreads();
    int nw = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < nw) ? shared[threadIdx.x] : 0.f;
    if (wid == 0) {
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) shared[0] = v;
    }
    __syncthreads();
    float r = shared[0];
    __syncthreads();
    return r;
}

#define RMS_NORM_KERNELS(SUF, T)                                                            \
extern "C" __global__ void rms_norm_fwd_##SUF(const T* x, const T* w, T* y, int n,          \
                                              float inv_n, float eps) {                       \
    long long off = (long long)blockIdx.x * n;                                                \
    const T* xr = x + off; T* yr = y + off;                                                   \
    float ss = 0.f;                                                                           \
    for (int j = threadIdx.x; j < n; j += blockDim.x) { float v = ld(xr[j]); ss += v * v; }  \
    ss = block_sum(ss);                                                                       \
    float r = 1.f / sqrtf(ss * inv_n + eps);                                                  \
    for (int j = threadIdx.x; j < n; j += blockDim.x) {                                       \
        T h; st(&h, ld(xr[j]) * r);                                                           \
        st(yr + j, ld(h) * ld(w[j]));                                                         \
    }                                                                                         \
}                                                                                             \
extern "C" __global__ void rms_norm_bwd_##SUF(const T* x, const T* w, const T* g, T* dx,    \
                                              int n, float inv_n, float eps) {                \
    long long off = (long long)blockIdx.x * n;                                                \
    const T* xr = x + off; const T* gr = g + off; T* o = dx + off;                            \
    float ss = 0.f, dot = 0.f;                                                                \
    for (int j = threadIdx.x; j < n; j += blockDim.x) {                                       \
        float v = ld(xr[j]);                                                                  \
        ss += v * v;                                                                          \
        dot += ld(gr[j]) * ld(w[j]) * v;                                                      \
    }                                                                                         \
    ss = block_sum(ss);                                                                       \
    dot = block_sum(dot);                                                                     \
    float r = 1.f / sqrtf(ss * inv_n + eps);                                                  \
    float m = dot * r * inv_n;                                                                \
    for (int j = threadIdx.x; j < n; j += blockDim.x) {                                       \
        float v = ld(xr[j]);                                                                  \
        st(o + j, r * (ld(gr[j]) * ld(w[j]) - v * r * m));                                    \
    }                                                                                         \
}

RMS_NORM_KERNELS(f32, float)
RMS_NORM_KERNELS(f16, f16_t)
RMS_NORM_KERNELS(bf16, bf16_t)

#define RMS_NORM8_KERNELS(SUF, T)                                                           \
extern "C" __global__ void rms_norm_fwd8_##SUF(const T* x, const T* w, T* y, int n,         \
                                               float inv_n, float eps) {                      \
    long long off = (long long)blockIdx.x * n;                                                \
    const T* xr = x + off; T* yr = y + off;                                                   \
    float v[8 * RMS_GROUPS];                                                                  \
    float ss = 0.f;                                                                           \
    _Pragma("unroll") for (int g = 0; g < RMS_GROUPS; ++g) {                                  \
        int j0 = 8 * (threadIdx.x + g * blockDim.x);                                          \
        if (j0 < n) {                                                                         \
            ld8(xr + j0, v + 8 * g);                                                          \
            _Pragma("unroll") for (int k = 0; k < 8; ++k) ss += v[8 * g + k] * v[8 * g + k];  \
        }                                                                                     \
    }                                                                                         \
    ss = block_sum(ss);                                                                       \
    float r = 1.f / sqrtf(ss * inv_n + eps);                                                  \
    _Pragma("unroll") for (int g = 0; g < RMS_GROUPS; ++g) {                                  \
        int j0 = 8 * (threadIdx.x + g * blockDim.x);                                          \
        if (j0 < n) {                                                                         \
            float wv[8];                                                                      \
            ld8(w + j0, wv);                                                                  \
            _Pragma("unroll") for (int k = 0; k < 8; ++k) {                                   \
                T h; st(&h, v[8 * g + k] * r);                                                \
                v[8 * g + k] = ld(h) * wv[k];                                                 \
            }                                                                                 \
            st8(yr + j0, v + 8 * g);                                                          \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
extern "C" __global__ void rms_norm_bwd8_##SUF(const T* x, const T* w, const T* g, T* dx,   \
                                               int n, float inv_n, float eps) {               \
    long long off = (long long)blockIdx.x * n;                                                \
    const T* xr = x + off; const T* gr = g + off; T* o = dx + off;                            \
    float v[8 * RMS_GROUPS], gw[8 * RMS_GROUPS];                                              \
    float ss = 0.f, dot = 0.f;                                                                \
    _Pragma("unroll") for (int q = 0; q < RMS_GROUPS; ++q) {                                  \
        int j0 = 8 * (threadIdx.x + q * blockDim.x);                                          \
        if (j0 < n) {                                                                         \
            float wv[8], gv[8];                                                               \
            ld8(xr + j0, v + 8 * q); ld8(w + j0, wv); ld8(gr + j0, gv);                       \
            _Pragma("unroll") for (int k = 0; k < 8; ++k) {                                   \
                float a = v[8 * q + k];                                                       \
                ss += a * a;                                                                  \
                gw[8 * q + k] = gv[k] * wv[k];                                                \
                dot += gw[8 * q + k] * a;                                                     \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
    ss = block_sum(ss);                                                                       \
    dot = block_sum(dot);                                                                     \
    float r = 1.f / sqrtf(ss * inv_n + eps);                                                  \
    float m = dot * r * inv_n;                                                                \
    _Pragma("unroll") for (int q = 0; q < RMS_GROUPS; ++q) {                                  \
        int j0 = 8 * (threadIdx.x + q * blockDim.x);                                          \
        if (j0 < n) {                                                                         \
            _Pragma("unroll") for (int k = 0; k < 8; ++k)                                     \
                v[8 * q + k] = r * (gw[8 * q + k] - v[8 * q + k] * r * m);                    \
            st8(o + j0, v + 8 * q);                                                           \
        }                                                                                     \
    }                                                                                         \
}

RMS_NORM8_KERNELS(f32, float)
RMS_NORM8_KERNELS(f16, f16_t)
RMS_NORM8_KERNELS(bf16, bf16_t)
