//! The SwiGLU gate of the MLP, `silu(gate) * up`, as one graph node with its own backward.
//!
//! Hugging Face `Qwen2MLP` / `LlamaMLP` compute `down_proj(act_fn(gate_proj(x)) * up_proj(x))`
//! with `act_fn = SiLU`. Written with candle ops, `gate.silu()? * up` makes two or more passes
//! over the (tokens, intermediate) activations forward, more backward, and keeps the
//! intermediates for backward. Here forward is one pass (one NVRTC kernel on CUDA, a loop on
//! CPU) and only the two inputs are kept; backward is one pass giving both gradients:
//!
//! - `y = silu(g) * u` with `silu(g) = g * sig(g)`, `sig(g) = 1 / (1 + exp(-g))`;
//! - `dg = dy * u * sig(g) * (1 + g * (1 - sig(g)))`, `du = dy * silu(g)`.
//!
//! CUDA: f32 arithmetic, results rounded to the compute dtype (f32/f16/bf16); with
//! `LORASCOPE_FUSED=0` or another dtype the candle composition runs instead. CPU: f64
//! arithmetic, rounded to the input dtype (f32/f64/f16/bf16).

use super::kernels::map_cpu_float;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// `silu(gate) * up` elementwise (HF `Qwen2MLP`'s `act_fn(gate_proj(x)) * up_proj(x)`).
///
/// `gate`, `up`: same shape and dtype (the compute dtype), any shape. Output: same shape and
/// dtype. Records one graph node when either input is tracked; its backward returns
/// `(dgate, dup)` as in the module docs, computed from the two inputs alone.
///
/// Errors: mismatched shapes or dtypes, an integer dtype, device errors (CUDA: kernel compile
/// or launch, out of memory).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() || gate.dtype() != up.dtype() {
        candle_core::bail!(
            "swiglu: gate {:?} {:?} vs up {:?} {:?}",
            gate.shape(),
            gate.dtype(),
            up.shape(),
            up.dtype()
        );
    }
    if !uses_custom_op(gate) {
        return gate.silu()? * up;
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, Swiglu)
}

/// CPU: always the custom op. CUDA: when the fused kernels are on and the dtype has a kernel.
fn uses_custom_op(x: &Tensor) -> bool {
    match x.device() {
        candle_core::Device::Cpu => true,
        d if d.is_cuda() => {
            matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
                && super::kernels::fused_kernels()
        }
        _ => false,
    }
}

/// The [`swiglu`] graph node.
struct Swiglu;

/// `sig(x) = 1 / (1 + exp(-x))` in f64 (CPU path).
#[inline]
fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn contiguous(l: &Layout) -> Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("swiglu: inputs must be contiguous".into()))
}

/// `(dgate, dup)` of [`swiglu`] for the output gradient `dy`, on untracked inputs (the
/// hand-written backward of a checkpointed layer); shapes and dtype as the inputs.
///
/// Errors: as [`swiglu`].
pub(crate) fn swiglu_backward(g: &Tensor, u: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    super::prof::section("swiglu", "bwd", g.device(), || {
        if uses_custom_op(g) {
            backward(g, u, dy)
        } else {
            backward_generic(g, u, dy)
        }
    })
}

/// [`backward`] as candle tensor ops (CUDA with `LORASCOPE_FUSED=0`): the same formulas in f32
/// (f64 for f64), one rounding to the inputs' dtype.
fn backward_generic(g: &Tensor, u: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let dt = g.dtype();
    let f = super::ops::stat_dtype(dt);
    let (g, u, dy) = (g.to_dtype(f)?, u.to_dtype(f)?, dy.to_dtype(f)?);
    let s = (g.neg()?.exp()? + 1.0)?.recip()?;
    let du = (&dy * (&g * &s)?)?;
    // d silu(g) / dg = s (1 + g (1 - s))
    let dsilu = (&s * ((&g * s.affine(-1.0, 1.0)?)? + 1.0)?)?;
    let dg = ((&dy * &u)? * dsilu)?;
    Ok((dg.to_dtype(dt)?, du.to_dtype(dt)?))
}

/// Backward on detached, contiguous inputs of one dtype: `(dg, du)`.
fn backward(g: &Tensor, u: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let dy = dy.to_dtype(g.dtype())?.contiguous()?;
    let (g, u) = (g.contiguous()?, u.contiguous()?);
    #[cfg(feature = "cuda")]
    if g.device().is_cuda() {
        return cuda::backward(&g, &u, &dy);
    }
    let v = |t: &Tensor| t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>();
    let (gv, uv, dv) = (v(&g)?, v(&u)?, v(&dy)?);
    let (mut dg, mut du) = (Vec::with_capacity(gv.len()), Vec::with_capacity(gv.len()));
    for ((&x, &w), &d) in gv.iter().zip(&uv).zip(&dv) {
        let s = sigmoid(x);
        dg.push(d * w * s * (1.0 + x * (1.0 - s)));
        du.push(d * x * s);
    }
    let t = |v: Vec<f64>| Tensor::from_vec(v, g.shape(), g.device())?.to_dtype(g.dtype());
    Ok((t(dg)?, t(du)?))
}

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "swiglu"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ((a1, b1), (a2, b2)) = (contiguous(l1)?, contiguous(l2)?);
        if l1.shape() != l2.shape() {
            candle_core::bail!("swiglu: gate {:?} vs up {:?}", l1.shape(), l2.shape());
        }
        fn go<T: candle_core::WithDType>(g: &[T], u: &[T]) -> Vec<T> {
            g.iter()
                .zip(u)
                .map(|(g, u)| {
                    let x = g.to_f64();
                    T::from_f64(x * sigmoid(x) * u.to_f64())
                })
                .collect()
        }
        let out = map_cpu_float!(
            "swiglu: gate and up must share a float dtype",
            (s1 => g, s2 => u),
            T => go(&g[a1..b1], &u[a2..b2])
        );
        Ok((out, l1.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        if l1.shape() != l2.shape() {
            candle_core::bail!("swiglu: gate {:?} vs up {:?}", l1.shape(), l2.shape());
        }
        let (r1, r2) = (contiguous(l1)?, contiguous(l2)?);
        let dev = candle_core::Device::Cuda(s1.device().clone());
        let out = super::prof::section("swiglu", "fwd", &dev, || cuda::forward(s1, r1, s2, r2))?;
        Ok((out, l1.shape().clone()))
    }
    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Detached: see `ops::InputGradCustomOp::bwd`.
        let (g, u, grad) = (g.detach(), u.detach(), grad.detach());
        let (dg, du) =
            super::prof::section("swiglu", "bwd", g.device(), || backward(&g, &u, &grad))?;
        Ok((Some(dg), Some(du)))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    //! Elementwise kernels, one thread per element, f32 arithmetic.
    use super::super::kernels::{self, PRELUDE};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::op::BackpropOp;
    use candle_core::{CudaStorage, DType, Result, Shape, Storage, Tensor};

    const MODULE: &str = "lorascope_swiglu";

    /// Untracked tensor of `shape` over a fresh storage.
    fn from_storage(s: CudaStorage, shape: &Shape) -> Tensor {
        Tensor::from_storage(Storage::Cuda(s), shape.clone(), BackpropOp::none(), false)
    }
    pub(super) const SRC: &str = r#"
#define SWIGLU_KERNELS(SUF, T)                                                                \
extern "C" __global__ void swiglu_fwd_##SUF(const T* g, const T* u, T* y,                    \
                                            unsigned long long n) {                           \
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;        \
    if (i >= n) return;                                                                       \
    float x = ld(g[i]);                                                                       \
    float s = 1.f / (1.f + expf(-x));                                                         \
    st(y + i, x * s * ld(u[i]));                                                              \
}                                                                                             \
extern "C" __global__ void swiglu_bwd_##SUF(const T* g, const T* u, const T* dy, T* dg,      \
                                            T* du, unsigned long long n) {                    \
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;        \
    if (i >= n) return;                                                                       \
    float x = ld(g[i]);                                                                       \
    float s = 1.f / (1.f + expf(-x));                                                         \
    float d = ld(dy[i]);                                                                      \
    st(dg + i, d * ld(u[i]) * s * (1.f + x * (1.f - s)));                                     \
    st(du + i, d * x * s);                                                                    \
}
SWIGLU_KERNELS(f32, float)
SWIGLU_KERNELS(f16, f16_t)
SWIGLU_KERNELS(bf16, bf16_t)
"#;

    fn suffix(dt: DType) -> Result<&'static str> {
        kernels::dtype_suffix(dt, "swiglu")
    }

    fn cfg(n: usize) -> Result<LaunchConfig> {
        if n > (u32::MAX as usize) {
            candle_core::bail!("swiglu: {n} elements is too many for one launch");
        }
        Ok(LaunchConfig::for_num_elems(n.max(1) as u32))
    }

    /// `silu(g) * u` over `g[a1..b1]`, `u[a2..b2]`.
    pub fn forward(
        g: &CudaStorage,
        (a1, b1): (usize, usize),
        u: &CudaStorage,
        (a2, b2): (usize, usize),
    ) -> Result<CudaStorage> {
        if g.dtype() != u.dtype() || b1 - a1 != b2 - a2 {
            candle_core::bail!("swiglu: gate and up differ in dtype or length");
        }
        let dev = g.device().clone();
        let name = format!("swiglu_fwd_{}", suffix(g.dtype())?);
        let func =
            dev.get_or_load_custom_func(&name, MODULE, kernels::ptx(MODULE, PRELUDE, SRC)?)?;
        let n = b1 - a1;
        let n64 = n as u64;
        let cfg = cfg(n)?;
        macro_rules! go {
            ($ty:ty) => {{
                let gv = g.as_cuda_slice::<$ty>()?.slice(a1..b1);
                let uv = u.as_cuda_slice::<$ty>()?.slice(a2..b2);
                // SAFETY: the kernel writes every element.
                let mut out = unsafe { dev.alloc::<$ty>(n) }?;
                let mut lb = func.builder();
                lb.arg(&gv);
                lb.arg(&uv);
                lb.arg(&mut out);
                lb.arg(&n64);
                // SAFETY: argument types match the kernel signature.
                unsafe { lb.launch(cfg) }.map_err(kernels::err)?;
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        Ok(match g.dtype() {
            DType::F32 => go!(f32),
            DType::F16 => go!(half::f16),
            _ => go!(half::bf16),
        })
    }

    /// `(dg, du)` for contiguous CUDA tensors `g`, `u`, `dy` of one shape and dtype.
    pub fn backward(g: &Tensor, u: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        let (gs, gl) = g.storage_and_layout();
        let (us, ul) = u.storage_and_layout();
        let (ds, dl) = dy.storage_and_layout();
        let (Storage::Cuda(gs), Storage::Cuda(us), Storage::Cuda(ds)) = (&*gs, &*us, &*ds) else {
            candle_core::bail!("swiglu backward: expected CUDA tensors");
        };
        let (r1, r2, r3) = (
            super::contiguous(gl)?,
            super::contiguous(ul)?,
            super::contiguous(dl)?,
        );
        let n = r1.1 - r1.0;
        if gs.dtype() != us.dtype()
            || gs.dtype() != ds.dtype()
            || r2.1 - r2.0 != n
            || r3.1 - r3.0 != n
        {
            candle_core::bail!("swiglu backward: g, u, dy differ in dtype or length");
        }
        let dev = gs.device().clone();
        let name = format!("swiglu_bwd_{}", suffix(gs.dtype())?);
        let func =
            dev.get_or_load_custom_func(&name, MODULE, kernels::ptx(MODULE, PRELUDE, SRC)?)?;
        let n64 = n as u64;
        let cfg = cfg(n)?;
        macro_rules! go {
            ($ty:ty) => {{
                let gv = gs.as_cuda_slice::<$ty>()?.slice(r1.0..r1.1);
                let uv = us.as_cuda_slice::<$ty>()?.slice(r2.0..r2.1);
                let dv = ds.as_cuda_slice::<$ty>()?.slice(r3.0..r3.1);
                // SAFETY: the kernel writes every element of both.
                let mut dg = unsafe { dev.alloc::<$ty>(n) }?;
                let mut du = unsafe { dev.alloc::<$ty>(n) }?;
                let mut lb = func.builder();
                lb.arg(&gv);
                lb.arg(&uv);
                lb.arg(&dv);
                lb.arg(&mut dg);
                lb.arg(&mut du);
                lb.arg(&n64);
                // SAFETY: argument types match the kernel signature.
                unsafe { lb.launch(cfg) }.map_err(kernels::err)?;
                (
                    CudaStorage::wrap_cuda_slice(dg, dev.clone()),
                    CudaStorage::wrap_cuda_slice(du, dev.clone()),
                )
            }};
        }
        let (dg, du) = match gs.dtype() {
            DType::F32 => go!(f32),
            DType::F16 => go!(half::f16),
            _ => go!(half::bf16),
        };
        let shape = g.shape();
        Ok((from_storage(dg, shape), from_storage(du, shape)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{max_abs_diff as max_diff, rand_uniform};
    use super::*;
    use candle_core::{Device, Var};

    fn rand(n: usize, seed: u64, scale: f64) -> Tensor {
        rand_uniform(&[n / 6, 6], seed, -scale, scale)
    }

    /// The tensor-op backward (`LORASCOPE_FUSED=0` on CUDA) equals the reference loops.
    #[test]
    fn generic_backward_matches_the_loops() {
        let g = rand(60, 4, 6.0);
        let u = rand(60, 5, 2.0);
        let dy = rand(60, 6, 1.0);
        let (dg0, du0) = backward(&g, &u, &dy).unwrap();
        let (dg1, du1) = backward_generic(&g, &u, &dy).unwrap();
        assert!(max_diff(&dg0, &dg1) < 1e-12, "dg {}", max_diff(&dg0, &dg1));
        assert!(max_diff(&du0, &du1) < 1e-12, "du {}", max_diff(&du0, &du1));
    }

    /// Forward and both gradients equal candle's `gate.silu() * up` composition (and its
    /// autograd) to rounding, in f64 and f32; bf16 and f16 to their precision.
    #[test]
    fn swiglu_matches_the_candle_composition() {
        for (dt, tol) in [
            (DType::F64, 1e-13),
            (DType::F32, 1e-5),
            (DType::BF16, 6e-2),
            (DType::F16, 1e-2),
        ] {
            let g = Var::from_tensor(&rand(48, 1, 6.0).to_dtype(dt).unwrap()).unwrap();
            let u = Var::from_tensor(&rand(48, 2, 2.0).to_dtype(dt).unwrap()).unwrap();
            let w = rand(48, 3, 1.0).to_dtype(dt).unwrap();
            let fused = swiglu(g.as_tensor(), u.as_tensor()).unwrap();
            let reference = (g.as_tensor().silu().unwrap() * u.as_tensor()).unwrap();
            assert_eq!(fused.dtype(), dt);
            let d = max_diff(&fused, &reference);
            assert!(d < tol, "{dt:?} forward: {d}");
            let sum = |y: &Tensor| (y * &w).unwrap().sum_all().unwrap();
            let gf = sum(&fused).backward().unwrap();
            let gr = sum(&reference).backward().unwrap();
            for (name, x) in [("gate", &g), ("up", &u)] {
                let (a, r) = (
                    gf.get(x.as_tensor()).unwrap(),
                    gr.get(x.as_tensor()).unwrap(),
                );
                assert_eq!(a.dtype(), dt);
                let d = max_diff(a, r);
                assert!(d < tol, "{dt:?} d{name}: {d}");
            }
        }
    }

    /// Both gradients against central finite differences of `sum(swiglu(g, u) * w)` in f64.
    #[test]
    fn swiglu_gradients_match_finite_differences() {
        let (g0, u0, w) = (rand(30, 4, 8.0), rand(30, 5, 3.0), rand(30, 6, 1.0));
        let gv = Var::from_tensor(&g0).unwrap();
        let uv = Var::from_tensor(&u0).unwrap();
        let loss = |g: &Tensor, u: &Tensor| -> f64 {
            (swiglu(g, u).unwrap() * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let grads = (swiglu(gv.as_tensor(), uv.as_tensor()).unwrap() * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let eps = 1e-6;
        for (which, var) in [(0, &gv), (1, &uv)] {
            let analytic: Vec<f64> = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            for i in 0..base.len() {
                let at = |delta: f64| {
                    let mut v = base.clone();
                    v[i] += delta;
                    let x = Tensor::from_vec(v, g0.shape(), &Device::Cpu).unwrap();
                    if which == 0 {
                        loss(&x, &u0)
                    } else {
                        loss(&g0, &x)
                    }
                };
                let fd = (at(eps) - at(-eps)) / (2.0 * eps);
                let err = (fd - analytic[i]).abs();
                assert!(
                    err < 1e-6 * (1.0 + fd.abs()),
                    "d{} [{i}]: fd {fd} vs {}",
                    ["gate", "up"][which],
                    analytic[i]
                );
            }
        }
    }

    /// Untracked inputs make an untracked output (no graph kept, e.g. the first pass of
    /// gradient checkpointing).
    #[test]
    fn untracked_inputs_record_nothing() {
        let y = swiglu(&rand(12, 7, 1.0), &rand(12, 8, 1.0)).unwrap();
        assert!(!y.track_op());
    }
}
