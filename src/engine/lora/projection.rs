//! One LoRA-adapted projection as a single graph node (PEFT `lora.Linear` forward), after
//! Unsloth's `fast_lora.py`:
//!
//! - forward: `y = x W^T + b + (d(x) A^T) (s B)^T`, `d` the regenerable dropout
//!   ([`super::dropout_keep`]), `s = alpha / r`, `A` (r, in), `B` (out, r) f32 masters cast to
//!   the compute dtype;
//! - backward: `du = dy (s B)`, `dB = s dy^T (d(x) A^T)`, `dA = du^T d(x)`,
//!   `dx = dy W + mask * (du A) / (1 - p)`; the base weight gets no gradient.
//!
//! On the fused path ([`crate::engine::cuda::fused_path`], f32 masters) both directions run as
//! direct cuBLAS calls and small kernels ([`super::cuda`]); elsewhere `generic` (candle ops).

use super::{BaseLinear, HashDropout};
use crate::engine::ops::{cpu_in, cpu_out};
use crate::engine::profiler;
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};

/// One LoRA-adapted projection as a single graph node (PEFT `lora.Linear` forward):
/// `y = base(x) + scale * dropout(x) A^T B^T`.
///
/// Inputs: `x` (tokens, in) in the compute dtype, `A` (r, in) and `B` (out, r) f32 master
/// weights (cast to the compute dtype inside). Output (tokens, out) in the compute dtype.
/// Nothing but the inputs is kept for backward: the dropout mask is a counter-based hash of
/// (`seed`, element index) ([`super::dropout_keep`]) and `dropout(x) A^T` (tokens x r) is recomputed.
/// Backward returns `dx = dy W + mask * (scale * dy B) A / (1 - p)`,
/// `dA = (scale * dy B)^T dropout(x)` and `dB = scale * dy^T (dropout(x) A^T)` in f32; the
/// base weight gets no gradient.
#[derive(Debug, Clone)]
pub struct LoraProjection {
    /// The frozen base projection (out, in).
    pub(crate) base: BaseLinear,
    /// `alpha / r`.
    pub(crate) scale: f64,
    /// Drop probability of the adapter input, in [0, 1) (0: no dropout).
    pub(crate) dropout: f64,
    /// Seed of the regenerable dropout mask ([`super::dropout_keep`]); 0 without dropout.
    pub(crate) seed: u64,
    /// The layer pass's casts of the masters ([`super::CastScope`]), used while they live
    /// (CUDA builds; always None without CUDA).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) casts: Option<super::AdapterCasts>,
}

impl LoraProjection {
    /// Untracked forward of `x` (tokens, in) with adapter weights `a`, `b` (treated as
    /// constants): `(tokens, out)` in `x`'s dtype.
    ///
    /// Errors: shape, dtype or device errors.
    pub(crate) fn forward_untracked(&self, x: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        if x.device().is_cuda() {
            x.contiguous()?.apply_op3_no_bwd(a, b, self)
        } else {
            self.forward(&x.detach(), &a.detach(), &b.detach())
        }
    }

    /// Untracked forward of a CUDA storage `x` (tokens, in) as a custom op receives it, with
    /// adapter weights `a`, `b` (constants): on the direct path ([`super::cuda`]) a fresh
    /// (tokens, out) storage in `x`'s dtype, without copying `x`; None off it.
    ///
    /// Errors: shape, dtype or device errors.
    #[cfg(feature = "cuda")]
    pub(crate) fn forward_cuda_storage(
        &self,
        x: (&candle_core::CudaStorage, &Layout),
        a: &Tensor,
        b: &Tensor,
    ) -> Result<Option<candle_core::CudaStorage>> {
        use candle_core::Storage;
        use candle_core::backend::BackendStorage;
        let dev = candle_core::Device::Cuda(x.0.device().clone());
        if !Self::direct_path(x.0.dtype(), &dev, a.dtype(), b.dtype()) {
            return Ok(None);
        }
        let (sa, la) = a.storage_and_layout();
        let (sb, lb) = b.storage_and_layout();
        match (&*sa, &*sb) {
            (Storage::Cuda(ca), Storage::Cuda(cb)) => {
                profiler::section("lora-projection", "fwd", &dev, || {
                    super::cuda::forward(self, x, (ca, la), (cb, lb))
                })
                .map(Some)
            }
            _ => candle_core::bail!("lora projection: adapter weights not on the CUDA device"),
        }
    }

    /// Untracked forward on tensors (the CPU path, and CUDA off the direct path).
    fn forward(&self, x: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        generic::forward(self, x, a, b)
    }

    /// The mask parameters as the dropout op.
    pub(crate) fn hash_dropout(&self) -> HashDropout {
        HashDropout {
            p: self.dropout,
            seed: self.seed,
        }
    }

    /// Whether an input of `x_dtype` on `device` with adapter masters of `a_dtype`, `b_dtype`
    /// takes the direct CUDA path ([`super::cuda`]): the fused path, f32 masters.
    #[cfg(feature = "cuda")]
    fn direct_path(
        x_dtype: candle_core::DType,
        device: &candle_core::Device,
        a_dtype: candle_core::DType,
        b_dtype: candle_core::DType,
    ) -> bool {
        use candle_core::DType;
        crate::engine::cuda::fused_path(x_dtype, device)
            && a_dtype == DType::F32
            && b_dtype == DType::F32
    }

    /// Gradients `(dx, dA, dB)` for the output gradient `dy` (tokens, out), on untracked
    /// inputs: `dx` in `x`'s dtype, `dA`/`dB` in the masters' dtype (f32).
    ///
    /// Errors: shape, dtype or device errors.
    pub(crate) fn backward(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.backward_with(x.clone(), false, a, b, dy)
    }

    /// [`Self::backward`] taking the input by value: the caller hands over the only handle on
    /// `x`'s storage (nothing else may read it afterwards). On the direct CUDA path with
    /// [`crate::engine::cuda::in_place_mlp_on`], `d(x)` is then written over `x` and `x` freed
    /// before `dx` is allocated (`lora/cuda.rs` `backward`), one (tokens, in) buffer fewer at
    /// the peak; elsewhere the same as [`Self::backward`]. Same results either way.
    ///
    /// Errors: as [`Self::backward`].
    pub(crate) fn backward_owned(
        &self,
        x: Tensor,
        a: &Tensor,
        b: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.backward_with(x, crate::engine::cuda::in_place_mlp_on(), a, b, dy)
    }

    /// The direct CUDA backward (`exclusive`: `x` may be overwritten and freed early), else
    /// the generic one.
    fn backward_with(
        &self,
        x: Tensor,
        exclusive: bool,
        a: &Tensor,
        b: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if Self::direct_path(x.dtype(), x.device(), a.dtype(), b.dtype()) {
            let (dx, da, db) = super::cuda::backward(self, x, exclusive, a, b, dy)?;
            return Ok((Some(dx), Some(da), Some(db)));
        }
        let _ = exclusive;
        let (dx, da, db) = generic::backward(self, &x, a, b, dy)?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}

impl candle_core::CustomOp3 for LoraProjection {
    fn name(&self) -> &'static str {
        "lora-projection"
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
        cpu_out(self.forward(&cpu_in(s1, l1)?, &cpu_in(s2, l2)?, &cpu_in(s3, l3)?)?)
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
        use crate::engine::ops::{cuda_in, cuda_out};
        use candle_core::backend::BackendStorage;
        let dev = candle_core::Device::Cuda(s1.device().clone());
        if Self::direct_path(s1.dtype(), &dev, s2.dtype(), s3.dtype()) {
            let y = profiler::section("lora-projection", "fwd", &dev, || {
                super::cuda::forward(self, (s1, l1), (s2, l2), (s3, l3))
            })?;
            let shape = Shape::from((l1.dims()[0], self.base.shape().0));
            return Ok((y, shape));
        }
        let x = cuda_in(s1, l1)?;
        cuda_out(profiler::section("lora-projection", "fwd", &dev, || {
            self.forward(&x, &cuda_in(s2, l2)?, &cuda_in(s3, l3)?)
        })?)
    }
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Detached: see `ops::InputGradCustomOp::bwd` (here `A` and `B` are variables, whose
        // gradients stay in the store, so a graph hanging off them would live all step).
        let (x, a, b, grad) = (x.detach(), a.detach(), b.detach(), grad.detach());
        profiler::section("lora-projection", "bwd", x.device(), || {
            self.backward(&x, &a, &b, &grad)
        })
    }
}

mod generic {
    //! The projection as candle tensor ops (the CPU path, CUDA with `LORASCOPE_FUSED=0`, and
    //! the reference of `super::super::cuda`'s direct path): the masters cast to the compute
    //! dtype, the mask applied by [`HashDropout`] (the same mask as the CUDA kernels).
    use super::LoraProjection;
    use candle_core::{Result, Tensor};

    /// `d(x)`, or `x` itself without dropout.
    fn dropped(op: &LoraProjection, x: &Tensor) -> Result<Tensor> {
        if op.dropout > 0.0 {
            x.apply_op1_no_bwd(&op.hash_dropout())
        } else {
            Ok(x.clone())
        }
    }

    /// `y = base(x) + d(x) A^T (s B)^T`.
    pub fn forward(op: &LoraProjection, x: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        let y = op.base.plain(x)?;
        let u = dropped(op, x)?.matmul(&a.to_dtype(dt)?.t()?)?;
        let bs = b.affine(op.scale, 0.0)?.to_dtype(dt)?;
        y + u.matmul(&bs.t()?)?
    }

    /// `(dx, dA, dB)`: `du = dy (s B)`, `dB = s dy^T (d(x) A^T)`, `dA = du^T d(x)`,
    /// `dx = dy W + d(du A)`; `dx` in `x`'s dtype, `dA`, `dB` in the masters' dtype.
    pub fn backward(
        op: &LoraProjection,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        dy: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let dt = x.dtype();
        let dy = dy.to_dtype(dt)?.contiguous()?;
        let ac = a.to_dtype(dt)?;
        let xd = dropped(op, x)?;
        let u = xd.matmul(&ac.t()?)?;
        let bs = b.affine(op.scale, 0.0)?.to_dtype(dt)?;
        let du = dy.matmul(&bs)?;
        let db = dy.t()?.matmul(&u)?.affine(op.scale, 0.0)?;
        let da = du.t()?.matmul(&xd)?;
        drop(xd);
        let dxl = dropped(op, &du.matmul(&ac)?)?;
        let dx = match op.base.input_grad(x, &dy)? {
            Some(g) => (g + dxl)?,
            None => dxl,
        };
        Ok((dx, da.to_dtype(a.dtype())?, db.to_dtype(b.dtype())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::lora::dropout_keep;
    use crate::engine::ops::FrozenLinear;
    use crate::engine::testutil::{max_abs_diff as max_abs, rand_uniform};
    use candle_core::{Device, Var};

    fn rand(shape: (usize, usize), seed: u64) -> Tensor {
        rand_uniform(&[shape.0, shape.1], seed, -1.0, 1.0)
    }

    /// The fused projection with dropout equals candle autograd on
    /// `x W^T + b + s * ((x * mask / (1 - p)) A^T) B^T` with the same mask, forward and all three
    /// gradients (f64).
    #[test]
    fn lora_projection_with_dropout_matches_autograd() {
        let (n, inp, out, r, p, seed, scale) = (5, 7, 6, 3, 0.3, 99u64, 2.0);
        let w = rand((out, inp), 1);
        let bias = rand((1, out), 2).squeeze(0).unwrap();
        let base = BaseLinear::Dense(FrozenLinear::new(w.clone(), Some(bias.clone())));
        let op = LoraProjection {
            base,
            scale,
            dropout: p,
            seed,
            casts: None,
        };
        let x = Var::from_tensor(&rand((n, inp), 3)).unwrap();
        let a = Var::from_tensor(&rand((r, inp), 4)).unwrap();
        let b = Var::from_tensor(&rand((out, r), 5)).unwrap();
        let dy = rand((n, out), 6);
        let fused = x
            .as_tensor()
            .apply_op3(a.as_tensor(), b.as_tensor(), op)
            .unwrap();
        let mask: Vec<f64> = (0..(n * inp) as u64)
            .map(|i| {
                if dropout_keep(seed, i, p) {
                    1.0 / (1.0 - p)
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (n, inp), &Device::Cpu).unwrap();
        let xd = (x.as_tensor() * &mask).unwrap();
        let reference = (x
            .as_tensor()
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&bias)
            .unwrap()
            + xd.matmul(&a.as_tensor().t().unwrap())
                .unwrap()
                .matmul(&b.as_tensor().t().unwrap())
                .unwrap()
                .affine(scale, 0.0)
                .unwrap())
        .unwrap();
        assert!(max_abs(&fused, &reference) < 1e-12);
        let gf = (&fused * &dy)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gr = (&reference * &dy)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, v) in [("x", &x), ("A", &a), ("B", &b)] {
            let e = max_abs(
                gf.get(v.as_tensor()).unwrap(),
                gr.get(v.as_tensor()).unwrap(),
            );
            assert!(e < 1e-12, "d{name}: max abs error {e}");
        }
    }
}
