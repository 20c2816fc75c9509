//! Text helpers of the tables: width in characters, cutting and wrapping.

/// Characters (not bytes) of `s`.
pub(super) fn len(s: &str) -> usize {
    s.chars().count()
}

/// `s` cut to `w` characters, the last one `…` when cut.
pub fn cut(s: &str, w: usize) -> String {
    if len(s) <= w {
        return s.to_string();
    }
    if w == 0 {
        return String::new();
    }
    let mut t: String = s.chars().take(w - 1).collect();
    t.push('…');
    t
}

/// `s` broken at spaces into lines of at most `width` characters, continuation lines
/// indented by `indent`; a word longer than a line is cut.
pub fn wrap(s: &str, width: usize, indent: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut line = String::new();
    for word in s.split(' ') {
        let prefix = if out.is_empty() { "" } else { indent };
        let cur = if line.is_empty() {
            len(prefix)
        } else {
            len(&line)
        };
        if !line.is_empty() && cur + 1 + len(word) > width {
            out.push(cut(&line, width));
            line.clear();
        }
        if line.is_empty() {
            line.push_str(if out.is_empty() { "" } else { indent });
            line.push_str(word);
        } else {
            line.push(' ');
            line.push_str(word);
        }
    }
    if !line.is_empty() {
        out.push(cut(&line, width));
    }
    out
}
