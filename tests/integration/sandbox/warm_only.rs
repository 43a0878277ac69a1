//! What only warm sandboxes need proving: each is used once, nothing of its warm-up shows, a
//! task sees exactly what it would see cold, and the pool keeps going when it is short.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use agenttask::domain::task::Language;
use agenttask::exec::local::{LocalBackend, LocalConfig, WarmConfig};
use agenttask::exec::{Job, Outcome, Termination};

use super::job;
use uuid::Uuid;

struct Host {
    backend: Arc<LocalBackend>,
    data_dir: std::path::PathBuf,
    _tmp: tempfile::TempDir,
}

fn host(warm: WarmConfig) -> Host {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let data_dir = tmp.path().join("data");
    let mut config = LocalConfig::new(&data_dir);
    config.warm = warm;
    let backend = Arc::new(LocalBackend::new(config).expect("local backend (run deploy/local/install-sandbox.sh)"));
    backend.start_warm_pool();
    Host { backend, data_dir, _tmp: tmp }
}

fn pool(python: usize, r: usize) -> WarmConfig {
    WarmConfig { python, r, max_idle: Duration::from_secs(600) }
}

impl Host {
    async fn full(&self) {
        assert!(self.backend.wait_warm(Duration::from_secs(60)).await, "the warm pool did not fill");
    }

    async fn run_warm(&self, j: Job) -> Outcome {
        self.full().await;
        let o = self.backend.run(j).await;
        assert_eq!(o.warm, Some(true), "{o:?}");
        o
    }

    fn warm_dirs(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.data_dir.join("run"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("warm-"))
            .collect();
        v.sort();
        v
    }
}

fn ok(o: &Outcome) -> &str {
    assert_eq!((&o.termination, o.exit_code), (&Termination::Exited, Some(0)), "{o:?}");
    &o.stdout.text
}

/// Python that prints, as JSON, everything a program can see of its own start: environment,
/// argv, `__main__`'s names, the files around it, open descriptors, stdin.
const PY_VIEW: &str = r#"import json, os, sys
env = {k: v for k, v in os.environ.items() if k != 'AGENTTASK_TASK_ID'}
view = {
    'env': env,
    'task_id_set': len(os.environ.get('AGENTTASK_TASK_ID', '')) == 36,
    'argv': sys.argv,
    'orig_file': __file__,
    'name': __name__,
    'globals': sorted(k for k in globals() if k not in ('json', 'os', 'sys', 'env')),
    'path': sys.path,
    'cwd': os.getcwd(),
    'work': sorted(os.listdir('/work')),
    'tmp': sorted(os.listdir('/tmp')),
    'shm': sorted(os.listdir('/dev/shm')),
    'out': sorted(os.listdir('/agenttask')),
    'fds': sorted(os.listdir('/proc/self/fd')),
    'stdin': sys.stdin.read(),
    'uid_is_not_root': os.getuid() != 0,
    'inputs_writable': os.access('/work/data.csv', os.W_OK),
    'data': open('/work/data.csv').read(),
}
print(json.dumps(view, sort_keys=True))
"#;

fn viewing(language: Language, code: &str) -> Job {
    let mut j = job(language, code);
    j.args = vec!["x y".into(), "-z".into()];
    j.env.insert("FOO".into(), "bar baz".into());
    j.env.insert("QUOTE".into(), "\"'); q('no')".into());
    j.stdin = Some("hello\n".into());
    j.files.insert("data.csv".into(), b"1,2\n".to_vec());
    j
}

#[tokio::test]
async fn a_warm_python_task_sees_exactly_what_a_cold_one_sees() {
    let cold = host(WarmConfig::off());
    let warm = host(pool(1, 0));
    let c = cold.backend.run(viewing(Language::Python, PY_VIEW)).await;
    assert_eq!(c.warm, None);
    let w = warm.run_warm(viewing(Language::Python, PY_VIEW)).await;
    let (cv, wv): (serde_json::Value, serde_json::Value) =
        (serde_json::from_str(ok(&c)).unwrap(), serde_json::from_str(ok(&w)).unwrap());
    assert_eq!(wv, cv, "warm view differs from cold");
    assert_eq!(cv["argv"], serde_json::json!(["main.py", "x y", "-z"]));
    assert_eq!(cv["env"]["FOO"], "bar baz");
    assert_eq!(cv["stdin"], "hello\n");
    assert_eq!(cv["tmp"], serde_json::json!([]), "nothing of the warm-up in /tmp");
    assert_eq!(cv["inputs_writable"], false);
    assert_eq!(cv["task_id_set"], true);
    // A traceback names the task's file and lines, not the loader.
    let code = "def f():\n    raise ValueError('boom')\nf()\n";
    let c = cold.backend.run(job(Language::Python, code)).await;
    let w = warm.run_warm(job(Language::Python, code)).await;
    assert_eq!((c.exit_code, w.exit_code), (Some(1), Some(1)));
    assert_eq!(w.stderr.text, c.stderr.text);
    assert!(!w.stderr.text.contains("agenttask"), "{}", w.stderr.text);
    // So does a syntax error, and `sys.exit` keeps its status.
    for code in ["x = (\n", "import sys\nsys.exit(7)\n"] {
        let c = cold.backend.run(job(Language::Python, code)).await;
        let w = warm.run_warm(job(Language::Python, code)).await;
        assert_eq!((w.exit_code, &w.stderr.text), (c.exit_code, &c.stderr.text), "{code:?}");
    }
}

/// R's view: its environment, `commandArgs()`, the global environment, the files around it,
/// stdin. R's per-session temporary directory has a random name, so only its presence counts.
const R_VIEW: &str = r#"env <- Sys.getenv(); env <- env[!(names(env) %in% c("AGENTTASK_TASK_ID", "R_SESSION_TMPDIR"))]
cat(paste(names(env), env, sep = "=", collapse = "\n"), "\n")
print(commandArgs())
print(commandArgs(trailingOnly = TRUE))
print(ls(all.names = TRUE))
print(sub("^Rtmp.*", "Rtmp", list.files("/tmp", all.files = TRUE, no.. = TRUE)))
print(list.files("/work", all.files = TRUE, no.. = TRUE))
print(getwd())
print(readLines(file("stdin")))
print(file.access("/work/data.csv", 2) == 0)
x <- 1 + 1
x
"#;

#[tokio::test]
async fn a_warm_r_task_sees_exactly_what_a_cold_one_sees() {
    let cold = host(WarmConfig::off());
    let warm = host(pool(0, 1));
    let c = cold.backend.run(viewing(Language::R, R_VIEW)).await;
    let w = warm.run_warm(viewing(Language::R, R_VIEW)).await;
    assert_eq!(ok(&w), ok(&c), "warm view differs from cold");
    assert!(ok(&c).contains("FOO=bar baz"), "{}", c.stdout.text);
    assert!(ok(&c).contains("\"--file=main.R\""), "{}", c.stdout.text);
    assert!(ok(&c).contains("[1] 2"), "top-level values print: {}", c.stdout.text);
    // An error at top level reads and exits as it does cold.
    let code = "cat('a\\n')\nstop('boom')\ncat('never\\n')\n";
    let c = cold.backend.run(job(Language::R, code)).await;
    let w = warm.run_warm(job(Language::R, code)).await;
    assert_eq!((w.exit_code, &w.stdout.text, &w.stderr.text), (c.exit_code, &c.stdout.text, &c.stderr.text));
    assert_eq!(c.exit_code, Some(1));
    assert!(c.stderr.text.contains("Error: boom"), "{}", c.stderr.text);
}

#[tokio::test]
async fn consecutive_tasks_never_share_a_process_a_scratch_or_a_file() {
    let h = host(pool(1, 0));
    let marker = format!("agenttask-marker-{}", Uuid::new_v4().simple());
    // The first task leaves files everywhere it may write and a daemon behind.
    let first = format!(
        r#"import os, subprocess
for p in ['/work/left', '/tmp/left', '/dev/shm/left', '/agenttask/left']:
    open(p, 'w').write('x')
subprocess.Popen(['/bin/sh', '-c', 'exec sleep 30 # {marker}'], start_new_session=True)
print(os.stat('/work').st_dev, os.stat('/tmp').st_dev)
"#
    );
    let a = h.run_warm(job(Language::Python, &first)).await;
    let a_dev = ok(&a).trim().to_owned();
    let host_side: Vec<String> = procs_with(&marker);
    assert!(host_side.is_empty(), "the first task's daemon outlived it: {host_side:?}");
    let second = format!(
        r#"import os
left = [p for p in ['/work/left', '/tmp/left', '/dev/shm/left', '/agenttask/left'] if os.path.exists(p)]
mine = [p for p in os.listdir('/proc') if p.isdigit()]
seen = [open('/proc/%s/cmdline' % p).read() for p in mine if os.path.exists('/proc/%s/cmdline' % p)]
print(left, [s for s in seen if '{marker}' in s], os.stat('/work').st_dev, os.stat('/tmp').st_dev)
"#
    );
    let b = h.run_warm(job(Language::Python, &second)).await;
    let out = ok(&b).trim().to_owned();
    assert!(out.starts_with("[] [] "), "the second task saw the first's files or processes: {out}");
    assert_ne!(out.trim_start_matches("[] [] "), a_dev, "the two tasks shared a scratch file system");
}

fn procs_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(marker) {
                found.push(cmdline);
            }
        }
    }
    found
}

#[tokio::test]
async fn a_burst_larger_than_the_pool_completes_with_cold_starts() {
    let h = host(pool(1, 0));
    h.full().await;
    let runs: Vec<_> = (0..4).map(|i| h.backend.run(job(Language::Python, &format!("print({i})")))).collect();
    let outs = futures_util::future::join_all(runs).await;
    for (i, o) in outs.iter().enumerate() {
        assert_eq!(ok(o), format!("{i}\n"));
    }
    let warm = outs.iter().filter(|o| o.warm == Some(true)).count();
    let cold = outs.iter().filter(|o| o.warm == Some(false)).count();
    assert!(warm >= 1 && cold >= 1 && warm + cold == 4, "warm {warm}, cold {cold}");
    // The pool refills after the burst.
    h.full().await;
}

#[tokio::test]
async fn a_task_that_sets_a_start_up_variable_starts_cold_and_gets_it() {
    let h = host(pool(1, 0));
    h.full().await;
    let mut j = job(Language::Python, "import os; print(os.environ['LC_ALL'])");
    j.env.insert("LC_ALL".into(), "C".into());
    let o = h.backend.run(j).await;
    assert_eq!(o.warm, Some(false), "a start-up variable must start the interpreter afresh");
    assert_eq!(ok(&o), "C\n");
    assert_eq!(h.backend.warm_idle(Language::Python), 1, "the idle warm sandbox stays for the next task");
}

#[tokio::test]
async fn limits_are_the_tasks_own_not_the_warm_ups() {
    let h = host(pool(1, 0));
    let mut j = job(Language::Python, "b = bytearray(200 * 1024 * 1024); print(len(b))");
    j.memory_bytes = 64 << 20;
    let o = h.run_warm(j).await;
    assert_eq!(o.termination, Termination::OomKilled, "{o:?}");
    let mut j = job(Language::Python, "while True: pass");
    j.timeout = Duration::from_secs(1);
    let o = h.run_warm(j).await;
    assert_eq!(o.termination, Termination::TimedOut, "{o:?}");
    // The task runs at normal priority, not the warm-up's.
    let o = h.run_warm(job(Language::Python, "import os; print(os.getpriority(os.PRIO_PROCESS, 0))")).await;
    assert_eq!(ok(&o), "0\n");
    // And the task's own rlimits, as a cold run gets them (the service lowers them itself when
    // it may, else through a helper of the sandbox's uid).
    let code = "import resource as r; print(r.getrlimit(r.RLIMIT_AS), r.getrlimit(r.RLIMIT_NOFILE))";
    let warm = h.run_warm(job(Language::Python, code)).await;
    let cold = host(pool(0, 0)).backend.run(job(Language::Python, code)).await;
    assert_eq!(ok(&warm), ok(&cold));
}

#[tokio::test]
async fn idle_sandboxes_are_replaced_after_the_maximum_idle_time_and_removed_at_shutdown() {
    let h = host(WarmConfig { python: 1, r: 0, max_idle: Duration::from_secs(1) });
    h.full().await;
    let before = h.warm_dirs();
    assert_eq!(before.len(), 1, "{before:?}");
    agenttask_eventually(Duration::from_secs(20), || {
        let now = h.warm_dirs();
        now.len() == 1 && now != before
    })
    .await;
    agenttask::exec::Backend::shutdown(&*h.backend).await;
    assert!(h.warm_dirs().is_empty(), "shutdown left warm sandboxes: {:?}", h.warm_dirs());
    let o = h.backend.run(job(Language::Python, "print(1)")).await;
    assert_eq!((ok(&o), o.warm), ("1\n", Some(false)), "after shutdown tasks start cold");
}

async fn agenttask_eventually(within: Duration, mut f: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + within;
    while !f() {
        assert!(std::time::Instant::now() < end, "condition not met within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
