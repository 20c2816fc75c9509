//! "Save the sweep as a profile": the current grid with the queue's order and skipped points,
//! as TOML that `lorascope run` turns back into the same queue.
//!
//! How the order survives a reload: grid expansion puts `[[grid.include]]` points first, in
//! the order written, then the factorial points not excluded, dropping duplicates. So the
//! saved profile keeps the original axes (the grid stays recognisable and editable), lists
//! every kept point as a fully specified `include` in queue order, and adds a fully specified
//! `exclude` for each skipped point of the factorial. Every factorial point is then either an
//! include (a duplicate, dropped) or excluded, and the expansion is exactly the include list.
//! A skipped point that exists only as an `include` of the original profile is simply left
//! out. Everything else (model, data, LoRA, run settings) is copied, so the stable ids are
//! the same and the saved profile's results compare with the original's.

use crate::grid::{RunSpec, factorial};
use crate::profile::{Axes, Profile};

pub use crate::fsutil::write_atomic;

/// Errors from saving.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// No point is left to save.
    #[error("every point is skipped: nothing to save")]
    Empty,
    /// The profile does not serialise as TOML.
    #[error("cannot serialise the profile: {0}")]
    Toml(#[from] toml::ser::Error),
    /// Writing or renaming the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file being written.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The profile text for `profile` with its points in `order` (indices into `specs`, first
/// occurrence wins) and the points in `skipped` removed. A point in neither list keeps its
/// place after the ordered ones (so nothing is lost silently).
///
/// Errors: [`SaveError::Empty`] when no point is left; TOML serialisation errors.
pub fn profile_text(
    profile: &Profile,
    specs: &[RunSpec],
    order: &[usize],
    skipped: &[usize],
) -> Result<String, SaveError> {
    let mut kept: Vec<usize> = Vec::new();
    for i in order.iter().copied().chain(0..specs.len()) {
        if i < specs.len() && !skipped.contains(&i) && !kept.contains(&i) {
            kept.push(i);
        }
    }
    if kept.is_empty() {
        return Err(SaveError::Empty);
    }
    let g = &profile.grid;
    let axes = Axes::from_grid(g, profile.lora.rank);
    let all = factorial(&axes);
    let mut out = profile.clone();
    out.grid.include = kept
        .iter()
        .map(|&i| specs[i].config.point.to_partial())
        .collect();
    let mut skipped_labels = Vec::new();
    for &i in skipped {
        let Some(s) = specs.get(i) else { continue };
        let p = s.config.point;
        skipped_labels.push(format!("{} ({})", s.label(), s.id));
        let in_factorial = all.contains(&p);
        let already = g.exclude.iter().any(|ex| p.matches(ex));
        if in_factorial && !already {
            out.grid.exclude.push(p.to_partial());
        }
    }
    let body = toml::to_string(&out)?;
    let mut text = String::new();
    text.push_str("# Saved from the lorascope dashboard: the grid below with the queue's order.\n");
    text.push_str("# `[[grid.include]]` lists the points in run order; `lorascope run` on this\n");
    text.push_str("# file queues them in that order.\n");
    if !skipped_labels.is_empty() {
        text.push_str("# Skipped (excluded):\n");
        for l in &skipped_labels {
            text.push_str(&format!("#   {l}\n"));
        }
    }
    text.push('\n');
    text.push_str(&body);
    Ok(text)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::grid::expand_profile;
    use crate::profile::{load, parse_str};

    const SRC: &str = r#"
name = "t"
[model]
preset = "tiny"
[data]
path = "sample"
[lora]
rank = 8
alpha = 16.0
targets = ["q", "v"]
[run]
steps = 30
warmup_steps = 5
[grid]
batch_size = [1, 2]
seq_len = [64, 128]
optimizer = ["adamw"]
[[grid.exclude]]
batch_size = 2
seq_len = 128
[[grid.include]]
batch_size = 4
seq_len = 32
"#;

    #[test]
    fn save_then_reload_keeps_order_and_drops_skipped() {
        let p = parse_str(SRC, "t.toml").unwrap();
        let specs = expand_profile(&p, Path::new("."));
        let labels: Vec<String> = specs.iter().map(|s| s.label()).collect();
        assert_eq!(
            labels,
            [
                "bs4 seq32 adamw fp32 none r8",
                "bs1 seq64 adamw fp32 none r8",
                "bs1 seq128 adamw fp32 none r8",
                "bs2 seq64 adamw fp32 none r8",
            ]
        );
        // The queue after reordering: 3, 0, 2 and 1 skipped.
        let text = profile_text(&p, &specs, &[3, 0, 2], &[1]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("saved.toml");
        write_atomic(&path, &text).unwrap();
        let lp = load(&path).unwrap();
        let again = crate::grid::expand(&lp);
        let ids: Vec<&str> = again.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, [&specs[3].id, &specs[0].id, &specs[2].id]);
        // Same settings: everything but the grid is unchanged.
        assert_eq!(lp.profile.run, p.run);
        assert_eq!(lp.profile.lora, p.lora);
        assert!(text.contains("# Skipped (excluded):"));
        assert!(text.contains(&specs[1].id));
        // No temp file left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn skipping_an_include_only_point_and_everything() {
        let p = parse_str(SRC, "t.toml").unwrap();
        let specs = expand_profile(&p, Path::new("."));
        let text = profile_text(&p, &specs, &[2, 1], &[0]).unwrap();
        let again = expand_profile(&parse_str(&text, "s.toml").unwrap(), Path::new("."));
        let ids: Vec<&str> = again.iter().map(|s| s.id.as_str()).collect();
        // Point 3 was in neither list: it keeps a place after the ordered ones.
        assert_eq!(ids, [&specs[2].id, &specs[1].id, &specs[3].id]);
        assert!(matches!(
            profile_text(&p, &specs, &[], &[0, 1, 2, 3]),
            Err(SaveError::Empty)
        ));
    }

    #[test]
    fn write_atomic_replaces_and_reports_bad_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.toml");
        write_atomic(&path, "one").unwrap();
        write_atomic(&path, "two").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two");
        let bad = dir.path().join("missing/dir/a.toml");
        let e = write_atomic(&bad, "x").unwrap_err().to_string();
        assert!(e.contains("missing/dir/a.toml"), "{e}");
    }
}
