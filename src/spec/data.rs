//! Dataset text formats.

use serde::{Deserialize, Serialize};

use super::{UnknownName, spellings};

/// Text format of a dataset file (profile `data.format`, worker `--format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// Decide from the extension and the content:
    /// `.txt` -> [`DataFormat::PlainText`]; `.json` -> [`DataFormat::Alpaca`];
    /// `.jsonl` (or any other extension whose content starts with `{`) -> the first
    /// non-blank line decides: an object with `instruction` or `output` is Alpaca, one with
    /// `text` is [`DataFormat::TextJsonl`]; other extensions starting with `[` are Alpaca
    /// arrays, anything else is plain text.
    #[default]
    Auto,
    /// Alpaca instruction data (the Stanford Alpaca `alpaca_data.json` layout): a JSON array
    /// of objects, or one object per line, with string fields `instruction` (required),
    /// `input` (optional, default `""`; `null` is accepted as `""`) and `output` (required).
    /// Other fields are ignored. Whether it is an array or lines is decided by the first
    /// non-whitespace character (`[` = array); a `.json` file holding a single non-array JSON
    /// document is an error.
    Alpaca,
    /// One `{"text": "..."}` object per line; other fields are ignored.
    #[serde(rename = "text")]
    TextJsonl,
    /// One document per non-empty line.
    #[serde(rename = "plain")]
    PlainText,
}

spellings!(DataFormat {
    Auto => "auto",
    Alpaca => "alpaca",
    TextJsonl => "text",
    PlainText => "plain",
});

impl std::str::FromStr for DataFormat {
    type Err = UnknownName;

    /// Accepts `auto`, `alpaca`, `text` (or `text-jsonl`, `jsonl`), `plain` (or
    /// `plain-text`, `txt`), case-insensitively, surrounding whitespace ignored.
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DataFormat::Auto),
            "alpaca" => Ok(DataFormat::Alpaca),
            "text" | "text-jsonl" | "jsonl" => Ok(DataFormat::TextJsonl),
            "plain" | "plain-text" | "txt" => Ok(DataFormat::PlainText),
            _ => Err(UnknownName {
                what: "data format",
                given: s.to_string(),
                expected: "auto, alpaca, text or plain",
            }),
        }
    }
}
