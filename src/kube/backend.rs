//! The [`Backend`] the executor drives for `--backend kubernetes`.
//!
//! It never runs anything itself: `launch` applies the task's AgentTask (server-side apply,
//! named from the task id, so a second launch or a second process changes nothing), and one
//! watcher over AgentTasks turns their status into run events. The reconciler (in whichever
//! process holds its lock) does the rest. `cancel` deletes the AgentTask; its finalizer marks
//! it `Cancelled` and the watcher reports that. Pods outlive this process, so a restarted one
//! `adopt`s the AgentTasks it finds and goes on watching them.
//!
//! With an artifacts claim, a finished run's artifacts are stored from the pod's sub-path of
//! the claim (see [`crate::exec::artifacts::PvcSink`]) before the run is reported finished, so
//! an adopted run is collected like any other; a cancelled run's are discarded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, ListParams, LogParams, Patch, PatchParams};
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt as _;
use kube::{Client, ResourceExt};
use tokio_util::sync::CancellationToken;

use super::crd::{AgentTask, TaskBackend, LABEL_MANAGED_BY, MANAGER};
use super::direct::{self, Scope};
use super::podspec::{self, CONTAINER};
use super::reconcile::FIELD_MANAGER;
use super::{materialize, KubeSettings};
use crate::domain::phase::Phase;
use crate::domain::tenant::{TenantPolicy, Tenants};
use crate::domain::validate::BackendIsolation;
use crate::exec::artifacts::PvcSink;
use crate::exec::{
    Backend, BackendError, BoxFuture, Capabilities, Captured, EventSink, Job, Outcome, ProgramResult, RunEvent, RunKey,
    Termination,
};

/// What this process reported of one run so far.
#[derive(Debug, Clone)]
struct Run {
    namespace: String,
    name: String,
    /// 0 nothing, 1 Scheduled, 2 Running, 3 Finished.
    reported: u8,
}

/// AgentTasks as runs.
pub struct KubeBackend {
    client: Client,
    settings: KubeSettings,
    /// The tenants in force: their namespaces decide which namespaces are watched.
    tenants: tokio::sync::watch::Receiver<std::sync::Arc<Tenants>>,
    runs: Mutex<HashMap<RunKey, Run>>,
    sink: Mutex<Option<EventSink>>,
    /// Stops the watcher at shutdown; pods keep running.
    stop: CancellationToken,
    watching: std::sync::atomic::AtomicBool,
    /// Where pods' artifacts are collected from and kept, with `--artifacts-pvc`.
    artifacts: Option<Arc<PvcSink>>,
}

impl KubeBackend {
    pub fn new(client: Client, settings: KubeSettings, tenants: tokio::sync::watch::Receiver<Arc<Tenants>>) -> Self {
        KubeBackend {
            artifacts: settings.artifact_sink().map(Arc::new),
            client,
            settings,
            tenants,
            runs: Mutex::default(),
            sink: Mutex::default(),
            stop: CancellationToken::new(),
            watching: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn scope(&self) -> Scope {
        direct::current_scope(&self.settings.namespaces, &self.tenants)
    }

    fn tasks_api(&self, scope: &Scope) -> Api<AgentTask> {
        super::reconcile::scoped(&self.client, scope)
    }

    fn set_sink(&self, events: EventSink) {
        *self.sink.lock().expect("not poisoned") = Some(events);
    }

    fn send(&self, key: RunKey, event: RunEvent) {
        if let Some(sink) = self.sink.lock().expect("not poisoned").as_ref() {
            sink.send(key, event);
        }
    }

    /// Starts the one watcher of this process (idempotent).
    fn ensure_watching(self: &Arc<Self>) {
        if self.watching.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let mut tenants = this.tenants.clone();
            loop {
                let scope = this.scope();
                let cfg = watcher::Config::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGER}"));
                let mut stream = watcher(this.tasks_api(&scope), cfg).default_backoff().boxed();
                loop {
                    let ev = tokio::select! {
                        _ = this.stop.cancelled() => return,
                        // A tenants reload can widen or narrow the namespaces to watch.
                        changed = tenants.changed() => match changed {
                            Ok(()) if this.scope() != scope => break,
                            _ => continue,
                        },
                        ev = stream.next() => ev,
                    };
                    match ev {
                        Some(Ok(watcher::Event::Apply(t) | watcher::Event::InitApply(t))) => this.observe(t, false),
                        Some(Ok(watcher::Event::Delete(t))) => this.observe(t, true),
                        Some(Ok(_)) => {}
                        Some(Err(e)) => tracing::warn!(error = %e, "watching AgentTasks failed; retrying"),
                        None => return,
                    }
                }
            }
        });
    }

    /// Turns an AgentTask's status into the events not reported yet.
    fn observe(self: &Arc<Self>, task: AgentTask, deleted: bool) {
        let Some(key) = run_key(&task) else { return };
        let status = task.status.clone().unwrap_or_default();
        let current = status.attempt == Some(key.attempt);
        let phase = if current { status.phase } else { None };
        let reported = {
            let mut runs = self.runs.lock().expect("not poisoned");
            let Some(run) = runs.get_mut(&key) else { return };
            let before = run.reported;
            let target = match phase {
                Some(p) if p.is_terminal() => 3,
                _ if deleted => 3,
                Some(Phase::Running) => 2,
                Some(Phase::Scheduled) => 1,
                _ => 0,
            };
            if target <= before {
                return;
            }
            run.reported = target;
            if target == 3 {
                runs.remove(&key);
            }
            before
        };
        let now = Utc::now();
        let started = parse_time(status.start_time.as_deref());
        if reported < 1 && phase.is_some_and(|p| p != Phase::Pending) {
            self.send(key, RunEvent::Scheduled { at: now });
        }
        if reported < 2 && (phase == Some(Phase::Running) || started.is_some()) {
            self.send(key, RunEvent::Running { at: started.unwrap_or(now) });
        }
        if phase.is_some_and(|p| p.is_terminal()) {
            let this = self.clone();
            tokio::spawn(async move {
                let mut outcome = this.outcome_of(&task).await;
                this.keep_artifacts(&task, &mut outcome).await;
                this.send(key, RunEvent::Finished(Box::new(outcome)));
            });
        } else if deleted {
            self.send(key, RunEvent::Finished(Box::new(Outcome::cancelled(started.unwrap_or(now)))));
            if let (Some(sink), Some((tenant, task_id))) = (self.artifacts.clone(), podspec::run_of(&task)) {
                tokio::task::spawn_blocking(move || sink.discard_run(&tenant, task_id));
            }
        }
    }

    /// Stores what the finished pod left in its artifacts directory (with a claim), or says
    /// that nothing is kept (without one). A cancelled run's directory is discarded.
    async fn keep_artifacts(&self, task: &AgentTask, outcome: &mut Outcome) {
        let ran = matches!(
            outcome.termination,
            Termination::Exited | Termination::OomKilled | Termination::OutputLimitExceeded | Termination::TimedOut
        );
        let Some(sink) = self.artifacts.clone() else {
            if ran {
                outcome.artifacts_note = Some(
                    "files under AGENTTASK_ARTIFACTS_DIR are not kept: the Kubernetes backend keeps them only \
                     with --artifacts-pvc"
                        .into(),
                );
            }
            return;
        };
        let Some((tenant, task_id)) = podspec::run_of(task) else { return };
        if outcome.termination == Termination::Cancelled {
            let _ = tokio::task::spawn_blocking(move || sink.discard_run(&tenant, task_id)).await;
            return;
        }
        let quota = self
            .tenants
            .borrow()
            .iter()
            .find(|(name, _)| name.as_str() == tenant)
            .map_or(TenantPolicy::default().max_artifact_bytes, |(_, p)| p.max_artifact_bytes);
        match tokio::task::spawn_blocking(move || sink.collect_run(&tenant, task_id, quota)).await {
            Ok(collected) => {
                outcome.artifacts = collected.artifacts;
                outcome.artifacts_note = collected.note;
            }
            Err(e) => outcome.artifacts_note = Some(format!("artifacts not stored: collecting them failed: {e}")),
        }
    }

    /// The outcome a terminal AgentTask describes, with the output read from its pod's log.
    async fn outcome_of(&self, task: &AgentTask) -> Outcome {
        let status = task.status.clone().unwrap_or_default();
        let launch_note = super::reconcile::launch_note(task);
        let mut message = status.message.clone().unwrap_or_default();
        if let Some(note) = &launch_note {
            // The reconciler's message ends with the note; the outcome's message adds it again.
            message = message.strip_suffix(&format!("; {note}")).unwrap_or(&message).to_owned();
        }
        let termination = match status.reason.as_deref() {
            None | Some("NonZeroExit") => Termination::Exited,
            Some("OOMKilled") => Termination::OomKilled,
            Some("TimedOut") => Termination::TimedOut,
            Some("OutputLimitExceeded") => Termination::OutputLimitExceeded,
            Some("Cancelled") => Termination::Cancelled,
            Some("ImagePullFailed") => {
                Termination::ImagePullFailed(strip(&message, "the task's image could not be pulled: "))
            }
            Some("PodMissing") => Termination::PodMissing(strip(&message, "the pod running the task disappeared: ")),
            Some(_) => Termination::BackendError(strip(&message, "the backend failed to run the task: ")),
        };
        let now = Utc::now();
        let started = parse_time(status.start_time.as_deref()).unwrap_or(now);
        let finished = parse_time(status.completion_time.as_deref()).unwrap_or(now);
        let mut outcome = Outcome::bare(termination, started, finished.max(started));
        outcome.exit_code = status.exit_code;
        outcome.launch_note = launch_note;
        outcome.warm = super::reconcile::launched_warm(task);
        if let Some(v) = &status.result {
            outcome.result = ProgramResult::Json(v.clone());
        }
        let readable = matches!(
            outcome.termination,
            Termination::Exited | Termination::OomKilled | Termination::OutputLimitExceeded
        );
        let (Some(pod_name), Some(ns), true) = (status.pod_name.as_deref(), task.namespace(), readable) else {
            return outcome;
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let ps = &self.settings.pods;
        let termination_message = match pods.get_opt(pod_name).await {
            Ok(Some(p)) => p
                .status
                .and_then(|s| s.container_statuses)
                .into_iter()
                .flatten()
                .find(|c| c.name == CONTAINER)
                .and_then(|c| c.state)
                .and_then(|s| s.terminated)
                .and_then(|t| t.message),
            _ => None,
        };
        let limit = (2 * ps.output_limit_bytes + ps.result_max_bytes + 4096) as i64;
        let lp = LogParams { container: Some(CONTAINER.into()), limit_bytes: Some(limit), ..LogParams::default() };
        let log = match pods.logs(pod_name, &lp).await {
            Ok(l) => l.into_bytes(),
            Err(e) => {
                tracing::warn!(pod = pod_name, error = %e, "cannot read the task's output");
                return outcome;
            }
        };
        let parsed =
            podspec::parse_log(&log, termination_message.as_deref(), ps.output_limit_bytes, ps.result_max_bytes);
        outcome.stdout = captured(&parsed.stdout, parsed.stdout_truncated);
        outcome.stderr = captured(&parsed.stderr, parsed.stderr_truncated);
        outcome.result = match parsed.result {
            None => outcome.result,
            Some(_) if parsed.result_truncated => {
                ProgramResult::Invalid(format!("larger than {} bytes", ps.result_max_bytes))
            }
            Some(bytes) => match serde_json::from_slice(&bytes) {
                Ok(v) => ProgramResult::Json(v),
                Err(e) => ProgramResult::Invalid(format!("not valid JSON: {e}")),
            },
        };
        outcome
    }
}

fn strip(message: &str, prefix: &str) -> String {
    message.strip_prefix(prefix).unwrap_or(message).to_owned()
}

fn captured(bytes: &[u8], truncated: bool) -> Captured {
    Captured { text: String::from_utf8_lossy(bytes).replace('\0', "\u{FFFD}"), truncated }
}

fn parse_time(s: Option<&str>) -> Option<DateTime<Utc>> {
    s.and_then(|s| DateTime::parse_from_rfc3339(s).ok()).map(|t| t.with_timezone(&Utc))
}

/// What a launch writes.
enum Launch {
    /// The AgentTask the service makes for a task from RabbitMQ, and its big inputs.
    Make { task: Box<AgentTask>, inputs: Vec<ConfigMap> },
    /// A user's own AgentTask: it only gets its admission.
    Admit { admission: super::crd::Admission, backend: TaskBackend },
}

impl KubeBackend {
    async fn apply(&self, namespace: &str, name: &str, launch: &Launch) -> Result<(), BackendError> {
        let api: Api<AgentTask> = Api::namespaced(self.client.clone(), namespace);
        match launch {
            Launch::Make { task, inputs } => {
                let pp = PatchParams::apply(FIELD_MANAGER).force();
                let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
                for cm in inputs {
                    cms.patch(&cm.name_any(), &pp, &Patch::Apply(cm)).await.map_err(unavailable)?;
                }
                api.patch(name, &pp, &Patch::Apply(task.as_ref())).await.map_err(unavailable)?;
            }
            Launch::Admit { admission, backend } => {
                let body = serde_json::json!({"spec": {"admission": admission, "backend": backend}});
                api.patch(name, &PatchParams::default(), &Patch::Merge(&body)).await.map_err(unavailable)?;
            }
        }
        Ok(())
    }
}

/// The run an AgentTask of ours stands for.
fn run_key(task: &AgentTask) -> Option<RunKey> {
    let a = task.spec.admission.as_ref()?;
    Some(RunKey { task_id: a.task_id.parse().ok()?, attempt: a.attempt })
}

fn unavailable(e: kube::Error) -> BackendError {
    match &e {
        kube::Error::Api(s) if s.code == 422 || s.code == 400 => BackendError::Refused(e.to_string()),
        _ => BackendError::Unavailable(e.to_string()),
    }
}

impl Backend for KubeBackend {
    fn name_for(&self, isolation: &str) -> &'static str {
        match self.settings.backend {
            super::KubeBackendKind::Sandbox => "sandbox",
            super::KubeBackendKind::Podjob if isolation == "standard" => "podjob",
            super::KubeBackendKind::Podjob => "runtimeclass",
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { isolation: BackendIsolation::Any, runs_survive_restart: true, max_runs: self.settings.max_runs }
    }

    /// Registers the run and applies its AgentTask in the background, so that a slow API server
    /// never holds up the executor's loop (hundreds of launches at once would otherwise delay
    /// its lease renewals). Server-side apply is idempotent: a failed apply is retried with
    /// backoff while the run is watched; one the API server refuses ends the run as a
    /// `BackendError`.
    fn launch(self: Arc<Self>, job: Job, events: EventSink) -> BoxFuture<'static, Result<(), BackendError>> {
        Box::pin(async move {
            self.set_sink(events);
            let backend = match self.settings.backend {
                super::KubeBackendKind::Sandbox => TaskBackend::Sandbox,
                super::KubeBackendKind::Podjob if job.isolation == "standard" => TaskBackend::Podjob,
                super::KubeBackendKind::Podjob => TaskBackend::Runtimeclass,
            };
            let key = job.key;
            let (namespace, name, launch) = match job.kube_object.as_deref().and_then(|o| o.split_once('/')) {
                Some((ns, name)) => {
                    let admission = super::crd::Admission { task_id: key.task_id.to_string(), attempt: key.attempt };
                    (ns.to_owned(), name.to_owned(), Launch::Admit { admission, backend })
                }
                None => {
                    let namespace = self.settings.namespaces.for_tenant(&job.tenant);
                    let ttl = self.settings.ttl_seconds_after_finished;
                    let (task, inputs) = materialize::agent_task(&job, &namespace, backend, ttl);
                    (namespace, task.name_any(), Launch::Make { task: Box::new(task), inputs })
                }
            };
            {
                let mut runs = self.runs.lock().expect("not poisoned");
                if runs.contains_key(&key) {
                    return Ok(());
                }
                runs.insert(key, Run { namespace: namespace.clone(), name: name.clone(), reported: 0 });
            }
            self.ensure_watching();
            let this = self.clone();
            tokio::spawn(async move {
                let mut wait = std::time::Duration::from_millis(200);
                loop {
                    match this.apply(&namespace, &name, &launch).await {
                        Ok(()) => return,
                        Err(BackendError::Refused(why)) => {
                            tracing::error!(run = %key, %why, "the API server refused the AgentTask");
                            if this.runs.lock().expect("not poisoned").remove(&key).is_some() {
                                let outcome =
                                    Outcome::backend_error(format!("the AgentTask was refused: {why}"), Utc::now());
                                this.send(key, RunEvent::Finished(Box::new(outcome)));
                            }
                            return;
                        }
                        Err(e) => {
                            if !this.runs.lock().expect("not poisoned").contains_key(&key) || this.stop.is_cancelled() {
                                return;
                            }
                            tracing::warn!(run = %key, error = %e, "applying the AgentTask failed; retrying");
                            tokio::time::sleep(wait).await;
                            wait = (wait * 2).min(std::time::Duration::from_secs(10));
                        }
                    }
                }
            });
            Ok(())
        })
    }

    fn cancel(&self, key: RunKey) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            let Some(run) = self.runs.lock().expect("not poisoned").get(&key).cloned() else { return Ok(()) };
            let api: Api<AgentTask> = Api::namespaced(self.client.clone(), &run.namespace);
            match api.delete(&run.name, &DeleteParams::background()).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    // Nothing is left to report it: the run ends here.
                    if self.runs.lock().expect("not poisoned").remove(&key).is_some() {
                        self.send(key, RunEvent::Finished(Box::new(Outcome::cancelled(Utc::now()))));
                    }
                    Ok(())
                }
                Err(e) => Err(unavailable(e)),
            }
        })
    }

    fn adopt(self: Arc<Self>, events: EventSink) -> BoxFuture<'static, Result<Vec<RunKey>, BackendError>> {
        Box::pin(async move {
            self.set_sink(events);
            let lp = ListParams::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGER}"));
            let list = self.tasks_api(&self.scope()).list(&lp).await.map_err(unavailable)?;
            let mut keys = Vec::new();
            {
                let mut runs = self.runs.lock().expect("not poisoned");
                for t in &list.items {
                    let Some(key) = run_key(t) else { continue };
                    let run = Run { namespace: t.namespace().unwrap_or_default(), name: t.name_any(), reported: 0 };
                    runs.entry(key).or_insert(run);
                    keys.push(key);
                }
            }
            // The watcher's initial list reports each one's current state.
            self.ensure_watching();
            Ok(keys)
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move { self.stop.cancel() })
    }

    /// The pod's log up to the stderr section the entry script writes at the end.
    fn live_output(&self, task_id: uuid::Uuid) -> BoxFuture<'_, Option<Vec<u8>>> {
        Box::pin(async move {
            let (key, run) = {
                let runs = self.runs.lock().expect("not poisoned");
                let (key, run) = runs.iter().find(|(k, _)| k.task_id == task_id)?;
                (*key, run.clone())
            };
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), &run.namespace);
            let limit = self.settings.pods.output_limit_bytes as i64 + 1;
            let lp = LogParams { container: Some(CONTAINER.into()), limit_bytes: Some(limit), ..LogParams::default() };
            let pod = podspec::pod_name(&run.name, key.attempt);
            let log = match pods.logs(&pod, &lp).await {
                Ok(log) => log,
                Err(e) => {
                    tracing::debug!(%pod, error = %e, "cannot read a running task's log");
                    return None;
                }
            };
            let stdout = log.split(podspec::STDERR_MARK).next().unwrap_or_default();
            Some(stdout.as_bytes().to_vec())
        })
    }
}
