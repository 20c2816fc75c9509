//! The on-disk PTX cache: NVRTC output kept between processes, so the points of a sweep (each
//! its own process) compile each kernel module once per machine instead of once per run.
//!
//! An entry is `<dir>/<sha256>.ptx`, the hash taken over everything that decides the PTX: the
//! full module source (prelude, generated header, `.cu` text), the compile options and the
//! NVRTC version. `<dir>` is `$LORASCOPE_PTX_CACHE`, else `<user cache dir>/lorascope/ptx`
//! (`~/.cache/lorascope/ptx` on Linux); `LORASCOPE_PTX_CACHE=off` disables it. Entries are
//! written to a temporary name and renamed, so concurrent runs never read half a file; an
//! unreadable, empty or unwritable entry only costs a compile.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Where entries live, or None when the cache is off (or there is no cache directory).
pub(crate) fn dir() -> Option<PathBuf> {
    match std::env::var_os("LORASCOPE_PTX_CACHE") {
        Some(v) if v == "off" => None,
        Some(v) if !v.is_empty() => Some(PathBuf::from(v)),
        _ => dirs::cache_dir().map(|d| d.join("lorascope").join("ptx")),
    }
}

/// The entry's file name for `parts` (source, options, NVRTC version...): hex SHA-256 of the
/// parts, each prefixed by its length so that no two lists of parts collide by concatenation.
pub(crate) fn key(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    format!("{}.ptx", hex::encode(h.finalize()))
}

/// The cached PTX `name` under `dir`, if present and non-empty.
pub(crate) fn load(dir: &Path, name: &str) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(name)).ok()?;
    (!text.trim().is_empty()).then_some(text)
}

/// Store `ptx` as `name` under `dir` (created if needed); failures are ignored (the next run
/// compiles again).
pub(crate) fn store(dir: &Path, name: &str, ptx: &str) {
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = dir.join(format!("{name}.{}.tmp", std::process::id()));
    if std::fs::write(&tmp, ptx).is_ok() && std::fs::rename(&tmp, dir.join(name)).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries round-trip; another source, option set or version is another key; empty or
    /// missing entries are misses; an unwritable directory is not an error.
    #[test]
    fn entries_round_trip_and_keys_separate_inputs() {
        let d = tempfile::tempdir().unwrap();
        let k = key(&[b"src", b"--fmad=false", b"13.0"]);
        assert_ne!(k, key(&[b"src", b"", b"13.0"]));
        assert_ne!(k, key(&[b"src", b"--fmad=false", b"12.9"]));
        assert_ne!(key(&[b"ab", b"c"]), key(&[b"a", b"bc"]));
        assert_eq!(load(d.path(), &k), None);
        store(&d.path().join("ptx"), &k, ".version 8.0\n");
        assert_eq!(
            load(&d.path().join("ptx"), &k).as_deref(),
            Some(".version 8.0\n")
        );
        std::fs::write(d.path().join("ptx").join(&k), "").unwrap();
        assert_eq!(load(&d.path().join("ptx"), &k), None);
        // A file where the directory should be: storing fails quietly.
        std::fs::write(d.path().join("file"), "x").unwrap();
        store(&d.path().join("file"), &k, "ptx");
        assert_eq!(load(&d.path().join("file"), &k), None);
    }
}
