//! The Kubernetes backend against the API emulator (`agenttask-kubesim --kubelet simulate`):
//! every test has its own emulator on its own port, its own database and its own tenants. The
//! simulated kubelet takes its script from pod annotations, which reach the pod from the task's
//! labels because the tests allow the emulator's prefix (`--pod-annotation-prefixes`).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use agenttask::config::{BackendKind, Component, Settings};

use crate::support::*;

pub(crate) const WAIT: Duration = Duration::from_secs(60);

/// A running emulator, killed on drop.
pub struct Sim {
    child: Child,
    pub dir: tempfile::TempDir,
}

static BUILD: Mutex<()> = Mutex::new(());

/// The emulator binary next to this test's (built by `cargo test --workspace`; built here
/// when only this package's tests were built).
fn kubesim_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("agenttask-kubesim");
    let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    if !bin.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "agenttask-kubesim"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building agenttask-kubesim failed");
    }
    bin
}

impl Sim {
    /// An emulator whose kubelet plays each pod's script (annotations).
    pub fn start() -> Sim {
        Sim::start_with("simulate")
    }

    /// An emulator with the given kubelet: `simulate`, or `exec` (runs the containers for real).
    pub fn start_with(kubelet: &str) -> Sim {
        Sim::start_with_args(kubelet, &[])
    }

    /// An emulator with the given kubelet and more of its flags.
    pub fn start_with_args(kubelet: &str, more: &[&str]) -> Sim {
        let mut child = Command::new(kubesim_bin())
            .args(["--addr", "127.0.0.1:0", "--kubelet", kubelet])
            .args(more)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("agenttask-kubesim starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let url = line.trim().to_owned();
        assert!(url.starts_with("http://127.0.0.1:"), "{url:?}");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("kubeconfig"),
            format!("apiVersion: v1\nkind: Config\nclusters:\n- name: sim\n  cluster:\n    server: {url}\ncontexts:\n- name: sim\n  context:\n    cluster: sim\n    user: sim\n    namespace: agenttask\ncurrent-context: sim\nusers:\n- name: sim\n  user: {{}}\n"),
        )
        .unwrap();
        let sim = Sim { child, dir };
        // What an operator does: the CRD (as generated), the task namespace, the RuntimeClass.
        let root = env!("CARGO_MANIFEST_DIR");
        sim.kubectl_ok(&["apply", "--server-side", "-f", &format!("{root}/deploy/crd.yaml")]);
        sim.kubectl_ok(&["apply", "--server-side", "-f", &format!("{root}/deploy/kubernetes/namespaces.yaml")]);
        sim.kubectl_ok(&[
            "apply",
            "--server-side",
            "-f",
            &format!("{root}/deploy/kubernetes/runtimeclass-gvisor.yaml"),
        ]);
        sim
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// The machine's real kubectl against this emulator.
    pub fn kubectl(&self, args: &[&str]) -> std::process::Output {
        Command::new("/usr/bin/kubectl")
            .env("KUBECONFIG", self.kubeconfig())
            .env("HOME", self.dir.path())
            .arg("--cache-dir")
            .arg(self.dir.path().join("cache"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("kubectl runs")
    }

    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        serde_json::from_str(&self.kubectl_ok(&a)).unwrap()
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn kube_settings(env: &Env, sim: &Sim, max_running: u32) -> Settings {
    let mut s = env.settings(&Component::ALL);
    s.backend = BackendKind::Kubernetes;
    s.max_running = max_running;
    s.kube.kubeconfig = Some(sim.kubeconfig());
    s.kube.pods.annotation_prefixes = vec!["kubesim.agenttask.io/".into()];
    s.kube.image_pull_grace = Duration::from_secs(1);
    s.kube.orphan_sweep_every = Duration::from_secs(1);
    s
}

/// A task whose simulated pod does what `script` says (kubesim annotations, without prefix).
pub(crate) fn task(id: &str, script: &[(&str, &str)]) -> Value {
    let labels: serde_json::Map<String, Value> =
        script.iter().map(|(k, v)| (format!("kubesim.agenttask.io/{k}"), json!(v))).collect();
    json!({"id": id, "language": "python", "code": "print('hi')", "labels": labels, "timeout_seconds": 30})
}

pub(crate) async fn results(client: &mut Client, n: usize, within: Duration) -> HashMap<String, Value> {
    let mut out = HashMap::new();
    let end = Instant::now() + within;
    while out.len() < n {
        let left = end.saturating_duration_since(Instant::now());
        let (r, _) = client.next(left).await;
        out.insert(r["id"].as_str().unwrap_or_default().to_owned(), r);
    }
    out
}

/// What a task of [`every_reason`] must end as: its id, phase and reason.
pub(crate) type Expected = (&'static str, &'static str, Value);

/// A task for each way a simulated pod ends, and what each must end as. With `vanish`, also a
/// pod that disappears (not under agent-sandbox, which would make the pod again).
pub(crate) fn every_reason(vanish: bool) -> (Vec<Value>, Vec<Expected>) {
    let mut gvisor = task("gvisor", &[("stdout", "sandboxed\n")]);
    gvisor["isolation"] = json!("gvisor");
    let mut deadline = task("deadline", &[("outcome", "DeadlineExceeded")]);
    deadline["timeout_seconds"] = json!(1);
    let mut tasks = vec![
        task("ok", &[("stdout", "hello\n"), ("termination-message", "{\"answer\": 42}")]),
        task("stderr", &[("stdout", "out\n==agenttask:stderr==\nerr-text"), ("exit-code", "3")]),
        task("oom", &[("outcome", "OOMKilled")]),
        deadline,
        task("pull", &[("outcome", "ErrImagePull")]),
    ];
    let mut expect = vec![
        ("ok", "Succeeded", Value::Null),
        ("stderr", "Failed", json!("NonZeroExit")),
        ("oom", "Failed", json!("OOMKilled")),
        ("deadline", "Failed", json!("TimedOut")),
        ("pull", "Failed", json!("ImagePullFailed")),
    ];
    if vanish {
        tasks.push(task("vanish", &[("outcome", "vanish"), ("run-ms", "500")]));
        expect.push(("vanish", "Failed", json!("PodMissing")));
    }
    tasks.push(gvisor);
    expect.push(("gvisor", "Succeeded", Value::Null));
    (tasks, expect)
}

/// Each of [`every_reason`]'s results ended as expected, on the backend `backend` names for its
/// id; and the outputs of `ok` and `stderr` came through.
pub(crate) fn assert_every_reason(
    r: &HashMap<String, Value>,
    expect: &[Expected],
    backend: impl Fn(&str) -> &'static str,
) {
    for (id, phase, reason) in expect {
        let res = &r[*id];
        assert_eq!((res["phase"].as_str(), &res["reason"]), (Some(*phase), reason), "{id}: {res:#}");
        assert_eq!(res["backend"], backend(id), "{id}: {res:#}");
    }
    assert_eq!(r["ok"]["stdout"], "hello\n");
    assert_eq!(r["ok"]["result"], json!({"answer": 42}));
    assert_eq!((r["stderr"]["stdout"].as_str(), r["stderr"]["stderr"].as_str()), (Some("out"), Some("err-text")));
}

/// Cancels a task through the task API, as the admin; the API must accept.
pub(crate) async fn cancel_through_api(svc: &Service, id: &str) {
    let resp = reqwest::Client::new()
        .post(format!("http://{}/v1/tasks/{id}/cancel", svc.http_addr))
        .bearer_auth("test-admin-token")
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
}

/// The next result is the task `long`'s, which ran through a restart of the service: it
/// succeeded with its output, in the attempt that was running (adopted, not retried).
async fn assert_long_survived(client: &mut Client, pool: &sqlx::PgPool) {
    let (r, _) = client.next(WAIT).await;
    assert_eq!(
        (r["id"].as_str(), r["phase"].as_str(), r["stdout"].as_str()),
        (Some("long"), Some("Succeeded"), Some("survived\n")),
        "{r:#}"
    );
    let attempts: i32 = sqlx::query_scalar("select attempt from agenttask.tasks where client_id = 'long'")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(attempts, 1, "adopted, not retried");
}

pub(crate) const TENANTS: &str =
    "[tenants.{t}-a]\nmax_concurrency = 100\nrate_per_second = 1000\nisolation = [\"standard\", \"gvisor\"]\n";

#[tokio::test]
async fn kube_every_reason_reaches_the_result_the_row_and_the_agenttask_status() {
    let sim = Sim::start();
    let Started { env, svc, mut client, tenant } = started_with(TENANTS, |env| kube_settings(env, &sim, 20)).await;
    let (tasks, expect) = every_reason(true);
    for t in &tasks {
        client.submit(&tenant, t).await;
    }
    let r = results(&mut client, tasks.len(), WAIT).await;
    assert_every_reason(&r, &expect, |id| if id == "gvisor" { "runtimeclass" } else { "podjob" });
    assert_eq!(r["ok"]["exit_code"], 0);
    assert_eq!(r["stderr"]["exit_code"], 3);
    assert!(r["pull"]["message"].as_str().unwrap().contains("image could not be pulled"), "{:#}", r["pull"]);

    // The AgentTasks' status says the same, and `kubectl get at` shows it.
    let pool = env.pg().await;
    for (id, phase, reason) in &expect {
        let name = format!("at-{}", task_id(&pool, id).await);
        let at = sim.json(&["get", "agenttask", &name, "-n", "agenttask"]);
        assert_eq!(at["status"]["phase"], *phase, "{id}: {at:#}");
        assert_eq!(at["status"]["reason"].as_str(), reason.as_str(), "{id}: {at:#}");
        assert_eq!(at["status"]["tenant"], tenant.as_str());
        let conds: Vec<&str> =
            at["status"]["conditions"].as_array().unwrap().iter().map(|c| c["type"].as_str().unwrap()).collect();
        assert!(conds.contains(&"Finished"), "{id}: {conds:?}");
    }
    let table = sim.kubectl_ok(&["get", "at", "-n", "agenttask"]);
    assert!(table.contains("TENANT") && table.contains("OOMKilled") && table.contains(&tenant), "{table}");

    // The pod of the gvisor task runs under its RuntimeClass; every pod is hardened, and each
    // task has its default-deny NetworkPolicy.
    let gid = task_id(&pool, "gvisor").await;
    let pod = sim.json(&["get", "pod", &format!("at-{gid}-a1"), "-n", "agenttask"]);
    assert_eq!(pod["spec"]["runtimeClassName"], "gvisor");
    assert_eq!(pod["spec"]["automountServiceAccountToken"], false);
    assert_eq!(pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(pod["metadata"]["ownerReferences"][0]["kind"], "AgentTask");
    let np = sim.json(&["get", "networkpolicy", &format!("at-{gid}-deny-all"), "-n", "agenttask"]);
    assert_eq!(np["spec"]["policyTypes"], json!(["Ingress", "Egress"]));

    // Events per transition, and real reconcile metrics.
    let events = sim.kubectl_ok(&["get", "events", "-n", "agenttask"]);
    for reason in ["Created", "Running", "OOMKilled", "ImagePullFailed"] {
        assert!(events.contains(reason), "no {reason} Event:\n{events}");
    }
    let metrics = reqwest::get(format!("http://{}/metrics", svc.http_addr)).await.unwrap().text().await.unwrap();
    let count: f64 = metrics
        .lines()
        .find(|l| l.starts_with("agenttask_reconcile_duration_seconds_count"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(count >= 7.0, "reconcile count {count}\n{metrics}");
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn kube_cancel_through_the_api_and_deleting_the_agenttask_both_end_cancelled() {
    let sim = Sim::start();
    let Started { env, svc, mut client, tenant } = started_with(TENANTS, |env| kube_settings(env, &sim, 10)).await;
    client.submit(&tenant, &task("api", &[("run-ms", "60000")])).await;
    client.submit(&tenant, &task("kubectl", &[("run-ms", "60000")])).await;
    let pool = env.pg().await;
    for id in ["api", "kubectl"] {
        eventually(WAIT, || async { phase(&pool, id).await == "Running" }).await;
    }
    let api_id = task_id(&pool, "api").await;
    cancel_through_api(&svc, &api_id).await;
    let kubectl_id = task_id(&pool, "kubectl").await;
    sim.kubectl_ok(&["delete", "at", &format!("at-{kubectl_id}"), "-n", "agenttask", "--wait=false"]);
    let r = results(&mut client, 2, WAIT).await;
    for id in ["api", "kubectl"] {
        assert_eq!(
            (r[id]["phase"].as_str(), r[id]["reason"].as_str()),
            (Some("Cancelled"), Some("Cancelled")),
            "{id}: {:#}",
            r[id]
        );
    }
    // Both AgentTasks and their pods are gone.
    for tid in [&api_id, &kubectl_id] {
        let at = format!("at-{tid}");
        eventually(WAIT, || async { !sim.kubectl(&["get", "at", &at, "-n", "agenttask"]).status.success() }).await;
        let pod = format!("at-{tid}-a1");
        eventually(WAIT, || async { !sim.kubectl(&["get", "pod", &pod, "-n", "agenttask"]).status.success() }).await;
    }
    assert!(client.more(Duration::from_secs(2)).await.is_none(), "exactly one result each");
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn kube_a_restart_mid_task_adopts_the_pod_without_a_second_one() {
    let sim = Sim::start();
    let Started { env, svc, mut client, tenant } = started_with(TENANTS, |env| kube_settings(env, &sim, 10)).await;
    client.submit(&tenant, &task("long", &[("run-ms", "6000"), ("stdout", "survived\n")])).await;
    let pool = env.pg().await;
    eventually(WAIT, || async { phase(&pool, "long").await == "Running" }).await;
    let tid = task_id(&pool, "long").await;
    let before = sim.json(&["get", "pods", "-n", "agenttask", "-l", &format!("agenttask.io/task-id={tid}")]);
    assert_eq!(before["items"].as_array().unwrap().len(), 1);
    let uid = before["items"][0]["metadata"]["uid"].clone();
    svc.stop().await;
    // The pod keeps running while no service is up.
    let pod = sim.json(&["get", "pod", &format!("at-{tid}-a1"), "-n", "agenttask"]);
    assert_eq!(pod["status"]["phase"], "Running");
    let svc = env.start_with(kube_settings(&env, &sim, 10)).await;
    assert_long_survived(&mut client, &pool).await;
    let after = sim.json(&["get", "pods", "-n", "agenttask", "-l", &format!("agenttask.io/task-id={tid}")]);
    let items = after["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "no second pod");
    assert_eq!(items[0]["metadata"]["uid"], uid);
    assert!(client.more(Duration::from_secs(2)).await.is_none(), "exactly one result");
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn kube_finished_agenttasks_expire_and_orphans_are_swept() {
    let sim = Sim::start();
    let env = Env::new(TENANTS).await;
    let mut settings = kube_settings(&env, &sim, 10);
    settings.kube.ttl_seconds_after_finished = 2;
    // An orphan: one of our ConfigMaps whose AgentTask does not exist.
    let cms = sim.dir.path().join("cms.yaml");
    std::fs::write(&cms, "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: at-ghost-in-00\n  namespace: agenttask\n  labels:\n    app.kubernetes.io/managed-by: agenttask\n    agenttask.io/agenttask: at-ghost\ndata:\n  manifest: \"\"\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: someone-elses\n  namespace: agenttask\ndata:\n  a: b\n").unwrap();
    // The second one is not ours: it is left alone.
    sim.kubectl_ok(&["apply", "-f", cms.to_str().unwrap()]);
    let svc = env.start_with(settings).await;
    let mut client = Client::new(&env).await;
    client.submit(&env.tenant("a"), &task("short", &[])).await;
    let (r, _) = client.next(WAIT).await;
    assert_eq!(r["phase"], "Succeeded", "{r:#}");
    let pool = env.pg().await;
    let at = format!("at-{}", task_id(&pool, "short").await);
    let seen = sim.json(&["get", "at", &at, "-n", "agenttask"]);
    assert_eq!(seen["status"]["phase"], "Succeeded");
    assert_eq!(seen["spec"]["ttlSecondsAfterFinished"], 2);
    eventually(WAIT, || async { !sim.kubectl(&["get", "at", &at, "-n", "agenttask"]).status.success() }).await;
    eventually(WAIT, || async {
        !sim.kubectl(&["get", "configmap", "at-ghost-in-00", "-n", "agenttask"]).status.success()
    })
    .await;
    sim.kubectl_ok(&["get", "configmap", "someone-elses", "-n", "agenttask"]);
    svc.stop().await;
    env.cleanup().await;
}

/// An AgentTask manifest in `ns` with this spec (YAML, indented under `spec:`).
pub(crate) fn agenttask_yaml(name: &str, ns: &str, spec: &str) -> String {
    format!("apiVersion: agenttask.io/v1alpha1\nkind: AgentTask\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{spec}")
}

pub(crate) fn status_of(sim: &Sim, name: &str, ns: &str) -> Value {
    sim.json(&["get", "at", name, "-n", ns])["status"].clone()
}

pub(crate) async fn ended(sim: &Sim, name: &str, ns: &str) -> Value {
    eventually(WAIT, || async {
        status_of(sim, name, ns)["phase"]
            .as_str()
            .is_some_and(|p| ["Succeeded", "Failed", "Rejected", "Cancelled"].contains(&p))
    })
    .await;
    status_of(sim, name, ns)
}

#[tokio::test]
async fn kube_agenttasks_applied_with_kubectl_run_as_their_namespaces_tenant() {
    let sim = Sim::start();
    let env =
        Env::new(&format!("{TENANTS}namespaces = [\"evals\"]\nmax_timeout_seconds = 60\n[tenants.{{t}}-b]\n")).await;
    // No publisher: every result queued for publishing stays in the outbox, to be counted.
    let mut settings = kube_settings(&env, &sim, 10);
    settings.components = vec![Component::Ingest, Component::Scheduler, Component::Executor, Component::Http];
    let svc = env.start_with(settings).await;
    let client = Client::new(&env).await;
    let pool = env.pg().await;
    sim.kubectl_ok(&["create", "namespace", "evals"]);
    let apply = |name: &str, ns: &str, spec: &str| {
        let path = sim.dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, agenttask_yaml(name, ns, spec)).unwrap();
        sim.kubectl(&["apply", "-f", path.to_str().unwrap()])
    };
    let ok = |out: std::process::Output| assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // A valid task in a tenant's namespace runs, and its outcome is in its status and in SQL.
    ok(apply(
        "direct",
        "evals",
        "  language: python\n  code: print(1)\n  tenant: someone-else\n  labels:\n    kubesim.agenttask.io/stdout: \"hi\\n\"\n",
    ));
    let st = ended(&sim, "direct", "evals").await;
    assert_eq!(st["phase"], "Succeeded", "{st:#}");
    assert_eq!(st["tenant"], env.tenant("a"), "the namespace decides the tenant, not spec.tenant");
    // The executor records what the status says, just after it.
    eventually(WAIT, || async {
        sqlx::query_scalar::<_, String>("select phase from agenttask.tasks where kube_object = 'evals/direct'")
            .fetch_optional(&pool)
            .await
            .unwrap()
            .is_some_and(|p| p == "Succeeded")
    })
    .await;
    let row: (String, String, Option<String>) =
        sqlx::query_as("select tenant, phase, backend from agenttask.tasks where kube_object = 'evals/direct'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(row, (env.tenant("a"), "Succeeded".to_owned(), Some("podjob".to_owned())));
    let visible: i64 =
        sqlx::query_scalar("select count(*) from agenttask.task_results where tenant = $1 and phase = 'Succeeded'")
            .bind(env.tenant("a"))
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(visible, 1, "queryable like any task");
    let pods = sim.json(&["get", "pods", "-n", "evals", "-l", "agenttask.io/agenttask=direct"]);
    assert_eq!(pods["items"].as_array().unwrap().len(), 1, "{pods:#}");

    // A namespace that maps to no tenant.
    ok(apply("stray", "agenttask", "  language: python\n  code: print(1)\n"));
    let st = ended(&sim, "stray", "agenttask").await;
    assert_eq!((st["phase"].as_str(), st["reason"].as_str()), (Some("Rejected"), Some("UnknownTenant")), "{st:#}");

    // The ingest validator applies: over the tenant's max_timeout_seconds, a reserved env name.
    ok(apply("too-long", "evals", "  language: r\n  code: cat(1)\n  timeoutSeconds: 3600\n"));
    ok(apply(
        "reserved",
        "evals",
        "  language: python\n  code: print(1)\n  env:\n    AGENTTASK_RESULT_FILE: /etc/passwd\n",
    ));
    for name in ["too-long", "reserved"] {
        let st = ended(&sim, name, "evals").await;
        assert_eq!(
            (st["phase"].as_str(), st["reason"].as_str()),
            (Some("Rejected"), Some("ValidationFailed")),
            "{name}: {st:#}"
        );
        let phase: String = sqlx::query_scalar("select phase from agenttask.tasks where kube_object = $1")
            .bind(format!("evals/{name}"))
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(phase, "Rejected");
    }
    let st = status_of(&sim, "too-long", "evals");
    assert!(st["message"].as_str().unwrap().contains("timeout"), "{st:#}");

    // An admission written by hand is no admission: no pod, and the object says why.
    let forged = format!(
        "  language: python\n  code: print(1)\n  admission:\n    taskId: {}\n    attempt: 1\n",
        uuid::Uuid::new_v4()
    );
    ok(apply("forged", "evals", &forged));
    let st = ended(&sim, "forged", "evals").await;
    assert_eq!((st["phase"].as_str(), st["reason"].as_str()), (Some("Rejected"), Some("ValidationFailed")), "{st:#}");
    let pods = sim.json(&["get", "pods", "-n", "evals", "-l", "agenttask.io/agenttask=forged"]);
    assert!(pods["items"].as_array().unwrap().is_empty(), "{pods:#}");

    // kubectl's table shows the tenant, phase and reason columns.
    let table = sim.kubectl_ok(&["get", "at", "-n", "evals"]);
    assert!(
        table.lines().any(|l| l.starts_with("direct") && l.contains(&env.tenant("a")) && l.contains("Succeeded")),
        "{table}"
    );

    // No reply queue: nothing is queued for publishing for kubectl's tasks, while a task from
    // RabbitMQ (the control) has its result waiting in the outbox.
    client.submit(&env.tenant("a"), &task("control", &[])).await;
    eventually(WAIT, || async { phase(&pool, "control").await == "Succeeded" }).await;
    let queued: Vec<(Option<String>,)> = sqlx::query_as(
        "select t.kube_object from agenttask.outbox o join agenttask.tasks t on t.task_id = o.message_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(queued, vec![(None,)], "only the control's result");

    // The schema refuses at the API server what it can express.
    let out = apply("bad", "evals", "  language: cobol\n  code: x\n  priority: 1000\n");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("language") && err.contains("priority"), "{err}");
    svc.stop().await;
    env.cleanup().await;
}

/// Deleting a user's AgentTask that still waits for admission cancels its task in SQL too.
#[tokio::test]
async fn kube_deleting_a_queued_kubectl_agenttask_cancels_its_task() {
    let sim = Sim::start();
    let env = Env::new("[tenants.{t}-a]\nmax_concurrency = 1\nnamespaces = [\"evals\"]\n").await;
    let svc = env.start_with(kube_settings(&env, &sim, 10)).await;
    let pool = env.pg().await;
    sim.kubectl_ok(&["create", "namespace", "evals"]);
    let apply = |name: &str, spec: &str| {
        let path = sim.dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, agenttask_yaml(name, "evals", spec)).unwrap();
        sim.kubectl_ok(&["apply", "-f", path.to_str().unwrap()]);
    };
    // The first holds the tenant's only slot for a while; the second waits behind it.
    apply("long", "  language: python\n  code: print(1)\n  labels:\n    kubesim.agenttask.io/run-ms: \"20000\"\n");
    eventually(WAIT, || async { status_of(&sim, "long", "evals")["phase"] == "Running" }).await;
    apply("waits", "  language: python\n  code: print(2)\n");
    eventually(WAIT, || async { status_of(&sim, "waits", "evals")["phase"] == "Queued" }).await;
    let row = |name: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, String>("select phase from agenttask.tasks where kube_object = $1")
                .bind(format!("evals/{name}"))
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(row("waits").await, "Queued");
    sim.kubectl_ok(&["delete", "at", "waits", "-n", "evals", "--wait=false"]);
    eventually(WAIT, || async { row("waits").await == "Cancelled" }).await;
    eventually(WAIT, || async { !sim.kubectl(&["get", "at", "waits", "-n", "evals"]).status.success() }).await;
    // The running one is untouched.
    assert_eq!(status_of(&sim, "long", "evals")["phase"], "Running");
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn kube_namespace_per_tenant_maps_namespaces_to_tenants() {
    let sim = Sim::start();
    let env = Env::new(TENANTS).await;
    let mut settings = kube_settings(&env, &sim, 10);
    settings.kube.namespaces = agenttask::kube::Namespaces::PerTenant { prefix: "agenttask-".into() };
    let tenant = env.tenant("a");
    let ns = format!("agenttask-{tenant}");
    sim.kubectl_ok(&["create", "namespace", &ns]);
    let svc = env.start_with(settings).await;
    let mut client = Client::new(&env).await;
    // From RabbitMQ: the AgentTask and its pod go to the tenant's namespace.
    client.submit(&tenant, &task("queued", &[("stdout", "q\n")])).await;
    let (r, _) = client.next(WAIT).await;
    assert_eq!((r["phase"].as_str(), r["stdout"].as_str()), (Some("Succeeded"), Some("q\n")), "{r:#}");
    let pool = env.pg().await;
    let at = format!("at-{}", task_id(&pool, "queued").await);
    assert_eq!(sim.json(&["get", "at", &at, "-n", &ns])["status"]["phase"], "Succeeded");
    // Applied directly in that namespace: the same tenant.
    let path = sim.dir.path().join("d.yaml");
    std::fs::write(&path, agenttask_yaml("direct", &ns, "  language: python\n  code: print(2)\n")).unwrap();
    sim.kubectl_ok(&["apply", "-f", path.to_str().unwrap()]);
    let st = ended(&sim, "direct", &ns).await;
    assert_eq!((st["phase"].as_str(), st["tenant"].as_str()), (Some("Succeeded"), Some(tenant.as_str())), "{st:#}");
    svc.stop().await;
    env.cleanup().await;
}

/// From a RabbitMQ message to the reply, with real Python and R in the pods (the emulator's
/// `exec` kubelet runs the pod's command under bubblewrap), through the hardened pod's entry
/// script, its ConfigMap inputs, its log and its termination message.
#[tokio::test]
async fn kube_exec_kubelet_runs_real_python_and_r_end_to_end() {
    let sim = Sim::start_with("exec");
    let Started { env, svc, mut client, tenant } = started_with(TENANTS, |env| kube_settings(env, &sim, 10)).await;
    let py = "import json, os, sys\n\
              data = open('numbers.txt').read().split()\n\
              total = sum(int(x) for x in data)\n\
              print('total', total)\n\
              print('to stderr', file=sys.stderr)\n\
              json.dump({'total': total, 'argv': sys.argv[1:]}, open(os.environ['AGENTTASK_RESULT_FILE'], 'w'))\n";
    client
        .submit(
            &tenant,
            &json!({"id": "py", "language": "python", "code": py, "args": ["x"], "timeout_seconds": 60,
                    "files": {"numbers.txt": {"content": "1 2 3 4"}}}),
        )
        .await;
    let r_code = "x <- c(2, 3, 5)\ncat('sum', sum(x), '\\n')\nwriteLines('{\"ok\": true}', Sys.getenv('AGENTTASK_RESULT_FILE'))\n";
    client.submit(&tenant, &json!({"id": "r", "language": "r", "code": r_code, "timeout_seconds": 60})).await;
    client
        .submit(
            &tenant,
            &json!({"id": "fails", "language": "python", "code": "raise SystemExit(3)", "timeout_seconds": 60}),
        )
        .await;
    let got = results(&mut client, 3, Duration::from_secs(180)).await;
    let py = &got["py"];
    assert_eq!((py["phase"].as_str(), py["backend"].as_str()), (Some("Succeeded"), Some("podjob")), "{py:#}");
    assert_eq!(py["stdout"], "total 10\n", "{py:#}");
    assert_eq!(py["stderr"], "to stderr\n", "{py:#}");
    assert_eq!(py["result"], json!({"total": 10, "argv": ["x"]}), "{py:#}");
    let r = &got["r"];
    assert_eq!(r["phase"], "Succeeded", "{r:#}");
    assert_eq!(r["stdout"], "sum 10 \n", "{r:#}");
    assert_eq!(r["result"], json!({"ok": true}), "{r:#}");
    let fails = &got["fails"];
    assert_eq!(
        (fails["phase"].as_str(), fails["reason"].as_str(), fails["exit_code"].as_i64()),
        (Some("Failed"), Some("NonZeroExit"), Some(3)),
        "{fails:#}"
    );
    // Without an artifacts claim nothing under AGENTTASK_ARTIFACTS_DIR is kept, and the
    // result says so.
    assert_eq!(py["artifacts"], json!([]), "{py:#}");
    assert!(py["message"].as_str().unwrap().contains("only with --artifacts-pvc"), "{py:#}");

    // `logs?follow=true` streams the pod's output while it runs, and ends with the task.
    let code = "import time\nprint('first', flush=True)\ntime.sleep(4)\nprint('second')\n";
    client.submit(&tenant, &json!({"id": "talks", "language": "python", "code": code, "timeout_seconds": 60})).await;
    let pool = env.pg().await;
    eventually(WAIT, || async { phase(&pool, "talks").await == "Running" }).await;
    let url = format!("http://{}/v1/tasks/{}/logs?follow=true", svc.http_addr, task_id(&pool, "talks").await);
    let mut resp = reqwest::Client::new().get(&url).bearer_auth("test-admin-token").send().await.unwrap();
    assert!(resp.status().is_success());
    let mut seen = Vec::new();
    while !seen.starts_with(b"first\n") {
        let chunk =
            tokio::time::timeout(WAIT, resp.chunk()).await.expect("output while running").unwrap().expect("more");
        seen.extend_from_slice(&chunk);
    }
    assert_eq!(phase(&pool, "talks").await, "Running", "streamed while the program still sleeps");
    while let Some(chunk) = tokio::time::timeout(WAIT, resp.chunk()).await.expect("the rest").unwrap() {
        seen.extend_from_slice(&chunk);
    }
    assert_eq!(String::from_utf8_lossy(&seen), "first\nsecond\n");
    svc.stop().await;
    env.cleanup().await;
}

/// An `exec` emulator keeping claims under `pv_root`, with the claim `task-artifacts` in the
/// tasks' namespace; returns it and the claim's directory, which the service mounts.
fn sim_with_claim(pv_root: &std::path::Path) -> (Sim, PathBuf) {
    let sim = Sim::start_with_args("exec", &["--pv-root", pv_root.to_str().unwrap()]);
    let claim = "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: task-artifacts\n  namespace: agenttask\nspec:\n  accessModes: [ReadWriteMany]\n  resources:\n    requests: {storage: 1Gi}\n";
    let claim_file = sim.dir.path().join("claim.yaml");
    std::fs::write(&claim_file, claim).unwrap();
    sim.kubectl_ok(&["apply", "-f", claim_file.to_str().unwrap()]);
    // What the service's Deployment mounts: the same volume.
    let mount = pv_root.join("agenttask/task-artifacts");
    std::fs::create_dir_all(&mount).unwrap();
    (sim, mount)
}

fn claim_settings(env: &Env, sim: &Sim, mount: &std::path::Path) -> Settings {
    let mut settings = kube_settings(env, sim, 10);
    settings.kube.pods.artifacts_claim = Some("task-artifacts".into());
    settings.kube.artifacts_pvc_mount = mount.to_path_buf();
    settings
}

/// With `--artifacts-pvc`, a pod's artifacts directory is its sub-path of the claim (the
/// emulator keeps claims under `--pv-root`, as a shared volume would be), and what it writes
/// there is kept as the local backend keeps it: the same caps, link, hard-link and sparse
/// rules, the tenant's quota, downloads by recorded name with the sha256 ETag, and no run
/// directory left on the claim.
#[tokio::test]
async fn kube_pod_artifacts_are_kept_on_the_claim_with_the_local_rules() {
    use sha2::Digest as _;
    let pv = tempfile::tempdir().unwrap();
    let (sim, mount) = sim_with_claim(pv.path());
    let env = Env::new(&format!("{TENANTS}[tenants.{{t}}-small]\nmax_artifact_bytes = 16384\n")).await;
    let settings = claim_settings(&env, &sim, &mount);
    let svc = env.start_with(settings).await;
    let mut client = Client::new(&env).await;
    let (a, small) = (env.tenant("a"), env.tenant("small"));
    let rules = "import os\n\
                 d = os.environ['AGENTTASK_ARTIFACTS_DIR']\n\
                 os.makedirs(os.path.join(d, 'plots'))\n\
                 open(os.path.join(d, 'plots', 'fig.bin'), 'wb').write(bytes(range(256)) * 40)\n\
                 open(os.path.join(d, 'notes.txt'), 'w').write('hello')\n\
                 os.symlink('/etc/passwd', os.path.join(d, 'passwd'))\n\
                 open(os.path.join(d, 'twice'), 'w').write('x')\n\
                 os.link(os.path.join(d, 'twice'), os.path.join(d, 'twice2'))\n\
                 with open(os.path.join(d, 'sparse'), 'wb') as f:\n    f.truncate(64 << 20)\n\
                 print('wrote')\n";
    client.submit(&a, &json!({"id": "rules", "language": "python", "code": rules, "timeout_seconds": 60})).await;
    let many = "import os\nd = os.environ['AGENTTASK_ARTIFACTS_DIR']\n\
                for i in range(120):\n    open(os.path.join(d, 'f%03d' % i), 'w').write(str(i))\n";
    client.submit(&a, &json!({"id": "many", "language": "python", "code": many, "timeout_seconds": 60})).await;
    let big = "import os\nopen(os.path.join(os.environ['AGENTTASK_ARTIFACTS_DIR'], 'big.bin'), 'wb').write(os.urandom(64 * 1024))\n";
    client.submit(&small, &json!({"id": "quota", "language": "python", "code": big, "timeout_seconds": 60})).await;
    let got = results(&mut client, 3, Duration::from_secs(180)).await;

    let r = &got["rules"];
    assert_eq!((r["phase"].as_str(), r["stdout"].as_str()), (Some("Succeeded"), Some("wrote\n")), "{r:#}");
    let mut names: Vec<&str> = r["artifacts"].as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap()).collect();
    names.sort_unstable();
    // The link, both names of the hard-linked file and the sparse file are not kept.
    assert_eq!(names, ["notes.txt", "plots/fig.bin"], "{r:#}");
    assert!(r["message"].as_str().unwrap().contains("1 sparse artifact file(s) not stored"), "{r:#}");
    let pool = env.pg().await;
    let id = task_id(&pool, "rules").await;
    let http = reqwest::Client::new();
    let get = |path: &str| {
        let url = format!("http://{}/v1/tasks/{id}/artifacts/{path}", svc.http_addr);
        let http = http.clone();
        async move { http.get(url).bearer_auth("test-admin-token").send().await.unwrap() }
    };
    let resp = get("plots/fig.bin").await;
    assert_eq!(resp.status(), 200);
    let etag = resp.headers()["etag"].to_str().unwrap().to_owned();
    let want: Vec<u8> = (0..40).flat_map(|_| 0u8..=255).collect();
    assert_eq!(resp.bytes().await.unwrap().as_ref(), want.as_slice());
    assert_eq!(etag, format!("\"sha256:{:x}\"", sha2::Sha256::digest(&want)));
    assert_eq!(get("notes.txt").await.text().await.unwrap(), "hello");
    for bad in ["passwd", "twice", "sparse", "..%2F..%2Fetc%2Fpasswd"] {
        assert_eq!(get(bad).await.status(), 404, "{bad}");
    }
    // agentctl downloads them as it does a local task's, checking each sha256.
    let out = tempfile::tempdir().unwrap();
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentctl"))
        .args(["--server", &format!("http://{}", svc.http_addr), "--token", "test-admin-token"])
        .args(["artifacts", &id, "-o", out.path().join("got").to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(std::fs::read(out.path().join("got/plots/fig.bin")).unwrap(), want);
    assert_eq!(std::fs::read_to_string(out.path().join("got/notes.txt")).unwrap(), "hello");
    // Stored on the claim, in the data directory's layout; the pod's run directory is gone.
    assert!(mount.join(format!("artifacts/{a}/{id}/plots/fig.bin")).is_file());
    assert!(!mount.join(format!("runs/{a}/{id}")).exists());

    let many = &got["many"];
    assert_eq!(many["phase"], "Succeeded", "{many:#}");
    assert_eq!(many["artifacts"].as_array().unwrap().len(), 100, "the file cap applies");

    let q = &got["quota"];
    assert_eq!(q["phase"], "Succeeded", "{q:#}");
    assert_eq!(q["artifacts"], json!([]), "{q:#}");
    let message = q["message"].as_str().unwrap();
    assert!(message.contains("not stored") && message.contains("max_artifact_bytes = 16384"), "{message}");
    let qid = task_id(&pool, "quota").await;
    assert!(!mount.join(format!("runs/{small}/{qid}")).exists(), "refused artifacts leave nothing behind");
    svc.stop().await;
    env.cleanup().await;
}

/// A service restarted while a pod runs adopts it and still stores what it wrote; a cancelled
/// task's pod keeps nothing, and its run directory goes.
#[tokio::test]
async fn kube_pod_artifacts_survive_a_restart_and_a_cancelled_pod_keeps_none() {
    let pv = tempfile::tempdir().unwrap();
    let (sim, mount) = sim_with_claim(pv.path());
    let Started { env, svc, mut client, tenant } = started_with(TENANTS, |env| claim_settings(env, &sim, &mount)).await;
    let code = |secs: u32| {
        format!(
            "import os, time\nd = os.environ['AGENTTASK_ARTIFACTS_DIR']\n\
             open(os.path.join(d, 'early.txt'), 'w').write('early')\ntime.sleep({secs})\n\
             open(os.path.join(d, 'late.txt'), 'w').write('late')\n"
        )
    };
    for (id, secs) in [("adopted", 4), ("cancelled", 60)] {
        client
            .submit(&tenant, &json!({"id": id, "language": "python", "code": code(secs), "timeout_seconds": 90}))
            .await;
    }
    let pool = env.pg().await;
    for id in ["adopted", "cancelled"] {
        eventually(WAIT, || async { phase(&pool, id).await == "Running" }).await;
    }
    let (adopted, cancelled) = (task_id(&pool, "adopted").await, task_id(&pool, "cancelled").await);
    svc.stop().await;
    let svc = env.start_with(claim_settings(&env, &sim, &mount)).await;
    cancel_through_api(&svc, &cancelled).await;
    let got = results(&mut client, 2, Duration::from_secs(120)).await;
    let a = &got["adopted"];
    assert_eq!(a["phase"], "Succeeded", "{a:#}");
    let mut names: Vec<&str> = a["artifacts"].as_array().unwrap().iter().map(|x| x["name"].as_str().unwrap()).collect();
    names.sort_unstable();
    assert_eq!(names, ["early.txt", "late.txt"], "{a:#}");
    let url = format!("http://{}/v1/tasks/{adopted}/artifacts/late.txt", svc.http_addr);
    let body = reqwest::Client::new().get(url).bearer_auth("test-admin-token").send().await.unwrap().text().await;
    assert_eq!(body.unwrap(), "late");
    let c = &got["cancelled"];
    assert_eq!((c["phase"].as_str(), c["artifacts"].clone()), (Some("Cancelled"), json!([])), "{c:#}");
    eventually(WAIT, || async { !mount.join(format!("runs/{tenant}/{cancelled}")).exists() }).await;
    assert!(!mount.join(format!("artifacts/{tenant}/{cancelled}")).exists());
    assert!(!mount.join(format!("runs/{tenant}/{adopted}")).exists());
    svc.stop().await;
    env.cleanup().await;
}

/// The cold path's Sandbox, as `agenttask render --backend sandbox` prints it, applied to the
/// emulator playing agent-sandbox (its CRDs installed) with the `exec` kubelet: the controller's
/// pod passes the namespace's "restricted" Pod Security admission, the hardened entry script
/// runs the program for real, and the Sandbox ends `Finished` (`PodSucceeded`). The backend that
/// does this by itself is still to come (issue 12).
#[tokio::test]
async fn kube_rendered_sandbox_runs_under_the_emulated_agent_sandbox_controller() {
    use agenttask::kube::render::{render, RenderArgs, RenderBackend};
    let sim = Sim::start_with("exec");
    let root = env!("CARGO_MANIFEST_DIR");
    sim.kubectl_ok(&[
        "apply",
        "--server-side",
        "-f",
        &format!("{root}/tests/kubesim/tests/data/agent-sandbox-crds.yaml"),
    ]);
    sim.kubectl_ok(&["wait", "--for=condition=Established", "crd/sandboxes.agents.x-k8s.io", "--timeout=10s"]);
    let task = sim.dir.path().join("task.json");
    std::fs::write(
        &task,
        json!({"language": "python", "code": "print('hello from a sandbox')", "timeout_seconds": 60}).to_string(),
    )
    .unwrap();
    let args = RenderArgs {
        backend: RenderBackend::Sandbox,
        tenant: "acme".into(),
        tenants: None,
        namespace: None,
        namespace_per_tenant: false,
        artifacts_pvc: None,
        service_namespace: None,
        task,
    };
    let yaml = render(&args).unwrap_or_else(|(c, m)| panic!("render failed ({c}): {m}"));
    let file = sim.dir.path().join("rendered.yaml");
    std::fs::write(&file, yaml).unwrap();
    sim.kubectl_ok(&["apply", "--server-side", "-f", file.to_str().unwrap()]);
    let name = sim.json(&["get", "sandboxes", "-n", "agenttask"])["items"][0]["metadata"]["name"]
        .as_str()
        .expect("the Sandbox was applied")
        .to_owned();
    let start = Instant::now();
    let sb = loop {
        let sb = sim.json(&["get", "sandbox", &name, "-n", "agenttask"]);
        let finished =
            sb["status"]["conditions"].as_array().into_iter().flatten().find(|c| c["type"] == "Finished").cloned();
        if let Some(f) = finished {
            assert_eq!(f["reason"], "PodSucceeded", "{sb:#}");
            break sb;
        }
        assert!(start.elapsed() < WAIT, "the Sandbox did not finish: {sb:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(sb["spec"]["shutdownPolicy"], "Delete");
    let pod = sim.json(&["get", "pod", &name, "-n", "agenttask"]);
    assert_eq!(pod["metadata"]["ownerReferences"][0]["kind"], "Sandbox");
    assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true);
    let log = sim.kubectl_ok(&["logs", &name, "-n", "agenttask"]);
    assert!(log.starts_with("hello from a sandbox\n"), "{log:?}");
}

/// An emulator with agent-sandbox installed (its CRDs applied, as an operator would).
pub(crate) fn sandbox_sim() -> Sim {
    let sim = Sim::start();
    let root = env!("CARGO_MANIFEST_DIR");
    sim.kubectl_ok(&[
        "apply",
        "--server-side",
        "-f",
        &format!("{root}/tests/kubesim/tests/data/agent-sandbox-crds.yaml"),
    ]);
    sim.kubectl_ok(&["wait", "--for=condition=Established", "crd/sandboxes.agents.x-k8s.io", "--timeout=10s"]);
    sim
}

pub(crate) fn sandbox_settings(env: &Env, sim: &Sim, max_running: u32) -> Settings {
    let mut s = kube_settings(env, sim, max_running);
    s.kube.backend = agenttask::kube::KubeBackendKind::Sandbox;
    s
}

/// `--kube-backend sandbox`: a cancelled task's Sandbox and pod go; a restart mid-task adopts the
/// running Sandbox (one attempt, the same pod).
#[tokio::test]
async fn kube_sandbox_backend_cancel_and_restart_mid_task() {
    let sim = sandbox_sim();
    let Started { env, svc, mut client, tenant } = started_with(TENANTS, |env| sandbox_settings(env, &sim, 10)).await;
    client.submit(&tenant, &task("cancel", &[("run-ms", "60000")])).await;
    client.submit(&tenant, &task("long", &[("run-ms", "6000"), ("stdout", "survived\n")])).await;
    let pool = env.pg().await;
    for id in ["cancel", "long"] {
        eventually(WAIT, || async { phase(&pool, id).await == "Running" }).await;
    }
    let cid = task_id(&pool, "cancel").await;
    cancel_through_api(&svc, &cid).await;
    let (r, _) = client.next(WAIT).await;
    assert_eq!(
        (r["id"].as_str(), r["reason"].as_str(), r["backend"].as_str()),
        (Some("cancel"), Some("Cancelled"), Some("sandbox")),
        "{r:#}"
    );
    for kind in ["sandbox", "pod"] {
        let name = format!("at-{cid}-a1");
        eventually(WAIT, || async { !sim.kubectl(&["get", kind, &name, "-n", "agenttask"]).status.success() }).await;
    }

    let lid = task_id(&pool, "long").await;
    let name = format!("at-{lid}-a1");
    let sandbox_uid = sim.json(&["get", "sandbox", &name, "-n", "agenttask"])["metadata"]["uid"].clone();
    let pod_uid = sim.json(&["get", "pod", &name, "-n", "agenttask"])["metadata"]["uid"].clone();
    svc.stop().await;
    let svc = env.start_with(sandbox_settings(&env, &sim, 10)).await;
    assert_long_survived(&mut client, &pool).await;
    assert_eq!(sim.json(&["get", "sandbox", &name, "-n", "agenttask"])["metadata"]["uid"], sandbox_uid);
    assert_eq!(sim.json(&["get", "pod", &name, "-n", "agenttask"])["metadata"]["uid"], pod_uid);
    assert!(client.more(Duration::from_secs(2)).await.is_none(), "exactly one result each");
    svc.stop().await;
    env.cleanup().await;
}

/// `--kube-backend sandbox`: a Sandbox deleted under a running task (by someone else) ends it as
/// `PodMissing`, once.
#[tokio::test]
async fn kube_sandbox_backend_a_deleted_sandbox_is_pod_missing() {
    let sim = sandbox_sim();
    let Started { env, svc, mut client, tenant } = started_with(TENANTS, |env| sandbox_settings(env, &sim, 10)).await;
    client.submit(&tenant, &task("gone", &[("run-ms", "60000")])).await;
    let pool = env.pg().await;
    eventually(WAIT, || async { phase(&pool, "gone").await == "Running" }).await;
    let name = format!("at-{}-a1", task_id(&pool, "gone").await);
    sim.kubectl_ok(&["delete", "sandbox", &name, "-n", "agenttask", "--wait=true", "--timeout=20s"]);
    let (r, _) = client.next(WAIT).await;
    assert_eq!(
        (r["id"].as_str(), r["phase"].as_str(), r["reason"].as_str()),
        (Some("gone"), Some("Failed"), Some("PodMissing")),
        "{r:#}"
    );
    assert!(r["message"].as_str().unwrap().contains(&format!("Sandbox {name} disappeared")), "{r:#}");
    assert!(client.more(Duration::from_secs(2)).await.is_none(), "exactly one result");
    svc.stop().await;
    env.cleanup().await;
}

/// `--kube-backend sandbox`, the cold path: every task becomes an agent-sandbox Sandbox (the
/// emulator plays agent-sandbox's controller, its CRDs installed as an operator would) whose pod
/// is podjob's; results, reasons and the backend name come through it as for podjob. (A pod that
/// vanishes is made again by agent-sandbox, so that case is not here.)
#[tokio::test]
async fn kube_sandbox_backend_runs_every_reason_through_sandboxes() {
    let sim = sandbox_sim();
    let Started { env, svc, mut client, tenant } = started_with(TENANTS, |env| sandbox_settings(env, &sim, 20)).await;
    let (tasks, expect) = every_reason(false);
    for t in &tasks {
        client.submit(&tenant, t).await;
    }
    let r = results(&mut client, tasks.len(), WAIT).await;
    assert_every_reason(&r, &expect, |_| "sandbox");

    // Each task was a Sandbox owned by its AgentTask, shut down by agent-sandbox at the deadline
    // plus grace with policy Delete; its pod is the controller's, hardened, under the RuntimeClass.
    let pool = env.pg().await;
    let gid = task_id(&pool, "gvisor").await;
    let sb = sim.json(&["get", "sandbox", &format!("at-{gid}-a1"), "-n", "agenttask"]);
    assert_eq!(sb["metadata"]["ownerReferences"][0]["kind"], "AgentTask");
    assert_eq!(sb["spec"]["shutdownPolicy"], "Delete");
    assert!(sb["spec"]["shutdownTime"].is_string(), "{sb:#}");
    let pod = sim.json(&["get", "pod", &format!("at-{gid}-a1"), "-n", "agenttask"]);
    assert_eq!(pod["metadata"]["ownerReferences"][0]["kind"], "Sandbox");
    assert_eq!(pod["spec"]["runtimeClassName"], "gvisor");
    assert_eq!(pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"], true);
    // The image pull failure took its Sandbox away (agent-sandbox would make the pod again).
    let pid = task_id(&pool, "pull").await;
    assert!(!sim.kubectl(&["get", "sandbox", &format!("at-{pid}-a1"), "-n", "agenttask"]).status.success());
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn kube_500_tasks_through_the_emulator() {
    let sim = Sim::start();
    let Started { env, svc, mut client, tenant } = started_with(TENANTS, |env| kube_settings(env, &sim, 100)).await;
    let started = Instant::now();
    for i in 0..500 {
        client.submit(&tenant, &task(&format!("n{i}"), &[("run-ms", "20"), ("start-delay-ms", "10")])).await;
    }
    let r = results(&mut client, 500, Duration::from_secs(600)).await;
    let elapsed = started.elapsed();
    assert_eq!(r.len(), 500);
    assert!(r.values().all(|v| v["phase"] == "Succeeded"), "{:#?}", r.values().find(|v| v["phase"] != "Succeeded"));
    eprintln!("500 tasks through the emulator in {elapsed:?} ({:.1} tasks/s)", 500.0 / elapsed.as_secs_f64());
    let pods = sim.json(&["get", "pods", "-n", "agenttask"]);
    assert_eq!(pods["items"].as_array().unwrap().len(), 500, "one pod per task");
    svc.stop().await;
    env.cleanup().await;
}
