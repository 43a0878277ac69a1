//! The `exec` kubelet: containers run for real under bubblewrap as `agenttask-sandbox`
//! (`deploy/local/install-sandbox.sh` sets up bwrap, the runtimes and the user).

mod common;

use common::Sim;

fn pod_state(sim: &Sim, name: &str) -> serde_json::Value {
    let out = sim.kubectl_ok(&["get", "pod", name, "-o", "json"]);
    let pod: serde_json::Value = serde_json::from_str(&out).unwrap();
    pod["status"].clone()
}

#[test]
fn runs_python_with_volumes_env_and_termination_message() {
    let sim = Sim::start_with(&["--kubelet", "exec"]);
    let manifest = sim.write(
        "pod.yaml",
        r#"apiVersion: v1
kind: ConfigMap
metadata:
  name: code
data:
  main.py: |
    import os, sys, json
    print("cwd", os.getcwd(), "uid", os.getuid(), os.environ["GREETING"], os.environ["POD"], os.environ["FROM_CM"], flush=True)
    open("scratch.txt", "w").write("written")
    print(open("/scratch/scratch.txt").read(), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    open("/dev/termination-log", "w").write(json.dumps({"answer": 42}))
    sys.exit(int(sys.argv[1]))
  setting: from-configmap
---
apiVersion: v1
kind: Pod
metadata:
  name: real
spec:
  restartPolicy: Never
  automountServiceAccountToken: false
  containers:
  - name: main
    image: python:3.12
    args: ["/code/main.py", "$(CODE)"]
    workingDir: /scratch
    env:
    - {name: GREETING, value: hi}
    - {name: CODE, value: "3"}
    - name: POD
      valueFrom: {fieldRef: {fieldPath: metadata.name}}
    - name: FROM_CM
      valueFrom: {configMapKeyRef: {name: code, key: setting}}
    resources:
      limits: {memory: 256Mi}
    volumeMounts:
    - {name: code, mountPath: /code}
    - {name: scratch, mountPath: /scratch}
  volumes:
  - name: code
    configMap: {name: code}
  - name: scratch
    emptyDir: {}
"#,
    );
    sim.kubectl_ok(&["apply", "-f", manifest.to_str().unwrap()]);
    sim.kubectl_ok(&["wait", "--for=jsonpath={.status.phase}=Failed", "pod/real", "--timeout=30s"]);
    let logs = sim.kubectl_ok(&["logs", "real"]);
    assert!(logs.contains("cwd /scratch uid 999 hi real from-configmap\n"), "{logs}");
    assert!(logs.contains("written\n") && logs.contains("to stderr\n"), "{logs}");
    let t = &pod_state(&sim, "real")["containerStatuses"][0]["state"]["terminated"];
    assert_eq!(
        (t["exitCode"].as_i64(), t["reason"].as_str(), t["message"].as_str()),
        (Some(3), Some("Error"), Some(r#"{"answer": 42}"#))
    );
}

#[test]
fn memory_limit_deadline_r_and_deletion() {
    let sim = Sim::start_with(&["--kubelet", "exec"]);
    let manifest = sim.write(
        "pods.yaml",
        r#"apiVersion: v1
kind: Pod
metadata:
  name: oom
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: python:3.12
    command: ["python3", "-c", "x = bytearray(400 * 1024 * 1024); print(len(x))"]
    resources:
      limits: {memory: 64Mi}
---
apiVersion: v1
kind: Pod
metadata:
  name: hang
spec:
  restartPolicy: Never
  activeDeadlineSeconds: 2
  containers:
  - name: main
    image: python:3.12
    command: ["python3", "-c", "import time\nprint('start', flush=True)\ntime.sleep(60)"]
---
apiVersion: v1
kind: Pod
metadata:
  name: rlang
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: r-base:4.4
    command: ["Rscript", "-e", "cat(sum(1:10), '\n')"]
---
apiVersion: v1
kind: Pod
metadata:
  name: sleeper
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: python:3.12
    command: ["python3", "-c", "import time\nprint('up', flush=True)\ntime.sleep(60)"]
"#,
    );
    sim.kubectl_ok(&["apply", "-f", manifest.to_str().unwrap()]);
    sim.kubectl_ok(&["wait", "--for=jsonpath={.status.phase}=Failed", "pod/oom", "--timeout=30s"]);
    let t = &pod_state(&sim, "oom")["containerStatuses"][0]["state"]["terminated"];
    assert_eq!((t["exitCode"].as_i64(), t["reason"].as_str()), (Some(137), Some("OOMKilled")));

    sim.kubectl_ok(&["wait", "--for=jsonpath={.status.phase}=Succeeded", "pod/rlang", "--timeout=60s"]);
    assert_eq!(sim.kubectl_ok(&["logs", "rlang"]), "55 \n");

    sim.kubectl_ok(&["wait", "--for=jsonpath={.status.phase}=Failed", "pod/hang", "--timeout=30s"]);
    let st = pod_state(&sim, "hang");
    assert_eq!(st["reason"], "DeadlineExceeded");
    assert_eq!(st["containerStatuses"][0]["state"]["terminated"]["exitCode"], 137);
    assert_eq!(sim.kubectl_ok(&["logs", "hang"]), "start\n");

    // A running container is stopped by a graceful delete, then the pod goes.
    sim.kubectl_ok(&["wait", "--for=jsonpath={.status.phase}=Running", "pod/sleeper", "--timeout=30s"]);
    common::eventually(10, || (sim.kubectl_ok(&["logs", "sleeper"]) == "up\n").then_some(()));
    sim.kubectl_ok(&["delete", "pod", "sleeper", "--timeout=20s"]);
    let out = sim.kubectl(&["get", "pod", "sleeper"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("NotFound"));
}

/// Whether this host lets the emulator make cpu cgroups (then CPU limits are enforced).
fn cpu_cgroups_available() -> bool {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let Some(path) = own.lines().find_map(|l| {
        let mut p = l.splitn(3, ':');
        let (_, ctrl, path) = (p.next()?, p.next()?, p.next()?);
        ctrl.split(',').any(|c| c == "cpu").then(|| path.to_string())
    }) else {
        return false;
    };
    let probe = std::path::PathBuf::from(format!("/sys/fs/cgroup/cpu{path}/kubesim-probe-{}", std::process::id()));
    let ok = std::fs::create_dir(&probe).is_ok();
    let _ = std::fs::remove_dir(&probe);
    ok
}

#[test]
fn cpu_limit_is_a_cfs_quota() {
    let sim = Sim::start_with(&["--kubelet", "exec"]);
    // 0.3 s of CPU under a 100m limit needs about 3 s of wall time.
    let manifest = sim.write(
        "cpu.yaml",
        r#"apiVersion: v1
kind: Pod
metadata:
  name: busy
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: python:3.12
    command: ["python3", "-c", "import time\nw = time.monotonic()\nwhile time.process_time() < 0.3: pass\nprint(round(time.monotonic() - w, 2))"]
    resources:
      limits: {cpu: 100m}
"#,
    );
    sim.kubectl_ok(&["apply", "-f", manifest.to_str().unwrap()]);
    sim.kubectl_ok(&["wait", "--for=jsonpath={.status.phase}=Succeeded", "pod/busy", "--timeout=60s"]);
    let wall: f64 = sim.kubectl_ok(&["logs", "busy"]).trim().parse().unwrap();
    if cpu_cgroups_available() {
        assert!(wall >= 2.0, "0.3 s of CPU took only {wall} s under a 100m limit");
    } else {
        assert!(wall >= 0.3, "{wall}");
    }
}

/// A claim under `--pv-root` is shared by the pods that mount it; a `subPath` is made
/// root-owned when missing (as the kubelet makes it), so a pod's non-root user can only write
/// one prepared for it; a pod whose claim does not exist waits with an Event naming it.
#[test]
fn claims_are_shared_directories_and_sub_paths_behave_as_the_kubelets() {
    let pv = tempfile::tempdir().unwrap();
    let sim = Sim::start_with(&["--kubelet", "exec", "--pv-root", pv.path().to_str().unwrap()]);
    let claim_dir = pv.path().join("default/data");
    std::fs::create_dir_all(claim_dir.join("ready")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(claim_dir.join("ready"), std::fs::Permissions::from_mode(0o777)).unwrap();
    let pod = |name: &str, claim: &str, sub: &str| {
        format!(
            r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: python:3.12
    command: ["python3", "-c", "import sys; open('/out/f.txt', 'w').write(sys.argv[1])", "{name}"]
    volumeMounts:
    - {{name: out, mountPath: /out, subPath: "{sub}"}}
  volumes:
  - name: out
    persistentVolumeClaim: {{claimName: {claim}}}
"#
        )
    };
    let claim = "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: data\nspec:\n  accessModes: [ReadWriteMany]\n  resources:\n    requests: {storage: 1Gi}\n";
    sim.kubectl_ok(&["apply", "-f", sim.write("claim.yaml", claim).to_str().unwrap()]);
    assert_eq!(sim.kubectl_ok(&["get", "pvc", "data", "-o", "name"]).trim(), "persistentvolumeclaim/data");
    for (name, claim, sub) in [
        ("prepared", "data", "ready"),
        ("unprepared", "data", "fresh/dir"),
        ("escape", "data", "../x"),
        ("nope", "missing", "a"),
    ] {
        sim.kubectl_ok(&["apply", "-f", sim.write(&format!("{name}.yaml"), &pod(name, claim, sub)).to_str().unwrap()]);
    }
    sim.kubectl_ok(&["wait", "--for=jsonpath={.status.phase}=Succeeded", "pod/prepared", "--timeout=30s"]);
    assert_eq!(std::fs::read_to_string(claim_dir.join("ready/f.txt")).unwrap(), "prepared");
    // The kubelet made the missing sub-path as root, 0755: the pod's user cannot write it.
    sim.kubectl_ok(&["wait", "--for=jsonpath={.status.phase}=Failed", "pod/unprepared", "--timeout=30s"]);
    let made = std::fs::metadata(claim_dir.join("fresh/dir")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((made.uid(), made.mode() & 0o777), (0, 0o755));
    assert!(sim.kubectl_ok(&["logs", "unprepared"]).contains("PermissionError"));
    sim.kubectl_ok(&["wait", "--for=jsonpath={.status.phase}=Failed", "pod/escape", "--timeout=30s"]);
    let t = &pod_state(&sim, "escape")["containerStatuses"][0]["state"]["terminated"];
    assert_eq!(t["reason"], "CreateContainerConfigError", "{t}");
    // A missing claim: the pod stays Pending, unscheduled, and says why; the claim lets it run.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let st = pod_state(&sim, "nope");
    assert_eq!(
        (st["phase"].as_str(), st["conditions"][0]["reason"].as_str()),
        (Some("Pending"), Some("Unschedulable"))
    );
    let events = sim.kubectl_ok(&["get", "events", "--field-selector", "involvedObject.name=nope"]);
    assert!(
        events.contains("FailedScheduling") && events.contains(r#"persistentvolumeclaim "missing" not found"#),
        "{events}"
    );
    std::fs::create_dir_all(pv.path().join("default/missing/a")).unwrap();
    std::fs::set_permissions(pv.path().join("default/missing/a"), std::fs::Permissions::from_mode(0o777)).unwrap();
    sim.kubectl_ok(&[
        "apply",
        "-f",
        sim.write("missing.yaml", &claim.replace("name: data", "name: missing")).to_str().unwrap(),
    ]);
    sim.kubectl_ok(&["wait", "--for=jsonpath={.status.phase}=Succeeded", "pod/nope", "--timeout=30s"]);
}

/// A pod that declares a `containerPort` is a server: it gets a loopback `podIP` of its own and
/// the host's network, so a client on the host reaches it at `podIP:port` (as the service reaches
/// a warm-pool pod's task agent). A pod without a port has no network at all.
#[test]
fn a_pod_declaring_a_port_is_reachable_at_its_pod_ip() {
    let sim = Sim::start_with(&["--kubelet", "exec"]);
    let server = "import os, socket\n\
                  s = socket.socket()\n\
                  s.bind((os.environ['IP'], 8470))\n\
                  s.listen(1)\n\
                  print('listening', flush=True)\n\
                  c, _ = s.accept()\n\
                  c.sendall(b'hello ' + c.recv(100))\n";
    let client = "import socket\n\
                  try:\n    socket.create_connection(('1.1.1.1', 53), timeout=2)\n    print('network')\n\
                  except OSError:\n    print('no network')\n";
    let pod = |name: &str, code: &str, port: bool| {
        let ports = if port { "\n    ports: [{containerPort: 8470}]" } else { "" };
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  restartPolicy: Never\n  \
             automountServiceAccountToken: false\n  containers:\n  - name: main\n    image: python:3.12\n    \
             args: [\"-c\", {code:?}]{ports}\n    env:\n    - name: IP\n      valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}\n"
        )
    };
    let manifest =
        sim.write("pods.yaml", &format!("{}---\n{}", pod("server", server, true), pod("plain", client, false)));
    sim.kubectl_ok(&["apply", "-f", manifest.to_str().unwrap()]);
    let start = std::time::Instant::now();
    // `kubectl logs` fails, as against a real API server, while the container is still being
    // created: keep asking until it prints.
    while !String::from_utf8_lossy(&sim.kubectl(&["logs", "server"]).stdout).contains("listening") {
        assert!(start.elapsed() < std::time::Duration::from_secs(30), "the server never listened");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let ip = pod_state(&sim, "server")["podIP"].as_str().unwrap().to_owned();
    assert!(ip.starts_with("127.") && !ip.starts_with("127.0."), "{ip}");
    let mut conn = std::net::TcpStream::connect((ip.as_str(), 8470)).unwrap();
    std::io::Write::write_all(&mut conn, b"world").unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut conn, &mut answer).unwrap();
    assert_eq!(answer, "hello world");
    sim.kubectl_ok(&["wait", "--for=jsonpath={.status.phase}=Succeeded", "pod/server", "--timeout=30s"]);
    sim.kubectl_ok(&["wait", "--for=jsonpath={.status.phase}=Succeeded", "pod/plain", "--timeout=30s"]);
    assert_eq!(sim.kubectl_ok(&["logs", "plain"]), "no network\n");
    assert!(pod_state(&sim, "plain")["podIP"].as_str().unwrap().starts_with("10.244."));
}
