//! Where a sweep's runs execute: [`Backend::Local`] (child processes on this machine, one per
//! device slot: [`super::process`]) or [`Backend::Slurm`] (one job array per submission on a
//! Slurm cluster: [`slurm`]). The queue ([`super::queue`]) and the store are the same for both.

pub mod slurm;

/// The backend of one sweep.
#[derive(Debug, Clone, Default)]
pub enum Backend {
    /// Child processes here, one at a time per device of `run.devices`.
    #[default]
    Local,
    /// Slurm job arrays (`[run] backend = "slurm"`).
    Slurm(Box<slurm::SlurmBackend>),
}

use std::path::Path;

use crate::grid::RunSpec;
use crate::profile::{self, Profile};
use crate::spec::Device;
use crate::store::{Store, StoreError};
use slurm::{Attached, SlurmBackend, SlurmError};

/// The backend of profile `p` (directory `base_dir`, results database `db`), checked: on
/// Slurm, [`SlurmBackend::check`] for an array of `n_tasks` (nothing is recorded when it
/// fails).
pub fn for_profile(
    p: &Profile,
    name: &str,
    base_dir: &Path,
    db: &Path,
    n_tasks: usize,
) -> Result<Backend, SlurmError> {
    match p.run.backend {
        profile::Backend::Local => Ok(Backend::Local),
        profile::Backend::Slurm => {
            let mut b = SlurmBackend::new(p.slurm.clone().unwrap_or_default(), base_dir, db);
            b.sweep_name = name.to_string();
            b.check(n_tasks)?;
            Ok(Backend::Slurm(Box::new(b)))
        }
    }
}

/// The devices of a sweep: `run.devices` resolved here (local), or on Slurm the one device
/// each task gets (not looked up on this machine: the GPUs are on the nodes).
pub fn devices(p: &Profile) -> Result<Vec<Device>, String> {
    match p.run.backend {
        profile::Backend::Local => profile::resolve_devices(&p.run.devices),
        profile::Backend::Slurm => Ok(p
            .run
            .devices
            .iter()
            .filter_map(|d| Device::parse(d))
            .take(1)
            .collect()),
    }
}

/// Before continuing sweep `sweep_id`: marks the rows a stopped orchestrator left `running`
/// as `interrupted`, except, on Slurm, those whose task is recorded: they are followed again
/// (added to the backend's `attach`) instead of submitted again. Returns how many rows were
/// marked and how many are re-attached.
pub fn resume_rows(
    backend: &mut Backend,
    store: &Store,
    sweep_id: i64,
    specs: &[RunSpec],
    repeats: u32,
) -> Result<(usize, usize), StoreError> {
    let Backend::Slurm(b) = backend else {
        return Ok((store.mark_interrupted(sweep_id)?, 0));
    };
    let rows = store.slurm_running(sweep_id)?;
    for r in &rows {
        if specs.iter().any(|s| s.id == r.spec_id) {
            b.attach.insert(
                super::entry_id(&r.spec_id, r.repeat, repeats),
                Attached {
                    run_id: r.run_id,
                    array: r.array_job.clone(),
                    task: r.task,
                    attempt: 1,
                },
            );
        }
    }
    Ok((store.mark_interrupted_local(sweep_id)?, b.attach.len()))
}
