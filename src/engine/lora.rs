//! LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), as
//! Hugging Face PEFT's `LoraLayer`: `y = W x + b + (alpha / r) * B A dropout(x)`, `A` (r, in)
//! Kaiming-uniform (`a = sqrt(5)`, i.e. U(-1/sqrt(in), 1/sqrt(in))), `B` (out, r) zeros.
//! Adapter weights are f32 master copies ([`candle_core::Var`]) cast to the compute dtype in
//! forward; the base projection is a [`BaseLinear`] (dense [`FrozenLinear`] or 4-bit
//! [`Nf4Linear`]) and gets no gradient.

use super::nf4::Nf4Linear;
use super::ops::FrozenLinear;
use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Mutex;

/// A projection of a decoder layer that can carry an adapter (PEFT `target_modules` names
/// without the `_proj` suffix).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// `self_attn.q_proj`
    Q,
    /// `self_attn.k_proj`
    K,
    /// `self_attn.v_proj`
    V,
    /// `self_attn.o_proj`
    O,
    /// `mlp.gate_proj`
    Gate,
    /// `mlp.up_proj`
    Up,
    /// `mlp.down_proj`
    Down,
}

impl Target {
    /// All seven projections, in layer order.
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// Hugging Face module path inside a decoder layer, e.g. `self_attn.q_proj`.
    pub fn module_path(self) -> &'static str {
        match self {
            Target::Q => "self_attn.q_proj",
            Target::K => "self_attn.k_proj",
            Target::V => "self_attn.v_proj",
            Target::O => "self_attn.o_proj",
            Target::Gate => "mlp.gate_proj",
            Target::Up => "mlp.up_proj",
            Target::Down => "mlp.down_proj",
        }
    }

    /// PEFT `target_modules` name, e.g. `q_proj`.
    pub fn peft_name(self) -> &'static str {
        self.module_path().rsplit('.').next().unwrap_or("")
    }
}

impl FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s.trim().trim_end_matches("_proj") {
            "q" => Target::Q,
            "k" => Target::K,
            "v" => Target::V,
            "o" => Target::O,
            "gate" => Target::Gate,
            "up" => Target::Up,
            "down" => Target::Down,
            other => {
                return Err(format!(
                    "unknown LoRA target `{other}` (expected any of q,k,v,o,gate,up,down)"
                ));
            }
        })
    }
}

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
    pub targets: Vec<Target>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 32.0,
            dropout: 0.0,
            targets: Target::ALL.to_vec(),
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
    /// Apply to `x` (tokens, in) -> (tokens, out). `train` enables dropout.
    pub fn forward(&self, x: &Tensor, train: Option<&DropoutRng>) -> Result<Tensor> {
        self.forward_with(x, train, false)
    }

    /// As [`LoraLinear::forward`]; with `detach`, the adapter weights enter as constants
    /// (no graph node), as in the untracked first pass of gradient checkpointing.
    pub fn forward_with(
        &self,
        x: &Tensor,
        train: Option<&DropoutRng>,
        detach: bool,
    ) -> Result<Tensor> {
        let y = self.base.forward(x)?;
        let Some(ad) = &self.adapter else {
            return Ok(y);
        };
        let dt = x.dtype();
        let xin = match train {
            Some(rng) if ad.dropout > 0.0 => dropout(x, ad.dropout, rng)?,
            _ => x.clone(),
        };
        let (a, b) = if detach {
            (ad.a.as_tensor().detach(), ad.b.as_tensor().detach())
        } else {
            (ad.a.as_tensor().clone(), ad.b.as_tensor().clone())
        };
        let a = a.to_dtype(dt)?;
        let b = b.to_dtype(dt)?;
        let upd = xin.matmul(&a.t()?)?.matmul(&b.t()?)?;
        y + upd.affine(ad.scale, 0.0)?
    }
}

/// Inverted dropout: zero each element with probability `p`, scale the rest by 1/(1-p).
/// On CPU the mask comes from the run's seeded ChaCha stream; on a GPU it is drawn on the
/// device (cuRAND, seeded once per run by the weights/model setup) so no mask crosses the bus.
fn dropout(x: &Tensor, p: f64, rng: &DropoutRng) -> Result<Tensor> {
    let n = x.elem_count();
    let keep = 1.0 - p;
    if !x.device().is_cpu() {
        let u = Tensor::rand(0f32, 1f32, x.shape(), x.device())?;
        let m = u.ge(p)?.to_dtype(x.dtype())?.affine(1.0 / keep, 0.0)?;
        return x * m;
    }
    let mask: Vec<f32> = {
        let mut r = rng
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg("rng poisoned".into()))?;
        (0..n)
            .map(|_| {
                if r.random::<f64>() < keep {
                    (1.0 / keep) as f32
                } else {
                    0.0
                }
            })
            .collect()
    };
    let m = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x * m
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
    let tensors: std::collections::HashMap<_, _> = tensors.into_iter().collect();
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors"))?;
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
