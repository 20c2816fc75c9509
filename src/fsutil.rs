//! Files written so that a crash leaves either the old or the new contents: used for the
//! daemon's `state.json` and the dashboard's "save as profile".

use std::io::Write;
use std::path::{Path, PathBuf};

/// A failed [`write_atomic`]: the path it was writing and the I/O error. The message is one
/// line, `PATH: ERROR` (the error is part of the message, not a `source()`).
#[derive(Debug, thiserror::Error)]
#[error("{}: {error}", path.display())]
pub struct AtomicWriteError {
    /// The file that was to be replaced.
    pub path: PathBuf,
    /// What failed: creating, writing or syncing the temporary file, or the rename.
    pub error: std::io::Error,
}

/// Writes `text` to `path` atomically: a temporary file in the same directory
/// (`.NAME.tmpPID`), written, synced, then renamed over `path`. On failure the temporary file
/// is removed and `path` is untouched. The directory entry itself is not synced: see
/// [`sync_parent`].
///
/// Errors: [`AtomicWriteError`] naming `path` (directory missing or not writable, disk full).
pub fn write_atomic(path: &Path, text: &str) -> Result<(), AtomicWriteError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.map_err(|error| AtomicWriteError {
        path: path.to_path_buf(),
        error,
    })
}

/// Best-effort fsync of `path`'s directory, so that a rename into it survives a power loss.
/// Errors are ignored (some filesystems refuse to sync a directory).
pub fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_and_reports_bad_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.toml");
        write_atomic(&path, "one").unwrap();
        write_atomic(&path, "two").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file left behind");
        let bad = dir.path().join("missing/dir/a.toml");
        let e = write_atomic(&bad, "x").unwrap_err().to_string();
        assert!(e.contains("missing/dir/a.toml"), "{e}");
    }
}
