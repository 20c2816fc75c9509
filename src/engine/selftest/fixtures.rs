//! `lorascope selftest engine --fixtures DIR`: the engine against transformers + PEFT on the
//! fixtures `scripts/make_hf_fixtures.py` writes (`DIR/<case>/`: `config.json`,
//! `model.safetensors`, `expected.json` with token rows, labels, the logits of a few positions
//! and the mean loss; `adapter_model.safetensors`, PEFT's adapter with A and B nonzero; and
//! `lora_grads.safetensors`, PEFT's gradients of every `lora_A` / `lora_B` for that adapter).
//!
//! Every case is checked in a list of [`Variant`]s on one device:
//! - dense fp32, fp16 and bf16, each with and without gradient checkpointing, against
//!   transformers: the base model's logits at the listed positions and its mean loss, the
//!   adapted loss, and every LoRA gradient;
//! - NF4 (fp32 and bf16, with and without checkpointing) against lorascope's own CPU NF4 path
//!   in the same dtype without checkpointing (transformers has no NF4 to compare with).
//!
//! Every error is `max |got - want| / max |want|` over the compared tensor (over all adapter
//! gradients: the largest per tensor), so a value near zero cannot make a good match fail.
//! Besides, [`check_resolved`] compares the config as lorascope resolved it (parameter count,
//! RoPE inverse frequencies and attention factor per layer type) with what transformers held
//! after its forward.

use crate::engine::config::{LayerKind, ModelConfig, ModelSource};
use crate::engine::lora::LoraConfig;
use crate::engine::model::Model;
use crate::engine::weights::WeightSource;
use crate::engine::{CandleContext, EngineError};
use crate::spec::{LoraModule, Quant};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use super::checks::*;

/// One fixture case read from disk.
pub struct Fixture {
    /// Directory name.
    pub name: String,
    dir: PathBuf,
    expected: Value,
    config: ModelConfig,
    ids: Vec<u32>,
    targets: Vec<i64>,
    batch: usize,
    seq: usize,
    positions: Vec<(usize, usize)>,
    lora: LoraConfig,
    /// `bf16_error.json` when the case has one: transformers' own bf16 error against the fp32
    /// expectations per device kind (`scripts/hf_bf16_error.py`).
    bf16_error: Option<Value>,
}

/// The case directories under `root` (those with both `config.json` and `expected.json`),
/// sorted by name.
///
/// Errors: `root` cannot be read, or holds no case.
pub fn list_cases(root: &Path) -> Result<Vec<String>, EngineError> {
    let io = |e: std::io::Error| EngineError::Io {
        path: root.display().to_string(),
        source: e,
    };
    let mut names = Vec::new();
    for entry in std::fs::read_dir(root).map_err(io)? {
        let p = entry.map_err(io)?.path();
        if p.join("expected.json").is_file()
            && p.join("config.json").is_file()
            && let Some(n) = p.file_name().and_then(|n| n.to_str())
        {
            names.push(n.to_string());
        }
    }
    names.sort();
    if names.is_empty() {
        return Err(EngineError::Invalid(format!(
            "{}: no fixture case (a directory with config.json and expected.json); expected the output of scripts/make_hf_fixtures.py such as tests/fixtures/hf",
            root.display()
        )));
    }
    Ok(names)
}

fn bad(file: &Path, what: &str) -> EngineError {
    EngineError::Invalid(format!(
        "{}: {what}; expected a file written by scripts/make_hf_fixtures.py",
        file.display()
    ))
}

fn arr<'a>(v: &'a Value, key: &str, file: &Path) -> Result<&'a Vec<Value>, EngineError> {
    v.get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| bad(file, &format!("`{key}` is missing or not a list")))
}

fn ints(v: &Value, file: &Path, key: &str) -> Result<Vec<i64>, EngineError> {
    v.as_array()
        .and_then(|a| a.iter().map(Value::as_i64).collect::<Option<Vec<_>>>())
        .ok_or_else(|| {
            bad(
                file,
                &format!("`{key}` holds a row that is not a list of integers"),
            )
        })
}

fn floats(v: &Value, file: &Path, key: &str) -> Result<Vec<f32>, EngineError> {
    v.as_array()
        .and_then(|a| {
            a.iter()
                .map(|x| x.as_f64().map(|x| x as f32))
                .collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| bad(file, &format!("`{key}` is not a list of numbers")))
}

fn number(v: &Value, path: &[&str], file: &Path) -> Result<f64, EngineError> {
    let mut cur = v;
    for k in path {
        cur = cur.get(k).unwrap_or(&Value::Null);
    }
    cur.as_f64().ok_or_else(|| {
        bad(
            file,
            &format!("`{}` is missing or not a number", path.join(".")),
        )
    })
}

impl Fixture {
    /// Read case `name` under `root`: its config (as lorascope resolves `config.json`), rows,
    /// shifted targets (`labels[b][t + 1]`, the last of each row -100) and PEFT's LoRA rank and
    /// alpha (every projection targeted).
    ///
    /// Errors: an unreadable or malformed file, named; a config lorascope refuses.
    pub fn load(root: &Path, name: &str) -> Result<Fixture, EngineError> {
        let dir = root.join(name);
        let file = dir.join("expected.json");
        let text = std::fs::read_to_string(&file).map_err(|e| EngineError::Io {
            path: file.display().to_string(),
            source: e,
        })?;
        let expected: Value =
            serde_json::from_str(&text).map_err(|e| bad(&file, &format!("not JSON ({e})")))?;
        let dir_str = dir
            .to_str()
            .ok_or_else(|| bad(&dir, "the path is not UTF-8"))?;
        let config = ModelSource::resolve(dir_str)?.config;
        let rows = arr(&expected, "rows", &file)?;
        let labels = arr(&expected, "labels", &file)?;
        let batch = rows.len();
        let seq = rows.first().and_then(Value::as_array).map_or(0, Vec::len);
        if batch == 0 || seq == 0 || labels.len() != batch {
            return Err(bad(
                &file,
                "`rows` and `labels` must be equal, non-empty lists",
            ));
        }
        let mut ids = Vec::with_capacity(batch * seq);
        let mut targets = Vec::with_capacity(batch * seq);
        for (r, l) in rows.iter().zip(labels) {
            let r = ints(r, &file, "rows")?;
            let l = ints(l, &file, "labels")?;
            if r.len() != seq || l.len() != seq {
                return Err(bad(
                    &file,
                    "every row and label row must have the same length",
                ));
            }
            for &x in &r {
                let id = u32::try_from(x)
                    .ok()
                    .filter(|&id| (id as usize) < config.vocab_size)
                    .ok_or_else(|| {
                        bad(&file, &format!("token id {x} is outside the vocabulary"))
                    })?;
                ids.push(id);
            }
            targets.extend_from_slice(&l[1..]);
            targets.push(-100);
        }
        let mut positions = Vec::new();
        for p in arr(&expected, "logits_positions", &file)? {
            let p = ints(p, &file, "logits_positions")?;
            match p[..] {
                [b, t] if (0..batch as i64).contains(&b) && (0..seq as i64).contains(&t) => {
                    positions.push((b as usize, t as usize))
                }
                _ => {
                    return Err(bad(
                        &file,
                        "a logits position is not [row, column] inside rows",
                    ));
                }
            }
        }
        let r = number(&expected, &["lora", "peft_config", "r"], &file)?;
        let alpha = number(&expected, &["lora", "peft_config", "lora_alpha"], &file)?;
        if r < 1.0 || r.fract() != 0.0 {
            return Err(bad(
                &file,
                "`lora.peft_config.r` must be a positive integer",
            ));
        }
        let lora = LoraConfig {
            rank: r as usize,
            alpha,
            dropout: 0.0,
            targets: vec![LoraModule::AllLinear],
        };
        let bf16_error = std::fs::read_to_string(dir.join("bf16_error.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        Ok(Fixture {
            bf16_error,
            name: name.to_string(),
            dir,
            expected,
            config,
            ids,
            targets,
            batch,
            seq,
            positions,
            lora,
        })
    }

    /// The tolerances of variant `v` on `device`: [`Variant::tolerances`], and for bf16 at
    /// least twice transformers' own bf16 error on that device kind (`cuda` / `cpu` in
    /// `bf16_error.json`) where the case records it: bf16 keeps 8 bits of mantissa, so how far
    /// a bf16 run lands from the fp32 reference depends on the case, and lorascope is asked to
    /// land no further than twice as far as transformers does in the same dtype.
    pub fn tolerances(&self, v: Variant, device: &Device) -> Tolerances {
        let mut t = v.tolerances(device);
        if v.dtype == DType::BF16
            && let Some(e) = self
                .bf16_error
                .as_ref()
                .and_then(|e| e.get(if device.is_cpu() { "cpu" } else { "cuda" }))
        {
            let hf = |k: &str| e.get(k).and_then(Value::as_f64).unwrap_or(0.0);
            t.logits = t.logits.max(2.0 * hf("logits"));
            t.loss = t.loss.max(2.0 * hf("loss"));
            t.grads = t.grads.max(2.0 * hf("grads"));
        }
        t
    }

    /// The config lorascope resolved.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn file(&self) -> PathBuf {
        self.dir.join("expected.json")
    }

    /// transformers' and PEFT's numbers.
    fn reference(&self) -> Result<Outputs, EngineError> {
        let file = self.file();
        let e = &self.expected;
        let logits = arr(e, "logits", &file)?
            .iter()
            .map(|row| floats(row, &file, "logits"))
            .collect::<Result<Vec<_>, _>>()?;
        if logits.len() != self.positions.len() {
            return Err(bad(
                &file,
                "`logits` and `logits_positions` differ in length",
            ));
        }
        let grads_file = self.dir.join("lora_grads.safetensors");
        let grads = candle_core::safetensors::load(&grads_file, &Device::Cpu)
            .map_err(|e| bad(&grads_file, &format!("cannot read ({e})")))?
            .into_iter()
            .map(|(k, t)| Ok((k, flat(&t).ctx("reading PEFT's gradients")?)))
            .collect::<Result<BTreeMap<_, _>, EngineError>>()?;
        Ok(Outputs {
            logits,
            loss: number(e, &["loss"], &file)?,
            adapted_loss: number(e, &["lora", "loss"], &file)?,
            grads,
        })
    }

    /// lorascope's numbers on `device` in `variant`.
    fn evaluate(&self, device: &Device, v: Variant) -> Result<Outputs, EngineError> {
        let ws = WeightSource::open_dir(&self.dir)?
            .ok_or_else(|| bad(&self.dir.join("model.safetensors"), "no weights"))?;
        let mut model =
            Model::new_quantized(&self.config, &self.lora, &ws, v.dtype, device, 7, v.quant)?;
        model.set_grad_checkpointing(v.checkpointing);
        let (ids, targets, b, t) = (&self.ids, &self.targets, self.batch, self.seq);
        // Base model: B = 0 at creation.
        let all = model.logits(ids, b, t).ctx("computing logits")?;
        let logits = self
            .positions
            .iter()
            .map(|&(bi, ti)| flat(&all.narrow(0, bi * t + ti, 1)?))
            .collect::<candle_core::Result<Vec<_>>>()
            .ctx("reading logits")?;
        drop(all);
        let loss = scalar(
            &model
                .loss(ids, targets, b, t, false)
                .ctx("computing the loss")?,
        )?;
        model.load_peft_adapter(&self.dir.join("adapter_model.safetensors"))?;
        let adapted = model
            .loss(ids, targets, b, t, false)
            .ctx("computing the adapted loss")?;
        let store = model.backward(&adapted).ctx("backward")?;
        let mut grads = BTreeMap::new();
        for ad in model.adapters() {
            for (part, var) in [("lora_A", &ad.a), ("lora_B", &ad.b)] {
                let key = format!("{}.{part}.weight", ad.name);
                let g = store.get(var.as_tensor()).ok_or_else(|| {
                    EngineError::Invalid(format!("{}: {key} got no gradient", self.name))
                })?;
                grads.insert(key, flat(g).ctx("reading gradients")?);
            }
        }
        Ok(Outputs {
            logits,
            loss,
            adapted_loss: scalar(&adapted)?,
            grads,
        })
    }
}

/// What a run of one case produces.
struct Outputs {
    /// Base-model logits at the fixture's positions.
    logits: Vec<Vec<f32>>,
    /// Base-model mean loss.
    loss: f64,
    /// Mean loss with PEFT's adapter.
    adapted_loss: f64,
    /// PEFT key -> gradient, flattened.
    grads: BTreeMap<String, Vec<f32>>,
}

fn flat(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1()
}

fn scalar(t: &Tensor) -> Result<f64, EngineError> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.to_device(&Device::Cpu))
        .and_then(|t| t.to_scalar::<f64>())
        .ctx("reading the loss")
}

/// `max |a - b| / max |b|`; infinite when the lengths differ or `a` holds a non-finite value.
pub fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    // Nothing to compare is a failure, not a pass (an empty fixture field proves nothing).
    if a.len() != b.len() || a.is_empty() {
        return f64::INFINITY;
    }
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs() as f64));
    let mut err = 0f64;
    for (x, y) in a.iter().zip(b) {
        let d = (*x as f64 - *y as f64).abs();
        if !d.is_finite() {
            return f64::INFINITY;
        }
        err = err.max(d);
    }
    err / scale.max(1e-30)
}

fn rel_scalar(a: f64, b: f64) -> f64 {
    let r = ((a - b) / b.abs().max(1e-30)).abs();
    if r.is_finite() { r } else { f64::INFINITY }
}

/// `got` against `want` with tolerances `t`.
fn compare(got: &Outputs, want: &Outputs, t: Tolerances) -> Vec<Measure> {
    let logits = if got.logits.len() == want.logits.len() && !want.logits.is_empty() {
        got.logits
            .iter()
            .zip(&want.logits)
            .map(|(a, b)| max_rel(a, b))
            .fold(0f64, f64::max)
    } else {
        f64::INFINITY
    };
    let loss = rel_scalar(got.loss, want.loss).max(rel_scalar(got.adapted_loss, want.adapted_loss));
    let grads = if got.grads.len() == want.grads.len() && !want.grads.is_empty() {
        want.grads
            .iter()
            .map(|(k, w)| got.grads.get(k).map_or(f64::INFINITY, |g| max_rel(g, w)))
            .fold(0f64, f64::max)
    } else {
        f64::INFINITY
    };
    vec![
        Measure {
            what: "logits",
            rel: logits,
            tol: t.logits,
        },
        Measure {
            what: "loss",
            rel: loss,
            tol: t.loss,
        },
        Measure {
            what: "grads",
            rel: grads,
            tol: t.grads,
        },
    ]
}

/// The config as lorascope resolved it against what transformers reported: the parameter
/// count (must be equal) and, per attention type, the RoPE inverse frequencies and attention
/// factor for the fixture's row length (within 1e-6).
///
/// Errors: a malformed `resolved` section.
pub fn check_resolved(fx: &Fixture) -> Result<Check, EngineError> {
    let file = fx.file();
    let cfg = &fx.config;
    let want_params = number(&fx.expected, &["resolved", "num_parameters"], &file)?;
    let mut measures = vec![Measure {
        what: "params",
        rel: rel_scalar(cfg.num_parameters() as f64, want_params),
        tol: 0.0,
    }];
    let tables = fx
        .expected
        .get("resolved")
        .and_then(|r| r.get("rope_tables_after_forward"))
        .and_then(Value::as_object)
        .ok_or_else(|| bad(&file, "`resolved.rope_tables_after_forward` is missing"))?;
    let (mut inv_err, mut factor_err) = (0f64, 0f64);
    for (kind, tab) in tables {
        let k = if kind == "sliding_attention" {
            LayerKind::Sliding
        } else {
            LayerKind::Full
        };
        let (inv, factor) = cfg.rope_for(k).inv_freq(cfg.head_dim, fx.seq);
        let want = floats(
            tab.get("inv_freq").unwrap_or(&Value::Null),
            &file,
            "inv_freq",
        )?;
        inv_err = inv_err.max(max_rel(&inv, &want));
        let wf = number(tab, &["attention_scaling"], &file)?;
        factor_err = factor_err.max(rel_scalar(factor, wf));
    }
    measures.push(Measure {
        what: "inv_freq",
        rel: inv_err,
        tol: 1e-6,
    });
    measures.push(Measure {
        what: "rope factor",
        rel: factor_err,
        tol: 1e-6,
    });
    Ok(Check {
        case: fx.name.clone(),
        variant: "config".into(),
        measures,
        against: "transformers",
    })
}

/// Run `fx` in each of `variants` on `device`, one [`Check`] per variant, in order: dense
/// variants against transformers, NF4 ones against the CPU NF4 path in the same dtype without
/// checkpointing (computed once per dtype; on the CPU that variant itself is left out).
///
/// Errors: a file or device error; a variant that cannot run at all.
pub fn run_case(
    fx: &Fixture,
    device: &Device,
    variants: &[Variant],
) -> Result<Vec<Check>, EngineError> {
    let reference = fx.reference()?;
    let mut nf4_refs: Vec<(DType, Outputs)> = Vec::new();
    let mut checks = Vec::with_capacity(variants.len());
    for &v in variants {
        // On the CPU the NF4 variant without checkpointing is the NF4 reference itself:
        // comparing it with itself proves nothing, so it is not listed.
        if device.is_cpu() && v.quant == Quant::Nf4 && !v.checkpointing {
            continue;
        }
        let got = fx.evaluate(device, v)?;
        let (measures, against) = if v.quant == Quant::Nf4 {
            if !nf4_refs.iter().any(|(d, _)| *d == v.dtype) {
                let cpu = Variant {
                    checkpointing: false,
                    ..v
                };
                nf4_refs.push((v.dtype, fx.evaluate(&Device::Cpu, cpu)?));
            }
            let want = nf4_refs
                .iter()
                .find(|(d, _)| *d == v.dtype)
                .map(|(_, o)| o)
                .ok_or_else(|| EngineError::Invalid("NF4 reference missing".into()))?;
            (compare(&got, want, fx.tolerances(v, device)), "cpu nf4")
        } else {
            (
                compare(&got, &reference, fx.tolerances(v, device)),
                "transformers",
            )
        };
        checks.push(Check {
            case: fx.name.clone(),
            variant: v.name(),
            measures,
            against,
        });
    }
    Ok(checks)
}
