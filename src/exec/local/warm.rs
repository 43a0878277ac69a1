//! The pool of warm sandboxes: per language, a few complete sandboxes whose interpreter has
//! already started and waits for one task (see [`crate::sandbox::warm`] for what runs inside).
//!
//! - **Warm-up** (in the background, one at a time, at nice 10): lease a uid, make the scratch and
//!   the cgroups (with generous limits: the slow first write to `cgroup.procs` happens here), put
//!   the hand-off FIFO in the scratch's `tmp/`, start bubblewrap with the waiting interpreter, and
//!   wait until it has the FIFO open (R: until it has run the ready line). The FIFO's name is
//!   removed at once.
//! - **Claim** ([`LocalBackend::claim_warm`]): take the oldest live sandbox of the task's
//!   language, set the task's limits (cgroup memory and CPU, `RLIMIT_AS` and `RLIMIT_CPU` of
//!   every process, normal priority), write its code and input files into `/work` (read-only,
//!   owned by root), and hand the rest over through the FIFO when the run is watched. Anything
//!   failing on the way discards that sandbox and the task starts cold.
//! - **Single use**: the run owns the sandbox from then on and removes it like a cold one. A fresh
//!   one is started to replace it. Sandboxes idle longer than the maximum idle time are replaced
//!   too, so a host's upgraded runtimes are picked up.
//!
//! A cold run that finds every uid taken takes one back from an idle warm sandbox.

use std::collections::{BTreeMap, VecDeque};
use std::ffi::CString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::scratch::{write_inputs, PreparedRun};
use super::spawn::{Handoff, RlimitResource, SpawnSpec, Started};
use super::uids::UidLease;
use super::LocalBackend;
use crate::domain::task::Language;
use crate::exec::Job;
use crate::metrics::WarmMetrics;
use crate::sandbox::limits::{Limits, Resource};
use crate::sandbox::warm::{self as plan, HANDOFF_NAME, READY_MARKER_NAME};
use crate::sandbox::{bwrap, code_file_name};

/// How long an interpreter may take to start before its warm sandbox is given up.
const WARMUP_LIMIT: Duration = Duration::from_secs(30);
/// Pause after a failed warm-up (no free uid, a broken runtime) before the next attempt.
const RETRY_PAUSE: Duration = Duration::from_secs(5);

/// Warm pool settings (part of [`super::LocalConfig`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmConfig {
    /// Warm Python sandboxes kept ready; 0 turns Python's pool off. Default 2.
    pub python: usize,
    /// Warm R sandboxes kept ready; 0 turns R's pool off. Default 1.
    pub r: usize,
    /// A warm sandbox idle this long is replaced by a fresh one. Default 10 minutes.
    pub max_idle: Duration,
}

impl Default for WarmConfig {
    fn default() -> Self {
        Self { python: 2, r: 1, max_idle: Duration::from_secs(600) }
    }
}

impl WarmConfig {
    /// No warm sandboxes at all.
    pub fn off() -> Self {
        Self { python: 0, r: 0, ..Self::default() }
    }

    pub fn target(&self, language: Language) -> usize {
        match language {
            Language::Python => self.python,
            Language::R => self.r,
        }
    }
}

/// Why a task of a language with a pool started cold (the misses metric's `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Miss {
    /// No warm sandbox of the language was ready.
    Empty,
    /// The task sets a variable that only a fresh process reads.
    Env,
    /// Setting its limits or writing its inputs failed.
    Failed,
}

impl Miss {
    fn label(self) -> &'static str {
        match self {
            Miss::Empty => "empty",
            Miss::Env => "env",
            Miss::Failed => "failed",
        }
    }
}

/// One warm sandbox. Dropping it kills its processes and removes its scratch and cgroups, then
/// gives its uid back (field order).
pub(super) struct WarmSandbox {
    pub(super) started: Started,
    pub(super) run: PreparedRun,
    pub(super) lease: UidLease,
    /// The hand-off FIFO's write end (non-blocking), until it is handed over.
    fifo: Option<OwnedFd>,
    language: Language,
    ready_at: Instant,
}

fn slot(language: Language) -> usize {
    match language {
        Language::Python => 0,
        Language::R => 1,
    }
}

/// The idle warm sandboxes and the background task that keeps them topped up.
pub(super) struct WarmPool {
    config: WarmConfig,
    idle: Mutex<[VecDeque<WarmSandbox>; 2]>,
    wake: Arc<tokio::sync::Notify>,
    closed: AtomicBool,
    /// The refill task, awaited by [`WarmPool::close`].
    refill: Mutex<Option<tokio::task::JoinHandle<()>>>,
    metrics: std::sync::OnceLock<WarmMetrics>,
}

impl WarmPool {
    pub(super) fn new(config: WarmConfig) -> Self {
        Self {
            config,
            idle: Mutex::new([VecDeque::new(), VecDeque::new()]),
            wake: Arc::new(tokio::sync::Notify::new()),
            closed: AtomicBool::new(false),
            refill: Mutex::new(None),
            metrics: std::sync::OnceLock::new(),
        }
    }

    pub(super) fn config(&self) -> &WarmConfig {
        &self.config
    }

    pub(super) fn set_metrics(&self, metrics: WarmMetrics) {
        let _ = self.metrics.set(metrics);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, [VecDeque<WarmSandbox>; 2]> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Idle warm sandboxes of `language`.
    pub(super) fn idle(&self, language: Language) -> usize {
        self.lock()[slot(language)].len()
    }

    fn publish_size(&self, idle: &[VecDeque<WarmSandbox>; 2]) {
        if let Some(m) = self.metrics.get() {
            for language in [Language::Python, Language::R] {
                m.idle.with_label_values(&[language.as_str()]).set(idle[slot(language)].len() as i64);
            }
        }
    }

    /// The oldest live warm sandbox of `language`, if any; the refill starts its replacement.
    pub(super) fn take(&self, language: Language) -> Option<WarmSandbox> {
        let mut dead = Vec::new();
        let found = {
            let mut idle = self.lock();
            let mut found = None;
            while let Some(mut w) = idle[slot(language)].pop_front() {
                if matches!(w.started.child.try_wait(), Ok(None)) {
                    found = Some(w);
                    break;
                }
                dead.push(w);
            }
            self.publish_size(&idle);
            found
        };
        discard(dead);
        self.wake.notify_one();
        found
    }

    /// Gives up one idle sandbox (the longest idle of either language) so that its uid can run
    /// a cold task. False when there was none.
    pub(super) fn evict_one(&self) -> bool {
        let victim = {
            let mut idle = self.lock();
            let oldest = (0..2).filter_map(|i| idle[i].front().map(|w| (w.ready_at, i))).min().map(|(_, i)| i);
            let victim = oldest.and_then(|i| idle[i].pop_front());
            self.publish_size(&idle);
            victim
        };
        let evicted = victim.is_some();
        discard(victim.into_iter().collect());
        evicted
    }

    pub(super) fn record_hit(&self, language: Language) {
        if let Some(m) = self.metrics.get() {
            m.hits.with_label_values(&[language.as_str()]).inc();
        }
    }

    pub(super) fn record_miss(&self, language: Language, why: Miss) {
        if let Some(m) = self.metrics.get() {
            m.misses.with_label_values(&[language.as_str(), why.label()]).inc();
        }
    }

    /// Stops refilling (waiting for a warm-up under way) and removes every idle sandbox.
    pub(super) async fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.wake.notify_one();
        let task = self.refill.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
        let all: Vec<WarmSandbox> = {
            let mut idle = self.lock();
            let all = idle.iter_mut().flat_map(|q| q.drain(..)).collect();
            self.publish_size(&idle);
            all
        };
        self.wake.notify_one();
        let _ = tokio::task::spawn_blocking(move || drop(all)).await;
    }

    /// The language most below its target, counting idle sandboxes; stale and dead ones are
    /// removed first.
    fn needs(&self) -> Option<Language> {
        let mut gone = Vec::new();
        let need = {
            let mut idle = self.lock();
            for q in idle.iter_mut() {
                let mut keep = VecDeque::with_capacity(q.len());
                for mut w in q.drain(..) {
                    let alive = matches!(w.started.child.try_wait(), Ok(None));
                    if alive && w.ready_at.elapsed() < self.config.max_idle {
                        keep.push_back(w);
                    } else {
                        gone.push(w);
                    }
                }
                *q = keep;
            }
            self.publish_size(&idle);
            [Language::Python, Language::R]
                .into_iter()
                .filter(|&l| idle[slot(l)].len() < self.config.target(l))
                .max_by_key(|&l| self.config.target(l) - idle[slot(l)].len())
        };
        discard(gone);
        need
    }

    fn push(&self, w: WarmSandbox) {
        let mut idle = self.lock();
        idle[slot(w.language)].push_back(w);
        self.publish_size(&idle);
    }

    /// The time until the oldest idle sandbox becomes stale (at most a minute).
    fn next_expiry(&self) -> Duration {
        let idle = self.lock();
        idle.iter()
            .filter_map(|q| q.front())
            .map(|w| self.config.max_idle.saturating_sub(w.ready_at.elapsed()))
            .min()
            .unwrap_or(Duration::from_secs(60))
            .clamp(Duration::from_millis(100), Duration::from_secs(60))
    }
}

/// Removes sandboxes off the async workers (unmounting a scratch blocks).
fn discard(sandboxes: Vec<WarmSandbox>) {
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
    /// Starts keeping the warm pool filled, in the background, for as long as the backend
    /// lives. Does nothing when every pool size is 0 or without per-task cgroups (a warm
    /// sandbox's limits are set through them).
    pub fn start_warm_pool(self: &Arc<Self>) {
        let c = self.warm.config();
        let mut task = self.warm.refill.lock().unwrap_or_else(|p| p.into_inner());
        if c.python + c.r == 0 || task.is_some() || self.warm.closed.load(Ordering::SeqCst) {
            return;
        }
        if !self.cgroups_usable() {
            tracing::warn!(
                "warm sandboxes need per-task cgroups, which this host does not give; every task starts cold"
            );
            return;
        }
        tracing::info!(python = c.python, r = c.r, max_idle_s = c.max_idle.as_secs(), "starting warm sandboxes");
        *task = Some(tokio::spawn(refill(Arc::downgrade(self))));
    }

    /// Waits until the warm pool holds its target of every language, or `limit` passes; true
    /// when it does. For tests and benchmarks that must start from a full pool.
    pub async fn wait_warm(&self, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        loop {
            let full =
                [Language::Python, Language::R].into_iter().all(|l| self.warm.idle(l) >= self.warm.config().target(l));
            if full {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Idle warm sandboxes of `language`.
    pub fn warm_idle(&self, language: Language) -> usize {
        self.warm.idle(language)
    }

    /// Limits while a warm sandbox waits: the configured per-process limits, and memory, CPU
    /// time and address space large enough to lower to any task's at claim.
    fn warm_limits(&self) -> Limits {
        self.limits_with(self.warm.config().max_idle + Duration::from_secs(3600), 1000, 1 << 50)
    }

    /// Starts one warm sandbox of `language` and waits until its interpreter waits for a task.
    async fn warm_one(&self, language: Language) -> io::Result<WarmSandbox> {
        let begin = Instant::now();
        let lease = self.uids.try_acquire()?.ok_or_else(|| io::Error::other("every sandbox uid is in use"))?;
        let limits = self.warm_limits();
        let run = self.prepare_empty(&format!("warm-{}", language.as_str()), lease.uid, lease.gid, &limits)?;
        if !run.cgroups.is_tracked() {
            return Err(io::Error::other("the warm sandbox's cgroups could not be created"));
        }
        let fifo_path = run.scratch.tmp().join(HANDOFF_NAME);
        mkfifo(&fifo_path, lease.uid, lease.gid)?;
        let spec = SpawnSpec {
            command: plan::warm_command(language, &self.config.python_path, &self.config.rscript_path),
            env: bwrap::sandbox_env(&BTreeMap::new(), ""),
            work_files: Vec::new(),
            limits,
            stdin_piped: true,
            nice: 10,
        };
        let mut started = self.spawn_sandbox(&run, spec)?;
        let end = begin + WARMUP_LIMIT;
        let fifo = loop {
            match open_fifo_writer(&fifo_path) {
                Ok(Some(fd)) => break fd,
                Ok(None) => {}
                Err(e) => return Err(e),
            }
            wait_alive(&mut started, end, language).await?;
        };
        // The interpreter has it open: its name is no longer needed, and the task never sees it.
        std::fs::remove_file(&fifo_path)?;
        if language == Language::R {
            write_all_nonblocking(&fifo, plan::R_READY_LINE.as_bytes())?;
            let marker = run.scratch.tmp().join(READY_MARKER_NAME);
            while !marker.exists() {
                wait_alive(&mut started, end, language).await?;
            }
        }
        let ready_at = Instant::now();
        if let Some(m) = self.warm.metrics.get() {
            m.warmup.with_label_values(&[language.as_str()]).observe((ready_at - begin).as_secs_f64());
        }
        Ok(WarmSandbox { started, run, lease, fifo: Some(fifo), language, ready_at })
    }

    /// A warm sandbox for `job`, armed with its limits and inputs, and the hand-off to write
    /// when it is watched. `Err(miss)` when the task must start cold.
    pub(super) fn claim_warm(&self, job: &Job) -> Result<(WarmSandbox, Handoff), Miss> {
        if plan::cold_start_needed(&job.env).is_some() {
            return Err(Miss::Env);
        }
        let mut w = self.warm.take(job.language).ok_or(Miss::Empty)?;
        match self.arm(&mut w, job) {
            Ok(bytes) => match w.fifo.take() {
                Some(fifo) => Ok((w, Handoff { fifo, bytes })),
                None => Err(Miss::Failed),
            },
            Err(e) => {
                tracing::warn!(task_id = %job.key.task_id, error = %e, "could not hand the task to a warm sandbox; starting it cold");
                discard(vec![w]);
                Err(Miss::Failed)
            }
        }
    }

    /// Applies the task's limits and writes its files; returns the hand-off bytes.
    fn arm(&self, w: &mut WarmSandbox, job: &Job) -> io::Result<Vec<u8>> {
        let limits = self.limits(job);
        w.run.cgroups.set_limits(&limits)?;
        let rlimits = limits.rlimits(w.run.cgroups.has_memory);
        let find = |r: Resource| rlimits.iter().find(|(res, _, _)| *res == r).map(|&(_, soft, hard)| (soft, hard));
        let (as_soft, as_hard) = find(Resource::As).unwrap_or((u64::MAX, u64::MAX));
        let (cpu_soft, cpu_hard) = find(Resource::Cpu).unwrap_or((u64::MAX, u64::MAX));
        let pids = w.run.cgroups.members();
        if pids.is_empty() {
            return Err(io::Error::other("the warm sandbox has no processes left"));
        }
        let mut rlimits = Vec::with_capacity(2 * pids.len());
        for &pid in &pids {
            // CPU time counts from the process's start: what the warm-up used is added, so the
            // task gets its whole budget.
            let used = cpu_seconds_used(pid).unwrap_or(0);
            rlimits.push((pid, libc::RLIMIT_AS, rlimit(as_soft, as_hard)));
            rlimits.push((pid, libc::RLIMIT_CPU, rlimit(cpu_soft.saturating_add(used), cpu_hard.saturating_add(used))));
        }
        lower_rlimits_as(w.lease.uid, w.lease.gid, rlimits)?;
        for pid in pids {
            // SAFETY: setpriority on a pid of the task's cgroup; no memory is involved.
            if unsafe { libc::setpriority(libc::PRIO_PROCESS, pid as libc::id_t, 0) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        write_inputs(&w.run.scratch.work(), job)?;
        let marker = w.run.scratch.tmp().join(READY_MARKER_NAME);
        match std::fs::remove_file(&marker) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let code = code_file_name(job.language, job.files.keys().map(String::as_str));
        let env = bwrap::sandbox_env(&job.env, &job.key.task_id.to_string());
        let bytes = match job.language {
            Language::Python => plan::python_handoff(code, &job.args, &env),
            Language::R => plan::r_handoff(code, &job.code, &job.args, &env),
        };
        bytes.map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
    }
}

/// Keeps the pool at its targets until the backend is gone or closed.
async fn refill(backend: Weak<LocalBackend>) {
    let mut warned = false;
    loop {
        let Some(b) = backend.upgrade() else { return };
        if b.warm.closed.load(Ordering::SeqCst) {
            return;
        }
        let Some(language) = b.warm.needs() else {
            let wait = b.warm.next_expiry();
            let wake = b.warm.wake.clone();
            drop(b);
            let _ = tokio::time::timeout(wait, wake.notified()).await;
            continue;
        };
        match b.warm_one(language).await {
            Ok(w) => {
                warned = false;
                if b.warm.closed.load(Ordering::SeqCst) {
                    let _ = tokio::task::spawn_blocking(move || drop(w)).await;
                    return;
                }
                b.warm.push(w);
            }
            Err(e) => {
                // Logged once per run of failures: a full host or a missing runtime would
                // otherwise log every few seconds.
                if !warned {
                    tracing::warn!(language = language.as_str(), error = %e, "could not start a warm sandbox; retrying every {} s", RETRY_PAUSE.as_secs());
                    warned = true;
                }
                drop(b);
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }
}

/// Sleeps a moment; fails when the interpreter has exited or `end` has passed.
async fn wait_alive(started: &mut Started, end: Instant, language: Language) -> io::Result<()> {
    if let Some(status) = started.child.try_wait()? {
        return Err(io::Error::other(format!("{} exited during warm-up ({status})", language.as_str())));
    }
    if Instant::now() >= end {
        return Err(io::Error::other(format!(
            "{} did not start within {} s",
            language.as_str(),
            WARMUP_LIMIT.as_secs()
        )));
    }
    tokio::time::sleep(Duration::from_millis(2)).await;
    Ok(())
}

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// A FIFO only the sandbox's uid may open.
fn mkfifo(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let c = cpath(path)?;
    // SAFETY: NUL-terminated path alive for the call.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(io::Error::last_os_error());
    }
    std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

/// The FIFO's write end once a reader has it open; `None` while nobody reads (`ENXIO`).
fn open_fifo_writer(path: &Path) -> io::Result<Option<OwnedFd>> {
    let c = cpath(path)?;
    // SAFETY: NUL-terminated path; the descriptor returned is ours.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_WRONLY | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOFOLLOW) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(e) };
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let meta = std::fs::File::from(fd.try_clone()?).metadata()?;
    use std::os::unix::fs::FileTypeExt;
    if !meta.file_type().is_fifo() {
        return Err(io::Error::other("the warm sandbox's hand-off is not a FIFO"));
    }
    Ok(Some(fd))
}

/// Writes a few bytes into an empty pipe (they always fit).
fn write_all_nonblocking(fd: &OwnedFd, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    std::fs::File::from(fd.try_clone()?).write_all(bytes)
}

fn rlimit(soft: u64, hard: u64) -> libc::rlimit {
    libc::rlimit { rlim_cur: soft as libc::rlim_t, rlim_max: hard as libc::rlim_t }
}

/// Lowers rlimits of the sandbox's processes. Changing another process's limits takes either
/// `CAP_SYS_RESOURCE` or the same uid and gid. With the capability the service sets them
/// itself. Without it (a root in a container or VM may lack it) a thread of the service takes
/// the sandbox's uid and gid and sets them: Linux credentials belong to each thread, and the raw
/// system calls change only the calling thread's (glibc's wrappers would change every thread's).
/// The thread then ends; it cannot get root back, and the sandbox, in its own pid namespace,
/// cannot name it. Starting a helper process instead cost 3-5 ms of every hand-over.
///
/// A side effect: changing a thread's effective uid makes the kernel mark the whole service
/// non-dumpable (`fs.suid_dumpable`), so it leaves no core dump.
fn lower_rlimits_as(uid: u32, gid: u32, limits: Vec<(i32, RlimitResource, libc::rlimit)>) -> io::Result<()> {
    match set_rlimits(&limits) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => std::thread::Builder::new()
            .name("agenttask-rlimit".into())
            .spawn(move || {
                // SAFETY: raw setresgid/setresuid on this thread only; nothing else runs on it.
                unsafe {
                    if libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0
                        || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                }
                set_rlimits(&limits)
            })?
            .join()
            .map_err(|_| io::Error::other("the rlimit thread panicked"))?,
        other => other,
    }
}

/// `prlimit` for each entry, stopping at the first failure.
fn set_rlimits(limits: &[(i32, RlimitResource, libc::rlimit)]) -> io::Result<()> {
    for (pid, resource, limit) in limits {
        // SAFETY: prlimit reads the prepared struct and writes nothing (no old limit).
        if unsafe { libc::prlimit(*pid, *resource, limit, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// User plus system CPU seconds a process has used, rounded up.
fn cpu_seconds_used(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(cpu_ticks(&stat)?.div_ceil(hz))
}

/// utime + stime from a `/proc/<pid>/stat` line: the 14th and 15th fields, counted after the
/// command name, which may hold spaces and parentheses.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let mut fields = rest.split(' ').skip(11);
    Some(fields.next()?.parse::<u64>().ok()? + fields.next()?.parse::<u64>().ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_read_past_an_awkward_command_name() {
        let stat = "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 37 5 0 0 20 0 1 0 99 0 0";
        assert_eq!(cpu_ticks(stat), Some(42));
        assert_eq!(cpu_ticks("4242 (python3"), None);
        assert_eq!(cpu_ticks("1 (x) S 1"), None);
    }

    #[test]
    fn the_pool_targets_each_language_and_can_be_off() {
        let c = WarmConfig::default();
        assert_eq!((c.target(Language::Python), c.target(Language::R)), (2, 1));
        let off = WarmConfig::off();
        assert_eq!(off.target(Language::Python) + off.target(Language::R), 0);
        assert_eq!(Miss::Empty.label(), "empty");
    }
}
