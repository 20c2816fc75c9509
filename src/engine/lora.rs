//! LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), as
//! Hugging Face PEFT's `LoraLayer`: `y = W x + b + (alpha / r) * B A dropout(x)`, `A` (r, in)
//! Kaiming-uniform (`a = sqrt(5)`, i.e. U(-1/sqrt(in), 1/sqrt(in))), `B` (out, r) zeros.
//! Adapter weights are f32 master copies ([`candle_core::Var`]) cast to the compute dtype in
//! forward; the base projection is a [`BaseLinear`] (dense [`FrozenLinear`] or 4-bit
//! [`Nf4Linear`]) and gets no gradient.

use super::kernels::map_cpu_float;
use super::nf4::Nf4Linear;
use super::ops::FrozenLinear;
use crate::spec::LoraTarget;
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
    /// Projections that carry an adapter.
    pub targets: Vec<LoraTarget>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 32.0,
            dropout: 0.0,
            targets: LoraTarget::ALL.to_vec(),
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
        use super::ops::InputGradOp;
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
        use super::ops::InputGradOp;
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

/// One LoRA-adapted projection as a single graph node (PEFT `lora.Linear` forward):
/// `y = base(x) + scale * dropout(x) A^T B^T`.
///
/// Inputs: `x` (tokens, in) in the compute dtype, `A` (r, in) and `B` (out, r) f32 master
/// weights (cast to the compute dtype inside). Output (tokens, out) in the compute dtype.
/// Nothing but the inputs is kept for backward: the dropout mask is a counter-based hash of
/// (`seed`, element index) ([`dropout_keep`]) and `dropout(x) A^T` (tokens x r) is recomputed.
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
    /// Seed of the regenerable dropout mask ([`dropout_keep`]); 0 without dropout.
    pub(crate) seed: u64,
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

    fn dropped(&self, x: &Tensor) -> Result<Tensor> {
        if self.dropout > 0.0 {
            x.apply_op1_no_bwd(&HashDropout {
                p: self.dropout,
                seed: self.seed,
            })
        } else {
            Ok(x.clone())
        }
    }

    fn forward(&self, x: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        let y = self.base.plain(x)?;
        let u = self.dropped(x)?.matmul(&a.to_dtype(dt)?.t()?)?;
        let bs = b.affine(self.scale, 0.0)?.to_dtype(dt)?;
        y + u.matmul(&bs.t()?)?
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
        #[cfg(feature = "cuda")]
        if x.device().is_cuda()
            && super::lora_cuda::supported(x.dtype())
            && a.dtype() == DType::F32
            && b.dtype() == DType::F32
        {
            let (dx, da, db) = super::lora_cuda::backward(self, x, a, b, dy)?;
            return Ok((Some(dx), Some(da), Some(db)));
        }
        let dt = x.dtype();
        let dy = dy.to_dtype(dt)?.contiguous()?;
        let ac = a.to_dtype(dt)?;
        let xd = self.dropped(x)?;
        let u = xd.matmul(&ac.t()?)?;
        let bs = b.affine(self.scale, 0.0)?.to_dtype(dt)?;
        let du = dy.matmul(&bs)?;
        let db = dy.t()?.matmul(&u)?.affine(self.scale, 0.0)?;
        let da = du.t()?.matmul(&xd)?;
        drop(xd);
        let dxl = self.dropped(&du.matmul(&ac)?)?;
        let dx = match self.base.input_grad(x, &dy)? {
            Some(g) => (g + dxl)?,
            None => dxl,
        };
        Ok((
            Some(dx),
            Some(da.to_dtype(a.dtype())?),
            Some(db.to_dtype(b.dtype())?),
        ))
    }
}

impl candle_core::CustomOp3 for LoraProjection {
    fn name(&self) -> &'static str {
        "lora-projection"
    }
    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use super::ops::{cpu_in, cpu_out};
        cpu_out(self.forward(&cpu_in(s1, l1)?, &cpu_in(s2, l2)?, &cpu_in(s3, l3)?)?)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CudaStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CudaStorage,
        l3: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        use super::ops::{cuda_in, cuda_out};
        use candle_core::backend::BackendStorage;
        let dev = candle_core::Device::Cuda(s1.device().clone());
        if super::lora_cuda::supported(s1.dtype())
            && s2.dtype() == DType::F32
            && s3.dtype() == DType::F32
        {
            let y = super::prof::section("lora-projection", "fwd", &dev, || {
                super::lora_cuda::forward(self, (s1, l1), (s2, l2), (s3, l3))
            })?;
            let shape = candle_core::Shape::from((l1.dims()[0], self.base.shape().0));
            return Ok((y, shape));
        }
        let x = cuda_in(s1, l1)?;
        cuda_out(super::prof::section(
            "lora-projection",
            "fwd",
            &dev,
            || self.forward(&x, &cuda_in(s2, l2)?, &cuda_in(s3, l3)?),
        )?)
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
        super::prof::section("lora-projection", "bwd", x.device(), || {
            self.backward(&x, &a, &b, &grad)
        })
    }
}

/// Whether element `index` of a dropout mask seeded with `seed` is kept at drop probability
/// `p`: a SplitMix64 hash of (seed, index) whose top 24 bits are compared with
/// `round(p * 2^24)`. The same integer arithmetic runs in the CUDA kernel, so CPU and GPU
/// masks are identical and backward regenerates the mask instead of storing it.
pub fn dropout_keep(seed: u64, index: u64, p: f64) -> bool {
    let thr = (p * 16_777_216.0).round() as u64;
    let mut z = seed.wrapping_add(index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) >= thr
}

/// Inverted dropout with a regenerable mask: `x * keep(seed, i) / (1 - p)` elementwise over the
/// contiguous input (any float dtype; same shape out). See [`dropout_keep`].
#[derive(Debug, Clone, Copy)]
pub struct HashDropout {
    /// Drop probability in [0, 1).
    pub p: f64,
    /// Mask seed.
    pub seed: u64,
}

impl candle_core::CustomOp1 for HashDropout {
    fn name(&self) -> &'static str {
        "hash-dropout"
    }
    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("dropout input must be contiguous".into()))?;
        let inv = 1.0 / (1.0 - self.p);
        fn go<T: candle_core::WithDType>(v: &[T], d: &HashDropout, inv: f64) -> Vec<T> {
            v.iter()
                .enumerate()
                .map(|(i, x)| {
                    if dropout_keep(d.seed, i as u64, d.p) {
                        T::from_f64(x.to_f64() * inv)
                    } else {
                        T::from_f64(0.0)
                    }
                })
                .collect()
        }
        let out = map_cpu_float!("dropout: unsupported dtype", (s => v), T => {
            go(&v[a..b], self, inv)
        });
        Ok((out, l.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let range = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("dropout input must be contiguous".into()))?;
        Ok((cuda::dropout(s, range, self)?, l.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    //! The dropout kernel: one thread per element, the SplitMix64 hash of [`super::dropout_keep`].
    use super::super::kernels::{self, PRELUDE};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::{CudaStorage, DType, Result};

    const MODULE: &str = "lorascope_dropout";
    const SRC: &str = r#"
#define DROPOUT_KERNEL(SUF, T)                                                                 \
extern "C" __global__ void hash_dropout_##SUF(const T* x, T* y, unsigned long long n,        \
        unsigned long long seed, unsigned long long thr, float inv) {                         \
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;                   \
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;   \
         i < n; i += stride) {                                                                 \
        unsigned long long z = seed + (i + 1ull) * 0x9E3779B97F4A7C15ull;                      \
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;                                           \
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;                                           \
        z ^= z >> 31;                                                                          \
        st(y + i, (z >> 40) >= thr ? ld(x[i]) * inv : 0.f);                                   \
    }                                                                                          \
}
DROPOUT_KERNEL(f32, float)
DROPOUT_KERNEL(f16, f16_t)
DROPOUT_KERNEL(bf16, bf16_t)
"#;

    pub fn dropout(
        s: &CudaStorage,
        (a, b): (usize, usize),
        d: &super::HashDropout,
    ) -> Result<CudaStorage> {
        let dev = s.device().clone();
        let name = match s.dtype() {
            DType::F32 => "hash_dropout_f32",
            DType::F16 => "hash_dropout_f16",
            DType::BF16 => "hash_dropout_bf16",
            other => candle_core::bail!("dropout: no CUDA kernel for {other:?}"),
        };
        let func =
            dev.get_or_load_custom_func(name, MODULE, kernels::ptx(MODULE, PRELUDE, SRC)?)?;
        let n = (b - a) as u64;
        let thr = (d.p * 16_777_216.0).round() as u64;
        let inv = (1.0 / (1.0 - d.p)) as f32;
        let seed = d.seed;
        // Grid-stride loop: a capped grid covers any length.
        let blocks = (b - a).div_ceil(256).clamp(1, 65_535 * 16) as u32;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        macro_rules! go {
            ($ty:ty) => {{
                let x = s.as_cuda_slice::<$ty>()?.slice(a..b);
                // SAFETY: the kernel writes every element.
                let mut out = unsafe { dev.alloc::<$ty>(b - a) }?;
                let mut lb = func.builder();
                lb.arg(&x);
                lb.arg(&mut out);
                lb.arg(&n);
                lb.arg(&seed);
                lb.arg(&thr);
                lb.arg(&inv);
                // SAFETY: argument types match the kernel signature.
                unsafe { lb.launch(cfg) }.map_err(kernels::err)?;
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        Ok(match s.dtype() {
            DType::F32 => go!(f32),
            DType::F16 => go!(half::f16),
            _ => go!(half::bf16),
        })
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
    })
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
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": cfg.targets.iter().map(|t| t.peft_name()).collect::<Vec<_>>(),
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
    use super::super::testutil::{max_abs_diff as max_abs, rand_uniform};
    use super::*;
    use candle_core::Var;

    fn rand(shape: (usize, usize), seed: u64) -> Tensor {
        rand_uniform(&[shape.0, shape.1], seed, -1.0, 1.0)
    }

    #[test]
    fn dropout_keeps_about_one_minus_p_and_is_a_pure_function_of_seed_and_index() {
        let n = 200_000u64;
        for p in [0.05, 0.5] {
            let kept = (0..n).filter(|&i| dropout_keep(42, i, p)).count() as f64 / n as f64;
            assert!((kept - (1.0 - p)).abs() < 0.005, "p {p}: kept {kept}");
        }
        let a: Vec<bool> = (0..64).map(|i| dropout_keep(7, i, 0.3)).collect();
        let b: Vec<bool> = (0..64).map(|i| dropout_keep(7, i, 0.3)).collect();
        let c: Vec<bool> = (0..64).map(|i| dropout_keep(8, i, 0.3)).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!((0..1000).all(|i| dropout_keep(3, i, 0.0)));
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
