//! The crate's layout rules, checked over every `.rs` file under `src/` (docs/ARCHITECTURE.md
//! explains them): imports point down, and no file grows into a hub.
//!
//! A file's imports are the first path segments after `crate::` (including each name of a
//! `crate::{a, b::c}` group) on its non-comment lines, and `super::` chains that climb out of
//! the file's top-level module.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Longest `.rs` file allowed under `src/`, in lines.
const MAX_LINES: usize = 650;

/// Top-level modules each layer may not import. A module absent from the table may import
/// anything (the front ends: `cli`, and the binary).
fn forbidden(top: &str) -> Option<&'static [&'static str]> {
    const FRONT: &[&str] = &["cli", "ui", "daemon"];
    Some(match top {
        // Leaves.
        "spec" | "fsutil" | "series" => &[
            "cli",
            "ui",
            "daemon",
            "orchestrator",
            "engine",
            "profile",
            "grid",
            "store",
            "report",
            "summary",
            "telemetry",
            "spec",
            "fsutil",
            "series",
        ],
        "engine" => &[
            "cli",
            "ui",
            "daemon",
            "orchestrator",
            "profile",
            "grid",
            "store",
            "report",
            "summary",
            "telemetry",
            "fsutil",
            "series",
        ],
        "telemetry" => &[
            "cli",
            "ui",
            "daemon",
            "orchestrator",
            "engine",
            "profile",
            "grid",
            "store",
            "report",
            "summary",
        ],
        "profile" => &[
            "cli",
            "ui",
            "daemon",
            "orchestrator",
            "grid",
            "store",
            "report",
        ],
        "grid" | "store" | "report" | "summary" => &["cli", "ui", "daemon", "orchestrator"],
        "orchestrator" => FRONT,
        "daemon" => &["cli", "ui"],
        "ui" => &["cli"],
        _ => return None,
    })
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The source without `//` comments (line and doc comments) and string literal contents, so
/// a doc link or a message that names a module is not an import.
fn code_only(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    for line in src.lines() {
        let mut in_str = false;
        let mut prev = ' ';
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            if !in_str && c == '/' && chars.peek() == Some(&'/') {
                break;
            }
            if c == '"' && prev != '\\' && prev != '\'' {
                in_str = !in_str;
            } else if !in_str {
                out.push(c);
            }
            prev = c;
        }
        out.push('\n');
    }
    out
}

/// First segments of every `crate::` path in `code`.
fn crate_imports(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().last();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        let tail = rest.trim_start();
        if let Some(group) = tail.strip_prefix('{') {
            // Top-level names of the group: split on commas at brace depth 0.
            let mut depth = 0usize;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.insert(ident(item.trim()));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 {
                    item.push(c);
                }
            }
            found.insert(ident(item.trim()));
        } else {
            found.insert(ident(tail));
        }
    }
    found.remove("");
    found
}

#[test]
fn imports_point_down_and_files_stay_small() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    assert!(
        files.len() > 50,
        "found only {} files under src/",
        files.len()
    );
    let mut problems = Vec::new();
    for path in &files {
        let rel = path.strip_prefix(&src).unwrap();
        let rel_s = rel.to_string_lossy().replace('\\', "/");
        let text = std::fs::read_to_string(path).unwrap();
        let lines = text.lines().count();
        if lines > MAX_LINES {
            problems.push(format!("src/{rel_s}: {lines} lines (at most {MAX_LINES})"));
        }
        let top = rel_s
            .split('/')
            .next()
            .unwrap()
            .trim_end_matches(".rs")
            .to_string();
        let code = code_only(&text);
        // A `super::` chain longer than the file's depth below its top-level module reaches
        // the crate root: count it as an import of `crate::<next segment>`.
        let depth = rel.components().count()
            - 1
            - usize::from(rel.file_name().is_some_and(|n| n == "mod.rs"));
        let mut imports = crate_imports(&code);
        for (i, _) in code.match_indices("super::") {
            if code[..i].ends_with("super::") {
                continue;
            }
            let mut chain = &code[i..];
            let mut supers = 0;
            while let Some(rest) = chain.strip_prefix("super::") {
                supers += 1;
                chain = rest;
            }
            if supers > depth {
                let name: String = chain
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    imports.insert(name);
                }
            }
        }
        if let Some(bad) = forbidden(&top) {
            for m in &imports {
                if m != &top && bad.contains(&m.as_str()) {
                    problems.push(format!("src/{rel_s} ({top}) uses crate::{m}"));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "layout rules broken:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_import_scanner_sees_groups_paths_and_skips_comments() {
    let code = code_only(
        "use crate::engine::ops;\nuse crate::{spec::Device, ui::{a, b}};\n// crate::daemon\nlet s = \"crate::cli\";\n",
    );
    let got: Vec<String> = crate_imports(&code).into_iter().collect();
    assert_eq!(got, ["engine", "spec", "ui"]);
    assert!(forbidden("engine").unwrap().contains(&"ui"));
}
