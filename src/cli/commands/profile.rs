//! `lorascope profile check PROFILE [--argv]`: validate a profile and print its grid.

use std::io::Write;
use std::path::Path;

use anyhow::Result;

use crate::grid;
use crate::orchestrator::preflight;
use crate::profile;

/// Validates the profile at `path` (and its model, data and devices, as before a sweep) and prints
/// its expanded grid with ids; with `argv`, each point's worker command line too.
///
/// Errors: the profile does not load, or its model or data fail the checks. A profile that
/// asks for CUDA devices of a build without CUDA is listed with a warning on stderr.
pub fn check(path: &Path, argv: bool) -> Result<()> {
    let lp = profile::load(path)?;
    let specs = grid::expand(&lp);
    preflight::model_and_data(&lp, &specs)?;
    // A GPU profile is still checked on a machine without CUDA (before it is sent to a
    // GPU machine), but it says that `run` refuses it here.
    let no_cuda = preflight::cuda_build(&lp).err();
    let p = &lp.profile;
    let model = p
        .model
        .preset
        .as_ref()
        .map(|m| format!("preset {m}"))
        .or_else(|| p.model.path.as_ref().map(|m| format!("path {m}")))
        .unwrap_or_default();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{}: ok — {} ({}), data {}, {} steps ({} warm-up), {} point(s) x {} repeat(s) on {}",
        path.display(),
        lp.name(),
        model,
        p.data.path,
        p.run.steps,
        p.run.warmup_steps,
        specs.len(),
        p.run.repeats,
        p.run.devices.join(", ")
    )?;
    let (preds, note) = super::estimate::predictions(&lp, &specs);
    if !note.is_empty() {
        writeln!(out, "{note}")?;
    }
    writeln!(
        out,
        "{:>4}  {:<12}  {:<34}  predicted memory",
        "#", "id", "point"
    )?;
    for (s, pred) in specs.iter().zip(&preds) {
        writeln!(
            out,
            "{:>4}  {:<12}  {:<34}  {}",
            s.index + 1,
            s.id,
            s.label(),
            super::estimate::check_column(pred, s.verify_oom)
        )?;
        if argv {
            writeln!(out, "      lorascope {}", s.train_args().join(" "))?;
        }
    }
    if let Some(e) = no_cuda {
        let _ = writeln!(
            std::io::stderr(),
            "warning: {e} (`lorascope run` refuses this profile on this machine)"
        );
    }
    Ok(())
}
