//! Sweeps that outlive the terminal: `lorascope daemon` owns the orchestrator, the workers,
//! telemetry and the results store; `lorascope attach`, `status`, `queue`, `wait` and
//! `daemon stop` are clients.
//!
//! - [`protocol`]: newline-delimited, versioned JSON carrying the orchestrator's
//!   [`Command`](crate::orchestrator::Command) and [`Event`](crate::orchestrator::Event).
//! - [`server`]: the daemon: a Unix socket (mode 0600, in a 0700 directory; no TCP), one
//!   handler per message type, a manager that runs queued sweeps one after another (each on
//!   all of its devices).
//! - [`state`]: `state.json`, persisted atomically so that a restart re-queues what was
//!   running, and the compacted event history that attaching clients are rebuilt from.
//! - [`client`]: connecting and one method per request; the dashboard as a client is
//!   `cli::attach` (the daemon knows nothing of terminals).
//! - [`error`]: [`DaemonError`], the one error type of all of the above.
//!
//! Where things live: the socket in [`runtime_dir`] (`$LORASCOPE_RUNTIME_DIR`, else
//! `$XDG_RUNTIME_DIR/lorascope`, else `/tmp/lorascope-<uid>`); the state and the log of a
//! daemon started by `run --detach` in [`state_dir`] (`$LORASCOPE_STATE_DIR`, else
//! `$XDG_STATE_HOME/lorascope`, i.e. `~/.local/state/lorascope`).

pub mod client;
pub mod error;
pub mod protocol;
pub mod server;
pub mod state;

pub use error::DaemonError;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// File name of the socket in [`runtime_dir`].
pub const SOCKET_NAME: &str = "lorascope.sock";

fn uid() -> u32 {
    // SAFETY: getuid(2) cannot fail and touches no memory.
    unsafe { libc::getuid() }
}

/// How clients name a results database to the daemon: absolute, with the directory's `..`
/// and symlinks resolved when it exists, so `--db r.db` and `--db ../here/r.db` are the same
/// database (the daemon compares these paths to tell sweeps of different databases apart).
pub fn db_path(db: &Path) -> PathBuf {
    let abs = std::path::absolute(db).unwrap_or_else(|_| db.to_path_buf());
    match (abs.parent(), abs.file_name()) {
        (Some(dir), Some(name)) => dir
            .canonicalize()
            .map(|d| d.join(name))
            .unwrap_or(abs.clone()),
        _ => abs,
    }
}

/// The directory of the socket: `$LORASCOPE_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/lorascope`,
/// else `/tmp/lorascope-<uid>`.
pub fn runtime_dir() -> PathBuf {
    match std::env::var_os("LORASCOPE_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => match dirs::runtime_dir() {
            Some(d) => d.join("lorascope"),
            None => std::env::temp_dir().join(format!("lorascope-{}", uid())),
        },
    }
}

/// The directory of `state.json` and `daemon.log`: `$LORASCOPE_STATE_DIR`, else
/// `$XDG_STATE_HOME/lorascope` (`~/.local/state/lorascope`), else [`runtime_dir`].
pub fn state_dir() -> PathBuf {
    match std::env::var_os("LORASCOPE_STATE_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => match dirs::state_dir() {
            Some(d) => d.join("lorascope"),
            None => runtime_dir(),
        },
    }
}

/// The socket: `explicit` (`--socket`), else [`runtime_dir`]/[`SOCKET_NAME`].
pub fn socket_path(explicit: Option<&Path>) -> PathBuf {
    match explicit {
        Some(p) => p.to_path_buf(),
        None => runtime_dir().join(SOCKET_NAME),
    }
}

/// Creates `dir` (and its parents) if needed and makes it private (mode 0700).
///
/// Errors: [`DaemonError::Io`] (it cannot be created, read or chmodded), or
/// [`DaemonError::ForeignDir`] (it belongs to another user; then nothing is changed).
pub fn ensure_private_dir(dir: &Path) -> Result<(), DaemonError> {
    std::fs::create_dir_all(dir)
        .map_err(DaemonError::io(format!("cannot create {}", dir.display())))?;
    let meta = std::fs::metadata(dir)
        .map_err(DaemonError::io(format!("cannot read {}", dir.display())))?;
    if meta.uid() != uid() {
        return Err(DaemonError::ForeignDir {
            dir: dir.to_path_buf(),
            uid: meta.uid(),
        });
    }
    if meta.permissions().mode() & 0o777 != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(
            DaemonError::io(format!("cannot make {} private", dir.display())),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod db_path_tests {
    use super::db_path;

    /// `..` and symlinks in the directory resolve, so two spellings of one database agree.
    #[test]
    fn spellings_of_one_database_agree() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::create_dir(&a).unwrap();
        std::os::unix::fs::symlink(&a, dir.path().join("link")).unwrap();
        let plain = db_path(&a.join("r.db"));
        assert!(plain.is_absolute());
        assert_eq!(db_path(&a.join("..").join("a").join("r.db")), plain);
        assert_eq!(db_path(&dir.path().join("link").join("r.db")), plain);
        // A directory that does not exist yet: absolute, as given.
        let missing = dir.path().join("nope").join("r.db");
        assert_eq!(db_path(&missing), missing);
    }
}
