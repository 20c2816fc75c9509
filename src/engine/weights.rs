//! Base-model weights: Hugging Face safetensors (single file or sharded through
//! `model.safetensors.index.json`), or deterministic random initialisation of the real shape
//! ("synthetic weights": speed, memory and energy do not depend on weight values).

use super::EngineError;
use super::config::{ModelConfig, Projection};
use super::memory::host;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Hugging Face name of the token embedding, (vocab, hidden).
pub const EMBED: &str = "model.embed_tokens.weight";
/// Hugging Face name of the final RMSNorm's weight, (hidden).
pub const FINAL_NORM: &str = "model.norm.weight";
/// Hugging Face name of the output projection, (vocab, hidden); absent when tied to [`EMBED`].
pub const LM_HEAD: &str = "lm_head.weight";

/// Hugging Face names of the tensors of one decoder layer, `model.layers.{index}.…`
/// (transformers' decoder-layer module paths; Gemma's extra norms included).
#[derive(Debug, Clone)]
pub struct LayerNames(String);

impl LayerNames {
    /// Names of layer `index` (0-based).
    pub fn new(index: usize) -> Self {
        Self(format!("model.layers.{index}"))
    }

    /// `input_layernorm.weight`, (hidden).
    pub fn input_norm(&self) -> String {
        format!("{}.input_layernorm.weight", self.0)
    }

    /// `post_attention_layernorm.weight`, (hidden): before the MLP, or (Gemma) on the
    /// attention output.
    pub fn post_norm(&self) -> String {
        format!("{}.post_attention_layernorm.weight", self.0)
    }

    /// Gemma `pre_feedforward_layernorm.weight`, (hidden), before the MLP.
    pub fn pre_ffn_norm(&self) -> String {
        format!("{}.pre_feedforward_layernorm.weight", self.0)
    }

    /// Gemma `post_feedforward_layernorm.weight`, (hidden), on the MLP output.
    pub fn post_ffn_norm(&self) -> String {
        format!("{}.post_feedforward_layernorm.weight", self.0)
    }

    /// `self_attn.q_norm.weight`, (head_dim) (Qwen3, Gemma 3).
    pub fn q_norm(&self) -> String {
        format!("{}.self_attn.q_norm.weight", self.0)
    }

    /// `self_attn.k_norm.weight`, (head_dim) (Qwen3, Gemma 3).
    pub fn k_norm(&self) -> String {
        format!("{}.self_attn.k_norm.weight", self.0)
    }

    /// The weight of module `p`, e.g. `self_attn.q_proj.weight`, (out, in).
    pub fn weight(&self, p: Projection) -> String {
        format!("{}.{}.weight", self.0, p.module_path())
    }

    /// The bias of module `p`, e.g. `self_attn.q_proj.bias`, (out); present only when
    /// [`ModelConfig::projection_bias`].
    pub fn bias(&self, p: Projection) -> String {
        format!("{}.{}.bias", self.0, p.module_path())
    }

    /// PEFT's key prefix for the adapter on module `p`, e.g.
    /// `base_model.model.model.layers.0.self_attn.q_proj`.
    pub fn adapter(&self, p: Projection) -> String {
        format!("base_model.model.{}.{}", self.0, p.module_path())
    }

    /// The norms of the layer with their shapes, in checkpoint order: input, (q, k,)
    /// post-attention, (Gemma: pre- and post-feed-forward).
    pub fn norms(&self, cfg: &ModelConfig) -> Vec<(String, usize)> {
        let h = cfg.hidden_size;
        let mut v = vec![(self.input_norm(), h)];
        if cfg.qk_norm {
            v.push((self.q_norm(), cfg.head_dim));
            v.push((self.k_norm(), cfg.head_dim));
        }
        v.push((self.post_norm(), h));
        if cfg.family.is_gemma() {
            v.push((self.pre_ffn_norm(), h));
            v.push((self.post_ffn_norm(), h));
        }
        v
    }
}

/// Every base tensor of a model as `(HF name, shape)`, in load order.
pub fn tensor_names(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let h = cfg.hidden_size;
    let mut v = vec![(EMBED.to_string(), vec![cfg.vocab_size, h])];
    for i in 0..cfg.num_hidden_layers {
        let names = LayerNames::new(i);
        for (n, d) in names.norms(cfg) {
            v.push((n, vec![d]));
        }
        for &p in cfg.projections() {
            let (o, n) = cfg.projection_dims(p);
            v.push((names.weight(p), vec![o, n]));
            if cfg.projection_bias(p) {
                v.push((names.bias(p), vec![o]));
            }
        }
    }
    v.push((FINAL_NORM.to_string(), vec![h]));
    if !cfg.tie_word_embeddings {
        v.push((LM_HEAD.to_string(), vec![cfg.vocab_size, h]));
    }
    v
}

/// Where base weights come from.
pub enum WeightSource {
    /// Random initialisation: linear/embedding weights ~ N(0, initializer_range), norms 1,
    /// biases 0; deterministic given the seed and the tensor name.
    Synthetic {
        /// Seed.
        seed: u64,
    },
    /// Memory-mapped safetensors files.
    Safetensors {
        /// The opened files.
        files: Box<MmapedSafetensors>,
        /// For messages: the file (or index) the weights come from.
        origin: String,
        /// tensor name -> file, for messages.
        owner: HashMap<String, PathBuf>,
    },
}

impl WeightSource {
    /// Open the weights in `dir`: `model.safetensors.index.json` (sharded), else
    /// `model.safetensors`, else every `*.safetensors`; `Ok(None)` when `dir` has none.
    ///
    /// Errors: an unreadable index, a listed shard that is missing, a truncated or corrupt file.
    pub fn open_dir(dir: &Path) -> Result<Option<Self>, EngineError> {
        let index = dir.join("model.safetensors.index.json");
        let mut owner = HashMap::new();
        let (paths, origin): (Vec<PathBuf>, String) = if index.exists() {
            let werr = |msg: String| EngineError::Weights {
                file: index.display().to_string(),
                msg,
            };
            let text =
                std::fs::read_to_string(&index).map_err(|e| werr(format!("cannot read ({e})")))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                werr(format!(
                    "not valid JSON ({e}); expected {{\"weight_map\": {{name: file}}}}"
                ))
            })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    werr("missing `weight_map` object (expected {name: shard file})".into())
                })?;
            let mut files: Vec<PathBuf> = Vec::new();
            for (name, f) in map {
                let f = f
                    .as_str()
                    .ok_or_else(|| werr(format!("weight_map entry `{name}` is not a file name")))?;
                let p = dir.join(f);
                if !files.contains(&p) {
                    files.push(p.clone());
                }
                owner.insert(name.clone(), p);
            }
            for p in &files {
                if !p.exists() {
                    return Err(werr(format!(
                        "shard {} is listed but missing (download every shard the index names)",
                        p.display()
                    )));
                }
            }
            (files, index.display().to_string())
        } else {
            let single = dir.join("model.safetensors");
            if single.exists() {
                (vec![single.clone()], single.display().to_string())
            } else {
                let mut all: Vec<PathBuf> = std::fs::read_dir(dir)
                    .map_err(|e| EngineError::Io {
                        path: dir.display().to_string(),
                        source: e,
                    })?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                    .collect();
                all.sort();
                if all.is_empty() {
                    return Ok(None);
                }
                (all, dir.display().to_string())
            }
        };
        for p in &paths {
            check_header(p)?;
        }
        // SAFETY: the files are memory-mapped read-only; lorascope does not modify them while
        // a run is in progress (same contract as candle's and HF's loaders).
        let files =
            unsafe { MmapedSafetensors::multi(&paths) }.map_err(|e| EngineError::Weights {
                file: origin.clone(),
                msg: format!(
                    "cannot read safetensors ({}); the file may be truncated: download it again",
                    first_line(&e.to_string())
                ),
            })?;
        if owner.is_empty() {
            for (name, _) in files.tensors() {
                owner.insert(name, PathBuf::from(&origin));
            }
        }
        Ok(Some(Self::Safetensors {
            files: Box::new(files),
            origin,
            owner,
        }))
    }

    /// True for random initialisation.
    pub fn is_synthetic(&self) -> bool {
        matches!(self, Self::Synthetic { .. })
    }

    /// Load one tensor with the expected `shape`, converted to `dtype` on `device`.
    ///
    /// Errors: the tensor is absent, has another shape, is not bf16/f16/f32, or holds a NaN
    /// or infinity (named with the count and the first element's index).
    pub fn get(
        &self,
        name: &str,
        shape: &[usize],
        cfg: &ModelConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor, EngineError> {
        match self {
            Self::Synthetic { seed } => synth(name, shape, cfg, *seed, dtype, device),
            Self::Safetensors {
                files,
                origin,
                owner,
            } => {
                let file = owner
                    .get(name)
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| origin.clone());
                let werr = |msg: String| EngineError::Weights {
                    file: file.clone(),
                    msg,
                };
                let view = files.get(name).map_err(|_| {
                    werr(format!(
                        "tensor `{name}` is missing (expected shape {shape:?}; is this a {} checkpoint?)",
                        cfg.family.class_name()
                    ))
                })?;
                if view.shape() != shape {
                    return Err(werr(format!(
                        "tensor `{name}` has shape {:?}, expected {shape:?} (config.json and weights disagree)",
                        view.shape()
                    )));
                }
                use safetensors::Dtype as S;
                if !matches!(view.dtype(), S::BF16 | S::F16 | S::F32) {
                    return Err(werr(format!(
                        "tensor `{name}` has dtype {:?}, expected bf16, f16 or f32",
                        view.dtype()
                    )));
                }
                if let Some(bad) = non_finite(view.dtype(), view.data()) {
                    return Err(werr(format!(
                        "tensor `{name}` holds {bad}: the checkpoint is corrupt (or was saved after \
                         training diverged); download or convert it again"
                    )));
                }
                // The tensor as read, and its conversion: fail as out of memory, not abort.
                let n: usize = shape.iter().product();
                host::probe(
                    n * (4 + dtype.size_in_bytes()),
                    &format!("loading `{name}`"),
                )
                .map_err(|e| super::classify(e, &format!("loading `{name}`")))?;
                let t = files.load(name, &Device::Cpu).map_err(|e| {
                    werr(format!("tensor `{name}`: {}", first_line(&e.to_string())))
                })?;
                t.to_dtype(dtype)
                    .and_then(|t| t.to_device(device))
                    .map_err(|e| super::classify(e, &format!("loading `{name}`")))
            }
        }
    }
}

/// Describes the non-finite values (NaN, ±inf) of a little-endian bf16/f16/f32 buffer, e.g.
/// `3 non-finite values (NaN at element 17)`; `None` when every value is finite (or the
/// dtype is another one). One pass over the bytes, no allocation: an all-ones exponent
/// field marks inf/NaN in IEEE 754 binary16/32 and in bfloat16.
fn non_finite(dtype: safetensors::Dtype, data: &[u8]) -> Option<String> {
    use safetensors::Dtype as S;
    let (width, exp_mask, mant_mask): (usize, u32, u32) = match dtype {
        S::F32 => (4, 0x7F80_0000, 0x007F_FFFF),
        S::BF16 => (2, 0x7F80, 0x007F),
        S::F16 => (2, 0x7C00, 0x03FF),
        _ => return None,
    };
    let mut count = 0usize;
    let mut first: Option<(usize, bool)> = None;
    for (i, c) in data.chunks_exact(width).enumerate() {
        let bits = if width == 4 {
            u32::from_le_bytes([c[0], c[1], c[2], c[3]])
        } else {
            u32::from(u16::from_le_bytes([c[0], c[1]]))
        };
        if bits & exp_mask == exp_mask {
            count += 1;
            first.get_or_insert((i, bits & mant_mask != 0));
        }
    }
    let (at, nan) = first?;
    let what = if nan { "NaN" } else { "inf" };
    Some(if count == 1 {
        format!("a non-finite value ({what} at element {at})")
    } else {
        format!("{count} non-finite values (the first, {what}, at element {at})")
    })
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").to_string()
}

/// Check that a safetensors file's header parses and its data section is as long as the header
/// says (a truncated download fails here with a clear message rather than inside mmap code).
fn check_header(path: &Path) -> Result<(), EngineError> {
    let werr = |msg: String| EngineError::Weights {
        file: path.display().to_string(),
        msg,
    };
    let meta = std::fs::metadata(path).map_err(|e| werr(format!("cannot open ({e})")))?;
    if meta.is_dir() {
        return Err(werr(
            "is a directory, not a safetensors file: move the weights file to this path, or \
             remove the directory"
                .into(),
        ));
    }
    let len = meta.len();
    let mut f = std::fs::File::open(path).map_err(|e| werr(format!("cannot open ({e})")))?;
    use std::io::Read;
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| {
        werr(
            "truncated: shorter than the 8-byte safetensors header length; download it again"
                .into(),
        )
    })?;
    let hlen = u64::from_le_bytes(n);
    if hlen > 100_000_000 || 8 + hlen > len {
        return Err(werr(format!(
            "truncated or not safetensors: header says {hlen} bytes but the file has {len}; download it again"
        )));
    }
    let mut h = vec![0u8; hlen as usize];
    f.read_exact(&mut h)
        .map_err(|e| werr(format!("cannot read header ({e})")))?;
    let header: serde_json::Value = serde_json::from_slice(&h).map_err(|e| {
        werr(format!(
            "bad safetensors header ({e}); the file may be corrupt"
        ))
    })?;
    let need = header
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| k.as_str() != "__metadata__")
                .filter_map(|(_, v)| v.get("data_offsets")?.get(1)?.as_u64())
                .max()
                .unwrap_or(0)
        })
        .ok_or_else(|| werr("bad safetensors header (expected a JSON object)".into()))?;
    if (8 + hlen).checked_add(need).is_none_or(|end| end > len) {
        return Err(werr(format!(
            "truncated: tensors need {} bytes, the file has {len}; download it again",
            (8 + hlen).saturating_add(need)
        )));
    }
    Ok(())
}

fn name_seed(seed: u64, name: &str) -> u64 {
    // FNV-1a over the name, mixed with the seed: stable across runs and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

pub(crate) fn synth(
    name: &str,
    shape: &[usize],
    cfg: &ModelConfig,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<Tensor, EngineError> {
    let ctx = |e| super::classify(e, &format!("initialising `{name}`"));
    if name.ends_with("norm.weight") {
        // Gemma stores `w` of its `(1 + w)` norms: 0 is the identity scale.
        if cfg.family.is_gemma() {
            return Tensor::zeros(shape, dtype, device).map_err(ctx);
        }
        return Tensor::ones(shape, dtype, device).map_err(ctx);
    }
    if name.ends_with(".bias") {
        return Tensor::zeros(shape, dtype, device).map_err(ctx);
    }
    let n: usize = shape.iter().product();
    if device.is_cpu() {
        let mut rng = ChaCha8Rng::seed_from_u64(name_seed(seed, name));
        let dist = Normal::new(0.0f32, cfg.initializer_range as f32)
            .map_err(|e| EngineError::Invalid(format!("initializer_range: {e}")))?;
        let what = format!("initialising `{name}`");
        let mut v: Vec<f32> = host::try_zeroed(n, &what).map_err(ctx)?;
        v.iter_mut().for_each(|x| *x = dist.sample(&mut rng));
        host::probe(n * dtype.size_in_bytes(), &what).map_err(ctx)?;
        Tensor::from_vec(v, shape, device)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(ctx)
    } else {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = device
            && crate::engine::cuda::synth_kernel_on()
            && matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
        {
            let std = cfg.initializer_range as f32;
            return crate::engine::cuda::synth::normal(
                dev,
                shape,
                dtype,
                name_seed(seed, name),
                std,
            )
            .map_err(ctx);
        }
        device.set_seed(name_seed(seed, name)).map_err(ctx)?;
        Tensor::randn(0f32, cfg.initializer_range as f32, shape, device)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(ctx)
    }
}

/// Write `tensors` as a HF checkpoint in `dir`: one `model.safetensors`, or with `shards > 1`,
/// `model-0000i-of-0000n.safetensors` files plus `model.safetensors.index.json`.
///
/// Errors: I/O.
pub fn save_checkpoint(
    dir: &Path,
    tensors: &[(String, Tensor)],
    shards: usize,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    if shards <= 1 {
        let m: HashMap<String, Tensor> = tensors.iter().cloned().collect();
        candle_core::safetensors::save(&m, dir.join("model.safetensors"))?;
        return Ok(());
    }
    let per = tensors.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in tensors.chunks(per).enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards);
        let m: HashMap<String, Tensor> = chunk.iter().cloned().collect();
        candle_core::safetensors::save(&m, dir.join(&file))?;
        for (name, _) in chunk {
            weight_map.insert(name.clone(), serde_json::Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index)?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::non_finite;
    use half::{bf16, f16};
    use safetensors::Dtype as S;

    #[test]
    fn non_finite_values_are_found_in_every_float_dtype() {
        let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        assert_eq!(non_finite(S::F32, &f32s(&[1.0, -2.5, f32::MAX, 0.0])), None);
        assert_eq!(
            non_finite(S::F32, &f32s(&[1.0, f32::NAN, f32::INFINITY])).unwrap(),
            "2 non-finite values (the first, NaN, at element 1)"
        );
        let bf = |v: &[f32]| {
            v.iter()
                .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
                .collect::<Vec<u8>>()
        };
        assert_eq!(non_finite(S::BF16, &bf(&[1.0, 3e38, -1e-30])), None);
        assert_eq!(
            non_finite(S::BF16, &bf(&[0.0, 0.0, f32::NEG_INFINITY])).unwrap(),
            "a non-finite value (inf at element 2)"
        );
        let h = |v: &[f32]| {
            v.iter()
                .flat_map(|x| f16::from_f32(*x).to_le_bytes())
                .collect::<Vec<u8>>()
        };
        assert_eq!(non_finite(S::F16, &h(&[65504.0, -65504.0, 1e-7])), None);
        assert!(
            non_finite(S::F16, &h(&[f32::NAN]))
                .unwrap()
                .contains("NaN at element 0")
        );
    }
}
