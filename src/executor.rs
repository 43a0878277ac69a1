//! The executor: claims admitted tasks, launches them on a [`Backend`], and turns what the
//! backend observes into guarded store updates.
//!
//! One event loop owns the runs this process watches. It claims while it has room (the
//! backend's [`Capabilities::max_runs`]), launches, and reacts to four things: backend events
//! (placed, started, finished), cancel requests, wake-ups (new admissions), and a heartbeat that
//! renews the runs' leases. Every store write names the run's attempt, so an event of an older
//! run is ignored here and refused by the store.
//!
//! If this process dies, the leases expire and the scheduler's housekeeping hands the tasks to
//! another executor. On a clean shutdown, runs that die with the process are handed back at
//! once; runs that survive it (pods) keep a long lease so that the next process adopts them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use chrono::Utc;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use crate::domain::task::Language;
use crate::domain::tenant::{TenantPolicy, Tenants};
use crate::exec::{Backend, BoxFuture, Capabilities, Event, EventSink, Job, Outcome, RunEvent, RunKey};
use crate::metrics::Metrics;
use crate::retry::Backoff;
use crate::store::{AdoptedRun, ClaimedTask, Store, StoreError};

/// How long a claim stays valid without a heartbeat.
pub const LEASE: Duration = Duration::from_secs(30);
/// The lease left on runs that outlive this process, so the next one can adopt them before the
/// scheduler's housekeeping would hand them to someone else.
pub const HANDOVER_LEASE: Duration = Duration::from_secs(600);

/// The store operations the executor needs; [`Store`] implements them, tests use a fake.
pub trait ExecutorStore: Send + Sync + 'static {
    fn claim(&self, owner: Uuid, limit: i64, lease: Duration) -> BoxFuture<'_, Result<Vec<ClaimedTask>, StoreError>>;
    fn mark_scheduled<'a>(&'a self, key: RunKey, backend: &'a str) -> BoxFuture<'a, Result<bool, StoreError>>;
    fn mark_running<'a>(
        &'a self,
        key: RunKey,
        backend: &'a str,
        at: chrono::DateTime<Utc>,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;
    fn finish<'a>(
        &'a self,
        key: RunKey,
        backend: Option<&'a str>,
        outcome: &'a Outcome,
        timeout_seconds: u32,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;
    fn renew_leases<'a>(
        &'a self,
        owner: Uuid,
        task_ids: &'a [Uuid],
        lease: Duration,
    ) -> BoxFuture<'a, Result<u64, StoreError>>;
    fn cancel_requested(&self, owner: Uuid) -> BoxFuture<'_, Result<Vec<(Uuid, i32)>, StoreError>>;
    fn adopt<'a>(
        &'a self,
        owner: Uuid,
        runs: &'a [(Uuid, i32)],
        lease: Duration,
    ) -> BoxFuture<'a, Result<Vec<AdoptedRun>, StoreError>>;
    fn release(&self, owner: Uuid) -> BoxFuture<'_, Result<u64, StoreError>>;
}

impl ExecutorStore for Store {
    fn claim(&self, owner: Uuid, limit: i64, lease: Duration) -> BoxFuture<'_, Result<Vec<ClaimedTask>, StoreError>> {
        Box::pin(Store::claim(self, owner, limit, lease))
    }
    fn mark_scheduled<'a>(&'a self, key: RunKey, backend: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(Store::mark_scheduled(self, key.task_id, key.attempt, backend))
    }
    fn mark_running<'a>(
        &'a self,
        key: RunKey,
        backend: &'a str,
        at: chrono::DateTime<Utc>,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(Store::mark_running(self, key.task_id, key.attempt, backend, at))
    }
    fn finish<'a>(
        &'a self,
        key: RunKey,
        backend: Option<&'a str>,
        outcome: &'a Outcome,
        timeout_seconds: u32,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(Store::finish(self, key.task_id, key.attempt, backend, outcome, timeout_seconds))
    }
    fn renew_leases<'a>(
        &'a self,
        owner: Uuid,
        task_ids: &'a [Uuid],
        lease: Duration,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(Store::renew_leases(self, owner, task_ids, lease))
    }
    fn cancel_requested(&self, owner: Uuid) -> BoxFuture<'_, Result<Vec<(Uuid, i32)>, StoreError>> {
        Box::pin(Store::cancel_requested(self, owner))
    }
    fn adopt<'a>(
        &'a self,
        owner: Uuid,
        runs: &'a [(Uuid, i32)],
        lease: Duration,
    ) -> BoxFuture<'a, Result<Vec<AdoptedRun>, StoreError>> {
        Box::pin(Store::adopt(self, owner, runs, lease))
    }
    fn release(&self, owner: Uuid) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(Store::release(self, owner))
    }
}

/// What the executor needs, and nothing else.
pub struct Executor {
    pub store: Arc<dyn ExecutorStore>,
    pub backend: Arc<dyn Backend>,
    pub metrics: Metrics,
    /// Notified when tasks were admitted (or may be claimable again).
    pub wake: Arc<Notify>,
    /// Task ids someone asked to cancel (from `agenttask_cancel` notifications).
    pub cancels: mpsc::UnboundedReceiver<Uuid>,
    /// How long a claim stays valid without renewal ([`LEASE`] in production).
    pub lease: Duration,
    /// The tenants' policies, for what a backend enforces per tenant (the artifact quota).
    pub tenants: watch::Receiver<Arc<Tenants>>,
}

/// A run this process watches.
#[derive(Debug, Clone)]
struct Watched {
    key: RunKey,
    tenant: String,
    language: Option<Language>,
    timeout_seconds: u32,
    backend: &'static str,
    /// A `Finished` event was seen; the final write is under way.
    finishing: bool,
}

impl Watched {
    /// The span of this run's log lines (the `execute` stage of the task's life).
    fn span(&self) -> tracing::Span {
        tracing::info_span!("execute", task_id = %self.key.task_id, tenant = %self.tenant, attempt = self.key.attempt)
    }
}

impl Executor {
    /// Runs until `shutdown`. Never gives up on its own: store errors are retried, logged and
    /// counted, and a backend's failures end the tasks they concern, not the executor.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let owner = Uuid::new_v4();
        let caps: Capabilities = self.backend.capabilities();
        let (sink, mut events) = EventSink::channel();
        let (done_tx, mut done) = mpsc::unbounded_channel::<Uuid>();
        let writers = TaskTracker::new();
        let mut watched: HashMap<Uuid, Watched> = HashMap::new();
        if caps.runs_survive_restart {
            self.adopt(owner, &sink, &mut watched).await;
        }
        tracing::info!(backend = self.backend.name_for("standard"), %owner, max_runs = caps.max_runs, "executor started");
        let mut heartbeat = tokio::time::interval(self.lease / 3);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut claim_now = true;
        let mut retry_claim_at: Option<tokio::time::Instant> = None;
        loop {
            if claim_now && retry_claim_at.is_none() && watched.len() < caps.max_runs {
                let room = caps.max_runs - watched.len();
                match self.store.claim(owner, room as i64, self.lease).await {
                    Ok(claimed) => {
                        // A full claim means more may be waiting.
                        claim_now = claimed.len() == room;
                        for task in claimed {
                            let span = tracing::info_span!("execute", task_id = %task.task_id, tenant = %task.tenant, attempt = task.attempt);
                            self.launch(task, &sink, &mut watched, &writers, &done_tx).instrument(span).await;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot claim tasks; retrying");
                        retry_claim_at = Some(tokio::time::Instant::now() + Duration::from_millis(500));
                        claim_now = true;
                    }
                }
                continue;
            }
            let retry = async {
                match retry_claim_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                // Before events: a steady stream of them (hundreds of pods changing) must not
                // starve lease renewal, or the scheduler reaps runs that are alive.
                _ = heartbeat.tick() => {
                    self.heartbeat(owner, &watched).await;
                    claim_now = true;
                }
                Some(event) = events.recv() => self.on_event(event, &mut watched, &writers, &done_tx).await,
                Some(task_id) = done.recv() => {
                    watched.remove(&task_id);
                    claim_now = true;
                }
                Some(task_id) = self.cancels.recv() => {
                    if let Some(w) = watched.get(&task_id) {
                        self.cancel(w.key).await;
                    }
                }
                _ = self.wake.notified() => claim_now = true,
                _ = retry => {
                    retry_claim_at = None;
                }
            }
        }
        self.stop(owner, caps, &mut events, &mut watched, &writers, &done_tx).await;
    }

    /// Takes over the runs an earlier process left with the backend.
    async fn adopt(&self, owner: Uuid, sink: &EventSink, watched: &mut HashMap<Uuid, Watched>) {
        let keys = match self.backend.clone().adopt(sink.clone()).await {
            Ok(keys) => keys,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the backend's runs; they are adopted when their leases expire and they are retried");
                return;
            }
        };
        if keys.is_empty() {
            return;
        }
        let pairs: Vec<(Uuid, i32)> = keys.iter().map(|k| (k.task_id, k.attempt)).collect();
        let adopted = match self.store.adopt(owner, &pairs, self.lease).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "cannot adopt runs; their leases will expire");
                return;
            }
        };
        for run in &adopted {
            let key = RunKey { task_id: run.task_id, attempt: run.attempt };
            watched.insert(
                run.task_id,
                Watched {
                    key,
                    tenant: run.tenant.clone(),
                    language: run.language,
                    timeout_seconds: run.timeout_seconds.unwrap_or(0).max(0) as u32,
                    backend: self.backend.name_for(&run.isolation),
                    finishing: false,
                },
            );
        }
        // What the backend still runs but the store gave to a newer attempt (or ended) is stale.
        for key in keys {
            if watched.get(&key.task_id).is_none_or(|w| w.key != key) {
                tracing::warn!(run = %key, "stopping a stale run left by an earlier process");
                self.cancel(key).await;
            }
        }
        tracing::info!(adopted = adopted.len(), "adopted runs of an earlier process");
    }

    async fn launch(
        &self,
        task: ClaimedTask,
        sink: &EventSink,
        watched: &mut HashMap<Uuid, Watched>,
        writers: &TaskTracker,
        done: &mpsc::UnboundedSender<Uuid>,
    ) {
        let key = RunKey { task_id: task.task_id, attempt: task.attempt };
        let backend = self.backend.name_for(&task.isolation);
        let w = Watched {
            key,
            tenant: task.tenant.clone(),
            language: task.language,
            timeout_seconds: task.timeout_seconds.unwrap_or(0).max(0) as u32,
            backend,
            finishing: false,
        };
        watched.insert(key.task_id, w.clone());
        let quota = self
            .tenants
            .borrow()
            .iter()
            .find(|(name, _)| name.as_str() == task.tenant)
            .map_or(TenantPolicy::default().max_artifact_bytes, |(_, p)| p.max_artifact_bytes);
        let job = match job_of(&task, quota) {
            Ok(job) => job,
            Err(message) => {
                tracing::error!(run = %key, %message, "stored task cannot run");
                let outcome = Outcome::backend_error(message, Utc::now());
                self.write_finish(w, outcome, writers, done);
                return;
            }
        };
        match self.backend.clone().launch(job, sink.clone()).await {
            Ok(()) => tracing::debug!(backend, "run launched"),
            Err(e) => {
                // Not renewed from now on: the claim expires and the task is retried (or failed
                // once its attempts are used), so a backend outage does not lose it.
                tracing::warn!(run = %key, error = %e, "launch failed; the task is retried when its claim expires");
                watched.remove(&key.task_id);
            }
        }
    }

    async fn on_event(
        &self,
        event: Event,
        watched: &mut HashMap<Uuid, Watched>,
        writers: &TaskTracker,
        done: &mpsc::UnboundedSender<Uuid>,
    ) {
        let Some(w) = watched.get_mut(&event.key.task_id) else {
            tracing::debug!(run = %event.key, "event for a run this process does not watch; ignored");
            return;
        };
        if w.key != event.key || w.finishing {
            tracing::warn!(run = %event.key, current = %w.key, "late event of an earlier run; ignored");
            return;
        }
        let key = w.key;
        let span = w.span();
        let written = match event.event {
            RunEvent::Scheduled { .. } => self.store.mark_scheduled(key, w.backend).instrument(span.clone()).await,
            RunEvent::Running { at } => {
                span.in_scope(|| tracing::debug!("run running"));
                self.store.mark_running(key, w.backend, at).instrument(span.clone()).await
            }
            RunEvent::Finished(outcome) => {
                w.finishing = true;
                self.write_finish(w.clone(), *outcome, writers, done);
                return;
            }
        };
        match written {
            Ok(true) => {}
            Ok(false) => tracing::debug!(run = %key, "phase not changed: the task moved on"),
            // A decision, not a fallback: the program is already running in its sandbox, so a
            // failed `Scheduled`/`Running` write does not stop it. Those phases are
            // informative; the final write (retried until stored) carries `started_at` and
            // moves the task from whichever active phase it is in. The failure is logged and
            // counted. Tested by `a_failed_running_mark_is_counted_and_the_run_still_finishes`.
            Err(e) => {
                self.metrics.errors.with_label_values(&["executor", e.metric_label()]).inc();
                span.in_scope(
                    || tracing::warn!(run = %key, error = %e, "cannot record a run's progress; the run continues"),
                );
            }
        }
    }

    /// Writes a run's outcome, retrying through a database outage, on its own task so the loop
    /// keeps renewing leases meanwhile. Tells the loop when the run is over.
    fn write_finish(&self, w: Watched, outcome: Outcome, writers: &TaskTracker, done: &mpsc::UnboundedSender<Uuid>) {
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        let done = done.clone();
        let span = w.span();
        writers.spawn(
            async move {
                finish_with_retries(store.as_ref(), &metrics, &w, outcome).await;
                let _ = done.send(w.key.task_id);
            }
            .instrument(span),
        );
    }

    async fn cancel(&self, key: RunKey) {
        if let Err(e) = self.backend.cancel(key).await {
            tracing::warn!(run = %key, error = %e, "cancelling a run failed; it is retried at the next heartbeat");
        }
    }

    async fn heartbeat(&self, owner: Uuid, watched: &HashMap<Uuid, Watched>) {
        if watched.is_empty() {
            return;
        }
        let ids: Vec<Uuid> = watched.keys().copied().collect();
        if let Err(e) = self.store.renew_leases(owner, &ids, self.lease).await {
            tracing::warn!(error = %e, "cannot renew executor leases");
        }
        // A safety net under the cancel notifications.
        match self.store.cancel_requested(owner).await {
            Ok(runs) => {
                for (task_id, attempt) in runs {
                    if watched.get(&task_id).is_some_and(|w| w.key.attempt == attempt && !w.finishing) {
                        self.cancel(RunKey { task_id, attempt }).await;
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot look for cancel requests"),
        }
    }

    async fn stop(
        &self,
        owner: Uuid,
        caps: Capabilities,
        events: &mut mpsc::UnboundedReceiver<Event>,
        watched: &mut HashMap<Uuid, Watched>,
        writers: &TaskTracker,
        done: &mpsc::UnboundedSender<Uuid>,
    ) {
        self.backend.shutdown().await;
        // Outcomes reported before the runs were stopped are still written.
        while let Ok(event) = events.try_recv() {
            self.on_event(event, watched, writers, done).await;
        }
        writers.close();
        if tokio::time::timeout(Duration::from_secs(10), writers.wait()).await.is_err() {
            tracing::warn!("outcomes still unwritten at shutdown; their leases will expire and the tasks are retried");
        }
        if caps.runs_survive_restart {
            let ids: Vec<Uuid> = watched.keys().copied().collect();
            match self.store.renew_leases(owner, &ids, HANDOVER_LEASE).await {
                Ok(n) if n > 0 => tracing::info!(runs = n, "runs keep going; the next process adopts them"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "could not extend leases for handover"),
            }
            return;
        }
        match self.store.release(owner).await {
            Ok(n) if n > 0 => tracing::info!(released = n, "handed unfinished tasks back"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not hand tasks back; their leases will expire"),
        }
    }
}

async fn finish_with_retries(store: &dyn ExecutorStore, metrics: &Metrics, w: &Watched, mut outcome: Outcome) {
    let mut backoff = Backoff::write();
    let mut stripped = false;
    loop {
        match store.finish(w.key, Some(w.backend), &outcome, w.timeout_seconds).await {
            Ok(true) => break,
            Ok(false) => {
                tracing::warn!(run = %w.key, "the task moved on (cancelled, or taken over); this run's outcome is dropped");
                return;
            }
            // Postgres refused a value (not an outage): record the failure without the payload
            // rather than retrying forever.
            Err(e) if e.is_bad_value() && !stripped => {
                stripped = true;
                tracing::warn!(run = %w.key, error = %e, "outcome could not be stored; recording a BackendError instead");
                outcome =
                    Outcome::backend_error(format!("the task's outcome could not be stored: {e}"), outcome.started_at);
            }
            Err(e) if e.is_bad_value() => {
                tracing::error!(run = %w.key, error = %e, "outcome cannot be stored even without its payload; the task is retried when its lease expires");
                return;
            }
            Err(e) => {
                metrics.errors.with_label_values(&["executor", e.metric_label()]).inc();
                tracing::warn!(run = %w.key, error = %e, retry_in = ?backoff.peek(), "cannot record outcome; retrying");
                backoff.sleep().await;
            }
        }
    }
    let (phase, reason) = outcome.phase_reason();
    let reason = reason.map_or("", |r| r.as_str());
    metrics.finished.with_label_values(&[w.tenant.as_str(), phase.as_str(), reason]).inc();
    if let Some(language) = w.language {
        metrics
            .task_duration
            .with_label_values(&[w.tenant.as_str(), language.as_str()])
            .observe(outcome.duration_seconds());
    }
    tracing::info!(task_id = %w.key.task_id, tenant = %w.tenant, %phase, reason, "task finished");
}

/// The job for a claimed task. A stored task that lacks what every admitted task has is refused
/// with a message, never run with guessed values.
fn job_of(task: &ClaimedTask, artifact_quota_bytes: u64) -> Result<Job, String> {
    let missing = |what: &str| format!("the stored task has no {what}; it cannot run");
    let language: Language = task.language.ok_or_else(|| missing("language"))?;
    let program = task.program.as_ref().ok_or_else(|| missing("program"))?;
    let timeout = task.timeout_seconds.filter(|t| *t > 0).ok_or_else(|| missing("timeout"))?;
    let cpu_millis = task.cpu_millis.filter(|c| *c > 0).ok_or_else(|| missing("CPU request"))?;
    let memory_bytes = task.memory_bytes.filter(|m| *m > 0).ok_or_else(|| missing("memory request"))?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut files = BTreeMap::new();
    for (name, encoded) in &program.files {
        let bytes = b64.decode(encoded).map_err(|e| format!("stored input file {name:?} is corrupt: {e}"))?;
        files.insert(name.clone(), bytes);
    }
    Ok(Job {
        key: RunKey { task_id: task.task_id, attempt: task.attempt },
        tenant: task.tenant.clone(),
        language,
        code: program.code.clone(),
        files,
        stdin: program.stdin.clone(),
        args: program.args.clone(),
        env: program.env.clone(),
        timeout: Duration::from_secs(timeout as u64),
        cpu_millis: cpu_millis as u64,
        memory_bytes: memory_bytes as u64,
        isolation: task.isolation.clone(),
        labels: task.labels.0.clone(),
        batch_id: task.batch_id.clone(),
        priority: task.priority,
        artifact_quota_bytes,
        kube_object: task.kube_object.clone(),
    })
}

#[cfg(test)]
mod tests;
