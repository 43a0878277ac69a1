//! Warm sandboxes, as data: how a pre-started interpreter waits inside its sandbox, and the bytes
//! that hand it one task.
//!
//! A warm sandbox is a complete cold sandbox (same bubblewrap options, uid, cgroups, seccomp and
//! scratch) whose command, instead of the task's program, is the interpreter waiting for a task:
//!
//! - **Python** runs [`PYTHON_LOADER`] with `-I -B -c`. It opens the FIFO [`inside::HANDOFF`],
//!   reads a NUL-separated [`python_handoff`] to its end, sets `sys.argv` and the task's
//!   environment, cleans `__main__` and runs `/work/<code file>` compiled under that name, so
//!   tracebacks, `__file__` and `sys.argv[0]` read as in a cold run.
//! - **R** runs `Rscript --vanilla <FIFO>`: R's own read-eval-print loop reads the FIFO
//!   expression by expression, exactly as it reads `main.R` in a cold run (auto-printing, `Error:`
//!   messages, `Execution halted`, the exit status). At warm-up the service writes
//!   [`R_READY_LINE`], which creates [`inside::READY_MARKER`] once R has started; the task's
//!   [`r_handoff`] is then a one-line prologue (the task's environment and `commandArgs()`)
//!   followed by the task's code.
//!
//! The service opens the FIFO's write end once the interpreter has it open and removes its name at
//! once, so nothing of the hand-off is left in the task's file system; the ready marker is removed
//! before the task's code is written.
//!
//! A few things only a fresh process can take from its environment at start (the locale, the
//! time zone, the dynamic loader's and allocators' variables, R's start-up variables);
//! [`cold_start_needed`] sends a task that sets one of them to a cold start.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;

use crate::domain::task::Language;

/// Where things are inside a warm sandbox (the scratch's `/tmp`, owned by the task's uid).
pub mod inside {
    /// The FIFO the interpreter reads its task from; unlinked as soon as it is open.
    pub const HANDOFF: &str = "/tmp/.agenttask-handoff";
    /// Created by R once it has started and reads the FIFO; removed before the task is written.
    pub const READY_MARKER: &str = "/tmp/.agenttask-ready";
}

/// The same two names relative to the scratch's `tmp/` directory on the host.
pub const HANDOFF_NAME: &str = ".agenttask-handoff";
pub const READY_MARKER_NAME: &str = ".agenttask-ready";

/// First field of a Python hand-off: the loader refuses anything else.
const PYTHON_HANDOFF_VERSION: &str = "agenttask-warm-1";

/// The Python loader (`python3 -I -B -c PYTHON_LOADER`). It imports nothing that a cold start
/// has not already imported, defines one function in `__main__` and removes it again, and closes
/// the FIFO before the task's code runs. A hand-off it cannot read (the service discarded the
/// sandbox) ends the process with status 70 before any code runs.
pub const PYTHON_LOADER: &str = r#"def _agenttask_warm():
    import os, sys
    m = sys.modules['__main__'].__dict__
    del m['_agenttask_warm']
    fd = os.open('/tmp/.agenttask-handoff', os.O_RDONLY)
    parts = []
    while True:
        b = os.read(fd, 1 << 16)
        if not b:
            break
        parts.append(b)
    os.close(fd)
    f = [os.fsdecode(x) for x in b''.join(parts).split(b'\0')]
    if len(f) < 5 or f[0] != 'agenttask-warm-1' or f[-1] != '':
        os._exit(70)
    path, argv0, nargs = f[1], f[2], int(f[3])
    args = f[4:4 + nargs]
    env = f[4 + nargs:-1]
    for i in range(0, len(env) - 1, 2):
        os.environ[env[i]] = env[i + 1]
    sys.argv = [argv0] + args
    for k in [k for k in m if k not in ('__name__', '__builtins__', '__doc__', '__package__', '__spec__')]:
        del m[k]
    m['__annotations__'] = {}
    m['__file__'] = path
    m['__cached__'] = None
    m['__loader__'] = sys.modules['_frozen_importlib_external'].SourceFileLoader('__main__', path)
    try:
        with open(path, 'rb') as fh:
            code = compile(fh.read(), path, 'exec', dont_inherit=True)
        exec(code, m)
    except SystemExit:
        raise
    except BaseException as e:
        tb = e.__traceback__.tb_next if e.__traceback__ else None
        sys.excepthook(type(e), e.with_traceback(tb), tb)
        sys.exit(1)
_agenttask_warm()
"#;

/// Written to R's FIFO at warm-up: R evaluates it once it has started and reads its input.
pub const R_READY_LINE: &str = "invisible(file.create(\"/tmp/.agenttask-ready\"))\n";

/// The waiting interpreter's argv inside the sandbox.
pub fn warm_command(language: Language, python: &Path, rscript: &Path) -> Vec<OsString> {
    match language {
        Language::Python => vec![python.into(), "-I".into(), "-B".into(), "-c".into(), PYTHON_LOADER.into()],
        Language::R => vec![rscript.into(), "--vanilla".into(), inside::HANDOFF.into()],
    }
}

/// Why a task must start cold: the name of a variable of its environment that the interpreter
/// or the C library reads only when the process starts, or `None` when a warm sandbox gives the
/// same run as a cold one.
pub fn cold_start_needed(env: &BTreeMap<String, String>) -> Option<&str> {
    const EXACT: &[&str] = &["LANG", "LANGUAGE", "TZ", "GLIBC_TUNABLES", "HOSTALIASES", "RES_OPTIONS"];
    const PREFIXES: &[&str] = &["LC_", "LD_", "MALLOC_", "R_", "OMP_", "GOMP_", "OPENBLAS_", "MKL_"];
    env.keys().find(|k| EXACT.contains(&k.as_str()) || PREFIXES.iter().any(|p| k.starts_with(p))).map(String::as_str)
}

/// A hand-off that cannot be written (a NUL byte, which no argv or environment can hold).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoffError(pub &'static str);

impl std::fmt::Display for HandoffError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} contains a NUL byte", self.0)
    }
}

impl std::error::Error for HandoffError {}

fn no_nul(what: &'static str, s: &str) -> Result<(), HandoffError> {
    if s.contains('\0') {
        Err(HandoffError(what))
    } else {
        Ok(())
    }
}

/// The Python loader's input: version, absolute code path, `argv[0]`, the argument count, the
/// arguments, then environment names and values; every field ends with a NUL.
pub fn python_handoff(code_file: &str, args: &[String], env: &[(String, String)]) -> Result<Vec<u8>, HandoffError> {
    let path = format!("{}/{code_file}", crate::sandbox::bwrap::inside::WORK_DIR);
    let count = args.len().to_string();
    let mut fields: Vec<&str> = vec![PYTHON_HANDOFF_VERSION, &path, code_file, &count];
    for a in args {
        no_nul("a program argument", a)?;
        fields.push(a);
    }
    for (k, v) in env {
        no_nul("an environment entry", k)?;
        no_nul("an environment entry", v)?;
        fields.push(k);
        fields.push(v);
    }
    let mut out = Vec::with_capacity(fields.iter().map(|f| f.len() + 1).sum());
    for f in fields {
        out.extend_from_slice(f.as_bytes());
        out.push(0);
    }
    Ok(out)
}

/// R's input after the ready line: one prologue line that sets the task's environment and makes
/// `commandArgs()` answer as `Rscript --vanilla <code file> <args>` would, then the code.
pub fn r_handoff(
    code_file: &str,
    code: &str,
    args: &[String],
    env: &[(String, String)],
) -> Result<Vec<u8>, HandoffError> {
    for a in args {
        no_nul("a program argument", a)?;
    }
    for (k, v) in env {
        no_nul("an environment entry", k)?;
        no_nul("an environment entry", v)?;
    }
    let names = r_vector(env.iter().map(|(k, _)| k.as_str()));
    let values = r_vector(env.iter().map(|(_, v)| v.as_str()));
    let file_arg = r_string(&format!("--file={code_file}"));
    let trailing = r_vector(args.iter().map(String::as_str));
    // The prologue is one top-level expression, so the code's own line numbers are unchanged in
    // what R reports, and invisible, so it prints nothing.
    let prologue = format!(
        "invisible(local({{do.call(Sys.setenv, as.list(setNames({values}, {names}))); \
         a <- .Internal(commandArgs()); t <- {trailing}; \
         full <- c(a[seq_len(min(4L, length(a)))], {file_arg}, if (length(t)) c(\"--args\", t)); \
         f <- function(trailingOnly = FALSE) {{ if (trailingOnly) {{ m <- match(\"--args\", full, 0L); \
         if (m) full[-seq_len(m)] else character() }} else full }}; \
         e <- new.env(parent = .BaseNamespaceEnv); assign(\"full\", full, envir = e); environment(f) <- e; \
         unlockBinding(\"commandArgs\", .BaseNamespaceEnv); assign(\"commandArgs\", f, envir = .BaseNamespaceEnv); \
         lockBinding(\"commandArgs\", .BaseNamespaceEnv)}}))\n"
    );
    let mut out = prologue.into_bytes();
    out.extend_from_slice(code.as_bytes());
    out.push(b'\n');
    Ok(out)
}

/// An R character vector of byte-exact literals.
fn r_vector<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let items: Vec<String> = items.map(r_string).collect();
    if items.is_empty() {
        "character()".into()
    } else {
        format!("c({})", items.join(", "))
    }
}

/// An R string literal holding exactly `s`: every byte as a `\xHH` escape (nothing of `s` is
/// ever parsed as code), in pieces of at most 256 bytes joined by `paste0`.
fn r_string(s: &str) -> String {
    if s.is_empty() {
        return "\"\"".into();
    }
    let pieces: Vec<String> = s
        .as_bytes()
        .chunks(256)
        .map(|chunk| {
            let mut lit = String::with_capacity(2 + 4 * chunk.len());
            lit.push('"');
            for b in chunk {
                lit.push_str(&format!("\\x{b:02x}"));
            }
            lit.push('"');
            lit
        })
        .collect();
    if pieces.len() == 1 {
        pieces.into_iter().next().unwrap_or_default()
    } else {
        format!("paste0({})", pieces.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn python_handoff_fields_are_nul_terminated_in_order() {
        let h = python_handoff("main.py", &["a b".into(), "".into()], &env(&[("K", "v=1"), ("E", "")])).unwrap();
        let fields: Vec<&[u8]> = h.split(|&b| b == 0).collect();
        assert_eq!(
            fields,
            [&b"agenttask-warm-1"[..], b"/work/main.py", b"main.py", b"2", b"a b", b"", b"K", b"v=1", b"E", b"", b""]
        );
        assert_eq!(python_handoff("main.py", &["x\0y".into()], &[]), Err(HandoffError("a program argument")));
        assert!(python_handoff("main.py", &[], &env(&[("K", "a\0")])).is_err());
    }

    #[test]
    fn the_loader_checks_the_same_version_it_is_sent() {
        assert!(PYTHON_LOADER.contains(&format!("'{PYTHON_HANDOFF_VERSION}'")));
        assert!(PYTHON_LOADER.contains(&format!("'{}'", inside::HANDOFF)));
        assert!(R_READY_LINE.contains(inside::READY_MARKER));
        assert!(inside::HANDOFF.ends_with(HANDOFF_NAME) && inside::READY_MARKER.ends_with(READY_MARKER_NAME));
    }

    #[test]
    fn r_literals_are_only_hex_escapes() {
        assert_eq!(r_string(""), "\"\"");
        assert_eq!(
            r_string("a\"); system('x')"),
            "\"\\x61\\x22\\x29\\x3b\\x20\\x73\\x79\\x73\\x74\\x65\\x6d\\x28\\x27\\x78\\x27\\x29\""
        );
        assert_eq!(r_string("é"), "\"\\xc3\\xa9\"");
        let long = r_string(&"x".repeat(600));
        assert!(long.starts_with("paste0(\"") && long.matches('"').count() == 6, "{long}");
        assert_eq!(r_vector(std::iter::empty()), "character()");
    }

    #[test]
    fn r_handoff_is_one_prologue_line_then_the_code() {
        let h = r_handoff("main.R", "cat(1)", &["--x".into()], &env(&[("HOME", "/work")])).unwrap();
        let text = String::from_utf8(h).unwrap();
        let (prologue, code) = text.split_once('\n').unwrap();
        assert!(prologue.starts_with("invisible(local({") && prologue.ends_with("}))"));
        assert!(prologue.contains(&r_string("--file=main.R")) && prologue.contains(&r_string("--x")));
        assert_eq!(code, "cat(1)\n");
        assert!(r_handoff("main.R", "", &[], &env(&[("K", "a\0")])).is_err());
    }

    #[test]
    fn start_up_variables_force_a_cold_start() {
        let mut e = BTreeMap::new();
        e.insert("FOO".to_string(), "1".to_string());
        // `-I` makes a cold Python ignore its PYTHON* variables too.
        e.insert("PYTHONPATH".to_string(), "/x".to_string());
        assert_eq!(cold_start_needed(&e), None);
        for k in ["LANG", "LC_ALL", "LD_PRELOAD", "R_LIBS_USER", "TZ", "OMP_NUM_THREADS", "MALLOC_ARENA_MAX"] {
            let mut e = BTreeMap::new();
            e.insert(k.to_string(), "x".to_string());
            assert_eq!(cold_start_needed(&e), Some(k));
        }
    }

    #[test]
    fn commands() {
        let py = warm_command(Language::Python, Path::new("/usr/bin/python3"), Path::new("/usr/bin/Rscript"));
        assert_eq!(&py[..4], &["/usr/bin/python3", "-I", "-B", "-c"].map(OsString::from));
        let r = warm_command(Language::R, Path::new("/usr/bin/python3"), Path::new("/usr/bin/Rscript"));
        assert_eq!(r, ["/usr/bin/Rscript", "--vanilla", inside::HANDOFF].map(OsString::from));
    }
}
