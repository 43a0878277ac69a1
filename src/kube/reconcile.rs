//! The AgentTask controller, in the shape of kube-rs' controller-rs: one `reconcile` with a
//! fixed signature behind a finalizer, one error enum whose variants are metric labels, an
//! `error_policy` with per-object exponential backoff, and an Event for every transition.
//!
//! What it does with an AgentTask:
//! - applied directly by a user (no `spec.admission`, not yet recorded): records it in
//!   Postgres as a task of its namespace's tenant, through the same validator as ingest (see
//!   [`super::direct`]), or ends it `Rejected` (`UnknownTenant`, `ValidationFailed`);
//! - recorded, not admitted yet: shows `Queued` (or the end the store gave it, e.g. a cancel),
//!   creates nothing;
//! - admitted (`spec.admission` names a run the store handed out for this very object; a
//!   forged one is refused): applies the input ConfigMaps, the default-deny NetworkPolicy and the Pod (all
//!   owned by the AgentTask, by server-side apply, so a second reconcile changes nothing), then
//!   follows the pod and writes what it sees to the status (`Pending` → `Scheduled` →
//!   `Running` → `Succeeded` | `Failed`), with the reasons of the contract;
//! - finished: deletes the AgentTask `ttlSecondsAfterFinished` after its completion;
//! - deleted: the finalizer marks an unfinished task `Cancelled` and deletes its pod.
//!
//! Sandboxes, SandboxClaims, pods and ConfigMaps of ours whose AgentTask is gone are swept by
//! [`sweep_orphans`]. Only one process reconciles at a time: [`run`] holds a Postgres advisory
//! lock while it does.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, ListParams, LogParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::crd::{
    AgentTask, AgentTaskStatus, TaskBackend, TaskCondition, FINALIZER, LABEL_AGENTTASK, LABEL_MANAGED_BY,
    LABEL_TASK_ID, LABEL_TENANT, MANAGER, MAX_STATUS_RESULT_BYTES,
};
use super::direct::{self, Scope};
use super::podspec::{self, BuildError, CONTAINER};
use super::{sandbox, KubeBackendKind, KubeSettings};
use crate::domain::outcome::{Outcome, Termination};
use crate::domain::phase::Phase;
use crate::domain::tenant::Tenants;
use crate::metrics::Metrics;
use crate::store::{Inserted, NewRejection, NewTask, ReplyTo, Store, StoreError};

/// Postgres advisory lock held by the one process that reconciles ("AGTRECON").
pub const RECONCILER_LOCK: i64 = 0x4147_5452_4543_4f4e;

/// Field manager of everything the service applies.
pub const FIELD_MANAGER: &str = "agenttask";

/// Everything `reconcile` needs; all side effects go through it.
pub struct Ctx {
    pub client: Client,
    pub settings: KubeSettings,
    pub metrics: Metrics,
    pub recorder: Recorder,
    /// Where directly applied AgentTasks are recorded and admissions checked.
    pub store: Store,
    /// The tenants in force, to map a namespace to its tenant.
    pub tenants: tokio::sync::watch::Receiver<Arc<Tenants>>,
    /// Consecutive failures per object, for the error policy's backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// With `--artifacts-pvc`: prepares each pod's directory on the claim.
    artifacts: Option<Arc<crate::exec::artifacts::PvcSink>>,
    /// Serializes the warm path's decisions (count the free replicas of a pool, then claim one),
    /// so two tasks never count the same replica.
    pub(super) warm_gate: tokio::sync::Mutex<()>,
}

impl Ctx {
    pub fn new(
        client: Client,
        settings: KubeSettings,
        metrics: Metrics,
        store: Store,
        tenants: tokio::sync::watch::Receiver<Arc<Tenants>>,
    ) -> Self {
        let reporter = Reporter { controller: "agenttask".into(), instance: std::env::var("HOSTNAME").ok() };
        Ctx {
            artifacts: settings.artifact_sink().map(Arc::new),
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            metrics,
            store,
            tenants,
            failures: Mutex::default(),
            warm_gate: tokio::sync::Mutex::new(()),
        }
    }
}

/// Why a reconcile failed; the variant names are the `reason` label of
/// `agenttask_reconcile_errors_total`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API error: {0}")]
    Kube(#[source] kube::Error),
    #[error("finalizer error: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("the AgentTask cannot be built into a pod: {0}")]
    Build(#[from] BuildError),
    #[error("the AgentTask has no namespace")]
    NoNamespace,
    #[error("Postgres: {0}")]
    Store(#[from] StoreError),
    #[error("the task's artifacts directory on the claim cannot be prepared: {0}")]
    Artifacts(String),
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        Error::Kube(e)
    }
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubeError",
            Error::Finalizer(e) => match e.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(inner)
                | kube::runtime::finalizer::Error::CleanupFailed(inner) => inner.metric_label(),
                _ => "FinalizerError",
            },
            Error::Build(_) => "BuildError",
            Error::NoNamespace => "NoNamespace",
            Error::Store(_) => "StoreError",
            Error::Artifacts(_) => "ArtifactsError",
        }
    }
}

fn key_of(task: &AgentTask) -> String {
    format!("{}/{}", task.namespace().unwrap_or_default(), task.name_any())
}

/// Reconciles one AgentTask (see the module docs).
#[tracing::instrument(skip(task, ctx), fields(agenttask = %key_of(&task)))]
pub async fn reconcile(task: Arc<AgentTask>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_duration.start_timer();
    let ns = task.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<AgentTask> = Api::namespaced(ctx.client.clone(), &ns);
    let key = key_of(&task);
    let action = finalizer(&api, FINALIZER, task, |event| async {
        match event {
            Finalizer::Apply(task) => apply(&task, &ctx).await,
            Finalizer::Cleanup(task) => cleanup(&task, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))?;
    ctx.failures.lock().expect("not poisoned").remove(&key);
    Ok(action)
}

/// Logs, counts and retries with exponential backoff (1 s, 2 s, 4 s, ... at most 5 min).
pub fn error_policy(task: Arc<AgentTask>, error: &Error, ctx: Arc<Ctx>) -> Action {
    ctx.metrics.reconcile_errors.with_label_values(&[error.metric_label()]).inc();
    let n = {
        let mut failures = ctx.failures.lock().expect("not poisoned");
        let n = failures.entry(key_of(&task)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = Duration::from_secs(1u64 << n.min(9).saturating_sub(1)).min(Duration::from_secs(300));
    tracing::warn!(agenttask = %key_of(&task), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

fn now_rfc3339() -> String {
    Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

pub(super) fn parse_time(s: Option<&str>) -> Option<DateTime<Utc>> {
    s.and_then(|s| DateTime::parse_from_rfc3339(s).ok()).map(|t| t.with_timezone(&Utc))
}

pub(super) async fn publish(ctx: &Ctx, task: &AgentTask, type_: EventType, reason: &str, note: String) {
    let ev = KubeEvent { type_, reason: reason.into(), note: Some(note), action: "Reconcile".into(), secondary: None };
    if let Err(e) = ctx.recorder.publish(&ev, &task.object_ref(&())).await {
        tracing::debug!(error = %e, "cannot publish an Event");
    }
}

pub(super) async fn patch_status(ctx: &Ctx, task: &AgentTask, status: &AgentTaskStatus) -> Result<(), Error> {
    let api: Api<AgentTask> = Api::namespaced(ctx.client.clone(), &task.namespace().ok_or(Error::NoNamespace)?);
    let body = json!({ "status": status });
    api.patch_status(&task.name_any(), &PatchParams::default(), &Patch::Merge(&body)).await?;
    Ok(())
}

fn set_condition(status: &mut AgentTaskStatus, type_: &str, reason: Option<&str>, message: Option<String>) {
    if status.conditions.iter().any(|c| c.type_ == type_) {
        return;
    }
    status.conditions.push(TaskCondition {
        type_: type_.into(),
        status: "True".into(),
        last_transition_time: now_rfc3339(),
        reason: reason.map(str::to_owned),
        message,
    });
}

async fn apply(task: &AgentTask, ctx: &Ctx) -> Result<Action, Error> {
    let name = task.name_any();
    let ns = task.namespace().ok_or(Error::NoNamespace)?;
    let old = task.status.clone().unwrap_or_default();
    let mut status = old.clone();
    status.observed_generation = task.metadata.generation;
    if let Some(phase) = status.phase.filter(|p| p.is_terminal()) {
        return expire(task, ctx, phase, &status).await;
    }
    let Some(admission) = task.spec.admission.clone() else {
        return intake(task, ctx, &ns, status).await;
    };
    let Some(tenant) = check_admission(task, ctx, &ns, &admission).await? else {
        return Ok(Action::await_change());
    };
    if status.tenant.is_none() {
        status.tenant = Some(tenant);
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let pod_name = podspec::pod_name(&name, admission.attempt);
    // With agent-sandbox, the pod is the controller's, made from a Sandbox of the pod's name.
    let sandboxes = (task.spec.backend == Some(TaskBackend::Sandbox)).then(|| sandbox_api(ctx, &ns));
    if status.attempt.is_some_and(|a| a != admission.attempt) {
        // A newer attempt: the old run's pod (or Sandbox) goes, the status starts over.
        if let Some(old_pod) = status.pod_name.take() {
            match &sandboxes {
                Some(api) => delete_sandbox(api, &old_pod).await?,
                None => delete_ignoring_missing(&pods, &old_pod).await?,
            }
        }
        if let (Some(_), Some(old)) = (&sandboxes, status.attempt) {
            super::warm::delete_claim(ctx, &ns, &podspec::pod_name(&name, old)).await?;
        }
        status = AgentTaskStatus {
            tenant: status.tenant,
            observed_generation: status.observed_generation,
            ..Default::default()
        };
    }
    let mut cold_note = None;
    if sandboxes.is_some() {
        match super::warm::step(task, ctx, &ns, &pod_name, &mut status).await? {
            super::warm::Step::Done(action) => return Ok(action),
            super::warm::Step::Cold(note) => cold_note = note,
        }
    }
    let mut sandbox_status = None;
    if let Some(api) = &sandboxes {
        if let Some(sb) = api.get_opt(&pod_name).await? {
            sandbox_status =
                Some(serde_json::from_value::<sandbox::SandboxStatus>(sb.data["status"].clone()).unwrap_or_default());
        }
    }
    let pod = pods.get_opt(&pod_name).await?;
    let observed = match (&sandbox_status, &pod) {
        (Some(st), pod) => Some(sandbox::observe(st, pod.as_ref(), ctx.settings.image_pull_grace, Utc::now())),
        (None, Some(p)) if sandboxes.is_none() => Some(observe(p, ctx.settings.image_pull_grace, Utc::now())),
        _ => None,
    };
    let Some(observed) = observed else {
        if status.pod_name.as_deref() == Some(pod_name.as_str()) {
            let message = match &sandboxes {
                Some(_) => format!("Sandbox {pod_name} disappeared before its pod reported an ending"),
                None => format!("pod {pod_name} disappeared before it reported an ending"),
            };
            let outcome = Outcome::bare(Termination::PodMissing(message), Utc::now(), Utc::now());
            finish(ctx, task, &mut status, &outcome, None).await?;
            return Ok(requeue_for_ttl(task, &status));
        }
        create_objects(task, ctx, &ns, admission.attempt).await?;
        status.attempt = Some(admission.attempt);
        status.pod_name = Some(pod_name.clone());
        status.phase = Some(Phase::Pending);
        status.reason = None;
        status.message = cold_note;
        patch_status(ctx, task, &status).await?;
        let what = if sandboxes.is_some() { "Sandbox" } else { "pod" };
        publish(ctx, task, EventType::Normal, "Created", format!("created {what} {pod_name}")).await;
        return Ok(Action::requeue(Duration::from_secs(300)));
    };
    // Sandbox conditions (expiry, a pod the controller cannot make) do not wake the controller.
    let followed = Followed {
        pods: &pods,
        pod: pod.as_ref(),
        pod_name: &pod_name,
        remove: match &sandboxes {
            Some(api) => Remove::Sandbox(api, &pod_name),
            None => Remove::Pod,
        },
        sandbox_status: sandbox_status.as_ref(),
        handed_over: None,
    };
    follow(task, ctx, &mut status, observed, &followed).await
}

/// What [`follow`] follows: the pod (named `pod_name`), and what goes when the run must be
/// stopped (agent-sandbox would make a deleted pod again: its Sandbox or claim goes instead).
pub(super) struct Followed<'a> {
    pub pods: &'a Api<Pod>,
    pub pod: Option<&'a Pod>,
    pub pod_name: &'a str,
    pub remove: Remove<'a>,
    /// A cold Sandbox's status, for the note on a running pod whose Sandbox is not Ready.
    pub sandbox_status: Option<&'a sandbox::SandboxStatus>,
    /// A warm run: when the task was handed over to the claimed pod (its start, and the origin
    /// of its timeout, which the service enforces since the pool's pod has no deadline of its own).
    pub handed_over: Option<DateTime<Utc>>,
}

pub(super) enum Remove<'a> {
    Pod,
    Sandbox(&'a Api<kube::core::DynamicObject>, &'a str),
    Claim(&'a Api<kube::core::DynamicObject>, &'a str),
}

impl Remove<'_> {
    async fn run(&self, pods: &Api<Pod>, pod_name: &str) -> Result<(), Error> {
        match self {
            Remove::Pod => delete_ignoring_missing(pods, pod_name).await,
            Remove::Sandbox(api, name) | Remove::Claim(api, name) => delete_sandbox(api, name).await,
        }
    }
}

/// Writes what a run's observation means to the AgentTask's status (`Scheduled`, `Running`, its
/// end with the log's output), and when to look again.
pub(super) async fn follow(
    task: &AgentTask,
    ctx: &Ctx,
    status: &mut AgentTaskStatus,
    observed: Observed,
    f: &Followed<'_>,
) -> Result<Action, Error> {
    let (pods, pod, pod_name) = (f.pods, f.pod, f.pod_name);
    let sandboxes = !matches!(f.remove, Remove::Pod);
    let timeout = task.spec.timeout_seconds.unwrap_or(ctx.settings.defaults.timeout_seconds);
    let observed = match (observed, f.handed_over) {
        // The pool's pod has no deadline of its own: the task's runs from the hand-over.
        (Observed::Running { .. }, Some(at)) if Utc::now() >= at + chrono::Duration::seconds(i64::from(timeout)) => {
            Observed::Ended { termination: Termination::TimedOut, exit_code: None, termination_message: None }
        }
        (Observed::Running { .. }, Some(at)) => Observed::Running { started: Some(at) },
        (o, _) => o,
    };
    let idle = if sandboxes { Duration::from_secs(5) } else { Duration::from_secs(300) };
    let action = match observed {
        Observed::Pending { retry_in } => retry_in.map_or(Action::requeue(idle), Action::requeue),
        Observed::Scheduled => {
            if status.phase == Some(Phase::Pending) {
                status.phase = Some(Phase::Scheduled);
                set_condition(
                    status,
                    "Scheduled",
                    None,
                    pod.and_then(|p| p.spec.as_ref()).and_then(|s| s.node_name.clone()).map(|n| format!("on {n}")),
                );
                patch_status(ctx, task, status).await?;
                publish(ctx, task, EventType::Normal, "Scheduled", format!("pod {pod_name} placed")).await;
            }
            Action::requeue(idle)
        }
        Observed::Running { started } => {
            let idle = match f.handed_over {
                Some(at) => {
                    let end = at + chrono::Duration::seconds(i64::from(timeout));
                    idle.min((end - Utc::now()).to_std().unwrap_or_default() + Duration::from_millis(50))
                }
                None => idle,
            };
            if matches!(status.phase, Some(Phase::Pending | Phase::Scheduled)) {
                status.phase = Some(Phase::Running);
                set_condition(status, "Scheduled", None, None);
                set_condition(status, "Running", None, None);
                status.start_time =
                    Some(started.unwrap_or_else(Utc::now).to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
                patch_status(ctx, task, status).await?;
                publish(ctx, task, EventType::Normal, "Running", format!("pod {pod_name} started")).await;
            }
            if let Some(st) = f.sandbox_status {
                // The run goes on whatever the Sandbox's readiness; the status says when it is
                // not Ready, and stops saying so once it is.
                let since = started.or_else(|| parse_time(status.start_time.as_deref())).unwrap_or_else(Utc::now);
                let note = sandbox::not_ready_note(st, since, Utc::now());
                if status.message != note {
                    if let Some(n) = &note {
                        publish(ctx, task, EventType::Warning, "SandboxNotReady", format!("Sandbox {pod_name}: {n}"))
                            .await;
                    }
                    status.message = note;
                    patch_status(ctx, task, status).await?;
                }
            }
            Action::requeue(idle)
        }
        Observed::Ended { termination, exit_code, termination_message } => {
            let started = parse_time(status.start_time.as_deref()).unwrap_or_else(Utc::now);
            let mut outcome = Outcome::bare(termination, started, Utc::now());
            outcome.exit_code = exit_code;
            let log = match outcome.termination {
                Termination::Exited | Termination::OomKilled if pod.is_some() => {
                    read_log(pods, pod_name, &ctx.settings.pods).await
                }
                _ => None,
            };
            let parsed = log.as_deref().map(|l| {
                podspec::parse_log(
                    l,
                    termination_message.as_deref(),
                    ctx.settings.pods.output_limit_bytes,
                    ctx.settings.pods.result_max_bytes,
                )
            });
            if let Some(p) = &parsed {
                // The entry script caps stdout at the limit + 1 byte; the pipe then kills the
                // program with SIGPIPE (141): the output limit, as for the local backend.
                if p.stdout_truncated && outcome.termination == Termination::Exited && exit_code == Some(141) {
                    outcome.termination = Termination::OutputLimitExceeded;
                }
            }
            let refused_sandbox_pod = sandboxes && matches!(outcome.termination, Termination::BackendError(_));
            // A warm run past its timeout is still running: only its claim's deletion stops it.
            let warm_timeout = f.handed_over.is_some() && outcome.termination == Termination::TimedOut;
            if matches!(outcome.termination, Termination::ImagePullFailed(_)) || refused_sandbox_pod || warm_timeout {
                // agent-sandbox would make the pod again (or keep trying to, when admission
                // refused it): its Sandbox (or claim) goes instead.
                f.remove.run(pods, pod_name).await?;
            }
            finish(ctx, task, status, &outcome, parsed.as_ref()).await?;
            requeue_for_ttl(task, status)
        }
    };
    Ok(action)
}

/// `namespace/name`, the key of a directly applied AgentTask in the store.
fn object_key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

/// An AgentTask without `spec.admission`: a user's own object to record (once), or one that
/// waits for admission.
async fn intake(task: &AgentTask, ctx: &Ctx, ns: &str, mut status: AgentTaskStatus) -> Result<Action, Error> {
    let key = object_key(ns, &task.name_any());
    let recorded = match ctx.store.kube_task_of_object(&key).await? {
        Some(t) => t,
        None if task.labels().contains_key(LABEL_TASK_ID) => {
            // Made by the service: its admission comes with it.
            if status.phase.is_none() {
                status.phase = Some(Phase::Queued);
                patch_status(ctx, task, &status).await?;
            }
            return Ok(Action::await_change());
        }
        None => return record(task, ctx, ns, &key, status).await,
    };
    if !task.labels().contains_key(LABEL_TASK_ID) {
        label(task, ctx, ns, &recorded.tenant, recorded.task_id).await?;
    }
    status.tenant = Some(recorded.tenant.clone());
    if recorded.phase.is_terminal() {
        // Ended before it ran (cancelled, or its tenant removed): the store's word is final.
        status.phase = Some(recorded.phase);
        status.reason = recorded.reason.map(|r| r.as_str().to_owned());
        status.message = recorded.message.clone();
        status.completion_time = Some(now_rfc3339());
        let (reason, message) = (status.reason.clone(), status.message.clone());
        set_condition(&mut status, "Finished", reason.as_deref(), message);
        patch_status(ctx, task, &status).await?;
        let why = status.message.clone().unwrap_or_default();
        publish(ctx, task, EventType::Warning, status.reason.as_deref().unwrap_or("Finished"), why).await;
        return Ok(requeue_for_ttl(task, &status));
    }
    if status.phase.is_none() {
        status.phase = Some(Phase::Queued);
        patch_status(ctx, task, &status).await?;
        publish(ctx, task, EventType::Normal, "Queued", format!("task {} waits for admission", recorded.task_id)).await;
    }
    // Admission patches the object (a change); the store can also end the task meanwhile.
    Ok(Action::requeue(Duration::from_secs(10)))
}

/// Records a user's AgentTask as a task of its namespace's tenant, or rejects it.
async fn record(
    task: &AgentTask,
    ctx: &Ctx,
    ns: &str,
    key: &str,
    mut status: AgentTaskStatus,
) -> Result<Action, Error> {
    let tenants = ctx.tenants.borrow().clone();
    let tenant = direct::tenant_of_namespace(ns, &ctx.settings.namespaces, &tenants);
    let no_reply = ReplyTo { exchange: "", routing_key: "" };
    let verdict = match tenant.as_ref().and_then(|t| tenants.get(t).map(|p| (t, p))) {
        Some((t, policy)) => direct::validate_applied(&task.spec, t, policy),
        None => Err(direct::unknown_tenant(&task.spec, ns)),
    };
    let max_queued = tenant.as_ref().and_then(|t| tenants.get(t)).map(|p| p.max_queued);
    let verdict = match (&tenant, verdict) {
        (Some(tenant), Ok(sub)) => {
            let new = NewTask {
                tenant: tenant.as_str(),
                client_id: None,
                spec: &sub.spec,
                reply: no_reply,
                correlation_id: None,
                submitted_at: Utc::now(),
                kube_object: Some(key),
                max_queued,
            };
            match ctx.store.insert_task(&new, false).await? {
                Ok(Inserted::New(id)) => Ok(id),
                Ok(Inserted::Duplicate) => return Ok(Action::requeue(Duration::from_secs(1))),
                Err(_full) => Err(crate::domain::validate::backlog_full(tenant, &sub, max_queued.unwrap_or_default())),
            }
        }
        (_, Err(rej)) => Err(rej),
        // Without a tenant the verdict is always the UnknownTenant rejection.
        (None, Ok(_)) => Err(direct::unknown_tenant(&task.spec, ns)),
    };
    let (task_id, rejection) = match (&tenant, verdict) {
        (Some(_), Ok(id)) => (Some(id), None),
        (Some(tenant), Err(rej)) => {
            let new = NewRejection {
                tenant: tenant.as_str(),
                client_id: None,
                batch_id: rej.batch_id.as_deref(),
                language: rej.language,
                reason: rej.reason,
                message: &rej.message,
                reply: no_reply,
                correlation_id: None,
                kube_object: Some(key),
            };
            let id = match ctx.store.insert_rejection(&new, false).await? {
                Inserted::New(id) => Some(id),
                Inserted::Duplicate => None,
            };
            (id, Some(rej))
        }
        // No tenant to record it under: the status is its only answer.
        (None, verdict) => (None, verdict.err()),
    };
    if let (Some(tenant), Some(id)) = (&tenant, task_id) {
        label(task, ctx, ns, tenant.as_str(), id).await?;
        status.tenant = Some(tenant.to_string());
    }
    match rejection {
        None => {
            status.phase = Some(Phase::Queued);
            patch_status(ctx, task, &status).await?;
            let id = task_id.map(|i| i.to_string()).unwrap_or_default();
            publish(ctx, task, EventType::Normal, "Queued", format!("recorded as task {id}; waits for admission"))
                .await;
            Ok(Action::requeue(Duration::from_secs(10)))
        }
        Some(rej) => {
            let reason = rej.reason;
            ctx.metrics
                .rejected
                .with_label_values(&[tenant.as_ref().map_or("(unknown)", |t| t.as_str()), reason.as_str()])
                .inc();
            status.phase = Some(Phase::Rejected);
            status.reason = Some(reason.as_str().to_owned());
            status.message = Some(rej.message.clone());
            status.completion_time = Some(now_rfc3339());
            set_condition(&mut status, "Finished", Some(reason.as_str()), Some(rej.message.clone()));
            patch_status(ctx, task, &status).await?;
            publish(ctx, task, EventType::Warning, reason.as_str(), rej.message).await;
            Ok(requeue_for_ttl(task, &status))
        }
    }
}

/// Labels a recorded user's AgentTask as ours, so the backend watches it and its objects are
/// found like those of the AgentTasks the service makes.
async fn label(task: &AgentTask, ctx: &Ctx, ns: &str, tenant: &str, task_id: uuid::Uuid) -> Result<(), Error> {
    let api: Api<AgentTask> = Api::namespaced(ctx.client.clone(), ns);
    let body = json!({"metadata": {"labels": {
        LABEL_MANAGED_BY: MANAGER,
        LABEL_TENANT: tenant,
        LABEL_TASK_ID: task_id.to_string(),
    }}});
    api.patch(&task.name_any(), &PatchParams::default(), &Patch::Merge(&body)).await?;
    Ok(())
}

/// The tenant of the run `spec.admission` names, when the store handed that run out for this
/// very object and it is still live; `None` (and no pod) otherwise. An admission that no run of
/// the store backs (written by hand) ends the AgentTask `Rejected`.
async fn check_admission(
    task: &AgentTask,
    ctx: &Ctx,
    ns: &str,
    admission: &super::crd::Admission,
) -> Result<Option<String>, Error> {
    let name = task.name_any();
    let recorded = match admission.task_id.parse() {
        Ok(id) => ctx.store.kube_task(id).await?,
        Err(_) => None,
    };
    let genuine = recorded.as_ref().filter(|t| match &t.kube_object {
        Some(object) => *object == object_key(ns, &name),
        None => name == super::agent_task_name(t.task_id) && ns == ctx.settings.namespaces.for_tenant(&t.tenant),
    });
    let Some(run) = genuine else {
        let message = "spec.admission names no run the service admitted for this AgentTask; \
                       it is set by the service, not by users"
            .to_owned();
        let mut status = task.status.clone().unwrap_or_default();
        status.phase = Some(Phase::Rejected);
        status.reason = Some("ValidationFailed".into());
        status.message = Some(message.clone());
        status.completion_time = Some(now_rfc3339());
        set_condition(&mut status, "Finished", Some("ValidationFailed"), Some(message.clone()));
        patch_status(ctx, task, &status).await?;
        publish(ctx, task, EventType::Warning, "ValidationFailed", message).await;
        return Ok(None);
    };
    let live = matches!(run.phase, Phase::Pending | Phase::Scheduled | Phase::Running);
    // A pod of an earlier attempt keeps being observed until its end is written.
    // An older attempt's admission waits for the backend to write the current one.
    Ok((live && run.attempt == admission.attempt).then(|| run.tenant.clone()))
}

/// What the AgentTask's launch annotation says about how its task was launched, as the note
/// its status and result messages end with.
pub(super) fn launch_note(task: &AgentTask) -> Option<String> {
    let attempt = task.spec.admission.as_ref().map(|a| a.attempt.to_string()).unwrap_or_default();
    if task.annotations().get(sandbox::ANNOTATION_LAUNCH_ATTEMPT) != Some(&attempt) {
        return None;
    }
    let v = task.annotations().get(sandbox::ANNOTATION_LAUNCH)?;
    Some(if v.starts_with("warm") || v.starts_with("cold") { format!("launched {v}") } else { v.clone() })
}

/// Whether the current attempt ran in a warm pool's sandbox (`Some(false)`: the tenant has a
/// pool but it launched cold), as the result's `warm` says for every backend.
pub(super) fn launched_warm(task: &AgentTask) -> Option<bool> {
    let attempt = task.spec.admission.as_ref().map(|a| a.attempt.to_string()).unwrap_or_default();
    if task.annotations().get(sandbox::ANNOTATION_LAUNCH_ATTEMPT) != Some(&attempt) {
        return None;
    }
    let v = task.annotations().get(sandbox::ANNOTATION_LAUNCH)?;
    if v.starts_with("warm") {
        Some(true)
    } else if v.starts_with("cold") {
        Some(false)
    } else {
        None
    }
}

/// Writes a terminal status and its Event.
pub(super) async fn finish(
    ctx: &Ctx,
    task: &AgentTask,
    status: &mut AgentTaskStatus,
    outcome: &Outcome,
    log: Option<&podspec::ParsedLog>,
) -> Result<(), Error> {
    let (phase, reason) = outcome.phase_reason();
    let timeout = task.spec.timeout_seconds.unwrap_or(ctx.settings.defaults.timeout_seconds);
    status.phase = Some(phase);
    status.reason = reason.map(|r| r.as_str().to_owned());
    let mut outcome = outcome.clone();
    outcome.launch_note = launch_note(task);
    status.message = Some(outcome.message(timeout));
    status.exit_code = outcome.exit_code;
    status.completion_time = Some(now_rfc3339());
    if let Some(l) = log {
        status.stdout_bytes = Some(l.stdout.len() as u64);
        status.stderr_bytes = Some(l.stderr.len() as u64);
        status.result = l
            .result
            .as_ref()
            .filter(|r| r.len() <= MAX_STATUS_RESULT_BYTES && !l.result_truncated)
            .and_then(|r| serde_json::from_slice(r).ok());
    }
    set_condition(status, "Finished", reason.map(|r| r.as_str()), status.message.clone());
    patch_status(ctx, task, status).await?;
    let type_ = if phase == Phase::Succeeded { EventType::Normal } else { EventType::Warning };
    publish(ctx, task, type_, reason.map_or("Succeeded", |r| r.as_str()), status.message.clone().unwrap_or_default())
        .await;
    Ok(())
}

pub(super) fn requeue_for_ttl(task: &AgentTask, status: &AgentTaskStatus) -> Action {
    let ttl = i64::from(task.spec.ttl_seconds_after_finished.unwrap_or(super::crd::DEFAULT_TTL_SECONDS));
    let done = parse_time(status.completion_time.as_deref()).unwrap_or_else(Utc::now);
    let left = (done + chrono::Duration::seconds(ttl) - Utc::now()).to_std().unwrap_or_default();
    Action::requeue(left.max(Duration::from_millis(100)))
}

/// A finished AgentTask is deleted `ttlSecondsAfterFinished` after its completion.
async fn expire(task: &AgentTask, ctx: &Ctx, phase: Phase, status: &AgentTaskStatus) -> Result<Action, Error> {
    let ttl = i64::from(task.spec.ttl_seconds_after_finished.unwrap_or(super::crd::DEFAULT_TTL_SECONDS));
    let done = parse_time(status.completion_time.as_deref()).unwrap_or_else(Utc::now);
    if Utc::now() < done + chrono::Duration::seconds(ttl) {
        return Ok(requeue_for_ttl(task, status));
    }
    let api: Api<AgentTask> = Api::namespaced(ctx.client.clone(), &task.namespace().ok_or(Error::NoNamespace)?);
    tracing::info!(agenttask = %key_of(task), ?phase, "deleting a finished AgentTask after its TTL");
    match api.delete(&task.name_any(), &DeleteParams::background()).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(Action::await_change())
}

/// The finalizer's part: an AgentTask deleted before it finished is `Cancelled`, its pod goes.
/// A user's own AgentTask that was still waiting for admission has no run to report that: its
/// task is cancelled in the store (one `Cancelled` end, as `agentctl cancel` gives).
async fn cleanup(task: &AgentTask, ctx: &Ctx) -> Result<Action, Error> {
    let ns = task.namespace().ok_or(Error::NoNamespace)?;
    if let Some(recorded) = ctx.store.kube_task_of_object(&object_key(&ns, &task.name_any())).await? {
        if !recorded.phase.is_terminal() {
            ctx.store.request_cancel(recorded.task_id).await?;
        }
    }
    let mut status = task.status.clone().unwrap_or_default();
    let cancelled = !status.phase.is_some_and(|p| p.is_terminal());
    if cancelled {
        let started = parse_time(status.start_time.as_deref()).unwrap_or_else(Utc::now);
        let outcome = Outcome::cancelled(started);
        finish(ctx, task, &mut status, &outcome, None).await?;
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let attempt = task.spec.admission.as_ref().map(|a| a.attempt).or(status.attempt);
    if let (Some(TaskBackend::Sandbox), Some(attempt)) = (task.spec.backend, attempt) {
        // A warm task's claim (its Sandbox and pod go with it).
        super::warm::delete_claim(ctx, &ns, &podspec::pod_name(&task.name_any(), attempt)).await?;
    }
    if let Some(pod) = &status.pod_name {
        if task.spec.backend == Some(TaskBackend::Sandbox) {
            delete_sandbox(&sandbox_api(ctx, &ns), pod).await?;
        }
        delete_ignoring_missing(&pods, pod).await?;
    }
    // A cancelled run keeps no artifacts (a finished one's are the executor's to collect).
    if let (true, Some(sink), Some((tenant, task_id))) = (cancelled, ctx.artifacts.clone(), podspec::run_of(task)) {
        let _ = tokio::task::spawn_blocking(move || sink.discard_run(&tenant, task_id)).await;
    }
    Ok(Action::await_change())
}

/// The Sandboxes of namespace `ns`, in the configured agent-sandbox version.
fn sandbox_api(ctx: &Ctx, ns: &str) -> Api<kube::core::DynamicObject> {
    let ar = sandbox::api_resource(sandbox::Kind::Sandbox, ctx.settings.sandbox_version);
    Api::namespaced_with(ctx.client.clone(), ns, &ar)
}

pub(super) async fn delete_sandbox(api: &Api<kube::core::DynamicObject>, name: &str) -> Result<(), Error> {
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn delete_ignoring_missing(pods: &Api<Pod>, name: &str) -> Result<(), Error> {
    match pods.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Applies the task's ConfigMaps, NetworkPolicy and Pod, and gives the AgentTask the
/// ConfigMaps the backend made for big inputs.
async fn create_objects(task: &AgentTask, ctx: &Ctx, ns: &str, attempt: i32) -> Result<(), Error> {
    let objects = podspec::build(task, &ctx.settings.pods, &ctx.settings.defaults)?;
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
    for cm in &objects.config_maps {
        cms.patch(&cm.name_any(), &pp, &Patch::Apply(cm)).await?;
    }
    if let Some(owner) = podspec::owner_of(task) {
        for name in &task.spec.inputs_from {
            let body = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "ownerReferences": [owner]}});
            match cms.patch(name, &PatchParams::apply("agenttask-inputs").force(), &Patch::Apply(&body)).await {
                Ok(_) => {}
                // A missing input ConfigMap leaves the pod waiting on its volume; say why.
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    publish(ctx, task, EventType::Warning, "InputMissing", format!("ConfigMap {name} does not exist"))
                        .await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    let nps: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), ns);
    nps.patch(&objects.network_policy.name_any(), &pp, &Patch::Apply(&objects.network_policy)).await?;
    if let (Some(sink), Some((tenant, task_id))) = (ctx.artifacts.clone(), podspec::run_of(task)) {
        // Before the pod exists: a kubelet would make a missing sub-path root-owned.
        tokio::task::spawn_blocking(move || sink.prepare_run(&tenant, task_id))
            .await
            .map_err(|e| Error::Artifacts(e.to_string()))?
            .map_err(|e| Error::Artifacts(e.to_string()))?;
    }
    debug_assert_eq!(objects.pod.name_any(), podspec::pod_name(&task.name_any(), attempt));
    if task.spec.backend == Some(TaskBackend::Sandbox) {
        let timeout = task.spec.timeout_seconds.unwrap_or(ctx.settings.defaults.timeout_seconds);
        let deadline = Utc::now() + chrono::Duration::seconds(i64::from(timeout));
        let sb = sandbox::build(
            task,
            &ctx.settings.pods,
            &ctx.settings.defaults,
            ctx.settings.sandbox_version,
            deadline,
            ctx.settings.sandbox_shutdown_grace,
        )?
        .sandbox;
        sandbox_api(ctx, ns).patch(&sb.name_any(), &pp, &Patch::Apply(&sb)).await?;
        return Ok(());
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    pods.patch(&objects.pod.name_any(), &pp, &Patch::Apply(&objects.pod)).await?;
    Ok(())
}

async fn read_log(pods: &Api<Pod>, pod: &str, settings: &podspec::PodSettings) -> Option<Vec<u8>> {
    let limit = (2 * settings.output_limit_bytes + settings.result_max_bytes + 4096) as i64;
    let lp = LogParams { container: Some(CONTAINER.into()), limit_bytes: Some(limit), ..LogParams::default() };
    match pods.logs(pod, &lp).await {
        Ok(text) => Some(text.into_bytes()),
        Err(e) => {
            tracing::warn!(pod, error = %e, "cannot read the task's log");
            None
        }
    }
}

/// What a pod's status says about the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// Not placed yet, or waiting for its image (retry at the end of the grace period).
    Pending {
        retry_in: Option<Duration>,
    },
    Scheduled,
    Running {
        started: Option<DateTime<Utc>>,
    },
    Ended {
        termination: Termination,
        exit_code: Option<i32>,
        termination_message: Option<String>,
    },
}

const PULL_FAILURES: [&str; 5] =
    ["ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull", "RegistryUnavailable"];

fn to_chrono(t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis(t.0.as_millisecond())
}

/// Pure: reads a pod's status (reason mapping of the contract).
pub fn observe(pod: &Pod, pull_grace: Duration, now: DateTime<Utc>) -> Observed {
    let Some(st) = &pod.status else { return Observed::Pending { retry_in: None } };
    let phase = st.phase.as_deref().unwrap_or("Pending");
    let cs = st.container_statuses.iter().flatten().find(|c| c.name == CONTAINER);
    let state = cs.and_then(|c| c.state.as_ref());
    if phase == "Failed" && st.reason.as_deref() == Some("DeadlineExceeded") {
        return Observed::Ended { termination: Termination::TimedOut, exit_code: None, termination_message: None };
    }
    if let Some(t) = state.and_then(|s| s.terminated.as_ref()) {
        let termination =
            if t.reason.as_deref() == Some("OOMKilled") { Termination::OomKilled } else { Termination::Exited };
        return Observed::Ended { termination, exit_code: Some(t.exit_code), termination_message: t.message.clone() };
    }
    if matches!(phase, "Succeeded" | "Failed") {
        let why = st
            .message
            .clone()
            .or_else(|| st.reason.clone())
            .unwrap_or_else(|| format!("pod {phase} without a container status"));
        return Observed::Ended {
            termination: Termination::BackendError(why),
            exit_code: None,
            termination_message: None,
        };
    }
    if let Some(w) = state.and_then(|s| s.waiting.as_ref()) {
        if w.reason.as_deref().is_some_and(|r| PULL_FAILURES.contains(&r)) {
            let since = pod.metadata.creation_timestamp.as_ref().and_then(to_chrono).unwrap_or(now);
            let waited = (now - since).to_std().unwrap_or_default();
            if waited >= pull_grace {
                let image = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.containers.first())
                    .and_then(|c| c.image.clone())
                    .unwrap_or_default();
                let detail = format!(
                    "{image}: {} {}",
                    w.reason.clone().unwrap_or_default(),
                    w.message.clone().unwrap_or_default()
                );
                return Observed::Ended {
                    termination: Termination::ImagePullFailed(detail.trim().to_owned()),
                    exit_code: None,
                    termination_message: None,
                };
            }
            return Observed::Pending { retry_in: Some(pull_grace - waited + Duration::from_millis(50)) };
        }
    }
    if let Some(r) = state.and_then(|s| s.running.as_ref()) {
        return Observed::Running { started: r.started_at.as_ref().and_then(to_chrono) };
    }
    let scheduled = st.conditions.iter().flatten().any(|c| c.type_ == "PodScheduled" && c.status == "True");
    if scheduled {
        Observed::Scheduled
    } else {
        Observed::Pending { retry_in: None }
    }
}

/// Deletes our Sandboxes and SandboxClaims (when `sandboxes` names the agent-sandbox version the
/// backend speaks), pods and ConfigMaps whose AgentTask no longer exists (older than `min_age`,
/// so objects made just before their AgentTask are not taken for orphans). Returns how many.
///
/// A Sandbox or claim is owned by its AgentTask, so the garbage collector normally takes it; the
/// sweep covers what the collector cannot see: one that only our labels tie to a task (its
/// ownerReference removed, or made by hand from `agenttask render`), or one left behind when
/// the collector did not run. A pod controlled by a Sandbox is left to it: deleted alone, it
/// would be made again by agent-sandbox; it goes with its Sandbox (a claimed one with its claim).
pub async fn sweep_orphans(
    client: &Client,
    scope: &Scope,
    min_age: Duration,
    sandboxes: Option<sandbox::SandboxApiVersion>,
) -> Result<usize, kube::Error> {
    let (tasks, pods, cms): (Api<AgentTask>, Api<Pod>, Api<ConfigMap>) =
        (scoped(client, scope), scoped(client, scope), scoped(client, scope));
    let live: BTreeSet<(String, String)> = tasks
        .list_metadata(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|t| (t.namespace().unwrap_or_default(), t.name_any()))
        .collect();
    let lp = ListParams::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGER},{LABEL_AGENTTASK}"));
    let now = Utc::now();
    let orphan = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        let owner = meta.labels.as_ref().and_then(|l| l.get(LABEL_AGENTTASK)).cloned().unwrap_or_default();
        let old = meta
            .creation_timestamp
            .as_ref()
            .and_then(to_chrono)
            .is_some_and(|t| (now - t).to_std().unwrap_or_default() >= min_age);
        old && meta.deletion_timestamp.is_none() && !live.contains(&(meta.namespace.clone().unwrap_or_default(), owner))
    };
    let mut removed = 0;
    // A claim's Sandbox (adopted from a pool, so not labelled as ours) and pod go with the claim.
    let kinds = [sandbox::Kind::Sandbox, sandbox::Kind::SandboxClaim];
    if let Some(version) = sandboxes {
        for kind in kinds {
            let ar = sandbox::api_resource(kind, version);
            let all: Api<kube::core::DynamicObject> = match scope {
                Scope::Namespace(ns) => Api::namespaced_with(client.clone(), ns, &ar),
                Scope::All => Api::all_with(client.clone(), &ar),
            };
            let found = match all.list_metadata(&lp).await {
                Ok(list) => list.items,
                // agent-sandbox (or its extensions) is not installed (yet): nothing of that kind.
                Err(kube::Error::Api(e)) if e.code == 404 => vec![],
                Err(e) => return Err(e),
            };
            for o in found.iter().filter(|o| orphan(&o.metadata)) {
                let api: Api<kube::core::DynamicObject> =
                    Api::namespaced_with(client.clone(), &o.namespace().unwrap_or_default(), &ar);
                if api.delete(&o.name_any(), &DeleteParams::background()).await.is_ok() {
                    removed += 1;
                }
            }
        }
    }
    let sandbox_controlled = |p: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        p.owner_references.iter().flatten().any(|o| o.controller == Some(true) && o.kind == "Sandbox")
    };
    for p in
        pods.list_metadata(&lp).await?.items.iter().filter(|p| orphan(&p.metadata) && !sandbox_controlled(&p.metadata))
    {
        let api: Api<Pod> = Api::namespaced(client.clone(), &p.namespace().unwrap_or_default());
        if api.delete(&p.name_any(), &DeleteParams::default()).await.is_ok() {
            removed += 1;
        }
    }
    for c in cms.list_metadata(&lp).await?.items.iter().filter(|c| orphan(&c.metadata)) {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), &c.namespace().unwrap_or_default());
        if api.delete(&c.name_any(), &DeleteParams::default()).await.is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

/// The reconciler component: waits for the reconciler lock in Postgres, then runs the
/// controller and the orphan sweep until `shutdown` (or until the lock's session is lost). When
/// a tenants reload changes which namespaces must be watched, the controller starts over with
/// the new scope.
pub async fn run(
    client: Client,
    settings: KubeSettings,
    metrics: Metrics,
    store: Store,
    mut tenants: tokio::sync::watch::Receiver<Arc<Tenants>>,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        let mut conn = match store.dedicated_connection().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "reconciler: cannot reach Postgres; retrying");
                tokio::select! { _ = shutdown.cancelled() => break, _ = tokio::time::sleep(Duration::from_secs(1)) => {} }
                continue;
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = sqlx::query("select pg_advisory_lock($1)").bind(RECONCILER_LOCK).execute(&mut conn) => if let Err(e) = r {
                tracing::warn!(error = %e, "reconciler: cannot take the lock; retrying");
                continue;
            },
        }
        let scope = direct::current_scope(&settings.namespaces, &tenants);
        tracing::info!(?scope, "reconciler: this process reconciles AgentTasks");
        let stop = CancellationToken::new();
        let ctx = Arc::new(Ctx::new(client.clone(), settings.clone(), metrics.clone(), store.clone(), tenants.clone()));
        let controller = controller(ctx, scope.clone(), stop.clone());
        let sweeper = sweep_loop(client.clone(), settings.clone(), scope.clone(), stop.clone());
        let lost = async {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                if sqlx::query("select 1").execute(&mut conn).await.is_err() {
                    break;
                }
            }
        };
        let rescoped = async {
            while tenants.changed().await.is_ok() {
                if direct::current_scope(&settings.namespaces, &tenants) != scope {
                    return;
                }
            }
            std::future::pending().await
        };
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = lost => tracing::warn!("reconciler: lost the Postgres session holding the lock; stepping down"),
            _ = rescoped => tracing::info!("reconciler: the tenants' namespaces changed; watching anew"),
            _ = async { tokio::join!(controller, sweeper) } => {}
        }
        stop.cancel();
    }
}

/// An API over the watched namespaces.
pub(super) fn scoped<K>(client: &Client, scope: &Scope) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as Resource>::DynamicType: Default,
{
    match scope {
        Scope::Namespace(ns) => Api::namespaced(client.clone(), ns),
        Scope::All => Api::all(client.clone()),
    }
}

async fn controller(ctx: Arc<Ctx>, scope: Scope, stop: CancellationToken) {
    let client = ctx.client.clone();
    let (tasks, pods): (Api<AgentTask>, Api<Pod>) = (scoped(&client, &scope), scoped(&client, &scope));
    let pod_cfg = watcher::Config::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGER}"));
    let mut ctl = Controller::new(tasks, watcher::Config::default()).owns(pods.clone(), pod_cfg.clone());
    if ctx.settings.backend == KubeBackendKind::Sandbox {
        // A Sandbox's pod is owned by the Sandbox: it names its AgentTask by label.
        ctl = ctl.watches(pods, pod_cfg, |pod| {
            let ns = pod.metadata.namespace.clone()?;
            let name = pod.metadata.labels.as_ref()?.get(LABEL_AGENTTASK)?.clone();
            Some(kube::runtime::reflector::ObjectRef::new(&name).within(&ns))
        });
    }
    ctl.graceful_shutdown_on(async move { stop.cancelled().await })
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "controller event");
            }
        })
        .await;
}

async fn sweep_loop(client: Client, settings: KubeSettings, scope: Scope, stop: CancellationToken) {
    loop {
        let sandboxes = (settings.backend == KubeBackendKind::Sandbox).then_some(settings.sandbox_version);
        match sweep_orphans(&client, &scope, settings.orphan_sweep_every, sandboxes).await {
            Ok(n) if n > 0 => {
                tracing::info!(removed = n, "orphaned Sandboxes, SandboxClaims, pods and ConfigMaps removed")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "orphan sweep failed"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(settings.orphan_sweep_every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus, PodStatus,
    };

    fn pod_with(phase: &str, reason: Option<&str>, state: Option<ContainerState>) -> Pod {
        Pod {
            status: Some(PodStatus {
                phase: Some(phase.into()),
                reason: reason.map(Into::into),
                container_statuses: state
                    .map(|s| vec![ContainerStatus { name: CONTAINER.into(), state: Some(s), ..Default::default() }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn reasons_map_as_the_contract_says() {
        let now = Utc::now();
        let g = Duration::from_secs(60);
        let term = |reason: &str, code| ContainerState {
            terminated: Some(ContainerStateTerminated {
                reason: Some(reason.into()),
                exit_code: code,
                message: Some("{}".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(matches!(
            observe(&pod_with("Failed", None, Some(term("OOMKilled", 137))), g, now),
            Observed::Ended { termination: Termination::OomKilled, exit_code: Some(137), .. }
        ));
        assert!(matches!(
            observe(&pod_with("Failed", Some("DeadlineExceeded"), None), g, now),
            Observed::Ended { termination: Termination::TimedOut, .. }
        ));
        match observe(&pod_with("Succeeded", None, Some(term("Completed", 0))), g, now) {
            Observed::Ended { termination: Termination::Exited, exit_code: Some(0), termination_message } => {
                assert_eq!(termination_message.as_deref(), Some("{}"))
            }
            o => panic!("{o:?}"),
        }
        let waiting = ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some("ImagePullBackOff".into()),
                message: Some("no such image".into()),
            }),
            ..Default::default()
        };
        let mut p = pod_with("Pending", None, Some(waiting));
        p.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_millisecond((now - chrono::Duration::seconds(10)).timestamp_millis())
                .unwrap(),
        ));
        assert!(matches!(observe(&p, g, now), Observed::Pending { retry_in: Some(_) }));
        assert!(
            matches!(observe(&p, Duration::from_secs(5), now), Observed::Ended { termination: Termination::ImagePullFailed(m), .. } if m.contains("ImagePullBackOff"))
        );
    }

    #[test]
    fn the_launch_note_is_the_current_attempts() {
        use crate::kube::crd::{Admission, AgentTaskSpec};
        let mut t = AgentTask::new("at-1", AgentTaskSpec::default());
        t.spec.admission = Some(Admission { task_id: uuid::Uuid::nil().to_string(), attempt: 2 });
        assert_eq!(launch_note(&t), None);
        let ann = |attempt: &str, launch: &str| {
            std::collections::BTreeMap::from([
                (sandbox::ANNOTATION_LAUNCH_ATTEMPT.to_owned(), attempt.to_owned()),
                (sandbox::ANNOTATION_LAUNCH.to_owned(), launch.to_owned()),
            ])
        };
        t.metadata.annotations = Some(ann("1", "warm (pool py)"));
        assert_eq!(launch_note(&t), None, "a retry does not inherit the last attempt's note");
        t.metadata.annotations = Some(ann("2", "warm (pool py)"));
        assert_eq!(launch_note(&t).as_deref(), Some("launched warm (pool py)"));
        assert_eq!(launched_warm(&t), Some(true));
        t.metadata.annotations = Some(ann("2", "never launched: no replica"));
        assert_eq!(launch_note(&t).as_deref(), Some("never launched: no replica"));
        assert_eq!(launched_warm(&t), None);
    }

    #[test]
    fn error_labels_are_stable() {
        assert_eq!(Error::NoNamespace.metric_label(), "NoNamespace");
        assert_eq!(Error::Build(BuildError::NoCode).metric_label(), "BuildError");
        let nested = Error::Finalizer(Box::new(kube::runtime::finalizer::Error::ApplyFailed(Error::NoNamespace)));
        assert_eq!(nested.metric_label(), "NoNamespace");
        assert_eq!(Error::Artifacts("full".into()).metric_label(), "ArtifactsError");
    }
}
