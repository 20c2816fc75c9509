//! The model directory's chat template (Jinja), rendered as transformers'
//! `apply_chat_template` renders it.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, Serde};
use minijinja::{Environment, Error as JinjaError, ErrorKind, Value, syntax::SyntaxConfig};
use serde_json::{Map, Value as Json};

use super::ChatMessage;
use super::tojson::python_json_dumps;
use crate::engine::data::{DataError, Location, one_line};

/// File transformers 5 writes the chat template to, beside `tokenizer_config.json`.
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";
/// File whose `chat_template` key holds the template in older (and most published) repos.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// What a template error from `raise_exception` starts with, to tell it from engine errors.
const RAISED: &str = "raise_exception: ";

/// Name of the one template in the environment.
const NAME: &str = "chat";

/// A compiled chat template with the special-token strings it may print.
///
/// Rendering matches transformers' `apply_chat_template(messages, tokenize=False)`: Jinja
/// with `trim_blocks` and `lstrip_blocks`, lenient undefined values (a missing key such as
/// `message.tool_calls` is falsy), loop controls (`break`, `continue`), `namespace`, the
/// Python string and dict methods templates call (`.strip()`, `.startswith()`, `.split()`,
/// `.items()`, ...: minijinja-contrib's pycompat), and transformers' globals
/// `raise_exception(msg)`, `strftime_now(fmt)` (local time, C `strftime`) and its `tojson`
/// filter (Python `json.dumps` with `ensure_ascii=False`, `indent`, `separators`,
/// `sort_keys`). The variables are `messages`, `add_generation_prompt`, `tools` and
/// `documents` (both `none`), and `bos_token`, `eos_token`, `pad_token`, `unk_token` where
/// `tokenizer_config.json` sets them. `{% generation %}` / `{% endgeneration %}` markers
/// (transformers' assistant-mask extension) are accepted and render their body unchanged.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template text came from (for messages).
    origin: PathBuf,
    /// `bos_token`, ... as given in `tokenizer_config.json`.
    special_tokens: Vec<(&'static str, String)>,
}

impl ChatTemplate {
    /// The chat template of the model directory `dir`: `dir/chat_template.jinja` when it
    /// exists (transformers 5 writes it there, and it wins there too), else the
    /// `chat_template` key of `dir/tokenizer_config.json` (a string, or a list of
    /// `{"name", "template"}` of which `default` is used). Special tokens come from
    /// `tokenizer_config.json` when it exists.
    ///
    /// Errors (one line, naming the files looked at and what to do): no template, an
    /// unreadable or invalid `tokenizer_config.json`, a template that does not compile.
    pub fn from_model_dir(dir: &Path) -> Result<ChatTemplate, DataError> {
        let config_path = dir.join(TOKENIZER_CONFIG_FILE);
        let jinja_path = dir.join(CHAT_TEMPLATE_FILE);
        let config =
            match std::fs::read_to_string(&config_path) {
                Ok(text) => Some(serde_json::from_str::<Json>(&text).map_err(|e| {
                    DataError::ChatTemplate {
                        reason: format!(
                            "{}: not valid JSON: {}",
                            config_path.display(),
                            one_line(e)
                        ),
                    }
                })?),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    return Err(DataError::ChatTemplate {
                        reason: format!("{}: cannot read: {}", config_path.display(), one_line(e)),
                    });
                }
            };
        let special_tokens = config.as_ref().map(special_tokens).unwrap_or_default();
        if jinja_path.is_file() {
            let source =
                std::fs::read_to_string(&jinja_path).map_err(|e| DataError::ChatTemplate {
                    reason: format!("{}: cannot read: {}", jinja_path.display(), one_line(e)),
                })?;
            return ChatTemplate::new(source, jinja_path, special_tokens);
        }
        let in_config = config
            .as_ref()
            .and_then(|c| c.get("chat_template"))
            .filter(|t| !t.is_null());
        let source = match in_config {
            Some(Json::String(s)) => s.clone(),
            Some(Json::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Json::as_str)
                .map(str::to_string)
                .ok_or_else(|| DataError::ChatTemplate {
                    reason: format!(
                        "{}: `chat_template` is a list without a template named `default`",
                        config_path.display()
                    ),
                })?,
            Some(other) => {
                return Err(DataError::ChatTemplate {
                    reason: format!(
                        "{}: `chat_template` must be a string, found {}",
                        config_path.display(),
                        crate::engine::data::load::json_kind(other)
                    ),
                });
            }
            None => {
                let looked = if config.is_some() {
                    format!(
                        "{} has no `chat_template` and there is no {}",
                        config_path.display(),
                        jinja_path.display()
                    )
                } else {
                    format!(
                        "neither {} nor {} exists",
                        config_path.display(),
                        jinja_path.display()
                    )
                };
                return Err(DataError::ChatTemplate {
                    reason: format!(
                        "chat data needs the model's chat template, but {looked}; pass --model a directory whose tokenizer_config.json holds chat_template, or use --format alpaca or text"
                    ),
                });
            }
        };
        ChatTemplate::new(source, config_path, special_tokens)
    }

    /// Compiles `source` (from the file `origin`, for messages) with the given special-token
    /// variables. Errors: a Jinja syntax error, with its line.
    pub fn new(
        source: String,
        origin: PathBuf,
        special_tokens: Vec<(&'static str, String)>,
    ) -> Result<ChatTemplate, DataError> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| DataError::ChatTemplate {
                reason: one_line(e),
            })?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<Value, JinjaError> {
                Err(JinjaError::new(
                    ErrorKind::InvalidOperation,
                    format!("{RAISED}{msg}"),
                ))
            },
        );
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson_filter);
        env.add_template_owned(NAME, accept_generation_markers(&source))
            .map_err(|e| DataError::ChatTemplate {
                reason: format!(
                    "{}: the chat template does not compile: {}",
                    origin.display(),
                    jinja_message(&e)
                ),
            })?;
        Ok(ChatTemplate {
            env,
            origin,
            special_tokens,
        })
    }

    /// Where the template was read from.
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// The conversation as text: `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)`. `at` (the record's line) is used in messages only.
    ///
    /// Errors: the template raised (`raise_exception`) or failed, one line naming the
    /// conversation's line and the template file.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        at: Location,
    ) -> Result<String, DataError> {
        let messages: Vec<Json> = messages
            .iter()
            .map(|m| {
                let mut obj = Map::new();
                obj.insert("role".into(), Json::from(m.role.as_str()));
                obj.insert("content".into(), Json::from(m.content.as_str()));
                for (k, v) in &m.extra {
                    obj.insert(k.clone(), v.clone());
                }
                Json::Object(obj)
            })
            .collect();
        let mut ctx: Vec<(&str, Value)> = vec![
            ("messages", Value::from(Serde(&messages))),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            ("tools", Value::from(())),
            ("documents", Value::from(())),
        ];
        for (k, v) in &self.special_tokens {
            ctx.push((k, Value::from(v.as_str())));
        }
        let ctx = Value::from_pairs(ctx);
        self.env
            .get_template(NAME)
            .and_then(|t| t.render(ctx))
            .map_err(|e| {
                let origin = self.origin.display();
                let reason = match e.detail() {
                    Some(d) if d.starts_with(RAISED) => format!(
                        "conversation at {at}: the chat template ({origin}) raised an exception: {}",
                        one_line(&d[RAISED.len()..])
                    ),
                    _ => format!(
                        "conversation at {at}: the chat template ({origin}) failed: {}",
                        jinja_message(&e)
                    ),
                };
                DataError::ChatTemplate { reason }
            })
    }
}

/// `bos_token`, `eos_token`, `pad_token`, `unk_token` of a `tokenizer_config.json`: a string
/// or an added-token object `{"content": ...}`; null or absent ones are left out (the
/// template then sees them undefined, as in transformers).
fn special_tokens(config: &Json) -> Vec<(&'static str, String)> {
    ["bos_token", "eos_token", "pad_token", "unk_token"]
        .into_iter()
        .filter_map(|k| {
            let v = config.get(k)?;
            let s = v
                .as_str()
                .or_else(|| v.get("content").and_then(Json::as_str))?;
            Some((k, s.to_string()))
        })
        .collect()
}

/// minijinja's message with the template line, on one line.
fn jinja_message(e: &JinjaError) -> String {
    let detail = e
        .detail()
        .map(str::to_string)
        .unwrap_or(e.kind().to_string());
    match e.line() {
        Some(line) => one_line(format!("{detail} (template line {line})")),
        None => one_line(detail),
    }
}

/// Rewrites transformers' `{% generation %}` / `{% endgeneration %}` tags (which minijinja
/// does not know) to `{% if true %}` / `{% endif %}`, keeping their whitespace control.
fn accept_generation_markers(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(open) = rest.find("{%") {
        out.push_str(&rest[..open]);
        let tag = &rest[open..];
        let Some(close) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..close];
        let trimmed = inner.trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        let replacement = match trimmed {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => {
                out.push_str("{%");
                out.push_str(&inner.replacen(trimmed, r, 1));
                out.push_str("%}");
            }
            None => out.push_str(&tag[..close + 2]),
        }
        rest = &tag[close + 2..];
    }
    out.push_str(rest);
    out
}

/// transformers' `strftime_now(format)`: the local time formatted by C `strftime`.
fn strftime_now(format: String) -> Result<String, JinjaError> {
    let bad =
        |why: &str| JinjaError::new(ErrorKind::InvalidOperation, format!("strftime_now: {why}"));
    let c_format = CString::new(format).map_err(|_| bad("format contains a NUL byte"))?;
    let mut buf = vec![0u8; 512];
    // SAFETY: `time` and `localtime_r` write only into the values passed; `strftime` writes
    // at most `buf.len()` bytes into `buf` and reads the NUL-terminated `c_format`.
    let n = unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return Err(bad("cannot read the local time"));
        }
        libc::strftime(buf.as_mut_ptr().cast(), buf.len(), c_format.as_ptr(), &tm)
    };
    buf.truncate(n);
    String::from_utf8(buf).map_err(|_| bad("the result is not UTF-8"))
}

/// The `tojson` filter as transformers defines it: `json.dumps(x, ensure_ascii=False,
/// indent=None, separators=None, sort_keys=False)`.
fn tojson_filter(value: Value, kwargs: Kwargs) -> Result<Value, JinjaError> {
    let bad = |why: String| JinjaError::new(ErrorKind::InvalidOperation, format!("tojson: {why}"));
    let json = serde_json::to_value(&value).map_err(|e| bad(one_line(e)))?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match (v.as_str(), i64::try_from(v.clone())) {
            (Some(s), _) => Some(s.to_string()),
            (None, Ok(n)) => Some(" ".repeat(usize::try_from(n).unwrap_or(0))),
            _ => return Err(bad(format!("indent must be a number or a string, got {v}"))),
        },
    };
    let separators = match separators.as_deref() {
        None => None,
        Some([item, key]) => Some((item.clone(), key.clone())),
        Some(other) => {
            return Err(bad(format!(
                "separators must be two strings, got {}",
                other.len()
            )));
        }
    };
    let text = python_json_dumps(
        &json,
        ensure_ascii.unwrap_or(false),
        indent.as_deref(),
        separators,
        sort_keys.unwrap_or(false),
    );
    Ok(Value::from(text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::data::chat::ChatRole;

    fn msg(role: ChatRole, content: &str) -> ChatMessage {
        ChatMessage {
            role,
            content: content.into(),
            extra: Map::new(),
        }
    }

    fn compile(source: &str) -> ChatTemplate {
        ChatTemplate::new(
            source.into(),
            "t.jinja".into(),
            vec![("bos_token", "<s>".into())],
        )
        .unwrap()
    }

    #[test]
    fn jinja_features_hf_templates_use() {
        let t = compile(concat!(
            "{{ bos_token }}{% set ns = namespace(n=0) %}",
            "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}",
            "{% set ns.n = ns.n + 1 %}[{{ m.role }}:{{ m.content.strip() | trim }}",
            "{% if m.content.strip().startswith('x') %}!{% endif %}{{ m.content.split(',') | length }}]",
            "{% if ns.n == 2 %}{% break %}{% endif %}{% endfor %}",
            "{{ ns.n }}{% if m is not defined and tools is none %}.{% endif %}",
            "{% if add_generation_prompt %}<gen>{% endif %}",
        ));
        let msgs = [
            msg(ChatRole::System, "sys"),
            msg(ChatRole::User, "  x,y "),
            msg(ChatRole::Assistant, "a"),
            msg(ChatRole::User, "never"),
        ];
        let at = Location::Line(1);
        assert_eq!(
            t.render(&msgs, false, at).unwrap(),
            "<s>[user:x,y!2][assistant:a1]2."
        );
        assert!(t.render(&msgs, true, at).unwrap().ends_with("<gen>"));
    }

    #[test]
    fn trim_and_lstrip_blocks_as_transformers() {
        let t = compile("{% for m in messages %}\n    {{ m.content }}\n{% endfor %}\n");
        let out = t
            .render(
                &[msg(ChatRole::User, "a"), msg(ChatRole::Assistant, "b")],
                false,
                Location::Line(1),
            )
            .unwrap();
        assert_eq!(out, "    a\n    b\n");
    }

    #[test]
    fn raise_exception_is_a_one_line_error_naming_line_and_template() {
        let t = compile(
            "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation roles must alternate\nuser/assistant') }}{% endif %}ok",
        );
        let err = t
            .render(&[msg(ChatRole::Assistant, "a")], false, Location::Line(7))
            .unwrap_err();
        let s = err.to_string();
        assert!(!s.contains('\n'), "{s}");
        assert!(
            s.contains("conversation at line 7: the chat template (t.jinja) raised an exception: Conversation roles must alternate user/assistant"),
            "{s}"
        );
        assert_eq!(
            t.render(&[msg(ChatRole::User, "a")], false, Location::Line(1))
                .unwrap(),
            "ok"
        );
    }

    #[test]
    fn syntax_errors_and_generation_markers() {
        let err = ChatTemplate::new("{% for %}".into(), "x/tokenizer_config.json".into(), vec![])
            .unwrap_err();
        let s = err.to_string();
        assert!(
            s.starts_with("x/tokenizer_config.json: the chat template does not compile"),
            "{s}"
        );
        let t = compile(
            "{% for m in messages %}{%- generation -%}\n {{ m.content }}{% endgeneration %}|{% endfor %}",
        );
        assert_eq!(
            t.render(&[msg(ChatRole::Assistant, "a")], false, Location::Line(1))
                .unwrap(),
            "a|"
        );
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = compile(
            "{{ messages[0] | tojson }}|{{ messages[0] | tojson(indent=2) }}|{{ messages[0] | tojson(sort_keys=true, separators=[',', ':']) }}",
        );
        let mut m = msg(ChatRole::User, "é<x>");
        m.extra
            .insert("args".into(), serde_json::json!({"b": [1, 2.5], "a": null}));
        assert_eq!(
            t.render(&[m], false, Location::Line(1)).unwrap(),
            concat!(
                r#"{"role": "user", "content": "é<x>", "args": {"b": [1, 2.5], "a": null}}|"#,
                "{\n  \"role\": \"user\",\n  \"content\": \"é<x>\",\n  \"args\": {\n    \"b\": [\n      1,\n      2.5\n    ],\n    \"a\": null\n  }\n}|",
                r#"{"args":{"a":null,"b":[1,2.5]},"content":"é<x>","role":"user"}"#
            )
        );
    }

    #[test]
    fn strftime_now_formats_today() {
        let t = compile("{{ strftime_now('%Y') }}");
        let year: i32 = t
            .render(&[msg(ChatRole::User, "a")], false, Location::Line(1))
            .unwrap()
            .parse()
            .unwrap();
        assert!((2024..3000).contains(&year), "{year}");
    }

    #[test]
    fn model_dir_lookup_and_missing_template() {
        let dir = tempfile::tempdir().unwrap();
        let err = ChatTemplate::from_model_dir(dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tokenizer_config.json nor") && err.contains("--format alpaca or text"),
            "{err}"
        );
        std::fs::write(
            dir.path().join(TOKENIZER_CONFIG_FILE),
            r#"{"eos_token": {"content": "</s>"}}"#,
        )
        .unwrap();
        let err = ChatTemplate::from_model_dir(dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tokenizer_config.json has no `chat_template` and there is no"),
            "{err}"
        );
        assert!(!err.contains('\n'));
        std::fs::write(
            dir.path().join(TOKENIZER_CONFIG_FILE),
            r#"{"eos_token": {"content": "</s>"}, "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ eos_token }}"}]}"#,
        )
        .unwrap();
        let t = ChatTemplate::from_model_dir(dir.path()).unwrap();
        let m = [msg(ChatRole::User, "a")];
        assert_eq!(t.render(&m, false, Location::Line(1)).unwrap(), "D</s>");
        std::fs::write(dir.path().join(CHAT_TEMPLATE_FILE), "J{{ eos_token }}\n").unwrap();
        let t = ChatTemplate::from_model_dir(dir.path()).unwrap();
        assert_eq!(t.render(&m, false, Location::Line(1)).unwrap(), "J</s>");
        assert!(t.origin().ends_with(CHAT_TEMPLATE_FILE));
    }
}
