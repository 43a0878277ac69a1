//! The `exec` kubelet: runs each container's command for real under bubblewrap, as the
//! unprivileged user `agenttask-sandbox`.
//!
//! Image names only choose the interpreter (nothing is pulled): a container without `command`
//! runs `python3` for a Python image and `R` for an R image; `python`, `python3`, `R` and
//! `Rscript` commands run the host's `/usr/bin` ones. The host's `/usr` is mounted read-only with
//! the few `/etc` files the runtimes read; `emptyDir` volumes are per-pod directories,
//! `configMap` (`data` and `binaryData`) and `secret` volumes are their files (read-only);
//! `persistentVolumeClaim` volumes are the claim's directory under `--pv-root` (`<root>/NS/NAME`,
//! shared by every pod mounting the claim, created root-owned as a provisioner would; the
//! scheduler does not bind a pod whose claim does not exist). A
//! `subPath` mounts that directory of the volume, created (root-owned, 0755, as the kubelet
//! does) when missing; one that leaves the volume (absolute, `..`, or through a symbolic
//! link) fails the container with `CreateContainerConfigError`. `env` (values, `fieldRef`,
//! `configMapKeyRef`, `secretKeyRef`, `envFrom`) and `$(VAR)` references in command and args are
//! resolved as the kubelet resolves them; `workingDir` is the working directory;
//! `terminationMessagePath` is a writable file whose content becomes `state.terminated.message`.
//! `resources.limits.memory` is a memory cgroup where the host allows one (the kernel OOM killer
//! then ends the container: exit 137, reason `OOMKilled`), else `RLIMIT_AS`;
//! `resources.limits.cpu` is a CFS quota in a cpu cgroup where the host allows one. Output (stdout and
//! stderr) streams into the pod log as it is written. The network is not shared, except with a
//! pod that declares a `containerPort` (a server, e.g. agent-sandbox warm-pool pods' task agent):
//! it shares the host's network and its `podIP` is a loopback address of its own
//! ([`loopback_ip`]), so a client on the host reaches it at `podIP:port` as in a cluster. (No
//! NetworkPolicy is enforced: such a pod's processes can reach what the host can.)

use std::collections::BTreeMap;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;

use crate::api::App;
use crate::kubelet::{ids, terminated_state, RunEnd};

const BWRAP: &str = "/usr/bin/bwrap";
const SANDBOX_USER: &str = "agenttask-sandbox";

/// Parses a Kubernetes quantity (`256Mi`, `1G`, `1.5Gi`, `1e9`, `100m`) into bytes (rounded up).
pub fn quantity_bytes(q: &str) -> Option<u64> {
    let q = q.trim();
    let suffixes: [(&str, f64); 13] = [
        ("Ki", 1024f64),
        ("Mi", 1024f64.powi(2)),
        ("Gi", 1024f64.powi(3)),
        ("Ti", 1024f64.powi(4)),
        ("Pi", 1024f64.powi(5)),
        ("Ei", 1024f64.powi(6)),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
        ("m", 1e-3),
    ];
    for (s, mult) in suffixes {
        if let Some(n) = q.strip_suffix(s) {
            return n.parse::<f64>().ok().map(|n| (n * mult).ceil() as u64);
        }
    }
    q.parse::<f64>().ok().map(|n| n.ceil() as u64)
}

/// The argv a container runs: its command (or the image's interpreter) and args, with the host
/// interpreters substituted and `$(VAR)` references expanded.
pub fn container_argv(c: &Value, env: &BTreeMap<String, String>) -> Result<Vec<String>, String> {
    let strs = |v: &Value| -> Vec<String> {
        v.as_array().into_iter().flatten().filter_map(|s| s.as_str().map(String::from)).collect()
    };
    let mut argv = strs(&c["command"]);
    if argv.is_empty() {
        let image = c["image"].as_str().unwrap_or_default();
        let repo =
            image.rsplit('/').next().unwrap_or(image).split([':', '@']).next().unwrap_or_default().to_ascii_lowercase();
        argv = if repo.contains("python") {
            vec!["python3".into()]
        } else if repo == "r"
            || repo.starts_with("r-")
            || repo.contains("rocker")
            || repo.contains("rstudio")
            || repo.starts_with("r_")
        {
            vec!["R".into()]
        } else {
            return Err(format!(
                "kubesim exec: image {image:?} chooses no interpreter (Python or R) and the container has no command"
            ));
        };
    }
    argv.extend(strs(&c["args"]));
    let argv = argv.into_iter().map(|a| expand(&a, env)).collect::<Vec<_>>();
    let mut argv = argv;
    let first = argv[0].clone();
    argv[0] = match first.as_str() {
        "python" | "python3" => "/usr/bin/python3".into(),
        p if p.starts_with("python3.") => "/usr/bin/python3".into(),
        "R" => "/usr/bin/R".into(),
        "Rscript" => "/usr/bin/Rscript".into(),
        _ => first,
    };
    Ok(argv)
}

/// `$(VAR)` expansion as the kubelet does it: defined variables are replaced, `$$` escapes,
/// anything else stays as written.
pub fn expand(s: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(a) = after.strip_prefix('$') {
            out.push('$');
            rest = a;
        } else if let Some(inner) = after.strip_prefix('(').and_then(|a| a.find(')').map(|j| &a[..j])) {
            match env.get(inner) {
                Some(v) => out.push_str(v),
                None => out.push_str(&format!("$({inner})")),
            }
            rest = &after[inner.len() + 2..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn decode_secret(v: &Value) -> String {
    let bytes = base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap_or_default()).unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A container's environment, resolved against the pod and the namespace's ConfigMaps and Secrets.
fn resolve_env(app: &App, pod: &Value, c: &Value) -> Result<BTreeMap<String, String>, String> {
    let inner = app.lock();
    let ns = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let mut env = BTreeMap::new();
    for from in c["envFrom"].as_array().into_iter().flatten() {
        let prefix = from["prefix"].as_str().unwrap_or_default();
        let (key, r, secret) = if from["configMapRef"].is_object() {
            ("/configmaps", &from["configMapRef"], false)
        } else {
            ("/secrets", &from["secretRef"], true)
        };
        let name = r["name"].as_str().unwrap_or_default();
        match inner.get(key, ns, name) {
            Some(o) => {
                for (k, v) in o["data"].as_object().into_iter().flatten() {
                    let v = if secret { decode_secret(v) } else { v.as_str().unwrap_or_default().to_string() };
                    env.insert(format!("{prefix}{k}"), v);
                }
            }
            None if r["optional"] == true => {}
            None => return Err(format!("{} {name:?} not found", if secret { "secret" } else { "configmap" })),
        }
    }
    for e in c["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().unwrap_or_default().to_string();
        let vf = &e["valueFrom"];
        let value = if let Some(v) = e["value"].as_str() {
            expand(v, &env)
        } else if let Some(path) = vf["fieldRef"]["fieldPath"].as_str() {
            field_ref(pod, path)
        } else if vf["configMapKeyRef"].is_object() || vf["secretKeyRef"].is_object() {
            let secret = vf["secretKeyRef"].is_object();
            let r = if secret { &vf["secretKeyRef"] } else { &vf["configMapKeyRef"] };
            let obj =
                inner.get(if secret { "/secrets" } else { "/configmaps" }, ns, r["name"].as_str().unwrap_or_default());
            match obj.and_then(|o| o["data"].get(r["key"].as_str().unwrap_or_default())) {
                Some(v) if secret => decode_secret(v),
                Some(v) => v.as_str().unwrap_or_default().to_string(),
                None if r["optional"] == true => continue,
                None => {
                    return Err(format!(
                        "couldn't find key {} in {} {}",
                        r["key"],
                        if secret { "Secret" } else { "ConfigMap" },
                        r["name"]
                    ))
                }
            }
        } else {
            String::new()
        };
        env.insert(name, value);
    }
    Ok(env)
}

fn field_ref(pod: &Value, path: &str) -> String {
    let m = &pod["metadata"];
    let key_of = |p: &str, section: &str| {
        p.strip_prefix(&format!("metadata.{section}['")).and_then(|r| r.strip_suffix("']")).map(String::from)
    };
    let v = match path {
        "metadata.name" => &m["name"],
        "metadata.namespace" => &m["namespace"],
        "metadata.uid" => &m["uid"],
        "spec.nodeName" => &pod["spec"]["nodeName"],
        "spec.serviceAccountName" => &pod["spec"]["serviceAccountName"],
        "status.podIP" => &pod["status"]["podIP"],
        "status.hostIP" => &pod["status"]["hostIP"],
        p => {
            if let Some(k) = key_of(p, "labels") {
                &m["labels"][k]
            } else if let Some(k) = key_of(p, "annotations") {
                &m["annotations"][k]
            } else {
                &Value::Null
            }
        }
    };
    v.as_str().unwrap_or_default().to_string()
}

/// The user containers run as.
fn sandbox_ids() -> Option<(u32, u32)> {
    let name = CString::new(SANDBOX_USER).ok()?;
    // SAFETY: getpwnam returns a pointer into static storage or null; read at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return None;
    }
    // SAFETY: checked non-null above.
    Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

/// Where new cgroups of `controller` go: this process's own cgroup of that controller (v1), or
/// its unified cgroup (v2, `true`), if the controller is there.
fn cgroup_base(controller: &str) -> Option<(PathBuf, bool)> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctrl, path) = (parts.next()?, parts.next()?, parts.next()?);
        if ctrl.split(',').any(|c| c == controller) {
            let p = PathBuf::from(format!("/sys/fs/cgroup/{controller}{path}"));
            return p.is_dir().then_some((p, false));
        }
    }
    let v2 = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").ok()?;
    if v2.split_whitespace().any(|c| c == controller) {
        let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
        return Some((PathBuf::from(format!("/sys/fs/cgroup{path}")), true));
    }
    None
}

/// A container's cgroups (memory and cpu; one directory on cgroup v2), removed after it ends.
#[derive(Default)]
struct Cgroups {
    dirs: Vec<PathBuf>,
    /// The directory with the memory controller, and whether it is v2.
    memory: Option<(PathBuf, bool)>,
}

impl Cgroups {
    /// Creates what the host allows; a limit whose cgroup cannot be made is left to the caller.
    fn create(name: &str, memory: Option<u64>, cpu_millis: Option<u64>) -> Cgroups {
        let mut cg = Cgroups::default();
        let dir_for = |controller: &str, cg: &mut Cgroups| -> Option<(PathBuf, bool)> {
            let (base, v2) = cgroup_base(controller)?;
            let dir = base.join(name);
            if !cg.dirs.contains(&dir) {
                std::fs::create_dir(&dir).ok()?;
                cg.dirs.push(dir.clone());
            }
            Some((dir, v2))
        };
        if let Some(bytes) = memory {
            if let Some((dir, v2)) = dir_for("memory", &mut cg) {
                let file = if v2 { "memory.max" } else { "memory.limit_in_bytes" };
                if std::fs::write(dir.join(file), bytes.to_string()).is_ok() {
                    // Swap counts too where the host accounts for it.
                    if v2 {
                        let _ = std::fs::write(dir.join("memory.swap.max"), "0");
                    } else {
                        let _ = std::fs::write(dir.join("memory.memsw.limit_in_bytes"), bytes.to_string());
                    }
                    cg.memory = Some((dir, v2));
                }
            }
        }
        if let Some(millis) = cpu_millis.filter(|m| *m > 0) {
            if let Some((dir, v2)) = dir_for("cpu", &mut cg) {
                let period = 100_000u64;
                let quota = (millis * period / 1000).max(1000);
                if v2 {
                    let _ = std::fs::write(dir.join("cpu.max"), format!("{quota} {period}"));
                } else {
                    let _ = std::fs::write(dir.join("cpu.cfs_period_us"), period.to_string());
                    let _ = std::fs::write(dir.join("cpu.cfs_quota_us"), quota.to_string());
                }
            }
        }
        cg
    }

    /// The `cgroup.procs` files the child writes itself into before it runs anything.
    fn procs(&self) -> Vec<CString> {
        self.dirs
            .iter()
            .filter_map(|d| CString::new(d.join("cgroup.procs").as_os_str().as_encoded_bytes()).ok())
            .collect()
    }

    fn oom_killed(&self) -> bool {
        let Some((dir, v2)) = &self.memory else {
            return false;
        };
        let file = if *v2 { "memory.events" } else { "memory.oom_control" };
        std::fs::read_to_string(dir.join(file))
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    let mut it = l.split_whitespace();
                    (it.next() == Some("oom_kill")).then(|| it.next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0))
                })
            })
            .is_some_and(|n| n > 0)
    }

    /// Removes the cgroups once the killed processes have left them (that takes a moment).
    async fn remove(mut self) {
        for dir in std::mem::take(&mut self.dirs) {
            for _ in 0..100 {
                if std::fs::remove_dir(&dir).is_ok() || !dir.exists() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for dir in &self.dirs {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// CPU quantity in millicores (`500m`, `1`, `1.5`).
pub fn quantity_millis(q: &str) -> Option<u64> {
    let q = q.trim();
    match q.strip_suffix('m') {
        Some(m) => m.parse::<f64>().ok().map(|m| m.ceil() as u64),
        None => q.parse::<f64>().ok().map(|c| (c * 1000.0).ceil() as u64),
    }
}

/// The host's `/bin`, `/lib`, ... as bwrap arguments (symlinks recreated, directories bound).
fn root_entries() -> Vec<String> {
    let mut args = vec![];
    for p in ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"] {
        let path = Path::new(p);
        if let Ok(target) = std::fs::read_link(path) {
            args.extend(["--symlink".into(), target.to_string_lossy().into_owned(), p.into()]);
        } else if path.is_dir() {
            args.extend(["--ro-bind".into(), p.into(), p.into()]);
        }
    }
    args
}

/// One prepared volume: the host directory and whether it is mounted read-only.
struct Volume {
    host: PathBuf,
    read_only: bool,
}

/// Materializes the pod's volumes under `scratch`; Err names what is missing (the pod then stays
/// ContainerCreating, as with a failed mount).
fn prepare_volumes(
    app: &App,
    pod: &Value,
    scratch: &Path,
    ids: (u32, u32),
) -> Result<BTreeMap<String, Volume>, String> {
    let ns = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let mut out = BTreeMap::new();
    for v in pod["spec"]["volumes"].as_array().into_iter().flatten() {
        let name = v["name"].as_str().unwrap_or_default();
        let dir = scratch.join("vol").join(name);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let (source, key, secret) = if v["configMap"].is_object() {
            (&v["configMap"], "/configmaps", false)
        } else if v["secret"].is_object() {
            (&v["secret"], "/secrets", true)
        } else if v["emptyDir"].is_object() {
            chown(&dir, ids);
            out.insert(name.to_string(), Volume { host: dir, read_only: false });
            continue;
        } else if v["persistentVolumeClaim"].is_object() {
            let source = &v["persistentVolumeClaim"];
            let claim = source["claimName"].as_str().unwrap_or_default();
            let Some(root) = &app.pv_root else {
                return Err(format!("volume {name:?}: kubesim has no --pv-root, so claims cannot be mounted"));
            };
            if app.lock().get("/persistentvolumeclaims", ns, claim).is_none() {
                return Err(format!("persistentvolumeclaim {claim:?} not found"));
            }
            let host = root.join(ns).join(claim);
            std::fs::create_dir_all(&host).map_err(|e| format!("volume {name:?}: {e}"))?;
            out.insert(name.to_string(), Volume { host, read_only: source["readOnly"] == true });
            continue;
        } else {
            // Projected service account tokens, hostPath, ...: not provided.
            continue;
        };
        let obj_name = source[if secret { "secretName" } else { "name" }].as_str().unwrap_or_default();
        let Some(obj) = app.lock().get(key, ns, obj_name).cloned() else {
            if source["optional"] == true {
                out.insert(name.to_string(), Volume { host: dir, read_only: true });
                continue;
            }
            return Err(format!(
                "MountVolume.SetUp failed for volume {name:?} : {} {obj_name:?} not found",
                if secret { "secret" } else { "configmap" }
            ));
        };
        // A ConfigMap's files are its `data` (text) and its `binaryData` (base64) keys, as the
        // kubelet projects them; a Secret's `data` is base64.
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut data: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for (k, v) in obj["data"].as_object().into_iter().flatten() {
            let text = v.as_str().unwrap_or_default();
            let bytes = if secret { b64.decode(text).unwrap_or_default() } else { text.as_bytes().to_vec() };
            data.insert(k.clone(), bytes);
        }
        if !secret {
            for (k, v) in obj["binaryData"].as_object().into_iter().flatten() {
                data.insert(k.clone(), b64.decode(v.as_str().unwrap_or_default()).unwrap_or_default());
            }
        }
        let items: Vec<(String, String)> = match source["items"].as_array() {
            Some(items) => items
                .iter()
                .map(|i| {
                    (
                        i["key"].as_str().unwrap_or_default().to_string(),
                        i["path"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect(),
            None => data.keys().map(|k| (k.clone(), k.clone())).collect(),
        };
        for (k, path) in items {
            let Some(v) = data.get(&k) else { continue };
            if path.split('/').any(|p| p == ".." || p.is_empty()) {
                continue;
            }
            let file = dir.join(&path);
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
            }
            std::fs::write(&file, v).map_err(|e| e.to_string())?;
        }
        out.insert(name.to_string(), Volume { host: dir, read_only: true });
    }
    Ok(out)
}

fn chown(path: &Path, (uid, gid): (u32, u32)) {
    if let Ok(p) = CString::new(path.as_os_str().as_encoded_bytes()) {
        // SAFETY: a valid NUL-terminated path.
        unsafe { libc::chown(p.as_ptr(), uid, gid) };
    }
}

/// One container mount: where, the host directory, read-only.
type Mount = (String, PathBuf, bool);

/// The container's volume mounts as host directories, `subPath` resolved as the kubelet does:
/// below the volume, never through a symbolic link, created (root-owned, 0755) when missing.
fn container_mounts(c: &Value, volumes: &BTreeMap<String, Volume>) -> Result<Vec<Mount>, String> {
    let mut out = Vec::new();
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        let (Some(name), Some(path)) = (m["name"].as_str(), m["mountPath"].as_str()) else { continue };
        let Some(v) = volumes.get(name) else { continue };
        let ro = v.read_only || m["readOnly"] == true;
        let sub = m["subPath"].as_str().unwrap_or_default();
        if sub.is_empty() {
            out.push((path.to_string(), v.host.clone(), ro));
            continue;
        }
        let bad = |why: &str| format!("failed to prepare subPath for volumeMount {name:?}: {sub:?} {why}");
        if sub.starts_with('/') || sub.split('/').any(|p| p == "..") {
            return Err(bad("must be a relative path without '..'"));
        }
        let mut host = v.host.clone();
        for part in sub.split('/').filter(|p| !p.is_empty() && *p != ".") {
            host.push(part);
            match std::fs::symlink_metadata(&host) {
                Ok(meta) if meta.file_type().is_symlink() => return Err(bad("goes through a symbolic link")),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    use std::os::unix::fs::DirBuilderExt;
                    std::fs::DirBuilder::new().mode(0o755).create(&host).map_err(|e| bad(&e.to_string()))?;
                }
                Err(e) => return Err(bad(&e.to_string())),
            }
        }
        out.push((path.to_string(), host, ro));
    }
    Ok(out)
}

/// Whether a pod declares a `containerPort` (it serves something, so it gets a reachable IP).
pub fn serves_network(pod: &Value) -> bool {
    let declares = |key: &str| {
        pod["spec"][key]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["ports"].as_array().is_some_and(|p| p.iter().any(|p| p["containerPort"].as_i64().is_some())))
    };
    declares("containers") || declares("initContainers")
}

/// A loopback address of the pod's own, `127.A.B.C` from its uid (random, so emulators sharing a
/// host rarely collide; never `127.0.x.x`, the host's usual ones, nor a `.0` or `.255`).
pub fn loopback_ip(uid: &str) -> String {
    let h = uid.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3));
    let a = 1 + (h % 254) as u8;
    let b = ((h >> 8) % 256) as u8;
    let c = 1 + ((h >> 16) % 254) as u8;
    format!("127.{a}.{b}.{c}")
}

/// The bubblewrap arguments for one container.
fn bwrap_args(
    pod: &Value,
    c: &Value,
    mounts: &[Mount],
    term_file: &Path,
    env: &BTreeMap<String, String>,
    argv: &[String],
) -> Vec<String> {
    let mut a: Vec<String> =
        ["--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr"].iter().map(|s| s.to_string()).collect();
    if serves_network(pod) {
        a.insert(1, "--share-net".into());
    }
    a.extend(root_entries());
    for etc in ["/etc/ld.so.cache", "/etc/localtime", "/etc/alternatives", "/etc/R"] {
        a.extend(["--ro-bind-try".into(), etc.into(), etc.into()]);
    }
    a.extend(["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"].iter().map(|s| s.to_string()));
    let mut mounts: Vec<&Mount> = mounts.iter().collect();
    // Outer mounts first, so a mount nested in another volume's path lands on top of it.
    mounts.sort_by_key(|(p, _, _)| p.len());
    for (path, host, ro) in mounts {
        let flag = if *ro { "--ro-bind" } else { "--bind" };
        a.extend([flag.into(), host.to_string_lossy().into_owned(), path.clone()]);
    }
    let term_path = c["terminationMessagePath"].as_str().unwrap_or("/dev/termination-log");
    a.extend(["--bind".into(), term_file.to_string_lossy().into_owned(), term_path.into()]);
    let wd = c["workingDir"].as_str().filter(|w| !w.is_empty()).unwrap_or("/");
    if wd != "/" {
        a.extend(["--dir".into(), wd.into()]);
    }
    let pod_name = pod["metadata"]["name"].as_str().unwrap_or("pod");
    a.extend(["--hostname".into(), pod_name.chars().take(63).collect(), "--clearenv".into()]);
    let mut full_env: BTreeMap<String, String> = BTreeMap::new();
    full_env.insert("PATH".into(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    full_env.insert("HOME".into(), "/".into());
    full_env.insert("HOSTNAME".into(), pod_name.into());
    full_env.extend(env.clone());
    for (k, v) in full_env {
        a.extend(["--setenv".into(), k, v]);
    }
    a.extend(["--chdir".into(), wd.into(), "--".into()]);
    a.extend(argv.iter().cloned());
    a
}

async fn pump(app: Arc<App>, uid: String, container: String, r: impl AsyncRead + Unpin) {
    let mut r = BufReader::new(r);
    let mut line = Vec::new();
    loop {
        line.clear();
        match r.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => app.logs.write(&uid, &container, &String::from_utf8_lossy(&line)),
        }
    }
}

/// Runs one container; `stop` ends it early (deletion, deadline). Returns its `state.terminated`.
#[allow(clippy::too_many_arguments)]
async fn run_container(
    app: Arc<App>,
    pod: Value,
    c: Value,
    scratch: PathBuf,
    volumes: Arc<BTreeMap<String, Volume>>,
    ids: (u32, u32),
    run_start: String,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Value {
    let (_, _, uid) = crate::kubelet::ids(&pod);
    let cn = c["name"].as_str().unwrap_or_default().to_string();
    let fail = |app: &App, reason: &str, message: String| {
        app.logs.write(&uid, &cn, &format!("{message}\n"));
        terminated_state(app, &uid, &c, 128, reason, &run_start, Some(message))
    };
    let env = match resolve_env(&app, &pod, &c) {
        Ok(e) => e,
        Err(e) => return fail(&app, "CreateContainerConfigError", e),
    };
    let argv = match container_argv(&c, &env) {
        Ok(a) => a,
        Err(e) => return fail(&app, "StartError", e),
    };
    let mounts = match container_mounts(&c, &volumes) {
        Ok(m) => m,
        Err(e) => return fail(&app, "CreateContainerConfigError", e),
    };
    let term_file = scratch.join(format!("termination-{cn}"));
    if std::fs::write(&term_file, b"").is_err() {
        return fail(&app, "StartError", "cannot create the termination message file".into());
    }
    chown(&term_file, ids);
    let memory = c["resources"]["limits"]["memory"].as_str().and_then(quantity_bytes);
    let cpu = c["resources"]["limits"]["cpu"].as_str().and_then(quantity_millis);
    let cgroups = Cgroups::create(&format!("kubesim-{uid}-{cn}"), memory, cpu);
    let procs = cgroups.procs();
    // Without a memory cgroup, the address-space rlimit is the memory limit.
    let rlimit_as = if cgroups.memory.is_none() { memory.map(|m| m.saturating_add(256 << 20)) } else { None };
    let mut cmd = Command::new(BWRAP);
    cmd.args(bwrap_args(&pod, &c, &mounts, &term_file, &env, &argv))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let (uid_n, gid_n) = ids;
    // SAFETY: only async-signal-safe calls (setsid, open, write, close, setrlimit, setgroups,
    // setgid, setuid) on memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            for p in &procs {
                let fd = libc::open(p.as_ptr(), libc::O_WRONLY);
                if fd >= 0 {
                    let mut buf = [0u8; 20];
                    let mut n = libc::getpid() as u64;
                    let mut i = buf.len();
                    loop {
                        i -= 1;
                        buf[i] = b'0' + (n % 10) as u8;
                        n /= 10;
                        if n == 0 {
                            break;
                        }
                    }
                    libc::write(fd, buf[i..].as_ptr().cast(), buf.len() - i);
                    libc::close(fd);
                }
            }
            if let Some(limit) = rlimit_as {
                let r = libc::rlimit { rlim_cur: limit, rlim_max: limit };
                libc::setrlimit(libc::RLIMIT_AS, &r);
            }
            if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(gid_n) != 0 || libc::setuid(uid_n) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(ch) => ch,
        Err(e) => return fail(&app, "StartError", format!("cannot start bubblewrap: {e}")),
    };
    let pid = child.id().unwrap_or(0) as i32;
    let out = tokio::spawn(pump(app.clone(), uid.clone(), cn.clone(), child.stdout.take().unwrap()));
    let err = tokio::spawn(pump(app.clone(), uid.clone(), cn.clone(), child.stderr.take().unwrap()));
    let status = tokio::select! {
        s = child.wait() => s,
        _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => {
            // SAFETY: signalling the process group this child leads (setsid above).
            unsafe { libc::killpg(pid, libc::SIGKILL) };
            child.wait().await
        }
    };
    let _ = out.await;
    let _ = err.await;
    use std::os::unix::process::ExitStatusExt;
    // A signal shows as 128 + its number, as container runtimes report it.
    let code = match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => c as i64,
            (None, Some(sig)) => 128 + sig as i64,
            _ => 128,
        },
        Err(_) => 128,
    };
    let tail = app.logs.tail(&uid, &cn, 20, 4096);
    let oom = cgroups.oom_killed()
        || (rlimit_as.is_some()
            && code != 0
            && (tail.contains("MemoryError") || tail.contains("cannot allocate vector")));
    let (code, reason) = if oom {
        (137, "OOMKilled")
    } else if code == 0 {
        (0, "Completed")
    } else {
        (code, "Error")
    };
    let message = std::fs::read(&term_file).ok().map(|b| String::from_utf8_lossy(&b[..b.len().min(4096)]).into_owned());
    cgroups.remove().await;
    terminated_state(&app, &uid, &c, code, reason, &run_start, message)
}

/// Runs the pod's containers until they all exit, the deadline passes or deletion is asked for.
pub async fn run(app: &Arc<App>, pod: &Value, specs: &[Value], run_start: &str, remaining: Option<Duration>) -> RunEnd {
    let (ns, name, uid) = ids(pod);
    let Some(ids) = sandbox_ids() else {
        let t = specs
            .iter()
            .map(|c| {
                let m = format!(
                    "kubesim exec: the user {SANDBOX_USER} does not exist (deploy/local/install-sandbox.sh creates it)"
                );
                app.logs.write(&uid, c["name"].as_str().unwrap_or_default(), &format!("{m}\n"));
                terminated_state(app, &uid, c, 128, "StartError", run_start, Some(m))
            })
            .collect();
        return RunEnd::Exited(t);
    };
    let scratch = std::env::temp_dir().join("kubesim-exec").join(&uid);
    let _ = std::fs::create_dir_all(&scratch);
    let deadline = remaining.map(|d| tokio::time::Instant::now() + d);
    let volumes = loop {
        match prepare_volumes(app, pod, &scratch, ids) {
            Ok(v) => break Arc::new(v),
            Err(msg) => {
                crate::kubelet::warn_event(app, pod, "FailedMount", &msg);
                // Stuck in ContainerCreating until the object appears, the deadline or deletion.
                let wait_for = Duration::from_secs(2);
                let wait_for = deadline
                    .map_or(wait_for, |d| wait_for.min(d.saturating_duration_since(tokio::time::Instant::now())));
                if !crate::kubelet::wait_pod(app, &ns, &name, &uid, wait_for).await {
                    return RunEnd::Deleted;
                }
                if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                    return RunEnd::Deadline;
                }
            }
        }
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, c) in specs.iter().enumerate() {
        let fut = run_container(
            app.clone(),
            pod.clone(),
            c.clone(),
            scratch.clone(),
            volumes.clone(),
            ids,
            run_start.to_string(),
            stop_rx.clone(),
        );
        tasks.spawn(async move { (i, fut.await) });
    }
    let mut results: Vec<Option<Value>> = vec![None; specs.len()];
    let mut ended: Option<RunEnd> = None;
    let mut poll = tokio::time::interval(Duration::from_millis(50));
    while !tasks.is_empty() {
        let until_deadline = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = tasks.join_next() => {
                if let Some(Ok((i, t))) = r {
                    results[i] = Some(t);
                }
            }
            _ = until_deadline, if ended.is_none() => {
                ended = Some(RunEnd::Deadline);
                let _ = stop_tx.send(true);
            }
            _ = poll.tick(), if ended.is_none() => {
                let gone = app.lock().get("/pods", &ns, &name).is_none_or(|p| p["metadata"]["uid"] != uid.as_str() || !p["metadata"]["deletionTimestamp"].is_null());
                if gone {
                    ended = Some(RunEnd::Deleted);
                    let _ = stop_tx.send(true);
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    match ended {
        Some(e) => e,
        None => RunEnd::Exited(results.into_iter().map(|r| r.unwrap_or(Value::Null)).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_pods_declaring_a_port_get_a_loopback_ip_and_the_network() {
        let server = serde_json::json!({"spec": {"containers": [{"name": "a", "ports": [{"containerPort": 8470}]}]}});
        let task = serde_json::json!({"spec": {"containers": [{"name": "a"}]}});
        assert!(serves_network(&server) && !serves_network(&task));
        let mounts: Vec<Mount> = vec![];
        let args =
            |p: &Value| bwrap_args(p, &p["spec"]["containers"][0], &mounts, Path::new("/t"), &BTreeMap::new(), &[]);
        assert_eq!(&args(&server)[..2], ["--unshare-all", "--share-net"]);
        assert!(!args(&task).contains(&"--share-net".to_string()));
        let ip = loopback_ip("6f1c1f0e-1111-4222-8333-444455556666");
        let parts: Vec<u8> = ip.split('.').map(|p| p.parse().unwrap()).collect();
        assert_eq!(parts[0], 127);
        assert!(parts[1] != 0 && parts[3] != 0 && parts[3] != 255, "{ip}");
        assert_ne!(ip, loopback_ip("6f1c1f0e-1111-4222-8333-444455556667"));
        assert_eq!(ip, loopback_ip("6f1c1f0e-1111-4222-8333-444455556666"));
    }

    #[test]
    fn quantities() {
        assert_eq!(quantity_bytes("256Mi"), Some(256 << 20));
        assert_eq!(quantity_bytes("1G"), Some(1_000_000_000));
        assert_eq!(quantity_bytes("1.5Gi"), Some(1536 << 20));
        assert_eq!(quantity_bytes("1e3"), Some(1000));
        assert_eq!(quantity_bytes("junk"), None);
        assert_eq!(quantity_millis("500m"), Some(500));
        assert_eq!(quantity_millis("1.5"), Some(1500));
    }

    #[test]
    fn argv_from_image_command_and_env() {
        let env: BTreeMap<String, String> = [("N".to_string(), "3".to_string())].into();
        let c = json!({"image": "python:3.12-slim", "args": ["-c", "print($(N))", "$$(N)", "$(MISSING)"]});
        assert_eq!(container_argv(&c, &env).unwrap(), vec!["/usr/bin/python3", "-c", "print(3)", "$(N)", "$(MISSING)"]);
        let c = json!({"image": "r-base:4.4", "command": ["Rscript", "-e", "1"]});
        assert_eq!(container_argv(&c, &env).unwrap()[0], "/usr/bin/Rscript");
        let c = json!({"image": "rocker/r-ver:4"});
        assert_eq!(container_argv(&c, &env).unwrap(), vec!["/usr/bin/R"]);
        assert!(container_argv(&json!({"image": "nginx"}), &env).is_err());
    }
}
