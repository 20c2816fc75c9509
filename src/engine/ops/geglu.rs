//! The gated MLP activation of Gemma (and of any config with `hidden_act: gelu_pytorch_tanh`):
//! `geglu(gate, up) = gelu_tanh(gate) * up` with PyTorch's `gelu(approximate="tanh")`,
//! `gelu_tanh(x) = 0.5 x (1 + tanh(c (x + 0.044715 x^3)))`, `c = sqrt(2 / pi)`.
//!
//! - forward: `gelu_tanh` in f32 (PyTorch's opmath for f16/bf16), rounded once to the compute
//!   dtype, then the product with `up` in the compute dtype (as transformers'
//!   `act_fn(gate_proj(x)) * up_proj(x)`);
//! - backward: `du = dy * gelu_tanh(g)`, `dg = dy * up * gelu_tanh'(g)` with
//!   `gelu_tanh'(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 * 0.044715 x^2)`, `t = tanh(c (x +
//!   0.044715 x^3))`.
//!
//! No fused kernel: both devices run the generic candle composition below (differentiable
//! primitives, so autograd reaches the adapters), and the run header says so.

use candle_core::{DType, Result, Tensor};

/// `sqrt(2 / pi)`.
const C: f64 = 0.797_884_560_802_865_4;
/// The cubic coefficient of the tanh approximation.
const A: f64 = 0.044_715;

/// `gelu_tanh(gate) * up` for `gate`, `up` of one shape and dtype; output like them.
/// Differentiable in both inputs.
///
/// Errors: mismatched shapes or dtypes, device errors.
pub fn geglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    generic::gelu_tanh(gate)? * up
}

/// Gradients `(dgate, dup)` of [`geglu`] for the output gradient `dy`, on untracked tensors of
/// one shape and dtype (the hand-written backward of a checkpointed layer).
///
/// Errors: as [`geglu`].
pub(crate) fn geglu_backward(g: &Tensor, u: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    generic::backward(g, u, dy)
}

mod generic {
    //! The candle composition (f32 inside the activation).
    use super::*;

    fn upcast(x: &Tensor) -> Result<Tensor> {
        match x.dtype() {
            DType::F64 | DType::F32 => Ok(x.clone()),
            _ => x.to_dtype(DType::F32),
        }
    }

    /// `(x, t)` in f32 (f64 for f64) with `t = tanh(c (x + a x^3))`.
    fn inner(x: &Tensor) -> Result<(Tensor, Tensor)> {
        let x = upcast(x)?;
        let cube = (&x * &x)?.mul(&x)?;
        let t = (&x + cube.affine(A, 0.0)?)?.affine(C, 0.0)?.tanh()?;
        Ok((x, t))
    }

    /// `gelu_tanh(x)`, differentiable, in `x`'s dtype.
    pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
        let (xf, t) = inner(x)?;
        (xf.affine(0.5, 0.0)? * (t + 1.0)?)?.to_dtype(x.dtype())
    }

    pub fn backward(g: &Tensor, u: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        let dt = g.dtype();
        let du = (dy * gelu_tanh(g)?)?;
        let (x, t) = inner(g)?;
        let x2 = x.sqr()?;
        let dgelu = ((t.affine(0.5, 0.5))?
            + ((&x * (1.0 - t.sqr()?)?)?.affine(0.5 * C, 0.0)? * x2.affine(3.0 * A, 1.0)?)?)?;
        let dg = (upcast(&(dy * u)?)? * dgelu)?.to_dtype(dt)?;
        Ok((dg, du))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testutil::{max_abs_diff, rand_uniform};
    use candle_core::Var;

    #[test]
    fn geglu_backward_matches_autograd_and_finite_differences() {
        let g = Var::from_tensor(&rand_uniform(&[4, 7], 1, -3.0, 3.0)).unwrap();
        let u = Var::from_tensor(&rand_uniform(&[4, 7], 2, -1.0, 1.0)).unwrap();
        let w = rand_uniform(&[4, 7], 3, -1.0, 1.0);
        let y = geglu(g.as_tensor(), u.as_tensor()).unwrap();
        let grads = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let (dg, du) = geglu_backward(g.as_tensor(), u.as_tensor(), &w).unwrap();
        assert!(max_abs_diff(grads.get(g.as_tensor()).unwrap(), &dg) < 1e-12);
        assert!(max_abs_diff(grads.get(u.as_tensor()).unwrap(), &du) < 1e-12);
        // Central differences of the scalar sum(w * geglu) in f64.
        let eps = 1e-6;
        let f = |gt: &Tensor| -> f64 {
            (geglu(gt, u.as_tensor()).unwrap() * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let gv: Vec<f64> = g.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let dgv: Vec<f64> = dg.flatten_all().unwrap().to_vec1().unwrap();
        for i in [0, 5, 13, 27] {
            let mut p = gv.clone();
            p[i] += eps;
            let mut m = gv.clone();
            m[i] -= eps;
            let t = |v: Vec<f64>| Tensor::from_vec(v, (4, 7), g.device()).unwrap();
            let fd = (f(&t(p)) - f(&t(m))) / (2.0 * eps);
            assert!((fd - dgv[i]).abs() < 1e-6, "{i}: fd {fd} vs {}", dgv[i]);
        }
    }

    #[test]
    fn gelu_tanh_matches_pytorch_values() {
        // torch.nn.functional.gelu(torch.tensor([-3., -1., 0., 0.5, 2.], dtype=torch.float64),
        // approximate="tanh")
        let x = Tensor::new(&[-3.0f64, -1.0, 0.0, 0.5, 2.0], &candle_core::Device::Cpu).unwrap();
        let one = Tensor::ones(5, DType::F64, &candle_core::Device::Cpu).unwrap();
        let y: Vec<f64> = geglu(&x, &one).unwrap().to_vec1().unwrap();
        let want = [
            -0.003_637_392_081_772_994_3,
            -0.158_808_009_391_723_24,
            0.0,
            0.345_714_009_825_143_94,
            1.954_597_694_087_775,
        ];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
    }
}
