//! AdamW with f32 state on the adapter weights, and the learning-rate schedule.

use candle_core::{DType, Result, Tensor, Var, backprop::GradStore};

/// AdamW hyper-parameters. Defaults are PyTorch's `torch.optim.AdamW` (betas (0.9, 0.999),
/// eps 1e-8, weight_decay 0.01) except `lr`, which defaults to 2e-4 (a common LoRA choice).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct AdamWConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay (Loshchilov & Hutter 2019).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 2e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Learning-rate schedule after linear warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Constant at the peak.
    Constant,
    /// Cosine decay from the peak to 0 at the last step (HF `get_cosine_schedule_with_warmup`).
    Cosine,
}

/// Learning rate for 1-based `step` of `total`: linear warm-up from `peak/warmup` to `peak`
/// over `warmup` steps (HF's `lr * step / warmup`), then the schedule.
pub fn lr_at(peak: f64, step: usize, warmup: usize, total: usize, schedule: Schedule) -> f64 {
    if warmup > 0 && step <= warmup {
        return peak * step as f64 / warmup as f64;
    }
    match schedule {
        Schedule::Constant => peak,
        Schedule::Cosine => {
            let span = total.saturating_sub(warmup).max(1) as f64;
            let progress = ((step - warmup) as f64 / span).min(1.0);
            peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

/// AdamW (PyTorch semantics: decoupled decay `p -= lr*wd*p`, bias-corrected moments,
/// `p -= lr * m_hat / (sqrt(v_hat) + eps)`), moments and master weights in f32.
pub struct AdamW {
    cfg: AdamWConfig,
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: u64,
}

impl AdamW {
    /// Optimizer over `vars` (must be f32).
    ///
    /// Errors: a variable is not f32.
    pub fn new(vars: Vec<Var>, cfg: AdamWConfig) -> Result<Self> {
        let mut m = Vec::with_capacity(vars.len());
        let mut v = Vec::with_capacity(vars.len());
        for var in &vars {
            if var.dtype() != DType::F32 {
                candle_core::bail!("AdamW master weights must be f32, got {:?}", var.dtype());
            }
            m.push(var.as_tensor().zeros_like()?);
            v.push(var.as_tensor().zeros_like()?);
        }
        Ok(Self {
            cfg,
            vars,
            m,
            v,
            t: 0,
        })
    }

    /// Bytes of optimizer state (two f32 moments per parameter).
    pub fn state_bytes(&self) -> usize {
        self.m
            .iter()
            .chain(&self.v)
            .map(|t| t.elem_count() * 4)
            .sum()
    }

    /// Global L2 norm of the gradients of the optimizer's variables (absent grads count 0).
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        self.grad_norm_scaled(grads, 1.0)
    }

    /// Global L2 norm of the gradients each multiplied by `factor` first (e.g. `1/loss_scale`,
    /// so large scaled gradients do not overflow the sum of squares). Inf or NaN in any
    /// gradient gives a non-finite result.
    pub fn grad_norm_scaled(&self, grads: &GradStore, factor: f64) -> Result<f64> {
        let mut sq = 0f64;
        for var in &self.vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                sq += g
                    .to_dtype(DType::F32)?
                    .affine(factor, 0.0)?
                    .sqr()?
                    .sum_all()?
                    .to_scalar::<f32>()? as f64;
            }
        }
        Ok(sq.sqrt())
    }

    /// One update with learning rate `lr`, gradients multiplied by `grad_scale` first (for
    /// clipping / unscaling). Variables without a gradient are left unchanged.
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.t += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (i, var) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = g.to_dtype(DType::F32)?.affine(grad_scale, 0.0)?;
            let m = ((&self.m[i] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((&v / bc2)?.sqrt()? + c.eps)?;
            let upd = ((&m / bc1)? / denom)?;
            let p = var.as_tensor();
            let p_new = ((p * (1.0 - lr * c.weight_decay))? - (upd * lr)?)?;
            var.set(&p_new)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}
