//! Chat data against transformers: `tests/fixtures/hf/chat/` holds Qwen2.5's chat template, a
//! tiny ChatML BPE tokenizer, conversations in both layouts, and per conversation the text,
//! token ids and assistant mask that transformers' `apply_chat_template` (and TRL's
//! assistant-only loss convention) give. Plus packing, padding and the refusals.

use std::path::{Path, PathBuf};
use std::process::Command;

use lorascope::engine::data::chat::encode_conversation;
use lorascope::engine::data::{
    Batcher, DataError, IGNORE_INDEX, Packing, Record, Tokenizer, load_records,
};
use lorascope::spec::DataFormat;
use serde_json::Value;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/chat")
}

struct Expected {
    text: String,
    ids: Vec<u32>,
    mask: Vec<bool>,
}

fn expected() -> Vec<Expected> {
    let path = fixture_dir().join("expected.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Expected {
            text: c["text"].as_str().unwrap().to_string(),
            ids: c["input_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect(),
            mask: c["assistant_mask"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() == 1)
                .collect(),
        })
        .collect()
}

fn chat_records(file: &str) -> Vec<Record> {
    load_records(&fixture_dir().join(file), DataFormat::Auto).unwrap()
}

fn fixture_tokenizer() -> Tokenizer {
    Tokenizer::from_model_dir(Some(&fixture_dir())).unwrap()
}

#[test]
fn text_ids_and_assistant_mask_match_transformers() {
    let tok = fixture_tokenizer();
    let template = tok.chat_template().unwrap();
    let Tokenizer::Hf { inner, .. } = &tok else {
        panic!("the fixture has a tokenizer.json")
    };
    let want = expected();
    assert_eq!(want.len(), 3);
    for file in ["messages.jsonl", "sharegpt.jsonl"] {
        let recs = chat_records(file);
        assert_eq!(recs.len(), want.len(), "{file}");
        for (i, (rec, want)) in recs.iter().zip(&want).enumerate() {
            let Record::Chat { messages, at } = rec else {
                panic!("{file}: record {i} is not chat: {rec:?}")
            };
            assert_eq!(
                template.render(messages, false, *at).unwrap(),
                want.text,
                "{file} conversation {i}: rendered text"
            );
            let (ids, mask) = encode_conversation(template, inner, messages, *at).unwrap();
            assert_eq!(ids, want.ids, "{file} conversation {i}: token ids");
            assert_eq!(mask, want.mask, "{file} conversation {i}: assistant mask");
            assert!(mask.iter().any(|&m| m) && !mask.iter().all(|&m| m));
        }
    }
}

/// Padded rows: one conversation per row, targets = next id where the mask is 1.
#[test]
fn padded_chat_rows_carry_the_mask() {
    let tok = fixture_tokenizer();
    let want = expected();
    let seq_len = want.iter().map(|w| w.ids.len()).max().unwrap() + 3;
    let mut b = Batcher::new(
        &chat_records("messages.jsonl"),
        &tok,
        seq_len,
        3,
        Packing::Padded,
        5,
    )
    .unwrap();
    let batch = b.next_batch();
    let mut seen = Vec::new();
    for r in 0..3 {
        let ids = &batch.input_ids[r * seq_len..(r + 1) * seq_len];
        let tg = &batch.targets[r * seq_len..(r + 1) * seq_len];
        let w = want
            .iter()
            .position(|w| ids.starts_with(&w.ids))
            .expect("each row starts with one whole conversation");
        seen.push(w);
        let w = &want[w];
        let n = w.ids.len();
        assert!(ids[n..].iter().all(|&x| x == tok.pad_id()));
        for (t, &got) in tg.iter().enumerate() {
            let expect = if t + 1 < n && w.mask[t + 1] {
                i64::from(w.ids[t + 1])
            } else {
                IGNORE_INDEX
            };
            assert_eq!(got, expect, "row {r} position {t}");
        }
    }
    seen.sort();
    assert_eq!(seen, vec![0, 1, 2]);
    let learned: usize = want
        .iter()
        .map(|w| w.mask[1..].iter().filter(|&&m| m).count())
        .sum();
    assert_eq!(batch.target_tokens, learned);

    // A row shorter than a conversation is truncated; its targets follow the mask.
    let mut b = Batcher::new(
        &chat_records("messages.jsonl"),
        &tok,
        100,
        1,
        Packing::Padded,
        0,
    )
    .unwrap();
    for _ in 0..3 {
        let batch = b.next_batch();
        let w = want
            .iter()
            .find(|w| w.ids.starts_with(&batch.input_ids[..w.ids.len().min(100)]))
            .unwrap();
        for t in 0..100.min(w.ids.len()) {
            let expect = match w.ids.get(t + 1) {
                Some(&id) if w.mask[t + 1] => i64::from(id),
                _ => IGNORE_INDEX,
            };
            assert_eq!(batch.targets[t], expect);
        }
    }
}

/// Packed rows: conversations concatenated with nothing added between them; every target
/// is the next stream token where that token's mask is 1.
#[test]
fn packed_chat_rows_carry_the_mask() {
    let tok = fixture_tokenizer();
    let want = expected();
    // Longer than any run of unlearned tokens (115 here), so no row is skipped and the
    // rows are consecutive pieces of one stream.
    let (seq_len, bs) = (128, 2);
    let mut b = Batcher::new(
        &chat_records("sharegpt.jsonl"),
        &tok,
        seq_len,
        bs,
        Packing::Packed,
        9,
    )
    .unwrap();
    // Rebuild the stream (rows overlap by one token) with its targets.
    let mut stream: Vec<u32> = Vec::new();
    let mut targets: Vec<i64> = Vec::new();
    for _ in 0..30 {
        let batch = b.next_batch();
        assert_eq!(batch.real_tokens, batch.padded_tokens);
        for r in 0..bs {
            stream.extend(&batch.input_ids[r * seq_len..(r + 1) * seq_len]);
            targets.extend(&batch.targets[r * seq_len..(r + 1) * seq_len]);
        }
    }
    // Walk the stream conversation by conversation; every epoch is a permutation.
    let mut pos = 0;
    let mut count = [0usize; 3];
    let longest = want.iter().map(|w| w.ids.len()).max().unwrap();
    while pos + longest < stream.len() {
        let (k, w) = want
            .iter()
            .enumerate()
            .find(|(_, w)| stream[pos..].starts_with(&w.ids))
            .unwrap_or_else(|| panic!("no conversation starts at stream position {pos}"));
        count[k] += 1;
        for (j, &m) in w.mask.iter().enumerate() {
            if pos + j == 0 {
                continue;
            }
            let expect = if m { i64::from(w.ids[j]) } else { IGNORE_INDEX };
            assert_eq!(targets[pos + j - 1], expect, "stream position {}", pos + j);
        }
        pos += w.ids.len();
    }
    assert!(count.iter().all(|&c| c >= 3), "{count:?}");
    assert!(count.iter().max().unwrap() - count.iter().min().unwrap() <= 1);
}

/// A model directory in a temp dir: the fixture's tokenizer.json plus the given
/// tokenizer_config.json (none for `None`).
fn model_dir_with(config: Option<&str>) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture_dir().join("tokenizer.json"),
        d.path().join("tokenizer.json"),
    )
    .unwrap();
    if let Some(c) = config {
        std::fs::write(d.path().join("tokenizer_config.json"), c).unwrap();
    }
    d
}

fn batch_error(tok: &Tokenizer, recs: &[Record]) -> String {
    let err = Batcher::new(recs, tok, 64, 1, Packing::Packed, 0).unwrap_err();
    assert!(matches!(err, DataError::ChatTemplate { .. }), "{err:?}");
    let s = err.to_string();
    assert!(!s.contains('\n'), "{s}");
    s
}

#[test]
fn a_template_that_raises_is_a_one_line_error() {
    // The check Mistral's and Llama 2's templates make.
    let template = "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{{ m['content'] }}{% endfor %}";
    let config = serde_json::json!({"eos_token": "<|im_end|>", "chat_template": template});
    let d = model_dir_with(Some(&config.to_string()));
    let tok = Tokenizer::from_model_dir(Some(d.path())).unwrap();
    // Conversation 1 starts with a system turn: the template refuses it.
    let msg = batch_error(&tok, &chat_records("messages.jsonl"));
    assert!(
        msg.starts_with("conversation at line 1: the chat template (")
            && msg.contains(
                "tokenizer_config.json) raised an exception: Conversation roles must alternate"
            ),
        "{msg}"
    );
}

#[test]
fn missing_template_and_byte_tokenizer_are_refused() {
    let recs = chat_records("messages.jsonl");
    let d = model_dir_with(Some(r#"{"eos_token": "<|im_end|>"}"#));
    let msg = batch_error(&Tokenizer::from_model_dir(Some(d.path())).unwrap(), &recs);
    assert!(
        msg.contains("tokenizer_config.json has no `chat_template` and there is no")
            && msg.contains("chat_template.jinja")
            && msg.contains("use --format alpaca or text"),
        "{msg}"
    );
    let d = model_dir_with(None);
    let msg = batch_error(&Tokenizer::from_model_dir(Some(d.path())).unwrap(), &recs);
    assert!(
        msg.contains("neither") && msg.contains("tokenizer_config.json nor"),
        "{msg}"
    );
    // transformers 5 layout: the template in chat_template.jinja is found.
    let qwen = std::fs::read_to_string(fixture_dir().join("tokenizer_config.json")).unwrap();
    let qwen: Value = serde_json::from_str(&qwen).unwrap();
    std::fs::write(
        d.path().join("chat_template.jinja"),
        qwen["chat_template"].as_str().unwrap(),
    )
    .unwrap();
    let tok = Tokenizer::from_model_dir(Some(d.path())).unwrap();
    let mut b = Batcher::new(&recs, &tok, 128, 1, Packing::Padded, 0).unwrap();
    assert!(b.next_batch().target_tokens > 0);

    let msg = batch_error(&Tokenizer::Bytes, &recs);
    assert!(
        msg.contains("byte-level fallback tokenizer") && msg.contains("--format alpaca or text"),
        "{msg}"
    );
    // Alpaca data with the same tokenizers is unaffected by a missing template.
    let alpaca = lorascope::engine::data::bundled_sample();
    Batcher::new(&alpaca, &Tokenizer::Bytes, 64, 1, Packing::Packed, 0).unwrap();
}

const BIN: &str = env!("CARGO_BIN_EXE_lorascope");
const TINY: &str = include_str!("../../src/engine/presets/tiny.json");

fn train(model: &Path, data: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("train")
        .args([
            "--steps",
            "2",
            "--seq-len",
            "64",
            "--batch-size",
            "2",
            "--json",
        ])
        .arg("--model")
        .arg(model)
        .arg("--data")
        .arg(data)
        .args(extra)
        .output()
        .unwrap()
}

/// `lorascope train` on chat data, end to end (synthetic weights of the tiny preset, the
/// fixture's tokenizer and template), and its one-line refusal without a template.
#[test]
fn train_cli_on_chat_data() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("config.json"), TINY).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture_dir().join(f), d.path().join(f)).unwrap();
    }
    for (file, format) in [("messages.jsonl", "chat"), ("sharegpt.jsonl", "auto")] {
        let o = train(d.path(), &fixture_dir().join(file), &["--format", format]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{file}: {stderr}");
        let lines: Vec<Value> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|l| l["type"] != "phase")
            .collect();
        assert_eq!(lines.len(), 4, "header, 2 steps, summary");
        assert_eq!(lines[0]["examples"], 3, "{}", lines[0]);
    }
    std::fs::remove_file(d.path().join("tokenizer_config.json")).unwrap();
    let o = train(d.path(), &fixture_dir().join("messages.jsonl"), &[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("chat data needs the model's chat template")
            && !stderr.contains("panicked"),
        "{stderr}"
    );
}
