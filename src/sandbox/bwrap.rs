//! The bubblewrap command line for one task, as data.
//!
//! Everything except the runtime's own argv goes into a NUL-separated blob that bubblewrap reads
//! with `--args FD`: the task's environment (which may hold the tenant's secrets) then never shows
//! in `/proc/<pid>/cmdline` on the host, and the host's argv length limit does not apply.
//!
//! # The sandbox's file system
//!
//! ```text
//! /               empty tmpfs made by bwrap, remounted read-only at the end
//! /usr            host /usr, read-only (the runtimes and their libraries)
//! /bin /lib ...   symlinks into /usr, or read-only binds where the host has real directories
//! /etc/...        only what the runtimes read: ld.so.cache, localtime, alternatives (R's BLAS),
//!                 R's config dir; plus a synthetic passwd, group and hosts
//! /proc           a new procfs for the task's pid namespace; host-wide information files masked
//!                 as container runtimes do (see [`HostLayout::MASKED_PROC_FILES`])
//! /dev            bwrap's minimal /dev (null, zero, full, random, urandom, tty) and no ptys:
//!                 an empty read-only directory hides /dev/pts, so /dev/ptmx leads nowhere
//! /dev/shm        on the task's scratch
//! /work           working directory and $HOME, writable (scratch); input files and the code
//!                 file are read-only binds inside it
//! /tmp            writable (scratch)
//! /agenttask      writable (scratch): result.json and artifacts/
//! ```
//!
//! "Scratch" is one per-task directory on the host (see [`ScratchLayout`]) that the backend
//! mounts as a size- and inode-capped tmpfs where it can, so everything the task writes shares
//! one cap.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Where things are inside the sandbox.
pub mod inside {
    pub const WORK_DIR: &str = "/work";
    pub const TMP_DIR: &str = "/tmp";
    pub const OUT_DIR: &str = "/agenttask";
    pub const ARTIFACTS_DIR: &str = "/agenttask/artifacts";
    pub const RESULT_FILE: &str = "/agenttask/result.json";
    pub const HOSTNAME: &str = "agenttask";
}

/// How the host's top-level directories are reproduced in the sandbox root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootEntry {
    /// `/bin -> usr/bin` on a merged-/usr system: recreate the symlink.
    Symlink { path: PathBuf, target: PathBuf },
    /// A real directory (e.g. `/lib64` on older systems): bind it read-only.
    Dir(PathBuf),
}

/// What of the host the sandbox sees; detected once when the backend starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostLayout {
    /// `/bin`, `/lib`, `/lib64`, `/sbin`, ... as found on the host.
    pub root_entries: Vec<RootEntry>,
    /// Individual paths under `/etc` bound read-only if they exist (`--ro-bind-try`).
    pub etc_paths: Vec<PathBuf>,
    /// Extra read-only binds (same path inside), e.g. a runtime installed outside /usr.
    pub extra_ro_binds: Vec<PathBuf>,
    /// Entries of the host's `/proc` hidden in the sandbox's procfs (only those that exist:
    /// bubblewrap cannot create a mount point inside procfs).
    pub proc_masks: Vec<ProcMask>,
}

/// One `/proc` entry hidden from tasks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcMask {
    /// A file: an empty read-only file is bound over it (reads return nothing).
    File(PathBuf),
    /// A directory: an empty read-only directory is bound over it.
    Dir(PathBuf),
}

impl HostLayout {
    /// The top-level names worth reproducing, in the order they are checked.
    pub const ROOT_CANDIDATES: &'static [&'static str] = &["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"];

    /// `/proc` files that show the host rather than the task: the boot command line (with the
    /// hypervisor's settings and vsock ports), kernel config, physical memory and I/O maps,
    /// keyrings, timers, scheduler, interrupt and memory-zone statistics, disks and their
    /// activity, swap, host-wide file locks. The list follows runc's and Docker's masked paths
    /// plus the host-information files they leave readable. Only those that exist and that
    /// others may read are masked (the rest the sandbox user cannot read anyway): each mask is a
    /// mount and costs bubblewrap about 0.2 ms. `/proc/cpuinfo`, `/proc/meminfo`, `/proc/stat`,
    /// `/proc/loadavg` and `/proc/uptime` stay readable: runtimes and libraries read them.
    pub const MASKED_PROC_FILES: &'static [&'static str] = &[
        "/proc/cmdline",
        "/proc/config.gz",
        "/proc/iomem",
        "/proc/ioports",
        "/proc/keys",
        "/proc/key-users",
        "/proc/kcore",
        "/proc/timer_list",
        "/proc/timer_stats",
        "/proc/sched_debug",
        "/proc/latency_stats",
        "/proc/interrupts",
        "/proc/softirqs",
        "/proc/vmallocinfo",
        "/proc/slabinfo",
        "/proc/pagetypeinfo",
        "/proc/zoneinfo",
        "/proc/buddyinfo",
        "/proc/kpagecount",
        "/proc/kpageflags",
        "/proc/kpagecgroup",
        "/proc/partitions",
        "/proc/diskstats",
        "/proc/swaps",
        "/proc/locks",
        "/proc/sysrq-trigger",
    ];

    /// `/proc` directories hidden the same way (ACPI, sound, SCSI, PCI and other buses, IRQs,
    /// drivers, file-system internals, host pressure-stall figures).
    pub const MASKED_PROC_DIRS: &'static [&'static str] = &[
        "/proc/acpi",
        "/proc/asound",
        "/proc/scsi",
        "/proc/bus",
        "/proc/irq",
        "/proc/driver",
        "/proc/fs",
        "/proc/pressure",
    ];

    /// The `/etc` entries Python and R need: the dynamic loader cache, the time zone, Debian's
    /// alternatives symlinks (R's BLAS/LAPACK go through them) and R's configuration directory.
    pub fn default_etc_paths() -> Vec<PathBuf> {
        ["/etc/ld.so.cache", "/etc/localtime", "/etc/alternatives", "/etc/R"].iter().map(PathBuf::from).collect()
    }
}

/// The per-task scratch directory on the host and its fixed sub-directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScratchLayout {
    root: PathBuf,
}

impl ScratchLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// The task's input files and code file, read-only; nothing else, so that every valid input
    /// name is free.
    pub fn inputs(&self) -> PathBuf {
        self.root.join("in")
    }
    /// The service's own read-only material: synthetic /etc files and the empty file and
    /// directory used to mask /proc entries and /dev/pts.
    pub fn internal(&self) -> PathBuf {
        self.root.join("sys")
    }
    pub fn work(&self) -> PathBuf {
        self.root.join("work")
    }
    pub fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }
    pub fn shm(&self) -> PathBuf {
        self.root.join("shm")
    }
    pub fn out(&self) -> PathBuf {
        self.root.join("out")
    }
    /// Relative to [`Self::out`].
    pub const ARTIFACTS: &'static str = "artifacts";
    /// Relative to [`Self::out`].
    pub const RESULT_FILE: &'static str = "result.json";
    /// Synthetic `/etc` files, relative to [`Self::internal`].
    pub const ETC_PASSWD: &'static str = "passwd";
    pub const ETC_GROUP: &'static str = "group";
    pub const ETC_HOSTS: &'static str = "hosts";
    /// An empty regular file, relative to [`Self::internal`].
    pub const EMPTY_FILE: &'static str = "empty";
    /// An empty directory, relative to [`Self::internal`].
    pub const EMPTY_DIR: &'static str = "empty.d";
}

/// The synthetic `/etc/passwd`, `/etc/group` and `/etc/hosts` contents: enough for `getpwuid`
/// (R's `Sys.info()`, Python's `getpass`) and for `localhost` to resolve without DNS.
pub fn synthetic_etc(uid: u32, gid: u32) -> [(&'static str, String); 3] {
    [
        (
            ScratchLayout::ETC_PASSWD,
            format!("sandbox:x:{uid}:{gid}:AgentTask sandbox:{}:/usr/sbin/nologin\n", inside::WORK_DIR),
        ),
        (ScratchLayout::ETC_GROUP, format!("sandbox:x:{gid}:\n")),
        (ScratchLayout::ETC_HOSTS, "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n".to_string()),
    ]
}

/// Why a plan cannot be turned into arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    /// An argument, environment entry or file name contains a NUL byte.
    Nul(&'static str),
    /// An input file name that is not a plain name.
    BadFileName(String),
}

impl std::fmt::Display for PlanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlanError::Nul(what) => write!(f, "{what} contains a NUL byte"),
            PlanError::BadFileName(name) => {
                write!(f, "input file name {name:?} is not a plain file name")
            }
        }
    }
}

impl std::error::Error for PlanError {}

/// Everything needed to build one bubblewrap invocation.
#[derive(Debug, Clone)]
pub struct BwrapPlan<'a> {
    pub host: &'a HostLayout,
    pub scratch: &'a ScratchLayout,
    /// Names of files in [`ScratchLayout::inputs`] to bind read-only at `/work/<name>`
    /// (the task's input files and the code file).
    pub work_files: Vec<String>,
    /// The task's environment, already merged (see [`sandbox_env`]).
    pub env: Vec<(String, String)>,
    /// Descriptor (in bwrap's process) holding the seccomp program.
    pub seccomp_fd: i32,
    /// The runtime and its arguments (executed inside the sandbox).
    pub command: Vec<OsString>,
}

/// A plain input-file name: non-empty, no `/`, not `.`/`..`, no NUL.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

impl BwrapPlan<'_> {
    /// The options (everything before the command), in the order bubblewrap applies them.
    pub fn options(&self) -> Result<Vec<OsString>, PlanError> {
        let mut a: Vec<OsString> = Vec::with_capacity(64 + 3 * self.work_files.len() + 3 * self.env.len());
        let mut push = |items: &[&dyn AsRef<std::ffi::OsStr>]| {
            for i in items {
                a.push(i.as_ref().to_os_string());
            }
        };
        // Namespaces: user, pid, net, ipc, uts, cgroup. No network at all (only a down-then-up `lo`
        // in a fresh namespace); nested user namespaces disabled; dies with the service.
        push(&[&"--unshare-all", &"--unshare-user", &"--disable-userns"]);
        push(&[&"--die-with-parent", &"--new-session", &"--cap-drop", &"ALL"]);
        push(&[&"--hostname", &inside::HOSTNAME]);

        push(&[&"--ro-bind", &"/usr", &"/usr"]);
        for entry in &self.host.root_entries {
            match entry {
                RootEntry::Symlink { path, target } => push(&[&"--symlink", target, path]),
                RootEntry::Dir(path) => push(&[&"--ro-bind", path, path]),
            }
        }
        for path in &self.host.etc_paths {
            push(&[&"--ro-bind-try", path, path]);
        }
        for path in &self.host.extra_ro_binds {
            push(&[&"--ro-bind", path, path]);
        }
        let inputs = self.scratch.inputs();
        let internal = self.scratch.internal();
        for (name, dest) in [
            (ScratchLayout::ETC_PASSWD, "/etc/passwd"),
            (ScratchLayout::ETC_GROUP, "/etc/group"),
            (ScratchLayout::ETC_HOSTS, "/etc/hosts"),
        ] {
            push(&[&"--ro-bind", &internal.join(name), &dest]);
        }
        push(&[&"--proc", &"/proc", &"--dev", &"/dev"]);
        let empty_file = internal.join(ScratchLayout::EMPTY_FILE);
        let empty_dir = internal.join(ScratchLayout::EMPTY_DIR);
        for mask in &self.host.proc_masks {
            match mask {
                ProcMask::File(path) => push(&[&"--ro-bind", &empty_file, path]),
                ProcMask::Dir(path) => push(&[&"--ro-bind", &empty_dir, path]),
            }
        }
        // No ptys: each devpts instance draws from the host-wide kernel.pty.max pool, and
        // bubblewrap's has no per-instance `max=`. With /dev/pts hidden, /dev/ptmx dangles.
        push(&[&"--ro-bind", &empty_dir, &"/dev/pts"]);
        push(&[&"--bind", &self.scratch.shm(), &"/dev/shm"]);

        push(&[&"--bind", &self.scratch.work(), &inside::WORK_DIR]);
        for name in &self.work_files {
            if !is_plain_name(name) {
                return Err(PlanError::BadFileName(name.clone()));
            }
            let dest = Path::new(inside::WORK_DIR).join(name);
            push(&[&"--ro-bind", &inputs.join(name), &dest]);
        }
        push(&[&"--bind", &self.scratch.tmp(), &inside::TMP_DIR]);
        push(&[&"--bind", &self.scratch.out(), &inside::OUT_DIR]);
        // Nothing may be created next to /usr, /etc, ...: the root tmpfs and /dev become read-only.
        push(&[&"--remount-ro", &"/", &"--remount-ro", &"/dev"]);
        push(&[&"--chdir", &inside::WORK_DIR]);

        push(&[&"--clearenv"]);
        for (k, v) in &self.env {
            push(&[&"--setenv", k, v]);
        }
        let fd = self.seccomp_fd.to_string();
        push(&[&"--seccomp", &fd]);
        Ok(a)
    }

    /// The NUL-separated options blob for `--args FD`.
    pub fn options_blob(&self) -> Result<Vec<u8>, PlanError> {
        let mut blob = Vec::new();
        for opt in self.options()? {
            if opt.as_bytes().contains(&0) {
                return Err(PlanError::Nul("a sandbox argument or environment entry"));
            }
            blob.extend_from_slice(opt.as_bytes());
            blob.push(0);
        }
        Ok(blob)
    }

    /// bubblewrap's own argv after the program name: `--args FD -- command...`.
    pub fn argv(&self, args_fd: i32) -> Result<Vec<OsString>, PlanError> {
        let mut argv = vec![OsString::from("--args"), OsString::from(args_fd.to_string()), OsString::from("--")];
        for part in &self.command {
            if part.as_bytes().contains(&0) {
                return Err(PlanError::Nul("a program argument"));
            }
            argv.push(part.clone());
        }
        Ok(argv)
    }
}

/// The child's whole environment: the task's own variables, then ours, which win (`HOME`,
/// `PATH`, `LANG`, `TMPDIR` and the `AGENTTASK_*` names). Nothing of the service's environment.
pub fn sandbox_env(task_env: &std::collections::BTreeMap<String, String>, task_id: &str) -> Vec<(String, String)> {
    let ours = [
        ("PATH", "/usr/local/bin:/usr/bin:/bin"),
        ("HOME", inside::WORK_DIR),
        ("LANG", "C.UTF-8"),
        ("TMPDIR", inside::TMP_DIR),
        ("AGENTTASK_RESULT_FILE", inside::RESULT_FILE),
        ("AGENTTASK_ARTIFACTS_DIR", inside::ARTIFACTS_DIR),
        ("AGENTTASK_TASK_ID", task_id),
    ];
    let mut env: Vec<(String, String)> = task_env
        .iter()
        .filter(|(k, _)| !ours.iter().any(|(o, _)| o == k) && !k.starts_with("AGENTTASK_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    env.extend(ours.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn host() -> HostLayout {
        HostLayout {
            root_entries: vec![
                RootEntry::Symlink { path: "/bin".into(), target: "usr/bin".into() },
                RootEntry::Dir("/lib64".into()),
            ],
            etc_paths: HostLayout::default_etc_paths(),
            extra_ro_binds: vec![],
            proc_masks: vec![ProcMask::File("/proc/cmdline".into()), ProcMask::Dir("/proc/acpi".into())],
        }
    }

    fn plan<'a>(host: &'a HostLayout, scratch: &'a ScratchLayout) -> BwrapPlan<'a> {
        BwrapPlan {
            host,
            scratch,
            work_files: vec!["data.csv".into(), "main.py".into()],
            env: vec![("A".into(), "1".into())],
            seccomp_fd: 7,
            command: vec!["/usr/bin/python3".into(), "-I".into(), "-B".into(), "main.py".into()],
        }
    }

    fn strings(v: Vec<OsString>) -> Vec<String> {
        v.into_iter().map(|s| s.into_string().unwrap()).collect()
    }

    fn has_seq(hay: &[String], needle: &[&str]) -> bool {
        hay.windows(needle.len()).any(|w| w.iter().zip(needle).all(|(a, b)| a == b))
    }

    #[test]
    fn isolation_flags_are_present() {
        let (h, s) = (host(), ScratchLayout::new("/d/run/t"));
        let o = strings(plan(&h, &s).options().unwrap());
        for seq in [
            &["--unshare-all"][..],
            &["--unshare-user"],
            &["--disable-userns"],
            &["--die-with-parent"],
            &["--new-session"],
            &["--cap-drop", "ALL"],
            &["--clearenv"],
            &["--seccomp", "7"],
            &["--proc", "/proc"],
            &["--dev", "/dev"],
            &["--chdir", "/work"],
            &["--remount-ro", "/"],
        ] {
            assert!(has_seq(&o, seq), "missing {seq:?} in {o:?}");
        }
        assert!(!o.iter().any(|a| a == "--share-net"));
    }

    #[test]
    fn only_whitelisted_host_paths_are_bound() {
        let (h, s) = (host(), ScratchLayout::new("/d/run/t"));
        let o = strings(plan(&h, &s).options().unwrap());
        let mut sources = vec![];
        for (i, a) in o.iter().enumerate() {
            if a == "--ro-bind" || a == "--bind" || a == "--ro-bind-try" || a == "--dev-bind" {
                sources.push(o[i + 1].clone());
            }
        }
        for src in &sources {
            let ok = src == "/usr"
                || src == "/lib64"
                || src.starts_with("/proc/")
                || src.starts_with("/etc/")
                || src.starts_with("/d/run/t/");
            assert!(ok, "unexpected host path bound: {src}");
        }
        for forbidden in ["/", "/root", "/home", "/var", "/work", "/tmp", "/etc"] {
            assert!(!sources.iter().any(|s| s == forbidden), "{forbidden} must not be bound");
        }
        assert!(!o.iter().any(|a| a == "--dev-bind"));
    }

    #[test]
    fn inputs_are_read_only_in_the_working_dir() {
        let (h, s) = (host(), ScratchLayout::new("/d/run/t"));
        let o = strings(plan(&h, &s).options().unwrap());
        assert!(has_seq(&o, &["--ro-bind", "/d/run/t/in/data.csv", "/work/data.csv"]));
        assert!(has_seq(&o, &["--bind", "/d/run/t/work", "/work"]));
        assert!(has_seq(&o, &["--bind", "/d/run/t/out", "/agenttask"]));
        assert!(has_seq(&o, &["--symlink", "usr/bin", "/bin"]));
        // The inputs are bound after /work itself, or they would be hidden by it.
        let work = o.iter().position(|a| a == "/d/run/t/work").unwrap();
        let data = o.iter().position(|a| a == "/d/run/t/in/data.csv").unwrap();
        assert!(work < data);
    }

    #[test]
    fn bad_names_and_nul_bytes_are_refused() {
        let (h, s) = (host(), ScratchLayout::new("/d/run/t"));
        let mut p = plan(&h, &s);
        p.work_files.push("../etc".into());
        assert!(matches!(p.options(), Err(PlanError::BadFileName(_))));
        let mut p = plan(&h, &s);
        p.env.push(("B".into(), "x\0y".into()));
        assert!(matches!(p.options_blob(), Err(PlanError::Nul(_))));
        let mut p = plan(&h, &s);
        p.command.push("a\0b".into());
        assert!(p.argv(3).is_err());
    }

    #[test]
    fn blob_is_nul_separated_and_argv_keeps_the_command_out_of_it() {
        let (h, s) = (host(), ScratchLayout::new("/d/run/t"));
        let p = plan(&h, &s);
        let blob = p.options_blob().unwrap();
        assert_eq!(*blob.last().unwrap(), 0);
        assert_eq!(blob.iter().filter(|&&b| b == 0).count(), p.options().unwrap().len());
        assert!(!blob.windows(4).any(|w| w == b"-I\0-"));
        assert_eq!(strings(p.argv(9).unwrap()), ["--args", "9", "--", "/usr/bin/python3", "-I", "-B", "main.py"]);
    }

    #[test]
    fn env_is_the_tasks_plus_ours_and_ours_win() {
        let mut task = BTreeMap::new();
        task.insert("FOO".to_string(), "bar".to_string());
        task.insert("HOME".to_string(), "/root".to_string());
        task.insert("AGENTTASK_RESULT_FILE".to_string(), "/etc/passwd".to_string());
        let env = sandbox_env(&task, "t-1");
        let get = |k: &str| env.iter().filter(|(n, _)| n == k).map(|(_, v)| v.as_str()).collect::<Vec<_>>();
        assert_eq!(get("FOO"), ["bar"]);
        assert_eq!(get("HOME"), ["/work"]);
        assert_eq!(get("AGENTTASK_RESULT_FILE"), ["/agenttask/result.json"]);
        assert_eq!(get("AGENTTASK_TASK_ID"), ["t-1"]);
        assert_eq!(get("LANG"), ["C.UTF-8"]);
        assert_eq!(env.len(), 8);
    }

    #[test]
    fn proc_entries_are_masked_and_there_are_no_ptys() {
        let (h, s) = (host(), ScratchLayout::new("/d/run/t"));
        let o = strings(plan(&h, &s).options().unwrap());
        assert!(has_seq(&o, &["--ro-bind", "/d/run/t/sys/empty", "/proc/cmdline"]));
        assert!(has_seq(&o, &["--ro-bind", "/d/run/t/sys/empty.d", "/proc/acpi"]));
        assert!(has_seq(&o, &["--ro-bind", "/d/run/t/sys/empty.d", "/dev/pts"]));
        // Masks come after the procfs and /dev they cover.
        let proc = o.iter().position(|a| a == "--proc").unwrap();
        let mask = o.iter().position(|a| a == "/proc/cmdline").unwrap();
        let pts = o.iter().position(|a| a == "/dev/pts").unwrap();
        let dev = o.iter().position(|a| a == "--dev").unwrap();
        assert!(proc < mask && dev < pts);
    }

    #[test]
    fn inputs_named_like_internal_files_do_not_collide() {
        let (h, s) = (host(), ScratchLayout::new("/d/run/t"));
        let mut p = plan(&h, &s);
        p.work_files = vec!["passwd".into(), ".etc-passwd".into(), "main.py".into()];
        let o = strings(p.options().unwrap());
        assert!(has_seq(&o, &["--ro-bind", "/d/run/t/sys/passwd", "/etc/passwd"]));
        assert!(has_seq(&o, &["--ro-bind", "/d/run/t/in/passwd", "/work/passwd"]));
        assert_ne!(s.inputs(), s.internal());
    }

    #[test]
    fn plain_names() {
        assert!(is_plain_name("a.csv"));
        for bad in ["", ".", "..", "a/b", "/x", "a\0"] {
            assert!(!is_plain_name(bad), "{bad:?}");
        }
    }
}
