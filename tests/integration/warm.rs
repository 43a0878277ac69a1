//! What only warm (pre-started) sandboxes must prove, beyond the attack suite that runs against
//! them too (`sandbox_warm`): single use, nothing left by warm-up, the task's environment only,
//! bursts beyond the pool, idle replacement, metrics and shutdown.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agenttask::domain::task::Language;
use agenttask::exec::local::{LocalBackend, LocalConfig};
use agenttask::exec::{Backend, Job, Outcome, RunKey};
use uuid::Uuid;

struct Pool {
    backend: Arc<LocalBackend>,
    data_dir: PathBuf,
    _tmp: tempfile::TempDir,
}

fn pool(python: usize, tweak: impl FnOnce(&mut LocalConfig)) -> Pool {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let data_dir = tmp.path().join("data");
    let mut config = LocalConfig::new(&data_dir);
    config.warm_pool.python = python;
    tweak(&mut config);
    let backend = Arc::new(LocalBackend::new(config).expect("local backend"));
    backend.start_warm_pool();
    Pool {
        backend,
        data_dir,
        _tmp: tmp,
    }
}

fn py(code: &str) -> Job {
    Job {
        key: RunKey {
            task_id: Uuid::new_v4(),
            attempt: 1,
        },
        tenant: "acme".into(),
        language: Language::Python,
        code: code.into(),
        files: BTreeMap::new(),
        stdin: None,
        args: Vec::new(),
        env: BTreeMap::new(),
        timeout: Duration::from_secs(10),
        cpu_millis: 1000,
        memory_bytes: 256 << 20,
        isolation: "standard".into(),
        labels: BTreeMap::new(),
        batch_id: None,
        priority: 0,
        artifact_quota_bytes: 1 << 30,
    }
}

impl Pool {
    async fn ready(&self, n: usize) {
        let t = Instant::now();
        while self.backend.warm_ready(Language::Python) < n {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "pool not filled in 60 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Runs `job` in a warm sandbox (waits for one first) and checks it was one.
    async fn warm_run(&self, job: Job) -> Outcome {
        self.ready(1).await;
        let o = self.backend.run(job).await;
        assert_eq!(o.warm, Some(true), "{o:?}");
        assert_eq!(o.exit_code, Some(0), "{o:?}");
        o
    }
}

/// What a task can see of its sandbox: its files, descriptors, environment, argv, `__main__`.
const INSPECT: &str = r#"
import os, sys
for top in ("/work", "/tmp", "/dev/shm", "/agenttask"):
    for root, dirs, files in os.walk(top):
        for n in sorted(dirs + files):
            p = os.path.join(root, n)
            print("entry", p, oct(os.lstat(p).st_mode), os.access(p, os.W_OK))
print("fds", sorted(os.listdir("/proc/self/fd")))
print("env", sorted(k for k in os.environ))
print("argv", sys.argv)
print("main", sorted(globals()))
print("file", __file__, __name__, type(__loader__).__name__)
print("path", sys.path)
print("cwd", os.getcwd())
print("stdin", os.path.realpath("/proc/self/fd/0"), sys.stdin.read())
"#;

#[tokio::test]
async fn warm_up_leaves_nothing_that_a_cold_run_does_not_show() {
    let cold = pool(0, |_| {});
    let warm = pool(1, |_| {});
    let mut j = py(INSPECT);
    j.files.insert("data.txt".into(), b"x".to_vec());
    j.args = vec!["a".into()];
    j.env.insert("FOO".into(), "1".into());
    let c = cold.backend.run(j.clone()).await;
    assert_eq!(c.warm, None);
    assert_eq!(c.exit_code, Some(0), "{c:?}");
    let w = warm.warm_run(j).await;
    assert_eq!(
        w.stdout.text, c.stdout.text,
        "warm:\n{}\ncold:\n{}",
        w.stdout.text, c.stdout.text
    );
    // The positive signal: the listing saw the input file, read-only, and the task's variable.
    assert!(
        w.stdout
            .text
            .contains("entry /work/data.txt 0o100444 False"),
        "{}",
        w.stdout.text
    );
    assert!(w.stdout.text.contains("'FOO'"), "{}", w.stdout.text);
    assert!(
        w.stdout.text.contains("stdin /dev/null \n"),
        "{}",
        w.stdout.text
    );
}

#[tokio::test]
async fn a_warm_tasks_environment_is_only_what_it_asked_for() {
    let p = pool(1, |_| {});
    let mut j = py(r#"
import os, subprocess
print(sorted(os.environ.items()))
print(subprocess.run(["/usr/bin/env"], capture_output=True, text=True).stdout.count("\n"))
"#);
    j.env.insert("FOO".into(), "bar".into());
    let id = j.task_id().to_string();
    let o = p.warm_run(j).await;
    // The task's own variable and ours; `PWD` is what bubblewrap's --chdir sets in a cold run.
    let want = format!(
        "[('AGENTTASK_ARTIFACTS_DIR', '/agenttask/artifacts'), ('AGENTTASK_RESULT_FILE', '/agenttask/result.json'), ('AGENTTASK_TASK_ID', '{id}'), ('FOO', 'bar'), ('HOME', '/work'), ('LANG', 'C.UTF-8'), ('PATH', '/usr/local/bin:/usr/bin:/bin'), ('PWD', '/work'), ('TMPDIR', '/tmp')]\n9\n"
    );
    assert_eq!(o.stdout.text, want);
}

#[tokio::test]
async fn consecutive_warm_tasks_never_share_a_process_scratch_or_file() {
    let p = pool(1, |_| {});
    let code = r#"
import os
for d in ("/work", "/tmp", "/dev/shm", "/agenttask"):
    print(d, sorted(os.listdir(d)), os.stat(d).st_dev)
    try:
        open(os.path.join(d, "left-by-a-task"), "w").write("x")
    except OSError as e:
        print("cannot write", d, e.errno)
stat = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
print("process", os.readlink("/proc/self/ns/pid"), stat[19], os.getpid())
"#;
    let a = p.warm_run(py(code)).await;
    let b = p.warm_run(py(code)).await;
    let lines = |o: &Outcome| o.stdout.text.lines().map(String::from).collect::<Vec<_>>();
    let (la, lb) = (lines(&a), lines(&b));
    assert_eq!(la.len(), 5, "{}", a.stdout.text);
    for (x, y) in la.iter().zip(&lb).take(4) {
        // Same listing (nothing left by the first task), different file systems.
        assert!(!y.contains("left-by-a-task"), "{y}");
        let dev = |l: &str| l.rsplit(' ').next().unwrap().to_string();
        assert_ne!(dev(x), dev(y), "{x} / {y}");
    }
    // Another pid namespace and another process (start time in ticks since boot).
    let proc_of = |l: &str| l.split(' ').nth(1).unwrap().to_string();
    assert_ne!(proc_of(&la[4]), proc_of(&lb[4]), "{} / {}", la[4], lb[4]);
    assert_ne!(la[4], lb[4]);
}

#[tokio::test]
async fn a_burst_larger_than_the_pool_completes_with_cold_starts() {
    let p = pool(1, |_| {});
    p.ready(1).await;
    let m = p.backend.warm_metrics();
    let runs = (0..4).map(|_| p.backend.run(py("print(1)")));
    let outs = futures_util::future::join_all(runs).await;
    for o in &outs {
        assert_eq!(o.exit_code, Some(0), "{o:?}");
        assert_eq!(o.stdout.text, "1\n");
    }
    let warm = outs.iter().filter(|o| o.warm == Some(true)).count();
    let cold = outs.iter().filter(|o| o.warm == Some(false)).count();
    assert!(
        warm >= 1 && cold >= 1 && warm + cold == 4,
        "warm {warm}, cold {cold}"
    );
    assert_eq!(m.hits.with_label_values(&["python"]).get(), warm as u64);
    assert_eq!(m.misses.with_label_values(&["python"]).get(), cold as u64);
    // The pool refills after the burst.
    p.ready(1).await;
    assert_eq!(m.size.with_label_values(&["python"]).get(), 1);
    assert!(m.warmup.with_label_values(&["python"]).get_sample_count() >= 2);
}

#[tokio::test]
async fn idle_warm_sandboxes_are_replaced_and_shutdown_removes_them() {
    let p = pool(1, |c| c.warm_pool.max_idle = Duration::from_millis(1500));
    p.ready(1).await;
    let m = p.backend.warm_metrics();
    let first = m.warmup.with_label_values(&["python"]).get_sample_count();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let later = m.warmup.with_label_values(&["python"]).get_sample_count();
    assert!(
        later > first,
        "no replacement after the idle time: {first} -> {later}"
    );
    p.warm_run(py("print(1)")).await;
    p.ready(1).await;
    p.backend.shutdown().await;
    assert_eq!(p.backend.warm_ready(Language::Python), 0);
    // Destruction runs off the async workers; the scratch area empties.
    let t = Instant::now();
    loop {
        let left: Vec<_> = std::fs::read_dir(p.data_dir.join("run"))
            .unwrap()
            .flatten()
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "left after shutdown: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_warm_task_gets_its_own_limits() {
    let p = pool(1, |_| {});
    p.ready(1).await;
    let mut j = py("x = bytearray(200 << 20)\nprint('allocated')\n");
    j.memory_bytes = 64 << 20;
    let o = p.backend.run(j).await;
    assert_eq!(o.warm, Some(true));
    assert_eq!(
        o.termination,
        agenttask::exec::Termination::OomKilled,
        "{o:?}"
    );
    p.ready(1).await;
    let mut j = py("import time\ntime.sleep(30)\n");
    j.timeout = Duration::from_secs(1);
    let t = Instant::now();
    let o = p.backend.run(j).await;
    assert_eq!(o.warm, Some(true));
    assert_eq!(
        o.termination,
        agenttask::exec::Termination::TimedOut,
        "{o:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[tokio::test]
async fn an_uncaught_exception_reads_as_in_a_cold_run() {
    let cold = pool(0, |_| {});
    let warm = pool(1, |_| {});
    let code = "def f():\n    raise ValueError('boom')\nf()\n";
    let c = cold.backend.run(py(code)).await;
    warm.ready(1).await;
    let w = warm.backend.run(py(code)).await;
    assert_eq!(w.warm, Some(true));
    assert_eq!((c.exit_code, w.exit_code), (Some(1), Some(1)));
    assert!(c.stderr.text.contains("ValueError: boom"), "{c:?}");
    // No frame of the bootstrap: the same traceback, from the task's own file.
    assert_eq!(w.stderr.text, c.stderr.text);
}
