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
    sim.kubectl_ok(&[
        "wait",
        "--for=jsonpath={.status.phase}=Failed",
        "pod/real",
        "--timeout=30s",
    ]);
    let logs = sim.kubectl_ok(&["logs", "real"]);
    assert!(
        logs.contains("cwd /scratch uid 999 hi real from-configmap\n"),
        "{logs}"
    );
    assert!(
        logs.contains("written\n") && logs.contains("to stderr\n"),
        "{logs}"
    );
    let t = &pod_state(&sim, "real")["containerStatuses"][0]["state"]["terminated"];
    assert_eq!(
        (
            t["exitCode"].as_i64(),
            t["reason"].as_str(),
            t["message"].as_str()
        ),
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
    sim.kubectl_ok(&[
        "wait",
        "--for=jsonpath={.status.phase}=Failed",
        "pod/oom",
        "--timeout=30s",
    ]);
    let t = &pod_state(&sim, "oom")["containerStatuses"][0]["state"]["terminated"];
    assert_eq!(
        (t["exitCode"].as_i64(), t["reason"].as_str()),
        (Some(137), Some("OOMKilled"))
    );

    sim.kubectl_ok(&[
        "wait",
        "--for=jsonpath={.status.phase}=Succeeded",
        "pod/rlang",
        "--timeout=60s",
    ]);
    assert_eq!(sim.kubectl_ok(&["logs", "rlang"]), "55 \n");

    sim.kubectl_ok(&[
        "wait",
        "--for=jsonpath={.status.phase}=Failed",
        "pod/hang",
        "--timeout=30s",
    ]);
    let st = pod_state(&sim, "hang");
    assert_eq!(st["reason"], "DeadlineExceeded");
    assert_eq!(
        st["containerStatuses"][0]["state"]["terminated"]["exitCode"],
        137
    );
    assert_eq!(sim.kubectl_ok(&["logs", "hang"]), "start\n");

    // A running container is stopped by a graceful delete, then the pod goes.
    sim.kubectl_ok(&[
        "wait",
        "--for=jsonpath={.status.phase}=Running",
        "pod/sleeper",
        "--timeout=30s",
    ]);
    common::eventually(10, || {
        (sim.kubectl_ok(&["logs", "sleeper"]) == "up\n").then_some(())
    });
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
        ctrl.split(',')
            .any(|c| c == "cpu")
            .then(|| path.to_string())
    }) else {
        return false;
    };
    let probe = std::path::PathBuf::from(format!(
        "/sys/fs/cgroup/cpu{path}/kubesim-probe-{}",
        std::process::id()
    ));
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
    sim.kubectl_ok(&[
        "wait",
        "--for=jsonpath={.status.phase}=Succeeded",
        "pod/busy",
        "--timeout=60s",
    ]);
    let wall: f64 = sim.kubectl_ok(&["logs", "busy"]).trim().parse().unwrap();
    if cpu_cgroups_available() {
        assert!(
            wall >= 2.0,
            "0.3 s of CPU took only {wall} s under a 100m limit"
        );
    } else {
        assert!(wall >= 0.3, "{wall}");
    }
}
