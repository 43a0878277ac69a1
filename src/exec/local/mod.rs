//! The local backend: runs each job on this host under bubblewrap, as an unprivileged host uid
//! of its own, inside per-task cgroups and a size-capped scratch file system.
//!
//! This is the I/O edge of [`crate::sandbox`], which decides *what* to run (bubblewrap options,
//! seccomp program, limits, verdict); here we lease a uid, create the scratch and cgroups, spawn,
//! watch the clock and the output, collect the result and artifacts, and clean up whatever
//! happened. Modules: `host` (probing and preparing the host once), `uids` (the per-task uid
//! leases), `scratch`, `cgroups`, `spawn` (the child's setup, watching, output readers) and
//! `result` (the result file). Artifacts are stored by a [`DataDirSink`] (see
//! [`crate::exec::artifacts`]).
//!
//! # One run
//! 0. **Uid**: a free uid of the range `agenttask-sandbox-<i>` is leased with a host-wide
//!    `flock` (see `uids`); it is given back only once no process of it is left.
//! 1. **Scratch**: `<data_dir>/run/<task>-<nonce>/` becomes a tmpfs (`size=scratch_bytes`,
//!    `nr_inodes=scratch_inodes`, nosuid, nodev) holding `in/` (inputs and code), `sys/`
//!    (synthetic /etc files, the empty file and directory used as masks; both root-owned,
//!    read-only), and `work/`, `tmp/`, `shm/`, `out/` (owned by the task's uid). Its pages are
//!    charged to the task's memory cgroup. If the mount is refused (not root), it is a plain
//!    directory and only `RLIMIT_FSIZE` bounds each file.
//! 2. **Cgroups**: `<service cgroup>/agenttask/<owner pid>.<owner start>.<task>-<nonce>` in each
//!    of memory, pids, cpu (v1) or in the unified hierarchy (v2), with the task's limits (on v1
//!    including the kmem TCP limit); the child enters them in `pre_exec`, before bubblewrap runs,
//!    so every process of the task is inside.
//! 3. **Spawn** `bwrap --args FD -- runtime...` with an empty environment; in `pre_exec`: join
//!    the cgroups, set rlimits, drop to the task's uid and the sandbox gid (no supplementary
//!    groups), ask for SIGKILL if the service dies (`PR_SET_PDEATHSIG`).
//! 4. **Watch**: stdout and stderr are read concurrently, each capped; the first stream over its
//!    cap, or the deadline, kills the task: bubblewrap (its pid namespace dies with it) and
//!    every process left in the task's cgroup, until the cgroup is empty.
//! 5. **Collect** the result file and artifacts (walked by descriptor, without following links,
//!    within the tenant's quota and the data directory's free-space floor).
//! 6. **Report, then tear down**: the outcome is reported as soon as it is collected; only then
//!    are the scratch unmounted and removed and the cgroups removed, and after that the uid is
//!    given back. Nothing the teardown removes is needed for the outcome, so a task's result
//!    does not wait for it; the uid is not reused before it is done, and shutdown waits for it.
//!    A dropped run future (a cancel) removes everything before anything is reported.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use uuid::Uuid;

use crate::domain::validate::BackendIsolation;
use crate::exec::{
    Backend, BackendError, BoxFuture, Capabilities, Ended, EventSink, InProcessRuns, Job, Outcome, ProgramResult,
    Progress, RunKey,
};
use crate::sandbox::bwrap::{self, HostLayout, ScratchLayout};
use crate::sandbox::cgroup::{self, CgroupHost};
use crate::sandbox::limits::{self, Limits};
use crate::sandbox::{captured_text, seccomp};

mod cgroups;
mod host;
mod result;
mod scratch;
mod spawn;
mod uids;
mod warm;

pub use warm::WarmConfig;

pub use crate::exec::artifacts::{
    collect_artifacts, collect_artifacts_within, sweep_artifacts, ArtifactCaps, Collected, SPARSE_SLACK_BYTES,
};
pub use result::read_result;

use crate::exec::artifacts::{ArtifactSink, DataDirSink, SinkConfig};
use host::{
    detect_host_layout, is_executable, own_owner, prepare_cgroups, prepare_data_dir, probe_tmpfs, sweep_stale_cgroups,
    sweep_stale_runs,
};
use uids::UidPool;

pub(super) const MIB: u64 = 1 << 20;

/// Settings of the local backend. [`LocalConfig::new`] gives the defaults for a data directory.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Service-owned directory: `run/` (per-task scratch, removed after each run) and
    /// `artifacts/<tenant>/<task id>/` (collected artifacts, removed by [`sweep_artifacts`]).
    /// One service process per data directory.
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
    /// Base name of the sandbox uid range: each running task runs as its own user
    /// `<sandbox_user>-<i>` (`i` from 0; the range ends at the first missing user), all in the
    /// group `<sandbox_user>`. Default `agenttask-sandbox`.
    pub sandbox_user: String,
    /// Root-only directory of the host-wide uid lease locks (one `flock`ed file per uid),
    /// shared by every service process on the host. Default `/run/agenttask/uids`.
    pub uid_lock_dir: PathBuf,
    /// How long a run waits for a free sandbox uid before it fails. Default 60 s.
    pub uid_wait: Duration,
    /// Size of a task's scratch (working dir + /tmp + /dev/shm + result + artifacts), and the
    /// largest file it may write. Default 128 MiB.
    pub scratch_bytes: u64,
    /// Files and directories a task may create in its scratch. Default 32768.
    pub scratch_inodes: u64,
    /// Processes and threads per task (pids cgroup). Default 128.
    pub max_processes: u64,
    /// `RLIMIT_NPROC` of the task's own uid (a backstop to the pids cgroup, and the process
    /// limit where there are no cgroups). Default 256.
    pub uid_max_processes: u64,
    /// `RLIMIT_MSGQUEUE` of the task's uid, bytes. Default 819200 (the kernel's default).
    pub max_msgqueue_bytes: u64,
    /// `RLIMIT_SIGPENDING` of the task's uid. Default 1024.
    pub max_pending_signals: u64,
    /// `RLIMIT_NOFILE`. Default 1024.
    pub max_open_files: u64,
    /// Largest result file read back. Default 1 MiB.
    pub result_max_bytes: u64,
    /// Artifacts collected per task. Default 100 files.
    pub artifact_max_files: usize,
    /// Total artifact bytes per task, counted as what the files occupy (allocated blocks, at
    /// least their length; sparse files are not collected). Default 64 MiB.
    pub artifact_max_bytes: u64,
    /// Free-space floor of the data directory's file system: a task's artifacts are not stored
    /// if storing them would leave less than this free. Default 1 GiB.
    pub artifact_min_free_bytes: u64,
    /// The same floor as a share of the file system's size, in percent; both must hold.
    /// Default 5.
    pub artifact_min_free_percent: u8,
    /// Directory depth followed below the artifacts directory. Default 8.
    pub artifact_max_depth: usize,
    /// How long collected artifacts are kept (see [`LocalBackend::sweep_artifacts`]). Default 24 h.
    pub artifact_ttl: Duration,
    /// Tasks this host runs at once (how many runs one executor watches). Default 64.
    pub max_runs: usize,
    /// Extra host paths bound read-only at the same place in the sandbox. Default none.
    pub extra_ro_binds: Vec<PathBuf>,
    /// Pre-started sandboxes per language (see `warm`). Default 2 for Python, 1 for R.
    pub warm: WarmConfig,
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
            uid_lock_dir: "/run/agenttask/uids".into(),
            uid_wait: Duration::from_secs(60),
            scratch_bytes: 128 * MIB,
            scratch_inodes: 32_768,
            max_processes: 128,
            uid_max_processes: 256,
            max_msgqueue_bytes: 819_200,
            max_pending_signals: 1024,
            max_open_files: 1024,
            result_max_bytes: MIB,
            artifact_max_files: 100,
            artifact_max_bytes: 64 * MIB,
            artifact_min_free_bytes: 1024 * MIB,
            artifact_min_free_percent: 5,
            artifact_max_depth: 8,
            artifact_ttl: Duration::from_secs(24 * 3600),
            max_runs: 64,
            extra_ro_binds: Vec::new(),
            warm: WarmConfig::default(),
        }
    }

    /// The artifact limits above, as the data directory's sink takes them.
    pub fn sink_config(&self) -> SinkConfig {
        SinkConfig {
            caps: ArtifactCaps {
                max_files: self.artifact_max_files,
                max_bytes: self.artifact_max_bytes,
                max_depth: self.artifact_max_depth,
            },
            min_free_bytes: self.artifact_min_free_bytes,
            min_free_percent: self.artifact_min_free_percent,
            ttl: self.artifact_ttl,
        }
    }
}

impl Default for LocalConfig {
    /// Data in `/var/lib/agenttask`.
    fn default() -> Self {
        Self::new("/var/lib/agenttask")
    }
}

/// Why the backend could not be set up. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// No seccomp filter is defined for this CPU architecture, or it could not be compiled.
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error(
        "bubblewrap not found at {}: {INSTALL_HINT} (or `apt-get install -y --no-install-recommends bubblewrap`)",
        path.display()
    )]
    NoBubblewrap { path: PathBuf },
    #[error(
        "the local backend must run as root: it switches each sandbox to the unprivileged user {user:?}, mounts size-capped scratch file systems and creates cgroups"
    )]
    NotRoot { user: String },
    /// The sandbox user's uid range is missing or unusable (the message names the users).
    #[error("{0}")]
    SandboxUsers(String),
    /// The data directory cannot be created or reached by the sandbox user.
    #[error("{0}")]
    DataDir(String),
}

pub(super) const INSTALL_HINT: &str = "run deploy/local/install-sandbox.sh as root";

/// Runs jobs in bubblewrap sandboxes on this host. Cheap to share (`Arc`) across tasks.
pub struct LocalBackend {
    config: LocalConfig,
    /// One host uid per running task.
    uids: UidPool,
    /// This process, as the owner named in its task cgroups.
    owner: cgroup::Owner,
    /// Artifact bytes retained per tenant.
    /// Where collected artifacts go: `<data_dir>/artifacts/`.
    artifacts: Arc<DataDirSink>,
    host: HostLayout,
    cgroups: CgroupHost,
    seccomp: Vec<u8>,
    /// Whether scratch dirs are size-capped tmpfs mounts (false: plain directories).
    scratch_tmpfs: AtomicBool,
    /// Runs in flight; they die with this process.
    runs: InProcessRuns,
    /// The stdout buffers of running tasks, for following their output.
    live: std::sync::Mutex<std::collections::HashMap<uuid::Uuid, spawn::Captured>>,
    /// Idle warm sandboxes (started by [`LocalBackend::start_warm_pool`]).
    warm: warm::WarmPool,
}

impl std::fmt::Debug for LocalBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBackend")
            .field("data_dir", &self.config.data_dir)
            .field("uids", &self.uids)
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
        let seccomp = seccomp::to_bytes(&seccomp::program_for_host()?);
        if !is_executable(&config.bwrap_path) {
            return Err(SetupError::NoBubblewrap { path: config.bwrap_path.clone() });
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(SetupError::NotRoot { user: config.sandbox_user.clone() });
        }
        for (name, path) in [("python", &config.python_path), ("Rscript", &config.rscript_path)] {
            if !is_executable(path) {
                tracing::warn!(path = %path.display(), "{name} not found; tasks in that language will fail with BackendError ({INSTALL_HINT})");
            }
        }
        let uids = UidPool::discover(&config.sandbox_user, &config.uid_lock_dir).map_err(SetupError::SandboxUsers)?;
        prepare_data_dir(&config.data_dir, uids.first_uid(), uids.gid()).map_err(SetupError::DataDir)?;
        sweep_stale_runs(&config.data_dir.join("run"));

        let host = detect_host_layout(&config.extra_ro_binds);
        let cgroups = prepare_cgroups();
        sweep_stale_cgroups(&cgroups);
        let scratch_tmpfs = probe_tmpfs(&config.data_dir.join("run"));
        if !scratch_tmpfs {
            tracing::warn!("cannot mount tmpfs scratch dirs; task scratch is a plain directory bounded only by RLIMIT_FSIZE per file");
        }
        tracing::info!(slots = uids.len(), gid = uids.gid(), ?cgroups, scratch_tmpfs, "local sandbox backend ready");
        let artifacts = Arc::new(DataDirSink::new(config.data_dir.clone(), config.sink_config()));
        let warm = warm::WarmPool::new(config.warm.clone());
        Ok(Self {
            config,
            uids,
            owner: own_owner(),
            artifacts,
            host,
            cgroups,
            seccomp,
            scratch_tmpfs: AtomicBool::new(scratch_tmpfs),
            runs: InProcessRuns::new(),
            live: std::sync::Mutex::default(),
            warm,
        })
    }

    /// Counts the warm pool's size, hits, misses and warm-up times in `metrics`.
    pub fn set_warm_metrics(&self, metrics: crate::metrics::WarmMetrics) {
        self.warm.set_metrics(metrics);
    }

    fn cgroups_usable(&self) -> bool {
        !matches!(self.cgroups, CgroupHost::None)
    }

    pub fn config(&self) -> &LocalConfig {
        &self.config
    }

    /// How many tasks this host can run at once: one per sandbox uid. Several service
    /// processes on one host share them.
    pub fn slots(&self) -> usize {
        self.uids.len()
    }

    /// Where a task's collected artifacts are: `<data_dir>/artifacts/<tenant>/<task id>/`
    /// (found by looking in each tenant's directory), or the older `<data_dir>/artifacts/<task
    /// id>/` when no tenant directory holds it.
    pub fn artifacts_dir(&self, task_id: Uuid) -> PathBuf {
        let root = self.config.data_dir.join("artifacts");
        let id = task_id.to_string();
        std::fs::read_dir(&root)
            .into_iter()
            .flatten()
            .flatten()
            .map(|tenant| tenant.path().join(&id))
            .find(|p| p.is_dir())
            .unwrap_or_else(|| root.join(id))
    }

    /// The sink this backend stores artifacts in (`<data_dir>/artifacts/`).
    pub fn artifact_sink(&self) -> Arc<DataDirSink> {
        self.artifacts.clone()
    }

    /// Removes artifacts older than the configured TTL; see [`sweep_artifacts`].
    pub fn sweep_artifacts(&self) -> io::Result<usize> {
        self.artifacts.sweep()
    }

    /// Runs one job to completion (what [`Backend::launch`] does in the background), teardown
    /// included: when it returns, nothing of the run is left on the host. Dropping the future
    /// kills the sandbox and removes its scratch and cgroups.
    pub async fn run(&self, job: Job) -> Outcome {
        let Ended { outcome, teardown } = self.run_job(job, None).await;
        if let Some(teardown) = teardown {
            teardown.await;
        }
        outcome
    }

    /// Runs one job up to its collected outcome; the sandbox's removal is left to the returned
    /// teardown.
    async fn run_job(&self, job: Job, progress: Option<&Progress>) -> Ended {
        let started_at = Utc::now();
        let fail = |msg: String| Ended::from(Outcome::backend_error(msg, started_at));
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
        if !bwrap::is_plain_name(&job.tenant) {
            return fail(format!("tenant name {:?} is not a plain name", job.tenant));
        }
        // A warm sandbox when the language has a pool and one is ready; otherwise a cold start.
        let pooled = self.warm.config().target(job.language) > 0;
        let claimed = if pooled {
            match self.claim_warm(&job) {
                Ok(c) => {
                    self.warm.record_hit(job.language);
                    Some(c)
                }
                Err(miss) => {
                    self.warm.record_miss(job.language, miss);
                    None
                }
            }
        } else {
            None
        };
        let warm = pooled.then_some(claimed.is_some());
        // On the early returns below `lease` is dropped after `run` (declared before it): the uid
        // is given back only once the task's cgroups are emptied and removed. The teardown at the
        // end keeps that order.
        let (mut lease, run, watched) = match claimed {
            Some((w, handoff)) => {
                let warm::WarmSandbox { started, run, lease, .. } = w;
                let mut run = run;
                if let Some(p) = progress {
                    p.scheduled();
                }
                let watched = self.watch(&job, &mut run, started, Some(handoff), progress).await;
                (lease, run, watched)
            }
            None => {
                let lease = match self.uids.try_acquire() {
                    Ok(Some(lease)) => Ok(lease),
                    // Every uid is leased: an idle warm sandbox gives its own back.
                    _ => {
                        self.warm.evict_one();
                        self.uids.acquire(self.config.uid_wait).await
                    }
                };
                let lease = match lease {
                    Ok(lease) => lease,
                    Err(e) => return fail(format!("no sandbox uid: {e}")),
                };
                let mut run = match self.prepare(&job, lease.uid, lease.gid) {
                    Ok(run) => run,
                    Err(e) => return fail(format!("could not prepare the sandbox: {e}")),
                };
                if let Some(p) = progress {
                    p.scheduled();
                }
                let watched = self.spawn_and_watch(&job, &mut run, progress).await;
                (lease, run, watched)
            }
        };
        let watched = match watched {
            Ok(w) => w,
            Err(e) => return fail(format!("could not run the sandbox: {e}")),
        };
        if let Some(msg) = watched.setup_failure {
            return fail(msg);
        }
        // Collect only once no process of the task is left: its cgroup was seen empty; without
        // cgroups, after killing every process of the task's uid; with a cgroup that would not
        // empty (a process stuck in the kernel), not at all.
        let collectable = if watched.emptied {
            lease.mark_clean();
            true
        } else if !run.cgroups.is_tracked() {
            let (uid, gid) = (lease.uid, lease.gid);
            let _ = tokio::task::spawn_blocking(move || uids::kill_all_of_uid(uid, gid)).await;
            true
        } else {
            false
        };

        let mut facts = watched.facts;
        facts.scratch_full = run.scratch_is_full();
        let oom = run.cgroups.oom_state();
        facts.cgroup_oom_kills = oom.0;
        facts.cgroup_memory_limit_hit = oom.1;
        let tail_start = watched.stderr.len().saturating_sub(4096);
        facts.memory_error_in_stderr =
            limits::looks_like_memory_error(&String::from_utf8_lossy(&watched.stderr[tail_start..]));
        let (termination, exit_code) = limits::verdict(&facts);

        let out = run.scratch.out();
        let result_max = self.config.result_max_bytes;
        let sink = self.artifacts.clone();
        let (tenant, task_id, quota) = (job.tenant.clone(), job.key.task_id, job.artifact_quota_bytes);
        let collected = tokio::task::spawn_blocking(move || {
            if !collectable {
                let note = "the result file and artifacts were not collected: a process of the task did not exit";
                return (ProgramResult::Missing, Collected { note: Some(note.into()), ..Collected::default() });
            }
            let result = read_result(&out.join(ScratchLayout::RESULT_FILE), result_max);
            let collected = sink.collect(&tenant, task_id, &out.join(ScratchLayout::ARTIFACTS), quota);
            (result, collected)
        })
        .await;
        let (result, collected) = match collected {
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
            artifacts: collected.artifacts,
            artifacts_note: collected.note,
            launch_note: None,
            started_at,
            finished_at: Utc::now(),
            warm,
        };
        // Unmounting a big scratch can take a moment: off the async workers, and after the
        // outcome is reported. The uid is given back only after the scratch and cgroups are gone.
        let teardown = async move {
            let _ = tokio::task::spawn_blocking(move || {
                drop(run);
                drop(lease);
            })
            .await;
        };
        Ended { outcome, teardown: Some(Box::pin(teardown)) }
    }

    fn limits(&self, job: &Job) -> Limits {
        self.limits_with(job.timeout, job.cpu_millis, job.memory_bytes)
    }

    /// The configured per-sandbox limits with this timeout, CPU and memory.
    fn limits_with(&self, timeout: std::time::Duration, cpu_millis: u64, memory_bytes: u64) -> Limits {
        Limits {
            timeout,
            cpu_millis,
            memory_bytes,
            max_processes: self.config.max_processes,
            scratch_bytes: self.config.scratch_bytes,
            max_open_files: self.config.max_open_files,
            uid_max_processes: self.config.uid_max_processes,
            msgqueue_bytes: self.config.max_msgqueue_bytes,
            pending_signals: self.config.max_pending_signals,
        }
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
            // One sandbox uid per running task: the uid range bounds what this host runs.
            max_runs: self.config.max_runs.min(self.slots()),
        }
    }

    fn launch(self: Arc<Self>, job: Job, events: EventSink) -> BoxFuture<'static, Result<(), BackendError>> {
        Box::pin(async move {
            let me = self.clone();
            self.runs.launch(job.key, events, move |progress| async move { me.run_job(job, Some(&progress)).await });
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
        Box::pin(async move {
            self.warm.close().await;
            self.runs.shutdown().await;
        })
    }

    fn live_output(&self, task_id: uuid::Uuid) -> BoxFuture<'_, Option<Vec<u8>>> {
        let buf = self.live.lock().unwrap_or_else(|p| p.into_inner()).get(&task_id).cloned();
        Box::pin(async move { buf.map(|b| b.lock().unwrap_or_else(|p| p.into_inner()).0.clone()) })
    }
}
