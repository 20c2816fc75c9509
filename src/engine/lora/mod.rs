//! LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), as
//! Hugging Face PEFT's `LoraLayer`: `y = W x + b + (alpha / r) * B A dropout(x)`, `A` (r, in)
//! Kaiming-uniform (`a = sqrt(5)`, i.e. U(-1/sqrt(in), 1/sqrt(in))), `B` (out, r) zeros.
//! Adapter weights are f32 master copies ([`candle_core::Var`]) cast to the compute dtype in
//! forward; the base projection is a [`BaseLinear`] (dense [`FrozenLinear`] or 4-bit
//! [`Nf4Linear`]) and gets no gradient.
//!
//! The adapted projection is one graph node ([`LoraProjection`], `projection.rs`) whose CUDA
//! path is direct cuBLAS calls and small kernels (`cuda.rs`); its dropout mask is a
//! regenerable hash ([`dropout_keep`], `dropout.rs`).

#[cfg(feature = "cuda")]
pub(crate) mod cuda;
mod dropout;
mod projection;

pub use dropout::{HashDropout, dropout_keep, splitmix64};
pub use projection::LoraProjection;

#[cfg(feature = "cuda")]
pub(crate) use cuda::AdapterCasts;
/// Without CUDA there are no layer casts (the type has no values).
#[cfg(not(feature = "cuda"))]
#[derive(Debug, Clone)]
pub(crate) enum AdapterCasts {}

use super::nf4::Nf4Linear;
use super::ops::FrozenLinear;
use crate::spec::{LoraModule, LoraTarget};
use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

/// LoRA hyper-parameters.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LoraConfig {
    /// Rank r (inner dimension of B A).
    pub rank: usize,
    /// Scaling numerator: the update is scaled by `alpha / rank`.
    pub alpha: f64,
    /// Dropout probability on the adapter's input (PEFT `lora_dropout`), in [0, 1).
    pub dropout: f64,
    /// Modules that carry an adapter, as PEFT names them (resolved per family by
    /// [`crate::engine::config::ModelConfig::lora_targets`]).
    pub targets: Vec<LoraModule>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 32.0,
            dropout: 0.0,
            targets: LoraTarget::ALL.map(LoraModule::One).to_vec(),
        }
    }
}

impl LoraConfig {
    /// `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// One adapter pair. `a`: (r, in) f32, `b`: (out, r) f32, both trainable.
pub struct LoraAdapter {
    /// PEFT key prefix, e.g. `base_model.model.model.layers.0.self_attn.q_proj`.
    pub name: String,
    /// A, (r, in), f32.
    pub a: Var,
    /// B, (out, r), f32.
    pub b: Var,
    /// alpha / r.
    pub scale: f64,
    /// Input dropout probability.
    pub dropout: f64,
    /// The current layer pass's compute-dtype casts of `a` and `s b`, while a [`CastScope`]
    /// is open (CUDA direct path only).
    pub(crate) casts: CastCell,
}

/// Where a [`CastScope`] leaves an adapter's casts for the projections built during it.
#[derive(Default)]
pub struct CastCell(Mutex<Option<Box<AdapterCasts>>>);

impl CastCell {
    fn get(&self) -> Option<AdapterCasts> {
        self.0.lock().ok().and_then(|c| c.as_deref().cloned())
    }

    fn set(&self, v: Option<AdapterCasts>) {
        if let Ok(mut c) = self.0.lock() {
            *c = v.map(Box::new);
        }
    }
}

/// One pass of a decoder layer with its adapters' masters cast to the compute dtype once, in
/// one launch ([`cast_scope`]), instead of twice per projection: projections built while the
/// scope lives ([`LoraLinear::fixed`]) use those casts, for their forward and, in a
/// checkpointed layer's recompute, their backward. Dropping the scope frees the casts; a
/// projection that runs later (the autograd backward of a recorded pass) casts for itself.
/// Nothing updates the masters while a scope lives (the optimizer runs after the backward).
pub struct CastScope<'a> {
    adapters: Vec<&'a LoraAdapter>,
    #[cfg(feature = "cuda")]
    _layer: Option<std::sync::Arc<cuda::LayerCasts>>,
}

impl Drop for CastScope<'_> {
    fn drop(&mut self) {
        for ad in &self.adapters {
            ad.casts.set(None);
        }
        OPEN_SCOPES.with(|n| n.set(n.get().saturating_sub(1)));
    }
}

thread_local! {
    /// [`CastScope`]s open on this thread (a layer pass runs on the thread that steps).
    static OPEN_SCOPES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many [`CastScope`]s are open on this thread: the optimizer refuses to step while any
/// is ([`crate::engine::optim::AnyOptimizer::step`]), since a pass's casts would then go stale.
pub fn open_cast_scopes() -> usize {
    OPEN_SCOPES.with(|n| n.get())
}

/// Open a [`CastScope`] over `adapters` for input `x`: on the direct CUDA path (fused kernels
/// on, `LORASCOPE_LAYER_CASTS` not `0`, f32 masters) the casts are made now; elsewhere the
/// scope is empty.
///
/// Errors: device errors while casting.
pub fn cast_scope<'a>(adapters: Vec<&'a LoraAdapter>, x: &Tensor) -> Result<CastScope<'a>> {
    OPEN_SCOPES.with(|n| n.set(n.get() + 1));
    // From here the scope is counted: every return below hands out a `CastScope`, whose drop
    // uncounts it; on an error, uncount here.
    let uncount = || OPEN_SCOPES.with(|n| n.set(n.get().saturating_sub(1)));
    #[cfg(feature = "cuda")]
    {
        let on = crate::engine::cuda::layer_casts_on();
        // f32 masters only: the direct projection path takes no other (it falls back).
        let f32_masters = adapters
            .iter()
            .all(|ad| ad.a.dtype() == DType::F32 && ad.b.dtype() == DType::F32);
        if on
            && f32_masters
            && !adapters.is_empty()
            && crate::engine::cuda::fused_path(x.dtype(), x.device())
        {
            let made = x
                .device()
                .as_cuda_device()
                .and_then(|dev| cuda::cast_layer(dev, x.dtype(), &adapters));
            let (layer, casts) = made.inspect_err(|_| uncount())?;
            for (ad, c) in adapters.iter().zip(casts) {
                ad.casts.set(Some(c));
            }
            return Ok(CastScope {
                adapters,
                _layer: Some(layer),
            });
        }
    }
    let _ = (x, adapters, uncount);
    Ok(CastScope {
        adapters: Vec::new(),
        #[cfg(feature = "cuda")]
        _layer: None,
    })
}

/// The frozen base of a projection: dense in the compute dtype, or NF4 (QLoRA).
#[derive(Debug, Clone)]
pub enum BaseLinear {
    /// Weight (out, in) and bias in the compute dtype.
    Dense(FrozenLinear),
    /// NF4 weight with double-quantised statistics; bias in the compute dtype.
    Nf4(Nf4Linear),
}

impl BaseLinear {
    /// Apply to `x` (..., in) -> (..., out); backward returns only `dx`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(l) => l.forward(x),
            Self::Nf4(l) => l.forward(x),
        }
    }

    /// `(out_features, in_features)`.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            Self::Dense(l) => l.shape(),
            Self::Nf4(l) => l.shape(),
        }
    }

    /// Untracked `x W^T + b` for `x` (tokens, in) in the compute dtype: (tokens, out), same
    /// dtype (NF4: dequantised into a transient buffer).
    ///
    /// Errors: shape, dtype or device errors.
    pub(crate) fn plain(&self, x: &Tensor) -> Result<Tensor> {
        use crate::engine::ops::InputGradOp;
        match self {
            Self::Dense(l) => l.plain(x),
            Self::Nf4(l) => l.plain(x),
        }
    }

    /// `dy W` for `dy` (tokens, out): the input gradient (tokens, in) in `dy`'s dtype, always
    /// `Some` (the frozen weight gets none); `x` is unused.
    ///
    /// Errors: shape, dtype or device errors.
    pub(crate) fn input_grad(&self, x: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        use crate::engine::ops::InputGradOp;
        match self {
            Self::Dense(l) => l.input_grad(x, dy),
            Self::Nf4(l) => l.input_grad(x, dy),
        }
    }

    /// The bias, (out), if any.
    pub fn bias(&self) -> Option<&Tensor> {
        match self {
            Self::Dense(l) => l.bias(),
            Self::Nf4(l) => l.bias(),
        }
    }

    /// The weight (out, in) in `dtype`: the stored tensor when dense (cast if needed), a fresh
    /// dequantised copy when NF4.
    ///
    /// Errors: a device error while dequantising or casting.
    pub fn weight(&self, dtype: DType) -> Result<Tensor> {
        match self {
            Self::Dense(l) => l.weight().to_dtype(dtype),
            Self::Nf4(l) => l.weight().dequantize(dtype),
        }
    }

    /// Bytes held by the weight and bias (NF4: packed codes and statistics).
    pub fn bytes(&self) -> usize {
        let bias = self
            .bias()
            .map(|b| b.elem_count() * b.dtype().size_in_bytes())
            .unwrap_or(0);
        bias + match self {
            Self::Dense(l) => l.weight().elem_count() * l.weight().dtype().size_in_bytes(),
            Self::Nf4(l) => l.weight().bytes(),
        }
    }
}

/// A frozen projection with an optional adapter.
pub struct LoraLinear {
    /// The frozen base projection.
    pub base: BaseLinear,
    /// The adapter, when this projection is a target.
    pub adapter: Option<LoraAdapter>,
}

/// Source of dropout masks (deterministic given the run seed).
pub struct DropoutRng(pub Mutex<ChaCha8Rng>);

impl DropoutRng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Self(Mutex::new(ChaCha8Rng::seed_from_u64(seed ^ 0xD50F_0D0A)))
    }

    /// The generator's state now (None: poisoned), to replay the same masks with
    /// [`DropoutRng::restore`].
    pub fn snapshot(&self) -> Option<ChaCha8Rng> {
        self.0.lock().ok().map(|g| g.clone())
    }

    /// Put back a state taken by [`DropoutRng::snapshot`].
    pub fn restore(&self, state: ChaCha8Rng) {
        if let Ok(mut g) = self.0.lock() {
            *g = state;
        }
    }
}

impl LoraLinear {
    /// Apply to `x` (..., in) -> (..., out); `train` enables LoRA dropout.
    ///
    /// Errors: shape or device errors.
    pub fn forward(&self, x: &Tensor, train: Option<&DropoutRng>) -> Result<Tensor> {
        self.forward_with(x, train, false)
    }

    /// The adapted projection as one op with its dropout seed drawn now (one `u64` from `train`
    /// when dropout applies, as [`LoraLinear::forward_with`] draws it); None without adapter.
    ///
    /// Errors: a poisoned generator.
    pub(crate) fn fixed(&self, train: Option<&DropoutRng>) -> Result<Option<LoraProjection>> {
        let Some(ad) = &self.adapter else {
            return Ok(None);
        };
        let p = match train {
            Some(_) if ad.dropout > 0.0 => ad.dropout,
            _ => 0.0,
        };
        let seed = match (train, p > 0.0) {
            (Some(rng), true) => rng
                .0
                .lock()
                .map_err(|_| candle_core::Error::Msg("rng poisoned".into()))?
                .random::<u64>(),
            _ => 0,
        };
        Ok(Some(LoraProjection {
            base: self.base.clone(),
            scale: ad.scale,
            dropout: p,
            seed,
            casts: ad.casts.get(),
        }))
    }

    /// As [`LoraLinear::forward`]; `detach` treats the adapter weights as constants (the
    /// untracked first pass of gradient checkpointing). With an adapter this is one
    /// [`LoraProjection`] graph node; dropout draws one seed per call from `train`.
    ///
    /// Errors: shape or device errors.
    pub fn forward_with(
        &self,
        x: &Tensor,
        train: Option<&DropoutRng>,
        detach: bool,
    ) -> Result<Tensor> {
        let (Some(ad), Some(op)) = (&self.adapter, self.fixed(train)?) else {
            return self.base.forward(x);
        };
        let (out, inp) = self.base.shape();
        let dims = x.dims().to_vec();
        let Some((_, lead_dims)) = dims.split_last() else {
            candle_core::bail!("LoRA projection: input must have a feature dimension");
        };
        let lead: usize = lead_dims.iter().product();
        let x2 = x.reshape((lead, inp))?;
        let (a, b) = (ad.a.as_tensor(), ad.b.as_tensor());
        let y = if !detach && (x2.track_op() || a.track_op() || b.track_op()) {
            x2.contiguous()?.apply_op3(a, b, op)?
        } else {
            // Constants: no graph may hang off the adapters here.
            op.forward_untracked(&x2, a, b)?
        };
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = out;
        }
        y.reshape(out_dims)
    }
}

/// Create an adapter for a projection of shape (out, in): A ~ U(-1/sqrt(in), 1/sqrt(in))
/// (PEFT's `kaiming_uniform_(a=sqrt(5))`), B = 0. Deterministic given `rng`.
pub fn new_adapter(
    name: String,
    out: usize,
    inp: usize,
    cfg: &LoraConfig,
    rng: &mut ChaCha8Rng,
    device: &Device,
) -> Result<LoraAdapter> {
    let bound = 1.0 / (inp as f64).sqrt();
    let a: Vec<f32> = (0..cfg.rank * inp)
        .map(|_| rng.random_range(-bound..bound) as f32)
        .collect();
    let a = Var::from_vec(a, (cfg.rank, inp), device)?;
    let b = Var::zeros((out, cfg.rank), DType::F32, device)?;
    Ok(LoraAdapter {
        name,
        a,
        b,
        scale: cfg.scale(),
        dropout: cfg.dropout,
        casts: CastCell::default(),
    })
}

/// PEFT `target_modules` of `adapters`: the last component of each adapter's module path
/// (`q_proj`, Phi-3's `qkv_proj`, ...), sorted, once each.
pub fn target_modules(adapters: &[&LoraAdapter]) -> Vec<String> {
    let set: std::collections::BTreeSet<String> = adapters
        .iter()
        .filter_map(|a| a.name.rsplit('.').next().map(str::to_string))
        .collect();
    set.into_iter().collect()
}

/// Save adapters in PEFT's format: `dir/adapter_model.safetensors` (keys
/// `<prefix>.lora_A.weight` (r, in) and `<prefix>.lora_B.weight` (out, r), f32) and
/// `dir/adapter_config.json`, loadable with `peft.PeftModel.from_pretrained`.
///
/// Errors: the directory cannot be created or written.
pub fn save_peft(
    dir: &Path,
    adapters: &[&LoraAdapter],
    cfg: &LoraConfig,
    base_model: &str,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    for ad in adapters {
        tensors.insert(
            format!("{}.lora_A.weight", ad.name),
            ad.a.as_tensor().clone(),
        );
        tensors.insert(
            format!("{}.lora_B.weight", ad.name),
            ad.b.as_tensor().clone(),
        );
    }
    // Serialised in memory and written with std::fs::write, so the file gets the usual
    // permissions (0666 less the umask) like adapter_config.json; safetensors' own file writer
    // leaves it owner-only (0600).
    let bytes = safetensors::serialize(tensors.iter(), None)?;
    std::fs::write(dir.join("adapter_model.safetensors"), bytes)?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.rank,
        // PEFT writes an integral alpha as an integer (`"lora_alpha": 32`); so does this.
        "lora_alpha": if cfg.alpha.fract() == 0.0 && cfg.alpha.abs() < 1e15 {
            serde_json::json!(cfg.alpha as i64)
        } else {
            serde_json::json!(cfg.alpha)
        },
        "lora_dropout": cfg.dropout,
        "target_modules": target_modules(adapters),
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
    });
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testutil::rand_uniform;

    /// The optimizer refuses to step while a layer pass's cast scope is open on this thread
    /// (its casts would go stale), and steps once it is closed.
    #[test]
    fn no_optimizer_step_inside_a_cast_scope() {
        use crate::engine::optim::{AdamWConfig, AnyOptimizer};
        let cfg = LoraConfig::default();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let ad = new_adapter("p".into(), 4, 8, &cfg, &mut rng, &Device::Cpu).unwrap();
        let mut opt = AnyOptimizer::new(
            crate::spec::Optimizer::AdamW,
            vec![ad.a.clone(), ad.b.clone()],
            AdamWConfig::default(),
        )
        .unwrap();
        let x = Tensor::ones((2, 8), DType::F32, &Device::Cpu).unwrap();
        let loss = |ad: &LoraAdapter| {
            (ad.a.as_tensor().sum_all().unwrap() + ad.b.as_tensor().sum_all().unwrap())
                .unwrap()
                .backward()
                .unwrap()
        };
        let before = open_cast_scopes();
        let scope = cast_scope(vec![&ad], &x).unwrap();
        assert_eq!(open_cast_scopes(), before + 1);
        let err = opt.step(&loss(&ad), 1e-3, 1.0).unwrap_err().to_string();
        assert!(err.contains("inside a decoder-layer pass"), "{err}");
        drop(scope);
        assert_eq!(open_cast_scopes(), before);
        opt.step(&loss(&ad), 1e-3, 1.0).unwrap();
    }

    /// PEFT's initialisation: A uniform in +-1/sqrt(in), B zero, both f32 of the right shapes.
    #[test]
    fn new_adapters_are_initialised_as_peft() {
        let cfg = LoraConfig::default();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let ad = new_adapter("p".into(), 6, 25, &cfg, &mut rng, &Device::Cpu).unwrap();
        assert_eq!(ad.a.dims(), [cfg.rank, 25]);
        assert_eq!(ad.b.dims(), [6, cfg.rank]);
        assert_eq!((ad.a.dtype(), ad.b.dtype()), (DType::F32, DType::F32));
        let a: Vec<f32> = ad.a.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        assert!(a.iter().all(|v| v.abs() < 0.2) && a.iter().any(|v| *v != 0.0));
        let b = ad.b.as_tensor().abs().unwrap().sum_all().unwrap();
        assert_eq!(b.to_scalar::<f32>().unwrap(), 0.0);
        // An adapted projection with B = 0 is its base projection.
        let w = rand_uniform(&[6, 25], 2, -1.0, 1.0)
            .to_dtype(DType::F32)
            .unwrap();
        let layer = LoraLinear {
            base: BaseLinear::Dense(FrozenLinear::new(w, None)),
            adapter: Some(ad),
        };
        let x = rand_uniform(&[3, 25], 3, -1.0, 1.0)
            .to_dtype(DType::F32)
            .unwrap();
        let y = layer.forward(&x, None).unwrap();
        let y0 = layer.base.forward(&x).unwrap();
        let d = (y - y0).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-6);
    }
}
