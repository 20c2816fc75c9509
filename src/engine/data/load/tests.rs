//! Tests of dataset loading and format detection.

use super::*;
use crate::engine::data::test_support::{alpaca, assert_msg, temp_file};
use crate::engine::data::{Batcher, Packing, Tokenizer};

#[test]
fn parses_alpaca_json_array() {
    let (_d, p) = temp_file(
        "a.json",
        r#"[{"instruction": "Add 1 and 2.", "input": "", "output": "3"},
            {"instruction": "Reverse.", "input": "abc", "output": "cba", "extra": 1},
            {"instruction": "No input.", "output": "ok"},
            {"instruction": "Null input.", "input": null, "output": "ok"}]"#,
    );
    for fmt in [DataFormat::Auto, DataFormat::Alpaca] {
        let recs = load_records(&p, fmt).unwrap();
        assert_eq!(
            recs,
            vec![
                alpaca("Add 1 and 2.", "", "3"),
                alpaca("Reverse.", "abc", "cba"),
                alpaca("No input.", "", "ok"),
                alpaca("Null input.", "", "ok"),
            ]
        );
    }
}

#[test]
fn parses_alpaca_jsonl_skipping_blank_lines() {
    let (_d, p) = temp_file(
        "a.jsonl",
        "{\"instruction\": \"i1\", \"output\": \"o1\"}\n\n  \n{\"instruction\": \"i2\", \"input\": \"x\", \"output\": \"o2\"}\n",
    );
    for fmt in [DataFormat::Auto, DataFormat::Alpaca] {
        let recs = load_records(&p, fmt).unwrap();
        assert_eq!(recs, vec![alpaca("i1", "", "o1"), alpaca("i2", "x", "o2")]);
    }
}

#[test]
fn parses_text_jsonl() {
    let (_d, p) = temp_file(
        "t.jsonl",
        "\n{\"text\": \"hello world\", \"url\": \"x\"}\r\n{\"text\": \"line\\ntwo\"}\n",
    );
    for fmt in [DataFormat::Auto, DataFormat::TextJsonl] {
        let recs = load_records(&p, fmt).unwrap();
        assert_eq!(
            recs,
            vec![
                Record::Text("hello world".into()),
                Record::Text("line\ntwo".into())
            ]
        );
    }
}

#[test]
fn parses_plain_text() {
    let (_d, p) = temp_file("w.txt", "first doc\r\n\n   \nsecond doc  \n");
    for fmt in [DataFormat::Auto, DataFormat::PlainText] {
        let recs = load_records(&p, fmt).unwrap();
        assert_eq!(
            recs,
            vec![
                Record::Text("first doc".into()),
                Record::Text("second doc".into())
            ]
        );
    }
}

#[test]
fn auto_detects_by_content_for_unknown_extensions() {
    let (_d, p) = temp_file("data.dat", "{\"text\": \"a\"}\n");
    assert_eq!(load_records(&p, DataFormat::Auto).unwrap().len(), 1);
    let (_d, p) = temp_file("data.dat", "[{\"instruction\": \"a\", \"output\": \"b\"}]");
    assert_eq!(
        load_records(&p, DataFormat::Auto).unwrap(),
        vec![alpaca("a", "", "b")]
    );
    let (_d, p) = temp_file("data", "just text\n");
    assert_eq!(
        load_records(&p, DataFormat::Auto).unwrap(),
        vec![Record::Text("just text".into())]
    );
    let (_d, p) = temp_file("x.jsonl", "{\"prompt\": \"a\"}\n");
    let err = load_records(&p, DataFormat::Auto).unwrap_err();
    assert!(matches!(err, DataError::UnknownFormat { .. }));
    assert_msg(
        &err,
        &["x.jsonl", "line 1", "has none of the fields `messages`"],
    );
}

#[test]
fn invalid_json_line_names_file_and_line() {
    let (_d, p) = temp_file(
        "x.jsonl",
        "{\"text\": \"ok\"}\n\n{\"text\": \"ok\"}\n{\"text\": oops}\n",
    );
    let err = load_records(&p, DataFormat::Auto).unwrap_err();
    assert!(matches!(
        err,
        DataError::InvalidJson {
            at: Location::Line(4),
            ..
        }
    ));
    let shown = p.display().to_string();
    assert_msg(
        &err,
        &[
            &format!("{shown} line 4: not valid JSON"),
            "expected an object like {\"text\": ...}",
        ],
    );
}

#[test]
fn invalid_json_array_names_line() {
    let (_d, p) = temp_file(
        "bad.json",
        "[\n{\"instruction\": \"a\", \"output\": \"b\"},\n{\"instruction\": }\n]",
    );
    let err = load_records(&p, DataFormat::Auto).unwrap_err();
    assert_msg(
        &err,
        &["bad.json line 3: not valid JSON", "array of Alpaca"],
    );
}

#[test]
fn missing_field_names_index_or_line() {
    let (_d, p) = temp_file(
        "m.json",
        r#"[{"instruction": "a", "output": "b"}, {"instruction": "a"}]"#,
    );
    let err = load_records(&p, DataFormat::Auto).unwrap_err();
    assert_msg(
        &err,
        &[
            "m.json array index 1: missing field `output`",
            "(Alpaca records need instruction, input?, output)",
        ],
    );
    let (_d, p) = temp_file(
        "m.jsonl",
        "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"output\": \"b\"}\n",
    );
    let err = load_records(&p, DataFormat::Alpaca).unwrap_err();
    assert_msg(&err, &["m.jsonl line 2: missing field `instruction`"]);
    let (_d, p) = temp_file("t.jsonl", "{\"text\": \"a\"}\n{\"txt\": \"b\"}\n");
    let err = load_records(&p, DataFormat::TextJsonl).unwrap_err();
    assert_msg(&err, &["t.jsonl line 2: missing field `text`"]);
}

#[test]
fn wrong_types_are_reported() {
    let (_d, p) = temp_file("w.jsonl", "{\"instruction\": \"a\", \"output\": 5}\n");
    let err = load_records(&p, DataFormat::Auto).unwrap_err();
    assert!(matches!(err, DataError::WrongType { .. }));
    assert_msg(
        &err,
        &["w.jsonl line 1: field `output` must be a string, found a number"],
    );
    let (_d, p) = temp_file("w.jsonl", "{\"text\": \"a\"}\n[1, 2]\n");
    let err = load_records(&p, DataFormat::TextJsonl).unwrap_err();
    assert_msg(
        &err,
        &["w.jsonl line 2: expected an object", "found an array"],
    );
    let (_d, p) = temp_file(
        "w.json",
        "[{\"instruction\": \"a\", \"output\": \"b\"}, \"s\"]",
    );
    let err = load_records(&p, DataFormat::Auto).unwrap_err();
    assert_msg(
        &err,
        &["w.json array index 1: expected an object", "found a string"],
    );
    // JSON lines saved as .json are still read.
    let (_d, p) = temp_file(
        "l.json",
        "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"c\", \"output\": \"d\"}\n",
    );
    assert_eq!(load_records(&p, DataFormat::Auto).unwrap().len(), 2);
    let (_d, p) = temp_file("o.json", "{\"instruction\": \"a\", \"output\": \"b\"}");
    let err = load_records(&p, DataFormat::Auto).unwrap_err();
    assert_msg(&err, &["o.json: expected a JSON array", "found an object"]);
}

#[test]
fn empty_and_missing_files() {
    for (name, content) in [
        ("e.jsonl", ""),
        ("e.jsonl", "\n  \n"),
        ("e.txt", "\n\n"),
        ("e.json", "[]"),
    ] {
        let (_d, p) = temp_file(name, content);
        let err = load_records(&p, DataFormat::Auto).unwrap_err();
        assert!(matches!(err, DataError::Empty { .. }), "{name}: {err}");
        assert_msg(&err, &[name, "dataset is empty"]);
    }
    let err = load_records(Path::new("data/nope.jsonl"), DataFormat::Auto).unwrap_err();
    assert_eq!(
        err.to_string(),
        "data/nope.jsonl: file not found (check --data)"
    );
}

#[test]
fn format_and_packing_names() {
    assert_eq!("Alpaca".parse::<DataFormat>().unwrap(), DataFormat::Alpaca);
    assert_eq!(
        "text-jsonl".parse::<DataFormat>().unwrap(),
        DataFormat::TextJsonl
    );
    assert_eq!("txt".parse::<DataFormat>().unwrap(), DataFormat::PlainText);
    assert_eq!(
        "ShareGPT".parse::<DataFormat>().unwrap(),
        DataFormat::ShareGpt
    );
    assert_eq!("messages".parse::<DataFormat>().unwrap(), DataFormat::Chat);
    for f in DataFormat::ALL {
        assert_eq!(f.to_string().parse::<DataFormat>().unwrap(), f);
    }
    assert_msg(
        &"csv".parse::<DataFormat>().unwrap_err(),
        &["`csv`", "alpaca"],
    );
    assert_eq!("padded".parse::<Packing>().unwrap(), Packing::Padded);
    assert_eq!(Packing::default(), Packing::Packed);
    assert!("zip".parse::<Packing>().is_err());
}

#[test]
fn bundled_sample_loads() {
    let recs = bundled_sample();
    assert!((300..=600).contains(&recs.len()), "{} records", recs.len());
    assert!(
        recs.iter()
            .all(|r| matches!(r, Record::Alpaca { output, .. } if !output.is_empty()))
    );
    assert!(SAMPLE_JSONL.lines().all(|l| l.len() < 200));
    assert_eq!(load_dataset("sample", DataFormat::Auto).unwrap(), recs);
    let mut b = Batcher::new(&recs, &Tokenizer::Bytes, 128, 8, Packing::Packed, 0).unwrap();
    let batch = b.next_batch();
    assert_eq!(batch.real_tokens, 8 * 128);
    // Responses are a sizeable share of the tokens, so the loss has something to learn.
    assert!(
        batch.target_tokens * 10 > batch.padded_tokens,
        "{}",
        batch.target_tokens
    );
}
