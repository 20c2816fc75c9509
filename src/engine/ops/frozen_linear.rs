//! A frozen dense projection, `torch.nn.Linear` with `requires_grad=False` parameters:
//! `y = x W^T + b`, backward `dx = dy W` and nothing for `W` or `b`.
//!
//! candle's own `matmul` backward would also form the (out x in) weight gradient every step;
//! this op's backward is the input gradient alone ([`super::InputGradOp`]). Both directions
//! are one candle matmul (cuBLAS on CUDA): there are no CPU loops, no generic fallback and no
//! kernel of its own.

use super::{InputGradOp, add_bias, apply_projection};
use candle_core::{Result, Tensor};

/// A frozen linear projection `y = x W^T + b` whose backward returns only `dx`.
///
/// `weight`: (out, in), `bias`: (out), both in the compute dtype, never trained. Input `x`:
/// (..., in) in the same dtype; output (..., out). Matches `torch.nn.Linear` with
/// `requires_grad=False` parameters.
#[derive(Debug, Clone)]
pub struct FrozenLinear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl FrozenLinear {
    /// Build from a weight (out, in) and an optional bias (out).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// The weight, (out, in).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, (out), if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `(out_features, in_features)`.
    pub fn shape(&self) -> (usize, usize) {
        let d = self.weight.dims();
        (d[0], d[1])
    }

    /// Apply to `x` (..., in) -> (..., out). Records a graph node only when `x` is tracked.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        apply_projection(self, x, self.shape())
    }
}

impl InputGradOp for FrozenLinear {
    const NAME: &'static str = "frozen-linear";
    fn plain(&self, x2: &Tensor) -> Result<Tensor> {
        add_bias(x2.matmul(&self.weight.t()?)?, self.bias.as_ref())
    }
    fn input_grad(&self, _x: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.weight)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testutil::{max_abs_diff, rand_uniform};
    use candle_core::Var;

    /// Forward and the input gradient equal candle autograd on `x W^T + b` (f64), and the
    /// weight gets no gradient.
    #[test]
    fn frozen_linear_matches_autograd_and_leaves_the_weight_alone() {
        let w = Var::from_tensor(&rand_uniform(&[5, 7], 1, -1.0, 1.0)).unwrap();
        let b = rand_uniform(&[5], 2, -1.0, 1.0);
        let x = Var::from_tensor(&rand_uniform(&[2, 3, 7], 3, -1.0, 1.0)).unwrap();
        let dy = rand_uniform(&[2, 3, 5], 4, -1.0, 1.0);
        let op = FrozenLinear::new(w.as_tensor().clone(), Some(b.clone()));
        let y = op.forward(x.as_tensor()).unwrap();
        let reference = x
            .as_tensor()
            .broadcast_matmul(&w.as_tensor().t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        assert!(max_abs_diff(&y, &reference) < 1e-12);
        let g = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (&reference * &dy)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (dx, dxr) = (
            g.get(x.as_tensor()).unwrap(),
            gr.get(x.as_tensor()).unwrap(),
        );
        assert!(max_abs_diff(dx, dxr) < 1e-12);
        assert!(
            g.get(w.as_tensor()).is_none(),
            "the frozen weight got a gradient"
        );
    }
}
