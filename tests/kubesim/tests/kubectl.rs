//! The machine's real kubectl (1.32) against the emulator: discovery, server-side apply of a CRD
//! and of custom objects, tables with the CRD's printer columns, watch, yaml/json output,
//! describe, delete, wait, and pods through the simulated kubelet.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use common::{data, Sim};

fn setup_crd(sim: &Sim) {
    let out = sim.kubectl_ok(&[
        "apply",
        "--server-side",
        "-f",
        data("crd.yaml").to_str().unwrap(),
    ]);
    assert_eq!(out.trim(), "customresourcedefinition.apiextensions.k8s.io/widgets.example.kubesim.io serverside-applied");
    sim.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd/widgets.example.kubesim.io",
        "--timeout=10s",
    ]);
    let out = sim.kubectl_ok(&[
        "apply",
        "--server-side",
        "-f",
        data("widgets.yaml").to_str().unwrap(),
    ]);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        vec![
            "widget.example.kubesim.io/small serverside-applied",
            "widget.example.kubesim.io/big serverside-applied",
        ]
    );
}

#[test]
fn version_and_discovery() {
    let sim = Sim::start();
    let v: serde_json::Value =
        serde_json::from_str(&sim.kubectl_ok(&["version", "-o", "json"])).unwrap();
    assert_eq!(v["serverVersion"]["major"], "1");
    assert_eq!(v["serverVersion"]["minor"], "32");
    let res = sim.kubectl_ok(&["api-resources", "-o", "name"]);
    for r in [
        "pods",
        "configmaps",
        "secrets",
        "events",
        "serviceaccounts",
        "namespaces",
        "networkpolicies.networking.k8s.io",
        "leases.coordination.k8s.io",
        "runtimeclasses.node.k8s.io",
        "customresourcedefinitions.apiextensions.k8s.io",
    ] {
        assert!(
            res.lines().any(|l| l == r),
            "{r} missing from api-resources:\n{res}"
        );
    }
    let ns = sim.kubectl_ok(&["get", "namespaces", "-o", "name"]);
    assert_eq!(
        ns.lines().collect::<Vec<_>>(),
        vec![
            "namespace/default",
            "namespace/kube-node-lease",
            "namespace/kube-public",
            "namespace/kube-system"
        ]
    );
}

#[test]
fn crd_apply_table_output_describe_delete() {
    let sim = Sim::start();
    setup_crd(&sim);
    // After the CRD, the new kind shows in discovery with its short name.
    let res = sim.kubectl_ok(&["api-resources", "--api-group", "example.kubesim.io"]);
    assert!(
        res.lines().any(|l| l.split_whitespace().collect::<Vec<_>>()
            == ["widgets", "wd", "example.kubesim.io/v1", "true", "Widget"]),
        "{res}"
    );

    // The table has the CRD's printer columns, and the schema default (color red) was applied.
    let table = sim.kubectl_ok(&["get", "widgets"]);
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0], ["NAME", "SIZE", "COLOR", "PHASE", "AGE"]);
    assert_eq!(rows[1][..3], ["big", "10", "red"]);
    assert_eq!(rows[2][..3], ["small", "1", "green"]);
    assert_eq!(rows.len(), 3);
    let by_short = sim.kubectl_ok(&["get", "wd", "small", "--no-headers"]);
    assert!(by_short.starts_with("small "), "{by_short}");
    let wide = sim.kubectl_ok(&["get", "wd", "-l", "tier=b", "-o", "name"]);
    assert_eq!(wide.trim(), "widget.example.kubesim.io/big");

    let json: serde_json::Value =
        serde_json::from_str(&sim.kubectl_ok(&["get", "wd", "small", "-o", "json"])).unwrap();
    assert_eq!(json["kind"], "Widget");
    assert_eq!(json["metadata"]["generation"], 1);
    assert!(json["metadata"]["uid"]
        .as_str()
        .is_some_and(|u| u.len() == 36));
    assert!(json["metadata"]["creationTimestamp"].is_string());
    let yaml = sim.kubectl_ok(&["get", "wd", "big", "-o", "yaml", "--show-managed-fields"]);
    assert!(
        yaml.contains("kind: Widget")
            && yaml.contains("manager: kubectl")
            && yaml.contains("operation: Apply"),
        "{yaml}"
    );

    // Schema validation: 422 with every cause, and strict unknown fields.
    let bad = sim.write("bad.json", r#"{"apiVersion":"example.kubesim.io/v1","kind":"Widget","metadata":{"name":"bad"},"spec":{"size":0,"color":"pink"}}"#);
    let out = sim.kubectl(&["apply", "--server-side", "-f", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(r#"The Widget "bad" is invalid"#), "{err}");
    assert!(
        err.contains(
            r#"spec.color: Unsupported value: "pink": supported values: "red", "green", "blue""#
        ),
        "{err}"
    );
    assert!(
        err.contains(
            "spec.size: Invalid value: 0: spec.size in body should be greater than or equal to 1"
        ),
        "{err}"
    );
    let unknown = sim.write("unknown.json", r#"{"apiVersion":"example.kubesim.io/v1","kind":"Widget","metadata":{"name":"u"},"spec":{"size":1,"bogus":true}}"#);
    let out = sim.kubectl(&["apply", "--server-side", "-f", unknown.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(".spec.bogus: field not declared in schema"),
        "{err}"
    );

    let described = sim.kubectl_ok(&["describe", "wd", "small"]);
    for want in [
        "Name:         small",
        "Namespace:    default",
        "Labels:       tier=a",
        "Kind:         Widget",
        "Size:   1",
        "Color:  green",
    ] {
        assert!(described.contains(want), "{want:?} not in:\n{described}");
    }

    assert_eq!(
        sim.kubectl_ok(&["delete", "wd", "big"]).trim(),
        r#"widget.example.kubesim.io "big" deleted"#
    );
    let out = sim.kubectl(&["get", "wd", "big"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        r#"Error from server (NotFound): widgets.example.kubesim.io "big" not found"#
    );
}

#[test]
fn watch_with_events() {
    let sim = Sim::start();
    setup_crd(&sim);
    let mut child = sim
        .kubectl_cmd(&["get", "wd", "-w", "--output-watch-events"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = || {
        rx.recv_timeout(Duration::from_secs(15))
            .expect("a watch line")
    };
    let fields = |l: String| l.split_whitespace().map(String::from).collect::<Vec<_>>();
    assert_eq!(
        fields(next())[..6],
        ["EVENT", "NAME", "SIZE", "COLOR", "PHASE", "AGE"]
    );
    assert_eq!(fields(next())[..2], ["ADDED", "big"]);
    assert_eq!(fields(next())[..2], ["ADDED", "small"]);
    sim.kubectl_ok(&[
        "patch",
        "wd",
        "small",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"size":3}}"#,
    ]);
    sim.kubectl_ok(&[
        "patch",
        "wd",
        "small",
        "--subresource",
        "status",
        "--type",
        "merge",
        "-p",
        r#"{"status":{"phase":"Ready"}}"#,
    ]);
    sim.kubectl_ok(&["delete", "wd", "big"]);
    assert_eq!(fields(next())[..3], ["MODIFIED", "small", "3"]);
    assert_eq!(
        fields(next())[..5],
        ["MODIFIED", "small", "3", "green", "Ready"]
    );
    assert_eq!(fields(next())[..2], ["DELETED", "big"]);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn wait_for_jsonpath() {
    let sim = Sim::start();
    setup_crd(&sim);
    let waiter = sim
        .kubectl_cmd(&[
            "wait",
            "--for=jsonpath={.status.phase}=Done",
            "wd/small",
            "--timeout=20s",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    sim.kubectl_ok(&[
        "patch",
        "wd",
        "small",
        "--subresource",
        "status",
        "--type",
        "merge",
        "-p",
        r#"{"status":{"phase":"Done"}}"#,
    ]);
    let out = waiter.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "widget.example.kubesim.io/small condition met"
    );
    // The status write did not bump generation; the spec write before did not exist.
    assert_eq!(
        sim.kubectl_ok(&[
            "get",
            "wd",
            "small",
            "-o",
            "jsonpath={.metadata.generation}"
        ]),
        "1"
    );
}

#[test]
fn pods_run_log_and_describe() {
    let sim = Sim::start();
    let pod = sim.write(
        "pod.yaml",
        r#"apiVersion: v1
kind: Pod
metadata:
  name: job
  annotations:
    kubesim.agenttask.io/stdout: "line one\nline two\nline three\n"
    kubesim.agenttask.io/exit-code: "3"
    kubesim.agenttask.io/termination-message: '{"result": 42}'
spec:
  restartPolicy: Never
  activeDeadlineSeconds: 60
  containers:
  - name: main
    image: python:3.12-slim
    command: ["python", "-c", "print('hi')"]
"#,
    );
    sim.kubectl_ok(&["apply", "-f", pod.to_str().unwrap()]);
    sim.kubectl_ok(&[
        "wait",
        "--for=jsonpath={.status.phase}=Failed",
        "pod/job",
        "--timeout=20s",
    ]);
    let table = sim.kubectl_ok(&["get", "pod", "job", "--no-headers"]);
    assert_eq!(
        table.split_whitespace().collect::<Vec<_>>()[..4],
        ["job", "0/1", "Error", "0"]
    );
    assert_eq!(
        sim.kubectl_ok(&["logs", "job"]),
        "line one\nline two\nline three\n"
    );
    assert_eq!(sim.kubectl_ok(&["logs", "job", "--tail=1"]), "line three\n");
    assert_eq!(
        sim.kubectl_ok(&["logs", "job", "--limit-bytes=6"]),
        "line o"
    );
    let state = sim.kubectl_ok(&["get", "pod", "job", "-o", "jsonpath={.status.containerStatuses[0].state.terminated.exitCode} {.status.containerStatuses[0].state.terminated.message}"]);
    assert_eq!(state, r#"3 {"result": 42}"#);
    let described = sim.kubectl_ok(&["describe", "pod", "job"]);
    for want in [
        "Node:             kubesim-node/127.0.0.1",
        "Status:           Failed",
        "Exit Code:    3",
        "Successfully assigned default/job to kubesim-node",
        "Started container main",
    ] {
        assert!(described.contains(want), "{want:?} not in:\n{described}");
    }
    assert_eq!(
        sim.kubectl_ok(&["delete", "pod", "job"]).trim(),
        r#"pod "job" deleted"#
    );
    assert_eq!(sim.kubectl_ok(&["get", "pods", "-o", "name"]), "");
}

#[test]
fn imperative_create_commands_send_protobuf() {
    // kubectl's typed clients send built-in kinds as protobuf.
    let sim = Sim::start();
    assert_eq!(
        sim.kubectl_ok(&["create", "namespace", "demo"]).trim(),
        "namespace/demo created"
    );
    sim.kubectl_ok(&[
        "-n",
        "demo",
        "create",
        "configmap",
        "c",
        "--from-literal=a=b",
        "--from-literal=x=y",
    ]);
    sim.kubectl_ok(&[
        "-n",
        "demo",
        "create",
        "secret",
        "generic",
        "s",
        "--from-literal=pw=hunter2",
    ]);
    sim.kubectl_ok(&["-n", "demo", "create", "serviceaccount", "robot"]);
    let cm: serde_json::Value =
        serde_json::from_str(&sim.kubectl_ok(&["-n", "demo", "get", "cm", "c", "-o", "json"]))
            .unwrap();
    assert_eq!(cm["data"], serde_json::json!({"a": "b", "x": "y"}));
    assert_eq!(
        sim.kubectl_ok(&[
            "-n",
            "demo",
            "get",
            "secret",
            "s",
            "-o",
            "jsonpath={.data.pw}"
        ]),
        "aHVudGVyMg=="
    );
    let sas = sim.kubectl_ok(&["-n", "demo", "get", "sa", "-o", "name"]);
    assert_eq!(
        sas.lines().collect::<Vec<_>>(),
        vec!["serviceaccount/default", "serviceaccount/robot"]
    );
    sim.kubectl_ok(&[
        "-n",
        "demo",
        "run",
        "p",
        "--image=python:3.12",
        "--restart=Never",
        "--",
        "python",
        "-c",
        "print(1)",
    ]);
    sim.kubectl_ok(&[
        "wait",
        "-n",
        "demo",
        "--for=jsonpath={.status.phase}=Succeeded",
        "pod/p",
        "--timeout=20s",
    ]);
    // Deleting the namespace empties it, then it goes.
    sim.kubectl_ok(&["delete", "namespace", "demo", "--timeout=30s"]);
    let out = sim.kubectl(&["get", "namespace", "demo"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains(r#"namespaces "demo" not found"#));
}
