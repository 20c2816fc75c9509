//! Chat data: conversations in the `{"messages": [{"role", "content"}]}` layout (OpenAI /
//! transformers) or the ShareGPT layout (`{"conversations": [{"from", "value"}]}`), rendered
//! with the model directory's chat template ([`ChatTemplate`]) and learned on the assistant
//! turns only ([`encode_conversation`]).

mod encode;
mod template;
mod tojson;

pub use encode::encode_conversation;
pub use template::{CHAT_TEMPLATE_FILE, ChatTemplate, TOKENIZER_CONFIG_FILE};

use serde_json::{Map, Value};

use super::load::json_kind;
use super::{DataError, Location, Record};

/// Who speaks a chat turn: `message.role` as the chat template sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChatRole {
    /// Instructions for the assistant (`system`).
    System,
    /// The human side (`user`; ShareGPT `human`).
    User,
    /// The model's answers (`assistant`; ShareGPT `gpt`): the only turns that are learned.
    Assistant,
    /// A tool's result (`tool`), rendered by the template as it defines; not learned.
    Tool,
}

impl ChatRole {
    /// The role name the chat template sees (`system`, `user`, `assistant`, `tool`).
    pub fn as_str(self) -> &'static str {
        match self {
            ChatRole::System => "system",
            ChatRole::User => "user",
            ChatRole::Assistant => "assistant",
            ChatRole::Tool => "tool",
        }
    }
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// Who speaks.
    pub role: ChatRole,
    /// What is said (plain text; multimodal content lists are refused when loading).
    pub content: String,
    /// The message object's other keys (`name`, `tool_calls`, `reasoning_content`, ...),
    /// handed to the chat template unchanged, as transformers' `apply_chat_template` does.
    /// Always empty for ShareGPT rows.
    pub extra: Map<String, Value>,
}

const MESSAGES_NEEDS: &str =
    "chat records need {\"messages\": [{\"role\": ..., \"content\": ...}, ...]}";
const SHAREGPT_NEEDS: &str =
    "ShareGPT records need {\"conversations\": [{\"from\": ..., \"value\": ...}, ...]}";

/// The layout of one chat row: which keys hold the turns, the role and the text.
struct Layout {
    list: &'static str,
    role: &'static str,
    content: &'static str,
    needs: &'static str,
    roles: &'static [(&'static str, ChatRole)],
    expected_roles: &'static str,
}

const MESSAGES: Layout = Layout {
    list: "messages",
    role: "role",
    content: "content",
    needs: MESSAGES_NEEDS,
    roles: &[
        ("system", ChatRole::System),
        ("user", ChatRole::User),
        ("assistant", ChatRole::Assistant),
        ("tool", ChatRole::Tool),
    ],
    expected_roles: "system, user, assistant or tool",
};

const SHAREGPT: Layout = Layout {
    list: "conversations",
    role: "from",
    content: "value",
    needs: SHAREGPT_NEEDS,
    roles: &[
        ("system", ChatRole::System),
        ("human", ChatRole::User),
        ("gpt", ChatRole::Assistant),
    ],
    expected_roles: "human, gpt or system",
};

/// A `{"messages": [...]}` object as a [`Record::Chat`]. Errors name the file, line and turn.
pub(super) fn messages_from_object(
    name: &str,
    at: Location,
    obj: &Map<String, Value>,
) -> Result<Record, DataError> {
    parse_conversation(name, at, obj, &MESSAGES)
}

/// A ShareGPT `{"conversations": [...]}` object as a [`Record::Chat`] (`human` -> `user`,
/// `gpt` -> `assistant`); keys other than `from` and `value` are ignored.
pub(super) fn sharegpt_from_object(
    name: &str,
    at: Location,
    obj: &Map<String, Value>,
) -> Result<Record, DataError> {
    parse_conversation(name, at, obj, &SHAREGPT)
}

fn parse_conversation(
    name: &str,
    at: Location,
    obj: &Map<String, Value>,
    layout: &Layout,
) -> Result<Record, DataError> {
    let bad = |reason: String| DataError::Chat {
        path: name.to_string(),
        at,
        reason,
    };
    let turns = match obj.get(layout.list) {
        None => {
            return Err(DataError::MissingField {
                path: name.to_string(),
                at,
                field: layout.list,
                needs: layout.needs,
            });
        }
        Some(Value::Array(turns)) => turns,
        Some(other) => {
            return Err(bad(format!(
                "`{}` must be an array of turns, found {} ({})",
                layout.list,
                json_kind(other),
                layout.needs
            )));
        }
    };
    if turns.is_empty() {
        return Err(bad(format!("`{}` is empty", layout.list)));
    }
    let mut messages = Vec::with_capacity(turns.len());
    for (i, turn) in turns.iter().enumerate() {
        let here = format!("{}[{i}]", layout.list);
        let Value::Object(turn) = turn else {
            return Err(bad(format!(
                "{here} must be an object, found {} ({})",
                json_kind(turn),
                layout.needs
            )));
        };
        let role = match turn.get(layout.role) {
            Some(Value::String(r)) => r,
            None => {
                return Err(bad(format!(
                    "{here} has no `{}` ({})",
                    layout.role, layout.needs
                )));
            }
            Some(other) => {
                return Err(bad(format!(
                    "{here}.{} must be a string, found {}",
                    layout.role,
                    json_kind(other)
                )));
            }
        };
        let Some(&(_, role)) = layout.roles.iter().find(|(n, _)| n == role) else {
            return Err(bad(format!(
                "{here}.{} `{role}` is not a known role (expected {})",
                layout.role, layout.expected_roles
            )));
        };
        let content = match turn.get(layout.content) {
            Some(Value::String(c)) => c.clone(),
            None => {
                return Err(bad(format!(
                    "{here} has no `{}` ({})",
                    layout.content, layout.needs
                )));
            }
            Some(Value::Array(_)) => {
                return Err(bad(format!(
                    "{here}.{} is a list of parts (multimodal content); only text content is supported",
                    layout.content
                )));
            }
            Some(other) => {
                return Err(bad(format!(
                    "{here}.{} must be a string, found {}",
                    layout.content,
                    json_kind(other)
                )));
            }
        };
        let extra = if layout.list == MESSAGES.list {
            turn.iter()
                .filter(|(k, _)| *k != layout.role && *k != layout.content)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        } else {
            Map::new()
        };
        messages.push(ChatMessage {
            role,
            content,
            extra,
        });
    }
    if !messages.iter().any(|m| m.role == ChatRole::Assistant) {
        return Err(bad(format!(
            "the conversation has no assistant turn, so nothing in it would be learned ({})",
            layout.needs
        )));
    }
    Ok(Record::Chat { messages, at })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::data::load_records;
    use crate::engine::data::test_support::{assert_msg, temp_file};
    use crate::spec::DataFormat;

    #[test]
    fn parses_both_layouts_to_the_same_messages() {
        let (_d, a) = temp_file(
            "m.jsonl",
            "{\"messages\": [{\"role\": \"system\", \"content\": \"s\"}, {\"role\": \"user\", \"content\": \"q\", \"name\": \"bob\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}\n",
        );
        let (_d2, b) = temp_file(
            "s.jsonl",
            "\n{\"conversations\": [{\"from\": \"system\", \"value\": \"s\"}, {\"from\": \"human\", \"value\": \"q\"}, {\"from\": \"gpt\", \"value\": \"a\", \"weight\": 1}]}\n",
        );
        let ra = load_records(&a, DataFormat::Auto).unwrap();
        let rb = load_records(&b, DataFormat::Auto).unwrap();
        assert_eq!(ra, load_records(&a, DataFormat::Chat).unwrap());
        assert_eq!(rb, load_records(&b, DataFormat::ShareGpt).unwrap());
        let (
            Record::Chat { messages: ma, at },
            Record::Chat {
                messages: mb,
                at: at_b,
            },
        ) = (&ra[0], &rb[0])
        else {
            panic!("not chat records: {ra:?} {rb:?}");
        };
        assert_eq!((*at, *at_b), (Location::Line(1), Location::Line(2)));
        let roles: Vec<_> = ma.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant"]);
        assert_eq!(ma[1].extra.get("name"), Some(&Value::from("bob")));
        for (x, y) in ma.iter().zip(mb) {
            assert_eq!((x.role, &x.content), (y.role, &y.content));
            assert!(y.extra.is_empty());
        }
    }

    #[test]
    fn json_arrays_of_conversations() {
        let turns = r#"[{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]"#;
        let (_d, p) = temp_file(
            "s.json",
            &format!("[{{\"conversations\": {turns}}}, {{\"conversations\": {turns}}}]"),
        );
        let recs = load_records(&p, DataFormat::Auto).unwrap();
        assert_eq!(recs.len(), 2);
        assert!(matches!(
            recs[1],
            Record::Chat {
                at: Location::Index(1),
                ..
            }
        ));
        let (_d, p) = temp_file(
            "s.json",
            &format!("[{{\"conversations\": {turns}}}, {{\"messages\": {turns}}}]"),
        );
        let err = load_records(&p, DataFormat::Auto).unwrap_err();
        assert_msg(
            &err,
            &["s.json array index 1: missing field `conversations`"],
        );
        let (_d, p) = temp_file("m.json", r#"{"messages": []}"#);
        let err = load_records(&p, DataFormat::Chat).unwrap_err();
        assert_msg(
            &err,
            &[
                "m.json: expected a JSON array of chat objects",
                "found an object",
            ],
        );
    }

    #[test]
    fn malformed_rows_name_file_line_and_turn() {
        let ok = "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}";
        let cases: &[(&str, DataFormat, &[&str])] = &[
            (
                "{\"messages\": [{\"role\": \"bot\", \"content\": \"x\"}]}",
                DataFormat::Chat,
                &[
                    "line 2",
                    "messages[0].role `bot` is not a known role",
                    "user, assistant",
                ],
            ),
            (
                "{\"conversations\": [{\"from\": \"human\", \"value\": \"x\"}, {\"from\": \"assistant\", \"value\": \"y\"}]}",
                DataFormat::ShareGpt,
                &[
                    "line 2",
                    "conversations[1].from `assistant` is not a known role",
                    "human, gpt or system",
                ],
            ),
            (
                "{\"messages\": [{\"role\": \"user\"}]}",
                DataFormat::Chat,
                &["line 2", "messages[0] has no `content`"],
            ),
            (
                "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"text\"}]}]}",
                DataFormat::Chat,
                &["line 2", "multimodal"],
            ),
            (
                "{\"messages\": [{\"role\": \"user\", \"content\": 3}]}",
                DataFormat::Chat,
                &["messages[0].content must be a string, found a number"],
            ),
            (
                "{\"messages\": \"hi\"}",
                DataFormat::Chat,
                &["`messages` must be an array of turns, found a string"],
            ),
            (
                "{\"messages\": []}",
                DataFormat::Chat,
                &["`messages` is empty"],
            ),
            (
                "{\"messages\": [\"hi\"]}",
                DataFormat::Chat,
                &["messages[0] must be an object, found a string"],
            ),
            (
                "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}]}",
                DataFormat::Chat,
                &["line 2", "no assistant turn"],
            ),
            (
                "{\"text\": \"x\"}",
                DataFormat::Chat,
                &["line 2: missing field `messages`"],
            ),
        ];
        let ok_sharegpt = "{\"conversations\": [{\"from\": \"human\", \"value\": \"q\"}, {\"from\": \"gpt\", \"value\": \"a\"}]}";
        for (line2, fmt, fragments) in cases {
            let first = if *fmt == DataFormat::ShareGpt {
                ok_sharegpt
            } else {
                ok
            };
            let (_d, p) = temp_file("c.jsonl", &format!("{first}\n{line2}\n"));
            let err = load_records(&p, *fmt).unwrap_err();
            assert_msg(&err, &["c.jsonl"]);
            assert_msg(&err, fragments);
        }
    }
}
