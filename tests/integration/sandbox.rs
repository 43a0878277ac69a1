//! The local sandbox backend against hostile programs, driven through `Backend::run`.
//!
//! Each attack test asserts that the attack failed and that an ordinary task still runs
//! afterwards. Needs what `deploy/local/install-sandbox.sh` sets up (bubblewrap, python3,
//! r-base-core, the `agenttask-sandbox` user) and root, like the service itself.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agenttask::domain::task::Language;
use agenttask::exec::local::{sweep_artifacts, LocalBackend, LocalConfig};
use agenttask::exec::{Job, Outcome, ProgramResult, RunKey, Termination};
use uuid::Uuid;

const MIB: u64 = 1 << 20;

/// A backend with its own data directory, removed at the end of the test.
struct Sandbox {
    backend: LocalBackend,
    data_dir: PathBuf,
    _tmp: tempfile::TempDir,
}

fn sandbox() -> Sandbox {
    sandbox_with(|_| {})
}

fn sandbox_with(tweak: impl FnOnce(&mut LocalConfig)) -> Sandbox {
    let tmp = tempfile::tempdir().expect("tempdir");
    // The sandbox user must be able to reach its scratch under the data directory.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let data_dir = tmp.path().join("data");
    let mut config = LocalConfig::new(&data_dir);
    tweak(&mut config);
    let backend = LocalBackend::new(config)
        .expect("local backend (run deploy/local/install-sandbox.sh as root)");
    Sandbox {
        backend,
        data_dir,
        _tmp: tmp,
    }
}

fn job(language: Language, code: &str) -> Job {
    Job {
        key: RunKey { task_id: Uuid::new_v4(), attempt: 1 },
        tenant: "acme".into(),
        language,
        code: code.into(),
        files: BTreeMap::new(),
        stdin: None,
        args: Vec::new(),
        env: BTreeMap::new(),
        timeout: Duration::from_secs(5),
        cpu_millis: 1000,
        memory_bytes: 256 * MIB,
        isolation: "standard".into(),
        labels: BTreeMap::new(),
        batch_id: None,
        priority: 0,
    }
}

fn py(code: &str) -> Job {
    job(Language::Python, code)
}

impl Sandbox {
    async fn run(&self, job: Job) -> Outcome {
        self.backend.run(job).await
    }

    /// `print(1)` still works.
    async fn assert_healthy(&self) {
        let o = self.run(py("print(1)")).await;
        assert_eq!(o.termination, Termination::Exited, "{o:?}");
        assert_eq!(o.exit_code, Some(0), "{o:?}");
        assert_eq!(o.stdout.text, "1\n");
        assert!(!o.stdout.truncated);
        // Nothing of the finished runs is left in the scratch area.
        let left: Vec<_> = std::fs::read_dir(self.data_dir.join("run"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(left.is_empty(), "scratch left behind: {left:?}");
    }
}

/// Host processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if entry.file_name().to_string_lossy().parse::<u32>().is_err() {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(marker) {
                found.push(format!(
                    "{}: {cmdline}",
                    entry.file_name().to_string_lossy()
                ));
            }
        }
    }
    found
}

fn marker() -> String {
    format!("agenttask-marker-{}", Uuid::new_v4().simple())
}

// ---------------------------------------------------------------------------------------------
// Network

#[tokio::test]
async fn tcp_to_postgres_and_rabbitmq_on_the_host_fails() {
    let s = sandbox();
    let o = s
        .run(py(r#"
import socket
for port in (5432, 5672):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        print(port, "CONNECTED")
    except OSError as e:
        print(port, "refused", type(e).__name__)
"#))
        .await;
    assert_eq!(o.exit_code, Some(0), "{o:?}");
    assert!(
        o.stdout.text.contains("5432 refused") && o.stdout.text.contains("5672 refused"),
        "{}",
        o.stdout.text
    );
    assert!(!o.stdout.text.contains("CONNECTED"));
    s.assert_healthy().await;
}

#[tokio::test]
async fn dns_and_outbound_udp_fail() {
    let s = sandbox();
    let o = s
        .run(py(r#"
import socket
try:
    print("resolved", socket.getaddrinfo("example.com", 80))
except OSError as e:
    print("dns failed", type(e).__name__)
try:
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.sendto(b"x", ("8.8.8.8", 53))
    print("SENT")
except OSError as e:
    print("udp failed", e.errno)
print(sorted(i[1] for i in socket.if_nameindex()))
"#))
        .await;
    assert_eq!(o.exit_code, Some(0), "{o:?}");
    assert!(o.stdout.text.contains("dns failed"), "{}", o.stdout.text);
    assert!(o.stdout.text.contains("udp failed"), "{}", o.stdout.text);
    assert!(
        o.stdout.text.contains("['lo']"),
        "only loopback: {}",
        o.stdout.text
    );
    s.assert_healthy().await;
}

#[tokio::test]
async fn vsock_and_raw_socket_families_are_refused() {
    let s = sandbox();
    let o = s
        .run(py(r#"
import socket
for fam in (40, 17):  # AF_VSOCK (reaches a VM's host whatever the netns), AF_PACKET
    try:
        socket.socket(fam, socket.SOCK_STREAM if fam == 40 else socket.SOCK_RAW)
        print(fam, "OPENED")
    except OSError as e:
        print(fam, "denied", e.errno)
"#))
        .await;
    assert!(o.stdout.text.contains("40 denied 1"), "{o:?}");
    assert!(o.stdout.text.contains("17 denied 1"), "{o:?}");
    s.assert_healthy().await;
}

// ---------------------------------------------------------------------------------------------
// Host file system

#[tokio::test]
async fn writes_to_root_usr_etc_and_host_tmp_do_not_reach_the_host() {
    let s = sandbox();
    let m = marker();
    let mut j = py(r#"
import sys
m = sys.argv[1]
for d in ("/", "/usr", "/usr/bin", "/etc", "/proc", "/dev"):
    try:
        open(f"{d}/{m}", "w").write("x")
        print(d, "WROTE")
    except OSError as e:
        print(d, "denied", e.errno)
open(f"/tmp/{m}", "w").write("scratch only")
print("tmp ok")
"#);
    j.args = vec![m.clone()];
    let o = s.run(j).await;
    assert_eq!(o.exit_code, Some(0), "{o:?}");
    assert!(!o.stdout.text.contains("WROTE"), "{}", o.stdout.text);
    for d in ["/", "/usr", "/usr/bin", "/etc", "/tmp", "/var/tmp", "/dev"] {
        assert!(
            !Path::new(d).join(&m).exists(),
            "{d}/{m} appeared on the host"
        );
    }
    s.assert_healthy().await;
}

#[tokio::test]
async fn host_secrets_are_invisible() {
    let secret = "postgres://svc:hunter2-e1f3@db/agenttask";
    // The service's own secrets live in its environment.
    std::env::set_var("AGENTTASK_TEST_DATABASE_URL", secret);
    let s = sandbox();
    let o = s
        .run(py(r#"
import os
for p in ("/etc/shadow", "/root/.bashrc", "/home", "/var/lib", "/work/../root"):
    try:
        print(p, "READ", open(p).read()[:50] if os.path.isfile(p) else os.listdir(p))
    except OSError as e:
        print(p, "denied", type(e).__name__)
print("env", dict(os.environ))
for pid in os.listdir("/proc"):
    if pid.isdigit():
        for f in ("environ", "cmdline"):
            try:
                print(pid, f, open(f"/proc/{pid}/{f}", "rb").read())
            except OSError as e:
                print(pid, f, "denied", e.errno)
print(sorted(os.listdir("/")), sorted(os.listdir("/etc")))
"#))
        .await;
    assert_eq!(o.exit_code, Some(0), "{o:?}");
    let out = &o.stdout.text;
    assert!(!out.contains("hunter2"), "secret leaked: {out}");
    assert!(!out.contains("READ"), "{out}");
    assert!(
        !out.contains("CARGO") && !out.contains("RUST"),
        "service env leaked: {out}"
    );
    assert!(out.contains("/etc/shadow denied"), "{out}");
    s.assert_healthy().await;
}

// ---------------------------------------------------------------------------------------------
// Resources

#[tokio::test]
async fn fork_bomb_is_contained() {
    let s = sandbox();
    let m = marker();
    let mut j = py(r#"
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
"#);
    j.args = vec![m.clone()];
    j.timeout = Duration::from_secs(2);
    let t = Instant::now();
    let o = s.run(j).await;
    assert_eq!(o.termination, Termination::TimedOut, "{o:?}");
    assert!(
        t.elapsed() < Duration::from_secs(6),
        "took {:?}",
        t.elapsed()
    );
    assert!(processes_with(&m).is_empty(), "{:?}", processes_with(&m));
    s.assert_healthy().await;
}

#[tokio::test]
async fn memory_bomb_is_oom_killed() {
    let s = sandbox();
    let mut j = py("x = []\nwhile True:\n    x.append(b'x' * 10**7)\n");
    j.memory_bytes = 128 * MIB;
    let o = s.run(j).await;
    assert_eq!(o.termination, Termination::OomKilled, "{o:?}");
    s.assert_healthy().await;
}

#[tokio::test]
async fn cpu_spin_times_out() {
    let s = sandbox();
    let mut j = py("while True:\n    pass\n");
    j.timeout = Duration::from_secs(2);
    let t = Instant::now();
    let o = s.run(j).await;
    assert_eq!(o.termination, Termination::TimedOut, "{o:?}");
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "took {:?}",
        t.elapsed()
    );
    s.assert_healthy().await;
}

#[tokio::test]
async fn sleeping_past_the_deadline_times_out_quickly() {
    let s = sandbox();
    let mut j = py("import time\nprint('sleeping', flush=True)\ntime.sleep(60)\n");
    j.timeout = Duration::from_secs(1);
    let t = Instant::now();
    let o = s.run(j).await;
    assert_eq!(o.termination, Termination::TimedOut, "{o:?}");
    assert_eq!(o.exit_code, None);
    assert_eq!(
        o.stdout.text, "sleeping\n",
        "output before the kill is kept"
    );
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "took {:?}",
        t.elapsed()
    );
    s.assert_healthy().await;
}

#[tokio::test]
async fn a_gibibyte_of_stdout_is_cut_at_the_cap() {
    let s = sandbox();
    let j = py("import sys\nb = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(b)\n");
    let t = Instant::now();
    let o = s.run(j).await;
    assert_eq!(
        o.termination,
        Termination::OutputLimitExceeded,
        "{:?}",
        o.termination
    );
    assert!(o.stdout.truncated);
    assert_eq!(o.stdout.text.len(), MIB as usize);
    assert!(o.stdout.text.bytes().all(|b| b == b'x'));
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "took {:?}",
        t.elapsed()
    );
    s.assert_healthy().await;
}

#[tokio::test]
async fn a_ten_gibibyte_file_hits_the_scratch_cap() {
    let s = sandbox();
    let mut j = py(r#"
import os
chunk = b"\0" * (1 << 20)
with open("/work/big", "wb") as f:
    for _ in range(10 * 1024):
        f.write(chunk)
"#);
    j.memory_bytes = 512 * MIB;
    let o = s.run(j).await;
    assert_eq!(o.termination, Termination::OutputLimitExceeded, "{o:?}");
    assert!(
        o.stderr.text.contains("No space left") || o.stderr.text.contains("too large"),
        "{}",
        o.stderr.text
    );
    // The data directory holds nothing of it.
    let du = std::process::Command::new("du")
        .arg("-sb")
        .arg(&s.data_dir)
        .output()
        .unwrap();
    let bytes: u64 = String::from_utf8_lossy(&du.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(bytes < MIB, "data dir holds {bytes} bytes");
    s.assert_healthy().await;
}

// ---------------------------------------------------------------------------------------------
// Artifacts

#[tokio::test]
async fn a_hundred_thousand_artifacts_are_capped() {
    let s = sandbox();
    let mut j = py(r#"
import os
d = os.environ["AGENTTASK_ARTIFACTS_DIR"]
n = 0
try:
    for i in range(100_000):
        open(f"{d}/f{i:06}", "w").write("x")
        n += 1
except OSError as e:
    print("stopped", e.errno)
print("created", n)
"#);
    j.timeout = Duration::from_secs(20);
    let t = Instant::now();
    let o = s.run(j.clone()).await;
    assert_eq!(o.termination, Termination::Exited, "{o:?}");
    assert_eq!(o.artifacts.len(), s.backend.config().artifact_max_files);
    assert!(
        o.stdout.text.contains("stopped 28"),
        "the scratch's inode cap stops it first: {}",
        o.stdout.text
    );
    // Only part of a huge directory is examined; what is listed is in name order.
    assert!(o.artifacts.windows(2).all(|w| w[0].name < w[1].name));
    let copied = std::fs::read_dir(s.backend.artifacts_dir(j.task_id()))
        .unwrap()
        .count();
    assert_eq!(copied, s.backend.config().artifact_max_files);
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t.elapsed()
    );
    s.assert_healthy().await;
}

#[tokio::test]
async fn symlinks_and_hard_links_are_not_collected() {
    let s = sandbox();
    let o = s
        .run(py(r#"
import os
d = os.environ["AGENTTASK_ARTIFACTS_DIR"]
os.symlink("/etc/passwd", f"{d}/passwd")
os.symlink("/usr", f"{d}/usr")
os.symlink("/proc/1/root/etc/hostname", f"{d}/host")
open(f"{d}/a.txt", "w").write("a")
os.link(f"{d}/a.txt", f"{d}/b.txt")
for src in ("/work/main.py", "/etc/passwd"):
    try:
        os.link(src, f"{d}/hard-{os.path.basename(src)}")
        print("LINKED", src)
    except OSError as e:
        print("link refused", src, e.errno)
os.mkfifo(f"{d}/fifo")
open(f"{d}/ok.txt", "w").write("fine")
os.symlink("/etc/shadow", os.environ["AGENTTASK_RESULT_FILE"])
"#))
        .await;
    assert_eq!(o.exit_code, Some(0), "{o:?}");
    let names: Vec<&str> = o.artifacts.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["ok.txt"], "{o:?}");
    assert!(
        matches!(o.result, ProgramResult::Invalid(ref m) if m.contains("symbolic link")),
        "{:?}",
        o.result
    );
    s.assert_healthy().await;
}

#[tokio::test]
async fn artifacts_directory_replaced_by_a_symlink_is_ignored() {
    let s = sandbox();
    let o = s
        .run(py("import os, shutil\nd = os.environ['AGENTTASK_ARTIFACTS_DIR']\nshutil.rmtree(d)\nos.symlink('/etc', d)\n"))
        .await;
    assert_eq!(o.exit_code, Some(0), "{o:?}");
    assert!(o.artifacts.is_empty(), "{:?}", o.artifacts);
    s.assert_healthy().await;
}

// ---------------------------------------------------------------------------------------------
// Processes

#[tokio::test]
async fn a_double_forked_setsid_daemon_dies_with_the_task() {
    let s = sandbox();
    let m = marker();
    let mut j = py(r#"
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        while True:
            time.sleep(0.05)
    os._exit(0)
time.sleep(0.3)
print("parent exits")
"#);
    j.args = vec![m.clone()];
    let o = s.run(j).await;
    assert_eq!(o.exit_code, Some(0), "{o:?}");
    assert!(
        processes_with(&m).is_empty(),
        "survivors: {:?}",
        processes_with(&m)
    );

    // The same when the task is killed at its deadline instead of exiting.
    let m2 = marker();
    let mut j = py("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(600)\n    os._exit(0)\ntime.sleep(600)\n");
    j.args = vec![m2.clone()];
    j.timeout = Duration::from_millis(800);
    let o = s.run(j).await;
    assert_eq!(o.termination, Termination::TimedOut);
    assert!(
        processes_with(&m2).is_empty(),
        "survivors: {:?}",
        processes_with(&m2)
    );
    s.assert_healthy().await;
}

#[tokio::test]
async fn kill_minus_one_only_hits_the_task_itself() {
    let s = sandbox();
    let mut neighbour = py("import time\ntime.sleep(1.5)\nprint('neighbour ok')\n");
    neighbour.timeout = Duration::from_secs(5);
    let attacker = py("import os, signal, time\ntime.sleep(0.3)\nos.kill(-1, signal.SIGKILL)\nprint('attacker alive')\n");
    let (n, a) = tokio::join!(s.run(neighbour), s.run(attacker));
    assert_eq!(n.exit_code, Some(0), "neighbour: {n:?}");
    assert_eq!(n.stdout.text, "neighbour ok\n");
    assert_eq!(a.termination, Termination::Exited, "{a:?}");
    s.assert_healthy().await;
}

#[tokio::test]
async fn ptrace_and_process_vm_readv_are_denied() {
    let s = sandbox();
    let o = s
        .run(py(r#"
import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
pid = os.fork()
if pid == 0:
    time.sleep(5)
    os._exit(0)
for target in (pid, 1):
    r = libc.ptrace(16, target, 0, 0)  # PTRACE_ATTACH
    print("ptrace", target, r, ctypes.get_errno())
r = libc.process_vm_readv(pid, None, 0, None, 0, 0)
print("vm_readv", r, ctypes.get_errno())
r = libc.unshare(0x10000000)  # CLONE_NEWUSER
print("unshare", r, ctypes.get_errno())
os.kill(pid, 9)
"#))
        .await;
    assert_eq!(o.exit_code, Some(0), "{o:?}");
    let out = &o.stdout.text;
    assert!(out.contains(" -1 1\n"), "{out}");
    assert!(
        !out.lines()
            .any(|l| l.starts_with("ptrace") && !l.ends_with("-1 1")),
        "{out}"
    );
    assert!(out.contains("vm_readv -1 1"), "{out}");
    assert!(out.contains("unshare -1 1"), "{out}");
    s.assert_healthy().await;
}

#[tokio::test]
async fn a_task_cannot_see_another_running_tasks_files_or_processes() {
    let s = sandbox();
    let secret = format!("secret-{}", Uuid::new_v4().simple());
    let mut victim = py("import sys, time\nopen('/work/secret.txt', 'w').write(sys.argv[1])\nopen('/tmp/secret.txt', 'w').write(sys.argv[1])\ntime.sleep(2)\nprint('victim done')\n");
    victim.args = vec![secret.clone()];
    let mut spy = py(r#"
import os, sys, time
time.sleep(0.5)
seen = []
for root in ("/work", "/tmp", "/agenttask", "/dev/shm", sys.argv[1], sys.argv[1] + "/run"):
    try:
        for dirpath, dirs, files in os.walk(root):
            for f in files:
                try:
                    seen.append(open(os.path.join(dirpath, f), errors="replace").read(200))
                except OSError:
                    pass
    except OSError:
        pass
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            seen.append(open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace"))
        except OSError:
            pass
print(seen)
"#);
    spy.args = vec![s.data_dir.display().to_string()];
    let (v, sp) = tokio::join!(s.run(victim), s.run(spy));
    assert_eq!(v.stdout.text, "victim done\n", "{v:?}");
    assert_eq!(sp.exit_code, Some(0), "{sp:?}");
    assert!(
        !sp.stdout.text.contains(&secret),
        "spy saw the victim: {}",
        sp.stdout.text
    );
    s.assert_healthy().await;
}

#[tokio::test]
async fn dropping_the_run_kills_the_task() {
    let s = sandbox();
    let m = marker();
    let mut j = py("import time\ntime.sleep(600)\n");
    j.args = vec![m.clone()];
    j.timeout = Duration::from_secs(60);
    let r = tokio::time::timeout(Duration::from_millis(700), s.run(j)).await;
    assert!(r.is_err());
    let t = Instant::now();
    while !processes_with(&m).is_empty() && t.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        processes_with(&m).is_empty(),
        "survivors: {:?}",
        processes_with(&m)
    );
    s.assert_healthy().await;
}

// ---------------------------------------------------------------------------------------------
// Function

#[tokio::test]
async fn python_round_trip() {
    let s = sandbox();
    let mut j = py(r#"
import json, os, sys
data = open("data.txt").read()
try:
    open("data.txt", "w").write("changed")
    writable = True
except OSError:
    writable = False
line = sys.stdin.read()
print("args", sys.argv[1:])
print("stdin", line)
print("env", os.environ["FOO"], os.environ["HOME"], os.getcwd(), os.environ["AGENTTASK_TASK_ID"])
print("to stderr", file=sys.stderr)
json.dump({"data": data, "inputs_writable": writable, "n": 42}, open(os.environ["AGENTTASK_RESULT_FILE"], "w"))
sys.exit(3)
"#);
    j.files.insert("data.txt".into(), b"42\n".to_vec());
    j.stdin = Some("hello".into());
    j.args = vec!["a".into(), "b c".into()];
    j.env.insert("FOO".into(), "bar".into());
    let o = s.run(j.clone()).await;
    assert_eq!(o.termination, Termination::Exited, "{o:?}");
    assert_eq!(o.exit_code, Some(3));
    assert_eq!(
        o.stdout.text,
        format!(
            "args ['a', 'b c']\nstdin hello\nenv bar /work /work {}\n",
            j.task_id()
        )
    );
    assert_eq!(o.stderr.text, "to stderr\n");
    assert_eq!(
        o.result,
        ProgramResult::Json(serde_json::json!({"data": "42\n", "inputs_writable": false, "n": 42}))
    );
    assert!(o.finished_at >= o.started_at);
}

#[tokio::test]
async fn invalid_and_oversized_result_files() {
    let s = sandbox();
    let o = s
        .run(py(
            "import os\nopen(os.environ['AGENTTASK_RESULT_FILE'], 'w').write('{not json')\n",
        ))
        .await;
    assert!(
        matches!(o.result, ProgramResult::Invalid(ref m) if m.contains("not valid JSON")),
        "{:?}",
        o.result
    );
    let o = s.run(py("import os\nopen(os.environ['AGENTTASK_RESULT_FILE'], 'w').write('[' + '1,' * (1 << 20) + '1]')\n")).await;
    assert!(
        matches!(o.result, ProgramResult::Invalid(ref m) if m.contains("limit")),
        "{:?}",
        o.result
    );
    let o = s.run(py("print('no result')")).await;
    assert_eq!(o.result, ProgramResult::Missing);
}

#[tokio::test]
async fn r_round_trip() {
    let s = sandbox();
    let mut j = job(
        Language::R,
        r#"
args <- commandArgs(trailingOnly = TRUE)
input <- readLines(file("stdin"))
data <- readLines("data.txt")
cat("args", args, "\n")
cat("stdin", input, "\n")
cat("env", Sys.getenv("FOO"), getwd(), "\n")
writeLines(sprintf('{"sum": %d, "data": "%s"}', sum(1:10), data), Sys.getenv("AGENTTASK_RESULT_FILE"))
writeLines("artifact", file.path(Sys.getenv("AGENTTASK_ARTIFACTS_DIR"), "r.txt"))
"#,
    );
    j.files.insert("data.txt".into(), b"xyz\n".to_vec());
    j.stdin = Some("from stdin\n".into());
    j.args = vec!["one".into(), "two".into()];
    j.env.insert("FOO".into(), "bar".into());
    j.timeout = Duration::from_secs(20);
    let o = s.run(j).await;
    assert_eq!(o.exit_code, Some(0), "{o:?}");
    assert_eq!(
        o.stdout.text,
        "args one two \nstdin from stdin \nenv bar /work \n"
    );
    assert_eq!(
        o.result,
        ProgramResult::Json(serde_json::json!({"sum": 55, "data": "xyz"}))
    );
    assert_eq!(o.artifacts.len(), 1);
    assert_eq!(o.artifacts[0].name, "r.txt");
}

#[tokio::test]
async fn r_memory_bomb_is_oom_killed() {
    let s = sandbox();
    let mut j = job(
        Language::R,
        "x <- list()\nfor (i in 1:1000) x[[i]] <- runif(1e7)\n",
    );
    j.memory_bytes = 200 * MIB;
    j.timeout = Duration::from_secs(20);
    let o = s.run(j).await;
    assert_eq!(o.termination, Termination::OomKilled, "{o:?}");
    s.assert_healthy().await;
}

#[tokio::test]
async fn artifacts_are_listed_with_sha256_and_swept() {
    let s = sandbox();
    let j = py(r#"
import os
d = os.environ["AGENTTASK_ARTIFACTS_DIR"]
open(f"{d}/a.txt", "w").write("hello")
os.makedirs(f"{d}/sub/deeper")
open(f"{d}/sub/deeper/b.bin", "wb").write(bytes(range(256)))
"#);
    let o = s.run(j.clone()).await;
    assert_eq!(o.exit_code, Some(0), "{o:?}");
    let listed: Vec<(&str, u64, &str)> = o
        .artifacts
        .iter()
        .map(|a| (a.name.as_str(), a.size, a.sha256.as_str()))
        .collect();
    assert_eq!(
        listed,
        [
            (
                "a.txt",
                5,
                "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
            ),
            (
                "sub/deeper/b.bin",
                256,
                "40aff2e9d2d8922e47afd4648e6967497158785fbd1da870e7110266bf944880"
            ),
        ]
    );
    let dir = s.backend.artifacts_dir(j.task_id());
    assert_eq!(std::fs::read(dir.join("a.txt")).unwrap(), b"hello");
    assert_eq!(
        sweep_artifacts(&s.data_dir, Duration::from_secs(3600)).unwrap(),
        0
    );
    assert_eq!(sweep_artifacts(&s.data_dir, Duration::ZERO).unwrap(), 1);
    assert!(!dir.exists());
}

#[tokio::test]
async fn a_missing_runtime_is_a_backend_error() {
    let s = sandbox_with(|c| c.rscript_path = "/nonexistent/Rscript".into());
    let o = s.run(job(Language::R, "cat(1)")).await;
    assert!(
        matches!(o.termination, Termination::BackendError(ref m) if m.contains("/nonexistent/Rscript")),
        "{o:?}"
    );
    s.assert_healthy().await;
}

#[tokio::test]
async fn setup_errors_name_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = LocalConfig::new(tmp.path().join("d"));
    c.sandbox_user = "no-such-user-agenttask".into();
    let e = LocalBackend::new(c).unwrap_err().to_string();
    assert!(e.contains("install-sandbox.sh"), "{e}");
    let mut c = LocalConfig::new(tmp.path().join("d"));
    c.bwrap_path = "/nonexistent/bwrap".into();
    let e = LocalBackend::new(c).unwrap_err().to_string();
    assert!(
        e.contains("bubblewrap") && e.contains("install-sandbox.sh"),
        "{e}"
    );
}
