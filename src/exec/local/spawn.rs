//! Spawning bubblewrap with the task's cgroups, rlimits and uid, and watching it: clock, output caps.

use std::ffi::{CStr, OsString};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

use super::scratch::PreparedRun;
use super::LocalBackend;
use crate::exec::{Job, Progress};
use crate::sandbox::bwrap::{self, BwrapPlan};
use crate::sandbox::code_file_name;
use crate::sandbox::limits::{self, KillReason, Limits, Resource, RunFacts};
use crate::sandbox::runtime_command;

/// What bubblewrap is started with: the program, its environment and binds, its limits.
pub(super) struct SpawnSpec {
    /// The runtime's argv inside the sandbox.
    pub(super) command: Vec<OsString>,
    /// The whole environment (see [`bwrap::sandbox_env`]).
    pub(super) env: Vec<(String, String)>,
    /// Names in the scratch's `in/` bound read-only into `/work`.
    pub(super) work_files: Vec<String>,
    pub(super) limits: Limits,
    /// Whether stdin is a pipe (a warm sandbox always has one: its task may bring stdin).
    pub(super) stdin_piped: bool,
    /// Scheduling niceness of the sandbox's processes (warm-ups run at low priority).
    pub(super) nice: i32,
}

/// A started sandbox: bubblewrap and, inside it, the program.
pub(super) struct Started {
    pub(super) child: tokio::process::Child,
    /// bubblewrap's `--json-status-fd`: it names the child's pid once the sandbox is set up.
    status_read: OwnedFd,
}

/// Bytes for a warm sandbox's hand-off FIFO, written once the output readers run.
pub(super) struct Handoff {
    pub(super) fifo: OwnedFd,
    pub(super) bytes: Vec<u8>,
}

impl LocalBackend {
    /// The cold path: start the task's own program in its sandbox and watch it.
    pub(super) async fn spawn_and_watch(
        &self,
        job: &Job,
        run: &mut PreparedRun,
        progress: Option<&Progress>,
    ) -> io::Result<Watched> {
        let code = code_file_name(job.language, job.files.keys().map(String::as_str));
        let mut work_files: Vec<String> = job.files.keys().cloned().collect();
        work_files.push(code.to_string());
        let spec = SpawnSpec {
            command: runtime_command(
                job.language,
                &self.config.python_path,
                &self.config.rscript_path,
                code,
                &job.args,
            ),
            env: bwrap::sandbox_env(&job.env, &job.key.task_id.to_string()),
            work_files,
            limits: self.limits(job),
            stdin_piped: job.stdin.is_some(),
            nice: 0,
        };
        let started = self.spawn_sandbox(run, spec)?;
        self.watch(job, run, started, None, progress).await
    }

    /// Starts bubblewrap as the run's uid, inside its cgroups, with the spec's program.
    pub(super) fn spawn_sandbox(&self, run: &PreparedRun, spec: SpawnSpec) -> io::Result<Started> {
        let seccomp_fd = memfd(c"agenttask-seccomp", &self.seccomp)?;
        let plan = BwrapPlan {
            host: &self.host,
            scratch: &run.scratch,
            work_files: spec.work_files,
            env: spec.env,
            seccomp_fd: seccomp_fd.as_raw_fd(),
            command: spec.command,
        };
        let invalid = |e: bwrap::PlanError| io::Error::new(io::ErrorKind::InvalidInput, e.to_string());
        let args_fd = memfd(c"agenttask-args", &plan.options_blob().map_err(invalid)?)?;
        let argv = plan.argv(args_fd.as_raw_fd()).map_err(invalid)?;
        let (status_read, status_write) = pipe()?;

        let setup = ChildSetup {
            cgroup_procs: run.cgroups.procs_fds.iter().map(|f| f.as_raw_fd()).collect(),
            inherit: vec![seccomp_fd.as_raw_fd(), args_fd.as_raw_fd(), status_write.as_raw_fd()],
            rlimits: spec.limits.rlimits(run.cgroups.has_memory).into_iter().map(to_libc_rlimit).collect(),
            uid: run.uid,
            gid: run.gid,
            nice: spec.nice,
            // SAFETY: getpid has no preconditions.
            parent: unsafe { libc::getpid() },
        };

        let mut status_args = vec![OsString::from("--json-status-fd"), status_write.as_raw_fd().to_string().into()];
        status_args.extend(argv);
        let mut cmd = tokio::process::Command::new(&self.config.bwrap_path);
        cmd.args(&status_args)
            .env_clear()
            .current_dir("/")
            .stdin(if spec.stdin_piped { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        // SAFETY: `ChildSetup::apply` only makes async-signal-safe system calls on data prepared
        // before the fork; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || setup.apply());
        }
        let child = cmd.spawn()?;
        // Only bubblewrap may hold these now.
        drop((seccomp_fd, args_fd, status_write));
        Ok(Started { child, status_read })
    }

    /// Watches a started sandbox to its end: output caps, the deadline (counted from here), a
    /// warm sandbox's hand-off and the task's stdin.
    pub(super) async fn watch(
        &self,
        job: &Job,
        run: &mut PreparedRun,
        started: Started,
        handoff: Option<Handoff>,
        progress: Option<&Progress>,
    ) -> io::Result<Watched> {
        let Started { mut child, status_read } = started;
        if let Some(p) = progress {
            p.running();
        }
        tracing::debug!(task_id = %job.key.task_id, pid = ?child.id(), warm = handoff.is_some(), "sandbox started");

        let cap = self.config.output_limit_bytes;
        let overflow = Arc::new(Notify::new());
        // The run's pipe readers and stdin writer belong to the run: dropping the run (a cancel,
        // a shutdown) drops this set, which aborts them.
        let mut io = tokio::task::JoinSet::new();
        let stdout = spawn_reader(&mut io, child.stdout.take(), cap, overflow.clone());
        let live = LiveOutput::register(self, job.key.task_id, &stdout);
        let stderr = spawn_reader(&mut io, child.stderr.take(), cap, overflow.clone());
        if let Some(Handoff { fifo, bytes }) = handoff {
            let mut fifo = tokio::net::unix::pipe::Sender::from_owned_fd(fifo)?;
            io.spawn(async move {
                // Closing the FIFO after the bytes is the interpreter's end of input. A program
                // that is killed before reading all of it is fine.
                let _ = fifo.write_all(&bytes).await;
            });
        }
        let stdin_task = match (child.stdin.take(), job.stdin.clone()) {
            (Some(mut pipe), Some(data)) => Some(io.spawn(async move {
                // The program may never read its stdin, or exit early: errors are fine.
                let _ = pipe.write_all(data.as_bytes()).await;
            })),
            // No stdin for the task: a warm sandbox's pipe is closed here, so reads see its end.
            _ => None,
        };

        let deadline = tokio::time::sleep(job.timeout);
        tokio::pin!(deadline);
        let killed_for = tokio::select! {
            status = child.wait() => { status?; None }
            _ = &mut deadline => Some(KillReason::Deadline),
            _ = overflow.notified() => Some(KillReason::OutputCap),
        };
        if killed_for.is_some() {
            let _ = child.start_kill();
            run.cgroups.kill_all();
        }
        let status = match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
            Ok(status) => status?,
            Err(_) => return Err(io::Error::other("bubblewrap did not exit 10 s after SIGKILL")),
        };
        if let Some(stdin) = stdin_task {
            stdin.abort();
        }
        // Whatever the program left behind: normally nothing, its pid namespace is being torn
        // down. Collection waits until the cgroup is seen empty, so nothing of the task can
        // still change its files; `PreparedRun`'s drop keeps killing until the cgroups can be
        // removed.
        let emptied = run.cgroups.kill_all_and_wait(Duration::from_secs(5)).await;

        // Every writer is dead by now: the readers reach EOF at once. Give up after 2 s.
        let drained = async { while io.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(2), drained).await.is_err() {
            io.abort_all();
        }
        drop(live);
        let stdout = take(&stdout);
        let stderr = take(&stderr);
        let status_text = read_nonblocking(status_read, 64 * 1024);
        use std::os::unix::process::ExitStatusExt;
        let facts = RunFacts { killed_for, exit_code: status.code(), signal: status.signal(), ..RunFacts::default() };
        let setup_failure = (killed_for.is_none() && !status_text.contains("\"child-pid\"")).then(|| {
            let msg = String::from_utf8_lossy(&stderr.0);
            format!("bubblewrap failed to start the sandbox ({status}): {}", msg.trim())
        });
        Ok(Watched {
            facts,
            stdout: stdout.0,
            stdout_overflow: stdout.1,
            stderr: stderr.0,
            stderr_overflow: stderr.1,
            setup_failure,
            emptied,
        })
    }
}

/// A running task's stdout, visible to `live_output` until the run is over (dropped on every
/// way out of `spawn_and_watch`).
struct LiveOutput<'a> {
    backend: &'a LocalBackend,
    task_id: uuid::Uuid,
}

impl<'a> LiveOutput<'a> {
    fn register(backend: &'a LocalBackend, task_id: uuid::Uuid, stdout: &Captured) -> Self {
        backend.live.lock().unwrap_or_else(|p| p.into_inner()).insert(task_id, stdout.clone());
        LiveOutput { backend, task_id }
    }
}

impl Drop for LiveOutput<'_> {
    fn drop(&mut self) {
        self.backend.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.task_id);
    }
}

/// What watching a run produced.
pub(super) struct Watched {
    pub(super) facts: RunFacts,
    pub(super) stdout: Vec<u8>,
    pub(super) stdout_overflow: bool,
    pub(super) stderr: Vec<u8>,
    pub(super) stderr_overflow: bool,
    /// bubblewrap never started the program: this is a backend failure, not the task's.
    pub(super) setup_failure: Option<String>,
    /// The task's cgroup was seen empty after the run: no process of it is left.
    pub(super) emptied: bool,
}

/// What the forked child does before exec'ing bubblewrap. Runs between fork and exec, so only
/// async-signal-safe system calls on prepared data.
struct ChildSetup {
    cgroup_procs: Vec<RawFd>,
    inherit: Vec<RawFd>,
    rlimits: Vec<(RlimitResource, libc::rlimit)>,
    uid: u32,
    gid: u32,
    nice: i32,
    parent: libc::pid_t,
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub(super) type RlimitResource = libc::__rlimit_resource_t;
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(super) type RlimitResource = libc::c_int;

fn to_libc_rlimit((resource, soft, hard): limits::Rlimit) -> (RlimitResource, libc::rlimit) {
    let r = match resource {
        Resource::As => libc::RLIMIT_AS,
        Resource::Cpu => libc::RLIMIT_CPU,
        Resource::Fsize => libc::RLIMIT_FSIZE,
        Resource::Nofile => libc::RLIMIT_NOFILE,
        Resource::Nproc => libc::RLIMIT_NPROC,
        Resource::Core => libc::RLIMIT_CORE,
        Resource::Msgqueue => libc::RLIMIT_MSGQUEUE,
        Resource::Sigpending => libc::RLIMIT_SIGPENDING,
    };
    (r as RlimitResource, libc::rlimit { rlim_cur: soft as libc::rlim_t, rlim_max: hard as libc::rlim_t })
}

impl ChildSetup {
    fn apply(&self) -> io::Result<()> {
        let check = |rc: libc::c_int| {
            if rc < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        // SAFETY: plain system calls on descriptors and values owned by this (forked) process.
        unsafe {
            // Enter the task's cgroups ("0" = the writing process) while still root.
            for &fd in &self.cgroup_procs {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            for &fd in &self.inherit {
                check(libc::fcntl(fd, libc::F_SETFD, 0))?;
            }
            for (resource, limit) in &self.rlimits {
                check(libc::setrlimit(*resource, limit))?;
            }
            if self.nice != 0 {
                check(libc::setpriority(libc::PRIO_PROCESS, 0, self.nice))?;
            }
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setresgid(self.gid, self.gid, self.gid))?;
            check(libc::setresuid(self.uid, self.uid, self.uid))?;
            // After the uid change (which clears it): die with the service. If the service is
            // already gone, do not start at all.
            check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0))?;
            if libc::getppid() != self.parent {
                libc::_exit(111);
            }
        }
        Ok(())
    }
}

/// What a capped reader read, and whether its stream went over the cap.
pub(super) type Captured = Arc<Mutex<(Vec<u8>, bool)>>;

/// Reads one output stream into a buffer of at most `cap` bytes, on the run's task set; the
/// first byte over the cap stops it and has the task killed.
fn spawn_reader<R: AsyncRead + Unpin + Send + 'static>(
    io: &mut tokio::task::JoinSet<()>,
    pipe: Option<R>,
    cap: usize,
    overflow: Arc<Notify>,
) -> Captured {
    let buf: Captured = Arc::new(Mutex::new((Vec::new(), false)));
    if let Some(mut pipe) = pipe {
        let buf = buf.clone();
        io.spawn(async move {
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                let n = match pipe.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut b = buf.lock().unwrap_or_else(|p| p.into_inner());
                let room = cap - b.0.len();
                b.0.extend_from_slice(&chunk[..n.min(room)]);
                if n > room {
                    // Over the cap: keep the first `cap` bytes, stop reading, have the task killed.
                    b.1 = true;
                    overflow.notify_one();
                    return;
                }
            }
        });
    }
    buf
}

/// The bytes read and whether the cap overflowed.
fn take(buf: &Captured) -> (Vec<u8>, bool) {
    let mut b = buf.lock().unwrap_or_else(|p| p.into_inner());
    (std::mem::take(&mut b.0), b.1)
}

/// An anonymous in-memory file holding `data`, positioned at its start (close-on-exec; the
/// child clears that for bubblewrap).
fn memfd(name: &CStr, data: &[u8]) -> io::Result<OwnedFd> {
    // SAFETY: `name` is NUL-terminated; the returned descriptor is owned by us from here on.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.write_all(data)?;
    file.seek(SeekFrom::Start(0))?;
    Ok(file.into())
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the array, which we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Whatever is buffered in a non-blocking pipe, up to `max` bytes.
fn read_nonblocking(fd: OwnedFd, max: u64) -> String {
    let mut out = Vec::new();
    let _ = File::from(fd).take(max).read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}
