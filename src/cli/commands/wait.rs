//! `lorascope wait [SWEEP] [--db FILE]`: block until a sweep (default: every queued sweep)
//! has ended on the daemon; print the daemon's message, and fail when it did not finish.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use crate::cli::client_rt;
use crate::daemon::client::Client;

/// Waits on the daemon at `socket` for sweep `sweep` (of database `db`, which picks one when
/// the id is queued from several).
///
/// Errors: no daemon, an unknown sweep, the sweep ended early (a stop interrupted it, or it
/// could not start), or the daemon stopped first.
pub fn run(socket: &Path, sweep: Option<i64>, db: Option<PathBuf>) -> Result<()> {
    let db = db.map(|p| crate::daemon::db_path(&p));
    client_rt()?.block_on(async {
        let mut c = Client::connect(socket).await?;
        let what = sweep
            .map(|s| format!("sweep {s}"))
            .unwrap_or_else(|| "the queued sweeps".into());
        match c.wait(sweep, db).await? {
            Some((complete, message)) => {
                if !complete {
                    bail!("{message}");
                }
                println!("{message}");
                Ok(())
            }
            None => bail!(
                "the daemon stopped before {what} finished; start it again (`lorascope daemon`) to continue"
            ),
        }
    })
}
