//! The local sandbox, as data: what bubblewrap is told, which system calls are denied, which
//! limits apply and how a run's end is classified. Nothing here spawns a process or touches the
//! file system; `exec::local` is the edge that does.
//!
//! # Layout
//! - [`bwrap`]: the bubblewrap options for one task (namespaces, the minimal root, binds, env).
//! - [`seccomp`]: the deny-list BPF program (x86_64, aarch64) handed to bubblewrap, compiled by seccompiler.
//! - [`limits`]: rlimits and cgroup numbers for a task, and the verdict on how a run ended.
//! - [`cgroup`]: where task cgroups go (v1 or v2), parsed from `/proc` text.
//! - [`warm`]: how a pre-started interpreter waits in its sandbox and takes one task.

pub mod bwrap;
pub mod cgroup;
pub mod limits;
pub mod seccomp;
pub mod warm;

use std::ffi::OsString;
use std::path::Path;

use crate::domain::outcome::Captured;
use crate::domain::task::Language;

/// The name of the code file in the working directory: `main.py` / `main.R`, or a name that
/// cannot clash when an input file already has that name.
pub fn code_file_name<'a>(language: Language, mut input_names: impl Iterator<Item = &'a str>) -> &'static str {
    let (preferred, fallback) = match language {
        Language::Python => ("main.py", "__agenttask_main__.py"),
        Language::R => ("main.R", "__agenttask_main__.R"),
    };
    if input_names.any(|n| n == preferred) {
        fallback
    } else {
        preferred
    }
}

/// The runtime's argv inside the sandbox (relative code path; the working directory is /work).
///
/// Python runs isolated (`-I`: no `PYTHON*` variables, no user site-packages) and writes no
/// bytecode (`-B`); R runs `--vanilla` (no profiles, no saved workspace, no site environ).
pub fn runtime_command(
    language: Language,
    python: &Path,
    rscript: &Path,
    code_file: &str,
    args: &[String],
) -> Vec<OsString> {
    let mut argv: Vec<OsString> = match language {
        Language::Python => vec![python.into(), "-I".into(), "-B".into(), code_file.into()],
        Language::R => vec![rscript.into(), "--vanilla".into(), code_file.into()],
    };
    argv.extend(args.iter().map(OsString::from));
    argv
}

/// Turns captured bytes into the result's text: lossy UTF-8 with NULs replaced, never longer
/// than `cap` bytes. `overflowed` says bytes were dropped while reading.
pub fn captured_text(bytes: &[u8], cap: usize, overflowed: bool) -> Captured {
    let mut bytes = &bytes[..bytes.len().min(cap)];
    let mut truncated = overflowed;
    // A multi-byte character cut by the cap would become U+FFFD: drop its first bytes instead.
    if overflowed {
        if let Err(e) = std::str::from_utf8(&bytes[bytes.len().saturating_sub(4)..]) {
            if e.error_len().is_none() {
                let start = bytes.len().saturating_sub(4) + e.valid_up_to();
                bytes = &bytes[..start];
            }
        }
    }
    let mut text = crate::domain::result::storable_text(&String::from_utf8_lossy(bytes)).into_owned();
    if text.len() > cap {
        // Replacement characters are longer than the bytes they replace.
        let mut end = cap;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        truncated = true;
    }
    Captured { text, truncated }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_file_names() {
        assert_eq!(code_file_name(Language::Python, ["a.csv"].into_iter()), "main.py");
        assert_eq!(code_file_name(Language::Python, ["main.py"].into_iter()), "__agenttask_main__.py");
        assert_eq!(code_file_name(Language::R, std::iter::empty()), "main.R");
    }

    #[test]
    fn runtime_commands() {
        let py = runtime_command(
            Language::Python,
            Path::new("/usr/bin/python3"),
            Path::new("/usr/bin/Rscript"),
            "main.py",
            &["a b".into()],
        );
        assert_eq!(py, ["/usr/bin/python3", "-I", "-B", "main.py", "a b"].map(OsString::from));
        let r =
            runtime_command(Language::R, Path::new("/usr/bin/python3"), Path::new("/usr/bin/Rscript"), "main.R", &[]);
        assert_eq!(r, ["/usr/bin/Rscript", "--vanilla", "main.R"].map(OsString::from));
    }

    #[test]
    fn captured_text_caps_and_cleans() {
        // Output is made storable and printable: invalid UTF-8 and NUL both become U+FFFD.
        assert_eq!(captured_text(b"a\0b\xffc", 100, false).text, "a\u{FFFD}b\u{FFFD}c");
        assert_eq!(captured_text(b"hi\0", 10, false), Captured { text: "hi\u{FFFD}".into(), truncated: false });
        assert_eq!(captured_text(b"hello", 3, true), Captured { text: "hel".into(), truncated: true });
        // "é" is two bytes; a cap that cuts it drops it whole.
        assert_eq!(captured_text("aé".as_bytes(), 2, true), Captured { text: "a".into(), truncated: true });
        // Invalid bytes grow into 3-byte replacement characters but never past the cap.
        let c = captured_text(&[0xff; 10], 10, false);
        assert!(c.text.len() <= 10 && c.truncated);
    }
}
