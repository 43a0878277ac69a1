//! The local backend: runs each job on this host under bubblewrap, as the unprivileged
//! `agenttask-sandbox` user, inside per-task cgroups and a size-capped scratch file system.
//!
//! This is the I/O edge of [`crate::sandbox`], which decides *what* to run (bubblewrap options,
//! seccomp program, limits, verdict); here we create the scratch and cgroups, spawn, watch the
//! clock and the output, collect the result and artifacts, and clean up whatever happened.
//!
//! # One run
//! 1. **Scratch**: `<data_dir>/run/<task>-<nonce>/` becomes a tmpfs (`size=scratch_bytes`,
//!    `nr_inodes=scratch_inodes`, nosuid, nodev) holding `in/` (inputs, code, synthetic /etc files,
//!    root-owned, read-only), and `work/`, `tmp/`, `shm/`, `out/` (owned by the sandbox user).
//!    Its pages are charged to the task's memory cgroup. If the mount is refused (not root), it
//!    is a plain directory and only `RLIMIT_FSIZE` bounds each file.
//! 2. **Cgroups**: `<service cgroup>/agenttask/<task>-<nonce>` in each of memory, pids, cpu
//!    (v1) or in the unified hierarchy (v2), with the task's limits; the child enters them in
//!    `pre_exec`, before bubblewrap runs, so every process of the task is inside.
//! 3. **Spawn** `bwrap --args FD -- runtime...` with an empty environment; in `pre_exec`: join
//!    the cgroups, set rlimits, drop to the sandbox uid/gid (no supplementary groups), ask for
//!    SIGKILL if the service dies (`PR_SET_PDEATHSIG`).
//! 4. **Watch**: stdout and stderr are read concurrently, each capped; the first stream over its
//!    cap, or the deadline, kills the task: bubblewrap (its pid namespace dies with it) and
//!    every process left in the task's cgroup.
//! 5. **Collect** the result file and artifacts without following links, then unmount and
//!    remove the scratch and the cgroups, also when the run future is dropped.

use std::ffi::{CStr, CString, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use chrono::Utc;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::exec::{
    Artifact, Backend, BackendError, BoxFuture, Capabilities, EventSink, InProcessRuns, Job,
    Outcome, ProgramResult, Progress, RunKey,
};
use crate::domain::validate::BackendIsolation;
use crate::sandbox::bwrap::{self, BwrapPlan, HostLayout, RootEntry, ScratchLayout};
use crate::sandbox::cgroup::{self, CgroupHost};
use crate::sandbox::limits::{self, KillReason, Limits, Resource, RunFacts};
use crate::sandbox::{captured_text, code_file_name, runtime_command, seccomp};

const MIB: u64 = 1 << 20;

/// Settings of the local backend. [`LocalConfig::new`] gives the defaults for a data directory.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Service-owned directory: `run/` (per-task scratch, removed after each run) and
    /// `artifacts/<task id>/` (collected artifacts, removed by [`sweep_artifacts`]).
    pub data_dir: PathBuf,
    /// Cap per output stream (stdout, stderr), in bytes. Default 1 MiB.
    pub output_limit_bytes: usize,
    /// Python interpreter (must be visible in the sandbox: under /usr or in `extra_ro_binds`).
    /// Default `/usr/bin/python3` (the system one, never a pyenv shim).
    pub python_path: PathBuf,
    /// Default `/usr/bin/Rscript`.
    pub rscript_path: PathBuf,
    /// Default `/usr/bin/bwrap`.
    pub bwrap_path: PathBuf,
    /// The host user every sandboxed process runs as. Default `agenttask-sandbox`.
    pub sandbox_user: String,
    /// Size of a task's scratch (working dir + /tmp + /dev/shm + result + artifacts), and the
    /// largest file it may write. Default 128 MiB.
    pub scratch_bytes: u64,
    /// Files and directories a task may create in its scratch. Default 32768.
    pub scratch_inodes: u64,
    /// Processes and threads per task (pids cgroup). Default 128.
    pub max_processes: u64,
    /// `RLIMIT_NPROC` of the sandbox uid, i.e. for all running tasks together. Default 16384.
    pub uid_max_processes: u64,
    /// `RLIMIT_NOFILE`. Default 1024.
    pub max_open_files: u64,
    /// Largest result file read back. Default 1 MiB.
    pub result_max_bytes: u64,
    /// Artifacts collected per task. Default 100 files.
    pub artifact_max_files: usize,
    /// Total artifact bytes per task. Default 64 MiB.
    pub artifact_max_bytes: u64,
    /// Directory depth followed below the artifacts directory. Default 8.
    pub artifact_max_depth: usize,
    /// How long collected artifacts are kept (see [`LocalBackend::sweep_artifacts`]). Default 24 h.
    pub artifact_ttl: Duration,
    /// Tasks this host runs at once (how many runs one executor watches). Default 64.
    pub max_runs: usize,
    /// Extra host paths bound read-only at the same place in the sandbox. Default none.
    pub extra_ro_binds: Vec<PathBuf>,
}

impl LocalConfig {
    /// The defaults, with the given data directory.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            output_limit_bytes: MIB as usize,
            python_path: "/usr/bin/python3".into(),
            rscript_path: "/usr/bin/Rscript".into(),
            bwrap_path: "/usr/bin/bwrap".into(),
            sandbox_user: "agenttask-sandbox".into(),
            scratch_bytes: 128 * MIB,
            scratch_inodes: 32_768,
            max_processes: 128,
            uid_max_processes: 16_384,
            max_open_files: 1024,
            result_max_bytes: MIB,
            artifact_max_files: 100,
            artifact_max_bytes: 64 * MIB,
            artifact_max_depth: 8,
            artifact_ttl: Duration::from_secs(24 * 3600),
            max_runs: 64,
            extra_ro_binds: Vec::new(),
        }
    }
}

impl Default for LocalConfig {
    /// Data in `/var/lib/agenttask`.
    fn default() -> Self {
        Self::new("/var/lib/agenttask")
    }
}

/// Why the backend could not be set up. The message says what to do.
#[derive(Debug)]
pub struct SetupError(String);

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SetupError {}

const INSTALL_HINT: &str = "run deploy/local/install-sandbox.sh as root";

/// Runs jobs in bubblewrap sandboxes on this host. Cheap to share (`Arc`) across tasks.
pub struct LocalBackend {
    config: LocalConfig,
    uid: u32,
    gid: u32,
    host: HostLayout,
    cgroups: CgroupHost,
    seccomp: Vec<u8>,
    /// Whether scratch dirs are size-capped tmpfs mounts (false: plain directories).
    scratch_tmpfs: AtomicBool,
    /// Runs in flight; they die with this process.
    runs: InProcessRuns,
}

impl std::fmt::Debug for LocalBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBackend")
            .field("data_dir", &self.config.data_dir)
            .field("uid", &self.uid)
            .field("cgroups", &self.cgroups)
            .field("scratch_tmpfs", &self.scratch_tmpfs.load(Ordering::Relaxed))
            .finish()
    }
}

impl LocalBackend {
    /// Checks the host and prepares the data directory.
    ///
    /// # Errors
    /// When bubblewrap or the sandbox user is missing, the service is not root (it must switch
    /// to the sandbox uid), the data directory cannot be prepared or reached by the sandbox user,
    /// or the architecture has no seccomp filter. Missing Python or R is only logged: those tasks
    /// then end in `BackendError`.
    pub fn new(config: LocalConfig) -> Result<Self, SetupError> {
        let err = |m: String| Err(SetupError(m));
        let seccomp = match seccomp::program_for_host() {
            Ok(p) => seccomp::to_bytes(&p),
            Err(e) => return err(e.to_string()),
        };
        if !is_executable(&config.bwrap_path) {
            return err(format!(
                "bubblewrap not found at {}: {INSTALL_HINT} (or `apt-get install -y --no-install-recommends bubblewrap`)",
                config.bwrap_path.display()
            ));
        }
        let (uid, gid) = match lookup_user(&config.sandbox_user) {
            Ok(Some(ids)) => ids,
            Ok(None) => {
                return err(format!(
                    "sandbox user {:?} does not exist: {INSTALL_HINT} (it runs `useradd --system --user-group --no-create-home --shell /usr/sbin/nologin {}`)",
                    config.sandbox_user, config.sandbox_user
                ))
            }
            Err(e) => return err(format!("looking up sandbox user {:?}: {e}", config.sandbox_user)),
        };
        if uid == 0 || gid == 0 {
            return err(format!(
                "sandbox user {:?} has uid/gid 0; it must be an unprivileged user",
                config.sandbox_user
            ));
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return err(format!(
                "the local backend must run as root: it switches each sandbox to the unprivileged user {:?}, mounts size-capped scratch file systems and creates cgroups",
                config.sandbox_user
            ));
        }
        for (name, path) in [
            ("python", &config.python_path),
            ("Rscript", &config.rscript_path),
        ] {
            if !is_executable(path) {
                tracing::warn!(path = %path.display(), "{name} not found; tasks in that language will fail with BackendError ({INSTALL_HINT})");
            }
        }
        prepare_data_dir(&config.data_dir, uid, gid).map_err(SetupError)?;
        sweep_stale_runs(&config.data_dir.join("run"));

        let host = detect_host_layout(&config.extra_ro_binds);
        let cgroups = prepare_cgroups();
        let scratch_tmpfs = probe_tmpfs(&config.data_dir.join("run"));
        if !scratch_tmpfs {
            tracing::warn!("cannot mount tmpfs scratch dirs; task scratch is a plain directory bounded only by RLIMIT_FSIZE per file");
        }
        tracing::info!(
            uid,
            gid,
            ?cgroups,
            scratch_tmpfs,
            "local sandbox backend ready"
        );
        Ok(Self {
            config,
            uid,
            gid,
            host,
            cgroups,
            seccomp,
            scratch_tmpfs: AtomicBool::new(scratch_tmpfs),
            runs: InProcessRuns::new(),
        })
    }

    pub fn config(&self) -> &LocalConfig {
        &self.config
    }

    /// Where a task's collected artifacts are: `<data_dir>/artifacts/<task id>/`.
    pub fn artifacts_dir(&self, task_id: Uuid) -> PathBuf {
        self.config
            .data_dir
            .join("artifacts")
            .join(task_id.to_string())
    }

    /// Removes artifacts older than the configured TTL; see [`sweep_artifacts`].
    pub fn sweep_artifacts(&self) -> io::Result<usize> {
        sweep_artifacts(&self.config.data_dir, self.config.artifact_ttl)
    }

    /// Runs one job to completion (what [`Backend::launch`] does in the background). Dropping
    /// the future kills the sandbox and removes its scratch and cgroups.
    pub async fn run(&self, job: Job) -> Outcome {
        self.run_job(job, None).await
    }

    async fn run_job(&self, job: Job, progress: Option<&Progress>) -> Outcome {
        let started_at = Utc::now();
        let fail = |msg: String| Outcome::backend_error(msg, started_at);
        let runtime = match job.language {
            crate::domain::task::Language::Python => &self.config.python_path,
            crate::domain::task::Language::R => &self.config.rscript_path,
        };
        if !is_executable(runtime) {
            return fail(format!(
                "{} runtime not found at {} ({INSTALL_HINT})",
                job.language.as_str(),
                runtime.display()
            ));
        }
        let mut run = match self.prepare(&job) {
            Ok(run) => run,
            Err(e) => return fail(format!("could not prepare the sandbox: {e}")),
        };
        if let Some(p) = progress {
            p.scheduled();
        }
        let watched = match self.spawn_and_watch(&job, &mut run, progress).await {
            Ok(w) => w,
            Err(e) => return fail(format!("could not run the sandbox: {e}")),
        };
        if let Some(msg) = watched.setup_failure {
            return fail(msg);
        }

        let mut facts = watched.facts;
        facts.scratch_full = run.scratch_is_full();
        let oom = run.cgroups.oom_state();
        facts.cgroup_oom_kills = oom.0;
        facts.cgroup_memory_limit_hit = oom.1;
        let tail_start = watched.stderr.len().saturating_sub(4096);
        facts.memory_error_in_stderr = limits::looks_like_memory_error(&String::from_utf8_lossy(
            &watched.stderr[tail_start..],
        ));
        let (termination, exit_code) = limits::verdict(&facts);

        let out = run.scratch.out();
        let caps = ArtifactCaps {
            max_files: self.config.artifact_max_files,
            max_bytes: self.config.artifact_max_bytes,
            max_depth: self.config.artifact_max_depth,
        };
        let result_max = self.config.result_max_bytes;
        let dest = self.artifacts_dir(job.key.task_id);
        let collected = tokio::task::spawn_blocking(move || {
            let result = read_result(&out.join(ScratchLayout::RESULT_FILE), result_max);
            let artifacts = collect_artifacts(&out.join(ScratchLayout::ARTIFACTS), &dest, &caps);
            (result, artifacts)
        })
        .await;
        let (result, artifacts) = match collected {
            Ok(c) => c,
            Err(e) => return fail(format!("collecting results failed: {e}")),
        };
        let cap = self.config.output_limit_bytes;
        let outcome = Outcome {
            termination,
            exit_code,
            stdout: captured_text(&watched.stdout, cap, watched.stdout_overflow),
            stderr: captured_text(&watched.stderr, cap, watched.stderr_overflow),
            result,
            artifacts,
            artifacts_note: None,
            started_at,
            finished_at: Utc::now(),
        };
        // Unmounting a big scratch can take a moment; keep it off the async workers. Awaited, so
        // that when a run returns nothing of it is left on the host.
        let _ = tokio::task::spawn_blocking(move || drop(run)).await;
        outcome
    }

    /// Creates the scratch, writes the inputs and creates the cgroups.
    fn prepare(&self, job: &Job) -> io::Result<PreparedRun> {
        let name = format!(
            "{}-{}",
            job.key.task_id,
            &Uuid::new_v4().simple().to_string()[..8]
        );
        let root = self.config.data_dir.join("run").join(&name);
        fs::DirBuilder::new().mode(0o711).create(&root)?;
        let mut run = PreparedRun {
            scratch: ScratchLayout::new(&root),
            mounted: false,
            cgroups: TaskCgroups::default(),
        };
        if self.scratch_tmpfs.load(Ordering::Relaxed) {
            match mount_tmpfs(&root, self.config.scratch_bytes, self.config.scratch_inodes) {
                Ok(()) => run.mounted = true,
                Err(e) => {
                    tracing::warn!(error = %e, "tmpfs scratch mount failed; using a plain directory from now on");
                    self.scratch_tmpfs.store(false, Ordering::Relaxed);
                }
            }
        }
        let s = &run.scratch;
        let (uid, gid) = (self.uid, self.gid);
        fs::DirBuilder::new().mode(0o755).create(s.inputs())?;
        for dir in [
            s.work(),
            s.tmp(),
            s.shm(),
            s.out(),
            s.out().join(ScratchLayout::ARTIFACTS),
        ] {
            fs::DirBuilder::new().mode(0o700).create(&dir)?;
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
        }
        for (name, content) in job.files.iter().map(|(n, c)| (n.as_str(), c.as_slice())) {
            if !bwrap::is_plain_name(name) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("input file name {name:?} is not a plain name"),
                ));
            }
            write_read_only(&s.inputs().join(name), content)?;
        }
        let code = code_file_name(job.language, job.files.keys().map(String::as_str));
        write_read_only(&s.inputs().join(code), job.code.as_bytes())?;
        for (name, content) in bwrap::synthetic_etc(uid, gid) {
            write_read_only(&s.inputs().join(name), content.as_bytes())?;
        }
        run.cgroups = TaskCgroups::create(&self.cgroups, &name, &self.limits(job));
        Ok(run)
    }

    fn limits(&self, job: &Job) -> Limits {
        Limits {
            timeout: job.timeout,
            cpu_millis: job.cpu_millis,
            memory_bytes: job.memory_bytes,
            max_processes: self.config.max_processes,
            scratch_bytes: self.config.scratch_bytes,
            max_open_files: self.config.max_open_files,
            uid_max_processes: self.config.uid_max_processes,
        }
    }

    async fn spawn_and_watch(&self, job: &Job, run: &mut PreparedRun, progress: Option<&Progress>) -> io::Result<Watched> {
        let code = code_file_name(job.language, job.files.keys().map(String::as_str));
        let mut work_files: Vec<String> = job.files.keys().cloned().collect();
        work_files.push(code.to_string());
        let seccomp_fd = memfd(c"agenttask-seccomp", &self.seccomp)?;
        let command = runtime_command(
            job.language,
            &self.config.python_path,
            &self.config.rscript_path,
            code,
            &job.args,
        );
        let plan = BwrapPlan {
            host: &self.host,
            scratch: &run.scratch,
            work_files,
            env: bwrap::sandbox_env(&job.env, &job.key.task_id.to_string()),
            seccomp_fd: seccomp_fd.as_raw_fd(),
            command,
        };
        let invalid =
            |e: bwrap::PlanError| io::Error::new(io::ErrorKind::InvalidInput, e.to_string());
        let args_fd = memfd(c"agenttask-args", &plan.options_blob().map_err(invalid)?)?;
        let argv = plan.argv(args_fd.as_raw_fd()).map_err(invalid)?;
        let (status_read, status_write) = pipe()?;

        let limits = self.limits(job);
        let setup = ChildSetup {
            cgroup_procs: run
                .cgroups
                .procs_fds
                .iter()
                .map(|f| f.as_raw_fd())
                .collect(),
            inherit: vec![
                seccomp_fd.as_raw_fd(),
                args_fd.as_raw_fd(),
                status_write.as_raw_fd(),
            ],
            rlimits: limits
                .rlimits(run.cgroups.has_memory)
                .into_iter()
                .map(to_libc_rlimit)
                .collect(),
            uid: self.uid,
            gid: self.gid,
            // SAFETY: getpid has no preconditions.
            parent: unsafe { libc::getpid() },
        };

        let mut status_args = vec![
            OsString::from("--json-status-fd"),
            status_write.as_raw_fd().to_string().into(),
        ];
        status_args.extend(argv);
        let mut cmd = tokio::process::Command::new(&self.config.bwrap_path);
        cmd.args(&status_args)
            .env_clear()
            .current_dir("/")
            .stdin(if job.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        // SAFETY: `ChildSetup::apply` only makes async-signal-safe system calls on data prepared
        // before the fork; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || setup.apply());
        }
        let mut child = cmd.spawn()?;
        if let Some(p) = progress {
            p.running();
        }
        // Only bubblewrap may hold these now.
        drop((seccomp_fd, args_fd, status_write));
        tracing::debug!(task_id = %job.key.task_id, pid = ?child.id(), "sandbox started");

        let cap = self.config.output_limit_bytes;
        let overflow = Arc::new(Notify::new());
        let stdout = spawn_reader(child.stdout.take(), cap, overflow.clone());
        let stderr = spawn_reader(child.stderr.take(), cap, overflow.clone());
        let stdin_task = match (child.stdin.take(), job.stdin.clone()) {
            (Some(mut pipe), Some(data)) => Some(AbortOnDrop(tokio::spawn(async move {
                // The program may never read its stdin, or exit early: errors are fine.
                let _ = pipe.write_all(data.as_bytes()).await;
            }))),
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
            Err(_) => {
                return Err(io::Error::other(
                    "bubblewrap did not exit 10 s after SIGKILL",
                ))
            }
        };
        drop(stdin_task);
        // Whatever the program left behind: normally nothing, its pid namespace is being torn
        // down. Wait briefly for that; `PreparedRun`'s drop keeps killing until the cgroups are
        // empty and can be removed.
        run.cgroups
            .kill_all_and_wait(Duration::from_millis(50))
            .await;

        let stdout = stdout.finish().await;
        let stderr = stderr.finish().await;
        let status_text = read_nonblocking(status_read, 64 * 1024);
        use std::os::unix::process::ExitStatusExt;
        let facts = RunFacts {
            killed_for,
            exit_code: status.code(),
            signal: status.signal(),
            ..RunFacts::default()
        };
        let setup_failure =
            (killed_for.is_none() && !status_text.contains("\"child-pid\"")).then(|| {
                let msg = String::from_utf8_lossy(&stderr.0);
                format!(
                    "bubblewrap failed to start the sandbox ({status}): {}",
                    msg.trim()
                )
            });
        Ok(Watched {
            facts,
            stdout: stdout.0,
            stdout_overflow: stdout.1,
            stderr: stderr.0,
            stderr_overflow: stderr.1,
            setup_failure,
        })
    }
}

impl Backend for LocalBackend {
    fn name_for(&self, _isolation: &str) -> &'static str {
        "local"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            isolation: BackendIsolation::StandardOnly,
            runs_survive_restart: false,
            max_runs: self.config.max_runs,
        }
    }

    fn launch(self: Arc<Self>, job: Job, events: EventSink) -> BoxFuture<'static, Result<(), BackendError>> {
        Box::pin(async move {
            let me = self.clone();
            self.runs.launch(job.key, events, move |progress| async move {
                me.run_job(job, Some(&progress)).await
            });
            Ok(())
        })
    }

    fn cancel(&self, key: RunKey) -> BoxFuture<'_, Result<(), BackendError>> {
        self.runs.cancel(key);
        Box::pin(async { Ok(()) })
    }

    fn adopt(self: Arc<Self>, _events: EventSink) -> BoxFuture<'static, Result<Vec<RunKey>, BackendError>> {
        // Sandboxes die with the process that started them: there is never anything to adopt.
        Box::pin(async { Ok(Vec::new()) })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.runs.shutdown())
    }
}

/// What watching a run produced.
struct Watched {
    facts: RunFacts,
    stdout: Vec<u8>,
    stdout_overflow: bool,
    stderr: Vec<u8>,
    stderr_overflow: bool,
    /// bubblewrap never started the program: this is a backend failure, not the task's.
    setup_failure: Option<String>,
}

/// A task's scratch and cgroups; dropping it removes both, whatever happened.
struct PreparedRun {
    scratch: ScratchLayout,
    mounted: bool,
    cgroups: TaskCgroups,
}

impl PreparedRun {
    fn scratch_is_full(&self) -> bool {
        let Ok(path) = CString::new(self.scratch.root().as_os_str().as_bytes()) else {
            return false;
        };
        // SAFETY: statvfs writes into the zeroed struct we pass; the path is NUL-terminated.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 || !self.mounted {
            return false;
        }
        (st.f_bavail as u64).saturating_mul(st.f_frsize as u64) < 64 * 1024 || st.f_favail == 0
    }
}

impl Drop for PreparedRun {
    fn drop(&mut self) {
        self.cgroups.kill_all();
        let root = self.scratch.root();
        if self.mounted {
            if let Err(e) = umount(root) {
                tracing::warn!(path = %root.display(), error = %e, "unmounting task scratch failed");
            }
        }
        if let Err(e) = remove_tree(root) {
            tracing::warn!(path = %root.display(), error = %e, "removing task scratch failed");
        }
        self.cgroups.remove();
    }
}

/// A task's cgroup directories and the open `cgroup.procs` files the child writes itself into.
#[derive(Default)]
struct TaskCgroups {
    dirs: Vec<PathBuf>,
    procs_fds: Vec<File>,
    memory: Option<PathBuf>,
    /// Where to list the task's processes (pids, else memory, else unified).
    procs_dir: Option<PathBuf>,
    v2: bool,
    has_memory: bool,
}

impl TaskCgroups {
    /// Creates and configures the task's cgroups. Failures degrade to rlimits only (logged): the
    /// service keeps running tasks on a host where cgroups are read-only.
    fn create(host: &CgroupHost, name: &str, limits: &Limits) -> Self {
        let mut cg = TaskCgroups::default();
        let (quota, period) = limits.cpu_quota();
        let result: io::Result<()> = (|| {
            match host {
                CgroupHost::None => {}
                CgroupHost::V1 { memory, pids, cpu } => {
                    if let Some(parent) = pids {
                        let dir = cg.make(parent, name)?;
                        write_file(&dir.join("pids.max"), &limits.max_processes.to_string())?;
                        cg.procs_dir = Some(dir);
                    }
                    if let Some(parent) = memory {
                        let dir = cg.make(parent, name)?;
                        write_file(
                            &dir.join("memory.limit_in_bytes"),
                            &limits.memory_bytes.to_string(),
                        )?;
                        // No swap for tasks (absent when swap accounting is off).
                        let _ = write_file(
                            &dir.join("memory.memsw.limit_in_bytes"),
                            &limits.memory_bytes.to_string(),
                        );
                        let _ = write_file(&dir.join("memory.swappiness"), "0");
                        cg.has_memory = true;
                        cg.procs_dir.get_or_insert(dir.clone());
                        cg.memory = Some(dir);
                    }
                    if let Some(parent) = cpu {
                        let dir = cg.make(parent, name)?;
                        write_file(&dir.join("cpu.cfs_period_us"), &period.to_string())?;
                        write_file(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                    }
                }
                CgroupHost::V2 { parent } => {
                    let dir = cg.make(parent, name)?;
                    cg.v2 = true;
                    write_file(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
                    let _ = write_file(&dir.join("memory.swap.max"), "0");
                    write_file(&dir.join("pids.max"), &limits.max_processes.to_string())?;
                    write_file(&dir.join("cpu.max"), &format!("{quota} {period}"))?;
                    cg.has_memory = true;
                    cg.procs_dir = Some(dir.clone());
                    cg.memory = Some(dir);
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not set up task cgroups; limits fall back to rlimits for this task");
            cg.remove();
            return TaskCgroups::default();
        }
        cg
    }

    fn make(&mut self, parent: &Path, name: &str) -> io::Result<PathBuf> {
        let dir = cgroup::task_dir(parent, name);
        fs::create_dir(&dir)?;
        self.dirs.push(dir.clone());
        self.procs_fds.push(
            OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(dir.join("cgroup.procs"))?,
        );
        Ok(dir)
    }

    fn members(&self) -> Vec<i32> {
        self.procs_dir
            .as_ref()
            .and_then(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
            .map(|t| cgroup::pids(&t))
            .unwrap_or_default()
    }

    /// SIGKILLs every process in the task's cgroup (one pass).
    fn kill_all(&self) {
        for pid in self.members() {
            // SAFETY: kill has no memory-safety preconditions; a pid listed in the task's cgroup
            // is one of the task's processes (or already gone).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }

    /// Kills until the cgroup is empty or `limit` passes.
    async fn kill_all_and_wait(&self, limit: Duration) {
        let end = tokio::time::Instant::now() + limit;
        loop {
            if self.members().is_empty() {
                return;
            }
            self.kill_all();
            if tokio::time::Instant::now() >= end {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// `(oom kills, limit ever hit)`.
    fn oom_state(&self) -> (u64, bool) {
        let Some(dir) = &self.memory else {
            return (0, false);
        };
        if self.v2 {
            let events = fs::read_to_string(dir.join("memory.events")).unwrap_or_default();
            let kills = cgroup::counter(&events, "oom_kill").unwrap_or(0);
            (kills, cgroup::counter(&events, "max").unwrap_or(0) > 0)
        } else {
            let control = fs::read_to_string(dir.join("memory.oom_control")).unwrap_or_default();
            let kills = cgroup::counter(&control, "oom_kill").unwrap_or(0);
            let failcnt = fs::read_to_string(dir.join("memory.failcnt"))
                .ok()
                .and_then(|t| t.trim().parse::<u64>().ok())
                .unwrap_or(0);
            (kills, failcnt > 0)
        }
    }

    /// Removes the cgroup directories; retries in the background while the kernel is still
    /// tearing processes down.
    fn remove(&mut self) {
        self.procs_fds.clear();
        let mut busy = Vec::new();
        for dir in self.dirs.drain(..).rev() {
            match fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(_) => busy.push(dir),
            }
        }
        if !busy.is_empty() {
            let procs: Vec<PathBuf> = busy.iter().map(|d| d.join("cgroup.procs")).collect();
            std::thread::spawn(move || {
                for _ in 0..200 {
                    for p in &procs {
                        for pid in cgroup::pids(&fs::read_to_string(p).unwrap_or_default()) {
                            // SAFETY: as in `kill_all`.
                            unsafe { libc::kill(pid, libc::SIGKILL) };
                        }
                    }
                    busy.retain(|d| fs::remove_dir(d).is_err() && d.exists());
                    if busy.is_empty() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                tracing::warn!(?busy, "task cgroups could not be removed");
            });
        }
    }
}

/// What the forked child does before exec'ing bubblewrap. Runs between fork and exec, so only
/// async-signal-safe system calls on prepared data.
struct ChildSetup {
    cgroup_procs: Vec<RawFd>,
    inherit: Vec<RawFd>,
    rlimits: Vec<(RlimitResource, libc::rlimit)>,
    uid: u32,
    gid: u32,
    parent: libc::pid_t,
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
type RlimitResource = libc::__rlimit_resource_t;
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
type RlimitResource = libc::c_int;

fn to_libc_rlimit((resource, soft, hard): limits::Rlimit) -> (RlimitResource, libc::rlimit) {
    let r = match resource {
        Resource::As => libc::RLIMIT_AS,
        Resource::Cpu => libc::RLIMIT_CPU,
        Resource::Fsize => libc::RLIMIT_FSIZE,
        Resource::Nofile => libc::RLIMIT_NOFILE,
        Resource::Nproc => libc::RLIMIT_NPROC,
        Resource::Core => libc::RLIMIT_CORE,
    };
    (
        r as RlimitResource,
        libc::rlimit {
            rlim_cur: soft as libc::rlim_t,
            rlim_max: hard as libc::rlim_t,
        },
    )
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
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setresgid(self.gid, self.gid, self.gid))?;
            check(libc::setresuid(self.uid, self.uid, self.uid))?;
            // After the uid change (which clears it): die with the service. If the service is
            // already gone, do not start at all.
            check(libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ))?;
            if libc::getppid() != self.parent {
                libc::_exit(111);
            }
        }
        Ok(())
    }
}

/// A capped reader of one output stream, running as its own task.
struct Reader {
    buf: Arc<Mutex<(Vec<u8>, bool)>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

fn spawn_reader<R: AsyncRead + Unpin + Send + 'static>(
    pipe: Option<R>,
    cap: usize,
    overflow: Arc<Notify>,
) -> Reader {
    let buf = Arc::new(Mutex::new((Vec::new(), false)));
    let task = pipe.map(|mut pipe| {
        let buf = buf.clone();
        tokio::spawn(async move {
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
        })
    });
    Reader { buf, task }
}

impl Reader {
    /// The bytes read and whether the cap overflowed. Waits briefly for EOF (every writer is
    /// dead by now); gives up after 2 s.
    async fn finish(mut self) -> (Vec<u8>, bool) {
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(2), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        let mut b = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        (std::mem::take(&mut b.0), b.1)
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Caps on what is collected from a task's artifacts directory.
#[derive(Debug, Clone)]
pub struct ArtifactCaps {
    pub max_files: usize,
    pub max_bytes: u64,
    pub max_depth: usize,
}

/// Directory entries examined per task at most, so a directory of a million files costs little.
const ARTIFACT_SCAN_LIMIT: usize = 20_000;

/// Copies regular files from `src` (the task's artifacts dir) to `dest`, listing each with its
/// size and sha256. Never follows a symlink (they are skipped, as are `src` itself being one,
/// files with more than one hard link, sockets, FIFOs and devices), recurses at most
/// `max_depth` levels, and stops at `max_files` / `max_bytes` (a file that would pass the byte
/// cap is skipped). Names are `/`-separated paths relative to `src`; non-UTF-8 names are
/// skipped. Runs after every process of the task is dead, so nothing changes underneath.
pub fn collect_artifacts(src: &Path, dest: &Path, caps: &ArtifactCaps) -> Vec<Artifact> {
    let mut out = Vec::new();
    match fs::symlink_metadata(src) {
        Ok(m) if m.file_type().is_dir() => {}
        _ => return out,
    }
    let _ = remove_tree(dest);
    let mut total = 0u64;
    let mut scanned = 0usize;
    let mut stack: Vec<(PathBuf, String, usize)> = vec![(src.to_path_buf(), String::new(), 0)];
    'walk: while let Some((dir, prefix, depth)) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        let mut names = Vec::new();
        for entry in entries {
            scanned += 1;
            if scanned > ARTIFACT_SCAN_LIMIT {
                break;
            }
            if let Ok(entry) = entry {
                if let Ok(name) = entry.file_name().into_string() {
                    names.push(name);
                }
            }
        }
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            let path = dir.join(&name);
            let rel = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}/{name}")
            };
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            let ft = meta.file_type();
            if ft.is_dir() {
                if depth + 1 < caps.max_depth {
                    subdirs.push((path, rel, depth + 1));
                }
                continue;
            }
            if !ft.is_file() || meta.nlink() != 1 {
                continue;
            }
            if out.len() >= caps.max_files {
                break 'walk;
            }
            if total + meta.len() > caps.max_bytes {
                continue;
            }
            match copy_artifact(&path, &meta, &dest.join(&rel)) {
                Ok(info) => {
                    total += info.1;
                    out.push(Artifact {
                        name: rel,
                        size: info.1,
                        sha256: info.0,
                    });
                }
                Err(e) => tracing::debug!(file = %path.display(), error = %e, "artifact skipped"),
            }
        }
        // Depth-first in name order.
        stack.extend(subdirs.into_iter().rev());
        if scanned > ARTIFACT_SCAN_LIMIT {
            break;
        }
    }
    out
}

fn copy_artifact(src: &Path, lmeta: &fs::Metadata, dest: &Path) -> io::Result<(String, u64)> {
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(src)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file()
        || meta.nlink() != 1
        || meta.ino() != lmeta.ino()
        || meta.dev() != lmeta.dev()
    {
        return Err(io::Error::other("not the regular file that was listed"));
    }
    if let Some(parent) = dest.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)?;
    }
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dest)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    // Never more than the size listed, whatever the file claims now.
    let mut limited = (&mut file).take(lmeta.len());
    loop {
        let n = limited.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        size += n as u64;
    }
    let digest = hasher.finalize();
    Ok((digest.iter().map(|b| format!("{b:02x}")).collect(), size))
}

/// Reads the program's result file: missing, valid JSON, or invalid with the reason.
pub fn read_result(path: &Path, max_bytes: u64) -> ProgramResult {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return ProgramResult::Missing,
        Err(e) => return ProgramResult::Invalid(format!("result file could not be read: {e}")),
    };
    if meta.file_type().is_symlink() {
        return ProgramResult::Invalid(
            "result file is a symbolic link; it was not followed".into(),
        );
    }
    if !meta.file_type().is_file() {
        return ProgramResult::Invalid("result file is not a regular file".into());
    }
    if meta.len() > max_bytes {
        return ProgramResult::Invalid(format!(
            "result file is {} bytes, over the {max_bytes}-byte limit",
            meta.len()
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path);
    let mut bytes = Vec::new();
    if let Err(e) = file.and_then(|f| f.take(max_bytes + 1).read_to_end(&mut bytes)) {
        return ProgramResult::Invalid(format!("result file could not be read: {e}"));
    }
    if bytes.len() as u64 > max_bytes {
        return ProgramResult::Invalid(format!("result file is over the {max_bytes}-byte limit"));
    }
    match serde_json::from_slice(&bytes) {
        Ok(v) => ProgramResult::Json(v),
        Err(e) => ProgramResult::Invalid(format!("result file is not valid JSON: {e}")),
    }
}

/// Removes task artifact directories under `<data_dir>/artifacts/` last modified more than
/// `ttl` ago. Returns how many were removed. Call it periodically (e.g. every few minutes).
///
/// # Errors
/// Only when the artifacts directory cannot be listed; a directory that cannot be removed is
/// logged and skipped.
pub fn sweep_artifacts(data_dir: &Path, ttl: Duration) -> io::Result<usize> {
    let root = data_dir.join("artifacts");
    let entries = match fs::read_dir(&root) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let now = SystemTime::now();
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        let age = meta
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .unwrap_or_default();
        if age < ttl {
            continue;
        }
        let res = if meta.file_type().is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match res {
            Ok(()) => removed += 1,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "could not remove expired artifacts")
            }
        }
    }
    Ok(removed)
}

// ---------------------------------------------------------------------------------------------
// Host helpers.

fn is_executable(path: &Path) -> bool {
    fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn lookup_user(name: &str) -> io::Result<Option<(u32, u32)>> {
    let cname = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "user name contains NUL"))?;
    // SAFETY: getpwnam_r fills `pwd` with pointers into `buf`, both alive for the call; we only
    // copy two integers out.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        );
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        if result.is_null() {
            return Ok(None);
        }
        Ok(Some((pwd.pw_uid, pwd.pw_gid)))
    }
}

/// `data_dir` (0711), `run/` (0711: the sandbox user must reach its own scratch to bind it, but
/// cannot list the others) and `artifacts/` (0700, root only).
fn prepare_data_dir(data_dir: &Path, uid: u32, gid: u32) -> Result<(), String> {
    let mk = |p: &Path, mode: u32| -> Result<(), String> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(p)
            .map_err(|e| format!("creating {}: {e}", p.display()))?;
        fs::set_permissions(p, fs::Permissions::from_mode(mode))
            .map_err(|e| format!("chmod {}: {e}", p.display()))
    };
    mk(data_dir, 0o711)?;
    mk(&data_dir.join("run"), 0o711)?;
    mk(&data_dir.join("artifacts"), 0o700)?;
    let data_dir =
        fs::canonicalize(data_dir).map_err(|e| format!("{}: {e}", data_dir.display()))?;
    // bubblewrap runs as the sandbox user and resolves the scratch paths itself.
    for dir in data_dir.ancestors() {
        let m = fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mode = m.permissions().mode();
        let ok = mode & 0o001 != 0
            || (m.uid() == uid && mode & 0o100 != 0)
            || (m.gid() == gid && mode & 0o010 != 0);
        if !ok {
            return Err(format!(
                "the sandbox user cannot traverse {} (mode {:o}); choose a data directory whose parents are world-searchable (o+x), e.g. /var/lib/agenttask",
                dir.display(),
                mode & 0o7777
            ));
        }
    }
    Ok(())
}

/// Removes scratch dirs left by a crashed service (this data directory belongs to one service).
fn sweep_stale_runs(run_dir: &Path) {
    let Ok(entries) = fs::read_dir(run_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let _ = umount(&path);
        if let Err(e) = remove_tree(&path) {
            tracing::warn!(path = %path.display(), error = %e, "could not remove stale scratch");
        }
    }
}

fn detect_host_layout(extra: &[PathBuf]) -> HostLayout {
    let mut root_entries = Vec::new();
    for name in HostLayout::ROOT_CANDIDATES {
        let path = PathBuf::from(name);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                if let Ok(target) = fs::read_link(&path) {
                    root_entries.push(RootEntry::Symlink { path, target });
                }
            }
            Ok(m) if m.is_dir() => root_entries.push(RootEntry::Dir(path)),
            _ => {}
        }
    }
    HostLayout {
        root_entries,
        etc_paths: HostLayout::default_etc_paths(),
        extra_ro_binds: extra.to_vec(),
    }
}

/// Finds the cgroup hierarchy and creates the `agenttask` parent directories; `None` if that
/// is impossible (then rlimits only).
fn prepare_cgroups() -> CgroupHost {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let host = cgroup::detect(&mountinfo, &own);
    let ok = match &host {
        CgroupHost::None => true,
        CgroupHost::V1 { memory, pids, cpu } => [memory, pids, cpu]
            .into_iter()
            .flatten()
            .all(|p| fs::create_dir_all(p).is_ok()),
        CgroupHost::V2 { parent } => {
            // Controllers must be enabled for our children and the parent's children; this fails
            // when the service's own cgroup holds processes and is not the root (the "no internal
            // processes" rule): run the service in a delegated cgroup (systemd `Delegate=yes`).
            let own_dir = parent.parent().map(Path::to_path_buf).unwrap_or_default();
            let enable =
                |dir: &Path| write_file(&dir.join("cgroup.subtree_control"), "+memory +pids +cpu");
            enable(&own_dir).is_ok() && fs::create_dir_all(parent).is_ok() && enable(parent).is_ok()
        }
    };
    if ok {
        host
    } else {
        tracing::warn!(?host, "cannot create task cgroups; per-task limits fall back to rlimits (RLIMIT_NPROC is then shared by all tasks)");
        CgroupHost::None
    }
}

fn probe_tmpfs(run_dir: &Path) -> bool {
    let probe = run_dir.join(format!(".probe-{}", Uuid::new_v4().simple()));
    if fs::create_dir(&probe).is_err() {
        return false;
    }
    let ok = mount_tmpfs(&probe, MIB, 16).is_ok();
    if ok {
        let _ = umount(&probe);
    }
    let _ = fs::remove_dir(&probe);
    ok
}

fn mount_tmpfs(path: &Path, size: u64, inodes: u64) -> io::Result<()> {
    let target = CString::new(path.as_os_str().as_bytes())?;
    let data = CString::new(format!("size={size},nr_inodes={inodes},mode=0711"))?;
    // SAFETY: all pointers are NUL-terminated strings alive for the call.
    let rc = unsafe {
        libc::mount(
            c"agenttask-scratch".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn umount(path: &Path) -> io::Result<()> {
    let target = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: NUL-terminated path alive for the call.
    if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `remove_dir_all` that never follows symlinks (std's does not either) and accepts absence.
fn remove_tree(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn write_read_only(path: &Path, content: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    f.write_all(content)
}

fn write_file(path: &Path, content: &str) -> io::Result<()> {
    fs::write(path, content)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
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
