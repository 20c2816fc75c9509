//! A conversation as token ids with the assistant-only loss mask.

use std::ops::Range;

use super::{ChatMessage, ChatRole, ChatTemplate};
use crate::engine::data::{DataError, Location, one_line};

/// Renders `messages` with `template`, tokenises the text with `tokenizer` (no special
/// tokens added: they are in the text) and marks the tokens that are learned.
///
/// Returns `(ids, learned)`, equal to transformers'
/// `apply_chat_template(messages, tokenize=True)["input_ids"]` and the assistant mask of
/// TRL's `assistant_only_loss`: `learned[t]` is true exactly for the tokens of each
/// assistant message's rendered text and the end-of-turn token that closes it (e.g.
/// `<|im_end|>`), false for system / user / tool turns, the assistant header
/// (`<|im_start|>assistant\n`) and the whitespace after the end-of-turn token.
///
/// The span of assistant message `i` is found by rendering prefixes, as transformers'
/// tests and the fixture generator do: it starts where
/// `render(messages[..i], add_generation_prompt=true)` ends and ends where
/// `render(messages[..=i])` ends, minus trailing whitespace that follows a special token.
/// When the template renders a prefix differently from the whole conversation (Qwen3
/// drops the reasoning of earlier turns) or refuses to render it, the span is the message's content located in
/// the rendered text after the previous assistant span, plus a special token right after
/// it. A token is learned when its byte span overlaps an assistant span.
///
/// Errors: the template raised or failed, the tokenizer failed, or an assistant turn
/// cannot be located in the rendered text.
pub fn encode_conversation(
    template: &ChatTemplate,
    tokenizer: &tokenizers::Tokenizer,
    messages: &[ChatMessage],
    at: Location,
) -> Result<(Vec<u32>, Vec<bool>), DataError> {
    let text = template.render(messages, false, at)?;
    let specials: Vec<String> = tokenizer
        .get_added_tokens_decoder()
        .into_values()
        .filter(|t| t.special && !t.content.is_empty())
        .map(|t| t.content)
        .collect();
    let mut spans: Vec<Range<usize>> = Vec::new();
    let mut cursor = 0;
    for (i, m) in messages.iter().enumerate() {
        if m.role != ChatRole::Assistant {
            continue;
        }
        // A template may refuse a prefix (e.g. one that starts with an assistant turn);
        // then the span is located by content instead.
        let before = template.render(&messages[..i], true, at).ok();
        let through = template.render(&messages[..=i], false, at).ok();
        let span = if let (Some(before), Some(through)) = (before, through)
            && text.starts_with(&through)
            && through.starts_with(&before)
            && before.len() >= cursor
        {
            let end = trim_after_special(&text[..through.len()], before.len(), &specials);
            before.len()..end
        } else {
            locate_content(&text, cursor, &m.content, &specials).ok_or_else(|| {
                DataError::ChatTemplate {
                    reason: format!(
                        "conversation at {at}: cannot find assistant message {i} in the text the chat template ({}) renders; its prefixes render differently and the content does not appear as given",
                        template.origin().display()
                    ),
                }
            })?
        };
        cursor = span.end;
        spans.push(span);
    }
    let enc = tokenizer
        .encode(text.as_str(), false)
        .map_err(|e| DataError::Encode {
            tokenizer: "tokenizer.json".into(),
            reason: one_line(e),
        })?;
    let learned = enc
        .get_offsets()
        .iter()
        .map(|&(s, e)| {
            spans.iter().any(|r| {
                if s == e {
                    r.contains(&s)
                } else {
                    s < r.end && e > r.start
                }
            })
        })
        .collect();
    Ok((enc.get_ids().to_vec(), learned))
}

/// End of the span `start..prefix.len()` without the whitespace that follows a special
/// token at its end (`<|im_end|>\n` keeps `<|im_end|>`); unchanged otherwise.
fn trim_after_special(prefix: &str, start: usize, specials: &[String]) -> usize {
    let seg = &prefix[start..];
    let trimmed = seg.trim_end();
    if trimmed.len() < seg.len() && specials.iter().any(|s| trimmed.ends_with(s.as_str())) {
        start + trimmed.len()
    } else {
        prefix.len()
    }
}

/// The byte range of `content` (trimmed) in `text` at or after `from`, extended over a
/// special token that directly follows it.
fn locate_content(
    text: &str,
    from: usize,
    content: &str,
    specials: &[String],
) -> Option<Range<usize>> {
    let needle = content.trim();
    if needle.is_empty() {
        return None;
    }
    let start = from + text.get(from..)?.find(needle)?;
    let mut end = start + needle.len();
    if let Some(s) = specials
        .iter()
        .find(|s| text[end..].starts_with(s.as_str()))
    {
        end += s.len();
    }
    Some(start..end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;

    fn msg(role: ChatRole, content: &str) -> ChatMessage {
        ChatMessage {
            role,
            content: content.into(),
            extra: Map::new(),
        }
    }

    /// Qwen3's shape: only the last assistant turn gets a `<think>` block, so a prefix
    /// renders differently from the whole conversation; the earlier turn is located by
    /// content, the last one by prefixes (its think block is learned, as TRL does).
    #[test]
    fn prefix_inconsistent_templates_fall_back_to_the_content() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/hf/chat/tokenizer.json"
        );
        let tok = tokenizers::Tokenizer::from_file(path).unwrap();
        let template = ChatTemplate::new(
            concat!(
                "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}",
                "{%- if m.role == 'assistant' and loop.last %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}",
                "{{- m.content + '<|im_end|>\\n' }}{% endfor %}",
                "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
            )
            .into(),
            "qwen3-like".into(),
            vec![],
        )
        .unwrap();
        let messages = [
            msg(ChatRole::User, "q one"),
            msg(ChatRole::Assistant, "first answer"),
            msg(ChatRole::User, "q two"),
            msg(ChatRole::Assistant, "second answer"),
        ];
        let text = template
            .render(&messages, false, Location::Line(1))
            .unwrap();
        assert_eq!(text.matches("<think>").count(), 1, "{text}");
        let (ids, learned) =
            encode_conversation(&template, &tok, &messages, Location::Line(1)).unwrap();
        let enc = tok.encode(text.as_str(), false).unwrap();
        assert_eq!(ids, enc.get_ids());
        let learned_text: String = enc
            .get_offsets()
            .iter()
            .zip(&learned)
            .filter(|(_, l)| **l)
            .map(|(&(s, e), _)| &text[s..e])
            .collect();
        assert_eq!(
            learned_text,
            "first answer<|im_end|><think>\n\n</think>\n\nsecond answer<|im_end|>"
        );
    }

    #[test]
    fn trailing_whitespace_is_cut_only_after_a_special_token() {
        let specials = vec!["<|im_end|>".to_string()];
        let text = "hdr\nanswer<|im_end|>\n";
        assert_eq!(trim_after_special(text, 4, &specials), text.len() - 1);
        let text = "hdr\nanswer \n";
        assert_eq!(trim_after_special(text, 4, &specials), text.len());
        let text = "x answer<|im_end|>\nuser answer<|im_end|>";
        assert_eq!(
            locate_content(text, 9, " answer ", &specials),
            Some(24..text.len())
        );
        assert_eq!(locate_content(text, 0, "missing", &specials), None);
    }
}
