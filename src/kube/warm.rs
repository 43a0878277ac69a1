//! The warm path's I/O (`--kube-backend sandbox`, a tenant with `warm_pool`; the design is in
//! src/kube/agent-sandbox.md, "Warm path: design"). For one AgentTask the reconciler calls
//! [`step`] before the cold path, and it either handles the task here (claim, wait, hand over,
//! follow the claimed pod) or says to run it cold. The decisions are the pure ones of
//! [`super::sandbox`]; this module reads the pool and claims, applies the claim and the pool's
//! NetworkPolicy, and talks to the claimed pod's task agent.

use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::core::DynamicObject;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::ResourceExt;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::crd::{AgentTask, AgentTaskStatus, LABEL_AGENTTASK, LABEL_MANAGED_BY, LABEL_TASK_ID, LABEL_TENANT, MANAGER};
use super::podspec;
use super::reconcile::{self, Ctx, Error, Followed, Remove};
use super::sandbox::{self, Kind, PoolDecision, PoolResources};
use crate::domain::outcome::{Outcome, Termination};
use crate::domain::phase::Phase;
use crate::domain::tenant::{TenantName, TenantPolicy};

/// What the reconciler does next with a sandbox-backend task.
pub(super) enum Step {
    /// Handled here; the reconcile ends with this action.
    Done(Action),
    /// Run it cold (its own Sandbox), with this note for its status message.
    Cold(Option<String>),
}

/// How often a claim that is not bound, not Ready or whose agent does not listen yet is looked at
/// again (claims do not wake the controller).
const CLAIM_POLL: Duration = Duration::from_millis(50);
/// How long the service waits for the agent to connect and to answer.
const AGENT_CONNECT: Duration = Duration::from_secs(3);
const AGENT_ANSWER: Duration = Duration::from_secs(30);

fn api(ctx: &Ctx, ns: &str, kind: Kind) -> Api<DynamicObject> {
    Api::namespaced_with(ctx.client.clone(), ns, &sandbox::api_resource(kind, ctx.settings.sandbox_version))
}

fn policy_of(ctx: &Ctx, status: &AgentTaskStatus, task: &AgentTask) -> Option<TenantPolicy> {
    let tenant = status.tenant.clone().or_else(|| task.spec.tenant.clone())?;
    let name = TenantName::parse(&tenant).ok()?;
    ctx.tenants.borrow().get(&name).cloned()
}

/// The warm path's part of one reconcile of an admitted sandbox-backend task whose run is
/// `claim_name` (the name a cold Sandbox would have).
pub(super) async fn step(
    task: &AgentTask,
    ctx: &Ctx,
    ns: &str,
    claim_name: &str,
    status: &mut AgentTaskStatus,
) -> Result<Step, Error> {
    // The annotations describe one attempt: a newer one (a retry) starts afresh.
    let attempt = task.spec.admission.as_ref().map(|a| a.attempt.to_string()).unwrap_or_default();
    let this_attempt = task.annotations().get(sandbox::ANNOTATION_LAUNCH_ATTEMPT) == Some(&attempt);
    let annotation = |key: &str| task.annotations().get(key).filter(|_| this_attempt).cloned();
    let launched = annotation(sandbox::ANNOTATION_LAUNCH);
    let policy = policy_of(ctx, status, task);
    let pool = policy.as_ref().and_then(|p| p.warm_pool.clone());
    let went_warm = launched.as_deref().is_some_and(|l| l.starts_with("warm"));
    if launched.as_deref().is_some_and(|l| l.starts_with("cold")) || (pool.is_none() && !went_warm) {
        return Ok(Step::Cold(launched.map(|l| format!("launched {l}"))));
    }
    let claims = api(ctx, ns, Kind::SandboxClaim);
    if let Some(claim) = claims.get_opt(claim_name).await? {
        return follow_claim(task, ctx, ns, &claims, &claim, status).await.map(Step::Done);
    }
    if went_warm {
        // Claimed once, and the claim is gone: expired (its lifecycle) or deleted by someone.
        let why = format!(
            "the SandboxClaim {claim_name} disappeared (expired or deleted) before the task ended; its sandbox went with it"
        );
        return end(task, ctx, status, Termination::PodMissing(why), None).await.map(Step::Done);
    }
    if status.pod_name.is_some() {
        // A cold run from before the tenant had a pool.
        return Ok(Step::Cold(None));
    }
    let (Some(pool), Some(policy)) = (pool, policy) else { return Ok(Step::Cold(None)) };
    let resources = PoolResources { cpu_millis: policy.default_cpu_millis, memory_bytes: policy.default_memory_bytes };
    if let Some(why) = sandbox::warm_ineligible(task, &resources, ctx.settings.pods.artifacts_claim.is_some()) {
        let value = format!("cold (warm pool {pool}: {why})");
        annotate(ctx, task, ns, &[(sandbox::ANNOTATION_LAUNCH, Some(value.as_str()))]).await?;
        return Ok(Step::Cold(Some(format!("launched {value}"))));
    }
    let _gate = ctx.warm_gate.lock().await;
    let Some(found) = api(ctx, ns, Kind::SandboxWarmPool).get_opt(&pool).await? else {
        let why = format!("warm pool {pool} not found (WarmPoolNotFound): the tenant's warm_pool names no SandboxWarmPool in namespace {ns}");
        return end(task, ctx, status, Termination::BackendError(why), None).await.map(Step::Done);
    };
    let ready = found.data["status"]["readyReplicas"].as_i64().unwrap_or(0);
    let lp = ListParams::default().labels(&format!("{}={pool}", sandbox::LABEL_CLAIM_POOL));
    let unbound = claims
        .list(&lp)
        .await?
        .items
        .iter()
        .filter(|c| c.metadata.deletion_timestamp.is_none() && c.data["status"]["sandbox"]["name"].as_str().is_none())
        .count();
    let waiting_since =
        annotation(sandbox::ANNOTATION_WAITING_SINCE).and_then(|t| reconcile::parse_time(Some(t.as_str())));
    match sandbox::pool_decision(&pool, ready, unbound, policy.warm_pool_empty) {
        PoolDecision::Claim => {
            let value = match waiting_since {
                Some(since) => format!(
                    "warm (pool {pool}, after waiting {}s for a ready replica)",
                    (Utc::now() - since).num_seconds().max(0)
                ),
                None => format!("warm (pool {pool})"),
            };
            claim(task, ctx, ns, &claims, claim_name, &pool, status).await?;
            annotate(ctx, task, ns, &[(sandbox::ANNOTATION_LAUNCH, Some(value.as_str()))]).await?;
            let admission = task.spec.admission.as_ref().map(|a| a.attempt);
            status.attempt = admission.or(status.attempt);
            status.phase = Some(Phase::Pending);
            status.reason = None;
            status.message = Some(sandbox::claimed_note(&pool, claim_name));
            reconcile::patch_status(ctx, task, status).await?;
            reconcile::publish(
                ctx,
                task,
                EventType::Normal,
                "Claimed",
                format!("SandboxClaim {claim_name} on warm pool {pool}"),
            )
            .await;
            Ok(Step::Done(Action::requeue(CLAIM_POLL)))
        }
        PoolDecision::Cold(why) => {
            let value = format!("cold ({why})");
            annotate(ctx, task, ns, &[(sandbox::ANNOTATION_LAUNCH, Some(value.as_str()))]).await?;
            reconcile::publish(ctx, task, EventType::Normal, "WarmPoolEmpty", why).await;
            Ok(Step::Cold(Some(format!("launched {value}"))))
        }
        PoolDecision::Wait(why) => {
            let since = match waiting_since {
                Some(t) => t,
                None => {
                    let now = Utc::now();
                    let at = now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                    annotate(ctx, task, ns, &[(sandbox::ANNOTATION_WAITING_SINCE, Some(at.as_str()))]).await?;
                    reconcile::publish(ctx, task, EventType::Normal, "WarmPoolEmpty", why.clone()).await;
                    now
                }
            };
            let timeout = timeout_of(ctx, task);
            if Utc::now() >= since + chrono::Duration::seconds(i64::from(timeout)) {
                let value =
                    format!("never launched: no replica of warm pool {pool} was ready within the task's timeout");
                let task = annotate(ctx, task, ns, &[(sandbox::ANNOTATION_LAUNCH, Some(value.as_str()))]).await?;
                return end(&task, ctx, status, Termination::TimedOut, None).await.map(Step::Done);
            }
            if status.message.as_deref() != Some(why.as_str()) || status.phase != Some(Phase::Pending) {
                status.attempt = task.spec.admission.as_ref().map(|a| a.attempt).or(status.attempt);
                status.phase = Some(Phase::Pending);
                status.message = Some(why);
                reconcile::patch_status(ctx, task, status).await?;
            }
            Ok(Step::Done(Action::requeue(Duration::from_secs(1))))
        }
    }
}

fn timeout_of(ctx: &Ctx, task: &AgentTask) -> u32 {
    task.spec.timeout_seconds.unwrap_or(ctx.settings.defaults.timeout_seconds)
}

/// Applies the pool's NetworkPolicy (so a claimed pod is never without it) and the claim.
async fn claim(
    task: &AgentTask,
    ctx: &Ctx,
    ns: &str,
    claims: &Api<DynamicObject>,
    claim_name: &str,
    pool: &str,
    status: &AgentTaskStatus,
) -> Result<(), Error> {
    let pp = PatchParams::apply(reconcile::FIELD_MANAGER).force();
    let np = sandbox::pool_network_policy(pool, ns, &ctx.settings.service_namespace);
    let nps: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), ns);
    nps.patch(&np.name_any(), &pp, &Patch::Apply(&np)).await?;
    let mut labels = podspec::labels_of(task);
    if let Some(t) = &status.tenant {
        labels.insert(LABEL_TENANT.to_owned(), t.clone());
    }
    labels.insert(sandbox::LABEL_CLAIM_POOL.to_owned(), pool.to_owned());
    // As on the pod and the cold Sandbox: only task labels under the operator's allowed prefixes.
    let annotations: std::collections::BTreeMap<String, String> = task
        .spec
        .labels
        .iter()
        .filter(|(k, _)| {
            ctx.settings.pods.annotation_prefixes.iter().any(|p| !p.is_empty() && k.starts_with(p.as_str()))
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let meta = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        name: Some(claim_name.to_owned()),
        namespace: Some(ns.to_owned()),
        labels: Some(labels),
        annotations: Some(annotations).filter(|a| !a.is_empty()),
        owner_references: podspec::owner_of(task).map(|o| vec![o]),
        ..Default::default()
    };
    let deadline = Utc::now() + chrono::Duration::seconds(i64::from(timeout_of(ctx, task)));
    let shutdown = sandbox::shutdown_time(deadline, ctx.settings.sandbox_shutdown_grace);
    // v1alpha1 claims name a template: the pool's has the pool's name (as rendered).
    let obj = sandbox::claim(meta, ctx.settings.sandbox_version, pool, pool, shutdown);
    claims.patch(claim_name, &pp, &Patch::Apply(&obj)).await?;
    Ok(())
}

/// Merge-patches annotations of the AgentTask (`None` removes one), with the attempt they
/// describe; returns it as patched.
async fn annotate(ctx: &Ctx, task: &AgentTask, ns: &str, pairs: &[(&str, Option<&str>)]) -> Result<AgentTask, Error> {
    let api: Api<AgentTask> = Api::namespaced(ctx.client.clone(), ns);
    let mut map: serde_json::Map<String, serde_json::Value> =
        pairs.iter().map(|(k, v)| ((*k).to_owned(), v.map_or(serde_json::Value::Null, |v| json!(v)))).collect();
    let attempt = task.spec.admission.as_ref().map(|a| a.attempt.to_string()).unwrap_or_default();
    if task.annotations().get(sandbox::ANNOTATION_LAUNCH_ATTEMPT) != Some(&attempt) {
        // A newer attempt: what the annotations said of the last one no longer holds.
        for key in [sandbox::ANNOTATION_LAUNCH, sandbox::ANNOTATION_WAITING_SINCE] {
            map.entry(key.to_owned()).or_insert(serde_json::Value::Null);
        }
    }
    map.insert(sandbox::ANNOTATION_LAUNCH_ATTEMPT.to_owned(), json!(attempt));
    let body = json!({"metadata": {"annotations": map}});
    Ok(api.patch(&task.name_any(), &PatchParams::default(), &Patch::Merge(&body)).await?)
}

/// Ends the task with `termination` (no output) and deletes its claim, if any.
async fn end(
    task: &AgentTask,
    ctx: &Ctx,
    status: &mut AgentTaskStatus,
    termination: Termination,
    claim: Option<(&Api<DynamicObject>, &str)>,
) -> Result<Action, Error> {
    if let Some((api, name)) = claim {
        reconcile::delete_sandbox(api, name).await?;
    }
    // The executor takes a status for the run it describes only: say which, also when the run
    // ends before anything was made for it (no pool, no replica within the timeout).
    if let Some(a) = &task.spec.admission {
        status.attempt = Some(a.attempt);
    }
    let started = reconcile::parse_time(status.start_time.as_deref()).unwrap_or_else(Utc::now);
    let outcome = Outcome::bare(termination, started, Utc::now());
    reconcile::finish(ctx, task, status, &outcome, None).await?;
    Ok(reconcile::requeue_for_ttl(task, status))
}

/// Deletes the claim `name` in `ns` (gone already is fine): its Sandbox and pod go with it.
pub(super) async fn delete_claim(ctx: &Ctx, ns: &str, name: &str) -> Result<(), Error> {
    match api(ctx, ns, Kind::SandboxClaim).delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        // Gone, or agent-sandbox's claims are not served at all (nothing of ours to delete).
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// How far the hand-over of a claim got (its annotation).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Handoff {
    None,
    /// The agent accepted a connection: if it now refuses, it has taken the task and `exec`ed.
    Connected,
    Done(DateTime<Utc>),
}

fn handoff_of(claim: &DynamicObject) -> Handoff {
    match claim.annotations().get(sandbox::ANNOTATION_HANDOFF).map(String::as_str) {
        Some("connected") => Handoff::Connected,
        Some(v) => match v.strip_prefix("done ").and_then(|t| reconcile::parse_time(Some(t))) {
            Some(t) => Handoff::Done(t),
            None => Handoff::None,
        },
        None => Handoff::None,
    }
}

async fn mark(claims: &Api<DynamicObject>, name: &str, value: &str) -> Result<(), Error> {
    let body = json!({"metadata": {"annotations": {sandbox::ANNOTATION_HANDOFF: value}}});
    claims.patch(name, &PatchParams::default(), &Patch::Merge(&body)).await?;
    Ok(())
}

/// A claim of this task exists: wait for it to be bound and Ready, hand the task over, then
/// follow the claimed pod like a cold one.
async fn follow_claim(
    task: &AgentTask,
    ctx: &Ctx,
    ns: &str,
    claims: &Api<DynamicObject>,
    claim: &DynamicObject,
    status: &mut AgentTaskStatus,
) -> Result<Action, Error> {
    let claim_name = claim.name_any();
    if claim.metadata.deletion_timestamp.is_some() {
        let why = format!(
            "the SandboxClaim {claim_name} disappeared (expired or deleted) before the task ended; its sandbox went with it"
        );
        return end(task, ctx, status, Termination::PodMissing(why), None).await;
    }
    let st: sandbox::SandboxClaimStatus = serde_json::from_value(claim.data["status"].clone()).unwrap_or_default();
    let ready = st.conditions.iter().find(|c| c.type_ == "Ready");
    let handoff = handoff_of(claim);
    if let Some(c) = ready.filter(|c| c.status == "False") {
        let fatal = match c.reason.as_str() {
            "WarmPoolNotFound" | "TemplateNotFound" | "InvalidMetadata" => {
                Some(Termination::BackendError(format!("SandboxClaim {claim_name}: {} ({})", c.message, c.reason)))
            }
            "ClaimExpired" | "SandboxExpired" => Some(Termination::TimedOut),
            _ => None,
        };
        if let Some(t) = fatal {
            return end(task, ctx, status, t, Some((claims, &claim_name))).await;
        }
    }
    let created =
        claim.metadata.creation_timestamp.as_ref().and_then(|t| DateTime::from_timestamp_millis(t.0.as_millisecond()));
    let timeout = chrono::Duration::seconds(i64::from(timeout_of(ctx, task)));
    let out_of_time = created.is_some_and(|c| Utc::now() >= c + timeout);
    let Some(sb_name) = st.sandbox.name.clone() else {
        if out_of_time {
            let why = format!("SandboxClaim {claim_name} was not bound to a sandbox within the task's timeout");
            return end(task, ctx, status, Termination::BackendError(why), Some((claims, &claim_name))).await;
        }
        return Ok(Action::requeue(CLAIM_POLL));
    };
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let pod = pods.get_opt(&sb_name).await?;
    if status.pod_name.as_deref() != Some(sb_name.as_str()) {
        status.pod_name = Some(sb_name.clone());
        reconcile::patch_status(ctx, task, status).await?;
    }
    if let Some(p) = pod.as_ref().filter(|p| !p.labels().contains_key(LABEL_AGENTTASK)) {
        label_pod(task, &pods, p, status).await?;
    }
    if let Handoff::Done(at) = handoff {
        let Some(pod) = pod else {
            let why = format!("the claimed sandbox's pod {sb_name} is gone");
            return end(task, ctx, status, Termination::PodMissing(why), Some((claims, &claim_name))).await;
        };
        let observed = reconcile::observe(&pod, ctx.settings.image_pull_grace, Utc::now());
        let followed = Followed {
            pods: &pods,
            pod: Some(&pod),
            pod_name: &sb_name,
            remove: Remove::Claim(claims, &claim_name),
            sandbox_status: None,
            handed_over: Some(at),
        };
        return reconcile::follow(task, ctx, status, observed, &followed).await;
    }
    let is_ready = ready.is_some_and(|c| c.status == "True");
    let pod_ip = pod.as_ref().and_then(|p| p.status.as_ref()).and_then(|s| s.pod_ip.clone());
    if handoff == Handoff::Connected && !(is_ready && pod_ip.is_some()) {
        // The agent listened once and its sandbox is no longer Ready (the readiness probe is the
        // agent's port, closed once the agent `exec`s the task; or the task has already ended):
        // it took the task before a restart cut the hand-over short, or died; the pod says which.
        mark(claims, &claim_name, &format!("done {}", now_millis())).await?;
        return Ok(Action::requeue(Duration::ZERO));
    }
    let pool = claim.labels().get(sandbox::LABEL_CLAIM_POOL).cloned().unwrap_or_default();
    let (true, Some(pod_ip)) = (is_ready, pod_ip) else {
        if out_of_time {
            let why = sandbox::claim_never_ready(&sb_name, timeout_of(ctx, task), ready);
            return end(task, ctx, status, Termination::BackendError(why), Some((claims, &claim_name))).await;
        }
        if !is_ready {
            // Say why the task still waits (a moment on the way to Ready; for good when never).
            let note = sandbox::claim_not_ready_note(&pool, &claim_name, &sb_name, ready);
            if status.message.as_deref() != Some(note.as_str()) {
                status.message = Some(note);
                reconcile::patch_status(ctx, task, status).await?;
            }
        }
        return Ok(Action::requeue(CLAIM_POLL));
    };
    let claimed = sandbox::claimed_note(&pool, &claim_name);
    if status.message.as_deref() != Some(claimed.as_str()) {
        // Ready now: a note that it was not no longer holds.
        status.message = Some(claimed);
        reconcile::patch_status(ctx, task, status).await?;
    }
    let target = Target { claims, claim_name: &claim_name, pool: &pool, pod_name: &sb_name, pod_ip: &pod_ip };
    hand_over(task, ctx, ns, &target, handoff, out_of_time, status).await
}

/// Labels the claimed pod as this task's, so the controller's pod watch wakes the task on its
/// changes (a pool pod carries only the pool's labels).
async fn label_pod(task: &AgentTask, pods: &Api<Pod>, pod: &Pod, status: &AgentTaskStatus) -> Result<(), Error> {
    let mut labels = serde_json::Map::new();
    labels.insert(LABEL_AGENTTASK.into(), json!(task.name_any()));
    labels.insert(LABEL_MANAGED_BY.into(), json!(MANAGER));
    if let Some(t) = &status.tenant {
        labels.insert(LABEL_TENANT.into(), json!(t));
    }
    if let Some(a) = &task.spec.admission {
        labels.insert(LABEL_TASK_ID.into(), json!(a.task_id));
    }
    let body = json!({"metadata": {"labels": labels}});
    match pods.patch(&pod.name_any(), &PatchParams::default(), &Patch::Merge(&body)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The claimed pod a task is handed to.
struct Target<'a> {
    claims: &'a Api<DynamicObject>,
    claim_name: &'a str,
    pool: &'a str,
    pod_name: &'a str,
    pod_ip: &'a str,
}

/// Sends the task to the claimed pod's agent (once: the claim's annotation records how far it
/// got, so a restarted service neither sends twice nor waits for an agent that has `exec`ed).
async fn hand_over(
    task: &AgentTask,
    ctx: &Ctx,
    ns: &str,
    target: &Target<'_>,
    handoff: Handoff,
    out_of_time: bool,
    status: &mut AgentTaskStatus,
) -> Result<Action, Error> {
    let Target { claims, claim_name, pool, pod_name, pod_ip } = *target;
    let secret_name = sandbox::token_secret_name(pool);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let token = match secrets.get_opt(&secret_name).await? {
        Some(s) => s.data.and_then(|d| d.get("token").map(|t| t.0.clone())).filter(|t| !t.is_empty()),
        None => None,
    };
    let Some(token) = token else {
        let why = format!(
            "the warm pool's token Secret {secret_name} (key token) is missing in namespace {ns}: create it \
             (src/kube/agent-sandbox.md) and the pool's pods anew"
        );
        return end(task, ctx, status, Termination::BackendError(why), Some((claims, claim_name))).await;
    };
    let (body, signature) =
        sandbox::handoff_request(task, &ctx.settings.pods, &ctx.settings.defaults, pod_name, &token)?;
    let addr = if pod_ip.contains(':') {
        format!("[{pod_ip}]:{}", sandbox::AGENT_PORT)
    } else {
        format!("{pod_ip}:{}", sandbox::AGENT_PORT)
    };
    let stream = match tokio::time::timeout(AGENT_CONNECT, tokio::net::TcpStream::connect(&addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(_)) | Err(_) if handoff == Handoff::Connected => {
            // It listened before and no longer does: it took the task (a crash between its
            // answer and our record), or died, which the pod's status will say.
            mark(claims, claim_name, &format!("done {}", now_millis())).await?;
            return Ok(Action::requeue(Duration::ZERO));
        }
        Ok(Err(e)) if out_of_time => {
            let why = format!("the task agent of the claimed pod {pod_name} never answered at {addr}: {e}");
            return end(task, ctx, status, Termination::BackendError(why), Some((claims, claim_name))).await;
        }
        // Not listening yet (the pod is Ready a moment before its agent binds, without a probe).
        Ok(Err(_)) | Err(_) => return Ok(Action::requeue(CLAIM_POLL)),
    };
    if handoff == Handoff::None {
        mark(claims, claim_name, "connected").await?;
    }
    match tokio::time::timeout(AGENT_ANSWER, send(stream, &body, &signature)).await {
        Ok(Ok((204, _))) => {
            mark(claims, claim_name, &format!("done {}", now_millis())).await?;
            reconcile::publish(
                ctx,
                task,
                EventType::Normal,
                "HandedOver",
                format!("task handed over to pod {pod_name}"),
            )
            .await;
            Ok(Action::requeue(Duration::ZERO))
        }
        Ok(Ok((code, text))) => {
            let why = format!("the task agent of pod {pod_name} refused the task: {code} {}", text.trim());
            end(task, ctx, status, Termination::BackendError(why), Some((claims, claim_name))).await
        }
        // Cut off: the next reconcile connects again (it still listens) or finds it gone (taken).
        Ok(Err(_)) | Err(_) => Ok(Action::requeue(CLAIM_POLL)),
    }
}

fn now_millis() -> String {
    Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// One HTTP/1.1 request to the agent; its status code and body.
async fn send(mut stream: tokio::net::TcpStream, body: &[u8], signature: &str) -> std::io::Result<(u16, String)> {
    let head = format!(
        "POST /v1/task HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}: {signature}\r\nConnection: close\r\n\r\n",
        body.len(),
        sandbox::SIGNATURE_HEADER,
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.flush().await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    let text = String::from_utf8_lossy(&answer);
    let code = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((code, body))
}
