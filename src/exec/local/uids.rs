//! One host uid per running task, from a dedicated range, never shared by two running tasks.
//!
//! The kernel keeps several limits per user: processes, inotify instances, POSIX message queue
//! bytes, pending signals, file descriptors in flight over `SCM_RIGHTS`. With one uid for every
//! task, one tenant holding any of them makes another tenant's task fail. So each running task
//! gets its own uid, `<sandbox user>-0` ... `<sandbox user>-<N-1>` (created by
//! `deploy/local/install-sandbox.sh`, all in the group `<sandbox user>`).
//!
//! A uid is leased with an exclusive `flock` on `<lock dir>/<uid>` (root-only directory,
//! default `/run/agenttask/uids`). The lock is host-wide, so several service processes (or test
//! binaries) on one host never hand out the same uid, and the kernel drops it when a process
//! dies, so a crash leaks nothing. Before a lease is given back every process of that uid is
//! gone: the task's cgroup was seen empty, or a helper running as that uid killed them all.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::host::lookup_user;

/// Largest range looked up at start.
const MAX_SLOTS: usize = 4096;

/// The uid range of this host and where its locks are.
#[derive(Debug)]
pub(super) struct UidPool {
    /// `(uid, gid)` of each slot user.
    slots: Vec<(u32, u32)>,
    lock_dir: PathBuf,
    /// Where the next search starts, so slots are used round-robin.
    next: AtomicUsize,
}

/// A uid held by one run. Dropping it gives the uid back; call [`UidLease::mark_clean`] once no
/// process of the uid can be left, or the drop kills whatever is left first.
#[derive(Debug)]
pub(super) struct UidLease {
    pub(super) uid: u32,
    pub(super) gid: u32,
    /// Holds the `flock`; closing it releases the uid.
    _lock: File,
    clean: bool,
}

impl UidPool {
    /// Finds the slot users `<base>-0`, `<base>-1`, ... (stopping at the first missing one) and
    /// prepares the lock directory.
    ///
    /// # Errors
    /// When `<base>-0` does not exist, a slot user has uid or gid 0, two slots share a uid, or
    /// the lock directory cannot be created.
    pub(super) fn discover(base: &str, lock_dir: &Path) -> Result<Self, String> {
        let mut slots = Vec::new();
        for i in 0..MAX_SLOTS {
            let name = format!("{base}-{i}");
            match lookup_user(&name) {
                Ok(Some((uid, gid))) => {
                    if uid == 0 || gid == 0 {
                        return Err(format!("sandbox user {name:?} has uid/gid 0; it must be an unprivileged user"));
                    }
                    if slots.iter().any(|&(u, _)| u == uid) {
                        return Err(format!("sandbox user {name:?} shares uid {uid} with another slot user; every slot needs its own uid"));
                    }
                    slots.push((uid, gid));
                }
                Ok(None) => break,
                Err(e) => return Err(format!("looking up sandbox user {name:?}: {e}")),
            }
        }
        if slots.is_empty() {
            return Err(format!(
                "the sandbox uid range is missing (no user {base}-0): run deploy/local/install-sandbox.sh as root; it creates the users {base}-0 ... {base}-<N-1>, one per task that can run at once"
            ));
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(lock_dir)
            .map_err(|e| format!("creating {}: {e}", lock_dir.display()))?;
        let meta = fs::symlink_metadata(lock_dir).map_err(|e| format!("{}: {e}", lock_dir.display()))?;
        if !meta.is_dir() || std::os::unix::fs::MetadataExt::uid(&meta) != 0 {
            return Err(format!("{} must be a directory owned by root", lock_dir.display()));
        }
        fs::set_permissions(lock_dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("chmod {}: {e}", lock_dir.display()))?;
        Ok(Self { slots, lock_dir: lock_dir.to_path_buf(), next: AtomicUsize::new(std::process::id() as usize) })
    }

    /// How many tasks this host can run at once.
    pub(super) fn len(&self) -> usize {
        self.slots.len()
    }

    /// The group shared by the slot users (that of the first slot).
    pub(super) fn gid(&self) -> u32 {
        self.slots[0].1
    }

    /// Any slot's uid, for permission checks at start.
    pub(super) fn first_uid(&self) -> u32 {
        self.slots[0].0
    }

    /// Takes a free uid without waiting, if there is one.
    pub(super) fn try_acquire(&self) -> io::Result<Option<UidLease>> {
        let n = self.slots.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for k in 0..n {
            let (uid, gid) = self.slots[(start + k) % n];
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                .open(self.lock_dir.join(uid.to_string()))?;
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(Some(UidLease { uid, gid, _lock: file, clean: false }));
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(e);
            }
        }
        Ok(None)
    }

    /// Takes a free uid, waiting up to `wait` for one.
    ///
    /// # Errors
    /// When the lock files cannot be opened, or every uid stayed busy for `wait`.
    pub(super) async fn acquire(&self, wait: Duration) -> io::Result<UidLease> {
        let end = tokio::time::Instant::now() + wait;
        loop {
            if let Some(lease) = self.try_acquire()? {
                return Ok(lease);
            }
            if tokio::time::Instant::now() >= end {
                return Err(io::Error::other(format!(
                    "all {} sandbox uids of this host stayed busy for {} s",
                    self.slots.len(),
                    wait.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl UidLease {
    /// No process of this uid can be left (the task's cgroup was seen empty).
    pub(super) fn mark_clean(&mut self) {
        self.clean = true;
    }
}

impl Drop for UidLease {
    fn drop(&mut self) {
        if !self.clean {
            if let Err(e) = kill_all_of_uid(self.uid, self.gid) {
                tracing::warn!(uid = self.uid, error = %e, "could not kill the leftover processes of a sandbox uid");
            }
        }
    }
}

/// Kills every process of `uid`: a helper switches to that uid and sends `kill(-1, SIGKILL)`,
/// which reaches exactly the processes that uid may signal (its own), in every pid namespace.
pub(super) fn kill_all_of_uid(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: kill is async-signal-safe; it signals every process of this uid but the helper.
    as_uid(uid, gid, "kill", move || {
        unsafe { libc::kill(-1, libc::SIGKILL) };
        Ok(())
    })
}

/// Runs `action` in a short-lived helper process that has switched to `uid` and `gid` (no
/// supplementary groups): what a sandbox's own user may do to its processes (signal them, lower
/// their rlimits) without the capabilities a service in a container may lack.
///
/// `action` runs between fork and exec: it may only make async-signal-safe system calls on
/// data prepared before.
pub(super) fn as_uid(
    uid: u32,
    gid: u32,
    what: &str,
    mut action: impl FnMut() -> io::Result<()> + Send + Sync + 'static,
) -> io::Result<()> {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new("/bin/true");
    cmd.env_clear()
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: only async-signal-safe system calls between fork and exec (the caller's promise
    // for `action`).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(gid, gid, gid) != 0
                || libc::setresuid(uid, uid, uid) != 0
            {
                return Err(io::Error::last_os_error());
            }
            action()
        });
    }
    let status = cmd.status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("{what} helper: {status}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(dir: &Path, uids: &[u32]) -> UidPool {
        UidPool {
            slots: uids.iter().map(|&u| (u, 1000)).collect(),
            lock_dir: dir.to_path_buf(),
            next: AtomicUsize::new(0),
        }
    }

    #[test]
    fn a_uid_is_leased_once_across_pools_until_released() {
        let tmp = tempfile::tempdir().unwrap();
        // Two pools over one lock directory stand for two service processes on one host.
        let (a, b) = (pool(tmp.path(), &[70001, 70002]), pool(tmp.path(), &[70001, 70002]));
        let mut l1 = a.try_acquire().unwrap().unwrap();
        let mut l2 = b.try_acquire().unwrap().unwrap();
        assert_ne!(l1.uid, l2.uid);
        assert!(a.try_acquire().unwrap().is_none());
        assert!(b.try_acquire().unwrap().is_none());
        let freed = l1.uid;
        l1.mark_clean();
        drop(l1);
        let mut l3 = b.try_acquire().unwrap().unwrap();
        assert_eq!(l3.uid, freed);
        l2.mark_clean();
        l3.mark_clean();
    }

    #[tokio::test]
    async fn acquire_waits_for_a_release_and_then_gives_up() {
        let tmp = tempfile::tempdir().unwrap();
        let p = std::sync::Arc::new(pool(tmp.path(), &[70003]));
        let mut held = p.try_acquire().unwrap().unwrap();
        let err = p.acquire(Duration::from_millis(50)).await.unwrap_err();
        assert!(err.to_string().contains("stayed busy"), "{err}");
        let p2 = p.clone();
        let waiter = tokio::spawn(async move { p2.acquire(Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(30)).await;
        held.mark_clean();
        drop(held);
        let mut got = waiter.await.unwrap().unwrap();
        assert_eq!(got.uid, 70003);
        got.mark_clean();
    }
}
