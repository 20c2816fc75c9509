//! The training loop: [`TrainOptions`] are validated and turned into a model, optimizer and
//! batch source ([`prepare`]), then [`train`] runs `steps` optimizer steps, reporting a
//! header, a [`StepRecord`] per step and a [`Summary`] at the end (`events.rs`).

mod events;
mod health;

pub use events::{Header, TrainEvent, peak_rss_bytes, rss_bytes};

use super::config::{ModelConfig, ModelSource};
use super::cuda::vram::VramReservation;
use super::data::{Batcher, Packing, Tokenizer, load_dataset};
use super::lora::LoraConfig;
use super::memory::{self, MemoryPoint, host};
use super::model::{Model, ParamCounts};
use super::optim::memory_report;
use super::optim::{AdamWConfig, AnyOptimizer, Schedule, lr_at};
use super::profiler;
use super::scaler::{LossScaler, LossScalerConfig};
use super::weights::WeightSource;
use super::{CandleContext, EngineError};
use crate::spec::wire::{Phase, PhaseRecord, StepRecord, Summary};
use crate::spec::{DataFormat, DeviceKind, Optimizer, Precision, Quant};
use candle_core::{DType, Device};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

/// The candle dtype of the compute path at `precision`.
pub fn compute_dtype(precision: Precision) -> DType {
    match precision {
        Precision::Fp32 => DType::F32,
        Precision::Fp16 => DType::F16,
        Precision::Bf16 => DType::BF16,
    }
}

/// Everything a training run needs.
#[derive(Debug, Clone, Serialize)]
pub struct TrainOptions {
    /// `--model`: preset name or HF model directory.
    pub model: String,
    /// `--data`: dataset path, or `sample` for the bundled sample.
    pub data: String,
    /// Dataset format.
    #[serde(skip)]
    pub format: DataFormat,
    /// Pack examples into full rows (true) or pad one example per row.
    pub packing: bool,
    /// Sequences per step.
    pub batch_size: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Optimizer steps.
    pub steps: usize,
    /// Linear warm-up steps (also the steps excluded from throughput by the sweep).
    pub warmup_steps: usize,
    /// LR schedule after warm-up.
    pub schedule: Schedule,
    /// LoRA settings.
    pub lora: LoraConfig,
    /// AdamW settings (shared by every optimizer kind).
    pub adamw: AdamWConfig,
    /// Optimizer: AdamW with f32 or 8-bit block-wise moments.
    pub optimizer: Optimizer,
    /// Clip the global gradient norm to this (HF Trainer's `max_grad_norm`); 0 disables.
    pub max_grad_norm: f64,
    /// Seed for data order, adapter init, dropout and synthetic weights.
    pub seed: u64,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Compute precision.
    pub precision: Precision,
    /// Base-weight quantisation of the decoder projections.
    pub quant: Quant,
    /// Recompute each decoder layer in backward instead of keeping its activations.
    pub grad_checkpointing: bool,
    /// Dynamic loss scaling: `None` uses GradScaler's defaults under fp16 and no scaling
    /// otherwise; `Some` forces scaling with these settings at any precision.
    pub loss_scaling: Option<LossScalerConfig>,
    /// Save the trained adapters (PEFT format) here at the end.
    pub save_adapter: Option<PathBuf>,
    /// Emulate a card with this many bytes (CUDA only; see [`super::cuda::vram`]).
    pub vram_limit: Option<u64>,
}

/// Parse `cpu` / `cuda` / `cuda:N`.
///
/// Errors: another string, or `cuda` in a build without the `cuda` feature.
pub fn parse_device(s: &str) -> Result<Device, EngineError> {
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match s.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                EngineError::Invalid(format!("--device `{s}`: expected cpu or cuda:N"))
            })?,
        None => {
            return Err(EngineError::Invalid(format!(
                "--device `{s}`: expected cpu or cuda:N"
            )));
        }
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(EngineError::Invalid(format!(
            "--device {s}: this lorascope was built without CUDA; rebuild with `cargo build --release --features cuda`"
        )));
    }
    let dev = Device::new_cuda(ordinal).map_err(|e| {
        EngineError::Invalid(format!(
            "--device {s}: cannot open the GPU ({}); check the driver and CUDA_VISIBLE_DEVICES",
            e.to_string().lines().next().unwrap_or("")
        ))
    })?;
    profiler::configure_device(&dev).ctx("configuring the CUDA memory pool")?;
    Ok(dev)
}

/// The memory model's view of a run of `opts` on a model of `cfg`; `cuda_context` is the
/// measured context of the GPU, if known; `synthetic_weights` whether the weights are drawn
/// at random (no checkpoint).
pub fn memory_point<'a>(
    opts: &'a TrainOptions,
    cfg: &'a ModelConfig,
    cuda_context: Option<u64>,
    synthetic_weights: bool,
) -> MemoryPoint<'a> {
    MemoryPoint {
        config: cfg,
        lora_rank: opts.lora.rank,
        lora_targets: &opts.lora.targets,
        quant: opts.quant,
        precision: opts.precision,
        batch_size: opts.batch_size,
        seq_len: opts.seq_len,
        optimizer: opts.optimizer,
        grad_checkpointing: opts.grad_checkpointing,
        device: if opts.device == "cpu" {
            DeviceKind::Cpu
        } else {
            DeviceKind::Cuda
        },
        cuda_context,
        synthetic_weights,
    }
}

/// A CPU run: refuse before allocating when the predicted peak RSS is above the host memory
/// this process may use ([`host::available`]). GPU runs are checked against the card by the
/// orchestrator, which knows the measured context and `run.verify_oom`.
///
/// Errors: [`EngineError::InsufficientMemory`], one line.
fn check_host_memory(
    opts: &TrainOptions,
    cfg: &ModelConfig,
    synthetic_weights: bool,
) -> Result<(), EngineError> {
    if opts.device != "cpu" {
        return Ok(());
    }
    let Some(avail) = host::available() else {
        return Ok(());
    };
    let est = memory::estimate(&memory_point(opts, cfg, None, synthetic_weights));
    host::check_fits(&est, &avail, opts.precision, opts.quant)
}

/// Everything built before the first step.
pub struct Prepared {
    /// The model.
    pub model: Model,
    /// The optimizer over the model's adapters.
    pub optimizer: AnyOptimizer,
    /// The batch source.
    pub batcher: Batcher,
    /// The run header.
    pub header: Header,
    /// The `--vram-limit` reservation, held until this is dropped.
    pub vram: Option<VramReservation>,
}

/// Validate options, load data and tokenizer, build the model.
///
/// Errors: bad options, data or weights ([`EngineError`]), each one line.
pub fn prepare(opts: &TrainOptions) -> Result<Prepared, EngineError> {
    prepare_reporting(opts, &mut |_| {})
}

/// [`prepare`], telling `phase` when the weights start to load ([`Phase::LoadingWeights`],
/// or [`Phase::Quantising`] for NF4: the projections are quantised as they load).
///
/// Errors: as [`prepare`].
pub fn prepare_reporting(
    opts: &TrainOptions,
    phase: &mut dyn FnMut(Phase),
) -> Result<Prepared, EngineError> {
    let src = ModelSource::resolve(&opts.model)?;
    let cfg = &src.config;
    if opts.batch_size == 0 || opts.seq_len < 2 || opts.steps == 0 {
        return Err(EngineError::Invalid(format!(
            "--batch-size {} / --seq-len {} / --steps {}: need batch >= 1, seq >= 2, steps >= 1",
            opts.batch_size, opts.seq_len, opts.steps
        )));
    }
    if opts
        .batch_size
        .checked_mul(opts.seq_len)
        .is_none_or(|n| n > 1 << 24)
    {
        return Err(EngineError::Invalid(format!(
            "--batch-size {} x --seq-len {} is above 16 Mi tokens per step; use smaller values",
            opts.batch_size, opts.seq_len
        )));
    }
    if opts.seq_len > cfg.max_position_embeddings {
        return Err(EngineError::Invalid(format!(
            "--seq-len {} is above the model's max_position_embeddings ({}) in {}",
            opts.seq_len, cfg.max_position_embeddings, src.name
        )));
    }
    // A directory without safetensors is synthetic too (found when the weights are opened);
    // this only matters on CUDA, which this check skips.
    check_host_memory(opts, cfg, src.dir.is_none())?;
    let device = parse_device(&opts.device)?;
    if opts.precision == Precision::Bf16
        && let Some((major, minor)) = profiler::compute_capability(&device)
        && major < 8
    {
        return Err(EngineError::Invalid(format!(
            "--precision bf16: {} (compute capability {major}.{minor}) has no bf16 support (needs 8.0, Ampere or newer); use --precision fp16",
            opts.device
        )));
    }
    // Before anything is allocated on the device: what is left is what the smaller card has.
    let vram = opts
        .vram_limit
        .map(|limit| super::cuda::vram::reserve(&device, limit))
        .transpose()?;
    let tokenizer = Tokenizer::from_model_dir(src.dir.as_deref())?;
    if tokenizer.min_vocab_size() > cfg.vocab_size {
        return Err(EngineError::Invalid(format!(
            "tokenizer {} needs a vocabulary of {} but {} has vocab_size {}",
            tokenizer.name(),
            tokenizer.min_vocab_size(),
            src.name,
            cfg.vocab_size
        )));
    }
    let records = load_dataset(&opts.data, opts.format)?;
    let packing = if opts.packing {
        Packing::Packed
    } else {
        Packing::Padded
    };
    let batcher = Batcher::new(
        &records,
        &tokenizer,
        opts.seq_len,
        opts.batch_size,
        packing,
        opts.seed,
    )?;
    phase(match opts.quant {
        Quant::Nf4 => Phase::Quantising,
        Quant::None => Phase::LoadingWeights,
    });
    let weights = match src.dir.as_deref() {
        Some(dir) => WeightSource::open_dir(dir)?,
        None => None,
    }
    .unwrap_or(WeightSource::Synthetic { seed: opts.seed });
    let dtype = compute_dtype(opts.precision);
    let mut model = Model::new_quantized(
        cfg, &opts.lora, &weights, dtype, &device, opts.seed, opts.quant,
    )?;
    model.set_grad_checkpointing(opts.grad_checkpointing);
    let counts: ParamCounts = model.param_counts();
    let optimizer = AnyOptimizer::new(opts.optimizer, model.trainable_vars(), opts.adamw)
        .ctx("creating the optimizer")?;
    let header = Header {
        model: src.name.clone(),
        synthetic_weights: weights.is_synthetic(),
        params_total: counts.total as u64,
        params_trainable: counts.trainable as u64,
        weight_bytes: model.base_weight_bytes() as u64,
        quant: opts.quant,
        generic_ops: if device.is_cuda() {
            model
                .generic_fallbacks()
                .into_iter()
                .map(String::from)
                .collect()
        } else {
            Vec::new()
        },
        adapter_and_optimizer_bytes: (counts.trainable * 4 + optimizer.state_bytes()) as u64,
        optimizer_state_bytes: optimizer.state_bytes() as u64,
        device: opts.device.clone(),
        precision: opts.precision,
        tokenizer: tokenizer.name(),
        examples: batcher.num_examples() as u64,
        memory: memory_report(
            optimizer.state_bytes_split(),
            opts.optimizer,
            &device,
            vram.as_ref(),
        ),
        options: opts.clone(),
    };
    Ok(Prepared {
        model,
        optimizer,
        batcher,
        header,
        vram,
    })
}

/// Test-only: with `LORASCOPE_TEST_ONLY_LEAK_STEPS=1` every step's loss tensor, and through
/// its graph the step's activations, is kept until the run ends: a real leak, for testing that
/// sweeps flag memory that rises over the timed window. Never set it for a measurement.
struct TestOnlyLeak(Option<Vec<candle_core::Tensor>>);

impl TestOnlyLeak {
    fn from_env() -> Self {
        let on = std::env::var_os("LORASCOPE_TEST_ONLY_LEAK_STEPS").is_some_and(|v| v == "1");
        if on {
            eprintln!(
                "LORASCOPE_TEST_ONLY_LEAK_STEPS=1: keeping every step's graph (a deliberate leak for tests)"
            );
        }
        Self(on.then(Vec::new))
    }

    fn keep(&mut self, loss: &candle_core::Tensor) {
        if let Some(v) = &mut self.0 {
            v.push(loss.clone());
        }
    }
}

/// Test-only: with `LORASCOPE_TEST_ONLY_OOM_STEP=N` the first attempt of step N fails with an
/// out-of-memory after its forward pass, for testing the step's retry. Never set it for a
/// measurement.
fn test_only_oom_step() -> Option<usize> {
    let step = std::env::var("LORASCOPE_TEST_ONLY_OOM_STEP")
        .ok()?
        .parse()
        .ok()?;
    eprintln!(
        "LORASCOPE_TEST_ONLY_OOM_STEP={step}: step {step} fails once with out of memory (for tests)"
    );
    Some(step)
}

/// The phase of step `step` (1-based) of a run with `warmup_steps` warm-up steps: the first
/// step on a CUDA device is where its kernels compile.
fn step_phase(step: usize, warmup_steps: usize, cuda: bool) -> Phase {
    if step == 1 && cuda {
        Phase::CompilingKernels
    } else if step <= warmup_steps {
        Phase::Warmup
    } else {
        Phase::Timed
    }
}

/// Run training, calling `emit` for each phase change, the header, every step and the
/// summary (in the order of [`crate::spec::wire`]).
///
/// Errors: anything from [`prepare`], out of memory during a step, a non-finite loss or a
/// dead run ([`EngineError::Diverged`]).
pub fn train(
    opts: &TrainOptions,
    mut emit: impl FnMut(&TrainEvent),
) -> Result<Summary, EngineError> {
    let t0 = Instant::now();
    let mut last_phase = None;
    let mut phase_to = |emit: &mut dyn FnMut(&TrainEvent), phase: Phase| {
        if last_phase != Some(phase) {
            last_phase = Some(phase);
            emit(&TrainEvent::Phase(PhaseRecord {
                phase,
                t_s: t0.elapsed().as_secs_f64(),
            }));
        }
    };
    let Prepared {
        model,
        optimizer: mut opt,
        mut batcher,
        header,
        vram: _vram_reservation,
    } = prepare_reporting(opts, &mut |p| phase_to(&mut emit, p))?;
    let (header_weight_bytes, header_adapter_bytes) =
        (header.weight_bytes, header.adapter_and_optimizer_bytes);
    let memory = header.memory.clone();
    emit(&TrainEvent::Header(Box::new(header)));
    let device = model.device().clone();
    let (b, t) = (opts.batch_size, opts.seq_len);
    let mut totals = events::Totals::new(opts.warmup_steps);
    let mut scaler = match (opts.loss_scaling, opts.precision) {
        (Some(cfg), _) => Some(LossScaler::new(cfg)),
        (None, Precision::Fp16) => Some(LossScaler::new(LossScalerConfig::default())),
        (None, _) => None,
    };
    let mut health = health::Health::new(model.config().vocab_size, opts.precision);
    device.synchronize().ctx("synchronising the device")?;
    profiler::trim_pool(&device);
    let resident = profiler::pool_usage(&device).map(|u| u.used);
    profiler::reset_pool_high(&device);
    let mut leaked = TestOnlyLeak::from_env();
    let inject_oom = test_only_oom_step();
    let mut oom_retries = 0u64;
    for step in 1..=opts.steps {
        phase_to(
            &mut emit,
            step_phase(step, opts.warmup_steps, device.is_cuda()),
        );
        let batch = batcher.next_batch();
        let start = Instant::now();
        let lr = lr_at(
            opts.adamw.lr,
            step,
            opts.warmup_steps,
            opts.steps,
            opts.schedule,
        );
        profiler::set_active(step > opts.warmup_steps.min(opts.steps - 1));
        let loss_scale = scaler.as_ref().map(|s| s.scale());
        // Forward, backward and the gradient norm change no state but the dropout generator
        // (restored for the retry), so an out-of-memory there can be retried: once per step,
        // after the step's tensors are freed and the pool's cached free blocks are handed back
        // (PyTorch's caching allocator frees its cache and retries a failed allocation the
        // same way). At the edge of a card the pool's cached, fragmented blocks, not the bytes
        // in use, are what runs out; after the first retry the pool releases its free blocks
        // at every sync for the rest of the run.
        let mut attempt = |inject: bool| -> Result<_, EngineError> {
            let loss = profiler::section("step", "forward", &device, || {
                model.loss(&batch.input_ids, &batch.targets, b, t, true)
            })
            .ctx("forward pass")?;
            profiler::trace("after forward", &device);
            leaked.keep(&loss);
            if inject {
                return Err(EngineError::OutOfMemory {
                    what: "backward pass".into(),
                    detail: "injected by LORASCOPE_TEST_ONLY_OOM_STEP".into(),
                });
            }
            let grads = profiler::section("step", "backward", &device, || match loss_scale {
                Some(s) => model.backward(&loss.affine(s, 0.0)?),
                None => model.backward(&loss),
            })
            .ctx("backward pass")?;
            profiler::trace("after backward", &device);
            let loss_v = profiler::section("step", "loss-readback", &device, || {
                loss.to_dtype(DType::F64)?.to_scalar::<f64>()
            })
            .ctx("reading the loss")?;
            // Unscale before measuring, so that only a real inf/NaN gradient reads as overflow.
            let unscale = loss_scale.map(|s| 1.0 / s).unwrap_or(1.0);
            let grad_norm = profiler::section("step", "grad-norm", &device, || {
                opt.grad_norm_scaled(&grads, unscale)
            })
            .ctx("gradient norm")?;
            Ok((loss_v, grads, grad_norm, unscale))
        };
        let masks = model.dropout_snapshot();
        let (loss_v, grads, grad_norm, unscale) = match attempt(inject_oom == Some(step)) {
            Err(EngineError::OutOfMemory { .. }) => {
                // The retry draws the same dropout masks as the failed attempt.
                if let Some(m) = masks {
                    model.restore_dropout(m);
                }
                eprintln!(
                    "step {step}: out of memory; freeing the pool's cached blocks and running the step again"
                );
                device.synchronize().ctx("synchronising the device")?;
                profiler::trim_pool(&device);
                if oom_retries == 0 {
                    profiler::release_pool_at_every_sync(&device);
                }
                oom_retries += 1;
                attempt(false)?
            }
            r => r?,
        };
        if !loss_v.is_finite() {
            return Err(health.non_finite_loss(step, loss_v));
        }
        let skipped = match scaler.as_mut() {
            Some(s) => s.update(grad_norm.is_finite()),
            None => false,
        };
        health.check(step, loss_v, grad_norm, batch.target_tokens, skipped)?;
        if !skipped {
            let clip = if opts.max_grad_norm > 0.0 && grad_norm > opts.max_grad_norm {
                opts.max_grad_norm / (grad_norm + 1e-6)
            } else {
                1.0
            };
            profiler::section("step", "optimizer", &device, || {
                opt.step(&grads, lr, clip * unscale)
            })
            .ctx("optimizer step")?;
        }
        drop(grads);
        profiler::section("step", "final-sync", &device, || device.synchronize())
            .ctx("synchronising the device")?;
        let dt = start.elapsed().as_secs_f64();
        totals.add(step, loss_v, batch.real_tokens, dt, skipped);
        emit(&TrainEvent::Step(StepRecord {
            step: step as u64,
            tokens: batch.real_tokens as u64,
            padded_tokens: Some(batch.padded_tokens as u64),
            target_tokens: Some(batch.target_tokens as u64),
            step_seconds: dt,
            loss: Some(loss_v),
            lr: Some(lr),
            grad_norm: Some(grad_norm),
            loss_scale,
            skipped,
            mem_bytes: events::step_mem_bytes(&device),
            t: 0.0,
        }));
    }
    let device_memory = events::device_memory(
        resident,
        profiler::pool_usage(&device),
        profiler::max_seen(),
        header_weight_bytes,
        header_adapter_bytes,
    );
    let profile = profiler::report();
    if !profile.is_empty() {
        eprint!("{profile}");
    }
    let adapter_dir = match &opts.save_adapter {
        Some(dir) => {
            // A preset's adapter names the Hub model whose config the preset is, so PEFT can
            // load it; a directory is named as given.
            let base = super::config::hub_model(&opts.model).unwrap_or(&opts.model);
            super::lora::save_peft(dir, &model.adapters(), &opts.lora, base).map_err(|e| {
                EngineError::Io {
                    path: dir.display().to_string(),
                    source: std::io::Error::other(e.to_string()),
                }
            })?;
            Some(dir.display().to_string())
        }
        None => None,
    };
    let mut summary = totals.summary(opts.steps, memory, device_memory, adapter_dir);
    summary.oom_retries = oom_retries;
    emit(&TrainEvent::Summary(summary.clone()));
    Ok(summary)
}
