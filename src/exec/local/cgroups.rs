//! A task's cgroups: created with its limits, joined by the child, killed and removed.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::host::write_file;
use crate::sandbox::cgroup::{self, CgroupHost};
use crate::sandbox::limits::Limits;

/// A task's cgroup directories and the open `cgroup.procs` files the child writes itself into.
#[derive(Default)]
pub(super) struct TaskCgroups {
    pub(super) dirs: Vec<PathBuf>,
    pub(super) procs_fds: Vec<File>,
    pub(super) memory: Option<PathBuf>,
    /// Where to list the task's processes (pids, else memory, else unified).
    pub(super) procs_dir: Option<PathBuf>,
    pub(super) v2: bool,
    pub(super) has_memory: bool,
}

impl TaskCgroups {
    /// Creates and configures the task's cgroups. Failures degrade to rlimits only (logged): the
    /// service keeps running tasks on a host where cgroups are read-only.
    pub(super) fn create(host: &CgroupHost, name: &str, limits: &Limits) -> Self {
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
                        write_file(&dir.join("memory.limit_in_bytes"), &limits.memory_bytes.to_string())?;
                        // No swap for tasks (absent when swap accounting is off).
                        let _ = write_file(&dir.join("memory.memsw.limit_in_bytes"), &limits.memory_bytes.to_string());
                        let _ = write_file(&dir.join("memory.swappiness"), "0");
                        // v1 charges TCP socket buffers to a memory cgroup only once its
                        // kmem.tcp limit is set, and only for sockets created after that: set
                        // before any process joins. Without it a task can pin host-wide TCP
                        // memory (tcp_mem) far beyond its own limit. (v2 charges it by default.)
                        let tcp = dir.join("memory.kmem.tcp.limit_in_bytes");
                        if tcp.exists() {
                            write_file(&tcp, &limits.memory_bytes.to_string())?;
                        }
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
        self.procs_fds
            .push(OpenOptions::new().write(true).custom_flags(libc::O_CLOEXEC).open(dir.join("cgroup.procs"))?);
        Ok(dir)
    }

    /// Sets a task's own memory and CPU limits on cgroups that a warm sandbox's waiting
    /// interpreter already runs in (created with [`Limits`] for the warm-up). Lowering a memory
    /// limit below what is in use fails (`EBUSY`): the caller then starts the task cold.
    pub(super) fn set_limits(&self, limits: &Limits) -> io::Result<()> {
        let (quota, period) = limits.cpu_quota();
        let memory = limits.memory_bytes.to_string();
        if self.v2 {
            if let Some(dir) = &self.memory {
                write_file(&dir.join("memory.max"), &memory)?;
                write_file(&dir.join("cpu.max"), &format!("{quota} {period}"))?;
            }
            return Ok(());
        }
        if let Some(dir) = &self.memory {
            // memsw may never be below the memory limit: lower the memory limit first.
            write_file(&dir.join("memory.limit_in_bytes"), &memory)?;
            let _ = write_file(&dir.join("memory.memsw.limit_in_bytes"), &memory);
            let tcp = dir.join("memory.kmem.tcp.limit_in_bytes");
            if tcp.exists() {
                write_file(&tcp, &memory)?;
            }
        }
        for dir in &self.dirs {
            let quota_file = dir.join("cpu.cfs_quota_us");
            if quota_file.exists() {
                write_file(&dir.join("cpu.cfs_period_us"), &period.to_string())?;
                write_file(&quota_file, &quota.to_string())?;
            }
        }
        Ok(())
    }

    /// Whether there is a cgroup listing the task's processes.
    pub(super) fn is_tracked(&self) -> bool {
        self.procs_dir.is_some()
    }

    /// The pids of the task's processes, as the host sees them.
    pub(super) fn members(&self) -> Vec<i32> {
        self.procs_dir
            .as_ref()
            .and_then(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
            .map(|t| cgroup::pids(&t))
            .unwrap_or_default()
    }

    /// SIGKILLs every process in the task's cgroup (one pass).
    pub(super) fn kill_all(&self) {
        for pid in self.members() {
            // SAFETY: kill has no memory-safety preconditions; a pid listed in the task's cgroup
            // is one of the task's processes (or already gone).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }

    /// Kills until the cgroup is empty or `limit` passes. True once the cgroup was seen empty:
    /// no process of the task is left. False without a cgroup to look at, or when something
    /// still survived at `limit` (e.g. stuck in an uninterruptible sleep).
    pub(super) async fn kill_all_and_wait(&self, limit: Duration) -> bool {
        let Some(dir) = &self.procs_dir else {
            return false;
        };
        let procs = dir.join("cgroup.procs");
        let end = tokio::time::Instant::now() + limit;
        loop {
            match fs::read_to_string(&procs) {
                Ok(text) if cgroup::pids(&text).is_empty() => return true,
                Ok(_) => self.kill_all(),
                Err(_) => return false,
            }
            if tokio::time::Instant::now() >= end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// `(oom kills, limit ever hit)`.
    pub(super) fn oom_state(&self) -> (u64, bool) {
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
    pub(super) fn remove(&mut self) {
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
