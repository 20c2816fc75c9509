// RMSNorm forward and backward (ops/rms_norm.rs): one 256-thread block per row, f32
// statistics, for f32 / f16 / bf16 storage.
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
