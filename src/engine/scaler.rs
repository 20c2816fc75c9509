//! Dynamic loss scaling for fp16 training, with the semantics of PyTorch's
//! `torch.amp.GradScaler` (defaults `init_scale=65536`, `growth_factor=2.0`,
//! `backoff_factor=0.5`, `growth_interval=2000`):
//!
//! - the loss is multiplied by the current scale before backward, and gradients are divided
//!   by it before clipping and the optimizer step;
//! - if any gradient is inf or NaN the step is skipped, the scale is multiplied by
//!   `backoff_factor` and the count of consecutive clean steps is reset to 0;
//! - otherwise the count goes up by one; when it reaches `growth_interval` the scale is
//!   multiplied by `growth_factor` (only if the result is finite) and the count restarts at 0.

/// GradScaler hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LossScalerConfig {
    /// Scale at the first step.
    pub init_scale: f64,
    /// Factor applied after `growth_interval` consecutive clean steps.
    pub growth_factor: f64,
    /// Factor applied on an overflow.
    pub backoff_factor: f64,
    /// Consecutive clean steps before growing.
    pub growth_interval: u64,
}

impl Default for LossScalerConfig {
    fn default() -> Self {
        Self {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

/// The loss-scale state machine. Pure: it is told whether the gradients were finite.
#[derive(Debug, Clone, PartialEq)]
pub struct LossScaler {
    cfg: LossScalerConfig,
    scale: f64,
    growth_tracker: u64,
}

impl LossScaler {
    /// A scaler at `cfg.init_scale` with no clean steps counted.
    pub fn new(cfg: LossScalerConfig) -> Self {
        Self {
            cfg,
            scale: cfg.init_scale,
            growth_tracker: 0,
        }
    }

    /// The scale to multiply this step's loss by.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Consecutive clean steps since the last growth or overflow.
    pub fn growth_tracker(&self) -> u64 {
        self.growth_tracker
    }

    /// Record one step whose (scaled) gradients were all finite (`finite = true`) or not.
    /// Returns true when the optimizer step must be skipped (an overflow).
    pub fn update(&mut self, finite: bool) -> bool {
        if !finite {
            self.scale *= self.cfg.backoff_factor;
            self.growth_tracker = 0;
            return true;
        }
        let successful = self.growth_tracker + 1;
        if successful >= self.cfg.growth_interval {
            let grown = self.scale * self.cfg.growth_factor;
            if grown.is_finite() {
                self.scale = grown;
            }
            self.growth_tracker = 0;
        } else {
            self.growth_tracker = successful;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_halves_and_skips() {
        let mut s = LossScaler::new(LossScalerConfig::default());
        assert_eq!(s.scale(), 65536.0);
        assert!(s.update(false));
        assert_eq!(s.scale(), 32768.0);
        assert!(s.update(false));
        assert_eq!(s.scale(), 16384.0);
        assert!(!s.update(true));
        assert_eq!(s.scale(), 16384.0);
        assert_eq!(s.growth_tracker(), 1);
    }

    #[test]
    fn grows_after_the_interval() {
        let mut s = LossScaler::new(LossScalerConfig::default());
        for i in 1..2000 {
            assert!(!s.update(true));
            assert_eq!(s.growth_tracker(), i);
            assert_eq!(s.scale(), 65536.0);
        }
        assert!(!s.update(true));
        assert_eq!(s.scale(), 131072.0);
        assert_eq!(s.growth_tracker(), 0);
        for _ in 0..2000 {
            s.update(true);
        }
        assert_eq!(s.scale(), 262144.0);
    }

    #[test]
    fn overflow_resets_the_interval() {
        let mut s = LossScaler::new(LossScalerConfig::default());
        for _ in 0..1999 {
            s.update(true);
        }
        assert!(s.update(false));
        assert_eq!(s.growth_tracker(), 0);
        assert_eq!(s.scale(), 32768.0);
        for _ in 0..1999 {
            s.update(true);
        }
        assert_eq!(s.scale(), 32768.0);
        s.update(true);
        assert_eq!(s.scale(), 65536.0);
    }

    #[test]
    fn growth_stops_at_infinity() {
        let mut s = LossScaler::new(LossScalerConfig {
            init_scale: f64::MAX,
            growth_interval: 1,
            ..LossScalerConfig::default()
        });
        s.update(true);
        assert_eq!(s.scale(), f64::MAX);
    }
}
