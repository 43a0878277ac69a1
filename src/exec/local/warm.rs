//! Warm sandboxes: a per-language pool of complete, single-use sandboxes whose interpreter is
//! already started and waits for its task, so a run skips bubblewrap, the cgroup joins and the
//! interpreter's start.
//!
//! A warm sandbox is a cold one in every respect that matters for isolation: its own leased host
//! uid, its own scratch (tmpfs), its own cgroups (joined before bubblewrap ran), the same
//! namespaces, seccomp program, minimal root and masks. What differs:
//! - it is started before any task exists, at `nice` 19 and the smallest CPU weight, with the
//!   base environment only (no task id, no task variables) and generous warm-up limits;
//! - its interpreter runs a small bootstrap ([`PYTHON_BOOTSTRAP`]) that says "ready" on a socket
//!   (a `socketpair` passed in as one descriptor), then blocks reading its task from it;
//! - `/work` is root's, group sandbox, mode 1770 (sticky): the inputs, written by root into it
//!   when the task is claimed, are read-only and cannot be removed or replaced by the task,
//!   like the read-only binds of a cold run.
//!
//! Claiming: the task's limits go into the cgroup files (memory, CPU quota and weight) and, by
//! `prlimit`, onto its processes (address space, CPU seconds), `nice` back to 0; the inputs and
//! code are written; the task (code file name, stdin flag, args, the task's whole environment)
//! goes down the socket, which is then shut. The bootstrap replaces its environment, argv and
//! stdin and runs the code as `__main__`. From then on the run is watched exactly as a cold one,
//! and afterwards destroyed (never reused). The pool refills itself in the background.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::Notify;

use super::cgroups::TaskCgroups;
use super::scratch::{write_read_only, PreparedRun};
use super::spawn::{StartSpec, Started};
use super::uids::UidLease;
use super::{LocalBackend, MIB};
use crate::domain::task::Language;
use crate::exec::Job;
use crate::metrics::WarmPoolMetrics;
use crate::sandbox::bwrap;
use crate::sandbox::code_file_name;
use crate::sandbox::limits::Limits;

/// Memory limit of a warm sandbox until a task claims it (then the task's own applies).
const WARM_MEMORY_BYTES: u64 = 256 * MIB;

/// The Python bootstrap (`python3 -I -B -c BOOTSTRAP FD`). It says ready (one byte), reads the
/// task to EOF, closes the socket, and makes the process look like `python3 -I -B main.py ARGS`
/// with the task's environment: `os.environ` replaced (plus `PWD`, which bubblewrap's
/// `--chdir` sets in a cold run), `sys.argv` set, stdin `/dev/null` unless
/// the task has stdin, and `__main__` holding only what a script's `__main__` holds. The code
/// runs in `__main__`; an uncaught exception prints its traceback from the task's own frames
/// and exits 1, as Python does.
pub const PYTHON_BOOTSTRAP: &str = r#"
def _agenttask_boot():
    import os, sys
    fd = int(sys.argv[1])
    os.write(fd, b"r")
    parts = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        parts.append(chunk)
    os.close(fd)
    f = b"".join(parts).split(b"\0")
    if len(f) < 6:
        os._exit(70)
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (int(f[2]), int(f[2])))
    resource.setrlimit(resource.RLIMIT_CPU, (int(f[3]), int(f[4])))
    del sys.modules["resource"]
    name = os.fsdecode(f[0])
    n = int(f[5])
    args = [os.fsdecode(a) for a in f[6:6 + n]]
    kv = f[6 + n:]
    os.environ.clear()
    for i in range(0, len(kv) - 1, 2):
        os.environ[os.fsdecode(kv[i])] = os.fsdecode(kv[i + 1])
    os.environ["PWD"] = "/work"
    if f[1] != b"1":
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
    os.chdir("/work")
    path = "/work/" + name
    with open(path, "rb") as src:
        code = compile(src.read(), path, "exec", dont_inherit=True)
    sys.argv[:] = [name] + args
    g = sys.modules["__main__"].__dict__
    for k in list(g):
        if k not in ("__name__", "__doc__", "__package__", "__spec__", "__annotations__", "__builtins__"):
            del g[k]
    g["__file__"] = path
    g["__cached__"] = None
    g["__loader__"] = sys.modules["_frozen_importlib_external"].SourceFileLoader("__main__", path)
    try:
        exec(code, g)
    except SystemExit:
        raise
    except BaseException as e:
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != path:
            tb = tb.tb_next
        e.__traceback__ = tb
        sys.excepthook(type(e), e, tb)
        sys.exit(1)
_agenttask_boot()
"#;

/// Pool settings, from [`super::LocalConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WarmPoolConfig {
    /// Warm Python sandboxes kept ready; 0 turns the pool off for Python.
    pub python: usize,
    /// Warm R sandboxes kept ready. Not supported yet (R has no way to read its task from an
    /// inherited descriptor without losing stdin bytes): must be 0.
    pub r: usize,
    /// A warm sandbox unclaimed for this long is replaced by a fresh one.
    pub max_idle: Duration,
}

impl Default for WarmPoolConfig {
    fn default() -> Self {
        Self {
            python: 2,
            r: 0,
            max_idle: Duration::from_secs(600),
        }
    }
}

impl WarmPoolConfig {
    pub fn size(&self, language: Language) -> usize {
        match language {
            Language::Python => self.python,
            Language::R => self.r,
        }
    }
}

/// One started sandbox waiting for its task. Fields drop in order: bubblewrap is killed, the
/// socket closed, the scratch and cgroups removed (killing whatever is left), the uid given back.
pub(super) struct WarmSandbox {
    started: Started,
    socket: UnixStream,
    run: PreparedRun,
    lease: UidLease,
    ready_at: Instant,
}

/// The idle warm sandboxes and the counters around them.
pub(super) struct WarmPool {
    pub(super) config: WarmPoolConfig,
    idle: Mutex<[VecDeque<WarmSandbox>; 2]>,
    /// Wakes the refiller (a sandbox was claimed, or the pool is closing).
    wake: Arc<Notify>,
    started: AtomicBool,
    closed: AtomicBool,
    metrics: Mutex<WarmPoolMetrics>,
}

fn slot(language: Language) -> usize {
    match language {
        Language::Python => 0,
        Language::R => 1,
    }
}

const LANGUAGES: [Language; 2] = [Language::Python, Language::R];

impl WarmPool {
    pub(super) fn new(config: WarmPoolConfig) -> Self {
        Self {
            config,
            idle: Mutex::default(),
            wake: Arc::new(Notify::new()),
            started: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            metrics: Mutex::new(WarmPoolMetrics::new()),
        }
    }

    pub(super) fn metrics(&self) -> WarmPoolMetrics {
        self.metrics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(super) fn set_metrics(&self, m: WarmPoolMetrics) {
        *self.metrics.lock().unwrap_or_else(|p| p.into_inner()) = m;
    }

    /// Ready sandboxes of `language`.
    pub(super) fn ready(&self, language: Language) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())[slot(language)].len()
    }

    fn publish_size(&self, language: Language, n: usize) {
        self.metrics()
            .size
            .with_label_values(&[language.as_str()])
            .set(n as i64);
    }

    /// A ready sandbox (the oldest that is still alive and not past its idle time), counted as
    /// a hit; `None` (a miss) when the pool is empty.
    fn take(&self, language: Language) -> Option<WarmSandbox> {
        let mut stale = Vec::new();
        let taken = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let q = &mut idle[slot(language)];
            let mut found = None;
            while let Some(mut w) = q.pop_front() {
                let alive = matches!(w.started.child.try_wait(), Ok(None));
                if alive && w.ready_at.elapsed() < self.config.max_idle {
                    found = Some(w);
                    break;
                }
                stale.push(w);
            }
            self.publish_size(language, q.len());
            found
        };
        destroy(stale);
        self.wake.notify_one();
        let m = self.metrics();
        let label = [language.as_str()];
        match &taken {
            Some(_) => m.hits.with_label_values(&label).inc(),
            None => m.misses.with_label_values(&label).inc(),
        }
        taken
    }

    fn put(&self, language: Language, w: WarmSandbox) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let q = &mut idle[slot(language)];
        q.push_back(w);
        self.publish_size(language, q.len());
    }

    /// Removes sandboxes past their idle time (or dead); returns them for destruction.
    fn expire(&self) -> Vec<WarmSandbox> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for language in LANGUAGES {
            let q = &mut idle[slot(language)];
            let mut keep = VecDeque::new();
            while let Some(mut w) = q.pop_front() {
                let alive = matches!(w.started.child.try_wait(), Ok(None));
                if alive && w.ready_at.elapsed() < self.config.max_idle {
                    keep.push_back(w);
                } else {
                    out.push(w);
                }
            }
            *q = keep;
            self.publish_size(language, q.len());
        }
        out
    }

    /// Stops refilling and destroys every idle sandbox.
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.wake.notify_one();
        let all: Vec<WarmSandbox> = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.iter_mut().flat_map(|q| q.drain(..)).collect()
        };
        for language in LANGUAGES {
            self.publish_size(language, 0);
        }
        destroy(all);
    }
}

/// Kills and removes sandboxes off the async workers (unmounting and cgroup removal block).
fn destroy(sandboxes: Vec<WarmSandbox>) {
    if sandboxes.is_empty() {
        return;
    }
    match tokio::runtime::Handle::try_current() {
        Ok(h) => {
            h.spawn_blocking(move || drop(sandboxes));
        }
        Err(_) => drop(sandboxes),
    }
}

impl LocalBackend {
    /// Starts keeping the warm pool filled (once; later calls do nothing). Needs a tokio
    /// runtime; the refiller holds only a weak reference and ends with the backend.
    pub fn start_warm_pool(self: &Arc<Self>) {
        let pool = &self.warm;
        if pool.config.python == 0 && pool.config.r == 0 {
            return;
        }
        if pool.started.swap(true, Ordering::SeqCst) {
            return;
        }
        tokio::spawn(refill(Arc::downgrade(self)));
    }

    /// Warm sandboxes ready for `language` now.
    pub fn warm_ready(&self, language: Language) -> usize {
        self.warm.ready(language)
    }

    /// Reports the pool's size, hits, misses and warm-up times in `metrics` from now on.
    pub fn use_metrics(&self, metrics: WarmPoolMetrics) {
        self.warm.set_metrics(metrics);
    }

    /// The pool's metrics (for tests and the service).
    pub fn warm_metrics(&self) -> WarmPoolMetrics {
        self.warm.metrics()
    }

    /// Whether `job` may use a warm sandbox of its language (a pool for it, nothing the warm
    /// path cannot carry: a NUL in an argument or variable fails the same way cold).
    pub(super) fn warm_eligible(&self, job: &Job) -> bool {
        self.warm.config.size(job.language) > 0
            && !job.args.iter().any(|a| a.contains('\0'))
            && !job
                .env
                .iter()
                .any(|(k, v)| k.contains('\0') || v.contains('\0'))
    }

    /// A warm sandbox for `job`, if the pool has one (`None` counts as a miss).
    pub(super) fn take_warm(&self, job: &Job) -> Option<WarmSandbox> {
        self.warm.take(job.language)
    }

    fn warm_limits(&self) -> Limits {
        Limits {
            // Only bounds RLIMIT_CPU during warm-up; the task's own deadline applies on claim.
            timeout: self.warm.config.max_idle + Duration::from_secs(60),
            cpu_millis: 1000,
            memory_bytes: WARM_MEMORY_BYTES,
            max_processes: self.config.max_processes,
            scratch_bytes: self.config.scratch_bytes,
            max_open_files: self.config.max_open_files,
            uid_max_processes: self.config.uid_max_processes,
            msgqueue_bytes: self.config.max_msgqueue_bytes,
            pending_signals: self.config.max_pending_signals,
        }
    }

    /// Starts one warm sandbox and waits until its interpreter waits for a task.
    async fn warm_up(&self, language: Language) -> io::Result<WarmSandbox> {
        let t0 = Instant::now();
        if language != Language::Python {
            return Err(io::Error::other("warm sandboxes exist for Python only"));
        }
        // A short wait: running tasks come first; the refiller tries again later.
        let lease = self.uids.acquire(Duration::from_millis(200)).await?;
        let limits = self.warm_limits();
        let mut run = self.prepare_scratch("warm-python", lease.uid, lease.gid, true)?;
        run.cgroups = TaskCgroups::create(&self.cgroups, &run.cgroup_name(self.owner), &limits);
        if let Err(e) = run.cgroups.retune(&limits, true) {
            tracing::debug!(error = %e, "could not lower a warm sandbox's CPU weight");
        }
        let (ours, theirs) = StdUnixStream::pair()?;
        let fd = theirs.as_raw_fd();
        let command = vec![
            self.config.python_path.clone().into_os_string(),
            "-I".into(),
            "-B".into(),
            "-c".into(),
            PYTHON_BOOTSTRAP.into(),
            fd.to_string().into(),
        ];
        let env = bwrap::sandbox_env(&BTreeMap::new(), "")
            .into_iter()
            .filter(|(k, _)| k != "AGENTTASK_TASK_ID")
            .collect();
        // The rlimits that depend on the task start unbounded: the bootstrap can only lower
        // them to the task's. Meanwhile the cgroups bound the warm-up.
        let spawn_limits = Limits {
            memory_bytes: u64::MAX,
            timeout: Duration::from_secs(1 << 40),
            ..limits
        };
        let started = self.start_sandbox(
            &run,
            StartSpec {
                command,
                work_files: Vec::new(),
                env,
                stdin_pipe: true,
                pass_fd: Some(fd),
                nice: 19,
                limits: &spawn_limits,
            },
        )?;
        drop(theirs);
        ours.set_nonblocking(true)?;
        let mut socket = UnixStream::from_std(ours)?;
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(60), socket.read(&mut byte)).await {
            Ok(Ok(1)) if byte[0] == b'r' => {}
            Ok(Ok(_)) | Ok(Err(_)) => {
                return Err(io::Error::other(
                    "the warm interpreter ended before it was ready",
                ))
            }
            Err(_) => {
                return Err(io::Error::other(
                    "the warm interpreter was not ready in 60 s",
                ))
            }
        }
        let took = t0.elapsed();
        self.warm
            .metrics()
            .warmup
            .with_label_values(&[language.as_str()])
            .observe(took.as_secs_f64());
        tracing::debug!(?took, uid = lease.uid, "warm sandbox ready");
        Ok(WarmSandbox {
            started,
            socket,
            run,
            lease,
            ready_at: Instant::now(),
        })
    }

    /// Hands `job` to a warm sandbox: its limits, its inputs, then the task itself. On error the
    /// sandbox is given back to be destroyed (the caller starts the task cold).
    pub(super) async fn claim_warm(
        &self,
        w: WarmSandbox,
        job: &Job,
    ) -> Result<(UidLease, PreparedRun, Started), (WarmSandbox, io::Error)> {
        let WarmSandbox {
            started,
            mut socket,
            run,
            lease,
            ready_at,
        } = w;
        let result: io::Result<()> = async {
            let limits = self.limits(job);
            run.cgroups.retune(&limits, false).map_err(|e| {
                io::Error::new(e.kind(), format!("setting the task's cgroup limits: {e}"))
            })?;
            // Raising their priority back needs CAP_SYS_NICE (root has it); the rlimits that
            // depend on the task (address space, CPU seconds) the bootstrap lowers itself, as
            // prlimit on another uid's process would need CAP_SYS_RESOURCE.
            for pid in run.cgroups.member_pids() {
                // SAFETY: setpriority has no memory-safety preconditions.
                unsafe { libc::setpriority(libc::PRIO_PROCESS, pid as libc::id_t, 0) };
            }
            let work = run.scratch.work();
            for (name, content) in &job.files {
                if !bwrap::is_plain_name(name) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("input file name {name:?} is not a plain name"),
                    ));
                }
                write_read_only(&work.join(name), content)?;
            }
            let code = code_file_name(job.language, job.files.keys().map(String::as_str));
            write_read_only(&work.join(code), job.code.as_bytes())?;
            let message = task_message(job, code, &limits.rlimits(run.cgroups.has_memory));
            socket.write_all(&message).await?;
            socket.shutdown().await?;
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                tracing::debug!(task_id = %job.key.task_id, idle = ?ready_at.elapsed(), "warm sandbox claimed");
                Ok((lease, run, started))
            }
            Err(e) => Err((
                WarmSandbox {
                    started,
                    socket,
                    run,
                    lease,
                    ready_at,
                },
                e,
            )),
        }
    }
}

/// What the bootstrap reads: the code file's name, whether stdin follows, the address-space
/// limit, the CPU-seconds soft and hard limits, the argument count, the arguments, then the
/// environment as name, value pairs; NUL-separated.
fn task_message(job: &Job, code: &str, rlimits: &[crate::sandbox::limits::Rlimit]) -> Vec<u8> {
    use crate::sandbox::limits::Resource;
    let find = |r: Resource| rlimits.iter().find(|l| l.0 == r).map(|l| (l.1, l.2));
    let (address_space, _) = find(Resource::As).unwrap_or((u64::MAX, u64::MAX));
    let (cpu_soft, cpu_hard) = find(Resource::Cpu).unwrap_or((u64::MAX, u64::MAX));
    let mut fields: Vec<String> = vec![
        code.to_string(),
        if job.stdin.is_some() { "1" } else { "0" }.to_string(),
        address_space.to_string(),
        cpu_soft.to_string(),
        cpu_hard.to_string(),
        job.args.len().to_string(),
    ];
    fields.extend(job.args.iter().cloned());
    for (k, v) in bwrap::sandbox_env(&job.env, &job.key.task_id.to_string()) {
        fields.push(k);
        fields.push(v);
    }
    fields.join("\0").into_bytes()
}

/// Keeps each language's pool at its size: replaces what was claimed, died or idled too long,
/// one sandbox at a time.
async fn refill(backend: Weak<LocalBackend>) {
    let mut failures = 0u32;
    loop {
        let Some(b) = backend.upgrade() else { return };
        let pool = &b.warm;
        if pool.closed.load(Ordering::SeqCst) {
            return;
        }
        destroy(pool.expire());
        let want = LANGUAGES
            .into_iter()
            .find(|&l| pool.ready(l) < pool.config.size(l));
        let mut pause = Duration::from_secs(1).min(pool.config.max_idle / 2);
        if let Some(language) = want {
            match b.warm_up(language).await {
                Ok(w) if !pool.closed.load(Ordering::SeqCst) => {
                    pool.put(language, w);
                    failures = 0;
                    continue;
                }
                Ok(w) => {
                    destroy(vec![w]);
                    return;
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures % 60 == 0 {
                        tracing::warn!(error = %e, language = language.as_str(), "could not start a warm sandbox");
                    }
                    pause = Duration::from_millis(500);
                }
            }
        }
        let wake = pool.wake.clone();
        drop(b);
        let _ = tokio::time::timeout(pause, wake.notified()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_message_carries_args_and_only_the_tasks_environment() {
        let mut job = Job {
            key: crate::exec::RunKey {
                task_id: uuid::Uuid::new_v4(),
                attempt: 1,
            },
            tenant: "t".into(),
            language: Language::Python,
            code: "print(1)".into(),
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
            artifact_quota_bytes: 0,
        };
        job.args = vec!["a b".into(), String::new()];
        job.env.insert("FOO".into(), "bar".into());
        job.stdin = Some("x".into());
        let limits = [(crate::sandbox::limits::Resource::Cpu, 6, 7)];
        let msg = String::from_utf8(task_message(&job, "main.py", &limits)).unwrap();
        let f: Vec<&str> = msg.split('\0').collect();
        let max = u64::MAX.to_string();
        assert_eq!(
            &f[..8],
            ["main.py", "1", max.as_str(), "6", "7", "2", "a b", ""]
        );
        let env: Vec<(&str, &str)> = f[8..].chunks(2).map(|c| (c[0], c[1])).collect();
        assert!(env.contains(&("FOO", "bar")));
        let id = job.key.task_id.to_string();
        assert!(env.contains(&("AGENTTASK_TASK_ID", id.as_str())));
        assert_eq!(env.len(), 8, "{env:?}");
    }
}
