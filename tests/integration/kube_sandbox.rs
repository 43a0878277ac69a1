//! `--kube-backend sandbox` against the emulator playing agent-sandbox (its CRDs installed as an
//! operator would, see `sandbox_sim`). The cold path's remaining cases: the older API version, a
//! pod admission refuses, a Sandbox that never becomes Ready, TTL expiry with the orphan sweep,
//! and an AgentTask applied with kubectl. The warm path (claims on a SandboxWarmPool), each
//! failure: no pool, pool exhausted, a claimed sandbox that never becomes Ready, claim expired,
//! restart mid-task, orphan claims.

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
    eventually(WAIT, || async { gone(&sim, "sandboxes.v1alpha1.agents.x-k8s.io", &kname) }).await;
    assert!(gone(&sim, "pod", &kname), "no pod was ever made");
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
    let Started { env, svc, mut client, tenant } = started_with(TENANTS, |env| sandbox_settings(env, &sim, 10)).await;
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
        eventually(WAIT, || async { gone(&sim, kind, what) }).await;
    }
    for kind in ["sandbox", "pod"] {
        eventually(WAIT, || async { gone(&sim, kind, "at-ghost-a1") }).await;
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

// ---------------------------------------------------------------------------------------------
// The warm path: claims on a SandboxWarmPool, the task handed to the claimed pod's agent. These
// tests apply AgentTasks with kubectl and read their outcome from the AgentTask and the row, so
// they need no RabbitMQ (the service runs the scheduler, the executor and the HTTP API).

/// Tenants of the warm tests, each owning the namespace its AgentTasks are applied in: `a`
/// (namespace `agenttask`) waits for a ready replica, `b` (`warm-b`) falls back to cold, `c`
/// (`warm-c`) names a pool that does not exist.
const WARM_TENANTS: &str = "[defaults]\nmax_concurrency = 100\nrate_per_second = 1000\nwarm_pool = \"py\"\n\
     [tenants.{t}-a]\nwarm_pool_empty = \"wait\"\nnamespaces = [\"agenttask\"]\n\
     [tenants.{t}-b]\nwarm_pool_empty = \"cold\"\nnamespaces = [\"warm-b\"]\n\
     [tenants.{t}-c]\nwarm_pool = \"nope\"\nnamespaces = [\"warm-c\"]\n";

/// An `exec` emulator playing agent-sandbox, with the namespaces `warm-b` and `warm-c`, and in
/// each of `pools` a warm pool `py` of `replicas` (its token Secret, the template and the pool as
/// `agenttask render` prints them for the operator), once every replica is ready.
/// Whether the object `kind/name` no longer exists in the test namespace.
fn gone(sim: &Sim, kind: &str, name: &str) -> bool {
    !sim.kubectl(&["get", kind, name, "-n", "agenttask"]).status.success()
}

fn warm_sim(replicas: u32, pools: &[&str]) -> Sim {
    use agenttask::kube::{sandbox, PodSettings};
    let sim = Sim::start_with("exec");
    let root = env!("CARGO_MANIFEST_DIR");
    sim.kubectl_ok(&[
        "apply",
        "--server-side",
        "-f",
        &format!("{root}/tests/kubesim/tests/data/agent-sandbox-crds.yaml"),
    ]);
    sim.kubectl_ok(&["wait", "--for=condition=Established", "crd/sandboxwarmpools.extensions.agents.x-k8s.io"]);
    for ns in ["warm-b", "warm-c"] {
        sim.kubectl_ok(&["create", "namespace", ns]);
        sim.kubectl_ok(&["label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted"]);
    }
    let version = sandbox::SandboxApiVersion::V1beta1;
    let resources = sandbox::PoolResources { cpu_millis: 500, memory_bytes: 256 << 20 };
    for ns in pools {
        let token = format!("--from-literal=token={:032x}", rand_u128());
        sim.kubectl_ok(&["create", "secret", "generic", "py-agent-token", "-n", ns, &token]);
        let template = sandbox::warm_template("py", ns, &PodSettings::default(), &resources, version);
        let pool = sandbox::warm_pool("py", ns, replicas, version);
        for (i, obj) in [template, pool].iter().enumerate() {
            let file = sim.dir.path().join(format!("pool-{ns}-{i}.json"));
            std::fs::write(&file, serde_json::to_string(obj).unwrap()).unwrap();
            sim.kubectl_ok(&["apply", "--server-side", "-f", file.to_str().unwrap()]);
        }
        wait_ready_replicas(&sim, ns, i64::from(replicas));
    }
    sim
}

fn rand_u128() -> u128 {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).unwrap();
    u128::from_le_bytes(b)
}

fn ready_replicas(sim: &Sim, ns: &str) -> i64 {
    sim.json(&["get", "sandboxwarmpools", "py", "-n", ns])["status"]["readyReplicas"].as_i64().unwrap_or(0)
}

fn wait_ready_replicas(sim: &Sim, ns: &str, n: i64) {
    let start = std::time::Instant::now();
    while ready_replicas(sim, ns) != n {
        assert!(start.elapsed() < WAIT, "warm pool {ns}/py never had {n} ready replicas");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The service without ingest and publisher: AgentTasks come in through kubectl.
async fn start_warm(env: &Env, sim: &Sim) -> Service {
    start_warm_with(env, sim, SandboxApiVersion::V1beta1).await
}

async fn start_warm_with(env: &Env, sim: &Sim, version: SandboxApiVersion) -> Service {
    use agenttask::config::Component;
    let mut s = sandbox_settings(env, sim, 20);
    s.components = vec![Component::Scheduler, Component::Executor, Component::Http];
    s.kube.sandbox_version = version;
    env.start_with(s).await
}

/// An environment with `WARM_TENANTS`, the service on it as [`start_warm_with`] starts it, and a
/// pool on its database.
async fn warm_service(sim: &Sim, version: SandboxApiVersion) -> (Env, Service, sqlx::PgPool) {
    let env = Env::new(WARM_TENANTS).await;
    let svc = start_warm_with(&env, sim, version).await;
    let pool = env.pg().await;
    (env, svc, pool)
}

/// `--sandbox-api-version v1alpha1`: the claim names the pool's template (`sandboxTemplateRef`)
/// and the pool (`warmpool`), and the task runs warm as with v1beta1.
#[tokio::test]
async fn kube_sandbox_warm_pool_with_v1alpha1_claims() {
    let sim = warm_sim(1, &["agenttask"]);
    let (env, svc, pool) = warm_service(&sim, SandboxApiVersion::V1alpha1).await;
    apply_program(&sim, "alpha", "agenttask", "0", "");
    let r = row(&pool, "agenttask", "alpha").await;
    assert_ran(&r, "0");
    assert!(r["message"].as_str().unwrap().ends_with("; launched warm (pool py)"), "{r:#}");
    let claim = sim.json(&["get", "sandboxclaims.v1alpha1.extensions.agents.x-k8s.io", "alpha-a1", "-n", "agenttask"]);
    assert_eq!(claim["apiVersion"], "extensions.agents.x-k8s.io/v1alpha1", "{claim:#}");
    assert_eq!(
        (&claim["spec"]["sandboxTemplateRef"]["name"], &claim["spec"]["warmpool"]),
        (&json!("py"), &json!("py")),
        "{claim:#}"
    );
    assert_eq!(claim["status"]["sandbox"]["name"], status_of(&sim, "alpha", "agenttask")["podName"], "{claim:#}");
    svc.stop().await;
    env.cleanup().await;
}

/// The program of the warm tests: reads an input file, stdin, its args and env, writes a result.
const PROGRAM: &str = "import json, os, sys, time\n\
    time.sleep(float(sys.argv[1]))\n\
    total = sum(int(x) for x in open('numbers.txt').read().split())\n\
    print('total', total, sys.stdin.read().strip(), os.environ['GREETING'])\n\
    print('to stderr', file=sys.stderr)\n\
    json.dump({'total': total, 'argv': sys.argv[1:], 'token': os.environ.get('AGENTTASK_AGENT_TOKEN')},\n\
              open(os.environ['AGENTTASK_RESULT_FILE'], 'w'))\n";

/// Applies the AgentTask `name` in `ns` running [`PROGRAM`] after `sleep` seconds; `extra` is
/// more of its spec (YAML, two-space indented), `timeoutSeconds` 60 unless it says otherwise.
fn apply_program(sim: &Sim, name: &str, ns: &str, sleep: &str, extra: &str) {
    let timeout = if extra.contains("timeoutSeconds") { "" } else { "  timeoutSeconds: 60\n" };
    let spec = format!(
        "  language: python\n  code: {PROGRAM:?}\n  files:\n    numbers.txt: {{content: \"1 2 3 4\"}}\n  \
         stdin: from stdin\n  args: [\"{sleep}\", \"y\"]\n  env: {{GREETING: hello}}\n{timeout}{extra}"
    );
    let path = sim.dir.path().join(format!("{ns}-{name}.yaml"));
    std::fs::write(&path, agenttask_yaml(name, ns, &spec)).unwrap();
    sim.kubectl_ok(&["apply", "-f", path.to_str().unwrap()]);
}

/// The task's row once it has ended: phase, reason, message, stdout, stderr, result, backend.
async fn row(pool: &sqlx::PgPool, ns: &str, name: &str) -> Value {
    let key = format!("{ns}/{name}");
    let query = "select json_build_object('phase', phase, 'reason', reason, 'message', message, 'stdout', stdout, \
                 'stderr', stderr, 'result', result, 'backend', backend, 'attempt', attempt) \
                 from agenttask.tasks where kube_object = $1";
    let ended = || async {
        let r: Option<Value> = sqlx::query_scalar(query).bind(&key).fetch_optional(pool).await.unwrap();
        r.filter(|r| ["Succeeded", "Failed", "Cancelled"].contains(&r["phase"].as_str().unwrap_or_default()))
    };
    eventually(Duration::from_secs(90), || async { ended().await.is_some() }).await;
    ended().await.unwrap()
}

fn assert_ran(r: &Value, sleep: &str) {
    assert_eq!((r["phase"].as_str(), r["backend"].as_str()), (Some("Succeeded"), Some("sandbox")), "{r:#}");
    assert_eq!(r["stdout"], "total 10 from stdin hello\n", "{r:#}");
    assert_eq!(r["stderr"], "to stderr\n", "{r:#}");
    // The agent's token never reaches the task.
    assert_eq!(r["result"], json!({"total": 10, "argv": [sleep, "y"], "token": null}), "{r:#}");
}

/// The Sandboxes the pool `py` of `ns` holds (not claimed).
fn pool_sandboxes(sim: &Sim, ns: &str) -> Vec<String> {
    sim.json(&["get", "sandboxes", "-n", ns])["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["metadata"]["ownerReferences"][0]["kind"] == "SandboxWarmPool")
        .map(|s| s["metadata"]["name"].as_str().unwrap().to_owned())
        .collect()
}

/// The warm path with real Python: a task claims a pre-warmed sandbox of pool `py`, its code,
/// file, stdin, args and env are handed to the claimed pod's agent, and it runs and returns as a
/// cold one does. The claimed Sandbox served that one task: it goes with the task's AgentTask
/// and the pool refills with new ones. A tenant whose pool does not exist fails clearly; an R task
/// (which no pool pod can run) runs cold and says why.
#[tokio::test]
async fn kube_sandbox_warm_pool_runs_real_python_once_per_claimed_sandbox() {
    let sim = warm_sim(2, &["agenttask"]);
    let warm_before = pool_sandboxes(&sim, "agenttask");
    assert_eq!(warm_before.len(), 2);
    let (env, svc, pool) = warm_service(&sim, SandboxApiVersion::V1beta1).await;
    apply_program(&sim, "warm", "agenttask", "0", "  ttlSecondsAfterFinished: 3\n");
    apply_program(&sim, "nopool", "warm-c", "0", "");
    let r_spec = "  language: r\n  code: \"cat('from R\\\\n')\"\n  timeoutSeconds: 60\n";
    let path = sim.dir.path().join("r.yaml");
    std::fs::write(&path, agenttask_yaml("r", "agenttask", r_spec)).unwrap();
    sim.kubectl_ok(&["apply", "-f", path.to_str().unwrap()]);

    let warm = row(&pool, "agenttask", "warm").await;
    assert_ran(&warm, "0");
    let message = warm["message"].as_str().unwrap();
    assert!(message.ends_with("; launched warm (pool py)"), "{message}");
    let st = status_of(&sim, "warm", "agenttask");
    let pod_name = st["podName"].as_str().unwrap().to_owned();
    assert!(warm_before.contains(&pod_name), "ran in a pre-warmed sandbox: {pod_name} of {warm_before:?}");
    let claim = sim.json(&["get", "sandboxclaims", "warm-a1", "-n", "agenttask"]);
    assert_eq!(claim["status"]["sandbox"]["name"], pod_name.as_str(), "{claim:#}");
    assert!(claim["metadata"]["annotations"]["agenttask.io/handoff"].as_str().unwrap().starts_with("done "));
    assert_eq!(claim["spec"]["lifecycle"]["shutdownPolicy"], "Delete");
    assert_eq!(claim["metadata"]["ownerReferences"][0]["kind"], "AgentTask");
    let np = sim.json(&["get", "networkpolicy", "agenttask-warm-py", "-n", "agenttask"]);
    assert_eq!(np["spec"]["policyTypes"], json!(["Ingress", "Egress"]), "{np:#}");
    assert!(np["spec"].get("egress").is_none(), "{np:#}");

    let nopool = row(&pool, "warm-c", "nopool").await;
    assert_eq!(
        (nopool["phase"].as_str(), nopool["reason"].as_str()),
        (Some("Failed"), Some("BackendError")),
        "{nopool:#}"
    );
    assert!(nopool["message"].as_str().unwrap().contains("warm pool nope not found (WarmPoolNotFound)"), "{nopool:#}");
    let rt = row(&pool, "agenttask", "r").await;
    assert_eq!((rt["phase"].as_str(), rt["stdout"].as_str()), (Some("Succeeded"), Some("from R\n")), "{rt:#}");
    let message = rt["message"].as_str().unwrap();
    assert!(message.contains("launched cold (warm pool py: the warm pool runs Python tasks only)"), "{message}");

    // Used once: the claim, its Sandbox and pod go with the AgentTask (its TTL); the pool refills.
    eventually(WAIT, || async {
        gone(&sim, "sandbox", &pod_name) && gone(&sim, "pod", &pod_name) && gone(&sim, "sandboxclaim", "warm-a1")
    })
    .await;
    wait_ready_replicas(&sim, "agenttask", 2);
    assert!(!pool_sandboxes(&sim, "agenttask").contains(&pod_name), "never handed out again");
    svc.stop().await;
    env.cleanup().await;
}

/// A pool with no ready replica (`kubesim.agenttask.io/pool: exhausted` once its one replica is
/// claimed): a `wait` tenant's task stays `Pending` and says it waits, then runs once the pool
/// makes a replica again; a `cold` tenant's task runs at once as its own Sandbox, and its status
/// and result message say so.
#[tokio::test]
async fn kube_sandbox_warm_pool_exhausted_waits_or_falls_back_to_cold() {
    let sim = warm_sim(1, &["agenttask", "warm-b"]);
    for ns in ["agenttask", "warm-b"] {
        sim.kubectl_ok(&["annotate", "sandboxwarmpools", "py", "-n", ns, "kubesim.agenttask.io/pool=exhausted"]);
    }
    let (env, svc, pool) = warm_service(&sim, SandboxApiVersion::V1beta1).await;
    // Each pool's one replica goes to a first task.
    apply_program(&sim, "first", "agenttask", "4", "");
    apply_program(&sim, "first", "warm-b", "4", "");
    for ns in ["agenttask", "warm-b"] {
        eventually(WAIT, || async { status_of(&sim, "first", ns)["phase"] == "Running" }).await;
        assert_eq!(ready_replicas(&sim, ns), 0);
    }
    apply_program(&sim, "waits", "agenttask", "0", "");
    apply_program(&sim, "cold", "warm-b", "0", "");
    let gives_up = "  language: python\n  code: print(1)\n  timeoutSeconds: 2\n";
    let path = sim.dir.path().join("gives-up.yaml");
    std::fs::write(&path, agenttask_yaml("gives-up", "agenttask", gives_up)).unwrap();
    sim.kubectl_ok(&["apply", "-f", path.to_str().unwrap()]);
    eventually(WAIT, || async {
        status_of(&sim, "waits", "agenttask")["message"]
            .as_str()
            .is_some_and(|m| m.contains("waiting for a ready replica of warm pool py"))
    })
    .await;
    assert_eq!(status_of(&sim, "waits", "agenttask")["phase"], "Pending");

    let cold = row(&pool, "warm-b", "cold").await;
    assert_ran(&cold, "0");
    let message = cold["message"].as_str().unwrap();
    assert!(message.contains("launched cold (warm pool py had no ready replica (0 ready"), "{message}");
    let at = sim.json(&["get", "at", "cold", "-n", "warm-b"]);
    assert!(at["metadata"]["annotations"]["agenttask.io/launch"].as_str().unwrap().starts_with("cold"), "{at:#}");
    assert!(sim.kubectl(&["get", "sandbox", "cold-a1", "-n", "warm-b"]).status.success(), "its own Sandbox");
    for ns in ["agenttask", "warm-b"] {
        assert_ran(&row(&pool, ns, "first").await, "4");
    }
    assert_eq!(status_of(&sim, "waits", "agenttask")["phase"], "Pending", "still waiting: the pool makes no replica");
    // A task that waits longer than its timeout ends `TimedOut`, never launched.
    let gave_up = row(&pool, "agenttask", "gives-up").await;
    assert_eq!(
        (gave_up["phase"].as_str(), gave_up["reason"].as_str()),
        (Some("Failed"), Some("TimedOut")),
        "{gave_up:#}"
    );
    let message = gave_up["message"].as_str().unwrap();
    assert!(
        message.ends_with("; never launched: no replica of warm pool py was ready within the task's timeout"),
        "{message}"
    );

    sim.kubectl_ok(&["annotate", "sandboxwarmpools", "py", "-n", "agenttask", "kubesim.agenttask.io/pool-"]);
    let waits = row(&pool, "agenttask", "waits").await;
    assert_ran(&waits, "0");
    let message = waits["message"].as_str().unwrap();
    assert!(message.contains("launched warm (pool py, after waiting"), "{message}");
    svc.stop().await;
    env.cleanup().await;
}

/// A claim that expires under its task (`kubesim.agenttask.io/expire-after-ms`, which reaches the
/// claim from the task's labels) takes its Sandbox and pod with it: the task ends `PodMissing`,
/// saying so. A restart mid-task adopts the running claim: one attempt, the same pod, the output.
/// A warm task past its timeout (counted from the hand-over: the pool's pod has no deadline of its
/// own) ends `TimedOut`, and a cancelled one `Cancelled`; both claims go, with their pods.
#[tokio::test]
async fn kube_sandbox_warm_claim_expiry_and_restart_mid_task() {
    let sim = warm_sim(4, &["agenttask"]);
    let (env, svc, pool) = warm_service(&sim, SandboxApiVersion::V1beta1).await;
    apply_program(
        &sim,
        "expires",
        "agenttask",
        "30",
        "  labels: {\"kubesim.agenttask.io/expire-after-ms\": \"10000\"}\n",
    );
    apply_program(&sim, "long", "agenttask", "6", "");
    // `expires` may already have ended by the time a loaded machine looks: its claim's clock
    // runs from when the emulator first saw it.
    eventually(WAIT, || async {
        ["Running", "Failed"].contains(&status_of(&sim, "expires", "agenttask")["phase"].as_str().unwrap_or(""))
    })
    .await;
    eventually(WAIT, || async { status_of(&sim, "long", "agenttask")["phase"] == "Running" }).await;
    let pod_name = status_of(&sim, "long", "agenttask")["podName"].as_str().unwrap().to_owned();
    let pod_uid = sim.json(&["get", "pod", &pod_name, "-n", "agenttask"])["metadata"]["uid"].clone();
    svc.stop().await;
    let svc = start_warm(&env, &sim).await;
    let e = row(&pool, "agenttask", "expires").await;
    assert_eq!((e["phase"].as_str(), e["reason"].as_str()), (Some("Failed"), Some("PodMissing")), "{e:#}");
    assert!(e["message"].as_str().unwrap().contains("disappeared (expired or deleted)"), "{e:#}");
    let long = row(&pool, "agenttask", "long").await;
    assert_ran(&long, "6");
    assert_eq!(long["attempt"], 1, "adopted, not retried");
    assert_eq!(status_of(&sim, "long", "agenttask")["podName"], pod_name.as_str());
    assert_eq!(sim.json(&["get", "pod", &pod_name, "-n", "agenttask"])["metadata"]["uid"], pod_uid, "the same pod");

    apply_program(&sim, "slow", "agenttask", "30", "  timeoutSeconds: 2\n");
    apply_program(&sim, "cancel", "agenttask", "30", "");
    eventually(WAIT, || async { status_of(&sim, "cancel", "agenttask")["phase"] == "Running" }).await;
    let cancel_pod = status_of(&sim, "cancel", "agenttask")["podName"].as_str().unwrap().to_owned();
    sim.kubectl_ok(&["delete", "at", "cancel", "-n", "agenttask", "--wait=false"]);
    let cancelled = row(&pool, "agenttask", "cancel").await;
    assert_eq!(cancelled["phase"], "Cancelled", "{cancelled:#}");
    eventually(WAIT, || async { gone(&sim, "at", "cancel") }).await;
    let slow = row(&pool, "agenttask", "slow").await;
    assert_eq!((slow["phase"].as_str(), slow["reason"].as_str()), (Some("Failed"), Some("TimedOut")), "{slow:#}");
    let slow_pod = status_of(&sim, "slow", "agenttask")["podName"].as_str().unwrap().to_owned();
    for (claim, pod) in [("cancel-a1", cancel_pod), ("slow-a1", slow_pod)] {
        eventually(WAIT, || async { gone(&sim, "sandboxclaim", claim) && gone(&sim, "pod", &pod) }).await;
    }
    svc.stop().await;
    env.cleanup().await;
}

/// A claim bound to a sandbox that never becomes Ready (`kubesim.agenttask.io/sandbox-ready:
/// never`, which reaches the claim from the task's labels; the pool's Ready sandbox it adopts is
/// not Ready from then on): the task is never handed over. It stays `Pending`, its status saying
/// why, also across a restart of the service, and at its timeout (counted from the claim) ends
/// `Failed`/`BackendError`, saying that the sandbox never became Ready and the task did not run.
/// Its claim goes, and with it the Sandbox and the pod; the pool refills; one result. A task
/// beside it runs warm, and the restart finds its hand-over recorded only as `connected` (as
/// after a crash between the agent's answer and the `done` record) with its pod already ended:
/// the agent took it, and its output is the result.
#[tokio::test]
async fn kube_sandbox_warm_claim_bound_to_a_sandbox_that_never_becomes_ready() {
    let sim = warm_sim(2, &["agenttask"]);
    let Started { env, svc, mut client, tenant } =
        started_with(WARM_TENANTS, |env| sandbox_settings(env, &sim, 20)).await;
    let mut never = task("never", &[("sandbox-ready", "never")]);
    never["timeout_seconds"] = json!(15);
    client.submit(&tenant, &never).await;
    let mut cut = task("cut", &[]);
    cut["code"] = json!("import time\ntime.sleep(3)\nprint('cut')");
    client.submit(&tenant, &cut).await;
    let pool = env.pg().await;
    eventually(WAIT, || async { phase(&pool, "never").await == "Pending" }).await;
    let at = format!("at-{}", task_id(&pool, "never").await);
    let claim_name = format!("{at}-a1");
    eventually(WAIT, || async {
        sim.kubectl(&["get", "at", &at, "-n", "agenttask"]).status.success()
            && status_of(&sim, &at, "agenttask")["message"].as_str().is_some_and(|m| m.contains("is not Ready"))
    })
    .await;
    let st = status_of(&sim, &at, "agenttask");
    assert_eq!(st["phase"], "Pending", "{st:#}");
    let message = st["message"].as_str().unwrap();
    assert!(message.contains("(DependenciesNotReady: Pod is Running but not Ready)"), "{message}");
    let claim = sim.json(&["get", "sandboxclaim", &claim_name, "-n", "agenttask"]);
    let bound = claim["status"]["sandbox"]["name"].as_str().unwrap().to_owned();
    assert!(message.contains(&format!("claimed sandbox {bound} of warm pool py")), "{message}");
    assert_eq!(claim["metadata"]["annotations"]["kubesim.agenttask.io/sandbox-ready"], "never", "{claim:#}");
    assert!(claim["metadata"]["annotations"].get("agenttask.io/handoff").is_none(), "never handed over: {claim:#}");
    let sb = sim.json(&["get", "sandbox", &bound, "-n", "agenttask"]);
    assert_eq!(sb["metadata"]["ownerReferences"][0]["kind"], "SandboxClaim", "adopted from the pool: {sb:#}");
    assert_eq!(sim.json(&["get", "pod", &bound, "-n", "agenttask"])["status"]["phase"], "Running");

    // A restart while it waits: the new process follows the same claim to the same deadline.
    eventually(WAIT, || async { phase(&pool, "cut").await == "Running" }).await;
    let cut_claim = format!("at-{}-a1", task_id(&pool, "cut").await);
    let claim = sim.json(&["get", "sandboxclaim", &cut_claim, "-n", "agenttask"]);
    assert!(claim["metadata"]["annotations"]["agenttask.io/handoff"].as_str().unwrap().starts_with("done "));
    let cut_pod = claim["status"]["sandbox"]["name"].as_str().unwrap().to_owned();
    svc.stop().await;
    let connected = "agenttask.io/handoff=connected";
    sim.kubectl_ok(&["annotate", "sandboxclaim", &cut_claim, "-n", "agenttask", "--overwrite", connected]);
    eventually(WAIT, || async {
        sim.json(&["get", "pod", &cut_pod, "-n", "agenttask"])["status"]["phase"] == "Succeeded"
    })
    .await;
    let svc = env.start_with(sandbox_settings(&env, &sim, 20)).await;
    let r = results(&mut client, 2, WAIT).await;
    let n = &r["never"];
    assert_eq!(
        (n["phase"].as_str(), n["reason"].as_str(), n["backend"].as_str(), &n["exit_code"]),
        (Some("Failed"), Some("BackendError"), Some("sandbox"), &Value::Null),
        "{n:#}"
    );
    let message = n["message"].as_str().unwrap();
    assert!(
        message.contains(&format!(
            "the claimed sandbox {bound} never became Ready within the task's timeout of 15s (DependenciesNotReady: \
             Pod is Running but not Ready); the task was never handed to it and did not run"
        )),
        "{message}"
    );
    assert!(message.ends_with("; launched warm (pool py)"), "{message}");
    let cut = &r["cut"];
    assert_eq!((cut["phase"].as_str(), cut["stdout"].as_str()), (Some("Succeeded"), Some("cut\n")), "{cut:#}");
    let attempt: i32 = sqlx::query_scalar("select attempt from agenttask.tasks where client_id = 'never'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(attempt, 1, "adopted across the restart, not retried");
    assert!(client.more(Duration::from_secs(2)).await.is_none(), "exactly one result each");
    eventually(WAIT, || async {
        gone(&sim, "sandboxclaim", &claim_name) && gone(&sim, "sandbox", &bound) && gone(&sim, "pod", &bound)
    })
    .await;
    wait_ready_replicas(&sim, "agenttask", 2);
    svc.stop().await;
    env.cleanup().await;
}

/// A claim that only our labels tie to a task, as `agenttask render` prints it, applied by hand
/// (no ownerReference; its AgentTask never existed), and a claim that is not ours.
const ORPHAN_CLAIMS: &str = r#"apiVersion: extensions.agents.x-k8s.io/v1beta1
kind: SandboxClaim
metadata:
  name: at-ghost-a1
  namespace: agenttask
  labels:
    app.kubernetes.io/managed-by: agenttask
    agenttask.io/agenttask: at-ghost
spec:
  warmPoolRef: {name: py}
  lifecycle: {shutdownPolicy: Delete}
---
apiVersion: extensions.agents.x-k8s.io/v1beta1
kind: SandboxClaim
metadata:
  name: someone-elses
  namespace: agenttask
spec:
  warmPoolRef: {name: py}
"#;

/// The orphan sweep removes SandboxClaims of ours whose AgentTask is gone, which the garbage
/// collector cannot see (no ownerReference): one applied by hand, and a finished task's whose
/// ownerReference was removed by hand before its AgentTask was deleted (its finalizer removed,
/// while no service ran). With each go its claimed Sandbox and pod. A claim that is not ours, and
/// a live task's claim, are left alone.
#[tokio::test]
async fn kube_sandbox_warm_orphan_claims_are_swept() {
    let sim = warm_sim(4, &["agenttask"]);
    let file = sim.dir.path().join("orphan-claims.yaml");
    std::fs::write(&file, ORPHAN_CLAIMS).unwrap();
    sim.kubectl_ok(&["apply", "-f", file.to_str().unwrap()]);
    let bound_of = |name: &str| {
        let c = sim.json(&["get", "sandboxclaim", name, "-n", "agenttask"]);
        c["status"]["sandbox"]["name"].as_str().map(String::from)
    };
    let start = std::time::Instant::now();
    while bound_of("at-ghost-a1").is_none() || bound_of("someone-elses").is_none() {
        assert!(start.elapsed() < WAIT, "the hand-made claims were never bound");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ghost, foreign) = (bound_of("at-ghost-a1").unwrap(), bound_of("someone-elses").unwrap());
    let (env, svc, pool) = warm_service(&sim, SandboxApiVersion::V1beta1).await;
    // A finished task whose claim becomes an orphan, and a live one running while the sweep runs.
    apply_program(&sim, "dropped", "agenttask", "0", "");
    assert_ran(&row(&pool, "agenttask", "dropped").await, "0");
    let dropped = status_of(&sim, "dropped", "agenttask")["podName"].as_str().unwrap().to_owned();
    sim.kubectl_ok(&[
        "patch",
        "sandboxclaim",
        "dropped-a1",
        "-n",
        "agenttask",
        "--type=json",
        "-p",
        r#"[{"op": "remove", "path": "/metadata/ownerReferences"}]"#,
    ]);
    svc.stop().await;
    // Gone while no service ran, its finalizer removed by hand: nothing cleaned up after it.
    sim.kubectl_ok(&[
        "patch",
        "at",
        "dropped",
        "-n",
        "agenttask",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ]);
    sim.kubectl_ok(&["delete", "at", "dropped", "-n", "agenttask", "--wait=true"]);
    sim.kubectl_ok(&["get", "sandboxclaim", "dropped-a1", "-n", "agenttask"]);
    let svc = start_warm(&env, &sim).await;
    apply_program(&sim, "live", "agenttask", "4", "");
    eventually(WAIT, || async { status_of(&sim, "live", "agenttask")["phase"] == "Running" }).await;
    for (claim, sandbox) in [("at-ghost-a1", &ghost), ("dropped-a1", &dropped)] {
        eventually(WAIT, || async {
            gone(&sim, "sandboxclaim", claim) && gone(&sim, "sandbox", sandbox) && gone(&sim, "pod", sandbox)
        })
        .await;
    }
    assert_ran(&row(&pool, "agenttask", "live").await, "4");
    sim.kubectl_ok(&["get", "sandboxclaim", "live-a1", "-n", "agenttask"]);
    sim.kubectl_ok(&["get", "sandboxclaim", "someone-elses", "-n", "agenttask"]);
    sim.kubectl_ok(&["get", "pod", &foreign, "-n", "agenttask"]);
    svc.stop().await;
    env.cleanup().await;
}
