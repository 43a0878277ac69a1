//! Tenant-supplied text made safe for a terminal: agentctl's human output never lets a task's
//! artifact names, messages, ids or output move the cursor, change colours, set the window title
//! or reorder text. `-o json` prints the data unchanged (JSON escapes control characters itself).

use std::borrow::Cow;
use std::fmt::Write as _;

/// Characters a terminal would act on rather than show: C0 and C1 controls, DEL, and the Unicode
/// bidirectional overrides and isolates ("Trojan Source").
fn is_unsafe(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

fn escape_with(s: &str, keep: impl Fn(char) -> bool) -> Cow<'_, str> {
    if !s.chars().any(|c| is_unsafe(c) && !keep(c)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if !is_unsafe(c) || keep(c) {
            out.push(c);
            continue;
        }
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x100 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
        }
    }
    Cow::Owned(out)
}

/// For one-line fields (names, ids, messages): every control character escaped, newlines too.
pub fn line(s: &str) -> Cow<'_, str> {
    escape_with(s, |_| false)
}

/// For multi-line blocks (a program's stdout and stderr): newlines and tabs kept, every other
/// control character (escape sequences, carriage returns, ...) escaped.
pub fn block(s: &str) -> Cow<'_, str> {
    escape_with(s, |c| c == '\n' || c == '\t')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_untouched() {
        assert!(matches!(line("report-2024.csv ünïcödé"), Cow::Borrowed(_)));
        assert!(matches!(block("a\n\tb\n"), Cow::Borrowed(_)));
    }

    #[test]
    fn terminal_controls_are_escaped() {
        assert_eq!(line("a\nb"), "a\\nb");
        assert_eq!(line("\x1b]0;pwned\x07title"), "\\x1b]0;pwned\\x07title");
        assert_eq!(line("\x1b[2J\rX"), "\\x1b[2J\\rX");
        assert_eq!(line("\u{9b}31m"), "\\x9b31m");
        assert_eq!(line("abc\u{202E}gpj.exe"), "abc\\u{202e}gpj.exe");
        assert_eq!(line("\x7f"), "\\x7f");
        assert_eq!(block("ok\n\x1b[31mred\r\n"), "ok\n\\x1b[31mred\\r\n");
    }
}
