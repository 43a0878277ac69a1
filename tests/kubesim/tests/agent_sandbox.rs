//! The emulator's agent-sandbox controllers, through the machine's kubectl: the CRDs served, a
//! Sandbox's pod and conditions, shutdownTime, warm pools, claims binding and the pool refilling,
//! and each failure switch (never Ready, pool exhausted, claim expired).

mod common;

use serde_json::Value;

use common::{data, eventually, Sim};

/// An emulator with agent-sandbox installed, as an operator would: its CRDs applied.
fn sim() -> Sim {
    let sim = Sim::start();
    let out = sim.kubectl_ok(&["apply", "--server-side", "-f", data("agent-sandbox-crds.yaml").to_str().unwrap()]);
    assert_eq!(out.lines().count(), 4, "{out}");
    for crd in [
        "sandboxes.agents.x-k8s.io",
        "sandboxtemplates.extensions.agents.x-k8s.io",
        "sandboxclaims.extensions.agents.x-k8s.io",
        "sandboxwarmpools.extensions.agents.x-k8s.io",
    ] {
        sim.kubectl_ok(&["wait", "--for=condition=Established", &format!("crd/{crd}"), "--timeout=10s"]);
    }
    sim
}

fn apply(sim: &Sim, name: &str, yaml: &str) {
    let f = sim.write(name, yaml);
    sim.kubectl_ok(&["apply", "--server-side", "-f", f.to_str().unwrap()]);
}

/// `kubectl get ... -o json`, or None when it is not found.
fn get(sim: &Sim, args: &[&str]) -> Option<Value> {
    let mut a = vec!["get"];
    a.extend(args);
    a.extend(["-o", "json"]);
    let out = sim.kubectl(&a);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("NotFound"), "kubectl {a:?}: {err}");
        return None;
    }
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

fn cond<'a>(o: &'a Value, type_: &str) -> Option<&'a Value> {
    o["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == type_)
}

fn cond_is(o: &Value, type_: &str, status: &str, reason: &str) -> bool {
    cond(o, type_).is_some_and(|c| c["status"] == status && c["reason"] == reason)
}

/// A `podTemplate` field (at `indent`) whose simulated pod does what `annotations` say.
fn pod_template(indent: &str, annotations: &str) -> String {
    let lines = [
        "podTemplate:".to_string(),
        "  metadata:".to_string(),
        "    labels: {app: task}".to_string(),
        format!("    annotations: {{{annotations}}}"),
        "  spec:".to_string(),
        "    restartPolicy: Never".to_string(),
        "    containers:".to_string(),
        "    - name: main".to_string(),
        "      image: python:3.12-slim".to_string(),
        "      command: [python3, -c, 'print(1)']".to_string(),
    ];
    lines.iter().map(|l| format!("{indent}{l}\n")).collect()
}

const FOREVER: &str = "kubesim.agenttask.io/outcome: DeadlineExceeded";

fn template_and_pool(sim: &Sim, replicas: u32, pool_annotations: &str) {
    apply(
        sim,
        "template.yaml",
        &format!(
            "apiVersion: extensions.agents.x-k8s.io/v1beta1\nkind: SandboxTemplate\nmetadata:\n  name: python\nspec:\n{}",
            pod_template("  ", FOREVER)
        ),
    );
    apply(
        sim,
        "pool.yaml",
        &format!("apiVersion: extensions.agents.x-k8s.io/v1beta1\nkind: SandboxWarmPool\nmetadata:\n  name: pool\n  annotations: {{{pool_annotations}}}\nspec:\n  replicas: {replicas}\n  sandboxTemplateRef: {{name: python}}\n"),
    );
}

fn claim(sim: &Sim, name: &str, pool: &str, extra_annotations: &str, lifecycle: &str) {
    apply(
        sim,
        &format!("{name}.yaml"),
        &format!("apiVersion: extensions.agents.x-k8s.io/v1beta1\nkind: SandboxClaim\nmetadata:\n  name: {name}\n  annotations: {{{extra_annotations}}}\nspec:\n  warmPoolRef: {{name: {pool}}}\n{lifecycle}"),
    );
}

fn ready_replicas(sim: &Sim) -> i64 {
    get(sim, &["swp", "pool"]).map(|p| p["status"]["readyReplicas"].as_i64().unwrap_or(0)).unwrap_or(-1)
}

#[test]
fn crds_are_served_with_short_names_and_columns() {
    let sim = sim();
    let res = sim.kubectl_ok(&["api-resources", "--api-group", "extensions.agents.x-k8s.io", "--no-headers"]);
    let rows: Vec<Vec<&str>> = res.lines().map(|l| l.split_whitespace().collect()).collect();
    assert!(
        rows.contains(&vec![
            "sandboxwarmpools",
            "swp",
            "extensions.agents.x-k8s.io/v1beta1",
            "true",
            "SandboxWarmPool"
        ]),
        "{res}"
    );
    assert!(
        rows.contains(&vec![
            "sandboxclaims",
            "sandboxclaim",
            "extensions.agents.x-k8s.io/v1beta1",
            "true",
            "SandboxClaim"
        ]),
        "{res}"
    );
    let res = sim.kubectl_ok(&["api-resources", "--api-group", "agents.x-k8s.io", "--no-headers"]);
    assert_eq!(
        res.split_whitespace().collect::<Vec<_>>(),
        ["sandboxes", "sandbox", "agents.x-k8s.io/v1beta1", "true", "Sandbox"]
    );
    // v1alpha1 is served too.
    sim.kubectl_ok(&["get", "sandboxes.v1alpha1.agents.x-k8s.io"]);
    template_and_pool(&sim, 1, "");
    eventually(10, || (ready_replicas(&sim) == 1).then_some(()));
    let table = sim.kubectl_ok(&["get", "swp"]);
    let rows: Vec<Vec<&str>> = table.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows[0], ["NAME", "READY", "AGE"]);
    assert_eq!(rows[1][..2], ["pool", "1"]);
}

#[test]
fn sandbox_gets_a_pod_and_its_conditions_follow_it() {
    let sim = sim();
    apply(
        &sim,
        "sb.yaml",
        &format!(
            "apiVersion: agents.x-k8s.io/v1beta1\nkind: Sandbox\nmetadata:\n  name: task-1\nspec:\n  shutdownPolicy: Delete\n{}",
            pod_template("  ", "kubesim.agenttask.io/run-ms: '1500', kubesim.agenttask.io/stdout: \"hi\\n\"")
        ),
    );
    sim.kubectl_ok(&["wait", "--for=condition=Ready", "sandbox/task-1", "--timeout=10s"]);
    let sb = get(&sim, &["sandbox", "task-1"]).unwrap();
    assert!(cond_is(&sb, "Ready", "True", "DependenciesReady"), "{sb}");
    assert!(cond_is(&sb, "PodScheduled", "True", "PodScheduled"), "{sb}");
    assert!(cond(&sb, "Finished").is_none(), "{sb}");
    assert_eq!(sb["status"]["nodeName"], "kubesim-node");
    assert_eq!(sb["status"]["podIPs"].as_array().unwrap().len(), 1);
    let hash = sb["status"]["selector"]
        .as_str()
        .unwrap()
        .strip_prefix("agents.x-k8s.io/sandbox-name-hash=")
        .unwrap()
        .to_string();
    let pod = get(&sim, &["pod", "task-1"]).unwrap();
    assert_eq!(pod["metadata"]["labels"]["app"], "task");
    assert_eq!(pod["metadata"]["labels"]["agents.x-k8s.io/sandbox-name-hash"], hash.as_str());
    let owner = &pod["metadata"]["ownerReferences"][0];
    assert_eq!(
        (owner["kind"].as_str(), owner["name"].as_str(), owner["controller"].as_bool()),
        (Some("Sandbox"), Some("task-1"), Some(true))
    );
    assert_eq!(owner["uid"], sb["metadata"]["uid"]);

    // The pod ends: Finished, and Ready says why it is no longer ready.
    sim.kubectl_ok(&["wait", "--for=condition=Finished", "sandbox/task-1", "--timeout=10s"]);
    let sb = get(&sim, &["sandbox", "task-1"]).unwrap();
    assert!(cond_is(&sb, "Finished", "True", "PodSucceeded"), "{sb}");
    assert!(cond_is(&sb, "Ready", "False", "PodSucceeded"), "{sb}");
    assert_eq!(sim.kubectl_ok(&["logs", "task-1"]), "hi\n");

    // Deleting the Sandbox takes its pod (ownerReferences).
    sim.kubectl_ok(&["delete", "sandbox", "task-1", "--wait=true", "--timeout=10s"]);
    eventually(10, || get(&sim, &["pod", "task-1"]).is_none().then_some(()));
}

/// A Sandbox written as v1alpha1 is played like any other: the controller works in the storage
/// version (as the real one, behind the API server's conversion), so the pod's ownerReference
/// names v1beta1, and the object reads in either version.
#[test]
fn a_v1alpha1_sandbox_runs_and_the_controller_speaks_v1beta1() {
    let sim = sim();
    apply(
        &sim,
        "sb.yaml",
        &format!(
            "apiVersion: agents.x-k8s.io/v1alpha1\nkind: Sandbox\nmetadata:\n  name: old\nspec:\n  shutdownPolicy: Delete\n{}",
            pod_template("  ", "kubesim.agenttask.io/stdout: \"alpha\\n\"")
        ),
    );
    sim.kubectl_ok(&["wait", "--for=condition=Finished", "sandboxes.v1alpha1.agents.x-k8s.io/old", "--timeout=10s"]);
    let alpha = get(&sim, &["sandboxes.v1alpha1.agents.x-k8s.io", "old"]).unwrap();
    assert_eq!(alpha["apiVersion"], "agents.x-k8s.io/v1alpha1");
    assert!(cond_is(&alpha, "Finished", "True", "PodSucceeded"), "{alpha}");
    let beta = get(&sim, &["sandboxes.v1beta1.agents.x-k8s.io", "old"]).unwrap();
    assert_eq!(beta["apiVersion"], "agents.x-k8s.io/v1beta1");
    assert_eq!(beta["metadata"]["uid"], alpha["metadata"]["uid"]);
    let pod = get(&sim, &["pod", "old"]).unwrap();
    let owner = &pod["metadata"]["ownerReferences"][0];
    assert_eq!(
        (owner["apiVersion"].as_str(), owner["kind"].as_str()),
        (Some("agents.x-k8s.io/v1beta1"), Some("Sandbox"))
    );
    assert_eq!(sim.kubectl_ok(&["logs", "old"]), "alpha\n");
}

#[test]
fn sandbox_that_never_becomes_ready() {
    let sim = sim();
    apply(
        &sim,
        "sb.yaml",
        &format!(
            "apiVersion: agents.x-k8s.io/v1beta1\nkind: Sandbox\nmetadata:\n  name: stuck\n  annotations: {{kubesim.agenttask.io/sandbox-ready: never}}\nspec:\n{}",
            pod_template("  ", FOREVER)
        ),
    );
    eventually(10, || (get(&sim, &["pod", "stuck"])?["status"]["phase"] == "Running").then_some(()));
    std::thread::sleep(std::time::Duration::from_millis(500));
    let sb = get(&sim, &["sandbox", "stuck"]).unwrap();
    let ready = cond(&sb, "Ready").unwrap();
    assert_eq!(
        (ready["status"].as_str(), ready["reason"].as_str()),
        (Some("False"), Some("DependenciesNotReady")),
        "{sb}"
    );
    assert_eq!(ready["message"], "Pod is Running but not Ready");
}

#[test]
fn shutdown_time_deletes_or_retains_the_sandbox() {
    let sim = sim();
    let soon = (chrono::Utc::now() + chrono::Duration::seconds(2)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    for (name, policy) in [("gone", "Delete"), ("kept", "Retain")] {
        apply(
            &sim,
            &format!("{name}.yaml"),
            &format!(
                "apiVersion: agents.x-k8s.io/v1beta1\nkind: Sandbox\nmetadata:\n  name: {name}\nspec:\n  shutdownTime: '{soon}'\n  shutdownPolicy: {policy}\n{}",
                pod_template("  ", FOREVER)
            ),
        );
    }
    sim.kubectl_ok(&["wait", "--for=condition=Ready", "sandbox/gone", "sandbox/kept", "--timeout=10s"]);
    eventually(15, || get(&sim, &["sandbox", "gone"]).is_none().then_some(()));
    eventually(15, || (get(&sim, &["pod", "gone"]).is_none() && get(&sim, &["pod", "kept"]).is_none()).then_some(()));
    let kept = get(&sim, &["sandbox", "kept"]).unwrap();
    assert!(cond_is(&kept, "Ready", "False", "SandboxExpired"), "{kept}");
}

#[test]
fn warm_pool_keeps_replicas_and_a_claim_binds_one_then_the_pool_refills() {
    let sim = sim();
    template_and_pool(&sim, 2, "");
    eventually(10, || (ready_replicas(&sim) == 2).then_some(()));
    let pool = get(&sim, &["swp", "pool"]).unwrap();
    assert_eq!(pool["status"]["replicas"], 2);
    let selector = pool["status"]["selector"].as_str().unwrap().to_string();
    assert!(selector.starts_with("agents.x-k8s.io/warm-pool-sandbox="), "{selector}");
    let warm = get(&sim, &["sandboxes", "-l", &selector]).unwrap()["items"].as_array().unwrap().clone();
    assert_eq!(warm.len(), 2);
    let warm_names: Vec<String> = warm.iter().map(|s| s["metadata"]["name"].as_str().unwrap().to_string()).collect();
    // The pool's pods carry its label, and sandboxes from a template mount no token by default.
    let pods = get(&sim, &["pods", "-l", &selector]).unwrap();
    assert_eq!(pods["items"].as_array().unwrap().len(), 2);
    assert_eq!(pods["items"][0]["spec"]["automountServiceAccountToken"], false);

    claim(&sim, "c1", "pool", "", "  lifecycle: {shutdownPolicy: Delete}\n");
    sim.kubectl_ok(&["wait", "--for=condition=Ready", "sandboxclaim/c1", "--timeout=10s"]);
    let c = get(&sim, &["sandboxclaim", "c1"]).unwrap();
    let bound = c["status"]["sandbox"]["name"].as_str().unwrap().to_string();
    assert!(warm_names.contains(&bound), "{bound} not one of {warm_names:?}");
    assert_eq!(c["metadata"]["annotations"]["agents.x-k8s.io/sandbox-name"], bound.as_str());
    assert_eq!(c["status"]["sandbox"]["podIPs"].as_array().unwrap().len(), 1);
    let sb = get(&sim, &["sandbox", &bound]).unwrap();
    let owner = &sb["metadata"]["ownerReferences"][0];
    assert_eq!((owner["kind"].as_str(), owner["uid"].as_str()), (Some("SandboxClaim"), c["metadata"]["uid"].as_str()));
    assert!(sb["metadata"]["labels"].get("agents.x-k8s.io/warm-pool-sandbox").is_none(), "{sb}");
    // Bound at once: the pod is the warm one, already running.
    let pod = get(&sim, &["pod", &bound]).unwrap();
    assert_eq!(pod["status"]["phase"], "Running");
    eventually(10, || {
        get(&sim, &["pod", &bound])?["metadata"]["labels"]
            .get("agents.x-k8s.io/warm-pool-sandbox")
            .is_none()
            .then_some(())
    });

    // The pool refills: two ready again, the claimed one no longer counted.
    eventually(10, || (ready_replicas(&sim) == 2).then_some(()));
    let now = get(&sim, &["sandboxes", "-l", &selector]).unwrap()["items"].as_array().unwrap().clone();
    assert_eq!(now.len(), 2);
    assert!(now.iter().all(|s| s["metadata"]["name"] != bound.as_str()));
    assert_eq!(get(&sim, &["sandboxes"]).unwrap()["items"].as_array().unwrap().len(), 3);

    // Deleting the claim takes its sandbox and pod; the pool keeps its own.
    sim.kubectl_ok(&["delete", "sandboxclaim", "c1", "--wait=true", "--timeout=10s"]);
    eventually(10, || {
        (get(&sim, &["sandbox", &bound]).is_none() && get(&sim, &["pod", &bound]).is_none()).then_some(())
    });
    assert_eq!(ready_replicas(&sim), 2);
}

#[test]
fn exhausted_pool_does_not_refill_and_the_next_claim_is_a_cold_start() {
    let sim = sim();
    template_and_pool(&sim, 1, "");
    eventually(10, || (ready_replicas(&sim) == 1).then_some(()));
    sim.kubectl_ok(&["annotate", "swp", "pool", "kubesim.agenttask.io/pool=exhausted"]);
    claim(&sim, "c1", "pool", "", "");
    sim.kubectl_ok(&["wait", "--for=condition=Ready", "sandboxclaim/c1", "--timeout=10s"]);
    let warm = get(&sim, &["sandboxclaim", "c1"]).unwrap()["status"]["sandbox"]["name"].as_str().unwrap().to_string();
    assert_ne!(warm, "c1", "the first claim takes the warm sandbox");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let pool = get(&sim, &["swp", "pool"]).unwrap();
    assert_eq!((pool["status"]["replicas"].as_i64(), ready_replicas(&sim)), (Some(0), 0), "{pool}");

    claim(&sim, "c2", "pool", "", "");
    sim.kubectl_ok(&["wait", "--for=condition=Ready", "sandboxclaim/c2", "--timeout=10s"]);
    let c2 = get(&sim, &["sandboxclaim", "c2"]).unwrap();
    assert_eq!(c2["status"]["sandbox"]["name"], "c2", "a cold start is named like its claim");
    let sb = get(&sim, &["sandbox", "c2"]).unwrap();
    assert_eq!(sb["metadata"]["labels"]["agents.x-k8s.io/launch-type"], "cold");
    assert_eq!(sb["metadata"]["annotations"]["agents.x-k8s.io/sandbox-template-ref"], "python");

    // A claim for a pool that does not exist says so.
    claim(&sim, "c3", "nope", "", "");
    eventually(10, || {
        let c = get(&sim, &["sandboxclaim", "c3"])?;
        cond_is(&c, "Ready", "False", "WarmPoolNotFound").then_some(())
    });
}

/// `kubesim.agenttask.io/sandbox-ready: never` on a claim: the pool's Ready Sandbox it adopts is
/// not Ready from the moment it is claimed, so the claim is bound (`status.sandbox.name`, a
/// running pod with an IP) but its `Ready` never says True, not even on the pass that binds it.
#[test]
fn a_claim_bound_to_a_sandbox_that_never_becomes_ready() {
    let sim = sim();
    template_and_pool(&sim, 2, "");
    eventually(10, || (ready_replicas(&sim) == 2).then_some(()));
    let selector = get(&sim, &["swp", "pool"]).unwrap()["status"]["selector"].as_str().unwrap().to_string();
    let warm: Vec<String> = get(&sim, &["sandboxes", "-l", &selector]).unwrap()["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    claim(&sim, "stuck", "pool", "kubesim.agenttask.io/sandbox-ready: never", "");
    let bound = eventually(10, || {
        let c = get(&sim, &["sandboxclaim", "stuck"])?;
        let name = c["status"]["sandbox"]["name"].as_str()?.to_string();
        let ready = cond(&c, "Ready").unwrap_or_else(|| panic!("bound without a Ready condition: {c}"));
        assert_eq!(ready["status"], "False", "the bind itself must not say Ready: {c}");
        Some(name)
    });
    assert!(warm.contains(&bound), "adopted from the pool: {bound} of {warm:?}");
    let sb = get(&sim, &["sandbox", &bound]).unwrap();
    assert_eq!(sb["metadata"]["annotations"]["kubesim.agenttask.io/sandbox-ready"], "never", "{sb}");
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let c = get(&sim, &["sandboxclaim", "stuck"]).unwrap();
    let ready = cond(&c, "Ready").unwrap();
    assert_eq!(
        (ready["status"].as_str(), ready["reason"].as_str(), ready["message"].as_str()),
        (Some("False"), Some("DependenciesNotReady"), Some("Pod is Running but not Ready")),
        "{c}"
    );
    let pod = get(&sim, &["pod", &bound]).unwrap();
    assert_eq!(pod["status"]["phase"], "Running", "{pod}");
    assert!(pod["status"]["podIP"].is_string(), "{pod}");
    // The pool refills with Ready ones: the switch was the claim's, not the pool's.
    eventually(10, || (ready_replicas(&sim) == 2).then_some(()));
}

/// With no Ready Sandbox in the pool, a claim adopts one that is not Ready (the real controller's
/// fallback) rather than cold-starting one of its own; it is Ready when that Sandbox is.
#[test]
fn a_claim_adopts_a_not_ready_pool_sandbox_before_cold_starting() {
    let sim = sim();
    template_and_pool(&sim, 1, "kubesim.agenttask.io/sandbox-ready: never");
    eventually(10, || (get(&sim, &["swp", "pool"])?["status"]["replicas"] == 1).then_some(()));
    assert_eq!(ready_replicas(&sim), 0);
    claim(&sim, "c", "pool", "", "");
    let bound =
        eventually(10, || get(&sim, &["sandboxclaim", "c"])?["status"]["sandbox"]["name"].as_str().map(String::from));
    assert_ne!(bound, "c", "adopted, not cold-started");
    assert!(get(&sim, &["sandbox", "c"]).is_none());
    let c = get(&sim, &["sandboxclaim", "c"]).unwrap();
    assert!(cond_is(&c, "Ready", "False", "DependenciesNotReady"), "{c}");
    sim.kubectl_ok(&["annotate", "sandbox", &bound, "kubesim.agenttask.io/sandbox-ready-"]);
    sim.kubectl_ok(&["wait", "--for=condition=Ready", "sandboxclaim/c", "--timeout=10s"]);
}

#[test]
fn claims_expire_by_lifecycle_and_by_switch() {
    let sim = sim();
    template_and_pool(&sim, 2, "");
    eventually(10, || (ready_replicas(&sim) == 2).then_some(()));
    // Delete: the claim goes, with its sandbox and pod.
    claim(
        &sim,
        "del",
        "pool",
        "kubesim.agenttask.io/expire-after-ms: '1500'",
        "  lifecycle: {shutdownPolicy: Delete}\n",
    );
    sim.kubectl_ok(&["wait", "--for=condition=Ready", "sandboxclaim/del", "--timeout=10s"]);
    let del_sb =
        get(&sim, &["sandboxclaim", "del"]).unwrap()["status"]["sandbox"]["name"].as_str().unwrap().to_string();
    // Retain (the default): the claim stays, expired; its sandbox and pod go.
    let past = (chrono::Utc::now() + chrono::Duration::seconds(2)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    claim(&sim, "ret", "pool", "", &format!("  lifecycle: {{shutdownTime: '{past}'}}\n"));
    sim.kubectl_ok(&["wait", "--for=condition=Ready", "sandboxclaim/ret", "--timeout=10s"]);
    let ret_sb =
        get(&sim, &["sandboxclaim", "ret"]).unwrap()["status"]["sandbox"]["name"].as_str().unwrap().to_string();

    eventually(15, || {
        (get(&sim, &["sandboxclaim", "del"]).is_none()
            && get(&sim, &["sandbox", &del_sb]).is_none()
            && get(&sim, &["pod", &del_sb]).is_none())
        .then_some(())
    });
    eventually(15, || {
        (get(&sim, &["sandbox", &ret_sb]).is_none() && get(&sim, &["pod", &ret_sb]).is_none()).then_some(())
    });
    let ret = get(&sim, &["sandboxclaim", "ret"]).unwrap();
    let ready = cond(&ret, "Ready").unwrap();
    assert_eq!((ready["status"].as_str(), ready["reason"].as_str()), (Some("False"), Some("ClaimExpired")), "{ret}");
    assert!(ret["status"]["sandbox"].get("name").is_none(), "{ret}");
}
