//! `lorascope report [--sweep N | --list] [--format F] [--db FILE]`: a recorded sweep's
//! comparison table, or the list of sweeps.

use std::io::Write;

use anyhow::{Context, Result};

use crate::cli::ReportArgs;
use crate::report::{self, Format};
use crate::store::Store;

/// Prints the comparison table of sweep `--sweep` (default: the latest) in `--format`, or
/// with `--list` the recorded sweeps.
///
/// Errors: no database at `--db`, no such sweep, or the database fails.
pub fn run(args: &ReportArgs) -> Result<()> {
    let store = Store::open_read_only(&args.db)?;
    if args.list {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "{:>5}  {:<24}  {:>5}  state     profile",
            "sweep", "name", "runs"
        )?;
        for sw in store.sweeps()? {
            let runs = store.runs(sw.id)?.len();
            let state = if sw.finished_at.is_some() {
                "finished"
            } else {
                "partial "
            };
            writeln!(
                out,
                "{:>5}  {:<24}  {:>5}  {state}  {}",
                sw.id, sw.name, runs, sw.profile_path
            )?;
        }
        return Ok(());
    }
    let sweep = match args.sweep {
        Some(id) => store
            .sweep(id)?
            .with_context(|| format!("no sweep {id} in {}", args.db.display()))?,
        None => store
            .latest_sweep()?
            .with_context(|| format!("no sweeps in {}", args.db.display()))?,
    };
    let rows = report::rows(&store.runs(sweep.id)?);
    let text = report::render(&rows, args.format);
    let mut out = std::io::stdout().lock();
    if args.format == Format::Table {
        writeln!(out, "sweep {} ({})", sweep.id, sweep.name)?;
    }
    out.write_all(text.as_bytes())?;
    Ok(())
}
