//! Dataset text formats.

use serde::{Deserialize, Serialize};

use super::{UnknownName, spellings};

/// Text format of a dataset file (profile `data.format`, worker `--format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// Decide from the extension and the content:
    /// `.txt` -> [`DataFormat::PlainText`]; a JSON array (`.json`, or content starting
    /// with `[`) -> its first element decides, as for lines; `.jsonl` (or any other
    /// extension whose content starts with `{`) -> the first non-blank line decides: an
    /// object with `messages` is [`DataFormat::Chat`], one with `conversations`
    /// [`DataFormat::ShareGpt`], one with `instruction` or `output` Alpaca, one with `text`
    /// [`DataFormat::TextJsonl`]; anything else is plain text.
    #[default]
    Auto,
    /// Alpaca instruction data (the Stanford Alpaca `alpaca_data.json` layout): a JSON array
    /// of objects, or one object per line, with string fields `instruction` (required),
    /// `input` (optional, default `""`; `null` is accepted as `""`) and `output` (required).
    /// Other fields are ignored. Whether it is an array or lines is decided by the first
    /// non-whitespace character (`[` = array); a `.json` file holding a single non-array JSON
    /// document is an error.
    Alpaca,
    /// Chat conversations, one per line (or a JSON array of them), as transformers'
    /// `apply_chat_template` takes them: `{"messages": [{"role": "system" | "user" |
    /// "assistant" | "tool", "content": "..."}, ...]}`. A message's other keys (`name`,
    /// `tool_calls`, ...) are passed to the template unchanged. Rendered with the model
    /// directory's chat template; only the assistant turns (and their end-of-turn token)
    /// are learned.
    Chat,
    /// ShareGPT conversations: `{"conversations": [{"from": "human" | "gpt" | "system",
    /// "value": "..."}, ...]}` (`human` = user, `gpt` = assistant), otherwise as
    /// [`DataFormat::Chat`]; other keys of a turn are ignored.
    #[serde(rename = "sharegpt")]
    ShareGpt,
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
    Chat => "chat",
    ShareGpt => "sharegpt",
    TextJsonl => "text",
    PlainText => "plain",
});

impl std::str::FromStr for DataFormat {
    type Err = UnknownName;

    /// Accepts `auto`, `alpaca`, `chat` (or `messages`), `sharegpt`, `text` (or `text-jsonl`, `jsonl`), `plain` (or
    /// `plain-text`, `txt`), case-insensitively, surrounding whitespace ignored.
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DataFormat::Auto),
            "alpaca" => Ok(DataFormat::Alpaca),
            "chat" | "messages" => Ok(DataFormat::Chat),
            "sharegpt" => Ok(DataFormat::ShareGpt),
            "text" | "text-jsonl" | "jsonl" => Ok(DataFormat::TextJsonl),
            "plain" | "plain-text" | "txt" => Ok(DataFormat::PlainText),
            _ => Err(UnknownName {
                what: "data format",
                given: s.to_string(),
                expected: "auto, alpaca, chat, sharegpt, text or plain",
            }),
        }
    }
}
