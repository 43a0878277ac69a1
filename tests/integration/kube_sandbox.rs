//! `--kube-backend sandbox`, the cold path's remaining cases, against the emulator playing
//! agent-sandbox (its CRDs installed as an operator would, see `sandbox_sim`): the older API
//! version, a pod admission refuses, a Sandbox that never becomes Ready, TTL expiry with the
//! orphan sweep, and an AgentTask applied with kubectl.

use std::time::Duration;

use serde_json::{json, Value};

use agenttask::kube::sandbox::SandboxApiVersion;

use crate::kube::*;
use crate::support::*;

/// TENANTS, and an isolation no RuntimeClass exists for.
const TENANTS_WITH_KATA: &str =
    "[tenants.{t}-a]\nmax_concurrency = 100\nrate_per_second = 1000\nisolation = [\"standard\", \"gvisor\", \"kata\"]\n";

fn ready_condition(sb: &Value) -> Value {
    sb["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Ready")
        .cloned()
        .unwrap_or_default()
}

/// `--sandbox-api-version v1alpha1`: the Sandbox is written and read in v1alpha1 and the task
/// runs through it. A task whose pod admission refuses (its RuntimeClass does not exist) ends
/// `BackendError` with admission's words, and its Sandbox goes (agent-sandbox would keep trying).
#[tokio::test]
async fn kube_sandbox_v1alpha1_runs_and_a_refused_pod_is_a_backend_error() {
    let sim = sandbox_sim();
    let env = Env::new(TENANTS_WITH_KATA).await;
    let mut settings = sandbox_settings(&env, &sim, 10);
    settings.kube.sandbox_version = SandboxApiVersion::V1alpha1;
    let svc = env.start_with(settings).await;
    let mut client = Client::new(&env).await;
    let tenant = env.tenant("a");
    let mut kata = task("kata", &[("stdout", "never runs\n")]);
    kata["isolation"] = json!("kata");
    client.submit(&tenant, &task("alpha", &[("stdout", "alpha\n"), ("run-ms", "1500")])).await;
    client.submit(&tenant, &kata).await;
    let pool = env.pg().await;
    eventually(WAIT, || async { phase(&pool, "alpha").await == "Running" }).await;
    let name = format!("at-{}-a1", task_id(&pool, "alpha").await);
    let sb = sim.json(&["get", "sandboxes.v1alpha1.agents.x-k8s.io", &name, "-n", "agenttask"]);
    assert_eq!(sb["apiVersion"], "agents.x-k8s.io/v1alpha1", "{sb:#}");
    assert_eq!(sb["spec"]["shutdownPolicy"], "Delete");

    let r = results(&mut client, 2, WAIT).await;
    assert_eq!(
        (r["alpha"]["phase"].as_str(), r["alpha"]["stdout"].as_str(), r["alpha"]["backend"].as_str()),
        (Some("Succeeded"), Some("alpha\n"), Some("sandbox")),
        "{:#}",
        r["alpha"]
    );
    let pod = sim.json(&["get", "pod", &name, "-n", "agenttask"]);
    assert_eq!(pod["metadata"]["ownerReferences"][0]["kind"], "Sandbox");
    // agent-sandbox's controller speaks the storage version, whatever version the Sandbox was
    // written in.
    assert_eq!(pod["metadata"]["ownerReferences"][0]["apiVersion"], "agents.x-k8s.io/v1beta1");

    let k = &r["kata"];
    assert_eq!((k["phase"].as_str(), k["reason"].as_str()), (Some("Failed"), Some("BackendError")), "{k:#}");
    let message = k["message"].as_str().unwrap();
    assert!(message.contains("agent-sandbox could not create the pod"), "{message}");
    assert!(message.contains("RuntimeClass \"kata\" not found"), "{message}");
    let kname = format!("at-{}-a1", task_id(&pool, "kata").await);
    eventually(WAIT, || async {
        !sim.kubectl(&["get", "sandboxes.v1alpha1.agents.x-k8s.io", &kname, "-n", "agenttask"]).status.success()
    })
    .await;
    assert!(!sim.kubectl(&["get", "pod", &kname, "-n", "agenttask"]).status.success(), "no pod was ever made");
    assert!(client.more(Duration::from_secs(2)).await.is_none(), "exactly one result each");
    svc.stop().await;
    env.cleanup().await;
}

/// A Sandbox that never becomes Ready (`kubesim.agenttask.io/sandbox-ready: never`, which
/// reaches the Sandbox's own metadata from the task's labels): a cold task's pod runs anyway, as
/// under agent-sandbox, so the task ends as its pod does; while it runs, the AgentTask's status
/// says why its Sandbox is not Ready. A task beside it whose Sandbox is Ready says nothing.
#[tokio::test]
async fn kube_sandbox_never_ready_runs_to_the_pods_end_and_says_so() {
    let sim = sandbox_sim();
    let env = Env::new(TENANTS).await;
    let svc = env.start_with(sandbox_settings(&env, &sim, 10)).await;
    let mut client = Client::new(&env).await;
    let tenant = env.tenant("a");
    let script = [("stdout", "ran anyway\n"), ("run-ms", "12000")];
    client.submit(&tenant, &task("never", &[("sandbox-ready", "never"), script[0], script[1]])).await;
    client.submit(&tenant, &task("ready", &script)).await;
    let pool = env.pg().await;
    eventually(WAIT, || async { phase(&pool, "never").await == "Running" }).await;
    let (never, ready) = (task_id(&pool, "never").await, task_id(&pool, "ready").await);
    let sb = sim.json(&["get", "sandbox", &format!("at-{never}-a1"), "-n", "agenttask"]);
    assert_eq!(sb["metadata"]["annotations"]["kubesim.agenttask.io/sandbox-ready"], "never", "{sb:#}");

    let at = format!("at-{never}");
    eventually(WAIT, || async {
        status_of(&sim, &at, "agenttask")["message"].as_str().is_some_and(|m| m.contains("not Ready"))
    })
    .await;
    let st = status_of(&sim, &at, "agenttask");
    assert_eq!(st["phase"], "Running", "{st:#}");
    let message = st["message"].as_str().unwrap();
    assert!(message.contains("DependenciesNotReady: Pod is Running but not Ready"), "{message}");
    let sb = sim.json(&["get", "sandbox", &format!("at-{never}-a1"), "-n", "agenttask"]);
    assert_eq!(ready_condition(&sb)["status"], "False", "{sb:#}");
    let other = sim.json(&["get", "sandbox", &format!("at-{ready}-a1"), "-n", "agenttask"]);
    assert_eq!(ready_condition(&other)["status"], "True", "{other:#}");
    let st = status_of(&sim, &format!("at-{ready}"), "agenttask");
    assert_eq!((st["phase"].as_str(), &st["message"]), (Some("Running"), &Value::Null), "{st:#}");

    let r = results(&mut client, 2, WAIT).await;
    for id in ["never", "ready"] {
        assert_eq!(
            (r[id]["phase"].as_str(), r[id]["stdout"].as_str(), &r[id]["reason"]),
            (Some("Succeeded"), Some("ran anyway\n"), &Value::Null),
            "{id}: {:#}",
            r[id]
        );
    }
    let st = status_of(&sim, &at, "agenttask");
    assert_eq!(st["phase"], "Succeeded", "{st:#}");
    assert!(!st["message"].as_str().unwrap_or_default().contains("not Ready"), "the end replaces the note: {st:#}");
    svc.stop().await;
    env.cleanup().await;
}

/// An orphan Sandbox: ours by its labels, its AgentTask gone, no ownerReference for the garbage
/// collector to follow.
const ORPHAN_SANDBOX: &str = r#"apiVersion: agents.x-k8s.io/v1beta1
kind: Sandbox
metadata:
  name: at-ghost-a1
  namespace: agenttask
  labels:
    app.kubernetes.io/managed-by: agenttask
    agenttask.io/agenttask: at-ghost
spec:
  shutdownPolicy: Delete
  podTemplate:
    metadata:
      labels:
        app.kubernetes.io/managed-by: agenttask
        agenttask.io/agenttask: at-ghost
      annotations:
        kubesim.agenttask.io/run-ms: "600000"
    spec:
      securityContext:
        runAsNonRoot: true
        runAsUser: 1000
        seccompProfile: {type: RuntimeDefault}
      containers:
      - name: task
        image: python:3.12-slim
        securityContext:
          allowPrivilegeEscalation: false
          capabilities: {drop: [ALL]}
---
apiVersion: agents.x-k8s.io/v1beta1
kind: Sandbox
metadata:
  name: someone-elses
  namespace: agenttask
spec:
  podTemplate:
    spec:
      securityContext:
        runAsNonRoot: true
        runAsUser: 1000
        seccompProfile: {type: RuntimeDefault}
      containers:
      - name: main
        image: python:3.12-slim
        securityContext:
          allowPrivilegeEscalation: false
          capabilities: {drop: [ALL]}
"#;

/// TTL expiry with the sandbox backend removes the AgentTask, and with it (by ownership) its
/// Sandbox and pod. The orphan sweep removes a Sandbox of ours whose AgentTask is gone (and its
/// pod goes with it, not before it: agent-sandbox would make a lone deleted pod again); a
/// Sandbox that is not ours is left alone.
#[tokio::test]
async fn kube_sandbox_ttl_expiry_and_the_orphan_sweep_remove_sandboxes() {
    let sim = sandbox_sim();
    let file = sim.dir.path().join("orphans.yaml");
    std::fs::write(&file, ORPHAN_SANDBOX).unwrap();
    sim.kubectl_ok(&["apply", "-f", file.to_str().unwrap()]);
    // The orphan's pod runs (agent-sandbox made it) before the service starts.
    eventually(WAIT, || async {
        sim.kubectl(&["get", "pod", "at-ghost-a1", "-n", "agenttask"]).status.success()
            && sim.kubectl(&["get", "pod", "someone-elses", "-n", "agenttask"]).status.success()
    })
    .await;
    let env = Env::new(TENANTS).await;
    let mut settings = sandbox_settings(&env, &sim, 10);
    settings.kube.ttl_seconds_after_finished = 3;
    let svc = env.start_with(settings).await;
    let mut client = Client::new(&env).await;
    client.submit(&env.tenant("a"), &task("short", &[("stdout", "brief\n")])).await;
    let (r, _) = client.next(WAIT).await;
    assert_eq!((r["phase"].as_str(), r["backend"].as_str()), (Some("Succeeded"), Some("sandbox")), "{r:#}");
    let pool = env.pg().await;
    let at = format!("at-{}", task_id(&pool, "short").await);
    let name = format!("{at}-a1");
    let seen = sim.json(&["get", "at", &at, "-n", "agenttask"]);
    assert_eq!((&seen["status"]["phase"], &seen["spec"]["ttlSecondsAfterFinished"]), (&json!("Succeeded"), &json!(3)));
    for (kind, what) in [("at", &at), ("sandbox", &name), ("pod", &name)] {
        eventually(WAIT, || async { !sim.kubectl(&["get", kind, what, "-n", "agenttask"]).status.success() }).await;
    }
    for kind in ["sandbox", "pod"] {
        eventually(WAIT, || async { !sim.kubectl(&["get", kind, "at-ghost-a1", "-n", "agenttask"]).status.success() })
            .await;
    }
    sim.kubectl_ok(&["get", "sandbox", "someone-elses", "-n", "agenttask"]);
    sim.kubectl_ok(&["get", "pod", "someone-elses", "-n", "agenttask"]);
    svc.stop().await;
    env.cleanup().await;
}

/// An AgentTask applied with kubectl in a tenant's namespace runs through a Sandbox (owned by
/// it, in its namespace) like one from the queue, and is recorded with backend `sandbox`.
#[tokio::test]
async fn kube_sandbox_a_kubectl_agenttask_runs_through_a_sandbox() {
    let sim = sandbox_sim();
    let env = Env::new(&format!("{TENANTS}namespaces = [\"evals\"]\n")).await;
    let svc = env.start_with(sandbox_settings(&env, &sim, 10)).await;
    let pool = env.pg().await;
    sim.kubectl_ok(&["create", "namespace", "evals"]);
    let path = sim.dir.path().join("direct.yaml");
    let spec = "  language: python\n  code: print(1)\n  labels:\n    kubesim.agenttask.io/stdout: \"direct\\n\"\n";
    std::fs::write(&path, agenttask_yaml("direct", "evals", spec)).unwrap();
    sim.kubectl_ok(&["apply", "-f", path.to_str().unwrap()]);
    let st = ended(&sim, "direct", "evals").await;
    assert_eq!(st["phase"], "Succeeded", "{st:#}");
    assert_eq!(st["tenant"], env.tenant("a"));
    let at = sim.json(&["get", "at", "direct", "-n", "evals"]);
    assert_eq!(at["spec"]["backend"], "sandbox", "{at:#}");
    let sandboxes = sim.json(&["get", "sandboxes", "-n", "evals", "-l", "agenttask.io/agenttask=direct"]);
    let items = sandboxes["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{sandboxes:#}");
    let owner = &items[0]["metadata"]["ownerReferences"][0];
    assert_eq!((owner["kind"].as_str(), owner["name"].as_str()), (Some("AgentTask"), Some("direct")));
    let name = items[0]["metadata"]["name"].as_str().unwrap();
    assert_eq!(st["podName"], name, "{st:#}");
    let pod = sim.json(&["get", "pod", name, "-n", "evals"]);
    assert_eq!(pod["metadata"]["ownerReferences"][0]["kind"], "Sandbox");
    eventually(WAIT, || async {
        sqlx::query_scalar::<_, String>("select phase from agenttask.tasks where kube_object = 'evals/direct'")
            .fetch_optional(&pool)
            .await
            .unwrap()
            .is_some_and(|p| p == "Succeeded")
    })
    .await;
    let backend: Option<String> =
        sqlx::query_scalar("select backend from agenttask.tasks where kube_object = 'evals/direct'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(backend.as_deref(), Some("sandbox"));
    let stdout: Option<String> =
        sqlx::query_scalar("select stdout from agenttask.tasks where kube_object = 'evals/direct'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(stdout.as_deref(), Some("direct\n"));
    svc.stop().await;
    env.cleanup().await;
}
