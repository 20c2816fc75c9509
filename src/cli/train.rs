//! `lorascope train`: one training run as a command-line program. Under `--json`, stdout carries
//! only JSON lines (one header, one object per step, one summary) for the orchestrator; human
//! progress goes to stderr otherwise. Exit status: 0 ok, 3 out of memory, 1 any other failure,
//! with a one-line cause on stderr.

use crate::engine::EngineError;
use crate::engine::lora::LoraConfig;
use crate::engine::optim::{AdamWConfig, Schedule};
use crate::engine::train::{TrainEvent, TrainOptions, train};
use crate::spec::wire::{EXIT_FAILURE, EXIT_OK, EXIT_OOM};
use crate::spec::{DataFormat, LoraModule, Optimizer, Precision, Quant, UnknownName};
use clap::builder::PossibleValue;
use std::io::Write;
use std::path::PathBuf;

/// Arguments of `lorascope train`.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// Model: a preset (tiny, qwen2.5-1.5b) or a Hugging Face model directory (config.json,
    /// optional *.safetensors and tokenizer.json).
    #[arg(long, default_value = "tiny")]
    pub model: String,
    /// Dataset file (.json/.jsonl Alpaca, chat {"messages"} or ShareGPT {"conversations"},
    /// .jsonl {"text"}, .txt), or `sample` for the bundled sample. Chat data needs a model
    /// directory with tokenizer.json and a chat template.
    #[arg(long, default_value = "sample")]
    pub data: String,
    /// Dataset format.
    #[arg(long, value_enum, default_value = "auto")]
    pub format: DataFormat,
    /// One example per row, padded, instead of packing examples into full rows.
    #[arg(long)]
    pub no_packing: bool,
    /// Sequences per optimizer step.
    #[arg(long, default_value_t = 2)]
    pub batch_size: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    /// Optimizer steps.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Linear learning-rate warm-up steps (excluded from tokens/s).
    #[arg(long, default_value_t = 2)]
    pub warmup_steps: usize,
    /// Schedule after warm-up.
    #[arg(long, value_enum, default_value = "constant")]
    pub schedule: Schedule,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Clip the global gradient norm (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// LoRA rank r.
    #[arg(long, default_value_t = 16)]
    pub lora_rank: usize,
    /// LoRA alpha (update scaled by alpha/r).
    #[arg(long, default_value_t = 32.0)]
    pub lora_alpha: f64,
    /// LoRA dropout on the adapter input.
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f64,
    /// Projections with adapters, comma-separated: q,k,v,o,gate,up,down, PEFT module names
    /// (q_proj, ..., qkv_proj, gate_up_proj) or all-linear.
    #[arg(long, default_value = "q,k,v,o,gate,up,down")]
    pub lora_targets: String,
    /// Seed for data order, adapter init, dropout and synthetic weights.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute precision.
    #[arg(long, value_enum, default_value = "fp32")]
    pub precision: Precision,
    /// Base-weight quantisation of the decoder projections: none or nf4 (QLoRA: 4-bit
    /// NormalFloat, block 64, double-quantised statistics).
    #[arg(long, default_value = "none")]
    pub quant: String,
    /// Optimizer: adamw (f32 moments), adamw8bit (bitsandbytes block-wise 8-bit moments), or
    /// paged_adamw / paged_adamw8bit (the same, with the state of tensors of at least 100,000
    /// elements in CUDA unified memory; on CPU the same as unpaged).
    #[arg(long, default_value = "adamw")]
    pub optimizer: String,
    /// Keep only each decoder layer's input and recompute the layer in backward.
    #[arg(long)]
    pub grad_checkpointing: bool,
    /// Emulate a card with this much memory, e.g. 8GiB, 8GB, 7800MiB (CUDA only): reserves
    /// free minus this before the model loads. Capacity only: bandwidth and compute are not
    /// emulated.
    #[arg(long)]
    pub vram_limit: Option<String>,
    /// Save the trained adapters in PEFT format to this directory.
    #[arg(long)]
    pub save_adapter: Option<PathBuf>,
    /// Print JSON lines on stdout (for the orchestrator) instead of human-readable progress.
    #[arg(long)]
    pub json: bool,
    /// With --json: sample this process's own telemetry (NVML on CUDA devices, RSS on CPU,
    /// 10 Hz) and write `telemetry` lines between the others, and stamp each step with the
    /// same clock (`t`, seconds since start). For nodes where no orchestrator runs (Slurm).
    #[arg(long, requires = "json")]
    pub telemetry: bool,
}

/// The NVML index of CUDA ordinal `ordinal` of this process: the `ordinal`-th entry of
/// `CUDA_VISIBLE_DEVICES` when it is a plain index list (what Slurm and the local
/// orchestrator set, with `CUDA_DEVICE_ORDER=PCI_BUS_ID`), else `ordinal` itself.
pub fn nvml_index(ordinal: u32, visible: Option<&str>) -> u32 {
    visible
        .and_then(|v| v.split(',').nth(ordinal as usize))
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(ordinal)
}

/// `--format` values: the [`DataFormat`] spellings.
impl clap::ValueEnum for DataFormat {
    fn value_variants<'a>() -> &'a [Self] {
        &DataFormat::ALL
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        let help = match self {
            DataFormat::Auto => "By extension and content",
            DataFormat::Alpaca => "instruction / input / output records",
            DataFormat::Chat => {
                "{\"messages\": [{\"role\", \"content\"}]} conversations, model's chat template"
            }
            DataFormat::ShareGpt => {
                "{\"conversations\": [{\"from\", \"value\"}]} conversations, model's chat template"
            }
            DataFormat::TextJsonl => "{\"text\": ...} JSON lines",
            DataFormat::PlainText => "One document per line",
        };
        Some(PossibleValue::new(self.as_str()).help(help))
    }
}

/// `--precision` values: the [`Precision`] spellings.
impl clap::ValueEnum for Precision {
    fn value_variants<'a>() -> &'a [Self] {
        &Precision::ALL
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        let help = match self {
            Precision::Fp32 => "IEEE float32 everywhere",
            Precision::Fp16 => {
                "float16 compute with dynamic loss scaling (PyTorch GradScaler semantics), f32 master weights and optimizer state"
            }
            Precision::Bf16 => "bfloat16 compute, f32 master weights and optimizer state",
        };
        Some(PossibleValue::new(self.as_str()).help(help))
    }
}

impl TrainArgs {
    /// Validate and convert to engine options.
    ///
    /// Errors: an option the engine does not support yet, or a malformed value.
    pub fn to_options(&self) -> Result<TrainOptions, EngineError> {
        let quant: Quant = self.quant.parse().map_err(|e: UnknownName| {
            EngineError::Invalid(format!("--quant {}: expected {}", e.given, e.expected))
        })?;
        let optimizer: Optimizer = self.optimizer.parse().map_err(|e: UnknownName| {
            EngineError::Invalid(format!("--optimizer {}: expected {}", e.given, e.expected))
        })?;
        let vram_limit = match &self.vram_limit {
            None => None,
            Some(v) => {
                let bytes = crate::profile::parse_bytes(v).ok_or_else(|| {
                    EngineError::Invalid(format!(
                        "--vram-limit {v}: expected a size such as 8GiB, 8GB or 7800MiB, or a card name ({})",
                        crate::spec::Card::expected()
                    ))
                })?;
                if self.device == "cpu" {
                    return Err(EngineError::Invalid(
                        crate::engine::cuda::vram::cpu_refusal(v),
                    ));
                }
                Some(bytes)
            }
        };
        let targets = LoraModule::parse_list(&self.lora_targets)
            .map_err(|e: UnknownName| EngineError::Invalid(format!("--lora-targets: {e}")))?;
        if targets.is_empty() {
            return Err(EngineError::Invalid(
                "--lora-targets is empty (expected q,k,v,o,gate,up,down, PEFT module names such as q_proj or qkv_proj, or all-linear)".into(),
            ));
        }
        Ok(TrainOptions {
            model: self.model.clone(),
            data: self.data.clone(),
            format: self.format,
            packing: !self.no_packing,
            batch_size: self.batch_size,
            seq_len: self.seq_len,
            steps: self.steps,
            warmup_steps: self.warmup_steps,
            schedule: self.schedule,
            lora: LoraConfig {
                rank: self.lora_rank,
                alpha: self.lora_alpha,
                dropout: self.lora_dropout,
                targets,
            },
            adamw: AdamWConfig {
                lr: self.lr,
                weight_decay: self.weight_decay,
                ..AdamWConfig::default()
            },
            optimizer,
            max_grad_norm: self.max_grad_norm,
            seed: self.seed,
            device: self.device.clone(),
            precision: self.precision,
            quant,
            grad_checkpointing: self.grad_checkpointing,
            loss_scaling: None,
            save_adapter: self.save_adapter.clone(),
            vram_limit,
        })
    }
}

fn human(ev: &TrainEvent) {
    match ev {
        TrainEvent::Header(h) => {
            let weights = if h.synthetic_weights {
                "synthetic weights (random init of the real shape: speed/memory/energy are representative, loss is not)"
            } else {
                "weights from safetensors"
            };
            eprintln!(
                "lorascope train: {} on {} ({}), {weights}",
                h.model, h.device, h.precision
            );
            if !h.generic_ops.is_empty() {
                eprintln!(
                    "  generic (unfused) GPU path for: {}",
                    h.generic_ops.join(", ")
                );
            }
            eprintln!(
                "  parameters: {} total, {} trainable (LoRA r={} alpha={} on {})",
                h.params_total,
                h.params_trainable,
                h.options.lora.rank,
                h.options.lora.alpha,
                h.options
                    .lora
                    .targets
                    .iter()
                    .map(|t| t.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            );
            eprintln!(
                "  memory: base weights {:.1} MiB (quant {}{}), adapters+optimizer state {:.1} MiB; tokenizer: {}; {} examples",
                h.weight_bytes as f64 / 1048576.0,
                h.quant,
                if h.options.grad_checkpointing {
                    ", gradient checkpointing"
                } else {
                    ""
                },
                h.adapter_and_optimizer_bytes as f64 / 1048576.0,
                h.tokenizer,
                h.examples
            );
            let m = &h.memory;
            eprintln!(
                "  optimizer {}: state {:.1} MiB device, {:.1} MiB managed, {:.1} MiB host",
                h.options.optimizer,
                m.optimizer_state_device_bytes.unwrap_or(0) as f64 / 1048576.0,
                m.optimizer_state_managed_bytes.unwrap_or(0) as f64 / 1048576.0,
                m.optimizer_state_host_bytes.unwrap_or(0) as f64 / 1048576.0
            );
            for note in [&m.optimizer_note, &m.vram_note].into_iter().flatten() {
                eprintln!("  {note}");
            }
        }
        TrainEvent::Step(s) => eprintln!(
            "step {:>4}  loss {:.4}  lr {}  |g| {:.3}  {:.0} tokens/s  ({:.3} s){}{}",
            s.step,
            s.loss.unwrap_or(f64::NAN),
            match s.lr.filter(|&lr| lr != 0.0) {
                Some(lr) => format!("{lr:.2e}"),
                None => "0".to_string(),
            },
            s.grad_norm.unwrap_or(f64::NAN),
            s.tokens as f64 / s.step_seconds.max(1e-12),
            s.step_seconds,
            s.loss_scale
                .map(|v| format!("  scale {v}"))
                .unwrap_or_default(),
            if s.skipped {
                "  skipped (inf/NaN gradients)"
            } else {
                ""
            }
        ),
        TrainEvent::Summary(s) => {
            eprintln!(
                "done: {} steps, loss {:.4} -> {:.4}, {:.1} tokens/s {}, peak RSS {}",
                s.steps,
                s.first_loss,
                s.final_loss,
                s.tokens_per_s,
                if s.timed_steps == 0 {
                    "over all steps (every step was warm-up)"
                } else {
                    "after warm-up"
                },
                s.peak_rss_bytes
                    .map(|b| format!("{:.0} MiB", b as f64 / 1048576.0))
                    .unwrap_or_else(|| "unknown".into())
            );
            if let Some(m) = &s.device_memory {
                let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
                eprintln!(
                    "device memory: weights {:.2} GiB, adapters + optimizer {:.3} GiB, activations peak {:.2} GiB (pool peak reserved {:.2} GiB; NVML adds the CUDA context)",
                    gib(m.weights_bytes),
                    gib(m.adapters_optimizer_bytes),
                    gib(m.activations_peak_bytes),
                    gib(m.pool_reserved_peak_bytes)
                );
            }
            if let Some(d) = &s.adapter_dir {
                eprintln!("adapters saved to {d} (PEFT format)");
            }
        }
        TrainEvent::Telemetry(_) => {}
        // The header and the step lines say as much; an error stays the only stderr line.
        TrainEvent::Phase(_) => {}
    }
}

/// Run `lorascope train`; returns the process exit status.
pub fn run(args: &TrainArgs) -> i32 {
    let t0 = std::time::Instant::now();
    // One complete line per write under stdout's lock: lines of the steps and of the sampler
    // thread never interleave, and a reader of the file they are appended to sees whole lines.
    let write_line = |line: &str| {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(format!("{line}\n").as_bytes());
        let _ = out.flush();
    };
    let sampler = match (args.telemetry, args.device.parse::<crate::spec::Device>()) {
        (true, Ok(device)) => {
            let device = match device {
                crate::spec::Device::Cuda(i) => {
                    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
                    crate::spec::Device::Cuda(nvml_index(i, visible.as_deref()))
                }
                d => d,
            };
            Some(crate::telemetry::Sampler::start(
                device,
                std::process::id(),
                t0,
                crate::telemetry::SAMPLE_PERIOD,
                Box::new(move |s| {
                    let ev = crate::spec::wire::Event::<()>::Telemetry(s.clone());
                    if let Ok(line) = serde_json::to_string(&ev) {
                        write_line(&line);
                    }
                }),
            ))
        }
        _ => None,
    };
    let result = args.to_options().and_then(|opts| {
        train(&opts, |ev| {
            if args.json {
                let line = match ev {
                    TrainEvent::Step(s) if args.telemetry => {
                        let mut s = s.clone();
                        s.t = t0.elapsed().as_secs_f64();
                        serde_json::to_string(&TrainEvent::Step(s))
                    }
                    _ => serde_json::to_string(ev),
                };
                if let Ok(line) = line {
                    write_line(&line);
                }
            } else {
                human(ev);
            }
        })
    });
    if let Some(s) = sampler {
        let (_, note) = s.finish();
        if let Some(note) = note {
            eprintln!("lorascope train: telemetry: {note}");
        }
    }
    match result {
        Ok(_) => EXIT_OK,
        Err(e) => {
            let msg = e.to_string();
            let line = msg.lines().next().unwrap_or("unknown error");
            eprintln!("lorascope train: error: {line}");
            if matches!(
                e,
                EngineError::OutOfMemory { .. } | EngineError::InsufficientMemory(_)
            ) {
                EXIT_OOM
            } else {
                EXIT_FAILURE
            }
        }
    }
}
