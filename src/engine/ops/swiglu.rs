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
//! CUDA ([`crate::engine::cuda::fused_path`]): one kernel each way (`cuda/kernels/swiglu.cu`),
//! f32 arithmetic, results rounded to the compute dtype (f32/f16/bf16); with
//! `LORASCOPE_FUSED=0` or another dtype the generic candle composition runs instead. CPU: the
//! custom op always, its loops in f64 arithmetic, rounded to the input dtype
//! (f32/f64/f16/bf16).

use super::{CpuLoops, cpu_map};
use crate::engine::cuda::fused_path;
use crate::engine::profiler;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, WithDType};

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
        return generic::forward(gate, up);
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, Swiglu)
}

/// Whether `x` goes through the custom op: always on the CPU (its loops), on CUDA on the
/// fused path; elsewhere (and on CUDA off it) the generic composition.
fn uses_custom_op(x: &Tensor) -> bool {
    x.device().is_cpu() || fused_path(x.dtype(), x.device())
}

/// The [`swiglu`] graph node.
struct Swiglu;

/// `(dgate, dup)` of [`swiglu`] for the output gradient `dy`, on untracked inputs (the
/// hand-written backward of a checkpointed layer); shapes and dtype as the inputs.
///
/// Errors: as [`swiglu`].
pub(crate) fn swiglu_backward(g: &Tensor, u: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    profiler::section("swiglu", "bwd", g.device(), || {
        if uses_custom_op(g) {
            backward(g, u, dy)
        } else {
            generic::backward(g, u, dy)
        }
    })
}

/// [`swiglu_backward`] taking gate and up by value, for a caller that holds the only handles
/// on their storages (the checkpointed MLP's backward, `model/mlp.rs`): on the fused CUDA path
/// with [`crate::engine::cuda::in_place_mlp_on`], `dg` is written over `g` and `du` over `u`
/// (the kernel reads each element of the three inputs before it writes it), so no (tokens,
/// intermediate) buffer is allocated; elsewhere as [`swiglu_backward`]. Same values either way.
///
/// Errors: as [`swiglu`].
pub(crate) fn swiglu_backward_owned(g: Tensor, u: Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if g.device().is_cuda()
        && uses_custom_op(&g)
        && crate::engine::cuda::in_place_mlp_on()
        && u.dtype() == g.dtype()
    {
        return profiler::section("swiglu", "bwd", &g.device().clone(), || {
            let dy = dy.to_dtype(g.dtype())?.contiguous()?;
            // Not contiguous: fresh copies, this function's alone.
            let (g, u) = (g.contiguous()?, u.contiguous()?);
            cuda::backward_in_place(&g, &u, &dy)?;
            Ok((g, u))
        });
    }
    swiglu_backward(&g, &u, dy)
}

/// `silu(gate) * up` on two CUDA storages as a custom op receives them, by the fused kernel
/// (for [`crate::engine::model`]'s gated down projection, which keeps gate and up, not the
/// product): a fresh contiguous storage of `l1`'s shape; None off the fused path.
///
/// Errors: mismatched shapes, a non-contiguous layout, device errors.
#[cfg(feature = "cuda")]
pub(crate) fn swiglu_storages(
    (s1, l1): (&candle_core::CudaStorage, &Layout),
    (s2, l2): (&candle_core::CudaStorage, &Layout),
) -> Result<Option<candle_core::CudaStorage>> {
    use candle_core::backend::BackendStorage;
    let dev = candle_core::Device::Cuda(s1.device().clone());
    if !fused_path(s1.dtype(), &dev) || s2.dtype() != s1.dtype() {
        return Ok(None);
    }
    same_shape(l1, l2)?;
    let r1 = super::contiguous_range(l1, "swiglu")?;
    let r2 = super::contiguous_range(l2, "swiglu")?;
    profiler::section("swiglu", "fwd", &dev, || cuda::forward((s1, r1), (s2, r2))).map(Some)
}

/// The custom op's backward on detached inputs of one dtype: `(dg, du)`, the CUDA kernel or
/// the CPU loop.
fn backward(g: &Tensor, u: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let dy = dy.to_dtype(g.dtype())?.contiguous()?;
    let (g, u) = (g.contiguous()?, u.contiguous()?);
    #[cfg(feature = "cuda")]
    if g.device().is_cuda() {
        return cuda::backward(&g, &u, &dy);
    }
    cpu::backward(&g, &u, &dy)
}

/// Errors unless gate and up have one shape.
fn same_shape(l1: &Layout, l2: &Layout) -> Result<()> {
    if l1.shape() != l2.shape() {
        candle_core::bail!("swiglu: gate {:?} vs up {:?}", l1.shape(), l2.shape());
    }
    Ok(())
}

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        <Self as CpuLoops>::NAME
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_shape(l1, l2)?;
        Ok((cpu_map(self, &[(s1, l1), (s2, l2)])?, l1.shape().clone()))
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
        same_shape(l1, l2)?;
        let r1 = super::contiguous_range(l1, "swiglu")?;
        let r2 = super::contiguous_range(l2, "swiglu")?;
        let dev = candle_core::Device::Cuda(s1.device().clone());
        let out = profiler::section("swiglu", "fwd", &dev, || cuda::forward((s1, r1), (s2, r2)))?;
        Ok((out, l1.shape().clone()))
    }
    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Detached: see `InputGradCustomOp::bwd`.
        let (g, u, grad) = (g.detach(), u.detach(), grad.detach());
        let (dg, du) = profiler::section("swiglu", "bwd", g.device(), || backward(&g, &u, &grad))?;
        Ok((Some(dg), Some(du)))
    }
}

impl CpuLoops for Swiglu {
    const NAME: &'static str = "swiglu";
    fn f<T: WithDType>(&self, xs: &[&[T]]) -> Result<Vec<T>> {
        Ok(cpu::forward(xs[0], xs[1]))
    }
}

mod cpu {
    //! The kernels' formulas as loops, in f64, rounded to the input dtype.
    use candle_core::{DType, Result, Tensor, WithDType};

    /// `sig(x) = 1 / (1 + exp(-x))`.
    #[inline]
    fn sigmoid(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    /// `silu(g) * u` elementwise.
    pub fn forward<T: WithDType>(g: &[T], u: &[T]) -> Vec<T> {
        g.iter()
            .zip(u)
            .map(|(g, u)| {
                let x = g.to_f64();
                T::from_f64(x * sigmoid(x) * u.to_f64())
            })
            .collect()
    }

    /// `(dg, du)` for contiguous CPU tensors of one shape and dtype.
    pub fn backward(g: &Tensor, u: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        let v = |t: &Tensor| t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>();
        let (gv, uv, dv) = (v(g)?, v(u)?, v(dy)?);
        let (mut dg, mut du) = (Vec::with_capacity(gv.len()), Vec::with_capacity(gv.len()));
        for ((&x, &w), &d) in gv.iter().zip(&uv).zip(&dv) {
            let s = sigmoid(x);
            dg.push(d * w * s * (1.0 + x * (1.0 - s)));
            du.push(d * x * s);
        }
        let t = |v: Vec<f64>| Tensor::from_vec(v, g.shape(), g.device())?.to_dtype(g.dtype());
        Ok((t(dg)?, t(du)?))
    }
}

mod generic {
    //! The candle composition (CUDA with `LORASCOPE_FUSED=0` or a dtype without a kernel, and
    //! the tests' reference).
    use super::super::stat_dtype;
    use candle_core::{Result, Tensor};

    /// `gate.silu() * up`, differentiable.
    pub fn forward(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        gate.silu()? * up
    }

    /// The backward formulas as candle tensor ops in f32 (f64 for f64), one rounding to the
    /// inputs' dtype.
    pub fn backward(g: &Tensor, u: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        let dt = g.dtype();
        let f = stat_dtype(dt);
        let (g, u, dy) = (g.to_dtype(f)?, u.to_dtype(f)?, dy.to_dtype(f)?);
        let s = (g.neg()?.exp()? + 1.0)?.recip()?;
        let du = (&dy * (&g * &s)?)?;
        // d silu(g) / dg = s (1 + g (1 - s))
        let dsilu = (&s * ((&g * s.affine(-1.0, 1.0)?)? + 1.0)?)?;
        let dg = ((&dy * &u)? * dsilu)?;
        Ok((dg.to_dtype(dt)?, du.to_dtype(dt)?))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    //! Launchers of `cuda/kernels/swiglu.cu`: eight elements per thread on aligned buffers,
    //! else one.
    use super::super::cuda_buf;
    use crate::engine::cuda::launch::{Arg, Buf, Module, launch, vec8_or};
    use crate::engine::cuda::source;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
    use candle_core::{CudaStorage, Result, Tensor};

    static MODULE: Module = Module::new("lorascope_swiglu", source::SWIGLU);

    fn cfg(n: usize) -> Result<LaunchConfig> {
        if n > (u32::MAX as usize) {
            candle_core::bail!("swiglu: {n} elements is too many for one launch");
        }
        Ok(LaunchConfig::for_num_elems(n.max(1) as u32))
    }

    type In<'a> = (&'a CudaStorage, (usize, usize));

    /// `silu(g) * u` over `g[a1..b1]`, `u[a2..b2]`.
    pub fn forward((g, r1): In, (u, r2): In) -> Result<CudaStorage> {
        let n = r1.1 - r1.0;
        if g.dtype() != u.dtype() || r2.1 - r2.0 != n {
            candle_core::bail!("swiglu: gate and up differ in dtype or length");
        }
        let dev = g.device();
        let out = Buf::alloc(dev, g.dtype(), n)?;
        let (gb, ub) = (Buf::view(g, r1)?, Buf::view(u, r2)?);
        let (name, cfg) = vec8_or(
            ("swiglu_fwd", g.dtype(), "swiglu"),
            n,
            true,
            &[&gb, &ub, &out],
            || cfg(n),
        )?;
        let args = [gb.arg(), ub.arg(), out.arg(), Arg::U64(n as u64)];
        launch(dev, &MODULE, &name, cfg, &args)?;
        out.into_storage()
    }

    /// `(dg, du)` for contiguous CUDA tensors `g`, `u`, `dy` of one shape and dtype.
    pub fn backward(g: &Tensor, u: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        let candle_core::Device::Cuda(dev) = g.device() else {
            candle_core::bail!("swiglu backward: expected CUDA tensors");
        };
        let n = check(g, u, dy)?;
        let (dg, du) = (
            Buf::alloc(dev, g.dtype(), n)?,
            Buf::alloc(dev, g.dtype(), n)?,
        );
        run(g, u, dy, (&dg, &du))?;
        Ok((dg.into_tensor(g.shape())?, du.into_tensor(g.shape())?))
    }

    /// `(dg, du)` written over `g` and `u` (contiguous CUDA tensors of one shape and dtype
    /// with `dy`); the caller must hold the only handles on their storages.
    pub fn backward_in_place(g: &Tensor, u: &Tensor, dy: &Tensor) -> Result<()> {
        check(g, u, dy)?;
        let w = "swiglu backward";
        let (gb, ub) = (cuda_buf(g, w)?, cuda_buf(u, w)?);
        run(g, u, dy, (&gb, &ub))
    }

    /// The element count of `g`, `u`, `dy`, erroring unless they share length and dtype.
    fn check(g: &Tensor, u: &Tensor, dy: &Tensor) -> Result<usize> {
        let (n, dt) = (g.elem_count(), g.dtype());
        if u.dtype() != dt || dy.dtype() != dt || u.elem_count() != n || dy.elem_count() != n {
            candle_core::bail!("swiglu backward: g, u, dy differ in dtype or length");
        }
        Ok(n)
    }

    /// Launch `swiglu_bwd*` reading `g`, `u`, `dy` and writing `dg`, `du`.
    fn run(g: &Tensor, u: &Tensor, dy: &Tensor, (dg, du): (&Buf, &Buf)) -> Result<()> {
        let candle_core::Device::Cuda(dev) = g.device() else {
            candle_core::bail!("swiglu backward: expected CUDA tensors");
        };
        let (n, dt, w) = (g.elem_count(), g.dtype(), "swiglu backward");
        let (gb, ub, db) = (cuda_buf(g, w)?, cuda_buf(u, w)?, cuda_buf(dy, w)?);
        let bufs = [&gb, &ub, &db, dg, du];
        let (name, cfg) = vec8_or(("swiglu_bwd", dt, "swiglu"), n, true, &bufs, || cfg(n))?;
        let args = [
            gb.arg(),
            ub.arg(),
            db.arg(),
            dg.arg(),
            du.arg(),
            Arg::U64(n as u64),
        ];
        launch(dev, &MODULE, &name, cfg, &args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testutil::{max_abs_diff as max_diff, rand_uniform};
    use candle_core::{DType, Device, Var};

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
        let (dg1, du1) = generic::backward(&g, &u, &dy).unwrap();
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
