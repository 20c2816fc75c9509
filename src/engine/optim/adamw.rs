//! AdamW with f32 moments, PyTorch's `torch.optim.AdamW` (decoupled weight decay, Loshchilov &
//! Hutter 2019), and its paged form (bitsandbytes `PagedAdamW`).

#[cfg(feature = "cuda")]
use super::cuda::{GpuStates, Hyper, Math};
use super::{AdamWConfig, StateBytes, ensure_f32_master, grad_norm_of, on_cuda};
use candle_core::{DType, Result, Tensor, Var, backprop::GradStore};

/// AdamW (PyTorch semantics: decoupled decay `p -= lr*wd*p`, bias-corrected moments,
/// `p -= lr * m_hat / (sqrt(v_hat) + eps)`), moments and master weights in f32.
///
/// On CUDA the update is one fused kernel per tensor ([`super::cuda`], bitsandbytes'
/// `kOptimizer32bit2State` in spirit) with the same f32 arithmetic as the CPU tensor ops.
pub struct AdamW {
    cfg: AdamWConfig,
    pub(super) vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    #[cfg(feature = "cuda")]
    gpu: Option<GpuStates>,
    t: u64,
}

impl AdamW {
    /// Optimizer over `vars` (must be f32), state unpaged.
    ///
    /// Errors: a variable is not f32; CUDA: the state cannot be allocated.
    pub fn new(vars: Vec<Var>, cfg: AdamWConfig) -> Result<Self> {
        Self::with_paging(vars, cfg, false)
    }

    /// Optimizer over `vars` (must be f32); `paged` puts the state of tensors of at least
    /// [`MIN_PAGED_SIZE`] elements in CUDA unified memory (bitsandbytes `PagedAdamW`). On CPU
    /// `paged` changes nothing.
    ///
    /// Errors: a variable is not f32; CUDA: the state cannot be allocated, or the paged state
    /// exceeds the GPU's free memory.
    pub fn with_paging(vars: Vec<Var>, cfg: AdamWConfig, paged: bool) -> Result<Self> {
        let mut m = Vec::with_capacity(vars.len());
        let mut v = Vec::with_capacity(vars.len());
        ensure_f32_master(&vars, "AdamW")?;
        #[cfg(feature = "cuda")]
        if on_cuda(&vars) {
            let gpu = GpuStates::new(&vars, false, paged)?;
            return Ok(Self {
                cfg,
                vars,
                m,
                v,
                gpu: Some(gpu),
                t: 0,
            });
        }
        let _ = paged;
        for var in &vars {
            m.push(var.as_tensor().zeros_like()?);
            v.push(var.as_tensor().zeros_like()?);
        }
        Ok(Self {
            cfg,
            vars,
            m,
            v,
            #[cfg(feature = "cuda")]
            gpu: None,
            t: 0,
        })
    }

    /// Bytes of optimizer state (two f32 moments per parameter).
    pub fn state_bytes(&self) -> usize {
        self.state_bytes_split().total()
    }

    /// Bytes of optimizer state by where they live.
    pub fn state_bytes_split(&self) -> StateBytes {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            return g.bytes();
        }
        let bytes = self
            .m
            .iter()
            .chain(&self.v)
            .map(|t| t.elem_count() * 4)
            .sum();
        if on_cuda(&self.vars) {
            StateBytes {
                device: bytes,
                ..StateBytes::default()
            }
        } else {
            StateBytes {
                host: bytes,
                ..StateBytes::default()
            }
        }
    }

    /// Whether variable `i`'s state is in CUDA unified memory (always false on CPU).
    pub fn is_paged(&self, i: usize) -> bool {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            return g.is_paged(i);
        }
        let _ = i;
        false
    }

    /// Global L2 norm of the gradients of the optimizer's variables (absent grads count 0).
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        self.grad_norm_scaled(grads, 1.0)
    }

    /// Global L2 norm of the gradients each multiplied by `factor` first (e.g. `1/loss_scale`,
    /// so large scaled gradients do not overflow the sum of squares). Inf or NaN in any
    /// gradient gives a non-finite result.
    pub fn grad_norm_scaled(&self, grads: &GradStore, factor: f64) -> Result<f64> {
        grad_norm_of(&self.vars, grads, factor)
    }

    /// One update with learning rate `lr`, gradients multiplied by `grad_scale` first (for
    /// clipping / unscaling). Variables without a gradient are left unchanged.
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.t += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.gpu {
            let h = Hyper::new(&c, lr, bc1, bc2, grad_scale);
            return gpu.step_all(&self.vars, grads, Math::F32, &h);
        }
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
