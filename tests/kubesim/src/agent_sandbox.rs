//! The kubernetes-sigs/agent-sandbox controllers, played by the emulator (src/kube/agent-sandbox.md
//! says what the real ones do and where that was read).
//!
//! Active once the agent-sandbox CRDs are served (an operator installs them; the tests apply
//! `tests/data/agent-sandbox-crds.yaml`). One level-triggered loop, woken by every change and by a
//! 100 ms tick (for `shutdownTime` and TTLs), reconciles all objects under the store's lock:
//! - a `Sandbox` (`agents.x-k8s.io`) gets a pod of the same name from its `podTemplate`, owned by
//!   it and labelled `agents.x-k8s.io/sandbox-name-hash`; its status follows the pod (`Ready`,
//!   `Finished`, `PodScheduled`, `Suspended`, `podIPs`, `nodeName`, `selector`); at `shutdownTime`
//!   the pod goes, and with `shutdownPolicy: Delete` the Sandbox too (else `Ready=False`,
//!   `SandboxExpired`);
//! - a `SandboxWarmPool` keeps `spec.replicas` Sandboxes made from its `SandboxTemplate`, owned by
//!   it, and reports `replicas`, `readyReplicas` and `selector`;
//! - a `SandboxClaim` adopts a Sandbox of its pool (the ownerReference moves to the claim, so the
//!   pool refills): the oldest Ready one, else the oldest not Ready one (the real controller's
//!   fallback); with none in the pool it cold-creates one from the pool's template, as the real
//!   controller does; its status names the Sandbox and forwards `Ready` and `Finished`; at its
//!   `lifecycle` end it expires (`Delete`, `DeleteForeground` or `Retain`).
//!
//! The controller reads and writes every object in the storage version (v1beta1), whichever
//! version a client wrote it in: the real controller speaks v1beta1 only and the API server
//! converts, so the ownerReferences it writes name `v1beta1` even for a Sandbox made as v1alpha1.
//!
//! Failure switches, annotations in the style of the kubelet's (pools and claims copy their
//! `kubesim.agenttask.io/` annotations onto the Sandboxes they create):
//! - `kubesim.agenttask.io/sandbox-ready: never` on a Sandbox: it never becomes Ready, as with a
//!   readiness probe that never passes (`DependenciesNotReady`, "Pod is Running but not Ready");
//!   on a SandboxClaim, the Sandbox it binds, created or adopted (a pool's Ready one goes not
//!   Ready the moment it is claimed: a claim bound to a sandbox that never becomes Ready);
//! - `kubesim.agenttask.io/pool: exhausted` on a SandboxWarmPool: it creates no more Sandboxes
//!   (the ones it has can still be claimed; later claims are cold starts);
//! - `kubesim.agenttask.io/expire-after-ms: N` on a SandboxClaim or Sandbox: it expires N ms after
//!   the controller first saw it, as if its `shutdownTime` were then.
//!
//! Not played: the template's shared default NetworkPolicy, Services, PVCs, the router,
//! `operatingMode: Suspended`, `updateStrategy`, claim `env` and `additionalPodMetadata`, events.
//! Unlike the real controller, a finished Sandbox keeps its `Finished` condition after its pod is
//! gone and never gets a new pod.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::api::App;
use crate::kubelet::ANN;
use crate::objects::{self, DeleteOpts, FieldValidation, WriteCtx};
use crate::registry::ResourceType;
use crate::store::Inner;

pub const GROUP: &str = "agents.x-k8s.io";
pub const EXT_GROUP: &str = "extensions.agents.x-k8s.io";
const MANAGER: &str = "agent-sandbox-controller";
const NAME_HASH: &str = "agents.x-k8s.io/sandbox-name-hash";
const POOL_LABEL: &str = "agents.x-k8s.io/warm-pool-sandbox";
const TEMPLATE_REF: &str = "agents.x-k8s.io/sandbox-template-ref";
const CLAIM_SANDBOX: &str = "agents.x-k8s.io/sandbox-name";

/// Store keys of the kinds this controller reads (a change to any of them wakes it).
const KEYS: [&str; 5] = [
    "agents.x-k8s.io/sandboxes",
    "extensions.agents.x-k8s.io/sandboxclaims",
    "extensions.agents.x-k8s.io/sandboxwarmpools",
    "extensions.agents.x-k8s.io/sandboxtemplates",
    "/pods",
];

/// What the controller remembers between passes: when it first saw an object (by uid), for
/// `expire-after-ms`.
#[derive(Default)]
struct Memory {
    first_seen: HashMap<String, Instant>,
}

/// Runs the controllers until the store closes.
pub async fn run(app: Arc<App>) {
    let mut mem = Memory::default();
    let mut rx = app.lock().tx.subscribe();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Ok(ev) if !KEYS.contains(&ev.key.as_str()) => continue,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = tick.tick() => {}
        }
        // One pass for a burst of changes.
        while rx.try_recv().is_ok() {}
        reconcile_all(&app, &mut mem);
    }
}

/// The served agent-sandbox kinds, with the version objects are written in (the storage one).
struct Kinds {
    sandboxes: ResourceType,
    templates: Option<ResourceType>,
    claims: Option<ResourceType>,
    pools: Option<ResourceType>,
    pods: ResourceType,
}

impl Kinds {
    fn find(inner: &Inner) -> Option<Kinds> {
        let by = |group: &str, resource: &str| {
            inner.registry.types.iter().find(|t| t.group == group && t.resource == resource).cloned()
        };
        Some(Kinds {
            sandboxes: by(GROUP, "sandboxes")?,
            templates: by(EXT_GROUP, "sandboxtemplates"),
            claims: by(EXT_GROUP, "sandboxclaims"),
            pools: by(EXT_GROUP, "sandboxwarmpools"),
            pods: inner.registry.find("", "v1", "pods").cloned()?,
        })
    }
}

fn reconcile_all(app: &App, mem: &mut Memory) {
    let mut inner = app.lock();
    let Some(kinds) = Kinds::find(&inner) else {
        return;
    };
    let now = Utc::now();
    let mut seen = HashSet::new();
    for sb in all(&inner, &kinds.sandboxes) {
        seen.insert(uid(&sb).to_string());
        reconcile_sandbox(&mut inner, &kinds, &sb, now, mem);
    }
    if let Some(claims) = &kinds.claims {
        for claim in all(&inner, claims) {
            seen.insert(uid(&claim).to_string());
            reconcile_claim(&mut inner, &kinds, claims, &claim, now, mem);
        }
    }
    if let Some(pools) = &kinds.pools {
        for pool in all(&inner, pools) {
            reconcile_pool(&mut inner, &kinds, pools, &pool);
        }
    }
    mem.first_seen.retain(|u, _| seen.contains(u));
    app.wake_gc(&mut inner);
}

// ---------------------------------------------------------------------------------------------
// Sandbox

fn reconcile_sandbox(inner: &mut Inner, kinds: &Kinds, sb: &Value, now: DateTime<Utc>, mem: &mut Memory) {
    if !sb["metadata"]["deletionTimestamp"].is_null() {
        return;
    }
    let (ns, name) = (namespace(sb), name(sb));
    let pod = inner.get("/pods", ns, name).filter(|p| controlled_by(p, sb)).cloned();
    if expired_at(sb, &sb["spec"]["shutdownTime"], now, mem).is_some_and(|t| t <= now) {
        if let Some(p) = &pod {
            if p["metadata"]["deletionTimestamp"].is_null() {
                delete(inner, &kinds.pods, ns, name, None);
            }
        }
        if sb["spec"]["shutdownPolicy"] == "Delete" {
            delete(inner, &kinds.sandboxes, ns, name, None);
        } else {
            let mut st = sb["status"].clone();
            set_condition(&mut st, sb, "Ready", false, "SandboxExpired", "Sandbox has expired");
            remove_condition(&mut st, "PodScheduled");
            st["podIPs"] = json!([]);
            write_status(inner, &kinds.sandboxes, sb, st);
        }
        return;
    }
    let finished = condition(&sb["status"], "Finished").is_some();
    let mut error = None;
    let pod = match pod {
        None if !finished && inner.get("/pods", ns, name).is_none() => match create_pod(inner, kinds, sb) {
            Ok(p) => Some(p),
            Err(e) => {
                error = Some(e);
                None
            }
        },
        None if !finished => {
            error = Some(format!("pod {name:?} exists and is not owned by this Sandbox"));
            None
        }
        other => other,
    };
    if let Some(p) = &pod {
        sync_pod_labels(inner, kinds, sb, p);
    }
    let mut st = sb["status"].clone();
    let hash = name_hash(name);
    st["selector"] = json!(format!("{NAME_HASH}={hash}"));
    set_condition(&mut st, sb, "Suspended", false, "NotSuspended", "Sandbox is not suspended");
    let never_ready = annotation(sb, "sandbox-ready") == Some("never");
    let (ready, reason, message) = match (&pod, &error) {
        (_, Some(e)) => (false, "ReconcilerError", format!("Error seen: {e}")),
        (None, _) if finished => (false, dependent_reason(&st), "Pod does not exist".to_string()),
        (None, _) => (false, "DependenciesNotReady", "Pod does not exist".to_string()),
        (Some(p), _) => match p["status"]["phase"].as_str().unwrap_or("Pending") {
            "Succeeded" => (false, "PodSucceeded", "Pod completed successfully".to_string()),
            "Failed" => (false, "PodFailed", "Pod failed".to_string()),
            "Running" => {
                let ready = pod_condition(p, "Ready") == Some(true);
                let ips = p["status"]["podIPs"].as_array().is_some_and(|a| !a.is_empty());
                match (ready && !never_ready, ips) {
                    (true, true) => (true, "DependenciesReady", "Pod is Ready".to_string()),
                    (true, false) => (false, "DependenciesNotReady", "Pod is Ready but has no podIPs yet".to_string()),
                    _ => (false, "DependenciesNotReady", "Pod is Running but not Ready".to_string()),
                }
            }
            phase => (false, "DependenciesNotReady", format!("Pod exists with phase: {phase}")),
        },
    };
    set_condition(&mut st, sb, "Ready", ready, reason, &message);
    match &pod {
        Some(p) => {
            match p["status"]["phase"].as_str() {
                Some("Succeeded") => {
                    set_condition(&mut st, sb, "Finished", true, "PodSucceeded", "Pod completed successfully")
                }
                Some("Failed") => set_condition(&mut st, sb, "Finished", true, "PodFailed", "Pod failed"),
                _ => remove_condition(&mut st, "Finished"),
            }
            let sched =
                p["status"]["conditions"].as_array().into_iter().flatten().find(|c| c["type"] == "PodScheduled");
            match sched {
                Some(c) => {
                    let status = c["status"] == "True";
                    let reason = c["reason"].as_str().filter(|r| !r.is_empty());
                    let reason = reason.unwrap_or(if status { "PodScheduled" } else { "PodSchedulingUnknown" });
                    set_condition(&mut st, sb, "PodScheduled", status, reason, c["message"].as_str().unwrap_or(""));
                }
                None => remove_condition(&mut st, "PodScheduled"),
            }
            let ips: Vec<Value> =
                p["status"]["podIPs"].as_array().into_iter().flatten().map(|i| i["ip"].clone()).collect();
            st["podIPs"] = Value::Array(ips);
            st["nodeName"] = p["spec"]["nodeName"].clone();
        }
        None => {
            remove_condition(&mut st, "PodScheduled");
            st["podIPs"] = json!([]);
        }
    }
    for k in ["podIPs", "nodeName"] {
        if st[k].is_null() || st[k] == json!([]) {
            if let Some(o) = st.as_object_mut() {
                o.remove(k);
            }
        }
    }
    write_status(inner, &kinds.sandboxes, sb, st);
}

/// The reason `Ready` keeps once a finished Sandbox's pod is gone.
fn dependent_reason(st: &Value) -> &'static str {
    match condition(st, "Finished").and_then(|c| c["reason"].as_str()) {
        Some("PodSucceeded") => "PodSucceeded",
        Some("PodFailed") => "PodFailed",
        _ => "DependenciesNotReady",
    }
}

fn create_pod(inner: &mut Inner, kinds: &Kinds, sb: &Value) -> Result<Value, String> {
    let (ns, name) = (namespace(sb), name(sb));
    let tmpl = &sb["spec"]["podTemplate"];
    let mut labels = object_or_empty(&tmpl["metadata"]["labels"]);
    let mut annotations = object_or_empty(&tmpl["metadata"]["annotations"]);
    // Reserved keys cannot come from the template.
    for m in [&mut labels, &mut annotations] {
        if let Some(o) = m.as_object_mut() {
            o.retain(|k, _| !reserved(k));
        }
    }
    labels[NAME_HASH] = json!(name_hash(name));
    if let Some(pool) =
        sb["metadata"]["labels"][POOL_LABEL].as_str().filter(|_| controller_kind(sb) == Some("SandboxWarmPool"))
    {
        labels[POOL_LABEL] = json!(pool);
    }
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": ns, "labels": labels, "annotations": annotations,
            "ownerReferences": [owner_ref(sb, "Sandbox")],
        },
        "spec": tmpl["spec"],
    });
    // Through admission (Pod Security, RuntimeClass, the service account), as a real controller's
    // request is.
    let mut ctx = WriteCtx {
        manager: MANAGER.into(),
        validation: FieldValidation::Ignore,
        dry_run: false,
        internal: false,
        warnings: vec![],
    };
    objects::create(inner, &kinds.pods, "v1", ns, pod, &mut ctx).map_err(|e| e.message)
}

/// Keeps the pod's warm-pool label in step with who controls the Sandbox (removed on adoption).
fn sync_pod_labels(inner: &mut Inner, kinds: &Kinds, sb: &Value, pod: &Value) {
    let want = sb["metadata"]["labels"][POOL_LABEL].as_str().filter(|_| controller_kind(sb) == Some("SandboxWarmPool"));
    let have = pod["metadata"]["labels"][POOL_LABEL].as_str();
    if want == have || !pod["metadata"]["deletionTimestamp"].is_null() {
        return;
    }
    let mut new = pod.clone();
    match want {
        Some(v) => new["metadata"]["labels"][POOL_LABEL] = json!(v),
        None => {
            if let Some(l) = new["metadata"]["labels"].as_object_mut() {
                l.remove(POOL_LABEL);
            }
        }
    }
    let _ = update(inner, &kinds.pods, new, None);
}

// ---------------------------------------------------------------------------------------------
// SandboxWarmPool

fn reconcile_pool(inner: &mut Inner, kinds: &Kinds, pools: &ResourceType, pool: &Value) {
    if !pool["metadata"]["deletionTimestamp"].is_null() {
        return;
    }
    let ns = namespace(pool);
    let replicas = pool["spec"]["replicas"].as_i64().unwrap_or(1).max(0) as usize;
    let hash = name_hash(name(pool));
    let template = pool_template(inner, kinds, pool);
    let mut owned = owned_sandboxes(inner, kinds, pool);
    let exhausted = annotation(pool, "pool") == Some("exhausted");
    if let (Some(t), false) = (&template, exhausted) {
        while owned.len() < replicas {
            let mut sb = sandbox_from_template(t, kinds, pool);
            sb["metadata"]["generateName"] = json!(format!("{}-", name(pool)));
            sb["metadata"]["labels"] = json!({POOL_LABEL: hash, "agents.x-k8s.io/launch-type": "warm"});
            sb["metadata"]["ownerReferences"] = json!([owner_ref(pool, "SandboxWarmPool")]);
            let mut ctx = WriteCtx::internal(MANAGER);
            match objects::create(inner, &kinds.sandboxes, &kinds.sandboxes.versions[0], ns, sb, &mut ctx) {
                Ok(created) => owned.push(created),
                Err(_) => break,
            }
        }
    }
    if owned.len() > replicas {
        // Not-ready ones go first, then the newest.
        owned.sort_by_key(|s| {
            (is_ready(s), std::cmp::Reverse(s["metadata"]["creationTimestamp"].as_str().unwrap_or("").to_string()))
        });
        for s in owned.drain(..owned.len() - replicas) {
            delete(inner, &kinds.sandboxes, ns, name(&s), None);
        }
    }
    let mut st = pool["status"].clone();
    st["replicas"] = json!(owned.len());
    st["readyReplicas"] = json!(owned.iter().filter(|s| is_ready(s)).count());
    st["selector"] = json!(format!("{POOL_LABEL}={hash}"));
    write_status(inner, pools, pool, st);
}

fn pool_template(inner: &Inner, kinds: &Kinds, pool: &Value) -> Option<Value> {
    let t = kinds.templates.as_ref()?;
    let name = pool["spec"]["sandboxTemplateRef"]["name"].as_str()?;
    inner.get(&t.key(), namespace(pool), name).map(|o| stored(t, o))
}

/// Live Sandboxes whose controller is `owner`.
fn owned_sandboxes(inner: &Inner, kinds: &Kinds, owner: &Value) -> Vec<Value> {
    inner
        .list(&kinds.sandboxes.key(), Some(namespace(owner)))
        .into_iter()
        .filter(|s| controlled_by(s, owner) && s["metadata"]["deletionTimestamp"].is_null())
        .map(|s| stored(&kinds.sandboxes, s))
        .collect()
}

/// A new Sandbox's body from a template, for `owner` (a pool or a claim), carrying the owner's
/// emulator switches.
fn sandbox_from_template(template: &Value, kinds: &Kinds, owner: &Value) -> Value {
    let mut pt = template["spec"]["podTemplate"].clone();
    if pt["spec"]["automountServiceAccountToken"].is_null() {
        pt["spec"]["automountServiceAccountToken"] = json!(false);
    }
    let switches: serde_json::Map<String, Value> = owner["metadata"]["annotations"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.starts_with(ANN))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut annotations = Value::Object(switches);
    annotations[TEMPLATE_REF] = json!(name(template));
    json!({
        "apiVersion": kinds.sandboxes.api_version(&kinds.sandboxes.versions[0]),
        "kind": "Sandbox",
        "metadata": {"annotations": annotations},
        "spec": {"podTemplate": pt},
    })
}

// ---------------------------------------------------------------------------------------------
// SandboxClaim

/// What a claim draws from: the pool (v1beta1 `warmPoolRef`, or v1alpha1's `warmpool`) and the
/// template cold starts use.
struct Source {
    pool: Option<Value>,
    template: Option<Value>,
    /// Why there is no template, as the claim's Ready condition says.
    missing: Option<(&'static str, String)>,
}

fn claim_source(inner: &Inner, kinds: &Kinds, claim: &Value) -> Source {
    let ns = namespace(claim);
    let pools = kinds.pools.as_ref().map(|p| p.key()).unwrap_or_default();
    let templates = kinds.templates.as_ref().map(|t| t.key()).unwrap_or_default();
    let template_named = |n: &str| Some(stored(kinds.templates.as_ref()?, inner.get(&templates, ns, n)?));
    let pool_stored = |p: &Value| kinds.pools.as_ref().map(|rt| stored(rt, p));
    if let Some(p) = claim["spec"]["warmPoolRef"]["name"].as_str() {
        let Some(pool) = inner.get(&pools, ns, p).and_then(pool_stored) else {
            return Source {
                pool: None,
                template: None,
                missing: Some(("WarmPoolNotFound", format!("SandboxWarmPool {p:?} not found"))),
            };
        };
        let t = pool["spec"]["sandboxTemplateRef"]["name"].as_str().unwrap_or_default().to_string();
        let template = template_named(&t);
        let missing = template.is_none().then(|| ("TemplateNotFound", format!("SandboxTemplate {t:?} not found")));
        return Source { pool: Some(pool), template, missing };
    }
    // v1alpha1: a template, and a pool policy (`none`, `default`: any pool of the template, or a name).
    let t = claim["spec"]["sandboxTemplateRef"]["name"].as_str().unwrap_or_default().to_string();
    let template = template_named(&t);
    let policy = claim["spec"]["warmpool"].as_str().unwrap_or("default");
    let pool = match policy {
        "none" => None,
        "default" | "" => inner
            .list(&pools, Some(ns))
            .into_iter()
            .find(|p| p["spec"]["sandboxTemplateRef"]["name"] == t.as_str())
            .and_then(pool_stored),
        named => inner.get(&pools, ns, named).and_then(pool_stored),
    };
    let missing = template.is_none().then(|| ("TemplateNotFound", format!("SandboxTemplate {t:?} not found")));
    Source { pool, template, missing }
}

fn reconcile_claim(
    inner: &mut Inner,
    kinds: &Kinds,
    claims: &ResourceType,
    claim: &Value,
    now: DateTime<Utc>,
    mem: &mut Memory,
) {
    if !claim["metadata"]["deletionTimestamp"].is_null() {
        return;
    }
    let (ns, cname) = (namespace(claim), name(claim));
    let lifecycle = &claim["spec"]["lifecycle"];
    let policy = lifecycle["shutdownPolicy"].as_str().unwrap_or("Retain");
    let mut end = expired_at(claim, &lifecycle["shutdownTime"], now, mem);
    if let (Some(ttl), Some(fin)) =
        (lifecycle["ttlSecondsAfterFinished"].as_i64(), condition(&claim["status"], "Finished"))
    {
        if let Some(t) = fin["lastTransitionTime"].as_str().and_then(parse_time) {
            let t = t + chrono::Duration::seconds(ttl);
            end = Some(end.map_or(t, |e| e.min(t)));
        }
    }
    let bound = owned_sandboxes(inner, kinds, claim).into_iter().next();
    if end.is_some_and(|t| t <= now) {
        match policy {
            "Delete" | "DeleteForeground" => {
                let prop = if policy == "Delete" { "Background" } else { "Foreground" };
                delete(inner, claims, ns, cname, Some(prop));
            }
            _ => {
                if let Some(sb) = &bound {
                    delete(inner, &kinds.sandboxes, ns, name(sb), None);
                }
                let mut st = claim["status"].clone();
                set_condition(
                    &mut st,
                    claim,
                    "Ready",
                    false,
                    "ClaimExpired",
                    "Claim expired. Sandbox cleanup initiated.",
                );
                if bound.is_none() {
                    st["sandbox"] = json!({});
                }
                write_status(inner, claims, claim, st);
            }
        }
        return;
    }
    let mut st = claim["status"].clone();
    let sandbox = match bound {
        Some(sb) => Some(sb),
        None => {
            let src = claim_source(inner, kinds, claim);
            let adopted = src.pool.as_ref().and_then(|p| adopt(inner, kinds, p, claim));
            match (adopted, &src.template, src.missing) {
                // Reconciled again at once, so the claim forwards what the Sandbox says now
                // (with its claim's `sandbox-ready` switch), not what it said in the pool.
                (Some(sb), _, _) => {
                    reconcile_sandbox(inner, kinds, &sb, now, mem);
                    inner.get(&kinds.sandboxes.key(), ns, name(&sb)).map(|s| stored(&kinds.sandboxes, s))
                }
                (None, Some(t), _) => match cold_start(inner, kinds, t, claim) {
                    Ok(sb) => Some(sb),
                    Err(e) => {
                        set_condition(&mut st, claim, "Ready", false, "ReconcilerError", &format!("Error seen: {e}"));
                        None
                    }
                },
                (None, None, Some((reason, message))) => {
                    set_condition(&mut st, claim, "Ready", false, reason, &message);
                    None
                }
                (None, None, None) => None,
            }
        }
    };
    if let Some(sb) = &sandbox {
        if claim["metadata"]["annotations"][CLAIM_SANDBOX].as_str() != Some(name(sb)) {
            let mut c = claim.clone();
            c["metadata"]["annotations"][CLAIM_SANDBOX] = json!(name(sb));
            let _ = update(inner, claims, c, None);
        }
        match condition(&sb["status"], "Ready") {
            Some(r) => {
                let mut r = r.clone();
                r["observedGeneration"] = claim["metadata"]["generation"].clone();
                put_condition(&mut st, r);
            }
            None => set_condition(&mut st, claim, "Ready", false, "SandboxNotReady", "Sandbox is not ready"),
        }
        match condition(&sb["status"], "Finished") {
            Some(f) => put_condition(&mut st, f.clone()),
            None => remove_condition(&mut st, "Finished"),
        }
        st["sandbox"] = json!({"name": name(sb)});
        if let Some(ips) = sb["status"]["podIPs"].as_array().filter(|a| !a.is_empty()) {
            st["sandbox"]["podIPs"] = json!(ips);
        }
    }
    // The claim may be gone by now if the writes above deleted it; write_status then does nothing.
    let live = inner.get(&claims.key(), ns, cname).map(|c| stored(claims, c));
    if let Some(c) = live {
        write_status(inner, claims, &c, st);
    }
}

/// Moves a Sandbox of `pool` to `claim`, as the real controller picks one: the oldest Ready one,
/// else (none Ready) the oldest of the rest, which the claim then waits on; returns it as written.
/// The claim's `sandbox-ready` switch goes with it (its other switches stay the claim's own: an
/// adopted Sandbox's `expire-after-ms` would count from when the pool made it).
fn adopt(inner: &mut Inner, kinds: &Kinds, pool: &Value, claim: &Value) -> Option<Value> {
    let mut owned = owned_sandboxes(inner, kinds, pool);
    owned.sort_by_key(|s| {
        (!is_ready(s), s["metadata"]["creationTimestamp"].as_str().unwrap_or("").to_string(), name(s).to_string())
    });
    let mut sb = owned.into_iter().next()?;
    sb["metadata"]["ownerReferences"] = json!([owner_ref(claim, "SandboxClaim")]);
    if let Some(l) = sb["metadata"]["labels"].as_object_mut() {
        l.remove(POOL_LABEL);
    }
    if let Some(v) = annotation(claim, "sandbox-ready") {
        if !sb["metadata"]["annotations"].is_object() {
            sb["metadata"]["annotations"] = json!({});
        }
        sb["metadata"]["annotations"][format!("{ANN}sandbox-ready")] = json!(v);
    }
    update(inner, &kinds.sandboxes, sb, None)
}

/// A Sandbox named like the claim, from the template, when no warm one is ready.
fn cold_start(inner: &mut Inner, kinds: &Kinds, template: &Value, claim: &Value) -> Result<Value, String> {
    let ns = namespace(claim);
    if inner.get(&kinds.sandboxes.key(), ns, name(claim)).is_some() {
        return Err(format!("sandbox {:?} exists and is not owned by this claim", name(claim)));
    }
    let mut sb = sandbox_from_template(template, kinds, claim);
    sb["metadata"]["name"] = json!(name(claim));
    sb["metadata"]["labels"] = json!({"agents.x-k8s.io/launch-type": "cold"});
    sb["metadata"]["ownerReferences"] = json!([owner_ref(claim, "SandboxClaim")]);
    let mut ctx = WriteCtx::internal(MANAGER);
    objects::create(inner, &kinds.sandboxes, &kinds.sandboxes.versions[0], ns, sb, &mut ctx).map_err(|e| e.message)
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn all(inner: &Inner, rt: &ResourceType) -> Vec<Value> {
    inner.list(&rt.key(), None).into_iter().map(|o| stored(rt, o)).collect()
}

/// An object as the controller reads it: in the storage version (v1beta1), whichever version it
/// was written in. The real controller speaks only v1beta1 and the API server converts; so the
/// ownerReferences it writes name v1beta1, and its status writes go through v1beta1.
fn stored(rt: &ResourceType, o: &Value) -> Value {
    objects::present(o.clone(), rt, &rt.versions[0])
}

fn name(o: &Value) -> &str {
    o["metadata"]["name"].as_str().unwrap_or_default()
}

fn namespace(o: &Value) -> &str {
    o["metadata"]["namespace"].as_str().unwrap_or_default()
}

fn uid(o: &Value) -> &str {
    o["metadata"]["uid"].as_str().unwrap_or_default()
}

fn annotation<'a>(o: &'a Value, key: &str) -> Option<&'a str> {
    o["metadata"]["annotations"][format!("{ANN}{key}")].as_str()
}

fn reserved(key: &str) -> bool {
    key.starts_with("agents.x-k8s.io/") || key.starts_with("extensions.agents.x-k8s.io/")
}

fn object_or_empty(v: &Value) -> Value {
    if v.is_object() {
        v.clone()
    } else {
        json!({})
    }
}

fn owner_ref(owner: &Value, kind: &str) -> Value {
    json!({
        "apiVersion": owner["apiVersion"], "kind": kind, "name": name(owner), "uid": uid(owner),
        "controller": true, "blockOwnerDeletion": true,
    })
}

fn controller_ref(o: &Value) -> Option<&Value> {
    o["metadata"]["ownerReferences"].as_array()?.iter().find(|r| r["controller"] == true)
}

fn controlled_by(o: &Value, owner: &Value) -> bool {
    controller_ref(o).is_some_and(|r| r["uid"] == uid(owner))
}

fn controller_kind(o: &Value) -> Option<&str> {
    controller_ref(o)?["kind"].as_str()
}

fn is_ready(sb: &Value) -> bool {
    condition(&sb["status"], "Ready").is_some_and(|c| c["status"] == "True")
}

fn pod_condition(pod: &Value, type_: &str) -> Option<bool> {
    pod["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == type_).map(|c| c["status"] == "True")
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s).ok().map(|t| t.with_timezone(&Utc))
}

/// When `o` expires: its shutdown time, or earlier by the `expire-after-ms` switch (counted
/// from this pass's `now`, so that it compares as expired once the time has run out).
fn expired_at(o: &Value, shutdown_time: &Value, now: DateTime<Utc>, mem: &mut Memory) -> Option<DateTime<Utc>> {
    let spec = shutdown_time.as_str().and_then(parse_time);
    let switch = annotation(o, "expire-after-ms").and_then(|v| v.parse::<u64>().ok()).map(|ms| {
        let first = *mem.first_seen.entry(uid(o).to_string()).or_insert_with(Instant::now);
        let left = Duration::from_millis(ms).saturating_sub(first.elapsed());
        now + chrono::Duration::from_std(left).unwrap_or_default()
    });
    match (spec, switch) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn condition<'a>(status: &'a Value, type_: &str) -> Option<&'a Value> {
    status["conditions"].as_array()?.iter().find(|c| c["type"] == type_)
}

/// Sets a metav1.Condition, keeping `lastTransitionTime` when the status does not change.
fn set_condition(status: &mut Value, owner: &Value, type_: &str, ok: bool, reason: &str, message: &str) {
    let s = if ok { "True" } else { "False" };
    let ltt = match condition(status, type_) {
        Some(c) if c["status"] == s => c["lastTransitionTime"].clone(),
        _ => json!(objects::now()),
    };
    put_condition(
        status,
        json!({
            "type": type_, "status": s, "reason": reason, "message": message,
            "lastTransitionTime": ltt, "observedGeneration": owner["metadata"]["generation"],
        }),
    );
}

fn put_condition(status: &mut Value, c: Value) {
    if !status.is_object() {
        *status = json!({});
    }
    if !status["conditions"].is_array() {
        status["conditions"] = json!([]);
    }
    let list = status["conditions"].as_array_mut().expect("an array");
    match list.iter_mut().find(|x| x["type"] == c["type"]) {
        Some(x) => *x = c,
        None => list.push(c),
    }
}

fn remove_condition(status: &mut Value, type_: &str) {
    if let Some(list) = status["conditions"].as_array_mut() {
        list.retain(|c| c["type"] != type_);
    }
}

/// Writes `status` through the status subresource when it differs from the object's.
fn write_status(inner: &mut Inner, rt: &ResourceType, obj: &Value, status: Value) {
    if obj["status"] == status {
        return;
    }
    let mut new = obj.clone();
    new["status"] = status;
    let _ = update(inner, rt, new, Some("status"));
}

fn update(inner: &mut Inner, rt: &ResourceType, obj: Value, sub: Option<&str>) -> Option<Value> {
    let version = obj["apiVersion"].as_str().and_then(|v| v.rsplit('/').next()).unwrap_or("v1").to_string();
    let (ns, name) = (namespace(&obj).to_string(), name(&obj).to_string());
    let mut ctx = WriteCtx::internal(MANAGER);
    if let Ok(v) = objects::update(inner, rt, &version, &ns, &name, obj.clone(), sub, &mut ctx, false) {
        return Some(v);
    }
    // Stored unconverted (the emulator has no conversion webhook), an object written in the other
    // version may validate only in that one (a v1alpha1 claim has no `warmPoolRef`): write it there.
    let written = inner.get(&rt.key(), &ns, &name)?["apiVersion"].as_str()?.rsplit('/').next()?.to_string();
    if written == version {
        return None;
    }
    let mut obj = obj;
    obj["apiVersion"] = json!(rt.api_version(&written));
    objects::update(inner, rt, &written, &ns, &name, obj, sub, &mut ctx, false).ok()
}

fn delete(inner: &mut Inner, rt: &ResourceType, ns: &str, name: &str, propagation: Option<&str>) {
    let ctx = WriteCtx::internal(MANAGER);
    let opts = DeleteOpts { propagation: propagation.map(String::from), ..Default::default() };
    let _ = objects::delete(inner, rt, ns, name, &opts, &ctx);
}

/// FNV-1a (32 bit) of a name, as 8 hex digits: the value of `agents.x-k8s.io/sandbox-name-hash`
/// and `agents.x-k8s.io/warm-pool-sandbox`.
pub fn name_hash(s: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{h:08x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_hash_is_fnv1a_32() {
        // Reference values of FNV-1a 32.
        assert_eq!(name_hash(""), "811c9dc5");
        assert_eq!(name_hash("a"), "e40c292c");
        assert_eq!(name_hash("foobar"), "bf9cf968");
    }

    #[test]
    fn conditions_keep_transition_time_while_status_holds() {
        let owner = json!({"metadata": {"generation": 2}});
        let mut st = json!({});
        set_condition(&mut st, &owner, "Ready", false, "DependenciesNotReady", "x");
        st["conditions"][0]["lastTransitionTime"] = json!("2020-01-01T00:00:00Z");
        set_condition(&mut st, &owner, "Ready", false, "DependenciesNotReady", "y");
        assert_eq!(st["conditions"][0]["lastTransitionTime"], "2020-01-01T00:00:00Z");
        assert_eq!(st["conditions"][0]["message"], "y");
        set_condition(&mut st, &owner, "Ready", true, "DependenciesReady", "Pod is Ready");
        assert_ne!(st["conditions"][0]["lastTransitionTime"], "2020-01-01T00:00:00Z");
        assert_eq!(st["conditions"][0]["observedGeneration"], 2);
        remove_condition(&mut st, "Ready");
        assert_eq!(st["conditions"], json!([]));
    }
}
