//! Profile errors and how they are located: a TOML or validation error becomes one line,
//! `file:line:column: key.path: message`, pointing at the key at fault.
//!
//! Locating uses toml's recoverable parser ([`DeTable::parse_recoverable`]) and its spans:
//! a serde error's span is turned into the deepest key path containing it, and a validation
//! error's key path into the span of that key (or of its deepest existing ancestor).

use std::ops::Range;

use toml::de::{DeTable, DeValue};

/// One segment of a key path (`grid.seq_len[1]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySeg {
    /// A table key (`seq_len`).
    Key(String),
    /// A 0-based array index (`[1]`).
    Index(usize),
}

/// Renders a key path as `grid.exclude[0].seq_len`.
pub fn render_key_path(path: &[KeySeg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            KeySeg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            KeySeg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

/// The key segment `s` (for building paths).
pub(super) fn k(s: &str) -> KeySeg {
    KeySeg::Key(s.to_string())
}

/// Errors from loading a profile. `Display` is one line:
/// `profiles/x.toml:12:11: grid.seq_len[1]: seq_len must be > 0`.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The profile file cannot be read.
    #[error("{file}: cannot read profile: {err}")]
    Io {
        /// The profile path as given.
        file: String,
        /// The OS error.
        err: std::io::Error,
    },
    /// The text is not valid TOML, does not fit the schema, or fails validation.
    #[error("{file}:{line}:{column}: {}{message}", key.as_ref().map(|k| format!("{k}: ")).unwrap_or_default())]
    Invalid {
        /// The profile path as given (or a name for embedded text).
        file: String,
        /// 1-based line.
        line: usize,
        /// 1-based column, in characters.
        column: usize,
        /// Dotted key path, when one could be found.
        key: Option<String>,
        /// What was wrong / what was expected.
        message: String,
    },
}

impl ProfileError {
    /// A TOML syntax or schema (serde) error in `source`, located at its span.
    pub(super) fn from_toml(e: &toml::de::Error, source: &str, file: &str) -> ProfileError {
        let span = e.span();
        let key = span
            .as_ref()
            .and_then(|sp| key_path_at(source, sp.start))
            .filter(|p| !p.is_empty())
            .map(|p| render_key_path(&p));
        let (line, column) = span
            .as_ref()
            .map(|sp| line_col(source, sp.start))
            .unwrap_or((1, 1));
        let mut message = e.message().trim().replace('\n', " ");
        let mut key = key;
        if let Some((k, m)) = span
            .as_ref()
            .and_then(|sp| conflict_message(&message, source, sp.start))
        {
            key = Some(k);
            message = m;
        }
        if key.is_none() {
            message = missing_section_message(&message).unwrap_or(message);
        }
        ProfileError::Invalid {
            file: file.to_string(),
            line,
            column,
            key,
            message,
        }
    }

    /// A validation error at key `path` of `source` (located at the key, else at its deepest
    /// existing ancestor, else at 1:1).
    pub(super) fn at_key(source: &str, file: &str, path: &[KeySeg], message: String) -> Self {
        let (line, column) = span_of_path(source, path)
            .map(|sp| line_col(source, sp.start))
            .unwrap_or((1, 1));
        ProfileError::Invalid {
            file: file.to_string(),
            line,
            column,
            key: Some(render_key_path(path)),
            message,
        }
    }
}

/// For toml's "duplicate key" and "cannot extend value of type T with a dotted key" (which
/// name no key): the full key written at `offset` (its `[table]` header joined with the key
/// on that line) and a message that names it.
fn conflict_message(message: &str, source: &str, offset: usize) -> Option<(String, String)> {
    let extend = message
        .strip_prefix("cannot extend value of type ")
        .and_then(|m| m.strip_suffix(" with a dotted key"));
    if message != "duplicate key" && extend.is_none() {
        return None;
    }
    let offset = offset.min(source.len());
    let line_start = source[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line_end = source[offset..]
        .find('\n')
        .map_or(source.len(), |i| offset + i);
    let line = source[line_start..line_end].trim();
    let unquote = |k: &str| -> String {
        k.split('.')
            .map(|seg| seg.trim().trim_matches(|c| c == '"' || c == '\''))
            .collect::<Vec<_>>()
            .join(".")
    };
    let written = if line.starts_with('[') {
        // A `[table]` or `[[array]]` header: its name is the whole key.
        unquote(line.trim_start_matches('[').split(']').next()?)
    } else {
        let here = unquote(line.split('=').next()?);
        // The `[table]` this line sits in: the last header line above it.
        let header = source[..line_start]
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| l.starts_with('['))
            .and_then(|l| l.trim_start_matches('[').split(']').next())
            .map(unquote);
        match header {
            Some(h) if !h.is_empty() => format!("{h}.{here}"),
            _ => here,
        }
    };
    let message = match extend {
        None => format!("duplicate key `{written}`: it is already set above; keep one of the two"),
        Some(ty) => {
            let parent = written
                .rsplit_once('.')
                .map_or(written.as_str(), |(p, _)| p);
            format!(
                "`{parent}` is already set to a value of type {ty}, so `{written}` cannot add a key under it; \
                 write `{parent}` once, either as a value or as a table of keys"
            )
        }
    };
    Some((written, message))
}

/// A clearer message for a required top-level table that is absent (serde says "missing
/// field `model`" and points at the document's start).
fn missing_section_message(serde_message: &str) -> Option<String> {
    let section = serde_message
        .strip_prefix("missing field `")?
        .strip_suffix('`')?;
    let example = match section {
        "model" => "[model] with preset = \"tiny\" or path = \"DIR\"",
        "data" => "[data] with path = \"FILE\" or \"sample\"",
        "run" => "[run] with at least steps = N",
        _ => return None,
    };
    Some(format!(
        "no [{section}] section: add {example} (profiles/quickstart.toml is a complete example)"
    ))
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let mut off = offset;
    while !source.is_char_boundary(off) {
        off -= 1;
    }
    let before = &source[..off];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let column = source[line_start..off].chars().count() + 1;
    (line, column)
}

/// The key path of the deepest key or value whose span contains `offset`.
fn key_path_at(source: &str, offset: usize) -> Option<Vec<KeySeg>> {
    let (doc, _) = DeTable::parse_recoverable(source);
    let mut path = Vec::new();
    walk_table_at(doc.get_ref(), offset, &mut path);
    Some(path)
}

fn contains(span: &Range<usize>, offset: usize) -> bool {
    span.start <= offset && offset < span.end.max(span.start + 1)
}

fn walk_table_at(table: &DeTable<'_>, offset: usize, path: &mut Vec<KeySeg>) {
    for (key, value) in table.iter() {
        if contains(&key.span(), offset) {
            path.push(KeySeg::Key(key.get_ref().to_string()));
            return;
        }
        if contains(&value.span(), offset) {
            path.push(KeySeg::Key(key.get_ref().to_string()));
            walk_value_at(value.get_ref(), offset, path);
            return;
        }
    }
    // Tables opened by `[header]` have spans that may not cover their body; search children.
    for (key, value) in table.iter() {
        let mut sub = vec![KeySeg::Key(key.get_ref().to_string())];
        let before = sub.len();
        walk_value_at(value.get_ref(), offset, &mut sub);
        if sub.len() > before {
            path.extend(sub);
            return;
        }
    }
}

fn walk_value_at(value: &DeValue<'_>, offset: usize, path: &mut Vec<KeySeg>) {
    match value {
        DeValue::Table(t) => walk_table_at(t, offset, path),
        DeValue::Array(a) => {
            for (i, item) in a.iter().enumerate() {
                if contains(&item.span(), offset) {
                    path.push(KeySeg::Index(i));
                    walk_value_at(item.get_ref(), offset, path);
                    return;
                }
            }
            for (i, item) in a.iter().enumerate() {
                let mut sub = vec![KeySeg::Index(i)];
                walk_value_at(item.get_ref(), offset, &mut sub);
                if sub.len() > 1 {
                    path.extend(sub);
                    return;
                }
            }
        }
        _ => {}
    }
}

/// The span of the value at `path`, or of the deepest existing ancestor key.
fn span_of_path(source: &str, path: &[KeySeg]) -> Option<Range<usize>> {
    let (doc, _) = DeTable::parse_recoverable(source);
    let mut best: Option<Range<usize>> = None;
    let mut cur_table: Option<&DeTable<'_>> = Some(doc.get_ref());
    let mut cur_array: Option<&[toml::Spanned<DeValue<'_>>]> = None;
    for seg in path {
        let next = match (seg, cur_table, cur_array) {
            (KeySeg::Key(name), Some(t), _) => t
                .iter()
                .find(|(key, _)| &**key.get_ref() == name.as_str())
                .map(|(key, v)| {
                    best = Some(key.span());
                    v
                }),
            (KeySeg::Index(i), _, Some(a)) => a.get(*i),
            _ => None,
        };
        let Some(v) = next else { break };
        if matches!(seg, KeySeg::Index(_)) || !matches!(v.get_ref(), DeValue::Table(_)) {
            best = Some(v.span());
        }
        cur_table = None;
        cur_array = None;
        match v.get_ref() {
            DeValue::Table(t) => cur_table = Some(t),
            DeValue::Array(a) => cur_array = Some(&a[..]),
            _ => {}
        }
    }
    best
}
