//! Datasets, tokenizer and batching, in three layers, each usable on its own:
//!
//! 1. **Loading** (`load.rs`: [`load_records`], [`load_dataset`], [`bundled_sample`]): a
//!    dataset file (Alpaca JSON / JSONL, chat `{"messages": ...}` or ShareGPT
//!    `{"conversations": ...}` JSON / JSONL, `{"text": ...}` JSONL or plain text) becomes a
//!    list of [`Record`]s. Every problem is reported as a one-line [`DataError`] naming the file,
//!    the line or array index, and what was expected.
//! 2. **Tokenising** (`tokenizer.rs`: [`Tokenizer`]): a Hugging Face `tokenizer.json` when the
//!    model directory has one, otherwise a documented byte-level fallback (token id = UTF-8
//!    byte value, 256 = end of sequence, 257 = padding); records become token ids with the
//!    positions to learn marked (the Alpaca prompt template, [`alpaca_prompt`]; chat
//!    conversations through the model's chat template, assistant turns only: [`chat`]).
//! 3. **Batching** (`batch.rs`: [`Batcher`]): records become fixed-shape [`Batch`]es of input
//!    ids and pre-shifted targets (`-100` = ignored), either packed into full rows or padded
//!    one example per row, in a deterministic shuffled order that cycles forever.
//!
//! The errors of all three are one enum, [`DataError`], defined here.

mod batch;
pub mod chat;
mod load;
mod tokenizer;

pub use batch::{Batch, Batcher, IGNORE_INDEX, Packing};
pub use chat::{ChatMessage, ChatRole, ChatTemplate};
pub use load::{Record, SAMPLE_NAME, bundled_sample, load_dataset, load_records};
pub use tokenizer::{BYTE_EOS, BYTE_PAD, EOS_CANDIDATES, Tokenizer, alpaca_prompt};

use std::fmt;

/// Where in a file a problem was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// 1-based line number (JSONL, plain text, or a JSON syntax error).
    Line(usize),
    /// 0-based index into a top-level JSON array.
    Index(usize),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Line(n) => write!(f, "line {n}"),
            Location::Index(i) => write!(f, "array index {i}"),
        }
    }
}

/// Everything that can go wrong while loading, tokenising or batching data.
///
/// Every message is a single line that names the file (where there is one), the item
/// (line number or array index) and what was expected, so it can be shown to the user as
/// is.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The dataset file does not exist.
    #[error("{path}: file not found (check --data)")]
    NotFound {
        /// The path as given.
        path: String,
    },
    /// The file exists but could not be read (permissions, not UTF-8, ...).
    #[error("{path}: cannot read file: {reason}")]
    Io {
        /// The path as given.
        path: String,
        /// The underlying I/O error, on one line.
        reason: String,
    },
    /// A line (JSONL) or the whole file (JSON array) is not valid JSON.
    #[error("{path} {at}: not valid JSON (expected {expected}): {reason}")]
    InvalidJson {
        /// The path as given.
        path: String,
        /// Line of the error.
        at: Location,
        /// What the item should look like.
        expected: &'static str,
        /// serde_json's message, on one line.
        reason: String,
    },
    /// An item is valid JSON but not an object.
    #[error("{path} {at}: expected {expected}, found {found}")]
    NotAnObject {
        /// The path as given.
        path: String,
        /// Line or array index of the item.
        at: Location,
        /// What the item should look like.
        expected: &'static str,
        /// The JSON kind that was found ("an array", "a string", ...).
        found: &'static str,
    },
    /// A `.json` Alpaca / chat / ShareGPT file whose top level is not an array.
    #[error("{path}: expected a JSON array of {of} objects at the top level, found {found}")]
    NotAnArray {
        /// The path as given.
        path: String,
        /// The kind of record expected (`Alpaca`, `chat`, `ShareGPT`).
        of: &'static str,
        /// The JSON kind that was found.
        found: &'static str,
    },
    /// A required field is absent.
    #[error("{path} {at}: missing field `{field}` ({needs})")]
    MissingField {
        /// The path as given.
        path: String,
        /// Line or array index of the item.
        at: Location,
        /// The missing field.
        field: &'static str,
        /// Which fields records of this format need.
        needs: &'static str,
    },
    /// A field has the wrong JSON type.
    #[error("{path} {at}: field `{field}` must be a string, found {found} ({needs})")]
    WrongType {
        /// The path as given.
        path: String,
        /// Line or array index of the item.
        at: Location,
        /// The offending field.
        field: &'static str,
        /// The JSON kind that was found.
        found: &'static str,
        /// Which fields records of this format need.
        needs: &'static str,
    },
    /// The file parsed but holds no records.
    #[error("{path}: dataset is empty (no records found)")]
    Empty {
        /// The path as given.
        path: String,
    },
    /// [`crate::spec::DataFormat::Auto`] could not decide what the file is.
    #[error(
        "{path}: cannot tell the data format ({reason}); give the format explicitly (alpaca, chat, sharegpt, text or plain)"
    )]
    UnknownFormat {
        /// The path as given.
        path: String,
        /// Why detection failed.
        reason: String,
    },
    /// A format name (CLI argument) that is not one of the known formats.
    #[error("unknown {what} `{given}` (expected one of: {expected})")]
    UnknownName {
        /// What kind of name ("data format", "packing").
        what: &'static str,
        /// The name given.
        given: String,
        /// The accepted names.
        expected: &'static str,
    },
    /// A chat row (`messages` / `conversations`) with a bad shape or an unknown role.
    #[error("{path} {at}: {reason}")]
    Chat {
        /// The path as given.
        path: String,
        /// Line or array index of the row.
        at: Location,
        /// What is wrong, naming the turn (`messages[2].role ...`).
        reason: String,
    },
    /// Chat data without a usable chat template: none in the model directory, the
    /// byte-level fallback tokenizer, a template that does not compile, raises or fails.
    #[error("{reason}")]
    ChatTemplate {
        /// The whole one-line message: files looked at or the conversation's line, and
        /// what to do.
        reason: String,
    },
    /// `tokenizer.json` exists but could not be loaded.
    #[error("{path}: cannot load tokenizer: {reason}")]
    Tokenizer {
        /// Path of the `tokenizer.json`.
        path: String,
        /// The tokenizers crate's message, on one line.
        reason: String,
    },
    /// `tokenizer.json` has none of the recognised end-of-sequence tokens.
    #[error("{path}: no end-of-sequence token found (looked for {looked_for})")]
    NoEos {
        /// Path of the `tokenizer.json`.
        path: String,
        /// The token strings that were tried.
        looked_for: String,
    },
    /// The tokenizer failed on some text.
    #[error("cannot tokenise text with {tokenizer}: {reason}")]
    Encode {
        /// [`Tokenizer::name`].
        tokenizer: String,
        /// The tokenizers crate's message, on one line.
        reason: String,
    },
    /// Batching was asked for with an empty record list.
    #[error("dataset is empty (no records to batch)")]
    NoRecords,
    /// `seq_len` or `batch_size` is zero.
    #[error("invalid batching settings: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: String,
    },
    /// No row would contain a single learnable target.
    #[error("no learnable targets: {reason}")]
    NoLearnableTargets {
        /// Why, with a hint.
        reason: String,
    },
}

/// Collapses a possibly multi-line message onto one line.
fn one_line(s: impl fmt::Display) -> String {
    s.to_string()
        .split(['\n', '\r'])
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Helpers shared by the data tests.
#[cfg(test)]
mod test_support {
    use super::Record;
    use std::fmt;
    use std::io::Write;
    use std::path::PathBuf;

    /// Writes `content` to a temp file called `name`; keep the dir alive while using it.
    pub(super) fn temp_file(name: &str, content: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::File::create(&path)
            .unwrap()
            .write_all(content.as_bytes())
            .unwrap();
        (dir, path)
    }

    /// Asserts the error message is one line and contains every fragment.
    pub(super) fn assert_msg(err: &impl fmt::Display, fragments: &[&str]) {
        let msg = err.to_string();
        assert!(!msg.contains('\n'), "multi-line message: {msg:?}");
        for f in fragments {
            assert!(msg.contains(f), "message {msg:?} lacks {f:?}");
        }
    }

    /// An Alpaca record.
    pub(super) fn alpaca(instruction: &str, input: &str, output: &str) -> Record {
        Record::Alpaca {
            instruction: instruction.into(),
            input: input.into(),
            output: output.into(),
        }
    }
}
