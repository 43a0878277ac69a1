//! A task's scratch: the size-capped tmpfs, its directories and inputs, and its removal.

use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::Ordering;

use uuid::Uuid;

use super::cgroups::TaskCgroups;
use super::LocalBackend;
use crate::exec::Job;
use crate::sandbox::bwrap::{self, ScratchLayout};
use crate::sandbox::cgroup;
use crate::sandbox::code_file_name;
use crate::sandbox::limits::Limits;

impl LocalBackend {
    /// Creates the scratch (owned by the task's `uid`), writes the inputs and creates the
    /// cgroups.
    pub(super) fn prepare(&self, job: &Job, uid: u32, gid: u32) -> io::Result<PreparedRun> {
        let run = self.prepare_empty(&job.key.task_id.to_string(), uid, gid, &self.limits(job))?;
        write_inputs(&run.scratch.inputs(), job)?;
        Ok(run)
    }

    /// A scratch without inputs and cgroups with `limits`, named `<label>-<nonce>`.
    pub(super) fn prepare_empty(&self, label: &str, uid: u32, gid: u32, limits: &Limits) -> io::Result<PreparedRun> {
        let name = format!("{label}-{}", &Uuid::new_v4().simple().to_string()[..8]);
        let root = self.config.data_dir.join("run").join(&name);
        fs::DirBuilder::new().mode(0o711).create(&root)?;
        let mut run = PreparedRun {
            scratch: ScratchLayout::new(&root),
            mounted: false,
            cgroups: TaskCgroups::default(),
            uid,
            gid,
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
        fs::DirBuilder::new().mode(0o755).create(s.inputs())?;
        fs::DirBuilder::new().mode(0o755).create(s.internal())?;
        fs::DirBuilder::new().mode(0o555).create(s.internal().join(ScratchLayout::EMPTY_DIR))?;
        write_read_only(&s.internal().join(ScratchLayout::EMPTY_FILE), b"")?;
        for dir in [s.work(), s.tmp(), s.shm(), s.out(), s.out().join(ScratchLayout::ARTIFACTS)] {
            fs::DirBuilder::new().mode(0o700).create(&dir)?;
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
        }
        for (name, content) in bwrap::synthetic_etc(uid, gid) {
            write_read_only(&s.internal().join(name), content.as_bytes())?;
        }
        let cgroup_name = cgroup::task_name(self.owner, &name);
        run.cgroups = TaskCgroups::create(&self.cgroups, &cgroup_name, limits);
        Ok(run)
    }
}

/// Writes the job's input files and its code file into `dir`: read-only, owned by root, never
/// through a link, never over an existing name.
pub(super) fn write_inputs(dir: &Path, job: &Job) -> io::Result<()> {
    for (name, content) in job.files.iter().map(|(n, c)| (n.as_str(), c.as_slice())) {
        if !bwrap::is_plain_name(name) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("input file name {name:?} is not a plain name"),
            ));
        }
        write_read_only(&dir.join(name), content)?;
    }
    let code = code_file_name(job.language, job.files.keys().map(String::as_str));
    write_read_only(&dir.join(code), job.code.as_bytes())
}

/// A task's scratch and cgroups; dropping it removes both, whatever happened.
pub(super) struct PreparedRun {
    pub(super) scratch: ScratchLayout,
    pub(super) mounted: bool,
    pub(super) cgroups: TaskCgroups,
    /// The task's own host uid (leased for this run) and the sandbox group.
    pub(super) uid: u32,
    pub(super) gid: u32,
}

impl PreparedRun {
    pub(super) fn scratch_is_full(&self) -> bool {
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

pub(super) fn mount_tmpfs(path: &Path, size: u64, inodes: u64) -> io::Result<()> {
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

pub(super) fn umount(path: &Path) -> io::Result<()> {
    let target = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: NUL-terminated path alive for the call.
    if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `remove_dir_all` that never follows symlinks (std's does not either) and accepts absence.
pub(super) fn remove_tree(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn write_read_only(path: &Path, content: &[u8]) -> io::Result<()> {
    let mut f =
        OpenOptions::new().write(true).create_new(true).mode(0o444).custom_flags(libc::O_NOFOLLOW).open(path)?;
    f.write_all(content)
}
