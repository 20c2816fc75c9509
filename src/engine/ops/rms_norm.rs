//! Root-mean-square layer norm with a frozen weight, as Hugging Face `Qwen2RMSNorm` /
//! `LlamaRMSNorm` ([`RmsNorm::new`]) and `Gemma2RMSNorm` / `Gemma3RMSNorm`
//! ([`RmsNorm::gemma`]: `x * rsqrt(mean(x^2) + eps) * (1 + w)` entirely in f32, one cast to the
//! input dtype at the end; here: the input upcast to f32, the Llama formula with the f32 weight
//! `1 + w`, the result cast back, which is the same arithmetic):
//!
//! - forward: `r = rsqrt(mean(x^2, -1) + eps)` in f32, `y = weight * cast(x r)`, where the
//!   normalised value is cast back to the input dtype before the weight multiply;
//! - backward (input only, the weight is frozen): with `xhat = x r` and `gw = dy * weight`,
//!   `dx = r * (gw - xhat * mean(gw * xhat, -1))`, in f32, rounded once to the input dtype.
//!
//! Fused path (CUDA, [`crate::engine::cuda::fused_path`] and [`RmsNorm::kernel_takes`]): one
//! kernel per direction, one 256-thread block per row (`cuda/kernels/rms_norm.cu`). Elsewhere
//! the generic candle code runs. The CPU loops of the kernels' formulas ([`RmsNormKernel`],
//! [`RmsNormGradKernel`] on the CPU) are what the tests compare with the generic code.

#[cfg(feature = "cuda")]
use super::contiguous_range;
use super::{CpuLoops, InputGradOp, apply, cpu_map};
use crate::engine::cuda::fused_path;
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor, WithDType};

/// Root-mean-square layer norm with a frozen weight, as Hugging Face `Qwen2RMSNorm`:
/// `y = weight * (x * rsqrt(mean(x^2, -1) + eps))`, statistics in f32, the normalised value
/// cast back to the input dtype before the weight multiply.
///
/// `weight`: (hidden) in the compute dtype. Input (..., hidden); output same shape and dtype.
/// Backward returns only `dx`.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
    /// Gemma: `weight` is `1 + w` in f32 (f64 for f64) and the input is upcast to it.
    upcast: bool,
}

impl RmsNorm {
    /// Build from the weight (hidden) and epsilon.
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self {
            weight,
            eps,
            upcast: false,
        }
    }

    /// Gemma's norm from its stored weight `w` (hidden): `x * rsqrt(mean(x^2) + eps) * (1 + w)`
    /// in f32, cast to the input dtype at the end (transformers `Gemma3RMSNorm`).
    ///
    /// Errors: a device error while forming `1 + w`.
    pub fn gemma(w: &Tensor, eps: f64) -> Result<Self> {
        let dt = super::stat_dtype(w.dtype());
        Ok(Self {
            weight: (w.to_dtype(dt)? + 1.0)?,
            eps,
            upcast: true,
        })
    }

    /// The weight applied, (hidden) (Gemma: `1 + w` in f32).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The weight as the checkpoint stores it (Gemma: `w`, not `1 + w`), in `dtype`.
    ///
    /// Errors: a device error.
    pub fn stored_weight(&self, dtype: candle_core::DType) -> Result<Tensor> {
        if self.upcast {
            (&self.weight - 1.0)?.to_dtype(dtype)
        } else {
            self.weight.to_dtype(dtype)
        }
    }

    /// `x` upcast to the weight's dtype for Gemma's norm, or `x`.
    fn upcast(&self, x: &Tensor) -> Result<Tensor> {
        if self.upcast {
            x.to_dtype(self.weight.dtype())
        } else {
            Ok(x.clone())
        }
    }

    /// Apply to `x` (..., hidden).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        apply(self, x)
    }

    /// The kernels' shape check: a non-empty `x` with a weight (and output gradient `grad`) of
    /// its dtype and device, the weight as long as the last dimension (and `grad` shaped as
    /// `x`).
    fn kernel_takes(&self, x: &Tensor, grad: Option<&Tensor>) -> bool {
        let dt = x.dtype();
        x.elem_count() > 0
            && self.weight.dtype() == dt
            && self.weight.device().same_device(x.device())
            && self.weight.dims() == [x.dims().last().copied().unwrap_or(0)]
            && grad.is_none_or(|g| g.dtype() == dt && g.dims() == x.dims())
    }

    /// Whether `x` (and `grad`) take the fused kernels.
    fn fused_here(&self, x: &Tensor, grad: Option<&Tensor>) -> bool {
        fused_path(x.dtype(), x.device()) && self.kernel_takes(x, grad)
    }
}

impl InputGradOp for RmsNorm {
    const NAME: &'static str = "rms-norm";
    fn plain(&self, x: &Tensor) -> Result<Tensor> {
        if self.upcast && x.dtype() != self.weight.dtype() {
            return self.plain(&self.upcast(x)?)?.to_dtype(x.dtype());
        }
        if self.fused_here(x, None) {
            return x
                .contiguous()?
                .apply_op2_no_bwd(&self.weight, &RmsNormKernel { eps: self.eps });
        }
        generic::forward(x, &self.weight, self.eps)
    }
    fn input_grad(&self, x: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if self.upcast && x.dtype() != self.weight.dtype() {
            let g = self.input_grad(&self.upcast(x)?, &self.upcast(grad)?)?;
            return g.map(|g| g.to_dtype(grad.dtype())).transpose();
        }
        if self.fused_here(x, Some(grad)) {
            return Ok(Some(x.contiguous()?.apply_op3_no_bwd(
                &self.weight,
                &grad.contiguous()?,
                &RmsNormGradKernel { eps: self.eps },
            )?));
        }
        Ok(Some(generic::backward(x, &self.weight, grad, self.eps)?))
    }
}

/// Fused [`RmsNorm`] forward on `(x, weight)`, as Hugging Face `Qwen2RMSNorm.forward`: per row
/// of `x` (..., n), `r = 1 / sqrt(mean(x^2) + eps)` in f32 (f64 for f64), then
/// `y = weight * cast(x * r)` where the cast is to `x`'s dtype and the product is rounded to that
/// dtype, as the generic path (`xhat.to_dtype(dt) * weight`). Weight (n) in `x`'s dtype.
///
/// CUDA: one NVRTC kernel, one 256-thread block per row (f32/f16/bf16). CPU: the same formula
/// as loops with f64 statistics, a reference for tests (the CPU model runs the generic code).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RmsNormKernel {
    pub(crate) eps: f64,
}

/// Fused [`RmsNorm`] backward on `(x, weight, dy)`, all (..., n) / (n) in one dtype: per row,
/// `r = 1 / sqrt(mean(x^2) + eps)`, `xhat = x r`, `gw = dy * weight`,
/// `dx = r * (gw - xhat * mean(gw * xhat))`, all in f32 (f64 for f64), `dx` rounded once to
/// `x`'s dtype. Same backends as [`RmsNormKernel`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct RmsNormGradKernel {
    pub(crate) eps: f64,
}

/// Row length of an RMSNorm input `x` (..., n) with weight (n).
fn rms_row(x: &Layout, w: &Layout, what: &str) -> Result<usize> {
    let n = x.shape().dims().last().copied().unwrap_or(0);
    if n == 0 || w.shape().dims() != [n] {
        candle_core::bail!("{what}: weight {:?} for input {:?}", w.shape(), x.shape());
    }
    Ok(n)
}

/// Errors unless `dy` is shaped as `x`.
fn same_shape(x: &Layout, dy: &Layout, what: &str) -> Result<()> {
    if dy.shape() != x.shape() {
        candle_core::bail!("{what}: dy {:?} for x {:?}", dy.shape(), x.shape());
    }
    Ok(())
}

impl candle_core::CustomOp2 for RmsNormKernel {
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
        rms_row(l1, l2, self.name())?;
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
        let w = self.name();
        let n = rms_row(l1, l2, w)?;
        let x = (s1, contiguous_range(l1, w)?);
        let weight = (s2, contiguous_range(l2, w)?);
        let out = cuda::rms_norm(x, weight, None, n, self.eps)?;
        Ok((out, l1.shape().clone()))
    }
}

impl CpuLoops for RmsNormKernel {
    const NAME: &'static str = "rms-norm-fused";
    fn f<T: WithDType>(&self, xs: &[&[T]]) -> Result<Vec<T>> {
        let (x, w) = (xs[0], xs[1]);
        Ok(cpu::forward(x, w, w.len(), self.eps))
    }
}

impl candle_core::CustomOp3 for RmsNormGradKernel {
    fn name(&self) -> &'static str {
        <Self as CpuLoops>::NAME
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        rms_row(l1, l2, self.name())?;
        same_shape(l1, l3, self.name())?;
        let out = cpu_map(self, &[(s1, l1), (s2, l2), (s3, l3)])?;
        Ok((out, l1.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let w = self.name();
        let n = rms_row(l1, l2, w)?;
        same_shape(l1, l3, w)?;
        let x = (s1, contiguous_range(l1, w)?);
        let weight = (s2, contiguous_range(l2, w)?);
        let dy = (s3, contiguous_range(l3, w)?);
        let out = cuda::rms_norm(x, weight, Some(dy), n, self.eps)?;
        Ok((out, l1.shape().clone()))
    }
}

impl CpuLoops for RmsNormGradKernel {
    const NAME: &'static str = "rms-norm-grad-fused";
    fn f<T: WithDType>(&self, xs: &[&[T]]) -> Result<Vec<T>> {
        let (x, w, g) = (xs[0], xs[1], xs[2]);
        Ok(cpu::backward(x, w, g, w.len(), self.eps))
    }
}

mod cpu {
    //! The kernels' formulas as loops (f64 arithmetic, the kernels' roundings to the storage
    //! dtype), over rows of length `n`.
    use candle_core::WithDType;

    pub fn forward<T: WithDType>(x: &[T], w: &[T], n: usize, eps: f64) -> Vec<T> {
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks(n) {
            let ss: f64 = row.iter().map(|v| v.to_f64() * v.to_f64()).sum();
            let r = 1.0 / (ss / n as f64 + eps).sqrt();
            for (v, w) in row.iter().zip(w) {
                let xhat = T::from_f64(v.to_f64() * r).to_f64();
                out.push(T::from_f64(xhat * w.to_f64()));
            }
        }
        out
    }

    pub fn backward<T: WithDType>(x: &[T], w: &[T], g: &[T], n: usize, eps: f64) -> Vec<T> {
        let mut out = Vec::with_capacity(x.len());
        for (row, grow) in x.chunks(n).zip(g.chunks(n)) {
            let (mut ss, mut dot) = (0.0, 0.0);
            for ((v, g), w) in row.iter().zip(grow).zip(w) {
                let v = v.to_f64();
                ss += v * v;
                dot += g.to_f64() * w.to_f64() * v;
            }
            let r = 1.0 / (ss / n as f64 + eps).sqrt();
            let m = dot * r / n as f64;
            for ((v, g), w) in row.iter().zip(grow).zip(w) {
                let gw = g.to_f64() * w.to_f64();
                out.push(T::from_f64(r * (gw - v.to_f64() * r * m)));
            }
        }
        out
    }
}

mod generic {
    //! The candle composition (the CPU model, CUDA with `LORASCOPE_FUSED=0`, the tests'
    //! reference): statistics in f32 (f64 for f64), rounding after each candle op.
    use super::super::stat_dtype;
    use candle_core::{D, Result, Tensor};

    /// `rsqrt(mean(x^2, -1) + eps)`, (..., 1), in `x`'s dtype.
    fn inv_rms(x: &Tensor, eps: f64) -> Result<Tensor> {
        (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()
    }

    /// `weight * cast(x r)`.
    pub fn forward(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
        let dt = x.dtype();
        let x32 = x.to_dtype(stat_dtype(dt))?;
        let r = inv_rms(&x32, eps)?;
        let xhat = x32.broadcast_mul(&r)?.to_dtype(dt)?;
        xhat.broadcast_mul(weight)
    }

    /// `dx = r * (g*w - xhat * mean(g*w*xhat))`, with `r = rsqrt(mean(x^2)+eps)`, `xhat = x r`.
    pub fn backward(x: &Tensor, weight: &Tensor, grad: &Tensor, eps: f64) -> Result<Tensor> {
        let dt = x.dtype();
        let f = stat_dtype(dt);
        let x32 = x.to_dtype(f)?;
        let r = inv_rms(&x32, eps)?;
        let xhat = x32.broadcast_mul(&r)?;
        let gw = grad.to_dtype(f)?.broadcast_mul(&weight.to_dtype(f)?)?;
        let m = (&gw * &xhat)?.mean_keepdim(D::Minus1)?;
        let dx = gw.sub(&xhat.broadcast_mul(&m)?)?.broadcast_mul(&r)?;
        dx.to_dtype(dt)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    //! Launchers of `cuda/kernels/rms_norm.cu` (the row in registers, `*8_*`, when it allows).
    use crate::engine::cuda::launch::{Arg, Buf, Module, launch, name8, per_row, vec8};
    use crate::engine::cuda::source;
    use candle_core::backend::BackendStorage;
    use candle_core::{CudaStorage, Result};

    static MODULE: Module = Module::new("lorascope_rms_norm", source::RMS_NORM);

    type In<'a> = (&'a CudaStorage, (usize, usize));

    /// RMSNorm forward (`g: None`) or backward (`g: Some(dy)`) over rows of length `n`.
    pub fn rms_norm(x: In, w: In, g: Option<In>, n: usize, eps: f64) -> Result<CudaStorage> {
        let dt = x.0.dtype();
        if w.0.dtype() != dt || g.is_some_and(|(g, _)| g.dtype() != dt) {
            candle_core::bail!("rms-norm-fused: mixed dtypes");
        }
        let dev = x.0.device();
        let root = if g.is_some() {
            "rms_norm_bwd"
        } else {
            "rms_norm_fwd"
        };
        let (a, b) = x.1;
        let rows = (b - a) / n;
        let out = Buf::alloc(dev, dt, b - a)?;
        let mut bufs = vec![Buf::view(x.0, x.1)?, Buf::view(w.0, w.1)?];
        if let Some((g, range)) = g {
            bufs.push(Buf::view(g, range)?);
        }
        // Rows of up to 8 values x 256 threads x RMS_GROUPS (4) in registers.
        let wide = n.is_multiple_of(8) && n <= 8 * 256 * 4 && vec8(bufs.iter().chain([&out]));
        let name = name8(root, dt, "rms-norm-fused", wide)?;
        let mut args: Vec<Arg> = bufs.iter().map(Buf::arg).collect();
        args.extend([
            out.arg(),
            Arg::I32(n as i32),
            Arg::F32((1.0 / n as f64) as f32),
            Arg::F32(eps as f32),
        ]);
        if rows > 0 {
            launch(dev, &MODULE, &name, per_row(rows, 256), &args)?;
        }
        out.into_storage()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testutil::{max_abs_diff, rand_uniform};
    use candle_core::{DType, Device};

    /// (dtype, tolerance of the fused formula against the generic code).
    const DTYPES: [(DType, f64); 4] = [
        (DType::F64, 1e-12),
        (DType::F32, 2e-5),
        (DType::F16, 8e-3),
        (DType::BF16, 6e-2),
    ];

    #[test]
    fn fused_rms_norm_formula_matches_the_generic_forward_and_backward() {
        let (x, w, g) = (
            rand_uniform(&[3, 5, 48], 1, -2.0, 2.0),
            rand_uniform(&[48], 2, 0.5, 1.5),
            rand_uniform(&[3, 5, 48], 3, -1.0, 1.0),
        );
        for (dt, tol) in DTYPES {
            let c = |t: &Tensor| t.to_dtype(dt).unwrap();
            let norm = RmsNorm::new(c(&w), 1e-6);
            let generic = norm.plain(&c(&x)).unwrap();
            let fused = c(&x)
                .apply_op2_no_bwd(&c(&w), &RmsNormKernel { eps: 1e-6 })
                .unwrap();
            assert_eq!(fused.dtype(), dt);
            let err = max_abs_diff(&fused, &generic);
            assert!(err < tol, "{dt:?} forward: max abs error {err}");
            let generic = norm.input_grad(&c(&x), &c(&g)).unwrap().unwrap();
            let fused = c(&x)
                .apply_op3_no_bwd(&c(&w), &c(&g), &RmsNormGradKernel { eps: 1e-6 })
                .unwrap();
            let err = max_abs_diff(&fused, &generic);
            assert!(err < tol, "{dt:?} backward: max abs error {err}");
        }
    }

    #[test]
    fn fused_rms_norm_rounds_the_normalised_value_before_the_weight() {
        // f16: cast(x r) * w, each rounded, must equal the generic path exactly when the
        // statistics agree (a row of equal values has r = 1/|v| up to eps).
        let x = Tensor::new(&[[3.0f32, -3.0, 3.0, -3.0]], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let w = Tensor::new(&[0.1f32, 0.3, 0.7, 1.9], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let generic = RmsNorm::new(w.clone(), 1e-6).plain(&x).unwrap();
        let fused = x
            .apply_op2_no_bwd(&w, &RmsNormKernel { eps: 1e-6 })
            .unwrap();
        assert_eq!(max_abs_diff(&fused, &generic), 0.0);
    }

    #[test]
    fn fused_rms_norm_backward_matches_finite_differences() {
        let (x, w, g) = (
            rand_uniform(&[2, 16], 4, -2.0, 2.0),
            rand_uniform(&[16], 5, 0.5, 1.5),
            rand_uniform(&[2, 16], 6, -1.0, 1.0),
        );
        let op = RmsNormKernel { eps: 1e-6 };
        let loss = |x: &Tensor| -> f64 {
            (x.apply_op2_no_bwd(&w, &op).unwrap() * &g)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let dx = x
            .apply_op3_no_bwd(&w, &g, &RmsNormGradKernel { eps: 1e-6 })
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let xv = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let h = 1e-6;
        for i in 0..xv.len() {
            let at = |delta: f64| {
                let mut v = xv.clone();
                v[i] += delta;
                loss(&Tensor::from_vec(v, x.shape(), &Device::Cpu).unwrap())
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            assert!((fd - dx[i]).abs() < 1e-6, "dx[{i}]: {} vs fd {fd}", dx[i]);
        }
    }

    /// The CPU model keeps the generic path: the fused kernels are CUDA-only in the model.
    #[test]
    fn cpu_rms_norm_keeps_the_generic_path() {
        let x = rand_uniform(&[2, 4], 15, -1.0, 1.0)
            .to_dtype(DType::F32)
            .unwrap();
        let norm = RmsNorm::new(Tensor::ones(4, DType::F32, &Device::Cpu).unwrap(), 1e-6);
        assert!(norm.kernel_takes(&x, None));
        assert!(!norm.fused_here(&x, None));
    }
}
