//! Probing and preparing the host once at start: the sandbox user, the data directory, the file system layout, cgroups, tmpfs, stale scratch.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::scratch::{mount_tmpfs, remove_tree, umount};
use super::MIB;
use crate::sandbox::bwrap::{HostLayout, ProcMask, RootEntry};
use crate::sandbox::cgroup::{self, CgroupHost};

// ---------------------------------------------------------------------------------------------
// Host helpers.

pub(super) fn is_executable(path: &Path) -> bool {
    fs::metadata(path).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

pub(super) fn lookup_user(name: &str) -> io::Result<Option<(u32, u32)>> {
    let cname =
        CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "user name contains NUL"))?;
    // SAFETY: getpwnam_r fills `pwd` with pointers into `buf`, both alive for the call; we only
    // copy two integers out.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwnam_r(cname.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result);
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
pub(super) fn prepare_data_dir(data_dir: &Path, uid: u32, gid: u32) -> Result<(), String> {
    let mk = |p: &Path, mode: u32| -> Result<(), String> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(p)
            .map_err(|e| format!("creating {}: {e}", p.display()))?;
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).map_err(|e| format!("chmod {}: {e}", p.display()))
    };
    mk(data_dir, 0o711)?;
    mk(&data_dir.join("run"), 0o711)?;
    mk(&data_dir.join("artifacts"), 0o700)?;
    let data_dir = fs::canonicalize(data_dir).map_err(|e| format!("{}: {e}", data_dir.display()))?;
    // bubblewrap runs as the sandbox user and resolves the scratch paths itself.
    for dir in data_dir.ancestors() {
        let m = fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mode = m.permissions().mode();
        let ok = mode & 0o001 != 0 || (m.uid() == uid && mode & 0o100 != 0) || (m.gid() == gid && mode & 0o010 != 0);
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
pub(super) fn sweep_stale_runs(run_dir: &Path) {
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

pub(super) fn detect_host_layout(extra: &[PathBuf]) -> HostLayout {
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
        proc_masks: proc_masks(),
    }
}

/// The masked `/proc` entries that exist on this kernel and that others may read (what the
/// sandbox user cannot read needs no mask), as files or directories.
fn proc_masks() -> Vec<ProcMask> {
    let readable = |m: &fs::Metadata| m.permissions().mode() & 0o004 != 0;
    let mut masks = Vec::new();
    for name in HostLayout::MASKED_PROC_FILES {
        if fs::symlink_metadata(name).is_ok_and(|m| m.is_file() && readable(&m)) {
            masks.push(ProcMask::File(name.into()));
        }
    }
    for name in HostLayout::MASKED_PROC_DIRS {
        if fs::symlink_metadata(name).is_ok_and(|m| m.is_dir() && readable(&m)) {
            masks.push(ProcMask::Dir(name.into()));
        }
    }
    masks
}

/// Finds the cgroup hierarchy and creates the `agenttask` parent directories; `None` if that
/// is impossible (then rlimits only).
pub(super) fn prepare_cgroups() -> CgroupHost {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let host = cgroup::detect(&mountinfo, &own);
    let ok = match &host {
        CgroupHost::None => true,
        CgroupHost::V1 { memory, pids, cpu } => {
            [memory, pids, cpu].into_iter().flatten().all(|p| fs::create_dir_all(p).is_ok())
        }
        CgroupHost::V2 { parent } => {
            // Controllers must be enabled for our children and the parent's children; this fails
            // when the service's own cgroup holds processes and is not the root (the "no internal
            // processes" rule): run the service in a delegated cgroup (systemd `Delegate=yes`).
            let own_dir = parent.parent().map(Path::to_path_buf).unwrap_or_default();
            let enable = |dir: &Path| write_file(&dir.join("cgroup.subtree_control"), "+memory +pids +cpu");
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

/// This process as the owner of the task cgroups it creates.
pub(super) fn own_owner() -> cgroup::Owner {
    let stat = fs::read_to_string("/proc/self/stat").unwrap_or_default();
    cgroup::Owner { pid: std::process::id(), start_ticks: cgroup::start_ticks(&stat).unwrap_or(0) }
}

fn is_alive(owner: cgroup::Owner) -> bool {
    fs::read_to_string(format!("/proc/{}/stat", owner.pid)).ok().and_then(|stat| cgroup::start_ticks(&stat))
        == Some(owner.start_ticks)
}

/// Removes task cgroups whose owning service process is gone (crashed or killed before it could
/// clean up), killing whatever is still in them. Several service processes may share the
/// parent: a cgroup whose owner still runs, or whose name carries no owner, is left alone.
/// Returns how many were removed.
pub(super) fn sweep_stale_cgroups(host: &CgroupHost) -> usize {
    let parents: Vec<&PathBuf> = match host {
        CgroupHost::None => vec![],
        CgroupHost::V1 { memory, pids, cpu } => [memory, pids, cpu].into_iter().flatten().collect(),
        CgroupHost::V2 { parent } => vec![parent],
    };
    let mut removed = 0;
    for parent in parents {
        let Ok(entries) = fs::read_dir(parent) else {
            continue;
        };
        for entry in entries.flatten() {
            let Some(owner) = entry.file_name().to_str().and_then(cgroup::owner_of) else {
                continue;
            };
            if is_alive(owner) || !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let dir = entry.path();
            let mut gone = false;
            for _ in 0..100 {
                let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                for pid in cgroup::pids(&procs) {
                    // SAFETY: kill has no memory-safety preconditions; the pid is listed in a
                    // task cgroup whose owner is gone, so it is a leftover task process.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                if fs::remove_dir(&dir).is_ok() {
                    gone = true;
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            if gone {
                removed += 1;
            } else {
                tracing::warn!(path = %dir.display(), "could not remove a stale task cgroup");
            }
        }
    }
    if removed > 0 {
        tracing::info!(removed, "removed task cgroups left by service processes that are gone");
    }
    removed
}

pub(super) fn probe_tmpfs(run_dir: &Path) -> bool {
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

pub(super) fn write_file(path: &Path, content: &str) -> io::Result<()> {
    fs::write(path, content).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}
