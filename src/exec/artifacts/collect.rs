//! The artifact walk every sink stores with: caps, link and sparse rules, the storage budget
//! (tenant quota, free-space floor), and the sweep of expired artifacts.
//!
//! Artifacts are walked relative to directory descriptors (`openat`/`fstatat` with
//! `O_NOFOLLOW`), never by path, so even a symlink swapped in mid-walk could not redirect the
//! walk (and nothing can swap: collection starts once the task's cgroup is empty, or once its
//! pod has finished).
//!
//! What a file costs is what it occupies: `max(allocated, apparent size)`. A file whose apparent
//! size exceeds its allocated blocks by more than [`SPARSE_SLACK_BYTES`] (a sparse file, written
//! for free in the sandbox) is not collected at all, since copying it would turn its holes into
//! real host writes; the note says so. Before anything is copied the caller's `admit` sees the
//! total cost and may refuse it (tenant quota, free-space floor): then nothing is stored.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use crate::exec::Artifact;

/// Caps on what is collected from a task's artifacts directory.
#[derive(Debug, Clone)]
pub struct ArtifactCaps {
    pub max_files: usize,
    pub max_bytes: u64,
    pub max_depth: usize,
}

/// Directory entries examined per task at most, so a directory of a million files costs little.
const ARTIFACT_SCAN_LIMIT: usize = 20_000;

/// A file whose apparent size exceeds its allocated bytes by more than this is sparse and is
/// not collected.
pub const SPARSE_SLACK_BYTES: u64 = 1 << 20;

/// What one collection stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Collected {
    pub artifacts: Vec<Artifact>,
    /// Bytes the stored copies occupy (the sum of their costs).
    pub stored_bytes: u64,
    /// Why some or all artifacts were not stored, for the result message.
    pub note: Option<String>,
}

/// Copies regular files from `src` (the task's artifacts dir) to `dest`, listing each with its
/// size and sha256, with no storage budget; see [`collect_artifacts_within`].
pub fn collect_artifacts(src: &Path, dest: &Path, caps: &ArtifactCaps) -> Vec<Artifact> {
    collect_artifacts_within(src, dest, caps, |_| Ok(())).artifacts
}

/// A regular file found by the walk.
struct Found {
    /// Path components below `src`.
    parts: Vec<String>,
    dev: u64,
    ino: u64,
    size: u64,
    cost: u64,
}

/// Copies regular files from `src` to `dest`. Never follows a symlink (they are skipped, as are
/// `src` itself being one, files with more than one hard link, sockets, FIFOs and devices, and
/// sparse files), recurses at most `max_depth` levels, and stops at `max_files` / `max_bytes` of
/// cost (a file that would pass the byte cap is skipped). Names are `/`-separated paths
/// relative to `src`; non-UTF-8 names are skipped. `admit(total cost)` is asked once, before
/// anything is written; if it refuses, nothing is stored and its reason is the note.
pub fn collect_artifacts_within(
    src: &Path,
    dest: &Path,
    caps: &ArtifactCaps,
    admit: impl FnOnce(u64) -> Result<(), String>,
) -> Collected {
    let mut collected = Collected::default();
    let Ok(root) = open_dir_path(src) else {
        return collected;
    };
    let _ = remove_tree(dest);
    let (found, sparse) = walk(&root, caps);
    let mut notes = Vec::new();
    if sparse > 0 {
        notes.push(format!("{sparse} sparse artifact file(s) not stored (apparent size above allocated size)"));
    }
    let total: u64 = found.iter().map(|f| f.cost).sum();
    if !found.is_empty() {
        if let Err(why) = admit(total) {
            notes.push(format!("{} artifact file(s) ({total} bytes) not stored: {why}", found.len()));
            collected.note = Some(notes.join("; "));
            return collected;
        }
    }
    for f in found {
        let rel = f.parts.join("/");
        match copy_found(&root, &f, &dest.join(&rel)) {
            Ok((sha256, size)) => {
                collected.stored_bytes += f.cost;
                collected.artifacts.push(Artifact { name: rel, size, sha256 });
            }
            Err(e) => tracing::debug!(file = %rel, error = %e, "artifact skipped"),
        }
    }
    if !notes.is_empty() {
        collected.note = Some(notes.join("; "));
    }
    collected
}

/// Removes a tree written by a task, whatever modes the task left on it: a directory it made
/// unreadable or unwritable (its owner, the service on a cluster, may always change that) is
/// opened up before it is emptied. Symbolic links are removed, never followed. Missing is fine.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            open_up(path);
            match fs::remove_dir_all(path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                other => other,
            }
        }
        other => other,
    }
}

/// Gives every directory of the tree at `path` mode 0700 (not following links), so that its
/// owner can list and empty it.
fn open_up(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if !fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
        return;
    }
    let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o700));
    for entry in fs::read_dir(path).into_iter().flatten().flatten() {
        open_up(&entry.path());
    }
}

fn cstring(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))
}

/// Opens a directory by path without following a final symlink.
fn open_dir_path(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: NUL-terminated path; we own the returned descriptor.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `openat(dir, name)` without following a symlink, with extra flags.
fn open_at(dir: &OwnedFd, name: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: a valid descriptor and a NUL-terminated name; we own the returned descriptor.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags | libc::O_NOFOLLOW | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn stat_at(dir: &OwnedFd, name: &CStr) -> io::Result<libc::stat> {
    // SAFETY: fstatat fills the zeroed struct; the name is NUL-terminated.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// The names in a directory (not `.`/`..`), at most `budget` entries examined.
fn list_dir(dir: &OwnedFd, budget: &mut usize) -> io::Result<Vec<String>> {
    // fdopendir takes ownership of the descriptor it gets: give it a duplicate.
    let dup = dir.try_clone()?;
    // SAFETY: `dup` is a valid directory descriptor whose ownership passes to the DIR stream,
    // closed by closedir below.
    let stream = unsafe { libc::fdopendir(dup.as_raw_fd()) };
    if stream.is_null() {
        return Err(io::Error::last_os_error());
    }
    std::mem::forget(dup);
    let mut names = Vec::new();
    loop {
        if *budget == 0 {
            break;
        }
        // SAFETY: a valid stream; the entry is valid until the next readdir on it.
        let entry = unsafe { libc::readdir(stream) };
        if entry.is_null() {
            break;
        }
        *budget -= 1;
        // SAFETY: d_name is NUL-terminated within the entry.
        let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) };
        let bytes = name.to_bytes();
        if bytes == b"." || bytes == b".." {
            continue;
        }
        if let Ok(name) = std::str::from_utf8(bytes) {
            names.push(name.to_string());
        }
    }
    // SAFETY: the stream came from fdopendir and is closed once.
    unsafe { libc::closedir(stream) };
    Ok(names)
}

/// Depth-first in name order, relative to directory descriptors. Returns the files to copy and
/// how many sparse files were left out.
fn walk(root: &OwnedFd, caps: &ArtifactCaps) -> (Vec<Found>, usize) {
    let mut found = Vec::new();
    let mut sparse = 0;
    let mut total = 0u64;
    let mut budget = ARTIFACT_SCAN_LIMIT;
    // (directory, its components, depth); a directory is opened only when it is walked, so at
    // most `max_depth` descriptors are open at once... plus the pending siblings' names.
    let mut stack: Vec<(Option<OwnedFd>, Vec<String>, usize)> = vec![(None, Vec::new(), 0)];
    'walk: while let Some((dir, parts, depth)) = stack.pop() {
        let dir = match dir {
            Some(d) => d,
            None if parts.is_empty() => match root.try_clone() {
                Ok(d) => d,
                Err(_) => continue,
            },
            None => match open_parts(root, &parts) {
                Ok(d) => d,
                Err(_) => continue,
            },
        };
        let Ok(mut names) = list_dir(&dir, &mut budget) else {
            continue;
        };
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            let Ok(cname) = cstring(&name) else { continue };
            let Ok(st) = stat_at(&dir, &cname) else {
                continue;
            };
            let mut rel = parts.clone();
            rel.push(name);
            match st.st_mode & libc::S_IFMT {
                libc::S_IFDIR => {
                    if depth + 1 < caps.max_depth {
                        subdirs.push((None, rel, depth + 1));
                    }
                    continue;
                }
                libc::S_IFREG if st.st_nlink == 1 => {}
                _ => continue,
            }
            let size = st.st_size as u64;
            let allocated = (st.st_blocks as u64).saturating_mul(512);
            if size > allocated.saturating_add(SPARSE_SLACK_BYTES) {
                sparse += 1;
                continue;
            }
            if found.len() >= caps.max_files {
                break 'walk;
            }
            let cost = size.max(allocated);
            if total + cost > caps.max_bytes {
                continue;
            }
            total += cost;
            found.push(Found { parts: rel, dev: st.st_dev, ino: st.st_ino, size, cost });
        }
        stack.extend(subdirs.into_iter().rev());
        if budget == 0 {
            break;
        }
    }
    (found, sparse)
}

/// Opens the directory at `parts` below `root`, one component at a time, never following a
/// symlink.
fn open_parts(root: &OwnedFd, parts: &[String]) -> io::Result<OwnedFd> {
    let mut dir = root.try_clone()?;
    for part in parts {
        dir = open_at(&dir, &cstring(part)?, libc::O_RDONLY | libc::O_DIRECTORY)?;
    }
    Ok(dir)
}

/// Copies one listed file (re-opened relative to descriptors and checked to be the same inode)
/// to `dest`, at most its listed size. Returns `(sha256, bytes copied)`.
fn copy_found(root: &OwnedFd, f: &Found, dest: &Path) -> io::Result<(String, u64)> {
    let (name, dirs) = f.parts.split_last().expect("a file has a name");
    let dir = open_parts(root, dirs)?;
    let fd = open_at(&dir, &cstring(name)?, libc::O_RDONLY | libc::O_NONBLOCK)?;
    let mut file = File::from(fd);
    let meta = file.metadata()?;
    if !meta.file_type().is_file() || meta.nlink() != 1 || meta.ino() != f.ino || meta.dev() != f.dev {
        return Err(io::Error::other("not the regular file that was listed"));
    }
    if let Some(parent) = dest.parent() {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(parent)?;
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
    let mut limited = (&mut file).take(f.size);
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

/// Bytes a directory tree occupies: `max(allocated, apparent)` of every file and directory,
/// walked without following links. A missing tree is 0.
pub fn tree_cost(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    let own = meta.len().max(meta.blocks().saturating_mul(512));
    if !meta.is_dir() {
        return own;
    }
    let children: u64 =
        fs::read_dir(path).map(|entries| entries.flatten().map(|e| tree_cost(&e.path())).sum()).unwrap_or(0);
    own + children
}

/// Artifact storage used per tenant under `<root>/artifacts/<tenant>/`, counted once from disk
/// when a tenant is first seen (or after a sweep), then kept up to date as tasks store. A data
/// directory belongs to one service process, so there this count is the truth; storage shared
/// by several processes (a claim) is recounted before each store ([`TenantUsage::forget`]).
#[derive(Debug, Default)]
pub struct TenantUsage {
    bytes: Mutex<HashMap<String, u64>>,
}

impl TenantUsage {
    /// Admits `cost` more bytes for `tenant` if that keeps it within `quota`; counts them if so.
    ///
    /// # Errors
    /// The reason, for the result message, when the quota would be exceeded.
    pub fn admit(&self, tenant_dir: &Path, tenant: &str, cost: u64, quota: u64) -> Result<(), String> {
        let mut map = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        let used = map.entry(tenant.to_string()).or_insert_with(|| tree_cost(tenant_dir));
        if used.saturating_add(cost) > quota {
            return Err(format!(
                "the tenant's artifact storage quota (max_artifact_bytes = {quota}) would be exceeded: {used} bytes are retained"
            ));
        }
        *used += cost;
        Ok(())
    }

    /// Gives back bytes admitted but not stored.
    pub fn release(&self, tenant: &str, bytes: u64) {
        let mut map = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(used) = map.get_mut(tenant) {
            *used = used.saturating_sub(bytes);
        }
    }

    /// Forgets one tenant's count: recounted from disk on its next admission (storage shared
    /// with other processes, whose stores this one does not see).
    pub fn forget(&self, tenant: &str) {
        self.bytes.lock().unwrap_or_else(|p| p.into_inner()).remove(tenant);
    }

    /// Forgets every count (after a sweep removed something): recounted from disk on next use.
    pub fn invalidate(&self) {
        self.bytes.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// Whether `cost` more bytes keep the file system of `dir` above the floor: at least
/// `min_free_bytes` and `min_free_percent` of its size free afterwards.
///
/// # Errors
/// The reason, for the result message.
pub fn check_free_space(dir: &Path, cost: u64, min_free_bytes: u64, min_free_percent: u8) -> Result<(), String> {
    let c = CString::new(dir.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: statvfs fills the zeroed struct; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(format!("the data directory's free space is unknown: {}", io::Error::last_os_error()));
    }
    let frsize = st.f_frsize as u64;
    let avail = (st.f_bavail as u64).saturating_mul(frsize);
    let size = (st.f_blocks as u64).saturating_mul(frsize);
    let floor = min_free_bytes.max(size / 100 * u64::from(min_free_percent));
    if cost > avail || avail - cost < floor {
        return Err(format!("the data directory would fall below its free-space floor ({floor} bytes; {avail} free)"));
    }
    Ok(())
}

/// Removes task artifact directories, `<data_dir>/artifacts/<tenant>/<task id>/` (and the
/// older `<data_dir>/artifacts/<task id>/`), last modified more than `ttl` ago. Returns how many
/// were removed. Call it periodically (e.g. every few minutes).
///
/// # Errors
/// Only when the artifacts directory cannot be listed; a directory that cannot be removed is
/// logged and skipped.
pub fn sweep_artifacts(data_dir: &Path, ttl: Duration) -> io::Result<usize> {
    sweep_tree(&data_dir.join("artifacts"), ttl)
}

/// Removes `<root>/<tenant>/<task id>/` directories (and legacy `<root>/<task id>/`) last
/// modified more than `ttl` ago; see [`sweep_artifacts`].
///
/// # Errors
/// Only when `root` cannot be listed.
pub fn sweep_tree(root: &Path, ttl: Duration) -> io::Result<usize> {
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let now = SystemTime::now();
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let legacy_task = entry.file_name().to_str().is_some_and(|n| uuid::Uuid::parse_str(n).is_ok());
        let is_dir = fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
        if legacy_task || !is_dir {
            removed += sweep_one(&path, now, ttl);
        } else if let Ok(tasks) = fs::read_dir(&path) {
            for task in tasks.flatten() {
                removed += sweep_one(&task.path(), now, ttl);
            }
        }
    }
    Ok(removed)
}

/// Removes `path` if it was last modified more than `ttl` before `now`; 1 if removed.
fn sweep_one(path: &Path, now: SystemTime, ttl: Duration) -> usize {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    let age = meta.modified().ok().and_then(|m| now.duration_since(m).ok()).unwrap_or_default();
    if age < ttl {
        return 0;
    }
    let res = if meta.file_type().is_dir() { remove_tree(path) } else { fs::remove_file(path) };
    match res {
        Ok(()) => 1,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "could not remove expired artifacts");
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn caps() -> ArtifactCaps {
        ArtifactCaps { max_files: 100, max_bytes: 1 << 20, max_depth: 8 }
    }

    fn sha256_hex(data: &[u8]) -> String {
        Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn regular_files_are_copied_with_size_and_sha256_in_name_order() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dest) = (tmp.path().join("src"), tmp.path().join("dest"));
        fs::create_dir_all(src.join("sub/deeper")).unwrap();
        fs::write(src.join("b.txt"), b"bee").unwrap();
        fs::write(src.join("a.txt"), b"a").unwrap();
        fs::write(src.join("sub/deeper/c.bin"), [0u8, 1, 2]).unwrap();
        let got = collect_artifacts(&src, &dest, &caps());
        let names: Vec<_> = got.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["a.txt", "b.txt", "sub/deeper/c.bin"]);
        assert_eq!(got[1].size, 3);
        assert_eq!(got[1].sha256, sha256_hex(b"bee"));
        assert_eq!(fs::read(dest.join("sub/deeper/c.bin")).unwrap(), [0u8, 1, 2]);
    }

    #[test]
    fn links_and_special_files_are_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dest) = (tmp.path().join("src"), tmp.path().join("dest"));
        fs::create_dir(&src).unwrap();
        fs::write(tmp.path().join("secret"), b"host secret").unwrap();
        symlink(tmp.path().join("secret"), src.join("link")).unwrap();
        fs::write(src.join("twice"), b"x").unwrap();
        fs::hard_link(src.join("twice"), src.join("twice2")).unwrap();
        let fifo = std::ffi::CString::new(src.join("fifo").as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        fs::write(src.join("ok"), b"fine").unwrap();
        let got = collect_artifacts(&src, &dest, &caps());
        let names: Vec<_> = got.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["ok"]);
    }

    #[test]
    fn a_directory_swapped_for_a_symlink_after_the_walk_is_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dest) = (tmp.path().join("src"), tmp.path().join("dest"));
        fs::create_dir_all(src.join("sub")).unwrap();
        fs::write(src.join("sub/f"), b"task data").unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("f"), b"host secret").unwrap();
        let root = open_dir_path(&src).unwrap();
        let (found, _) = walk(&root, &caps());
        assert_eq!(found.len(), 1);
        // Between listing and copying, `sub` becomes a link to a directory outside.
        fs::remove_dir_all(src.join("sub")).unwrap();
        symlink(&outside, src.join("sub")).unwrap();
        let err = copy_found(&root, &found[0], &dest.join("sub/f")).unwrap_err();
        assert!(!dest.join("sub/f").exists(), "{err}");
    }

    #[test]
    fn a_symlinked_source_directory_yields_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        fs::create_dir(&real).unwrap();
        fs::write(real.join("f"), b"x").unwrap();
        symlink(&real, tmp.path().join("src")).unwrap();
        let got = collect_artifacts(&tmp.path().join("src"), &tmp.path().join("dest"), &caps());
        assert!(got.is_empty(), "{got:?}");
    }

    #[test]
    fn file_count_byte_total_and_depth_are_capped() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dest) = (tmp.path().join("src"), tmp.path().join("dest"));
        fs::create_dir_all(src.join("d1/d2")).unwrap();
        for i in 0..5 {
            fs::write(src.join(format!("f{i}")), vec![b'x'; 100]).unwrap();
        }
        fs::write(src.join("d1/d2/deep"), b"deep").unwrap();
        let got = collect_artifacts(&src, &dest, &ArtifactCaps { max_files: 3, max_bytes: 1 << 20, max_depth: 8 });
        assert_eq!(got.len(), 3);
        // The byte cap counts what a file occupies: whole blocks for these 100-byte files.
        let meta = fs::metadata(src.join("f0")).unwrap();
        let one = meta.len().max(meta.blocks() * 512);
        let got =
            collect_artifacts(&src, &dest, &ArtifactCaps { max_files: 100, max_bytes: one * 5 / 2, max_depth: 8 });
        // A file that would pass the cap is skipped; smaller ones after it still fit.
        let names: Vec<_> = got.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["f0", "f1"]);
        let got = collect_artifacts(&src, &dest, &ArtifactCaps { max_files: 100, max_bytes: 1 << 20, max_depth: 2 });
        assert!(got.iter().all(|a| a.name != "d1/d2/deep"), "{got:?}");
    }

    #[test]
    fn sparse_files_are_not_copied_and_cost_counts_allocation() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dest) = (tmp.path().join("src"), tmp.path().join("dest"));
        fs::create_dir(&src).unwrap();
        let f = File::create(src.join("sparse")).unwrap();
        f.set_len(64 << 20).unwrap();
        fs::write(src.join("dense"), vec![7u8; 10_000]).unwrap();
        let got = collect_artifacts_within(&src, &dest, &caps(), |_| Ok(()));
        let names: Vec<_> = got.artifacts.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["dense"]);
        assert!(!dest.join("sparse").exists());
        assert!(got.note.unwrap().contains("1 sparse artifact file(s) not stored"));
        // 10,000 bytes occupy whole blocks.
        assert!(got.stored_bytes >= 10_000, "{}", got.stored_bytes);
    }

    #[test]
    fn a_refused_budget_stores_nothing_and_says_why() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dest) = (tmp.path().join("src"), tmp.path().join("dest"));
        fs::create_dir(&src).unwrap();
        fs::write(src.join("a"), b"aaa").unwrap();
        let mut asked = 0;
        let got = collect_artifacts_within(&src, &dest, &caps(), |cost| {
            asked = cost;
            Err("over quota".into())
        });
        assert!(asked >= 3);
        assert!(got.artifacts.is_empty());
        assert_eq!(got.stored_bytes, 0);
        assert!(!dest.join("a").exists());
        assert_eq!(got.note.as_deref(), Some(&*format!("1 artifact file(s) ({asked} bytes) not stored: over quota")));
    }

    #[test]
    fn tenant_usage_is_counted_from_disk_and_enforced() {
        let tmp = tempfile::tempdir().unwrap();
        let tenant_dir = tmp.path().join("acme");
        fs::create_dir_all(tenant_dir.join("t1")).unwrap();
        fs::write(tenant_dir.join("t1/f"), vec![1u8; 8192]).unwrap();
        let on_disk = tree_cost(&tenant_dir);
        assert!(on_disk >= 8192);
        let usage = TenantUsage::default();
        let quota = on_disk + 1000;
        usage.admit(&tenant_dir, "acme", 1000, quota).unwrap();
        let err = usage.admit(&tenant_dir, "acme", 1, quota).unwrap_err();
        assert!(err.contains("max_artifact_bytes"), "{err}");
        usage.release("acme", 1000);
        usage.admit(&tenant_dir, "acme", 1000, quota).unwrap();
        // Another tenant has its own count.
        usage.admit(&tmp.path().join("globex"), "globex", quota, quota).unwrap();
    }

    #[test]
    fn the_free_space_floor_refuses_what_would_pass_it() {
        let tmp = tempfile::tempdir().unwrap();
        check_free_space(tmp.path(), 0, 0, 0).unwrap();
        let err = check_free_space(tmp.path(), 0, u64::MAX / 2, 0).unwrap_err();
        assert!(err.contains("free-space floor"), "{err}");
        assert!(check_free_space(tmp.path(), u64::MAX / 2, 0, 0).is_err());
    }

    #[test]
    fn the_sweep_removes_only_expired_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("artifacts");
        let dir = root.join("acme").join(uuid::Uuid::new_v4().to_string());
        let legacy = root.join(uuid::Uuid::new_v4().to_string());
        for d in [&dir, &legacy] {
            fs::create_dir_all(d).unwrap();
            fs::write(d.join("f"), b"x").unwrap();
        }
        assert_eq!(sweep_artifacts(tmp.path(), Duration::from_secs(3600)).unwrap(), 0);
        assert!(dir.exists() && legacy.exists());
        assert_eq!(sweep_artifacts(tmp.path(), Duration::ZERO).unwrap(), 2);
        assert!(!dir.exists() && !legacy.exists());
        // The tenant's directory stays for its next task.
        assert!(root.join("acme").is_dir());
    }
}
