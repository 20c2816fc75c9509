//! Store errors, said in words: SQLite's own text ("unable to open database file", "disk I/O
//! error", "Error code 4874") becomes the cause a person can act on (the file is a
//! directory, the directory is read-only, the disk is full), once, in one clause.

use std::path::Path;

use rusqlite::ErrorCode;

/// Store errors. `Display` is one line; SQLite's error is not chained as a source (its
/// text is already in the line, and `{:#}` would repeat it).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be opened or set up (WAL, schema).
    #[error("database {path}: {}", describe(err, Some(Path::new(path))))]
    Open {
        /// The database path as given.
        path: String,
        /// SQLite's error.
        err: rusqlite::Error,
    },
    /// A statement failed.
    #[error("database: {}", describe(.0, None))]
    Sql(rusqlite::Error),
    /// A JSON column does not parse (or a value does not serialise).
    #[error("database: bad JSON in a stored row: {0}")]
    Json(#[from] serde_json::Error),
    /// A read-only open needs the database's directory to be writable: its WAL holds results
    /// not yet copied into the main file, and SQLite must create the `-shm` index to read it.
    #[error(
        "database {path}: its WAL file ({path}-wal) holds results SQLite can only read with a \
         writable directory: open it once where the directory is writable, or copy the \
         database together with its -wal file to a writable directory"
    )]
    WalNeedsWritableDir {
        /// The database path as given.
        path: String,
    },
    /// A read-only command was given a path where no database exists.
    #[error("no results database at {path} (run a sweep first, or pass --db)")]
    Missing {
        /// The database path as given.
        path: String,
    },
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Sql(e)
    }
}

impl StoreError {
    /// Whether SQLite reported the disk (or the database's file system) full.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::Open { err, .. } | StoreError::Sql(err) => {
                err.sqlite_error_code() == Some(ErrorCode::DiskFull)
            }
            _ => false,
        }
    }
}

/// One clause for a SQLite error; `path` (the database file) lets it say what is wrong with
/// the file or its directory when SQLite cannot open it.
pub(super) fn describe(err: &rusqlite::Error, path: Option<&Path>) -> String {
    let Some(code) = err.sqlite_error_code() else {
        return err.to_string();
    };
    let extended = match err {
        rusqlite::Error::SqliteFailure(e, _) => e.extended_code,
        _ => 0,
    };
    let detail = match err {
        rusqlite::Error::SqliteFailure(_, Some(m)) => m.clone(),
        _ => String::new(),
    };
    let disk_full = || path.and_then(free_bytes) == Some(0);
    match code {
        ErrorCode::DiskFull => "the disk is full: free space and run the command again".into(),
        ErrorCode::ReadOnly => {
            "is read-only (a read-only file, directory or mount): a command that records \
             results needs it writable; pass --db with a writable path"
                .into()
        }
        ErrorCode::CannotOpen => path.map_or_else(
            || "cannot be opened".to_string(),
            |p| cannot_open(p).unwrap_or_else(|| "cannot be opened".into()),
        ),
        ErrorCode::PermissionDenied => "permission denied".into(),
        ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt => {
            "is not a SQLite database (or is corrupt): pass --db with a lorascope results \
             database, or a new path"
                .into()
        }
        ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => {
            "is locked by another process (a sweep or the daemon writing it): try again when it is done"
                .into()
        }
        ErrorCode::SystemIoFailure if disk_full() => {
            "the disk is full: free space and run the command again".into()
        }
        ErrorCode::SystemIoFailure => format!(
            "disk I/O error (SQLite code {extended}): the file system failed a read or write"
        ),
        _ if detail.starts_with("no such table") || detail.starts_with("no such column") => {
            format!("is not a lorascope results database ({detail})")
        }
        _ if !detail.is_empty() => detail,
        _ => err.to_string(),
    }
}

/// Why a database at `path` cannot be opened, from the file system: a directory, a missing
/// or read-only parent directory, a file without permission.
fn cannot_open(path: &Path) -> Option<String> {
    if path.is_dir() {
        return Some("is a directory, not a database file: pass --db with a file path".into());
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Some(format!(
            "directory {} does not exist: create it or pass another --db",
            parent.display()
        ));
    }
    if !path.exists() && !writable(parent) {
        return Some(format!(
            "cannot create it: directory {} is read-only",
            parent.display()
        ));
    }
    if path.exists() && std::fs::File::open(path).is_err() {
        return Some("permission denied reading the file".into());
    }
    if path.exists() && !writable(parent) {
        return Some(format!(
            "directory {} is read-only, and SQLite needs it writable for its WAL and -shm files",
            parent.display()
        ));
    }
    None
}

/// Whether the process may create files in `dir` (`access(2)` with `W_OK`; a read-only
/// mount answers no).
fn writable(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated path for the call's duration.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

/// Bytes available to this process on the file system holding `path` (or its directory).
fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let dir = if path.is_dir() {
        path
    } else {
        path.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
    };
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: `c` is a valid path; `st` is written by the call before it is read.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(c.as_ptr(), &mut st) == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
    }
}
