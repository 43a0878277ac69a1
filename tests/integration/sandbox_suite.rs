// The sandbox attack suite, included twice by `sandbox.rs`: with cold sandboxes (`WARM` false)
// and with warm ones (`WARM` true). Every attack must fail the same way in both.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agenttask::domain::task::Language;
use agenttask::exec::local::{sweep_artifacts, LocalBackend, LocalConfig, SetupError, WarmConfig};
use agenttask::exec::{Backend, EventSink, Job, Outcome, ProgramResult, RunEvent, Termination};
use uuid::Uuid;
use super::job;

const MIB: u64 = 1 << 20;

/// A backend with its own data directory, removed at the end of the test.
struct Sandbox {
    backend: Arc<LocalBackend>,
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
    config.warm = if WARM { WarmConfig { python: 2, r: 1, max_idle: Duration::from_secs(600) } } else { WarmConfig::off() };
    tweak(&mut config);
    let backend =
        Arc::new(LocalBackend::new(config).expect("local backend (run deploy/local/install-sandbox.sh as root)"));
    backend.start_warm_pool();
    Sandbox { backend, data_dir, _tmp: tmp }
}

fn py(code: &str) -> Job {
    job(Language::Python, code)
}

impl Sandbox {
    /// Runs `job`; in the warm suite, from a full pool (a task whose environment needs a cold
    /// start, or one of more tasks at once than the pool holds, still starts cold).
    async fn run(&self, job: Job) -> Outcome {
        if WARM {
            self.backend.wait_warm(Duration::from_secs(60)).await;
        }
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
        assert_eq!(o.warm, WARM.then_some(true), "{o:?}");
        // Nothing of the finished runs is left in the scratch area; idle warm sandboxes (at
        // most the pool's 3 and one starting) have theirs.
        let (warm, left): (Vec<_>, Vec<_>) = std::fs::read_dir(self.data_dir.join("run"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .partition(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("warm-")));
        assert!(left.is_empty(), "scratch left behind: {left:?}");
        assert!(warm.len() <= 4, "warm scratch left behind: {warm:?}");
    }

    /// How long an ordinary `print(1)` takes end to end in this sandbox right now (uid lease,
    /// bubblewrap, cgroups, the interpreter's start, collection, teardown): the fixed cost that
    /// the time bounds below allow on top of what they measure, so that they hold on a slow or
    /// busy machine and still fail on a run that waits where it should not.
    async fn baseline(&self) -> Duration {
        let t = Instant::now();
        self.assert_healthy().await;
        t.elapsed()
    }
}

/// Python put before a task's code: it records on stderr when the task's own code started and
/// ended (`@stamp start <unix time>`, `@stamp end <unix time>`) and gives the code `stamp(name)`
/// for the moments in between.
///
/// Tests that say two tasks ran at the same time prove it from these stamps, not from
/// `Outcome::started_at`: the backend takes that before the run waits for a uid and builds the
/// sandbox, so two runs started together always "overlap" by it, whether their programs ran
/// together or one after the other. The sandbox reads the host's realtime clock (there is no
/// time namespace), so stamps of different tasks compare.
const STAMPS: &str = "import atexit as _atexit, sys as _sys, time as _time
def stamp(name):
    print('@stamp', name, repr(_time.time()), file=_sys.stderr, flush=True)
stamp('start')
_atexit.register(stamp, 'end')
";

fn stamped(mut j: Job) -> Job {
    j.code = format!("{STAMPS}{}", j.code);
    j
}

/// The moment a [`stamped`] task recorded as `name`, in seconds since the epoch.
fn stamp(o: &Outcome, name: &str) -> f64 {
    o.stderr
        .text
        .lines()
        .filter_map(|l| l.strip_prefix("@stamp ")?.split_once(' '))
        .find(|(n, _)| *n == name)
        .and_then(|(_, t)| t.parse().ok())
        .unwrap_or_else(|| panic!("no {name:?} stamp: {o:?}"))
}

/// Asserts that the stamped runs' code all ran at one moment: the last start came before the
/// first end.
fn assert_ran_together(outcomes: &[&Outcome]) {
    let last_start = outcomes.iter().map(|o| stamp(o, "start")).fold(f64::MIN, f64::max);
    let first_end = outcomes.iter().map(|o| stamp(o, "end")).fold(f64::MAX, f64::min);
    assert!(
        last_start < first_end,
        "the runs did not overlap: the last started at {last_start}, after the first ended at {first_end}"
    );
}

/// Asserts that `moment` fell while `o`'s code ran (between its `after` stamp and its end).
fn assert_while_running(o: &Outcome, after: &str, moment: f64, what: &str) {
    let (from, to) = (stamp(o, after), stamp(o, "end"));
    assert!(from < moment && moment < to, "{what} at {moment} was not between {after} at {from} and end at {to}");
}

/// The task with `m` in its arguments and, set by the task itself before its code, as the
/// `comm` name of its process, which every process it forks inherits. (The arguments alone would
/// not mark a warm sandbox's interpreter: its command line is its loader's.)
fn marked(mut j: Job, m: &str) -> Job {
    j.args = vec![m.to_owned()];
    j.code = format!(
        "import ctypes as _c\n_c.CDLL(None).prctl(15, {:?}.encode(), 0, 0, 0)\ndel _c\n{}",
        comm_marker(m),
        j.code
    );
    j
}

/// The part of a marker that fits a `comm` name (15 bytes).
fn comm_marker(m: &str) -> &str {
    &m[m.len() - 15..]
}

/// Host processes whose command line contains `marker` or whose `comm` is its short form (see
/// [`marked`]).
fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if entry.file_name().to_string_lossy().parse::<u32>().is_err() {
            continue;
        }
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(marker) || comm.trim_end() == comm_marker(marker) {
                found.push(format!("{}: {} {cmdline}", entry.file_name().to_string_lossy(), comm.trim_end()));
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
    assert!(o.stdout.text.contains("5432 refused") && o.stdout.text.contains("5672 refused"), "{}", o.stdout.text);
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
    assert!(o.stdout.text.contains("['lo']"), "only loopback: {}", o.stdout.text);
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
        assert!(!Path::new(d).join(&m).exists(), "{d}/{m} appeared on the host");
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
    assert!(!out.contains("CARGO") && !out.contains("RUST"), "service env leaked: {out}");
    assert!(out.contains("/etc/shadow denied"), "{out}");
    s.assert_healthy().await;
}

// ---------------------------------------------------------------------------------------------
// Resources

#[tokio::test]
async fn fork_bomb_is_contained() {
    let s = sandbox();
    let m = marker();
    let mut j = marked(
        py(r#"
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
"#),
        &m,
    );
    j.timeout = Duration::from_secs(2);
    let base = s.baseline().await;
    let t = Instant::now();
    let o = s.run(j.clone()).await;
    assert_eq!(o.termination, Termination::TimedOut, "{o:?}");
    // The deadline, the fixed cost twice (the bomb slows the machine down while it lasts) and
    // 2 s to kill and reap thousands of processes.
    let bound = j.timeout + 2 * base + Duration::from_secs(2);
    assert!(t.elapsed() < bound, "took {:?}, bound {bound:?}", t.elapsed());
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
    let base = s.baseline().await;
    let t = Instant::now();
    let o = s.run(j.clone()).await;
    assert_eq!(o.termination, Termination::TimedOut, "{o:?}");
    // The deadline and the fixed cost, with room for a loaded machine: not a grace period.
    let bound = j.timeout + 2 * base + Duration::from_secs(1);
    assert!(t.elapsed() < bound, "took {:?}, bound {bound:?}", t.elapsed());
    s.assert_healthy().await;
}

#[tokio::test]
async fn sleeping_past_the_deadline_times_out_quickly() {
    let s = sandbox();
    let mut j = py("import time\nprint('sleeping', flush=True)\ntime.sleep(60)\n");
    j.timeout = Duration::from_secs(1);
    let base = s.baseline().await;
    let t = Instant::now();
    let o = s.run(j.clone()).await;
    assert_eq!(o.termination, Termination::TimedOut, "{o:?}");
    assert_eq!(o.exit_code, None);
    assert_eq!(o.stdout.text, "sleeping\n", "output before the kill is kept");
    // "Quickly": the deadline and the fixed cost, with room for a loaded machine, far below
    // the 60 s the task asked to sleep and below any grace period worth the name.
    let bound = j.timeout + 2 * base + Duration::from_secs(1);
    assert!(t.elapsed() < bound, "took {:?}, bound {bound:?}", t.elapsed());
    s.assert_healthy().await;
}

#[tokio::test]
async fn a_gibibyte_of_stdout_is_cut_at_the_cap() {
    let s = sandbox();
    let j = py("import sys\nb = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(b)\n");
    let t = Instant::now();
    let o = s.run(j.clone()).await;
    assert_eq!(o.termination, Termination::OutputLimitExceeded, "{:?}", o.termination);
    assert!(o.stdout.truncated);
    assert_eq!(o.stdout.text.len(), MIB as usize);
    assert!(o.stdout.text.bytes().all(|b| b == b'x'));
    // The cap, not the deadline, ended it: a run that went on until its deadline takes longer
    // than the timeout itself (it is counted from the program's start).
    assert!(t.elapsed() < j.timeout, "took {:?}, the timeout is {:?}", t.elapsed(), j.timeout);
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
    assert!(o.stderr.text.contains("No space left") || o.stderr.text.contains("too large"), "{}", o.stderr.text);
    // The data directory holds nothing of it.
    let du = std::process::Command::new("du").arg("-sb").arg(&s.data_dir).output().unwrap();
    let bytes: u64 = String::from_utf8_lossy(&du.stdout).split_whitespace().next().unwrap().parse().unwrap();
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
    assert!(o.stdout.text.contains("stopped 28"), "the scratch's inode cap stops it first: {}", o.stdout.text);
    // Only part of a huge directory is examined; what is listed is in name order.
    assert!(o.artifacts.windows(2).all(|w| w[0].name < w[1].name));
    let copied = std::fs::read_dir(s.backend.artifacts_dir(j.task_id())).unwrap().count();
    assert_eq!(copied, s.backend.config().artifact_max_files);
    // Generous on purpose: listing and copying is bounded by the caps, so the whole run ends
    // well before the task's own deadline, the bound here (a run that went on to its deadline
    // would take longer than the timeout, which is counted from the program's start).
    assert!(t.elapsed() < j.timeout, "took {:?}, the timeout is {:?}", t.elapsed(), j.timeout);
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
    assert!(matches!(o.result, ProgramResult::Invalid(ref m) if m.contains("symbolic link")), "{:?}", o.result);
    s.assert_healthy().await;
}

#[tokio::test]
async fn artifacts_directory_replaced_by_a_symlink_is_ignored() {
    let s = sandbox();
    let o = s
        .run(py(
            "import os, shutil\nd = os.environ['AGENTTASK_ARTIFACTS_DIR']\nshutil.rmtree(d)\nos.symlink('/etc', d)\n",
        ))
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
    let j = py(r#"
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
    let j = marked(j, &m);
    let o = s.run(j).await;
    assert_eq!(o.exit_code, Some(0), "{o:?}");
    assert!(processes_with(&m).is_empty(), "survivors: {:?}", processes_with(&m));

    // The same when the task is killed at its deadline instead of exiting.
    let m2 = marker();
    let mut j = marked(
        py("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(600)\n    os._exit(0)\ntime.sleep(600)\n"),
        &m2,
    );
    j.timeout = Duration::from_millis(800);
    let o = s.run(j).await;
    assert_eq!(o.termination, Termination::TimedOut);
    assert!(processes_with(&m2).is_empty(), "survivors: {:?}", processes_with(&m2));
    s.assert_healthy().await;
}

#[tokio::test]
async fn kill_minus_one_only_hits_the_task_itself() {
    let s = sandbox();
    let mut neighbour = stamped(py("import time\ntime.sleep(3)\nprint('neighbour ok')\n"));
    neighbour.timeout = Duration::from_secs(10);
    let attacker = stamped(py(
        "import os, signal, time\ntime.sleep(0.5)\nstamp('kill')\nos.kill(-1, signal.SIGKILL)\nprint('attacker alive')\n",
    ));
    let (n, a) = tokio::join!(s.run(neighbour), s.run(attacker));
    assert_eq!(n.exit_code, Some(0), "neighbour: {n:?}");
    assert_eq!(n.stdout.text, "neighbour ok\n");
    assert_eq!(a.termination, Termination::Exited, "{a:?}");
    // The kill went out while the neighbour's code was running: it had a chance to hit it.
    assert_while_running(&n, "start", stamp(&a, "kill"), "the attacker's kill(-1)");
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
    assert!(!out.lines().any(|l| l.starts_with("ptrace") && !l.ends_with("-1 1")), "{out}");
    assert!(out.contains("vm_readv -1 1"), "{out}");
    assert!(out.contains("unshare -1 1"), "{out}");
    s.assert_healthy().await;
}

#[tokio::test]
async fn a_task_cannot_see_another_running_tasks_files_or_processes() {
    let s = sandbox();
    let secret = format!("secret-{}", Uuid::new_v4().simple());
    let mut victim = stamped(py("import sys, time\nopen('/work/secret.txt', 'w').write(sys.argv[1])\nopen('/tmp/secret.txt', 'w').write(sys.argv[1])\nstamp('wrote')\ntime.sleep(3)\nprint('victim done')\n"));
    victim.args = vec![secret.clone()];
    let mut spy = stamped(py(r#"
import os, sys, time
time.sleep(1)
stamp('looking')
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
stamp('looked')
print(seen)
"#));
    spy.args = vec![s.data_dir.display().to_string()];
    let (v, sp) = tokio::join!(s.run(victim), s.run(spy));
    assert_eq!(v.stdout.text, "victim done\n", "{v:?}");
    assert_eq!(sp.exit_code, Some(0), "{sp:?}");
    // The spy looked while the secret existed: after the victim wrote it, before it ended.
    assert_while_running(&v, "wrote", stamp(&sp, "looking"), "the spy's search");
    assert_while_running(&v, "wrote", stamp(&sp, "looked"), "the end of the spy's search");
    assert!(!sp.stdout.text.contains(&secret), "spy saw the victim: {}", sp.stdout.text);
    s.assert_healthy().await;
}

#[tokio::test]
async fn dropping_the_run_kills_the_task() {
    let s = sandbox();
    let m = marker();
    let mut j = marked(py("import time\ntime.sleep(600)\n"), &m);
    j.timeout = Duration::from_secs(60);
    // Drive the run until its process exists (it carries the marker): only then does "no
    // survivors" after the drop prove a kill, not a task that never started.
    let mut run = Box::pin(s.run(j));
    let started = Instant::now();
    while processes_with(&m).is_empty() {
        // Only a limit on waiting, as long as the task's own timeout.
        assert!(started.elapsed() < Duration::from_secs(60), "the task's process never appeared");
        tokio::select! {
            o = &mut run => panic!("the run ended before it was dropped: {o:?}"),
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    drop(run);
    let t = Instant::now();
    // Generous: the drop kills the sandbox at once and reaping a sleeping process takes
    // milliseconds; 3 s only absorbs a loaded machine.
    while !processes_with(&m).is_empty() && t.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(processes_with(&m).is_empty(), "survivors: {:?}", processes_with(&m));
    s.assert_healthy().await;
}

/// Whether nobody holds the host-wide lease lock of `uid` (taken and given back at once).
fn uid_is_free(uid: u32) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::File::open(Path::new("/run/agenttask/uids").join(uid.to_string())) else {
        return true;
    };
    // SAFETY: flock on a descriptor we own; closing it releases the lock.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

#[tokio::test]
async fn a_launched_run_reports_then_removes_its_sandbox_before_its_uid_is_free() {
    let s = sandbox();
    if WARM {
        assert!(s.backend.wait_warm(Duration::from_secs(60)).await, "the warm pool did not fill");
    }
    let (sink, mut events) = EventSink::channel();
    let j = py("import os; print(os.getuid())");
    let task = j.key.task_id.to_string();
    s.backend.clone().launch(j, sink).await.expect("launched");
    let o = loop {
        if let RunEvent::Finished(o) = events.recv().await.expect("the run reports").event {
            break o;
        }
    };
    assert_eq!((o.exit_code, o.warm), (Some(0), WARM.then_some(true)), "{o:?}");
    let uid: u32 = o.stdout.text.trim().parse().expect("the task's uid");
    // The run's scratch, if its teardown has not removed it yet: a cold one is named after the
    // task, a warm one's directories belong to the task's uid.
    use std::os::unix::fs::MetadataExt;
    let scratch: Vec<PathBuf> = std::fs::read_dir(s.data_dir.join("run"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy().into_owned();
            name.starts_with(&task) || std::fs::metadata(p.join("work")).is_ok_and(|m| m.uid() == uid)
        })
        .collect();
    // Until the scratch is gone the uid must stay leased: seen free, nothing of the run may be
    // left (the lock is looked at first, and a removed scratch never comes back).
    let t = Instant::now();
    loop {
        let free = uid_is_free(uid);
        let left: Vec<&PathBuf> = scratch.iter().filter(|p| p.exists()).collect();
        assert!(!free || left.is_empty(), "uid {uid} was given back while its scratch was left: {left:?}");
        if left.is_empty() {
            break;
        }
        // Only a limit on waiting for the teardown.
        assert!(t.elapsed() < Duration::from_secs(30), "the teardown never removed {left:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Shutdown waits for every teardown (and removes the idle warm sandboxes).
    s.backend.shutdown().await;
    let left: Vec<_> = std::fs::read_dir(s.data_dir.join("run")).unwrap().flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "left after shutdown: {left:?}");
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
    assert_eq!(o.stdout.text, format!("args ['a', 'b c']\nstdin hello\nenv bar /work /work {}\n", j.task_id()));
    assert_eq!(o.stderr.text, "to stderr\n");
    assert_eq!(o.result, ProgramResult::Json(serde_json::json!({"data": "42\n", "inputs_writable": false, "n": 42})));
    assert!(o.finished_at >= o.started_at);
}

#[tokio::test]
async fn invalid_and_oversized_result_files() {
    let s = sandbox();
    let o = s.run(py("import os\nopen(os.environ['AGENTTASK_RESULT_FILE'], 'w').write('{not json')\n")).await;
    assert!(matches!(o.result, ProgramResult::Invalid(ref m) if m.contains("not valid JSON")), "{:?}", o.result);
    let o = s
        .run(py("import os\nopen(os.environ['AGENTTASK_RESULT_FILE'], 'w').write('[' + '1,' * (1 << 20) + '1]')\n"))
        .await;
    assert!(matches!(o.result, ProgramResult::Invalid(ref m) if m.contains("limit")), "{:?}", o.result);
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
    assert_eq!(o.stdout.text, "args one two \nstdin from stdin \nenv bar /work \n");
    assert_eq!(o.result, ProgramResult::Json(serde_json::json!({"sum": 55, "data": "xyz"})));
    assert_eq!(o.artifacts.len(), 1);
    assert_eq!(o.artifacts[0].name, "r.txt");
}

#[tokio::test]
async fn r_memory_bomb_is_oom_killed() {
    let s = sandbox();
    let mut j = job(Language::R, "x <- list()\nfor (i in 1:1000) x[[i]] <- runif(1e7)\n");
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
    let listed: Vec<(&str, u64, &str)> =
        o.artifacts.iter().map(|a| (a.name.as_str(), a.size, a.sha256.as_str())).collect();
    assert_eq!(
        listed,
        [
            ("a.txt", 5, "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"),
            ("sub/deeper/b.bin", 256, "40aff2e9d2d8922e47afd4648e6967497158785fbd1da870e7110266bf944880"),
        ]
    );
    let dir = s.backend.artifacts_dir(j.task_id());
    assert_eq!(std::fs::read(dir.join("a.txt")).unwrap(), b"hello");
    assert_eq!(sweep_artifacts(&s.data_dir, Duration::from_secs(3600)).unwrap(), 0);
    assert_eq!(sweep_artifacts(&s.data_dir, Duration::ZERO).unwrap(), 1);
    assert!(!dir.exists());
}

#[tokio::test]
async fn a_missing_runtime_is_a_backend_error() {
    let s = sandbox_with(|c| c.rscript_path = "/nonexistent/Rscript".into());
    let o = s.run(job(Language::R, "cat(1)")).await;
    assert!(matches!(o.termination, Termination::BackendError(ref m) if m.contains("/nonexistent/Rscript")), "{o:?}");
    s.assert_healthy().await;
}

#[tokio::test]
async fn setup_errors_name_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = LocalConfig::new(tmp.path().join("d"));
    c.sandbox_user = "no-such-user-agenttask".into();
    let e = LocalBackend::new(c).unwrap_err();
    assert!(matches!(e, SetupError::SandboxUsers(_)), "{e:?}");
    let e = e.to_string();
    assert!(e.contains("install-sandbox.sh"), "{e}");
    // A missing uid range says which users are missing.
    assert!(e.contains("uid range is missing") && e.contains("no-such-user-agenttask-0"), "{e}");
    let mut c = LocalConfig::new(tmp.path().join("d"));
    c.bwrap_path = "/nonexistent/bwrap".into();
    let e = LocalBackend::new(c).unwrap_err();
    assert!(matches!(&e, SetupError::NoBubblewrap { path } if path.ends_with("bwrap")), "{e:?}");
    let e = e.to_string();
    assert!(e.contains("bubblewrap") && e.contains("install-sandbox.sh"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Round 2: one tenant must not hurt the host or another tenant

fn in_tenant(mut j: Job, tenant: &str) -> Job {
    j.tenant = tenant.into();
    j
}

/// Bytes the files under `dir` occupy on disk (allocated blocks).
fn allocated_under(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return 0;
    };
    let own = meta.blocks() * 512;
    if !meta.is_dir() {
        return own;
    }
    own + std::fs::read_dir(dir).unwrap().flatten().map(|e| allocated_under(&e.path())).sum::<u64>()
}

#[tokio::test]
async fn sparse_artifacts_are_not_written_densely_to_the_host() {
    let s = sandbox();
    let mut j = py(r#"
import os
d = os.environ["AGENTTASK_ARTIFACTS_DIR"]
for i in range(3):
    with open(f"{d}/sparse{i}.bin", "wb") as f:
        f.truncate(60 * 1024 * 1024)
open(f"{d}/real.txt", "w").write("real")
print("written")
"#);
    j.memory_bytes = 32 * MIB;
    let o = s.run(j.clone()).await;
    assert_eq!(o.exit_code, Some(0), "{o:?}");
    assert_eq!(o.stdout.text, "written\n");
    let names: Vec<&str> = o.artifacts.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["real.txt"], "{o:?}");
    let note = o.artifacts_note.as_deref().unwrap_or_default();
    assert!(note.contains("3 sparse artifact file(s) not stored"), "{note}");
    let on_disk = allocated_under(&s.data_dir.join("artifacts"));
    assert!(on_disk < MIB, "artifacts occupy {on_disk} bytes on the host");
}

const WRITE_300K: &str = r#"
import os
d = os.environ["AGENTTASK_ARTIFACTS_DIR"]
open(f"{d}/data.bin", "wb").write(os.urandom(300 * 1024))
print("done")
"#;

#[tokio::test]
async fn a_tenants_artifact_quota_stops_storing_while_another_tenant_stores() {
    // Expired at once, so that the sweep below removes everything.
    let s = sandbox_with(|c| c.artifact_ttl = Duration::ZERO);
    let quota = |mut j: Job| {
        j.artifact_quota_bytes = 700 * 1024;
        j
    };
    // acme fills its quota: two tasks fit, the third does not.
    for _ in 0..2 {
        let o = s.run(quota(in_tenant(py(WRITE_300K), "acme"))).await;
        assert_eq!((o.exit_code, o.artifacts.len()), (Some(0), 1), "{o:?}");
        assert_eq!(o.artifacts_note, None);
    }
    // The attack and another tenant's ordinary task at the same time (each lingers after
    // writing, so that their runs overlap even when one starts a little late).
    let linger = |j: Job| stamped(Job { code: format!("{}import time\ntime.sleep(1.5)\n", j.code), ..j });
    let attack = quota(linger(in_tenant(py(WRITE_300K), "acme")));
    let normal = quota(linger(in_tenant(py(WRITE_300K), "globex")));
    let (a, n) = tokio::join!(s.run(attack.clone()), s.run(normal.clone()));
    assert_ran_together(&[&a, &n]);
    assert_eq!(a.termination, Termination::Exited, "{a:?}");
    assert_eq!(a.exit_code, Some(0), "the task itself still succeeds: {a:?}");
    assert_eq!(a.stdout.text, "done\n");
    assert!(a.artifacts.is_empty(), "{a:?}");
    let note = a.artifacts_note.as_deref().unwrap_or_default();
    assert!(note.contains("max_artifact_bytes"), "{note}");
    assert!(!s.data_dir.join("artifacts/acme").join(attack.task_id().to_string()).exists());
    assert_eq!((n.exit_code, n.artifacts.len()), (Some(0), 1), "{n:?}");
    assert_eq!(n.artifacts_note, None);
    assert!(s.data_dir.join("artifacts/globex").join(normal.task_id().to_string()).join("data.bin").is_file());
    // Once the sweep removed acme's old artifacts, its quota is free again.
    assert_eq!(s.backend.sweep_artifacts().unwrap(), 3);
    let o = s.run(quota(in_tenant(py(WRITE_300K), "acme"))).await;
    assert_eq!((o.exit_code, o.artifacts.len()), (Some(0), 1), "{o:?}");
}

#[tokio::test]
async fn artifacts_are_not_stored_below_the_free_space_floor() {
    let s = sandbox_with(|c| c.artifact_min_free_bytes = u64::MAX / 4);
    let o = s.run(py(WRITE_300K)).await;
    assert_eq!(o.exit_code, Some(0), "{o:?}");
    assert!(o.artifacts.is_empty(), "{o:?}");
    let note = o.artifacts_note.as_deref().unwrap_or_default();
    assert!(note.contains("free-space floor"), "{note}");
    assert_eq!(allocated_under(&s.data_dir.join("artifacts/acme")), 0);
}

#[tokio::test]
async fn tcp_socket_buffers_are_charged_to_the_task() {
    let s = sandbox();
    let mut j = py(r#"
import socket
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(512)
queued, conns = 0, []
try:
    for _ in range(200):
        c = socket.create_connection(srv.getsockname())
        a, _ = srv.accept()
        conns.append((c, a))
        c.setblocking(False)
        chunk = b"x" * 65536
        while True:
            try:
                queued += c.send(chunk)
            except BlockingIOError:
                break
except OSError as e:
    print("stopped:", e.errno, flush=True)
print("queued", queued, flush=True)
"#);
    j.memory_bytes = 64 * MIB;
    j.timeout = Duration::from_secs(30);
    let o = s.run(j).await;
    let queued: u64 = o
        .stdout
        .text
        .lines()
        .find_map(|l| l.strip_prefix("queued ")?.parse().ok())
        .unwrap_or_else(|| panic!("no count: {o:?}"));
    // Before, a 64Mi task queued about 400 MiB of host TCP memory and succeeded.
    assert!(queued < 96 * MIB, "a 64Mi task queued {} MiB of TCP data", queued / MIB);
    s.assert_healthy().await;
}

/// Holds every per-user kernel resource it can for `hold` seconds and prints what it held.
const HOG_PER_USER_LIMITS: &str = r#"
import ctypes, os, signal, socket, sys, time
libc = ctypes.CDLL(None, use_errno=True)
held = {}
ino = []
while len(ino) < 10000:
    fd = libc.inotify_init1(0)
    if fd < 0: break
    ino.append(fd)
held["inotify"] = len(ino)
mq = []
libc.mq_open.restype = ctypes.c_int
while len(mq) < 10000:
    fd = libc.mq_open(f"/hog{len(mq)}".encode(), os.O_CREAT | os.O_RDWR, 0o600, None)
    if fd < 0: break
    mq.append(fd)
held["mqueue"] = len(mq)
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGRTMIN])
n = 0
# sigqueue, not kill: a kill() past the limit is still delivered, without its queue entry.
while n < 200000 and libc.sigqueue(os.getpid(), signal.SIGRTMIN, ctypes.c_void_p(0)) == 0:
    n += 1
held["sigpending"] = n
r, w = os.pipe()
n, pairs, limited = 0, [], False
while not limited and len(pairs) < 100:
    a, b = socket.socketpair()
    a.setblocking(False)
    pairs.append((a, b))
    while True:
        try: socket.send_fds(a, [b"x"], [r])
        except BlockingIOError: break  # this pair's buffer is full: next pair
        except OSError: limited = True; break
        n += 1
held["inflight"] = n
print(held, flush=True)
stamp("held")
time.sleep(int(sys.argv[1]))
"#;

/// Uses each per-user resource once and prints what worked.
const USE_PER_USER_LIMITS: &str = r#"
import ctypes, os, signal, socket, time
time.sleep(2)  # the hog holds everything by now (the test checks it from the stamps)
stamp("using")
libc = ctypes.CDLL(None, use_errno=True)
def report(name, ok):
    print(name, "ok" if ok else f"FAILED errno {ctypes.get_errno()}", flush=True)
report("inotify", libc.inotify_init1(0) >= 0)
libc.mq_open.restype = ctypes.c_int
report("mqueue", libc.mq_open(b"/mine", os.O_CREAT | os.O_RDWR, 0o600, None) >= 0)
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGRTMIN])
report("sigpending", libc.sigqueue(os.getpid(), signal.SIGRTMIN, ctypes.c_void_p(0)) == 0)
a, b = socket.socketpair()
r, w = os.pipe()
try:
    socket.send_fds(a, [b"x"], [r]); print("inflight ok")
except OSError as e:
    print("inflight FAILED", e.errno)
import multiprocessing
with multiprocessing.Pool(2) as p:
    print("multiprocessing", p.map(abs, [-1, -2]))
stamp("used")
"#;

#[tokio::test]
async fn per_user_kernel_limits_held_by_one_tenant_do_not_fail_another() {
    let s = sandbox();
    let mut hog = stamped(in_tenant(py(HOG_PER_USER_LIMITS), "acme"));
    hog.args = vec!["8".into()];
    hog.timeout = Duration::from_secs(20);
    let mut user = stamped(in_tenant(py(USE_PER_USER_LIMITS), "globex"));
    user.timeout = Duration::from_secs(20);
    let (h, u) = tokio::join!(s.run(hog), s.run(user));
    assert_eq!(h.exit_code, Some(0), "{h:?}");
    // The other tenant used each resource while the hog held everything it could.
    assert_while_running(&h, "held", stamp(&u, "using"), "the other tenant's first use");
    assert_while_running(&h, "held", stamp(&u, "used"), "the other tenant's last use");
    // The hog got some of each, within its own per-task limits.
    let held = &h.stdout.text;
    assert!(held.contains("'inotify': "), "{held}");
    assert!(!held.contains("'mqueue': 0"), "{held}");
    assert!(!held.contains("'sigpending': 0,"), "{held}");
    let sigs: u64 = held
        .split("'sigpending': ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{held}"));
    assert!(sigs <= 1024, "RLIMIT_SIGPENDING per task: {held}");
    assert_eq!(u.exit_code, Some(0), "{u:?}");
    for line in ["inotify ok", "mqueue ok", "sigpending ok", "inflight ok", "multiprocessing [1, 2]"] {
        assert!(u.stdout.text.contains(line), "{line:?} missing: {u:?}");
    }
}

#[tokio::test]
async fn concurrently_running_tasks_have_distinct_host_uids() {
    let s = sandbox();
    assert!(s.backend.slots() >= 4, "slots: {}", s.backend.slots());
    let code = "import os, time\nprint(os.getuid(), os.getgid())\ntime.sleep(2)\n";
    let runs = (0..4).map(|i| s.run(stamped(in_tenant(py(code), if i % 2 == 0 { "acme" } else { "globex" }))));
    let outs = futures_util::future::join_all(runs).await;
    assert_ran_together(&outs.iter().collect::<Vec<_>>());
    let mut uids = std::collections::HashSet::new();
    let mut gids = std::collections::HashSet::new();
    for o in &outs {
        assert_eq!(o.exit_code, Some(0), "{o:?}");
        let mut it = o.stdout.text.split_whitespace();
        let uid: u32 = it.next().unwrap().parse().unwrap();
        let gid: u32 = it.next().unwrap().parse().unwrap();
        assert_ne!(uid, 0);
        uids.insert(uid);
        gids.insert(gid);
    }
    assert_eq!(uids.len(), 4, "{outs:?}");
    assert_eq!(gids.len(), 1, "one shared sandbox group: {outs:?}");
}

#[tokio::test]
async fn tasks_get_no_ptys() {
    let s = sandbox();
    let o = s
        .run(py(r#"
import os, pty
opened = 0
for _ in range(64):
    try:
        os.openpty(); opened += 1
    except OSError as e:
        print("openpty failed", type(e).__name__); break
try:
    os.open("/dev/ptmx", os.O_RDWR); opened += 1
except OSError as e:
    print("ptmx failed", type(e).__name__)
print("opened", opened)
"#))
        .await;
    assert_eq!(o.exit_code, Some(0), "{o:?}");
    assert!(o.stdout.text.contains("openpty failed"), "{o:?}");
    assert!(o.stdout.text.contains("ptmx failed"), "{o:?}");
    assert!(o.stdout.text.contains("opened 0\n"), "{o:?}");
    s.assert_healthy().await;
}

#[tokio::test]
async fn host_information_in_proc_is_masked() {
    let s = sandbox();
    let o = s
        .run(py(r#"
import os
for p in ("/proc/cmdline", "/proc/config.gz", "/proc/iomem", "/proc/ioports", "/proc/keys",
          "/proc/key-users", "/proc/timer_list", "/proc/interrupts", "/proc/sched_debug",
          "/proc/kcore", "/proc/partitions", "/proc/diskstats", "/proc/locks", "/proc/zoneinfo"):
    try:
        print(p, len(open(p, "rb").read()))
    except OSError as e:
        print(p, "unreadable", type(e).__name__)
for d in ("/proc/acpi", "/proc/bus", "/proc/irq", "/proc/fs"):
    try:
        print(d, "entries", len(os.listdir(d)))
    except OSError as e:
        print(d, "unreadable", type(e).__name__)
print("cpuinfo", len(open("/proc/cpuinfo").read()) > 0)
print("self", os.path.exists("/proc/self/status"))
"#))
        .await;
    assert_eq!(o.exit_code, Some(0), "{o:?}");
    let out = &o.stdout.text;
    for line in out.lines() {
        let mut parts = line.split_whitespace();
        let (path, what) = (parts.next().unwrap(), parts.collect::<Vec<_>>().join(" "));
        if path.starts_with("/proc/") {
            assert!(
                what == "0"
                    || what == "entries 0"
                    || what == "unreadable FileNotFoundError"
                    || what == "unreadable PermissionError",
                "{path} shows host information: {what}"
            );
        }
    }
    // Files that exist on this host were read as empty, not refused.
    assert!(out.contains("/proc/cmdline 0\n"), "{out}");
    assert!(out.contains("/proc/keys 0\n"), "{out}");
    // What runtimes need is still there.
    assert!(out.contains("cpuinfo True") && out.contains("self True"), "{out}");
}

#[tokio::test]
async fn inputs_named_like_the_sandboxs_own_files_work() {
    let s = sandbox();
    let mut j = py(r#"
for name in (".etc-passwd", ".etc-group", ".etc-hosts", "passwd", "hosts", "empty"):
    print(name, open(name).read())
print("etc", open("/etc/passwd").read().startswith("sandbox:"))
"#);
    for name in [".etc-passwd", ".etc-group", ".etc-hosts", "passwd", "hosts", "empty"] {
        j.files.insert(name.into(), format!("input {name}").into_bytes());
    }
    let o = s.run(j).await;
    assert_eq!(o.termination, Termination::Exited, "{o:?}");
    assert_eq!(o.exit_code, Some(0), "{o:?}");
    assert!(o.stdout.text.contains(".etc-passwd input .etc-passwd\n"), "{o:?}");
    assert!(o.stdout.text.contains("passwd input passwd\n"), "{o:?}");
    assert!(o.stdout.text.contains("etc True"), "{o:?}");
}

#[tokio::test]
async fn stale_task_cgroups_of_dead_owners_are_removed_and_live_neighbours_kept() {
    use agenttask::sandbox::cgroup::{self, CgroupHost, Owner};
    let host = cgroup::detect(
        &std::fs::read_to_string("/proc/self/mountinfo").unwrap(),
        &std::fs::read_to_string("/proc/self/cgroup").unwrap(),
    );
    let parent = match &host {
        CgroupHost::V1 { memory: Some(m), .. } => m.clone(),
        CgroupHost::V2 { parent } => parent.clone(),
        other => panic!("this test needs cgroups: {other:?}"),
    };
    std::fs::create_dir_all(&parent).unwrap();
    // A service process that is gone: a finished child's pid.
    let dead_pid = std::process::Command::new("/bin/true").spawn().unwrap().id();
    std::thread::sleep(Duration::from_millis(50));
    let dead =
        parent.join(cgroup::task_name(Owner { pid: dead_pid, start_ticks: 1 }, &format!("{}-dead", Uuid::new_v4())));
    // A live neighbour: this very process.
    let own_ticks = cgroup::start_ticks(&std::fs::read_to_string("/proc/self/stat").unwrap()).unwrap();
    let live = parent.join(cgroup::task_name(
        Owner { pid: std::process::id(), start_ticks: own_ticks },
        &format!("{}-live", Uuid::new_v4()),
    ));
    std::fs::create_dir(&dead).unwrap();
    std::fs::create_dir(&live).unwrap();
    let s = sandbox();
    let (dead_left, live_left) = (dead.exists(), live.exists());
    let _ = std::fs::remove_dir(&live);
    assert!(!dead_left, "{} was not removed", dead.display());
    assert!(live_left, "a live neighbour's cgroup was removed");
    s.assert_healthy().await;
}

#[tokio::test]
async fn unix_socket_and_pipe_buffers_are_charged_to_the_task() {
    let s = sandbox();
    for kind in ["stream", "dgram", "pipe"] {
        let mut j = py(r#"
import fcntl, os, socket, sys
kind, queued, objs, step = sys.argv[1], 0, [], 16 << 20
for i in range(900):
    if kind == "pipe":
        r, w = os.pipe()
        try: fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ
        except OSError: pass
        os.set_blocking(w, False)
        objs.append((r, w))
        send = lambda: os.write(w, b"x" * 65536)
    else:
        t = socket.SOCK_STREAM if kind == "stream" else socket.SOCK_DGRAM
        a, b = socket.socketpair(socket.AF_UNIX, t)
        a.setblocking(False)
        objs.append((a, b))
        send = lambda: a.send(b"x" * (65536 if kind == "stream" else 4096))
    while True:
        try: n = send()
        except (BlockingIOError, OSError): break
        if (queued + n) // step > queued // step:
            print("queued", queued + n, flush=True)
        queued += n
print("queued", queued, "done", flush=True)
"#);
        j.args = vec![kind.into()];
        j.memory_bytes = 64 * MIB;
        j.timeout = Duration::from_secs(30);
        let o = s.run(j).await;
        let last: u64 = o
            .stdout
            .text
            .lines()
            .filter_map(|l| l.strip_prefix("queued ")?.split(' ').next()?.parse().ok())
            .next_back()
            .unwrap_or_else(|| panic!("{kind}: no progress at all: {o:?}"));
        // Either the task was stopped at its own memory limit, or the kernel refused more.
        assert!(last < 96 * MIB, "{kind}: a 64Mi task queued {} MiB", last / MIB);
        assert!(o.termination == Termination::OomKilled || o.exit_code == Some(0), "{kind}: {o:?}");
    }
    s.assert_healthy().await;
}
