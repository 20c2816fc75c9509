//! What is checked before a sweep starts, so that a mistake every point would repeat fails
//! once, on the terminal, instead of once per run: the model resolves, the grid fits it, the
//! data file exists, and CUDA devices are asked of a build that has CUDA. Also the key a
//! profile's sweeps are found by in the store ([`profile_key`]), and loading the profile a
//! sweep runs ([`load_profile`]).
//!
//! Used by `lorascope run` (local and `--detach`), `lorascope profile check` and the daemon's
//! submit handler.

use std::path::{Path, PathBuf};

use crate::engine::EngineError;
use crate::engine::config::ModelSource;
use crate::grid::{self, RunSpec};
use crate::profile::{LoadedProfile, ProfileError};

/// Why a profile cannot run. Each message is one line that names the profile file, the key
/// at fault and what to do; the causes are part of the message (no `source()` chain).
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// `data.path` names a file that does not exist (paths are relative to the profile).
    #[error(
        "{file}: data.path `{data}` not found (resolved to {}; paths are relative to the profile)",
        resolved.display()
    )]
    DataMissing {
        file: String,
        data: String,
        resolved: PathBuf,
    },
    /// The model is neither a preset nor a directory with a readable `config.json`.
    #[error("{file}: model: {error}")]
    Model {
        file: String,
        error: Box<EngineError>,
    },
    /// `lora.targets` names a module the model does not have (`qkv_proj` on Llama, `q_proj`
    /// alone on Phi-3).
    #[error("{file}: lora.targets: {error}")]
    LoraTargets {
        file: String,
        error: Box<EngineError>,
    },
    /// A grid sequence length is above the model's `max_position_embeddings`.
    #[error(
        "{file}: grid.seq_len {seq_len} is above {model}'s max_position_embeddings ({max_pos}); remove it from the grid"
    )]
    SeqLen {
        file: String,
        seq_len: u32,
        model: String,
        max_pos: usize,
    },
    /// `run.devices` names a CUDA device and this binary was built without CUDA.
    #[error(
        "{file}: run.devices asks for a GPU but this lorascope was built without CUDA; rebuild with `cargo build --release --features cuda` or use devices = [\"cpu\"]"
    )]
    NoCuda { file: String },
}

/// Checks a profile's model and data: the model resolves (preset name or a directory with
/// `config.json`, as [`ModelSource::resolve`]), every point's `seq_len` fits its
/// `max_position_embeddings`, `lora.targets` names modules the model has, and the data file exists (`sample` is the bundled one).
/// `specs` is the profile's expanded grid. Used by `profile check` and through [`preflight`].
///
/// Errors: [`PreflightError::DataMissing`], [`PreflightError::Model`],
/// [`PreflightError::LoraTargets`] or [`PreflightError::SeqLen`].
pub fn model_and_data(lp: &LoadedProfile, specs: &[RunSpec]) -> Result<(), PreflightError> {
    let file = lp.path.display().to_string();
    let data = &lp.profile.data.path;
    if data != "sample" {
        let p = lp.base_dir.join(data);
        if !p.exists() {
            return Err(PreflightError::DataMissing {
                file,
                data: data.clone(),
                resolved: p,
            });
        }
    }
    let Some(first) = specs.first() else {
        return Ok(());
    };
    let src = ModelSource::resolve(&first.model_arg).map_err(|error| PreflightError::Model {
        file: file.clone(),
        error: Box::new(error),
    })?;
    src.config
        .lora_targets(&first.config.lora_targets)
        .map_err(|error| PreflightError::LoraTargets {
            file: file.clone(),
            error: Box::new(error),
        })?;
    let max_pos = src.config.max_position_embeddings;
    if let Some(s) = specs.iter().find(|s| {
        let t = s.config.point.seq_len;
        t != crate::profile::AXIS_MAX && t as usize > max_pos
    }) {
        return Err(PreflightError::SeqLen {
            file,
            seq_len: s.config.point.seq_len,
            model: src.name,
            max_pos,
        });
    }
    Ok(())
}

/// Everything checked before the real engine runs a sweep: [`model_and_data`] on the
/// expanded grid, then that CUDA devices come with a CUDA build. Skipped when a test worker
/// stands in for the engine.
///
/// Errors: as [`model_and_data`], or [`PreflightError::NoCuda`].
pub fn preflight(lp: &LoadedProfile) -> Result<(), PreflightError> {
    model_and_data(lp, &grid::expand(lp))?;
    cuda_build(lp)
}

/// Checks that a profile asking for CUDA devices (`cuda:N` or `cuda`) runs on a build with
/// CUDA. Used by `profile check` and through [`preflight`].
///
/// Errors: [`PreflightError::NoCuda`].
pub fn cuda_build(lp: &LoadedProfile) -> Result<(), PreflightError> {
    // On Slurm the GPUs are on the nodes, not here.
    let local = lp.profile.run.backend == crate::profile::Backend::Local;
    let wants_cuda = local && lp.profile.run.devices.iter().any(|d| d.starts_with("cuda"));
    if wants_cuda && !candle_core::utils::cuda_is_available() {
        return Err(PreflightError::NoCuda {
            file: lp.path.display().to_string(),
        });
    }
    Ok(())
}

/// The key that `--resume` finds a profile's sweeps by in the store: the profile's canonical
/// path (the path as given when it cannot be resolved, e.g. the embedded profile).
pub fn profile_key(lp: &LoadedProfile) -> String {
    std::fs::canonicalize(&lp.path)
        .unwrap_or_else(|_| lp.path.clone())
        .display()
        .to_string()
}

/// The profile a sweep runs: the file at `path`, or without one the embedded quick-start
/// profile (CPU, tiny preset, bundled sample).
///
/// Errors: the file cannot be read or is not a valid profile (with file:line:col).
pub fn load_profile(path: Option<&Path>) -> Result<LoadedProfile, ProfileError> {
    match path {
        Some(p) => crate::profile::load(p),
        None => crate::profile::load_embedded(),
    }
}
