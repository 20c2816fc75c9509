//! Tokenising: a Hugging Face `tokenizer.json`, or the byte-level fallback; records become
//! token ids with a mask of the positions that are learned ([`Example`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::chat::{ChatTemplate, encode_conversation};
use super::{DataError, Record, one_line};

/// Byte-level fallback: end-of-sequence token id.
pub const BYTE_EOS: u32 = 256;
/// Byte-level fallback: padding token id.
pub const BYTE_PAD: u32 = 257;

/// End-of-sequence tokens looked up in a `tokenizer.json`, in order of preference.
///
/// `<|endoftext|>` comes first because lorascope trains on raw documents and its own
/// Alpaca template, not a chat template: for Qwen / GPT-2 style vocabularies it is the
/// document separator (Qwen instruct models also have `<|im_end|>`, which ends a chat
/// turn, so it is tried last). `<|end_of_text|>` is Llama 3's, `</s>` Llama 2 / Mistral's.
pub const EOS_CANDIDATES: [&str; 4] = ["<|endoftext|>", "<|end_of_text|>", "</s>", "<|im_end|>"];

/// Padding tokens looked up in a `tokenizer.json` when it has no padding settings.
const PAD_CANDIDATES: [&str; 4] = ["<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>"];

/// Turns text into token ids.
///
/// Either a Hugging Face `tokenizer.json` (via the `tokenizers` crate), or the documented
/// byte-level fallback: token id = UTF-8 byte value (0..=255), 256 = end of sequence,
/// 257 = padding (vocabulary of 258).
#[derive(Clone)]
pub enum Tokenizer {
    /// A Hugging Face tokenizer.
    Hf {
        /// The loaded tokenizer (boxed: it is large and the fallback is empty).
        inner: Box<tokenizers::Tokenizer>,
        /// End-of-sequence id (first of [`EOS_CANDIDATES`] present).
        eos_id: u32,
        /// Padding id: the tokenizer's padding setting, else a known pad token, else eos.
        pad_id: u32,
        /// Where it was loaded from.
        path: PathBuf,
        /// The chat template of the same directory, or why there is none (one line);
        /// only chat data needs it.
        chat: Result<Arc<ChatTemplate>, String>,
    },
    /// The byte-level fallback.
    Bytes,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl Tokenizer {
    /// `dir/tokenizer.json` when `dir` is given and the file exists, else [`Tokenizer::Bytes`].
    ///
    /// Errors: the file exists but cannot be loaded, or it has none of
    /// [`EOS_CANDIDATES`].
    pub fn from_model_dir(dir: Option<&Path>) -> Result<Tokenizer, DataError> {
        match dir.map(|d| d.join("tokenizer.json")) {
            Some(p) if p.is_file() => Tokenizer::from_file(&p),
            _ => Ok(Tokenizer::Bytes),
        }
    }

    /// Loads a `tokenizer.json`, and the chat template of its directory
    /// ([`ChatTemplate::from_model_dir`]) for chat data; a missing or broken template is
    /// an error only when chat data is encoded. Errors as [`Tokenizer::from_model_dir`].
    pub fn from_file(path: &Path) -> Result<Tokenizer, DataError> {
        let shown = path.display().to_string();
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| DataError::Tokenizer {
            path: shown.clone(),
            reason: one_line(e),
        })?;
        let eos_id = EOS_CANDIDATES
            .iter()
            .find_map(|t| inner.token_to_id(t))
            .ok_or_else(|| DataError::NoEos {
                path: shown.clone(),
                looked_for: EOS_CANDIDATES.join(", "),
            })?;
        let pad_id = inner
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| PAD_CANDIDATES.iter().find_map(|t| inner.token_to_id(t)))
            .unwrap_or(eos_id);
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let chat = ChatTemplate::from_model_dir(dir)
            .map(Arc::new)
            .map_err(|e| e.to_string());
        Ok(Tokenizer::Hf {
            inner: Box::new(inner),
            eos_id,
            pad_id,
            path: path.to_path_buf(),
            chat,
        })
    }

    /// The model's chat template, needed by chat data.
    ///
    /// Errors ([`DataError::ChatTemplate`], one line saying what to do): the byte-level
    /// fallback (no `tokenizer.json`), or a model directory without a usable template.
    pub fn chat_template(&self) -> Result<&ChatTemplate, DataError> {
        match self {
            Tokenizer::Hf { chat: Ok(t), .. } => Ok(t),
            Tokenizer::Hf { chat: Err(e), .. } => Err(DataError::ChatTemplate { reason: e.clone() }),
            Tokenizer::Bytes => Err(DataError::ChatTemplate {
                reason: "chat data needs the model's tokenizer.json and chat template, but this run uses the byte-level fallback tokenizer (the model has no tokenizer.json); pass --model a directory with tokenizer.json and a tokenizer_config.json holding chat_template, or use --format alpaca or text".into(),
            }),
        }
    }

    /// Token ids of `text`, with no special tokens added.
    ///
    /// Panics if the Hugging Face tokenizer reports an error (it does not for ordinary
    /// BPE / Unigram / WordPiece tokenizers); use [`Tokenizer::try_encode`] to handle it.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.try_encode(text).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Token ids of `text`, with no special tokens added.
    ///
    /// Errors: [`DataError::Encode`] if the Hugging Face tokenizer fails.
    pub fn try_encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        match self {
            Tokenizer::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Tokenizer::Hf { inner, .. } => inner
                .encode(text, false)
                .map(|enc| enc.get_ids().to_vec())
                .map_err(|e| DataError::Encode {
                    tokenizer: self.name(),
                    reason: one_line(e),
                }),
        }
    }

    /// Text of `ids`, skipping special tokens (byte level: eos, pad and anything >= 256;
    /// invalid UTF-8 is replaced with U+FFFD). Returns `""` if the HF decoder fails.
    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Tokenizer::Bytes => {
                let bytes: Vec<u8> = ids.iter().filter_map(|&id| u8::try_from(id).ok()).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
            Tokenizer::Hf { inner, .. } => inner.decode(ids, true).unwrap_or_default(),
        }
    }

    /// End-of-sequence token id (byte level: 256).
    pub fn eos_id(&self) -> u32 {
        match self {
            Tokenizer::Hf { eos_id, .. } => *eos_id,
            Tokenizer::Bytes => BYTE_EOS,
        }
    }

    /// Padding token id (byte level: 257). Pad positions never carry a target.
    pub fn pad_id(&self) -> u32 {
        match self {
            Tokenizer::Hf { pad_id, .. } => *pad_id,
            Tokenizer::Bytes => BYTE_PAD,
        }
    }

    /// Smallest vocabulary (embedding rows) a model needs to accept every id this
    /// tokenizer produces: largest id + 1 (HF: over the vocabulary and added tokens, and
    /// the eos / pad ids), byte level: 258.
    pub fn min_vocab_size(&self) -> usize {
        match self {
            Tokenizer::Bytes => BYTE_PAD as usize + 1,
            Tokenizer::Hf {
                inner,
                eos_id,
                pad_id,
                ..
            } => {
                let max_vocab = inner.get_vocab(true).values().copied().max().unwrap_or(0);
                max_vocab.max(*eos_id).max(*pad_id) as usize + 1
            }
        }
    }

    /// Human-readable description: `"byte-level fallback (256 bytes + eos 256 + pad 257)"`
    /// or `"tokenizer.json (<path>)"`.
    pub fn name(&self) -> String {
        match self {
            Tokenizer::Bytes => "byte-level fallback (256 bytes + eos 256 + pad 257)".to_string(),
            Tokenizer::Hf { path, .. } => format!("tokenizer.json ({})", path.display()),
        }
    }
}

/// The Alpaca prompt for an instruction and optional input:
/// `"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"`, with the
/// `### Input:` block left out when `input` is empty. The response follows directly.
pub fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.is_empty() {
        format!("### Instruction:\n{instruction}\n\n### Response:\n")
    } else {
        format!("### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
    }
}

/// One tokenised record: ids and, per id, whether predicting it is learned.
#[derive(Debug, Clone)]
pub(super) struct Example {
    /// Token ids, ending in eos (chat: in the template's own end of turn, no eos added).
    pub(super) ids: Vec<u32>,
    /// Per id: whether it is a learned target (false for Alpaca prompt tokens).
    pub(super) learned: Vec<bool>,
}

impl Example {
    /// `rec` tokenised with `tok`, eos appended. Alpaca: the prompt ([`alpaca_prompt`]) and
    /// the output are tokenised separately; prompt tokens are not learned, output tokens and
    /// the eos are. Text: every token and the eos are learned. Chat: the ids and assistant
    /// mask of [`encode_conversation`], nothing appended (the template closes each turn).
    ///
    /// Errors: [`DataError::Encode`] if the tokenizer fails; chat: no chat template (or
    /// the byte-level tokenizer), or the template raised or failed.
    pub(super) fn encode(rec: &Record, tok: &Tokenizer) -> Result<Example, DataError> {
        let (mut ids, mut learned) = match rec {
            Record::Chat { messages, at } => {
                let template = tok.chat_template()?;
                let Tokenizer::Hf { inner, .. } = tok else {
                    unreachable!("chat_template() fails for the byte-level tokenizer")
                };
                let (ids, learned) = encode_conversation(template, inner, messages, *at)?;
                return Ok(Example { ids, learned });
            }
            Record::Alpaca {
                instruction,
                input,
                output,
            } => {
                let prompt = tok.try_encode(&alpaca_prompt(instruction, input))?;
                let response = tok.try_encode(output)?;
                let mut learned = vec![false; prompt.len()];
                learned.resize(prompt.len() + response.len(), true);
                let mut ids = prompt;
                ids.extend(response);
                (ids, learned)
            }
            Record::Text(text) => {
                let ids = tok.try_encode(text)?;
                let learned = vec![true; ids.len()];
                (ids, learned)
            }
        };
        ids.push(tok.eos_id());
        learned.push(true);
        Ok(Example { ids, learned })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::data::test_support::{assert_msg, temp_file};
    use crate::engine::data::{Batcher, Packing, Record};
    use serde_json::Value;

    #[test]
    fn byte_tokenizer_round_trip() {
        let tok = Tokenizer::from_model_dir(None).unwrap();
        assert!(matches!(tok, Tokenizer::Bytes));
        let text = "Add 23 and 58. Straße, 東京 🦀";
        let ids = tok.encode(text);
        assert_eq!(ids.len(), text.len());
        assert!(ids.iter().all(|&i| i < 256));
        assert_eq!(ids[0], u32::from(b'A'));
        assert_eq!(tok.decode(&ids), text);
        let mut with_specials = ids.clone();
        with_specials.extend([tok.eos_id(), tok.pad_id()]);
        assert_eq!(tok.decode(&with_specials), text);
        assert_eq!(
            (tok.eos_id(), tok.pad_id(), tok.min_vocab_size()),
            (256, 257, 258)
        );
        assert_eq!(
            tok.name(),
            "byte-level fallback (256 bytes + eos 256 + pad 257)"
        );
        // A directory without tokenizer.json also falls back.
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Tokenizer::from_model_dir(Some(dir.path())).unwrap(),
            Tokenizer::Bytes
        ));
    }

    /// A tiny hand-written WordLevel tokenizer.json.
    fn word_level_json(vocab: &[(&str, u32)], added: &[(&str, u32)]) -> String {
        let vocab: serde_json::Map<String, Value> = vocab
            .iter()
            .map(|(w, i)| (w.to_string(), Value::from(*i)))
            .collect();
        let added: Vec<Value> = added
            .iter()
            .map(|(t, i)| {
                serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": added, "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
        })
        .to_string()
    }

    #[test]
    fn hf_tokenizer_from_model_dir() {
        let vocab = [
            ("<unk>", 0),
            ("hello", 1),
            ("world", 2),
            ("</s>", 3),
            ("<|endoftext|>", 4),
        ];
        let (dir, _p) = temp_file("tokenizer.json", &word_level_json(&vocab, &[]));
        let tok = Tokenizer::from_model_dir(Some(dir.path())).unwrap();
        assert!(matches!(tok, Tokenizer::Hf { .. }));
        assert_eq!(tok.encode("hello world hello"), vec![1, 2, 1]);
        // <|endoftext|> is preferred over </s>; no pad token -> pad = eos.
        assert_eq!((tok.eos_id(), tok.pad_id()), (4, 4));
        assert_eq!(tok.min_vocab_size(), 5);
        assert!(tok.name().starts_with("tokenizer.json ("), "{}", tok.name());
        let b = Batcher::new(
            &[Record::Text("hello world".into())],
            &tok,
            4,
            1,
            Packing::Padded,
            0,
        )
        .unwrap()
        .next_batch();
        assert_eq!(b.input_ids, vec![1, 2, 4, 4]);
        assert_eq!(b.targets, vec![2, 4, -100, -100]);

        let (dir, _p) = temp_file(
            "tokenizer.json",
            &word_level_json(&[("<unk>", 0), ("a", 1)], &[]),
        );
        let err = Tokenizer::from_model_dir(Some(dir.path())).unwrap_err();
        assert!(matches!(err, DataError::NoEos { .. }));
        assert_msg(&err, &["tokenizer.json: no end-of-sequence token", "</s>"]);

        let (dir, _p) = temp_file("tokenizer.json", "{not json");
        let err = Tokenizer::from_model_dir(Some(dir.path())).unwrap_err();
        assert_msg(&err, &["tokenizer.json: cannot load tokenizer"]);
    }
}
