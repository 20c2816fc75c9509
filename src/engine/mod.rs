//! The training engine: a decoder-only transformer with LoRA adapters, trained with candle.
//! It knows nothing of queues or terminals.

pub mod config;
pub mod cuda;
pub mod data;
pub mod lora;
pub mod memory;
pub mod model;
pub mod nf4;
pub mod ops;
pub mod optim;
pub mod profiler;
pub mod scaler;
pub mod selftest;
#[cfg(test)]
mod testutil;
pub mod train;
pub mod weights;

/// Errors of the engine. Every message is one line naming the file or item at fault and what was
/// expected, so the binary can print it as is.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A model config (`config.json` or preset) is unusable.
    #[error("{file}: {msg}")]
    Config {
        /// The config file or preset name.
        file: String,
        /// What is wrong and what was expected.
        msg: String,
    },
    /// A weight file is missing, truncated, or holds a tensor of the wrong shape or dtype.
    #[error("{file}: {msg}")]
    Weights {
        /// The safetensors file (or index).
        file: String,
        /// What is wrong and what was expected.
        msg: String,
    },
    /// A dataset problem.
    #[error(transparent)]
    Data(#[from] data::DataError),
    /// A run option is out of range or unsupported.
    #[error("{0}")]
    Invalid(String),
    /// Training diverged (a non-finite loss) or died (gradients exactly zero, or the loss
    /// stuck at ln(vocab_size)): the run's numbers would not describe real training.
    #[error("{0}")]
    Diverged(String),
    /// The device ran out of memory.
    #[error(
        "out of memory while {what}: {detail}; lower --batch-size or --seq-len, or use --grad-checkpointing or --quant nf4"
    )]
    OutOfMemory {
        /// What was being allocated or computed.
        what: String,
        /// Backend message (with free/total memory where known).
        detail: String,
    },
    /// The point needs more memory than the machine has (checked before allocating, by
    /// [`memory`]): one line with the bytes needed, the bytes available and what to change.
    /// Reported with the out-of-memory exit status.
    #[error("{0}")]
    InsufficientMemory(String),
    /// Any other tensor-library error, with context.
    #[error("{context}: {source}")]
    Candle {
        /// What the engine was doing.
        context: String,
        /// The candle error.
        source: candle_core::Error,
    },
    /// I/O error on a named path.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Attach context to a candle result, classifying out-of-memory errors.
pub(crate) trait CandleContext<T> {
    /// Wrap the error with what the engine was doing.
    fn ctx(self, context: &str) -> Result<T, EngineError>;
}

impl<T> CandleContext<T> for candle_core::Result<T> {
    fn ctx(self, context: &str) -> Result<T, EngineError> {
        self.map_err(|e| classify(e, context))
    }
}

/// `"; GPU free X of Y GiB"` from the current CUDA context, or empty (CPU build, no context).
/// Under `--vram-limit` the free bytes are those left inside the limit, so Y is the limit.
fn device_free_total() -> String {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::result;
        if let Ok((free, total)) = result::mem_get_info() {
            return free_total_note(free as u64, total as u64, cuda::vram::active_limit());
        }
    }
    String::new()
}

/// The out-of-memory message's memory note for `free` of `total` device bytes, and the
/// `--vram-limit` in force (bytes), if any.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn free_total_note(free: u64, total: u64, limit: Option<u64>) -> String {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    match limit {
        Some(l) => format!(
            "; GPU free {:.2} of the {:.2} GiB --vram-limit (card {:.2} GiB)",
            gib(free),
            gib(l),
            gib(total)
        ),
        None => format!("; GPU free {:.2} of {:.2} GiB", gib(free), gib(total)),
    }
}

/// Turn a candle error into an [`EngineError`], recognising CUDA out-of-memory.
pub(crate) fn classify(e: candle_core::Error, context: &str) -> EngineError {
    let text = e.to_string();
    let first_line = text.lines().next().unwrap_or("").to_string();
    if text.contains("OUT_OF_MEMORY") || text.contains("out of memory") {
        EngineError::OutOfMemory {
            what: context.to_string(),
            detail: format!("{first_line}{}", device_free_total()),
        }
    } else {
        EngineError::Candle {
            context: context.to_string(),
            source: e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::free_total_note;

    /// Out-of-memory notes quote the card, or the `--vram-limit` when one is in force.
    #[test]
    fn oom_note_names_the_limit() {
        let g = 1u64 << 30;
        assert_eq!(
            free_total_note(g / 2, 140 * g, None),
            "; GPU free 0.50 of 140.00 GiB"
        );
        assert_eq!(
            free_total_note(g / 4, 140 * g, Some(8 * g)),
            "; GPU free 0.25 of the 8.00 GiB --vram-limit (card 140.00 GiB)"
        );
    }
}
