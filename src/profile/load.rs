//! Reading a profile: text -> [`Profile`] (schema, then validation), and a file (or the
//! embedded quick start) -> [`LoadedProfile`], which knows the directory that relative
//! `data.path` / `model.path` are resolved against.

use std::path::{Path, PathBuf};

use super::error::ProfileError;
use super::schema::Profile;
use super::validate::validate;

/// A profile loaded from a file, with the directory relative paths are resolved against.
#[derive(Debug, Clone)]
pub struct LoadedProfile {
    /// The path as given.
    pub path: PathBuf,
    /// The profile's directory: `data.path` and `model.path` are relative to it.
    pub base_dir: PathBuf,
    /// The TOML text as read.
    pub source: String,
    /// The parsed, validated profile.
    pub profile: Profile,
}

impl LoadedProfile {
    /// The profile's name: `name` if set, else the file stem.
    pub fn name(&self) -> String {
        self.profile.name.clone().unwrap_or_else(|| {
            self.path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "profile".to_string())
        })
    }
}

/// The quick-start profile, embedded in the binary: `lorascope run` with no profile runs it.
pub const EMBEDDED_QUICKSTART: &str = include_str!("../../profiles/quickstart.toml");

/// The embedded quick-start profile (CPU, `tiny` preset, bundled sample), as if loaded from
/// `profiles/quickstart.toml` in the current directory.
///
/// Errors: none in a correct build (the text is validated by the tests).
pub fn load_embedded() -> Result<LoadedProfile, ProfileError> {
    let file = "profiles/quickstart.toml (embedded)";
    let profile = parse_str(EMBEDDED_QUICKSTART, file)?;
    Ok(LoadedProfile {
        path: PathBuf::from(file),
        base_dir: PathBuf::from("."),
        source: EMBEDDED_QUICKSTART.to_string(),
        profile,
    })
}

/// Reads, parses and validates a profile file.
///
/// Errors: [`ProfileError::Io`] when it cannot be read, else as [`parse_str`].
pub fn load(path: &Path) -> Result<LoadedProfile, ProfileError> {
    let file = path.display().to_string();
    let source = std::fs::read_to_string(path).map_err(|source| ProfileError::Io {
        file: file.clone(),
        err: source,
    })?;
    let profile = parse_str(&source, &file)?;
    let base_dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    Ok(LoadedProfile {
        path: path.to_path_buf(),
        base_dir,
        source,
        profile,
    })
}

/// Parses and validates profile text; `file` is only used in error messages.
///
/// Errors: [`ProfileError::Invalid`] at the first problem (TOML syntax, schema, then the
/// checks of `validate`), located at `file:line:column` and the key.
pub fn parse_str(source: &str, file: &str) -> Result<Profile, ProfileError> {
    let profile: Profile =
        toml::from_str(source).map_err(|e| ProfileError::from_toml(&e, source, file))?;
    validate(&profile)
        .map_err(|(path, message)| ProfileError::at_key(source, file, &path, message))?;
    Ok(profile)
}
