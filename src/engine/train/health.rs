//! Run health: the checks after each step that stop a run whose numbers would lie. A
//! non-finite loss (diverged), and a dead run: gradients exactly zero, or the output
//! distribution uniform (loss pinned at ln(vocab_size), the cross-entropy of a model that
//! predicts every token with probability 1/V), for [`DEAD_STEPS`] steps in a row. Such a run
//! still runs at full speed, so without the check it would be reported `ok`.

use super::super::EngineError;
use crate::spec::Precision;

/// Consecutive steps of zero gradients or uniform output after which a run is dead.
pub const DEAD_STEPS: usize = 3;

/// How close (absolute, in nats) the loss must be to ln(vocab_size) to count as uniform
/// output. A model that predicts with logits z of spread σ has an expected loss of about
/// ln V + σ²/2, so this tolerance is a spread of ~0.0045: far below what real or randomly
/// initialised weights give, far above the rounding of f32 (ln V ≈ 10, ulp ≈ 1e-6).
pub const UNIFORM_TOL: f64 = 1e-5;

/// Tracks the steps of one run; [`Health::check`] is called once per step.
#[derive(Debug, Clone)]
pub struct Health {
    ln_vocab: f64,
    precision: Precision,
    zero_grad_since: Option<usize>,
    uniform_since: Option<usize>,
}

impl Health {
    /// A tracker for a model with `vocab_size` output classes trained at `precision`.
    pub fn new(vocab_size: usize, precision: Precision) -> Self {
        Self {
            ln_vocab: (vocab_size.max(1) as f64).ln(),
            precision,
            zero_grad_since: None,
            uniform_since: None,
        }
    }

    /// The loss of step `step` (1-based, mean cross-entropy in nats) is not finite.
    ///
    /// Errors: always, as [`EngineError::Diverged`], with a hint that fits the run: the
    /// learning rate only once an update happened, fp32 only when the run is not fp32.
    pub fn non_finite_loss(&self, step: usize, loss: f64) -> EngineError {
        let precision_hint = match self.precision {
            Precision::Fp32 => "",
            Precision::Fp16 => ", or use --precision bf16 or fp32",
            Precision::Bf16 => ", or use --precision fp32",
        };
        EngineError::Diverged(if step == 1 {
            let hint = match self.precision {
                Precision::Fp32 => {
                    "the weights are finite, so the model's config or the data overflow the forward pass"
                }
                _ => "the forward pass overflows at this precision: use --precision fp32",
            };
            format!("loss became {loss} at step 1, before any update: {hint}")
        } else {
            format!(
                "loss became {loss} at step {step}: training diverged; lower --lr{precision_hint}"
            )
        })
    }

    /// Checks step `step` (1-based): its mean loss (nats), its global gradient norm (before
    /// clipping), its number of target tokens (a batch without any has zero gradients by
    /// construction) and whether the loss scaler skipped it (then the gradients overflowed
    /// and say nothing of a dead run).
    ///
    /// Errors: [`EngineError::Diverged`] once the gradients have been exactly zero, or the
    /// loss within [`UNIFORM_TOL`] of ln(vocab_size), for [`DEAD_STEPS`] steps in a row.
    pub fn check(
        &mut self,
        step: usize,
        loss: f64,
        grad_norm: f64,
        target_tokens: usize,
        skipped: bool,
    ) -> Result<(), EngineError> {
        let zero = !skipped && target_tokens > 0 && grad_norm == 0.0;
        let uniform = target_tokens > 0 && (loss - self.ln_vocab).abs() <= UNIFORM_TOL;
        let since = |s: &mut Option<usize>, now: bool| {
            *s = if now { Some(s.unwrap_or(step)) } else { None };
            s.filter(|first| step + 1 - first >= DEAD_STEPS)
        };
        let zero_from = since(&mut self.zero_grad_since, zero);
        let uniform_from = since(&mut self.uniform_since, uniform);
        if let Some(first) = zero_from {
            return Err(EngineError::Diverged(format!(
                "dead run: the gradient norm is exactly 0 at steps {first}-{step} (loss {loss:.4}), so the adapters no longer learn; lower --lr"
            )));
        }
        if let Some(first) = uniform_from {
            return Err(EngineError::Diverged(format!(
                "dead run: the loss is stuck at ln(vocab_size) = {:.4} at steps {first}-{step} (the model predicts the uniform distribution); lower --lr",
                self.ln_vocab
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_gradients_for_three_steps_are_a_dead_run() {
        let mut h = Health::new(1000, Precision::Fp32);
        assert!(h.check(1, 6.0, 1.0, 9, false).is_ok());
        assert!(h.check(2, 6.0, 0.0, 9, false).is_ok());
        assert!(h.check(3, 6.0, 0.0, 9, false).is_ok());
        let e = h.check(4, 6.0, 0.0, 9, false).unwrap_err().to_string();
        assert!(e.contains("exactly 0 at steps 2-4"), "{e}");
        // A break in the streak (or a skipped fp16 step) starts it again.
        let mut h = Health::new(1000, Precision::Fp16);
        for (s, g, skip) in [
            (1, 0.0, false),
            (2, 0.0, false),
            (3, 0.5, false),
            (4, 0.0, true),
        ] {
            assert!(h.check(s, 6.0, g, 9, skip).is_ok());
        }
        // Batches without a target token have zero gradients by construction.
        let mut h = Health::new(1000, Precision::Fp32);
        for s in 1..=5 {
            assert!(h.check(s, 0.0, 0.0, 0, false).is_ok());
        }
    }

    #[test]
    fn uniform_output_for_three_steps_is_a_dead_run() {
        let ln = (32000f64).ln();
        let mut h = Health::new(32000, Precision::Bf16);
        assert!(h.check(1, ln + 1e-3, 0.3, 9, false).is_ok());
        assert!(h.check(2, ln + 2e-6, 0.3, 9, false).is_ok());
        assert!(h.check(3, ln - 2e-6, 0.3, 9, false).is_ok());
        let e = h.check(4, ln, 0.3, 9, false).unwrap_err().to_string();
        assert!(
            e.contains("stuck at ln(vocab_size) = 10.3735 at steps 2-4"),
            "{e}"
        );
    }

    #[test]
    fn the_nan_hint_fits_the_run() {
        let fp32 = Health::new(10, Precision::Fp32);
        let e = fp32.non_finite_loss(5, f64::NAN).to_string();
        assert!(e.contains("lower --lr") && !e.contains("fp32"), "{e}");
        let e = fp32.non_finite_loss(1, f64::NAN).to_string();
        assert!(
            e.contains("before any update") && !e.contains("--lr"),
            "{e}"
        );
        let fp16 = Health::new(10, Precision::Fp16);
        let e = fp16.non_finite_loss(5, f64::INFINITY).to_string();
        assert!(e.contains("--precision bf16 or fp32"), "{e}");
    }
}
