//! `lorascope selftest`: the engine on a device against the CPU f32 path, on the tiny preset.
//!
//! Builds the tiny model once on the CPU in f32 (synthetic weights, random non-zero LoRA B),
//! saves it as safetensors, and loads the same weights on the device under test in fp16 and
//! bf16, dense and NF4, with and without gradient checkpointing. Each is compared with the CPU
//! path in the same precision and quantisation (no checkpointing): the logits (relative L2
//! error, which must stay under 1e-2 in fp16 and 2.5e-2 in bf16), the loss, and the adapters' gradients (relative L2 error
//! under 5e-2). The error against CPU f32 is printed too, as the cost of the precision. This is the check that the CUDA kernels (attention softmax, dropout, NF4
//! dequantisation) and cuBLAS paths compute what the CPU path computes.
//!
//! [`fixtures`] is the other half: every family on the device against transformers + PEFT.

pub mod checks;
pub mod fixtures;

use super::config::ModelSource;
use super::lora::LoraConfig;
use super::model::Model;
use super::train::parse_device;
use super::weights::{WeightSource, save_checkpoint};
use super::{CandleContext, EngineError};
use crate::spec::Quant;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

/// Largest relative L2 error of logits accepted in fp16.
pub const LOGITS_TOL: f64 = 1e-2;
/// Largest relative L2 error of logits accepted in bf16: bf16 keeps 8 mantissa bits to fp16's
/// 11, so its unit roundoff is 8x larger; on the H200 the GPU-vs-CPU logits error was 1.6e-3
/// in fp16 and 1.3e-2 in bf16, the same ratio. 2.5e-2 is about six bf16 ulps.
pub const LOGITS_TOL_BF16: f64 = 2.5e-2;
/// Largest relative L2 error of adapter gradients accepted.
pub const GRAD_TOL: f64 = 5e-2;
/// Largest relative L2 error of logits and of gradients accepted in f32, where only the order
/// of summation differs (cuBLAS with f32 accumulation, no TF32): a dropout mask or a gradient
/// term gone wrong shows at the 1e-2 level, far above this.
pub const F32_TOL: f64 = 1e-4;

/// One compared configuration.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Case {
    /// e.g. `bf16 nf4 ckpt`.
    pub name: String,
    /// ||logits - ref|| / ||ref||.
    pub logits_rel: f64,
    /// |loss - ref loss|.
    pub loss_abs: f64,
    /// ||grads - ref grads|| / ||ref grads|| over all adapter A and B.
    pub grad_rel: f64,
    /// ||logits - CPU f32 logits|| / ||CPU f32 logits|| (information: the cost of the
    /// precision itself).
    pub logits_rel_f32: f64,
    /// Both under their tolerances.
    pub pass: bool,
}

fn rel(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    let a = a
        .to_dtype(DType::F64)?
        .to_device(&Device::Cpu)?
        .flatten_all()?;
    let b = b
        .to_dtype(DType::F64)?
        .to_device(&Device::Cpu)?
        .flatten_all()?;
    let num = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let den = b.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok(num / den.max(1e-30))
}

struct Outputs {
    logits: Tensor,
    loss: f64,
    grads: Tensor,
}

fn evaluate(
    model: &Model,
    ids: &[u32],
    targets: &[i64],
    b: usize,
    t: usize,
) -> candle_core::Result<Outputs> {
    let logits = model.logits(ids, b, t)?;
    let loss = model.loss(ids, targets, b, t, true)?;
    let grads = model.backward(&loss)?;
    let mut flat = Vec::new();
    for ad in model.adapters() {
        for v in [&ad.a, &ad.b] {
            let g = grads
                .get(v.as_tensor())
                .ok_or_else(|| candle_core::Error::Msg(format!("{}: no gradient", ad.name)))?;
            flat.push(
                g.to_dtype(DType::F64)?
                    .to_device(&Device::Cpu)?
                    .flatten_all()?,
            );
        }
    }
    Ok(Outputs {
        logits,
        loss: loss.to_dtype(DType::F64)?.to_scalar::<f64>()?,
        grads: Tensor::cat(&flat, 0)?,
    })
}

/// Run the comparison on `device` (`cpu` compares the CPU half-precision paths).
///
/// Errors: a bad device string, device or I/O errors.
pub fn run(device: &str) -> Result<Vec<Case>, EngineError> {
    let dev = parse_device(device)?;
    let src = ModelSource::resolve("tiny")?;
    let cfg = src.config;
    // Dropout on, so the CUDA dropout kernel is compared too (same seeds, same masks).
    let lora = LoraConfig {
        dropout: 0.05,
        ..LoraConfig::default()
    };
    let (b, t) = (2usize, 96usize);
    let vocab = cfg.vocab_size as u32;
    let ids: Vec<u32> = (0..b * t).map(|i| ((i * 37 + 11) as u32) % vocab).collect();
    let targets: Vec<i64> = (0..b * t)
        .map(|i| {
            if (i + 1) % t == 0 {
                -100
            } else {
                ids[i + 1] as i64
            }
        })
        .collect();
    let dir = std::env::temp_dir().join(format!("lorascope-selftest-{}", std::process::id()));
    let io = |e: anyhow::Error| EngineError::Io {
        path: dir.display().to_string(),
        source: std::io::Error::other(e.to_string()),
    };
    let base = Model::new(
        &cfg,
        &lora,
        &WeightSource::Synthetic { seed: 7 },
        DType::F32,
        &Device::Cpu,
        7,
    )?;
    save_checkpoint(&dir, &base.base_tensors().ctx("reading weights")?, 1).map_err(io)?;
    drop(base);
    let weights = WeightSource::open_dir(&dir)?
        .ok_or_else(|| EngineError::Invalid("selftest: checkpoint not written".into()))?;
    let build =
        |quant: Quant, dtype: DType, on: &Device, ckpt: bool| -> Result<Model, EngineError> {
            let mut m = Model::new_quantized(&cfg, &lora, &weights, dtype, on, 7, quant)?;
            m.set_grad_checkpointing(ckpt);
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(99);
            for ad in m.adapters() {
                let shape = ad.b.as_tensor().dims().to_vec();
                let n: usize = shape.iter().product();
                let v: Vec<f32> = (0..n).map(|_| rng.random_range(-0.05f32..0.05)).collect();
                ad.b.set(&Tensor::from_vec(v, shape, on).ctx("setting B")?)
                    .ctx("setting B")?;
            }
            Ok(m)
        };
    let mut cases = Vec::new();
    for quant in [Quant::None, Quant::Nf4] {
        let f32_ref = build(quant, DType::F32, &Device::Cpu, false)?;
        let r32 = evaluate(&f32_ref, &ids, &targets, b, t).ctx("CPU f32 reference")?;
        drop(f32_ref);
        for (dtype, ckpt) in [
            (DType::F32, true),
            (DType::F16, false),
            (DType::F16, true),
            (DType::BF16, false),
            (DType::BF16, true),
        ] {
            let reference = build(quant, dtype, &Device::Cpu, false)?;
            let r = evaluate(&reference, &ids, &targets, b, t).ctx("CPU reference")?;
            drop(reference);
            let m = build(quant, dtype, &dev, ckpt)?;
            let o = evaluate(&m, &ids, &targets, b, t).ctx("device run")?;
            let logits_rel_f32 = rel(&o.logits, &r32.logits).ctx("comparing logits")?;
            let logits_rel = rel(&o.logits, &r.logits).ctx("comparing logits")?;
            let grad_rel = rel(&o.grads, &r.grads).ctx("comparing gradients")?;
            cases.push(Case {
                name: format!(
                    "{} {}{}",
                    match dtype {
                        DType::F32 => "fp32",
                        DType::F16 => "fp16",
                        _ => "bf16",
                    },
                    if quant == Quant::Nf4 { "nf4" } else { "dense" },
                    if ckpt { " ckpt" } else { "" }
                ),
                logits_rel,
                loss_abs: (o.loss - r.loss).abs(),
                grad_rel,
                logits_rel_f32,
                pass: match dtype {
                    DType::F32 => logits_rel < F32_TOL && grad_rel < F32_TOL,
                    DType::BF16 => logits_rel < LOGITS_TOL_BF16 && grad_rel < GRAD_TOL,
                    _ => logits_rel < LOGITS_TOL && grad_rel < GRAD_TOL,
                },
            });
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(cases)
}

/// A view of a tensor (the row-copy cases of [`elementwise_check`]).
type ViewFn = fn(&Tensor) -> candle_core::Result<Tensor>;

/// Largest error accepted between the device's elementwise kernels and the CPU loops in f32,
/// relative to the largest reference value (the CPU computes in f64 and rounds once; the
/// kernels round in f32, and SwiGLU's gate gradient `1 + x (1 - s)` cancels near x = -1.28, so
/// an elementwise relative error would measure the cancellation, not the kernel).
pub const ELEMENTWISE_TOL: f64 = 1e-5;

/// Synthetic weights as `weights.rs` draws them on `dev` (on CUDA the project's kernel,
/// straight into the compute dtype): one (1024, 4096) bf16 weight of the tiny preset
/// (`initializer_range` 0.06). Returns `(|mean| / std0, |std / std0 - 1|)`, which for 4 Mi
/// normal draws should be about 5e-4 or less each.
///
/// Errors: the draw failing.
pub fn synthetic_weights_check(dev: &Device) -> Result<(f64, f64), EngineError> {
    let cfg = ModelSource::resolve("tiny")?.config;
    let w = crate::engine::weights::synth(
        "model.layers.0.mlp.down_proj.weight",
        &[1024, 4096],
        &cfg,
        7,
        DType::BF16,
        dev,
    )?;
    let v: Vec<f32> = w
        .to_dtype(DType::F32)
        .and_then(|t| t.to_device(&Device::Cpu))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .ctx("reading the synthetic weight")?;
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    let s0 = cfg.initializer_range;
    Ok(((mean / s0).abs(), (var.sqrt() / s0 - 1.0).abs()))
}

/// The fused LoRA `d(x) A^T` kernel against the dropout kernel and cuBLAS (see
/// `lora::cuda::fused_lora_a_check`): one `(name, max relative error)` per case, none on the
/// CPU or on a GPU older than compute capability 8.0 (checked whether or not
/// `LORASCOPE_FUSED_LORA_A=1` turns the kernel on for training). Each case is within [`LORA_A_TOL`] when right: the kernels sum
/// the same products in f32 in another order, and each rounds its output to the 16-bit dtype.
///
/// Errors: the kernel declining a case it should take, device errors.
pub fn lora_a_check(dev: &Device) -> candle_core::Result<Vec<(String, f64)>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        return crate::engine::lora::cuda::fused_lora_a_check(d);
    }
    let _ = dev;
    Ok(Vec::new())
}

/// Tolerance of [`lora_a_check`]: two bf16 rounding steps (2^-8 each) of the largest output,
/// relative to it.
pub const LORA_A_TOL: f64 = 8e-3;

/// The elementwise and row kernels (SwiGLU forward and backward, also written over its
/// inputs, the LoRA dropout, RMSNorm
/// forward and backward, RoPE and its adjoint, the strided row copy of attention's views) on `dev` against the CPU, in f32, over lengths that take the 8-wide kernels with and without a tail
/// (`8k`, `8k + 5`) and a view at an odd offset (the 1-wide kernels). Returns one
/// `(name, max |a - b| / max |b|)` per case; an element zero in one and not the other (a
/// dropout mask that differs) counts as error 1.
///
/// Errors: device copies or the ops failing.
pub fn elementwise_check(dev: &Device) -> candle_core::Result<Vec<(String, f64)>> {
    use crate::engine::lora::HashDropout;
    use crate::engine::ops::{swiglu, swiglu_backward, swiglu_backward_owned};
    let cpu = Device::Cpu;
    let err = |a: &Tensor, b: &Tensor| -> candle_core::Result<f64> {
        let a: Vec<f32> = a.to_device(&cpu)?.flatten_all()?.to_vec1()?;
        let b: Vec<f32> = b.to_device(&cpu)?.flatten_all()?.to_vec1()?;
        let scale = b
            .iter()
            .fold(0f64, |m, y| m.max(y.abs() as f64))
            .max(f64::MIN_POSITIVE);
        Ok(a.iter().zip(&b).fold(0f64, |m, (x, y)| {
            let mask = (*x == 0.0) != (*y == 0.0);
            let e = if mask {
                1.0
            } else {
                (x - y).abs() as f64 / scale
            };
            m.max(e)
        }))
    };
    let mut out = Vec::new();
    for (n, offset) in [(8 * 4099, 0), (8 * 4099 + 5, 0), (8 * 777 + 5, 3)] {
        let t = |seed: u64| -> candle_core::Result<Tensor> {
            let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let v: Vec<f32> = (0..n + offset).map(|_| r.random_range(-4.0..4.0)).collect();
            Tensor::from_vec(v, n + offset, &cpu)?.narrow(0, offset, n)
        };
        let (g, u, dy) = (t(1)?, t(2)?, t(3)?);
        let on = |x: &Tensor| x.to_device(dev);
        let tag = format!("n {n}, offset {offset}");
        let (gd, ud, dyd) = (on(&g)?, on(&u)?, on(&dy)?);
        out.push((
            format!("swiglu fwd, {tag}"),
            err(
                &swiglu(&gd, &ud)?,
                &swiglu(&g.contiguous()?, &u.contiguous()?)?,
            )?,
        ));
        let (a, b) = swiglu_backward(&gd, &ud, &dyd)?;
        let (ra, rb) = swiglu_backward(&g.contiguous()?, &u.contiguous()?, &dy.contiguous()?)?;
        out.push((
            format!("swiglu bwd, {tag}"),
            err(&a, &ra)?.max(err(&b, &rb)?),
        ));
        let d = HashDropout { p: 0.3, seed: 99 };
        out.push((
            format!("lora dropout, {tag}"),
            err(&gd.apply_op1_no_bwd(&d)?, &g.apply_op1_no_bwd(&d)?)?,
        ));
        // Last: the in-place backward writes over gd and ud.
        let (a, b) = swiglu_backward_owned(gd, ud, &dyd)?;
        out.push((
            format!("swiglu bwd in place, {tag}"),
            err(&a, &ra)?.max(err(&b, &rb)?),
        ));
    }
    // RMSNorm (forward and, through a Var, backward) over rows of 64 (8 wide) and 60 (1 wide);
    // RoPE and its adjoint with head sizes 32 (8 wide) and 24 (1 wide).
    for (rows, n) in [(37, 64), (5, 60)] {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(n as u64);
        let mut v = |len: usize| -> candle_core::Result<Tensor> {
            let v: Vec<f32> = (0..len).map(|_| r.random_range(-2.0..2.0)).collect();
            Tensor::from_vec(v, len, &cpu)
        };
        let (x, w, g) = (
            v(rows * n)?.reshape((rows, n))?,
            v(n)?,
            v(rows * n)?.reshape((rows, n))?,
        );
        let run = |d: &Device| -> candle_core::Result<(Tensor, Tensor)> {
            let xv = candle_core::Var::from_tensor(&x.to_device(d)?)?;
            let y =
                crate::engine::ops::RmsNorm::new(w.to_device(d)?, 1e-6).forward(xv.as_tensor())?;
            let grads = (&y * &g.to_device(d)?)?.sum_all()?.backward()?;
            let dx = grads
                .get(xv.as_tensor())
                .cloned()
                .ok_or_else(|| candle_core::Error::Msg("rms norm: no gradient".into()))?;
            Ok((y, dx))
        };
        let ((y, dx), (ry, rdx)) = (run(dev)?, run(&cpu)?);
        out.push((
            format!("rms norm, rows of {n}"),
            err(&y, &ry)?.max(err(&dx, &rdx)?),
        ));
    }
    for d in [32, 24] {
        let (b, h, t) = (2, 3, 20);
        let x = Tensor::randn(0f32, 1.0, (b, h, t, d), &cpu)?;
        let inv: Vec<f32> = (0..d / 2)
            .map(|i| 10_000f32.powf(-2.0 * i as f32 / d as f32))
            .collect();
        let (cos, sin) = crate::engine::ops::rope_tables(t, &inv, 1.0, &cpu)?;
        let on = |a: &Tensor| a.to_device(dev);
        let y = crate::engine::ops::apply_rope(&on(&x)?, &on(&cos)?, &on(&sin)?)?;
        let ry = crate::engine::ops::apply_rope(&x, &cos, &sin)?;
        let a = crate::engine::ops::rope_backward(&on(&x)?, &on(&cos)?, &on(&sin)?)?;
        let ra = crate::engine::ops::rope_backward(&x, &cos, &sin)?;
        out.push((
            format!("rope and adjoint, head size {d}"),
            err(&y, &ry)?.max(err(&a, &ra)?),
        ));
    }
    // Views attention copies: heads (b, t, h, d) -> (b, h, t, d), the reverse, a query chunk;
    // and a head size of 12 (not a multiple of 8: candle's copy).
    for (b, t, h, d) in [(2, 48, 3, 16), (1, 40, 2, 12)] {
        let x = Tensor::arange(0f32, (b * t * h * d) as f32, &cpu)?.reshape((b, t, h, d))?;
        let xd = x.to_device(dev)?;
        let views: [(&str, ViewFn); 3] = [
            ("heads", |x| x.transpose(1, 2)),
            ("flat", |x| x.transpose(1, 2)?.contiguous()?.transpose(1, 2)),
            ("query chunk", |x| {
                x.transpose(1, 2)?.contiguous()?.narrow(2, 8, 16)
            }),
        ];
        for (name, view) in views {
            let got = crate::engine::ops::row_copy(&view(&xd)?)?;
            let want = view(&x)?.contiguous()?;
            out.push((format!("row copy {name}, d {d}"), err(&got, &want)?));
        }
    }
    Ok(out)
}
