//! Per-task resource limits as numbers, and the verdict on how a run ended.
//!
//! Two layers, both always applied:
//! - **cgroups** (when the host lets us create them): `memory` (the limit, and the OOM signal we
//!   read back), `pids` (process count *per task*), `cpu` (CFS quota = the task's CPU share).
//! - **rlimits** (inherited by bwrap and everything it starts): the fallback when cgroups are
//!   missing, and a backstop when they exist. Every running task has a host uid of its own (see
//!   `exec::local`), so the kernel's per-user limits are per task: `RLIMIT_NPROC` (processes of
//!   the uid), `RLIMIT_MSGQUEUE` (POSIX message queue bytes), `RLIMIT_SIGPENDING` (queued
//!   signals), and the per-user inotify and `SCM_RIGHTS` in-flight counts.

use std::time::Duration;

use crate::domain::outcome::Termination;

/// The limits of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub timeout: Duration,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    /// Processes and threads of this task (pids cgroup).
    pub max_processes: u64,
    /// Size of the task's scratch (working dir, /tmp, artifacts, result file together); also the
    /// largest file it may write (`RLIMIT_FSIZE`).
    pub scratch_bytes: u64,
    pub max_open_files: u64,
    /// `RLIMIT_NPROC` for the task's own uid (see the module docs).
    pub uid_max_processes: u64,
    /// `RLIMIT_MSGQUEUE`: bytes of POSIX message queues the task's uid may hold.
    pub msgqueue_bytes: u64,
    /// `RLIMIT_SIGPENDING`: signals queued to the task's uid at once.
    pub pending_signals: u64,
}

/// The rlimits we set, by name; the I/O edge maps them to `libc::RLIMIT_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    As,
    Cpu,
    Fsize,
    Nofile,
    Nproc,
    Core,
    Msgqueue,
    Sigpending,
}

/// `(resource, soft, hard)`.
pub type Rlimit = (Resource, u64, u64);

const MIB: u64 = 1 << 20;

impl Limits {
    /// The rlimits for bwrap and everything under it.
    ///
    /// `RLIMIT_AS` is address space, not memory: runtimes reserve far more than they touch
    /// (allocator arenas, thread stacks, BLAS buffers). With a memory cgroup it is only a loose
    /// backstop (2x the limit + 1 GiB); without one it is the only memory limit we have
    /// (limit + 256 MiB for the runtime's own mappings).
    pub fn rlimits(&self, memory_cgroup: bool) -> Vec<Rlimit> {
        let address_space = if memory_cgroup {
            self.memory_bytes.saturating_mul(2).saturating_add(1024 * MIB)
        } else {
            self.memory_bytes.saturating_add(256 * MIB)
        };
        // CPU seconds per process: the whole wall-clock budget at the task's CPU share (at least
        // one core), plus one second; SIGXCPU at the soft limit, SIGKILL one second later.
        let cores = self.cpu_millis.div_ceil(1000).max(1);
        let cpu = self.timeout.as_secs_f64().ceil() as u64 * cores + 1;
        vec![
            (Resource::As, address_space, address_space),
            (Resource::Cpu, cpu, cpu + 1),
            (Resource::Fsize, self.scratch_bytes, self.scratch_bytes),
            (Resource::Nofile, self.max_open_files, self.max_open_files),
            (Resource::Nproc, self.uid_max_processes, self.uid_max_processes),
            (Resource::Core, 0, 0),
            (Resource::Msgqueue, self.msgqueue_bytes, self.msgqueue_bytes),
            (Resource::Sigpending, self.pending_signals, self.pending_signals),
        ]
    }

    /// CFS bandwidth: `(quota_us, period_us)`; 500m is 50 ms of CPU per 100 ms. At least 10 ms
    /// per period so a tiny request still makes progress.
    pub fn cpu_quota(&self) -> (u64, u64) {
        let period = 100_000u64;
        let quota = (self.cpu_millis.saturating_mul(period) / 1000).max(10_000);
        (quota, period)
    }
}

/// Why we killed the run, if we did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillReason {
    Deadline,
    OutputCap,
}

/// What the edge observed about a finished run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunFacts {
    pub killed_for: Option<KillReason>,
    /// bwrap's exit code (it passes on the program's code, or 128 + signal), if it exited.
    pub exit_code: Option<i32>,
    /// The signal that killed bwrap itself, if any.
    pub signal: Option<i32>,
    /// The memory cgroup's OOM killer killed something in this task.
    pub cgroup_oom_kills: u64,
    /// The memory cgroup hit its limit at least once (`memory.failcnt`).
    pub cgroup_memory_limit_hit: bool,
    /// The scratch file system was full at the end.
    pub scratch_full: bool,
    /// The end of stderr shows a runtime's out-of-memory error (Python's `MemoryError`, R's
    /// "cannot allocate vector"): what hitting `RLIMIT_AS` looks like.
    pub memory_error_in_stderr: bool,
}

const SIGKILL: i32 = 9;
const SIGXCPU: i32 = 24;
const SIGXFSZ: i32 = 25;

/// Does this stderr tail look like a runtime ran out of memory?
pub fn looks_like_memory_error(stderr_tail: &str) -> bool {
    stderr_tail.contains("MemoryError")
        || stderr_tail.contains("cannot allocate vector")
        || stderr_tail.contains("cannot allocate memory block")
}

/// How the run ended and the exit code to report.
///
/// Precedence: our own kills (deadline, output cap) first, then the kernel's (OOM killer, CPU and
/// file-size rlimits), then heuristics that only apply to a failed run (full scratch: the program
/// died of ENOSPC/EFBIG, which Python reports as an exception because it ignores SIGXFSZ; memory
/// limit hit or a runtime's memory error), else the program's own exit.
pub fn verdict(f: &RunFacts) -> (Termination, Option<i32>) {
    let code = f.exit_code.or(f.signal.map(|s| 128 + s));
    match f.killed_for {
        Some(KillReason::Deadline) => return (Termination::TimedOut, None),
        Some(KillReason::OutputCap) => return (Termination::OutputLimitExceeded, None),
        None => {}
    }
    let failed = code != Some(0);
    if f.cgroup_oom_kills > 0 && failed {
        return (Termination::OomKilled, code);
    }
    match code {
        Some(c) if c == 128 + SIGXCPU => return (Termination::TimedOut, code),
        Some(c) if c == 128 + SIGXFSZ => return (Termination::OutputLimitExceeded, code),
        _ => {}
    }
    if failed && f.scratch_full {
        return (Termination::OutputLimitExceeded, code);
    }
    if failed && (f.memory_error_in_stderr || (f.cgroup_memory_limit_hit && code == Some(128 + SIGKILL))) {
        return (Termination::OomKilled, code);
    }
    (Termination::Exited, code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            timeout: Duration::from_millis(2500),
            cpu_millis: 1500,
            memory_bytes: 256 * MIB,
            max_processes: 64,
            scratch_bytes: 128 * MIB,
            max_open_files: 1024,
            uid_max_processes: 4096,
            msgqueue_bytes: 819_200,
            pending_signals: 1024,
        }
    }

    #[test]
    fn rlimits_cover_every_resource() {
        let r = limits().rlimits(true);
        let get = |res| r.iter().find(|(x, _, _)| *x == res).map(|&(_, s, h)| (s, h)).unwrap();
        assert_eq!(get(Resource::As), (1536 * MIB, 1536 * MIB));
        assert_eq!(get(Resource::Cpu), (3 * 2 + 1, 3 * 2 + 2));
        assert_eq!(get(Resource::Fsize), (128 * MIB, 128 * MIB));
        assert_eq!(get(Resource::Nofile), (1024, 1024));
        assert_eq!(get(Resource::Nproc), (4096, 4096));
        assert_eq!(get(Resource::Core), (0, 0));
        assert_eq!(get(Resource::Msgqueue), (819_200, 819_200));
        assert_eq!(get(Resource::Sigpending), (1024, 1024));
        let r = limits().rlimits(false);
        assert_eq!(r[0], (Resource::As, 512 * MIB, 512 * MIB));
    }

    #[test]
    fn cpu_quota_follows_millicores() {
        let mut l = limits();
        assert_eq!(l.cpu_quota(), (150_000, 100_000));
        l.cpu_millis = 500;
        assert_eq!(l.cpu_quota(), (50_000, 100_000));
        l.cpu_millis = 1;
        assert_eq!(l.cpu_quota(), (10_000, 100_000));
    }

    #[test]
    fn verdicts() {
        let f = |g: &dyn Fn(&mut RunFacts)| {
            let mut facts = RunFacts::default();
            g(&mut facts);
            verdict(&facts)
        };
        let table: Vec<(&str, (Termination, Option<i32>))> = vec![
            ("clean exit", f(&|x| x.exit_code = Some(0))),
            ("non-zero exit", f(&|x| x.exit_code = Some(3))),
            (
                "deadline",
                f(&|x| {
                    x.killed_for = Some(KillReason::Deadline);
                    x.signal = Some(9)
                }),
            ),
            (
                "output",
                f(&|x| {
                    x.killed_for = Some(KillReason::OutputCap);
                    x.exit_code = Some(0)
                }),
            ),
            (
                "oom",
                f(&|x| {
                    x.exit_code = Some(137);
                    x.cgroup_oom_kills = 1
                }),
            ),
            (
                "oom but survived",
                f(&|x| {
                    x.exit_code = Some(0);
                    x.cgroup_oom_kills = 1
                }),
            ),
            ("sigxcpu", f(&|x| x.exit_code = Some(152))),
            ("sigxfsz", f(&|x| x.exit_code = Some(153))),
            (
                "enospc",
                f(&|x| {
                    x.exit_code = Some(1);
                    x.scratch_full = true
                }),
            ),
            (
                "full but fine",
                f(&|x| {
                    x.exit_code = Some(0);
                    x.scratch_full = true
                }),
            ),
            (
                "MemoryError",
                f(&|x| {
                    x.exit_code = Some(1);
                    x.memory_error_in_stderr = true
                }),
            ),
            (
                "limit hit + SIGKILL",
                f(&|x| {
                    x.exit_code = Some(137);
                    x.cgroup_memory_limit_hit = true
                }),
            ),
            ("bwrap signalled", f(&|x| x.signal = Some(11))),
        ];
        let expected = [
            (Termination::Exited, Some(0)),
            (Termination::Exited, Some(3)),
            (Termination::TimedOut, None),
            (Termination::OutputLimitExceeded, None),
            (Termination::OomKilled, Some(137)),
            (Termination::Exited, Some(0)),
            (Termination::TimedOut, Some(152)),
            (Termination::OutputLimitExceeded, Some(153)),
            (Termination::OutputLimitExceeded, Some(1)),
            (Termination::Exited, Some(0)),
            (Termination::OomKilled, Some(1)),
            (Termination::OomKilled, Some(137)),
            (Termination::Exited, Some(139)),
        ];
        for ((name, got), want) in table.into_iter().zip(expected) {
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn memory_error_patterns() {
        assert!(looks_like_memory_error("Traceback ...\nMemoryError\n"));
        assert!(looks_like_memory_error("Error: cannot allocate vector of size 7.5 Gb\n"));
        assert!(!looks_like_memory_error("ValueError: nope\n"));
    }
}
