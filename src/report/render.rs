//! The comparison table as text and Markdown: [`Table::render_text`] fits a width (columns
//! abbreviated, then dropped in [`super::table::DROP_ORDER`]; a line that still does not fit
//! is cut with `…`), [`Table::render_md`] keeps every column.

use super::table::Table;
use super::text::{cut, len, wrap};

impl Table {
    /// The table as text lines fitted to `width` (see [`Table::layout`]), no line longer than
    /// `width`: the constant axes, the table, the causes when cut, the winner lines, notes and
    /// the legend.
    pub fn render_text(&self, width: usize) -> String {
        let width = width.max(20);
        let layout = self.layout(width, 2);
        let mut lines: Vec<String> = Vec::new();
        if let Some(h) = self.axes.header_line() {
            lines.extend(wrap(&h, width, "  "));
        }
        let pad = |s: &str, w: usize, right: bool| {
            let n = w.saturating_sub(len(s));
            if right {
                format!("{}{s}", " ".repeat(n))
            } else {
                format!("{s}{}", " ".repeat(n))
            }
        };
        let sep = " ".repeat(layout.spacing);
        let line = |cells: Vec<String>| -> String {
            let parts: Vec<String> = cells
                .iter()
                .enumerate()
                .map(|(k, s)| {
                    let col = &self.columns[layout.columns[k]];
                    pad(s, layout.widths[k], col.right)
                })
                .collect();
            cut(parts.join(&sep).trim_end(), width)
        };
        let titles: Vec<String> = (0..layout.columns.len())
            .map(|k| self.title(&layout, k).to_string())
            .collect();
        lines.push(line(titles));
        let total = layout.widths.iter().sum::<usize>()
            + layout.spacing * layout.widths.len().saturating_sub(1);
        lines.push("-".repeat(total.min(width)));
        for r in 0..self.rows.len() {
            let cells = (0..layout.columns.len())
                .map(|k| self.cell_text(&layout, r, k))
                .collect();
            lines.push(line(cells));
        }
        if layout.causes_below {
            for r in self.rows.iter().filter(|r| r.cause.is_some()) {
                let c = r.cause.as_deref().unwrap_or("");
                lines.extend(wrap(&format!("{}: {c}", r.name), width, "    "));
            }
        }
        let mut rest: Vec<String> = self.winners.clone();
        rest.extend(self.notes.iter().map(|n| format!("note: {n}")));
        if !rest.is_empty() {
            lines.push(String::new());
        }
        for l in rest {
            lines.extend(wrap(&l, width, "  "));
        }
        lines.push(String::new());
        for l in self.legend(Some(&layout)) {
            lines.extend(wrap(&l, width, "    "));
        }
        let mut out = lines.join("\n");
        out.push('\n');
        out
    }

    /// The table as Markdown: every column in full, then the winner lines, notes and legend.
    pub fn render_md(&self) -> String {
        let esc = md_escape;
        let mut out = String::new();
        if let Some(h) = self.axes.header_line() {
            out.push_str(&format!("{}\n\n", esc(&h)));
        }
        let titles: Vec<String> = self.columns.iter().map(|c| esc(&c.title)).collect();
        out.push_str(&format!("| {} |\n|", titles.join(" | ")));
        for c in &self.columns {
            out.push_str(if c.right { "---:|" } else { "---|" });
        }
        out.push('\n');
        for r in &self.rows {
            let cells: Vec<String> = r.cells.iter().map(|c| esc(&c.text)).collect();
            out.push_str(&format!("| {} |\n", cells.join(" | ")));
        }
        out.push('\n');
        for w in &self.winners {
            out.push_str(&format!("- {}\n", esc(w)));
        }
        for n in &self.notes {
            out.push_str(&format!("- note: {}\n", esc(n)));
        }
        out.push('\n');
        for l in self.legend(None) {
            out.push_str(&format!("- {}\n", esc(&l)));
        }
        out
    }
}

/// `s` as one line of Markdown text: line breaks become spaces, `|` and `*` are escaped (so a
/// label neither splits a table cell nor starts emphasis).
pub(crate) fn md_escape(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
        .replace('|', "\\|")
        .replace('*', "\\*")
}
