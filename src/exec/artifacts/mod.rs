//! Artifact sinks: where the files a task leaves under `$AGENTTASK_ARTIFACTS_DIR` are kept, and
//! how they come back, the same way for every backend.
//!
//! An [`ArtifactSink`] stores a finished run's artifacts directory (with the walk, caps, link,
//! sparse and quota rules of [`collect`]), opens a stored artifact by its recorded name for the
//! HTTP API, removes a task's artifacts and sweeps expired ones. Two sinks:
//! - [`DataDirSink`]: `<data dir>/artifacts/<tenant>/<task id>/`, the local backend's (its runs
//!   write into their own size-capped scratch, which this sink copies from);
//! - [`PvcSink`]: the same layout on a PersistentVolumeClaim the service has mounted, plus a
//!   per-task directory `runs/<tenant>/<task id>/` that a Kubernetes task pod mounts (as the
//!   claim's `subPath`) as its artifacts directory. After the pod ends, the run directory is
//!   stored exactly as a local run's scratch is, then removed.
//!
//! Whatever the sink, the task row records the stored names, sizes and sha256, and the HTTP
//! API serves only those names.

mod collect;

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use uuid::Uuid;

pub use collect::{
    check_free_space, collect_artifacts, collect_artifacts_within, remove_tree, sweep_artifacts, sweep_tree, tree_cost,
    ArtifactCaps, Collected, TenantUsage, SPARSE_SLACK_BYTES,
};

const MIB: u64 = 1 << 20;

/// Limits every sink applies. [`SinkConfig::default`] gives the documented defaults.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Files, bytes (what they occupy) and directory depth collected per task.
    pub caps: ArtifactCaps,
    /// Free-space floor of the storage: a task's artifacts are not stored if storing them would
    /// leave less than this free...
    pub min_free_bytes: u64,
    /// ...or less than this share of its size, in percent.
    pub min_free_percent: u8,
    /// How long stored artifacts are kept.
    pub ttl: Duration,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            caps: ArtifactCaps { max_files: 100, max_bytes: 64 * MIB, max_depth: 8 },
            min_free_bytes: 1024 * MIB,
            min_free_percent: 5,
            ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// Where artifacts are kept. Every method does blocking file I/O: call it off the async workers.
pub trait ArtifactSink: Send + Sync + std::fmt::Debug {
    /// Stores the regular files under `src` (a finished run's artifacts directory, written by
    /// nothing any more) as task `task_id`'s artifacts, within the caps, the storage's
    /// free-space floor and the tenant's `quota` (bytes over everything it retains).
    fn collect(&self, tenant: &str, task_id: Uuid, src: &Path, quota: u64) -> Collected;

    /// Opens the stored artifact `name` (a name the collection recorded) of a task.
    ///
    /// # Errors
    /// `NotFound` when it is not (or no longer) kept; `InvalidInput` for a name that is not a
    /// plain relative path.
    fn open(&self, tenant: &str, task_id: Uuid, name: &str) -> io::Result<File>;

    /// Removes a task's stored artifacts (nothing stored is fine).
    ///
    /// # Errors
    /// When the directory exists and cannot be removed.
    fn remove(&self, tenant: &str, task_id: Uuid) -> io::Result<()>;

    /// Removes whatever is older than the TTL; returns how many task directories went.
    ///
    /// # Errors
    /// When the storage cannot be listed.
    fn sweep(&self) -> io::Result<usize>;
}

/// Whether `name` is a recorded artifact's shape: `/`-separated, relative, no empty, `.` or
/// `..` component (collection never records anything else; anything else is refused).
pub fn is_artifact_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('\0') && name.split('/').all(|p| !p.is_empty() && p != "." && p != "..")
}

/// The claim's sub-path a task's pod mounts as its artifacts directory, or `None` when the
/// tenant is not a plain path component (tenant names are RFC 1123 labels, so never in
/// practice). Pure, so the pod builder and the sink agree on it.
pub fn run_sub_path(tenant: &str, task_id: Uuid) -> Option<String> {
    crate::sandbox::bwrap::is_plain_name(tenant).then(|| format!("runs/{tenant}/{task_id}"))
}

/// Artifacts under `<root>/artifacts/<tenant>/<task id>/`; `root` is the service's data
/// directory (or, for [`PvcSink`], where the claim is mounted).
#[derive(Debug)]
pub struct DataDirSink {
    root: PathBuf,
    config: SinkConfig,
    usage: TenantUsage,
}

impl DataDirSink {
    pub fn new(root: PathBuf, config: SinkConfig) -> Self {
        DataDirSink { root, config, usage: TenantUsage::default() }
    }

    pub fn config(&self) -> &SinkConfig {
        &self.config
    }

    /// `<root>/artifacts`.
    pub fn artifacts_root(&self) -> PathBuf {
        self.root.join("artifacts")
    }

    fn task_dir(&self, tenant: &str, task_id: Uuid) -> io::Result<PathBuf> {
        if !crate::sandbox::bwrap::is_plain_name(tenant) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("tenant name {tenant:?} is not plain")));
        }
        Ok(self.artifacts_root().join(tenant).join(task_id.to_string()))
    }

    /// Forgets the tenant's usage count, so the next collection counts it from disk again.
    fn recount(&self, tenant: &str) {
        self.usage.forget(tenant);
    }
}

impl ArtifactSink for DataDirSink {
    fn collect(&self, tenant: &str, task_id: Uuid, src: &Path, quota: u64) -> Collected {
        let dest = match self.task_dir(tenant, task_id) {
            Ok(d) => d,
            Err(e) => return Collected { note: Some(format!("artifacts not stored: {e}")), ..Collected::default() },
        };
        let tenant_dir = self.artifacts_root().join(tenant);
        let c = &self.config;
        let mut admitted = 0;
        let collected = collect_artifacts_within(src, &dest, &c.caps, |cost| {
            check_free_space(&self.root, cost, c.min_free_bytes, c.min_free_percent)?;
            self.usage.admit(&tenant_dir, tenant, cost, quota)?;
            admitted = cost;
            Ok(())
        });
        // Whatever was admitted but not copied (a file that vanished) is given back.
        self.usage.release(tenant, admitted.saturating_sub(collected.stored_bytes));
        collected
    }

    fn open(&self, tenant: &str, task_id: Uuid, name: &str) -> io::Result<File> {
        if !is_artifact_name(name) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{name:?} is not an artifact name")));
        }
        // The directories below the task's are the service's own (made by the copy), so only
        // the last component needs O_NOFOLLOW.
        let path = self.task_dir(tenant, task_id)?.join(name);
        OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC).open(path)
    }

    fn remove(&self, tenant: &str, task_id: Uuid) -> io::Result<()> {
        let dir = self.task_dir(tenant, task_id)?;
        if dir.exists() {
            remove_tree(&dir)?;
            self.recount(tenant);
        }
        Ok(())
    }

    fn sweep(&self) -> io::Result<usize> {
        let removed = sweep_tree(&self.artifacts_root(), self.config.ttl)?;
        if removed > 0 {
            self.usage.invalidate();
        }
        Ok(removed)
    }
}

/// Artifacts of Kubernetes tasks on a PersistentVolumeClaim (ReadWriteMany) that the service
/// has mounted at `mount` and every task pod mounts with the sub-path [`run_sub_path`].
///
/// Ownership: the service prepares each run directory before the pod exists, because a
/// kubelet creates a missing `subPath` directory as root with mode 0755, which the pod's
/// non-root uid could not write. It is made mode 0777: only that pod (through its sub-path)
/// and the service ever see it, and `fsGroup` cannot be relied on instead, since most
/// ReadWriteMany volume types (NFS, CephFS) ignore it. The service must run as the pods' uid
/// (65532 in deploy/) or as root, so that it can read and remove whatever the pod leaves,
/// whatever modes the pod gives it; [`PvcSink::check_owner`] says so at start-up.
#[derive(Debug)]
pub struct PvcSink {
    mount: PathBuf,
    store: DataDirSink,
}

impl PvcSink {
    pub fn new(mount: PathBuf, config: SinkConfig) -> Self {
        PvcSink { store: DataDirSink::new(mount.clone(), config), mount }
    }

    /// Refuses a service uid that could not read and remove what pods of uid `pod_uid` write.
    ///
    /// # Errors
    /// What to change, when the uids differ or the mount is not a directory.
    pub fn check_owner(&self, pod_uid: i64) -> Result<(), String> {
        if !self.mount.is_dir() {
            return Err(format!(
                "--artifacts-pvc-mount {}: not a directory; mount the claim there in the service's pod",
                self.mount.display()
            ));
        }
        // SAFETY: geteuid has no preconditions.
        let euid = i64::from(unsafe { libc::geteuid() });
        if euid != 0 && euid != pod_uid {
            return Err(format!(
                "the service runs as uid {euid} but task pods as uid {pod_uid}: with --artifacts-pvc both must be \
                 the same (or the service root), or it cannot collect and remove what pods write"
            ));
        }
        Ok(())
    }

    /// Where a task's pod writes (the claim's sub-path, seen through the service's mount).
    pub fn run_dir(&self, tenant: &str, task_id: Uuid) -> io::Result<PathBuf> {
        run_sub_path(tenant, task_id)
            .map(|sub| self.mount.join(sub))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("tenant name {tenant:?} is not plain")))
    }

    /// Makes the task's run directory, empty and writable by its pod (see the type's docs).
    /// Whatever an earlier attempt left there goes first.
    ///
    /// # Errors
    /// When the claim is not mounted or not writable.
    pub fn prepare_run(&self, tenant: &str, task_id: Uuid) -> io::Result<()> {
        let dir = self.run_dir(tenant, task_id)?;
        let parent = dir.parent().expect("runs/<tenant>/<id> has a parent");
        fs::DirBuilder::new().recursive(true).mode(0o755).create(parent)?;
        remove_tree(&dir)?;
        fs::DirBuilder::new().mode(0o777).create(&dir)?;
        // The mode given to mkdir is cut by the umask; this one is not.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777))
    }

    /// Stores what the task's (finished) pod wrote, then removes its run directory, also when
    /// nothing could be stored. Other processes may have stored for the tenant since, so its
    /// usage is counted from disk again.
    pub fn collect_run(&self, tenant: &str, task_id: Uuid, quota: u64) -> Collected {
        let dir = match self.run_dir(tenant, task_id) {
            Ok(d) => d,
            Err(e) => return Collected { note: Some(format!("artifacts not stored: {e}")), ..Collected::default() },
        };
        self.store.recount(tenant);
        let collected = self.store.collect(tenant, task_id, &dir, quota);
        self.discard_run_dir(&dir);
        collected
    }

    /// Removes a task's run directory without storing anything (a cancelled task).
    pub fn discard_run(&self, tenant: &str, task_id: Uuid) {
        if let Ok(dir) = self.run_dir(tenant, task_id) {
            self.discard_run_dir(&dir);
        }
    }

    fn discard_run_dir(&self, dir: &Path) {
        if let Err(e) = remove_tree(dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove a task's run directory");
        }
    }
}

impl ArtifactSink for PvcSink {
    fn collect(&self, tenant: &str, task_id: Uuid, src: &Path, quota: u64) -> Collected {
        self.store.recount(tenant);
        self.store.collect(tenant, task_id, src, quota)
    }

    fn open(&self, tenant: &str, task_id: Uuid, name: &str) -> io::Result<File> {
        self.store.open(tenant, task_id, name)
    }

    fn remove(&self, tenant: &str, task_id: Uuid) -> io::Result<()> {
        self.store.remove(tenant, task_id)
    }

    /// Expired stored artifacts, and run directories left behind (a service that stopped
    /// between a pod's end and its collection, and never came back for it) as old as the TTL.
    fn sweep(&self) -> io::Result<usize> {
        let runs = sweep_tree(&self.mount.join("runs"), self.store.config.ttl)?;
        Ok(self.store.sweep()? + runs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;
    use std::os::unix::fs::symlink;

    fn read(mut f: File) -> Vec<u8> {
        let mut v = Vec::new();
        f.read_to_end(&mut v).unwrap();
        v
    }

    fn roomy() -> SinkConfig {
        SinkConfig { min_free_bytes: 0, min_free_percent: 0, ..SinkConfig::default() }
    }

    #[test]
    fn names_and_sub_paths_are_plain() {
        assert!(is_artifact_name("a/b.txt"));
        for bad in ["", "/etc/passwd", "a//b", "a/../b", "./a", "a/", "a\0b"] {
            assert!(!is_artifact_name(bad), "{bad:?}");
        }
        let id = Uuid::nil();
        assert_eq!(run_sub_path("acme", id).unwrap(), format!("runs/acme/{id}"));
        assert_eq!(run_sub_path("../x", id), None);
    }

    #[test]
    fn the_data_dir_sink_stores_opens_and_removes_by_recorded_name() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(src.join("d")).unwrap();
        fs::write(src.join("d/f.txt"), b"hello").unwrap();
        let sink = DataDirSink::new(tmp.path().to_path_buf(), roomy());
        let id = Uuid::new_v4();
        let got = sink.collect("acme", id, &src, u64::MAX);
        assert_eq!(got.artifacts.len(), 1, "{got:?}");
        assert_eq!(read(sink.open("acme", id, "d/f.txt").unwrap()), b"hello");
        assert_eq!(sink.open("acme", id, "../x").unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(sink.open("globex", id, "d/f.txt").unwrap_err().kind(), io::ErrorKind::NotFound);
        sink.remove("acme", id).unwrap();
        assert_eq!(sink.open("acme", id, "d/f.txt").unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn a_pvc_run_is_prepared_writable_collected_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let sink = PvcSink::new(tmp.path().to_path_buf(), roomy());
        sink.check_owner(65532).unwrap();
        let id = Uuid::new_v4();
        sink.prepare_run("acme", id).unwrap();
        let dir = sink.run_dir("acme", id).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o777);
        // What a pod leaves: a file, a link out, and a directory it made unreadable.
        fs::write(dir.join("out.csv"), b"a,b\n").unwrap();
        symlink("/etc/passwd", dir.join("passwd")).unwrap();
        fs::create_dir(dir.join("locked")).unwrap();
        fs::write(dir.join("locked/f"), b"x").unwrap();
        fs::set_permissions(dir.join("locked"), fs::Permissions::from_mode(0o000)).unwrap();
        let got = sink.collect_run("acme", id, u64::MAX);
        let names: Vec<_> = got.artifacts.iter().map(|a| a.name.as_str()).collect();
        // Root reads the locked directory anyway; the link is never followed.
        assert!(names.contains(&"out.csv") && !names.contains(&"passwd"), "{names:?}");
        assert!(!dir.exists(), "the run directory goes after collection");
        assert_eq!(read(sink.open("acme", id, "out.csv").unwrap()), b"a,b\n");
        // A second attempt starts from an empty directory.
        sink.prepare_run("acme", id).unwrap();
        fs::write(dir.join("stale"), b"x").unwrap();
        sink.prepare_run("acme", id).unwrap();
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
        sink.discard_run("acme", id);
        assert!(!dir.exists());
    }

    #[test]
    fn the_pvc_quota_counts_what_other_processes_stored() {
        let tmp = tempfile::tempdir().unwrap();
        let one = PvcSink::new(tmp.path().to_path_buf(), roomy());
        let other = PvcSink::new(tmp.path().to_path_buf(), roomy());
        let run = |sink: &PvcSink, bytes: usize, quota: u64| {
            let id = Uuid::new_v4();
            sink.prepare_run("acme", id).unwrap();
            fs::write(sink.run_dir("acme", id).unwrap().join("f"), vec![1u8; bytes]).unwrap();
            sink.collect_run("acme", id, quota)
        };
        // `one` has counted the tenant's usage before `other` stores on the same claim.
        let first = run(&one, 100, u64::MAX);
        let second = run(&other, 20_000, u64::MAX);
        assert_eq!((first.artifacts.len(), second.artifacts.len()), (1, 1));
        let quota = first.stored_bytes + second.stored_bytes + 10_000;
        let refused = run(&one, 20_000, quota);
        assert!(refused.artifacts.is_empty(), "{refused:?}");
        assert!(refused.note.unwrap().contains("max_artifact_bytes"));
    }

    #[test]
    fn the_pvc_sweep_removes_expired_artifacts_and_forgotten_runs() {
        let tmp = tempfile::tempdir().unwrap();
        let config = SinkConfig { ttl: Duration::ZERO, ..roomy() };
        let sink = PvcSink::new(tmp.path().to_path_buf(), config);
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        sink.prepare_run("acme", a).unwrap();
        fs::write(sink.run_dir("acme", a).unwrap().join("f"), b"x").unwrap();
        sink.collect_run("acme", a, u64::MAX);
        sink.prepare_run("acme", b).unwrap();
        assert_eq!(sink.sweep().unwrap(), 2);
        assert!(!sink.run_dir("acme", b).unwrap().exists());
        assert_eq!(sink.open("acme", a, "f").unwrap_err().kind(), io::ErrorKind::NotFound);
    }
}
