//! Where per-task cgroups go, worked out from `/proc/self/mountinfo` and `/proc/self/cgroup`
//! text, and how to read their counters. No I/O here; the backend reads the files and writes
//! the limits.
//!
//! Task cgroups are created *under the service's own cgroup* in each hierarchy
//! (`<mount>/<own path>/agenttask/<owner pid>.<owner start>.<run>`, see [`task_name`]), so
//! whatever limits the operator put on the service also bound its tasks, and the service needs
//! no write access elsewhere.

use std::path::{Path, PathBuf};

/// The cgroup hierarchies usable for task cgroups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupHost {
    /// cgroup v1: one parent directory per controller (`None` where the controller is missing).
    V1 { memory: Option<PathBuf>, pids: Option<PathBuf>, cpu: Option<PathBuf> },
    /// cgroup v2: the parent directory in the unified hierarchy.
    V2 { parent: PathBuf },
    /// No cgroup file system at all: rlimits only.
    None,
}

/// Name of the directory under the service's cgroup that holds task cgroups.
pub const PARENT_NAME: &str = "agenttask";

struct Mount<'a> {
    root: &'a str,
    point: &'a str,
    fstype: &'a str,
    options: &'a str,
}

fn mounts(mountinfo: &str) -> impl Iterator<Item = Mount<'_>> {
    mountinfo.lines().filter_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        let pre: Vec<&str> = pre.split(' ').collect();
        let post: Vec<&str> = post.split(' ').collect();
        Some(Mount { root: pre.get(3)?, point: pre.get(4)?, fstype: post.first()?, options: post.get(2)? })
    })
}

/// The service's own path in the hierarchy that has `controller` (v1) or in the unified one
/// (`controller == ""`).
fn own_path<'a>(proc_self_cgroup: &'a str, controller: &str) -> Option<&'a str> {
    proc_self_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        let hit = if controller.is_empty() { ctrls.is_empty() } else { ctrls.split(',').any(|c| c == controller) };
        hit.then_some(path)
    })
}

fn join(point: &str, mount_root: &str, path: &str) -> PathBuf {
    // Inside a cgroup namespace or a container the mount's root may be a sub-path.
    let rel = path.strip_prefix(mount_root).unwrap_or(path).trim_start_matches('/');
    let mut p = PathBuf::from(point);
    if !rel.is_empty() {
        p.push(rel);
    }
    p.push(PARENT_NAME);
    p
}

/// Works out where task cgroups go. v1 wins when its memory controller is mounted (on hybrid
/// hosts the unified hierarchy then has no memory controller).
pub fn detect(mountinfo: &str, proc_self_cgroup: &str) -> CgroupHost {
    let v1 = |controller: &str| {
        mounts(mountinfo)
            .find(|m| m.fstype == "cgroup" && m.options.split(',').any(|o| o == controller))
            .and_then(|m| own_path(proc_self_cgroup, controller).map(|p| join(m.point, m.root, p)))
    };
    let memory = v1("memory");
    if memory.is_some() {
        return CgroupHost::V1 { memory, pids: v1("pids"), cpu: v1("cpu") };
    }
    if let Some(m) = mounts(mountinfo).find(|m| m.fstype == "cgroup2") {
        if let Some(p) = own_path(proc_self_cgroup, "") {
            return CgroupHost::V2 { parent: join(m.point, m.root, p) };
        }
    }
    CgroupHost::None
}

/// A task's cgroup directory under a parent.
pub fn task_dir(parent: &Path, task_id: &str) -> PathBuf {
    parent.join(task_id)
}

/// The service process that owns a task cgroup: its pid and its start time (field 22 of
/// `/proc/<pid>/stat`, clock ticks since boot), so a recycled pid is not mistaken for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub start_ticks: u64,
}

/// A task cgroup's name: `<owner pid>.<owner start>.<run name>`. Several service processes
/// share one parent cgroup (the service's own); the owner in the name lets a starting process
/// remove only the cgroups of owners that are gone, never a live neighbour's.
pub fn task_name(owner: Owner, run: &str) -> String {
    format!("{}.{}.{run}", owner.pid, owner.start_ticks)
}

/// The owner encoded in a task cgroup's name, if it is one of ours.
pub fn owner_of(name: &str) -> Option<Owner> {
    let mut parts = name.splitn(3, '.');
    let pid = parts.next()?.parse().ok()?;
    let start_ticks = parts.next()?.parse().ok()?;
    parts.next().filter(|r| !r.is_empty())?;
    Some(Owner { pid, start_ticks })
}

/// The start time (field 22) in a `/proc/<pid>/stat` line. The command name (field 2) may hold
/// spaces and parentheses, so fields are counted after its last `)`.
pub fn start_ticks(proc_pid_stat: &str) -> Option<u64> {
    let rest = &proc_pid_stat[proc_pid_stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// A `key value` counter from `memory.oom_control` (v1) or `memory.events` (v2).
pub fn counter(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// PIDs listed in a `cgroup.procs` file.
pub fn pids(text: &str) -> Vec<i32> {
    text.lines().filter_map(|l| l.trim().parse().ok()).filter(|&p: &i32| p > 0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // From this project's CI machine: cgroup v1 controllers plus an empty unified hierarchy.
    const MOUNTINFO_V1: &str = "\
24 1 254:0 / / rw,relatime - ext4 /dev/vda rw
30 24 0:26 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
32 30 0:28 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 30 0:30 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
38 30 0:34 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 30 0:36 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const SELF_V1: &str = "\
8:pids:/
4:memory:/process_api/9409b305
1:cpu:/
0::/
";

    #[test]
    fn v1_with_our_nested_memory_cgroup() {
        assert_eq!(
            detect(MOUNTINFO_V1, SELF_V1),
            CgroupHost::V1 {
                memory: Some("/sys/fs/cgroup/memory/process_api/9409b305/agenttask".into()),
                pids: Some("/sys/fs/cgroup/pids/agenttask".into()),
                cpu: Some("/sys/fs/cgroup/cpu/agenttask".into()),
            }
        );
    }

    #[test]
    fn v1_with_combined_cpu_cpuacct() {
        let mi = "31 30 0:27 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n34 30 0:30 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        let sc = "3:cpu,cpuacct:/svc\n2:memory:/svc\n";
        match detect(mi, sc) {
            CgroupHost::V1 { cpu, pids, .. } => {
                assert_eq!(cpu, Some("/sys/fs/cgroup/cpu,cpuacct/svc/agenttask".into()));
                assert_eq!(pids, None);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn v2_unified() {
        let mi = "30 24 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        let sc = "0::/system.slice/agenttask.service\n";
        assert_eq!(
            detect(mi, sc),
            CgroupHost::V2 { parent: "/sys/fs/cgroup/system.slice/agenttask.service/agenttask".into() }
        );
        // Inside a cgroup namespace the mount root is the namespace root.
        let mi = "30 24 0:26 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(detect(mi, "0::/kubepods/pod1/c\n"), CgroupHost::V2 { parent: "/sys/fs/cgroup/c/agenttask".into() });
    }

    #[test]
    fn none() {
        assert_eq!(detect("24 1 254:0 / / rw - ext4 /dev/vda rw\n", "0::/\n"), CgroupHost::None);
    }

    #[test]
    fn owners_round_trip_and_foreign_names_are_ignored() {
        let o = Owner { pid: 4242, start_ticks: 123456 };
        let name = task_name(o, "5f1c-task-ab12cd34");
        assert_eq!(name, "4242.123456.5f1c-task-ab12cd34");
        assert_eq!(owner_of(&name), Some(o));
        for foreign in ["5f1c-task-ab12cd34", "4242.x.run", "4242.1.", "a.1.run", ""] {
            assert_eq!(owner_of(foreign), None, "{foreign:?}");
        }
    }

    #[test]
    fn start_ticks_skips_a_command_with_spaces_and_parentheses() {
        let stat = "77 (we (ird) name) S 1 77 77 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(start_ticks(stat), Some(987654));
        assert_eq!(start_ticks("garbage"), None);
    }

    #[test]
    fn counters_and_pids() {
        assert_eq!(counter("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n", "oom_kill"), Some(3));
        assert_eq!(counter("low 0\nhigh 0\nmax 5\noom 1\noom_kill 1\n", "oom_kill"), Some(1));
        assert_eq!(counter("oom_kill_disable 0\n", "oom_kill"), None);
        assert_eq!(pids("12\n345\n\n"), vec![12, 345]);
    }
}
