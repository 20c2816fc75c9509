// The fused optimizer updates (optim/cuda.rs), compiled with --fmad=false so that the GPU
// rounds as the CPU does. The generated header defines the 8-bit state maps `QMAP_S[256]`
// (signed dynamic map, first moment) and `QMAP_U[256]` (unsigned, second moment) and
// STATE_BLOCK, the elements per quantisation block.
// Index of the entry of the ascending 256-entry table nearest to x; ties to the lower index;
// NaN as 0 (as nf4.rs `nearest_sorted`).
__device__ __forceinline__ unsigned char nearest256(const float* code, float x) {
    if (x != x) x = 0.0f;
    int lo = 0, hi = 256;
    while (lo < hi) {
        int mid = (lo + hi) >> 1;
        if (code[mid] < x) lo = mid + 1; else hi = mid;
    }
    if (lo == 0) return 0;
    if (lo == 256) return 255;
    int l = lo - 1;
    return (unsigned char)(((x - code[l]) <= (code[lo] - x)) ? l : lo);
}

// AdamW in f32, operation for operation as optim.rs AdamW::step's candle ops: element i.
__device__ __forceinline__ void adamw32_elem(
    float* p, const float* g, float* m, float* v, unsigned long long i,
    float gs, float b1, float omb1, float b2, float omb2,
    float inv_bc1, float inv_bc2, float eps, float decay, float lr) {
    float gi = g[i] * gs + 0.0f;
    float mi = (m[i] * b1 + 0.0f) + (gi * omb1 + 0.0f);
    float vi = (v[i] * b2 + 0.0f) + ((gi * gi) * omb2 + 0.0f);
    float denom = sqrtf(vi * inv_bc2 + 0.0f) * 1.0f + eps;
    float upd = (mi * inv_bc1 + 0.0f) / denom;
    p[i] = (p[i] * decay + 0.0f) - (upd * lr + 0.0f);
    m[i] = mi;
    v[i] = vi;
}

extern "C" __global__ void lorascope_adamw32(
    float* p, const float* g, float* m, float* v, unsigned long long n,
    float gs, float b1, float omb1, float b2, float omb2,
    float inv_bc1, float inv_bc2, float eps, float decay, float lr) {
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
         i < n; i += (unsigned long long)gridDim.x * blockDim.x)
        adamw32_elem(p, g, m, v, i, gs, b1, omb1, b2, omb2, inv_bc1, inv_bc2, eps, decay, lr);
}

// The same update over a table of tensors (rows: p, g, m, v, n, first block), one thread per
// element: each element computes exactly what `lorascope_adamw32` computes for it.
extern "C" __global__ void lorascope_adamw32_multi(
    const unsigned long long* table, unsigned int count,
    float gs, float b1, float omb1, float b2, float omb2,
    float inv_bc1, float inv_bc2, float eps, float decay, float lr) {
    const unsigned long long* r = table + 6ull * table_row(table, 6, count, blockIdx.x);
    unsigned long long i = ((unsigned long long)blockIdx.x - r[5]) * blockDim.x + threadIdx.x;
    if (i < r[4])
        adamw32_elem((float*)r[0], (const float*)r[1], (float*)r[2], (float*)r[3], i,
                     gs, b1, omb1, b2, omb2, inv_bc1, inv_bc2, eps, decay, lr);
}

// One element of the AdamW8bit host loop, in f64.
__device__ __forceinline__ void adam_f64(
    float& p, float g, float& m, float& v,
    double gs, double b1, double omb1, double b2, double omb2,
    double bc1, double bc2, double eps, double decay, double lr) {
    double gk = (double)g * gs;
    double mk = b1 * (double)m + omb1 * gk;
    double vk = b2 * (double)v + omb2 * gk * gk;
    double upd = (mk / bc1) / (sqrt(vk / bc2) + eps);
    p = (float)((double)p * decay - lr * upd);
    m = (float)mk;
    v = (float)vk;
}

__device__ __forceinline__ void adam_f64_at(
    float* p, const float* g, float* m, float* v, unsigned long long i,
    double gs, double b1, double omb1, double b2, double omb2,
    double bc1, double bc2, double eps, double decay, double lr) {
    float pi = p[i], mi = m[i], vi = v[i];
    adam_f64(pi, g[i], mi, vi, gs, b1, omb1, b2, omb2, bc1, bc2, eps, decay, lr);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
}

extern "C" __global__ void lorascope_adamw_f32state(
    float* p, const float* g, float* m, float* v, unsigned long long n,
    double gs, double b1, double omb1, double b2, double omb2,
    double bc1, double bc2, double eps, double decay, double lr) {
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
         i < n; i += (unsigned long long)gridDim.x * blockDim.x)
        adam_f64_at(p, g, m, v, i, gs, b1, omb1, b2, omb2, bc1, bc2, eps, decay, lr);
}

// `lorascope_adamw_f32state` over a table (rows: p, g, m, v, n, first block).
extern "C" __global__ void lorascope_adamw_f32state_multi(
    const unsigned long long* table, unsigned int count,
    double gs, double b1, double omb1, double b2, double omb2,
    double bc1, double bc2, double eps, double decay, double lr) {
    const unsigned long long* r = table + 6ull * table_row(table, 6, count, blockIdx.x);
    unsigned long long i = ((unsigned long long)blockIdx.x - r[5]) * blockDim.x + threadIdx.x;
    if (i < r[4])
        adam_f64_at((float*)r[0], (const float*)r[1], (float*)r[2], (float*)r[3], i,
                    gs, b1, omb1, b2, omb2, bc1, bc2, eps, decay, lr);
}

// Quantisation block b of one tensor (the body of both launch forms below, each launched with
// STATE_BLOCK threads per block, one block per STATE_BLOCK-element quantisation block).
__device__ __forceinline__ void adamw8_block(
    float* p, const float* g,
    unsigned char* mc, float* mabs, unsigned char* vc, float* vabs,
    unsigned long long n, unsigned long long b,
    double gs, double b1, double omb1, double b2, double omb2,
    double bc1, double bc2, double eps, double decay, double lr) {
    __shared__ float qs[STATE_BLOCK];
    __shared__ float qu[STATE_BLOCK];
    __shared__ float red_m[STATE_BLOCK];
    __shared__ float red_v[STATE_BLOCK];
    const unsigned int t = threadIdx.x;
    const unsigned long long i = b * STATE_BLOCK + t;
    qs[t] = QMAP_S[t];
    qu[t] = QMAP_U[t];
    __syncthreads();
    const bool valid = i < n;
    float mn = 0.0f, vn = 0.0f;
    if (valid) {
        float pi = p[i];
        mn = qs[mc[i]] * mabs[b];
        vn = qu[vc[i]] * vabs[b];
        adam_f64(pi, g[i], mn, vn, gs, b1, omb1, b2, omb2, bc1, bc2, eps, decay, lr);
        p[i] = pi;
    }
    red_m[t] = fabsf(mn);
    red_v[t] = fabsf(vn);
    __syncthreads();
    for (unsigned int s = STATE_BLOCK / 2; s > 0; s >>= 1) {
        if (t < s) {
            red_m[t] = fmaxf(red_m[t], red_m[t + s]);
            red_v[t] = fmaxf(red_v[t], red_v[t + s]);
        }
        __syncthreads();
    }
    const float am = red_m[0];
    const float av = red_v[0];
    if (valid) {
        float im = am > 0.0f ? 1.0f / am : 0.0f;
        float iv = av > 0.0f ? 1.0f / av : 0.0f;
        float xm = mn * im;
        float xv = vn * iv;
        if (xm == xm) xm = fminf(fmaxf(xm, -1.0f), 1.0f);
        if (xv == xv) xv = fminf(fmaxf(xv, -1.0f), 1.0f);
        mc[i] = nearest256(qs, xm);
        vc[i] = nearest256(qu, xv);
    }
    if (t == 0) {
        mabs[b] = am;
        vabs[b] = av;
    }
}

extern "C" __global__ void lorascope_adamw8_blockwise(
    float* p, const float* g,
    unsigned char* mc, float* mabs, unsigned char* vc, float* vabs,
    unsigned long long n,
    double gs, double b1, double omb1, double b2, double omb2,
    double bc1, double bc2, double eps, double decay, double lr) {
    adamw8_block(p, g, mc, mabs, vc, vabs, n, blockIdx.x,
                 gs, b1, omb1, b2, omb2, bc1, bc2, eps, decay, lr);
}

// `lorascope_adamw8_blockwise` over a table (rows: p, g, mc, mabs, vc, vabs, n, first block);
// every block of the grid is one quantisation block of one tensor.
extern "C" __global__ void lorascope_adamw8_blockwise_multi(
    const unsigned long long* table, unsigned int count,
    double gs, double b1, double omb1, double b2, double omb2,
    double bc1, double bc2, double eps, double decay, double lr) {
    const unsigned long long* r = table + 8ull * table_row(table, 8, count, blockIdx.x);
    adamw8_block((float*)r[0], (const float*)r[1], (unsigned char*)r[2], (float*)r[3],
                 (unsigned char*)r[4], (float*)r[5], r[6], (unsigned long long)blockIdx.x - r[7],
                 gs, b1, omb1, b2, omb2, bc1, bc2, eps, decay, lr);
}

// One block's partial of sum((g[i] * factor)^2), i over `blocks` blocks' grid-stride share
// of n elements (`block`: this block's index among them), reduced in a fixed order.
__device__ __forceinline__ double sumsq_block(const float* g, unsigned long long n, double factor,
                                              unsigned long long block, unsigned long long blocks) {
    double s = 0.0;
    for (unsigned long long i = block * blockDim.x + threadIdx.x; i < n; i += blocks * blockDim.x) {
        double v = (double)g[i] * factor;
        s += v * v;
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    __shared__ double warp_sums[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warp_sums[warp] = s;
    __syncthreads();
    if (warp == 0) {
        s = lane < (int)((blockDim.x + 31) >> 5) ? warp_sums[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    }
    return s;
}

// partial[blockIdx.x] = this block's share of sum((g[i] * factor)^2) over n f32 elements, in
// f64: grid-stride partial sums, then a warp and block reduction in a fixed order. No atomics,
// so the host's in-order sum of the partials is the same on every run.
extern "C" __global__ void lorascope_sumsq(const float* g, unsigned long long n, double factor,
                                           double* partial) {
    double s = sumsq_block(g, n, factor, blockIdx.x, gridDim.x);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// `lorascope_sumsq` over a table (rows: g, n, blocks of this tensor, first block): partial
// [blockIdx.x] is what the per-tensor launch writes for that block.
extern "C" __global__ void lorascope_sumsq_multi(const unsigned long long* table,
                                                 unsigned int count, double factor,
                                                 double* partial) {
    const unsigned long long* r = table + 4ull * table_row(table, 4, count, blockIdx.x);
    double s = sumsq_block((const float*)r[0], r[1], factor,
                           (unsigned long long)blockIdx.x - r[3], r[2]);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}
