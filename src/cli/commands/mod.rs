//! One file per verb that is neither `run`, `attach`, `train` nor `selftest`: the results
//! database's `report`, `view` and `profile check`, and the daemon's `daemon`, `status`, `queue` and
//! `wait`. Each exposes `run` (or `check`) taking its parsed arguments.

pub mod daemon;
pub mod estimate;
pub mod profile;
pub mod queue;
pub mod report;
pub mod status;
pub mod view;
pub mod wait;
