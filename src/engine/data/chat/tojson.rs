//! Python's `json.dumps` output format, for the chat templates' `tojson` filter.

use std::io;

use serde::Serialize;
use serde_json::Value;
use serde_json::ser::{CompactFormatter, Formatter, Serializer};

/// `json.dumps(value, ensure_ascii=..., indent=..., separators=..., sort_keys=...)` as
/// Python 3 writes it: default separators `", "` / `": "` without indent and `","` / `": "`
/// with one; `indent` is the string repeated per level (Python's int indent = that many
/// spaces); `ensure_ascii` writes every non-ASCII character as `\uXXXX` (UTF-16 units).
pub(super) fn python_json_dumps(
    value: &Value,
    ensure_ascii: bool,
    indent: Option<&str>,
    separators: Option<(String, String)>,
    sort_keys: bool,
) -> String {
    let (item_sep, key_sep) = separators.unwrap_or_else(|| match indent {
        None => (", ".into(), ": ".into()),
        Some(_) => (",".into(), ": ".into()),
    });
    let sorted;
    let value = if sort_keys {
        sorted = sort(value);
        &sorted
    } else {
        value
    };
    let formatter = PyFormatter {
        item_sep,
        key_sep,
        indent: indent.map(str::to_string),
        level: 0,
        has_value: false,
    };
    let mut out = Vec::new();
    let mut ser = Serializer::with_formatter(&mut out, formatter);
    value
        .serialize(&mut ser)
        .expect("serialising a JSON value into memory cannot fail");
    let text = String::from_utf8(out).expect("serde_json writes UTF-8");
    if !ensure_ascii {
        return text;
    }
    // Non-ASCII characters only occur inside strings, where Python escapes them.
    let mut ascii = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_ascii() {
            ascii.push(c);
        } else {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                ascii.push_str(&format!("\\u{u:04x}"));
            }
        }
    }
    ascii
}

/// `value` with every object's keys in sorted order.
fn sort(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k.clone(), sort(v)))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.iter().map(sort).collect()),
        other => other.clone(),
    }
}

/// serde_json formatter writing Python's separators and indentation.
struct PyFormatter {
    item_sep: String,
    key_sep: String,
    indent: Option<String>,
    level: usize,
    has_value: bool,
}

impl PyFormatter {
    fn newline<W: ?Sized + io::Write>(&self, w: &mut W) -> io::Result<()> {
        if let Some(indent) = &self.indent {
            w.write_all(b"\n")?;
            for _ in 0..self.level {
                w.write_all(indent.as_bytes())?;
            }
        }
        Ok(())
    }

    fn open<W: ?Sized + io::Write>(&mut self, w: &mut W, c: &[u8]) -> io::Result<()> {
        self.level += 1;
        self.has_value = false;
        w.write_all(c)
    }

    fn close<W: ?Sized + io::Write>(&mut self, w: &mut W, c: &[u8]) -> io::Result<()> {
        self.level -= 1;
        if self.has_value {
            self.newline(w)?;
        }
        self.has_value = true;
        w.write_all(c)
    }

    fn item<W: ?Sized + io::Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if !first {
            w.write_all(self.item_sep.as_bytes())?;
        }
        self.newline(w)
    }
}

impl Formatter for PyFormatter {
    fn begin_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.open(w, b"[")
    }
    fn end_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.close(w, b"]")
    }
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.item(w, first)
    }
    fn end_array_value<W: ?Sized + io::Write>(&mut self, _w: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }
    fn begin_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.open(w, b"{")
    }
    fn end_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.close(w, b"}")
    }
    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.item(w, first)
    }
    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(self.key_sep.as_bytes())
    }
    fn end_object_value<W: ?Sized + io::Write>(&mut self, _w: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }
    fn write_f64<W: ?Sized + io::Write>(&mut self, w: &mut W, value: f64) -> io::Result<()> {
        // Python writes integral floats as `1.0`, as serde_json does; keep its spelling.
        CompactFormatter.write_f64(w, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn matches_python_outputs() {
        // Expected strings are what CPython 3.11's json.dumps prints for the same calls.
        let v = json!({"b": [1, 2.5, {}], "a": "é", "c": []});
        assert_eq!(
            python_json_dumps(&v, false, None, None, false),
            r#"{"b": [1, 2.5, {}], "a": "é", "c": []}"#
        );
        assert_eq!(
            python_json_dumps(&v, true, None, None, true),
            r#"{"a": "\u00e9", "b": [1, 2.5, {}], "c": []}"#
        );
        assert_eq!(
            python_json_dumps(&v, false, Some("  "), None, false),
            "{\n  \"b\": [\n    1,\n    2.5,\n    {}\n  ],\n  \"a\": \"é\",\n  \"c\": []\n}"
        );
        assert_eq!(
            python_json_dumps(&json!("🦀"), true, None, None, false),
            r#""\ud83e\udd80""#
        );
    }
}
