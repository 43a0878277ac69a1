//! What agentctl draws for people beyond plain text: phases in colour and progress bars.
//!
//! Colour only where a person looks at it (the stream is a terminal) and only if they have not
//! asked for none (`NO_COLOR`, https://no-color.org: set to anything non-empty). Progress bars
//! only on a terminal (on stderr, so stdout stays clean for programs), and without colour under
//! `NO_COLOR`. A few ANSI codes do not need a crate.

use std::io::IsTerminal as _;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::domain::phase::Phase;

/// Whether `NO_COLOR` asks for no colour (set and non-empty, as the convention says).
pub fn no_color() -> bool {
    std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty())
}

/// Whether tables on stdout get coloured phases.
pub fn stdout_colour() -> bool {
    std::io::stdout().is_terminal() && !no_color()
}

/// `phase` as text, coloured when `colour`: green for success, red for failure and rejection,
/// yellow for cancelled, blue while admitted, the terminal's own colour while queued.
///
/// Every code has the same length (`ESC[3Nm` … `ESC[0m`): tables measure cells in bytes, so a
/// whole column padded by the same amount stays aligned.
pub fn phase(phase: Phase, colour: bool) -> String {
    if !colour {
        return phase.to_string();
    }
    let code = match phase {
        Phase::Succeeded => 2,
        Phase::Failed | Phase::Rejected => 1,
        Phase::Cancelled => 3,
        Phase::Pending | Phase::Scheduled | Phase::Running => 4,
        Phase::Queued => 9,
    };
    format!("\x1b[3{code}m{phase}\x1b[0m")
}

/// A header cell over a column of [`phase`]s: with colour, wrapped in codes of the same length
/// (the terminal's default colour), so the header measures like the cells below it.
pub fn phase_header(text: &str, colour: bool) -> String {
    if colour {
        format!("\x1b[39m{text}\x1b[0m")
    } else {
        text.to_owned()
    }
}

/// A progress bar of `total` (`None` until it is known) on stderr, or a hidden one when stderr
/// is not a terminal.
pub fn progress_bar(total: Option<u64>) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = total.map_or_else(ProgressBar::no_length, ProgressBar::new);
    let template = if no_color() {
        "{spinner} {elapsed_precise} [{bar:30}] {pos}/{len} {msg}"
    } else {
        "{spinner:.green} {elapsed_precise} [{bar:30.cyan/blue}] {pos}/{len} {msg}"
    };
    // The templates are constants, so a parse failure is a bug here: fall back to the default.
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_plain_without_colour_and_equally_padded_with_it() {
        for p in Phase::ALL {
            assert_eq!(phase(p, false), p.as_str());
            let c = phase(p, true);
            assert!(c.starts_with("\x1b[3") && c.ends_with("\x1b[0m") && c.contains(p.as_str()), "{c:?}");
            assert_eq!(c.len() - p.as_str().len(), 9, "{p}: every colour adds the same bytes");
        }
        assert_eq!(phase(Phase::Failed, true), "\x1b[31mFailed\x1b[0m");
        assert_eq!(phase(Phase::Succeeded, true), "\x1b[32mSucceeded\x1b[0m");
    }
}
