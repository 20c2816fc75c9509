//! Rotary position embedding, Hugging Face `Qwen2RotaryEmbedding` tables and
//! `apply_rotary_pos_emb` on one tensor:
//!
//! - tables: `inv_freq[i] = theta^(-2i/d)`, `freqs[t, k] = t * inv_freq[k % (d/2)]` (the halves
//!   concatenated), `cos`, `sin` of that, (seq, head_dim);
//! - forward: `y = x * cos + rotate_half(x) * sin` with `rotate_half([x1, x2]) = [-x2, x1]` over
//!   the last dimension;
//! - backward (the op is linear in `x`; the tables are constants): the adjoint
//!   `dx = dy * cos + rotate_half^T(dy * sin)` with `rotate_half^T([a, b]) = [b, -a]`.
//!
//! Fused path (CUDA, [`crate::engine::cuda::fused_path`] and [`tables_fit`]): one kernel each
//! way (`cuda/kernels/rope.cu`), f32 arithmetic, one rounding to `x`'s dtype, recorded as one
//! graph node ([`Rope`]). Elsewhere differentiable candle primitives, rounding after each.

use super::{CpuLoops, cpu_map};
use crate::engine::cuda::fused_path;
use crate::engine::profiler;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType};

/// Rotary position embedding tables (`cos`, `sin`), each (seq_len, head_dim) in f32, as
/// Hugging Face's rotary modules: `freqs[t, k] = t * inv_freq[k % (d/2)]` in f32 (the halves
/// concatenated), `cos = cos(freqs) * attention_factor`, `sin = sin(freqs) * attention_factor`
/// (`attention_factor` is 1 except for YaRN and LongRoPE). `inv_freq`: head_dim / 2 values.
///
/// Errors: device errors.
pub fn rope_tables(
    seq_len: usize,
    inv_freq: &[f32],
    attention_factor: f64,
    device: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let head_dim = 2 * half;
    let mut freqs = Vec::with_capacity(seq_len * head_dim);
    for t in 0..seq_len {
        for k in 0..head_dim {
            freqs.push(t as f32 * inv_freq[k % half]);
        }
    }
    let f = Tensor::from_vec(freqs, (seq_len, head_dim), device)?;
    if attention_factor == 1.0 {
        return Ok((f.cos()?, f.sin()?));
    }
    Ok((
        f.cos()?.affine(attention_factor, 0.0)?,
        f.sin()?.affine(attention_factor, 0.0)?,
    ))
}

/// `theta ** (-2i/d)` for `i < d/2`, f32: plain RoPE's inverse frequencies.
#[cfg(test)]
fn plain_inv_freq(head_dim: usize, theta: f64) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32)
        .collect()
}

/// Apply RoPE to `x` (batch, heads, seq, head_dim): `x * cos + rotate_half(x) * sin`, where
/// `rotate_half([x1, x2]) = [-x2, x1]` (Hugging Face `apply_rotary_pos_emb`). `cos`/`sin`:
/// (seq, head_dim) in `x`'s dtype; output like `x`.
///
/// On the fused path one kernel each way ([`Rope`]: f32 arithmetic, one rounding to `x`'s
/// dtype, backward `dx` only); elsewhere differentiable candle primitives, rounding after each
/// of them.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if fused_here(x, cos, sin) {
        return profiler::section("rope", "fwd", x.device(), || rope_fused(x, cos, sin));
    }
    generic::forward(x, cos, sin)
}

/// The adjoint of [`apply_rope`] (its input gradient for the output gradient `grad`
/// (..., seq, head_dim)), on untracked tensors: `dx = dy * cos + rotate_half^T(dy * sin)` with
/// `rotate_half^T([a, b]) = [b, -a]`: the fused [`Rope`] kernel where [`apply_rope`] uses it,
/// candle ops elsewhere. Tables as [`apply_rope`].
///
/// Errors: tables that do not fit `grad`, device errors.
pub(crate) fn rope_backward(grad: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if !tables_fit(grad, cos, sin) {
        candle_core::bail!(
            "rope backward: tables {:?}/{:?} for gradient {:?}",
            cos.shape(),
            sin.shape(),
            grad.shape()
        );
    }
    if !fused_here(grad, cos, sin) {
        return profiler::section("rope", "bwd", grad.device(), || {
            generic::backward(grad, cos, sin)
        });
    }
    let adjoint = Rope {
        cos: cos.contiguous()?,
        sin: sin.contiguous()?,
        transpose: true,
    };
    profiler::section("rope", "bwd", grad.device(), || {
        grad.contiguous()?.apply_op1_no_bwd(&adjoint)
    })
}

/// The kernel's shape check: `x` (..., t, d) non-empty, tables (t, d) of `x`'s dtype and
/// device, `d` even.
fn tables_fit(x: &Tensor, cos: &Tensor, sin: &Tensor) -> bool {
    let xd = x.dims();
    xd.len() >= 2
        && cos.dims() == &xd[xd.len() - 2..]
        && sin.dims() == cos.dims()
        && xd[xd.len() - 1].is_multiple_of(2)
        && cos.dtype() == x.dtype()
        && sin.dtype() == x.dtype()
        && cos.device().same_device(x.device())
        && sin.device().same_device(x.device())
}

/// Whether `x` with these tables takes the fused kernel.
fn fused_here(x: &Tensor, cos: &Tensor, sin: &Tensor) -> bool {
    fused_path(x.dtype(), x.device()) && x.elem_count() > 0 && tables_fit(x, cos, sin)
}

/// RoPE as one graph node, Hugging Face `apply_rotary_pos_emb` on one tensor:
/// `y = x * cos + rotate_half(x) * sin` with `rotate_half([x1, x2]) = [-x2, x1]` over the last
/// dimension, for `x` (..., t, d) and constant tables `cos`, `sin` (t, d) in `x`'s dtype.
///
/// The op is linear in `x`; its backward is the adjoint (`transpose`),
/// `dx = dy * cos + rotate_half^T(dy * sin)` with `rotate_half^T([a, b]) = [b, -a]`, and only
/// `dx` (the tables are constants). Arithmetic in f32 (f64 for f64), one rounding to `x`'s
/// dtype. CUDA: one NVRTC kernel (f32/f16/bf16), one thread per element; CPU: reference loops
/// for tests (the CPU model runs [`apply_rope`]'s generic code).
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    cos: Tensor,
    sin: Tensor,
    transpose: bool,
}

impl Rope {
    /// `(t, d)` of the tables, checked against the input layout.
    fn dims(&self, l: &Layout) -> Result<(usize, usize)> {
        let (t, d) = self.cos.dims2()?;
        let xd = l.shape().dims();
        if xd.len() < 2
            || xd[xd.len() - 2..] != [t, d]
            || !d.is_multiple_of(2)
            || self.sin.dims() != [t, d]
        {
            candle_core::bail!(
                "rope: tables {:?}/{:?} for input {:?}",
                self.cos.shape(),
                self.sin.shape(),
                l.shape()
            );
        }
        Ok((t, d))
    }
}

/// [`Rope`] on `x` as a graph node (recorded when `x` is tracked).
pub(crate) fn rope_fused(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Rope {
        cos: cos.contiguous()?,
        sin: sin.contiguous()?,
        transpose: false,
    })
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        <Self as CpuLoops>::NAME
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.dims(l)?;
        Ok((cpu_map(self, &[(s, l)])?, l.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (t, d) = self.dims(l)?;
        let range = super::contiguous_range(l, "rope")?;
        let out = cuda::rope((s, range), &self.cos, &self.sin, t, d, self.transpose)?;
        Ok((out, l.shape().clone()))
    }
    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // Detached: see `InputGradCustomOp::bwd`. The adjoint of a linear op, untracked.
        let grad = grad.detach();
        let adjoint = Rope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            transpose: !self.transpose,
        };
        profiler::section("rope", "bwd", grad.device(), || {
            Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&adjoint)?))
        })
    }
}

impl CpuLoops for Rope {
    const NAME: &'static str = "rope";
    fn f<T: WithDType>(&self, xs: &[&[T]]) -> Result<Vec<T>> {
        let (t, _) = self.cos.dims2()?;
        let c = self.cos.flatten_all()?.to_vec1::<T>()?;
        let s = self.sin.flatten_all()?.to_vec1::<T>()?;
        Ok(cpu::rope(xs[0], &c, &s, t, self.transpose))
    }
}

mod cpu {
    //! The kernel's formula as a loop (f64 arithmetic, one rounding to the storage dtype).
    use candle_core::WithDType;

    /// RoPE over `x` (..., t, d) with tables `c`, `s` (t, d); `transpose`: the adjoint
    /// `dy * c + rotate_half^T(dy * s)` with `rotate_half^T([a, b]) = [b, -a]`.
    pub fn rope<T: WithDType>(x: &[T], c: &[T], s: &[T], t: usize, transpose: bool) -> Vec<T> {
        let d = c.len() / t;
        let h = d / 2;
        (0..x.len())
            .map(|i| {
                let j = i % d;
                let k = ((i / d) % t) * d + j;
                let f = |a: &T| a.to_f64();
                let rot = match (transpose, j < h) {
                    (false, true) => -f(&x[i + h]) * f(&s[k]),
                    (false, false) => f(&x[i - h]) * f(&s[k]),
                    (true, true) => f(&x[i + h]) * f(&s[k + h]),
                    (true, false) => -f(&x[i - h]) * f(&s[k - h]),
                };
                T::from_f64(f(&x[i]) * f(&c[k]) + rot)
            })
            .collect()
    }
}

mod generic {
    //! The candle composition (the CPU model, CUDA with `LORASCOPE_FUSED=0`, the tests'
    //! reference), rounding after each primitive.
    use candle_core::{D, Result, Tensor};

    /// `x * cos + rotate_half(x) * sin`, differentiable.
    pub fn forward(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let d = x.dim(D::Minus1)?;
        let x1 = x.narrow(D::Minus1, 0, d / 2)?;
        let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
        let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?
    }

    /// `dy * cos + rotate_half^T(dy * sin)`.
    pub fn backward(grad: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let d = grad.dim(D::Minus1)?;
        let gs = grad.broadcast_mul(sin)?;
        let a = gs.narrow(D::Minus1, 0, d / 2)?;
        let b = gs.narrow(D::Minus1, d / 2, d / 2)?;
        grad.broadcast_mul(cos)? + Tensor::cat(&[&b, &a.neg()?], D::Minus1)?
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    //! Launcher of `cuda/kernels/rope.cu`: one thread per element, grid-stride.
    use super::super::cuda_buf;
    use crate::engine::cuda::launch::{Arg, Buf, Module, grid_stride, launch, vec8_or};
    use crate::engine::cuda::source;
    use candle_core::backend::BackendStorage;
    use candle_core::{CudaStorage, Result, Tensor};

    static MODULE: Module = Module::new("lorascope_rope", source::ROPE);

    /// RoPE (or its adjoint) over `x` (..., t, d) with tables (t, d).
    pub fn rope(
        (x, (a, b)): (&CudaStorage, (usize, usize)),
        cos: &Tensor,
        sin: &Tensor,
        t: usize,
        d: usize,
        transpose: bool,
    ) -> Result<CudaStorage> {
        let dt = x.dtype();
        let dev = x.device();
        let (c, s) = (cuda_buf(cos, "rope table")?, cuda_buf(sin, "rope table")?);
        if c.dtype() != dt || s.dtype() != dt {
            candle_core::bail!("rope: tables must be in the input's dtype");
        }
        let n = b - a;
        let out = Buf::alloc(dev, dt, n)?;
        let xb = Buf::view(x, (a, b))?;
        // Eight elements per thread need whole groups of 8 in each half row and n a multiple
        // of d (whole rows).
        let wide = d.is_multiple_of(16) && n.is_multiple_of(d);
        let (name, cfg) = vec8_or(("rope", dt, "rope"), n, wide, &[&xb, &c, &s, &out], || {
            Ok(grid_stride(n, 1 << 20))
        })?;
        let args = [
            xb.arg(),
            c.arg(),
            s.arg(),
            out.arg(),
            Arg::U64(n as u64),
            Arg::I32(t as i32),
            Arg::I32(d as i32),
            Arg::I32(transpose as i32),
        ];
        if n > 0 {
            launch(dev, &MODULE, &name, cfg, &args)?;
        }
        out.into_storage()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testutil::{max_abs_diff, rand_uniform};
    use candle_core::{DType, Device, Var};

    /// (dtype, tolerance of the fused formula against the generic code).
    const DTYPES: [(DType, f64); 4] = [
        (DType::F64, 1e-12),
        (DType::F32, 2e-5),
        (DType::F16, 8e-3),
        (DType::BF16, 6e-2),
    ];

    /// Generic RoPE forward and its autograd gradient of `sum(y * w)`.
    fn rope_generic(x: &Tensor, cos: &Tensor, sin: &Tensor, w: &Tensor) -> (Tensor, Tensor) {
        let v = Var::from_tensor(x).unwrap();
        let y = apply_rope(v.as_tensor(), cos, sin).unwrap();
        let g = (&y * w).unwrap().sum_all().unwrap().backward().unwrap();
        (y.detach(), g.get(v.as_tensor()).unwrap().clone())
    }

    fn rope_fused_with_grad(
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        w: &Tensor,
    ) -> (Tensor, Tensor) {
        let v = Var::from_tensor(x).unwrap();
        let y = rope_fused(v.as_tensor(), cos, sin).unwrap();
        let g = (&y * w).unwrap().sum_all().unwrap().backward().unwrap();
        (y.detach(), g.get(v.as_tensor()).unwrap().clone())
    }

    #[test]
    fn fused_rope_matches_the_generic_forward_and_backward() {
        let shape = [2, 3, 5, 8];
        let x = rand_uniform(&shape, 7, -1.0, 1.0);
        let w = rand_uniform(&shape, 8, -1.0, 1.0);
        // Random tables (halves differ), so a wrong partner index in the backward shows; and
        // the model's tables.
        let (rc, rs) = (
            rand_uniform(&[5, 8], 9, -1.0, 1.0),
            rand_uniform(&[5, 8], 10, -1.0, 1.0),
        );
        let (qc, qs) = rope_tables(5, &plain_inv_freq(8, 10_000.0), 1.0, &Device::Cpu).unwrap();
        for (cos, sin) in [(rc, rs), (qc, qs)] {
            for (dt, tol) in DTYPES {
                let c = |t: &Tensor| t.to_dtype(dt).unwrap();
                let (yg, gg) = rope_generic(&c(&x), &c(&cos), &c(&sin), &c(&w));
                let (yf, gf) = rope_fused_with_grad(&c(&x), &c(&cos), &c(&sin), &c(&w));
                assert_eq!((yf.dtype(), gf.dtype()), (dt, dt));
                let err = max_abs_diff(&yf, &yg);
                assert!(err < tol, "{dt:?} forward: max abs error {err}");
                let err = max_abs_diff(&gf, &gg);
                assert!(err < tol, "{dt:?} backward: max abs error {err}");
                // The hand-written adjoint equals autograd through the generic forward.
                let adj = rope_backward(&c(&w), &c(&cos), &c(&sin)).unwrap();
                let err = max_abs_diff(&adj, &gg);
                assert!(err < tol, "{dt:?} rope_backward: max abs error {err}");
            }
        }
    }

    #[test]
    fn fused_rope_backward_matches_finite_differences() {
        let shape = [1, 2, 3, 6];
        let x = rand_uniform(&shape, 11, -1.0, 1.0);
        let w = rand_uniform(&shape, 12, -1.0, 1.0);
        let (cos, sin) = (
            rand_uniform(&[3, 6], 13, -1.0, 1.0),
            rand_uniform(&[3, 6], 14, -1.0, 1.0),
        );
        let (_, dx) = rope_fused_with_grad(&x, &cos, &sin, &w);
        let dx = dx.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let xv = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let loss = |v: Vec<f64>| -> f64 {
            let x = Tensor::from_vec(v, &shape, &Device::Cpu).unwrap();
            (rope_fused(&x, &cos, &sin).unwrap() * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let h = 1e-5;
        for i in 0..xv.len() {
            let (mut p, mut m) = (xv.clone(), xv.clone());
            p[i] += h;
            m[i] -= h;
            let fd = (loss(p) - loss(m)) / (2.0 * h);
            assert!((fd - dx[i]).abs() < 1e-8, "dx[{i}]: {} vs fd {fd}", dx[i]);
        }
    }

    #[test]
    fn cpu_rope_keeps_the_generic_path() {
        // The fused op is CUDA-only in the model: on the CPU, apply_rope records the
        // primitives' graph (no "rope" node), which the checks above compare against.
        let x = rand_uniform(&[1, 1, 2, 4], 15, -1.0, 1.0)
            .to_dtype(DType::F32)
            .unwrap();
        let (c, s) = rope_tables(2, &plain_inv_freq(4, 10_000.0), 1.0, &Device::Cpu).unwrap();
        assert!(tables_fit(&x, &c, &s));
        assert!(!fused_here(&x, &c, &s));
    }
}
