//! Sweep profiles: the TOML schema (`profiles/*.toml`), validation, and error messages that
//! point at `file:line:column` and the key at fault.
//!
//! A profile has seven sections; unknown keys are rejected everywhere:
//!
//! ```toml
//! [model]  preset = "tiny"            # or path = "models/qwen" (a directory); exactly one
//! [data]   path = "sample"            # "sample" = the bundled sample; format = "auto"; packing = true
//! [lora]   rank = 16, alpha = 32.0, dropout = 0.0, targets = ["q", "k", "v", "o"]
//! [run]    steps = 20, warmup_steps = 2, repeats = 1, seed = 0, devices = ["cpu"]
//!          # vram_limit = "8GiB", lr = 1e-4 (both optional)
//! [grid]   batch_size = [1, 2], seq_len = [64, 128], optimizer = ["adamw"], precision = ["fp32"],
//!          quant = ["none"], lora_rank = [8], grad_checkpointing = [false]
//! [[grid.exclude]]  seq_len = 128, batch_size = 2      # prune matching factorial points
//! [[grid.include]]  batch_size = 4                     # add a point (unset axes: first value)
//! [slurm]  partition = "gpu", gres = "gpu:1", time = "01:00:00", array_parallelism = 8
//!          # with [run] backend = "slurm"; also account, qos, extra_args, workdir
//! ```
//!
//! Every grid axis is optional; an absent axis has one value (batch_size 1, seq_len 256,
//! optimizer adamw, precision fp32, quant none, lora_rank = `lora.rank`, grad_checkpointing
//! false). A present axis must be a non-empty list without duplicates.
//!
//! - `schema`: the serde types, their defaults, and [`Axes`] (the axes with defaults applied).
//! - `validate`: what serde cannot check, each failure at a key path.
//! - `error`: [`ProfileError`] and how a key path or a TOML span becomes `file:line:column`.
//! - `load`: text or file -> [`Profile`] / [`LoadedProfile`]; the embedded quick start.
//! - `devices`: `run.devices` -> device slots.
//!
//! Imports point down: only [`crate::spec`] and [`crate::telemetry`] (to count GPUs). The
//! points of the grid and the run specs are [`crate::grid`]'s, which builds on this module.

mod devices;
mod error;
mod load;
mod schema;
mod validate;

pub use devices::{ALL_GPUS, resolve_devices, resolve_devices_with};
pub use error::{KeySeg, ProfileError, line_col, render_key_path};
pub use load::{EMBEDDED_QUICKSTART, LoadedProfile, load, load_embedded, parse_str};
pub use schema::{
    AXIS_MAX, Axes, Backend, DataSection, GridSection, LoraSection, ModelSection, PartialPoint,
    Profile, RunSection, SlurmSection, parse_bytes,
};
pub use validate::MAX_GRID_POINTS;

#[cfg(test)]
mod tests;
