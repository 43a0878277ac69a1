//! The executor: claims admitted tasks, launches them on a [`Backend`], and turns what the
//! backend observes into guarded store updates.
//!
//! One event loop owns the runs this process watches. It claims while it has room (the
//! backend's [`Capabilities::max_runs`]), launches, and reacts to four things: backend events
//! (placed, started, finished), cancel requests, wake-ups (new admissions), and a heartbeat that
//! renews the runs' leases. Every store write names the run's attempt, so an event of an older
//! run is ignored here and refused by the store.
//!
//! The loop never waits for the database to record an event: it hands marks and outcomes to one
//! journal writer (`JournalWriter`), which folds them per run (`journal`) and writes whatever is
//! waiting, up to [`JOURNAL_BATCH`] runs, in one transaction. When little is waiting it writes at
//! once: a single task never waits for a batch to fill. A run is over for the loop when its
//! outcome is committed (or found stale), never before.
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
use tracing::Instrument;
use uuid::Uuid;

use crate::domain::task::Language;
use crate::domain::tenant::{TenantPolicy, Tenants};
use crate::exec::{Backend, BoxFuture, Capabilities, Event, EventSink, Job, Outcome, RunEvent, RunKey};
use crate::metrics::Metrics;
use crate::retry::Backoff;
use crate::store::{AdoptedRun, ClaimedTask, FinishWrite, JournalWritten, Mark, MarkWrite, Store, StoreError};

mod journal;

use journal::{Journal, Report, Slot, Write};

/// How long a claim stays valid without a heartbeat.
pub const LEASE: Duration = Duration::from_secs(30);
/// The lease left on runs that outlive this process, so the next one can adopt them before the
/// scheduler's housekeeping would hand them to someone else.
pub const HANDOVER_LEASE: Duration = Duration::from_secs(600);
/// The most runs one journal transaction writes. Large enough that the per-transaction cost
/// vanishes under load, small enough that one transaction stays short (a few milliseconds).
pub const JOURNAL_BATCH: usize = 512;

/// The store operations the executor needs; [`Store`] implements them, tests use a fake.
pub trait ExecutorStore: Send + Sync + 'static {
    fn claim(&self, owner: Uuid, limit: i64, lease: Duration) -> BoxFuture<'_, Result<Vec<ClaimedTask>, StoreError>>;
    /// Writes marks and outcomes of many runs in one transaction ([`crate::store::write_journal`]).
    fn write_journal<'a>(
        &'a self,
        marks: &'a [MarkWrite<'a>],
        finishes: &'a [FinishWrite<'a>],
    ) -> BoxFuture<'a, Result<JournalWritten, StoreError>>;
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
    fn write_journal<'a>(
        &'a self,
        marks: &'a [MarkWrite<'a>],
        finishes: &'a [FinishWrite<'a>],
    ) -> BoxFuture<'a, Result<JournalWritten, StoreError>> {
        Box::pin(Store::write_journal(self, marks, finishes))
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
        let (journal, reports) = mpsc::unbounded_channel();
        let writer = JournalWriter { store: self.store.clone(), metrics: self.metrics.clone(), done: done_tx };
        let mut writer = tokio::spawn(writer.run(reports));
        let mut writer_ended = false;
        let mut watched: HashMap<Uuid, Watched> = HashMap::new();
        if caps.runs_survive_restart {
            self.adopt(owner, &sink, &mut watched).await;
        }
        tracing::info!(backend = self.backend.name_for("standard"), %owner, max_runs = caps.max_runs, "executor started");
        let mut heartbeat = tokio::time::interval(self.lease / 3);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Whether tasks may be waiting to be claimed. Set by wake-ups (an admission, a
        // hand-back, a lost notification) and the heartbeat; a claim that fills all the room
        // leaves it set, so the room that ending runs make is claimed at once.
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
                            self.launch(task, &sink, &mut watched, &journal).instrument(span).await;
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
                // It only ends when the loop drops its sender, so this is a panic: without it no
                // run would ever end, so the executor stops and the supervisor restarts the
                // process (the runs' leases expire and their tasks are retried).
                ended = &mut writer => {
                    tracing::error!(error = ?ended.err(), "the executor's journal writer stopped; stopping the executor");
                    writer_ended = true;
                    break;
                }
                // Before events: a steady stream of them (hundreds of pods changing) must not
                // starve lease renewal, or the scheduler reaps runs that are alive.
                _ = heartbeat.tick() => {
                    self.heartbeat(owner, &watched).await;
                    claim_now = true;
                }
                Some(event) = events.recv() => on_event(event, &mut watched, &journal),
                Some(task_id) = done.recv() => {
                    watched.remove(&task_id);
                    // A batch ends many runs at once. No claim for the room they make unless
                    // `claim_now` says tasks may be waiting: under a trickle of admissions, a
                    // claim per batch would find nothing more than the wake-ups already claimed.
                    while let Ok(task_id) = done.try_recv() {
                        watched.remove(&task_id);
                    }
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
        self.stop(owner, caps, &mut events, &mut watched, journal, (!writer_ended).then_some(writer)).await;
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
        journal: &Journaled,
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
                let _ = journal.send((w, Report::Finish(Box::new(outcome))));
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
        journal: Journaled,
        writer: Option<tokio::task::JoinHandle<()>>,
    ) {
        self.backend.shutdown().await;
        // Outcomes reported before the runs were stopped are still written: the writer ends once
        // it has written everything sent before the channel closed.
        while let Ok(event) = events.try_recv() {
            on_event(event, watched, &journal);
        }
        drop(journal);
        if let Some(mut writer) = writer {
            if tokio::time::timeout(Duration::from_secs(10), &mut writer).await.is_err() {
                // Stopped, so that no write lands after the tasks are handed back below.
                writer.abort();
                tracing::warn!(
                    "outcomes still unwritten at shutdown; their leases will expire and the tasks are retried"
                );
            }
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

/// Where the loop sends what its runs report, for the journal writer.
type Journaled = mpsc::UnboundedSender<(Watched, Report)>;

/// Hands a backend event to the journal writer; never waits for the database. Events of runs
/// this process does not watch, of older attempts, and after a run's finish are dropped here.
fn on_event(event: Event, watched: &mut HashMap<Uuid, Watched>, journal: &Journaled) {
    let Some(w) = watched.get_mut(&event.key.task_id) else {
        tracing::debug!(run = %event.key, "event for a run this process does not watch; ignored");
        return;
    };
    if w.key != event.key || w.finishing {
        tracing::warn!(run = %event.key, current = %w.key, "late event of an earlier run; ignored");
        return;
    }
    let report = match event.event {
        RunEvent::Scheduled { .. } => Report::Mark(Mark::Scheduled),
        RunEvent::Running { at } => {
            w.span().in_scope(|| tracing::debug!("run running"));
            Report::Mark(Mark::Running { at })
        }
        RunEvent::Finished(outcome) => {
            w.finishing = true;
            Report::Finish(outcome)
        }
    };
    // The writer outlives the loop's sender (see `Executor::stop`), so this cannot fail.
    let _ = journal.send((w.clone(), report));
}

/// Records what the loop reports, in batches, on its own task: the loop keeps renewing leases
/// while a write waits out a database outage.
///
/// A decision, not a fallback: a `Scheduled`/`Running` mark never stops a run (the program is
/// already going). Those phases are informative; the finish carries `started_at` and moves the
/// task from whichever active phase it is in. A failed batch is retried with backoff until it
/// is stored, marks with it; each failure is logged and counted.
struct JournalWriter {
    store: Arc<dyn ExecutorStore>,
    metrics: Metrics,
    /// Tells the loop that a run is over (its outcome is committed, or was found stale).
    done: mpsc::UnboundedSender<Uuid>,
}

impl JournalWriter {
    /// Writes until the loop's sender is dropped and everything sent before is written.
    async fn run(self, mut reports: mpsc::UnboundedReceiver<(Watched, Report)>) {
        let mut journal = Journal::default();
        while let Some((run, report)) = reports.recv().await {
            journal.push(run, report);
            // Whatever else is already waiting joins this batch; nothing waits for more.
            while journal.len() < JOURNAL_BATCH {
                match reports.try_recv() {
                    Ok((run, report)) => journal.push(run, report),
                    Err(_) => break,
                }
            }
            let slots = journal.take();
            if let Err(slots) = self.write(slots).await {
                // One of them holds a value Postgres refuses: one by one, the others are stored
                // and the culprit is found.
                for slot in slots {
                    let _ = self.write(vec![slot]).await;
                }
            }
        }
    }

    /// Writes `slots` in one transaction, retrying outages until it is stored. Gives the slots
    /// back when Postgres refuses a value among several; a single run's refused outcome is
    /// replaced by a `BackendError` once, and dropped if even that is refused.
    async fn write(&self, mut slots: Vec<Slot>) -> Result<(), Vec<Slot>> {
        let mut backoff = Backoff::write();
        loop {
            let written = {
                let (marks, finishes) = writes_of(&slots);
                self.store.write_journal(&marks, &finishes).await
            };
            let e = match written {
                Ok(written) => {
                    self.report(slots, &written);
                    return Ok(());
                }
                Err(e) => e,
            };
            if e.is_bad_value() && slots.len() > 1 {
                tracing::warn!(runs = slots.len(), error = %e, "a batch of run writes holds a value Postgres refuses; writing its runs one by one");
                return Err(slots);
            }
            if e.is_bad_value() {
                let slot = &mut slots[0];
                let span = slot.run.span();
                let _entered = span.enter();
                match &mut slot.write {
                    Write::Finish { outcome, stripped: stripped @ false, .. } => {
                        // Postgres refused a value (not an outage): record the failure without
                        // the payload rather than retrying forever.
                        tracing::warn!(run = %slot.run.key, error = %e, "outcome could not be stored; recording a BackendError instead");
                        **outcome = Outcome::backend_error(
                            format!("the task's outcome could not be stored: {e}"),
                            outcome.started_at,
                        );
                        *stripped = true;
                        continue;
                    }
                    Write::Finish { .. } => {
                        tracing::error!(run = %slot.run.key, error = %e, "outcome cannot be stored even without its payload; the task is retried when its lease expires");
                        let _ = self.done.send(slot.run.key.task_id);
                    }
                    Write::Mark(_) => {
                        tracing::warn!(run = %slot.run.key, error = %e, "cannot record a run's progress; the run continues");
                    }
                }
                return Ok(());
            }
            self.metrics.errors.with_label_values(&["executor", e.metric_label()]).inc();
            let finishes = slots.iter().filter(|s| matches!(s.write, Write::Finish { .. })).count();
            tracing::warn!(
                runs = slots.len(),
                outcomes = finishes,
                error = %e,
                retry_in = ?backoff.peek(),
                "cannot record runs' progress and outcomes; retrying"
            );
            backoff.sleep().await;
        }
    }

    /// After a commit: logs and counts what was written, and tells the loop which runs are over.
    fn report(&self, slots: Vec<Slot>, written: &JournalWritten) {
        let (mut marked, mut finished) = (written.marked.iter(), written.finished.iter());
        for slot in slots {
            let w = &slot.run;
            let _entered = w.span().entered();
            match slot.write {
                Write::Mark(_) => {
                    if marked.next() != Some(&true) {
                        tracing::debug!(run = %w.key, "phase not changed: the task moved on");
                    }
                }
                Write::Finish { outcome, .. } => {
                    if finished.next() == Some(&true) {
                        let (phase, reason) = outcome.phase_reason();
                        let reason = reason.map_or("", |r| r.as_str());
                        self.metrics.finished.with_label_values(&[w.tenant.as_str(), phase.as_str(), reason]).inc();
                        if let Some(language) = w.language {
                            self.metrics
                                .task_duration
                                .with_label_values(&[w.tenant.as_str(), language.as_str()])
                                .observe(outcome.duration_seconds());
                        }
                        tracing::info!(task_id = %w.key.task_id, tenant = %w.tenant, %phase, reason, "task finished");
                    } else {
                        tracing::warn!(run = %w.key, "the task moved on (cancelled, or taken over); this run's outcome is dropped");
                    }
                    let _ = self.done.send(w.key.task_id);
                }
            }
        }
    }
}

/// The store's view of a batch: its marks and its finishes, each in the slots' order.
fn writes_of(slots: &[Slot]) -> (Vec<MarkWrite<'_>>, Vec<FinishWrite<'_>>) {
    let mut marks = Vec::new();
    let mut finishes = Vec::new();
    for slot in slots {
        let key = slot.run.key;
        match &slot.write {
            Write::Mark(mark) => marks.push(MarkWrite {
                task_id: key.task_id,
                attempt: key.attempt,
                backend: slot.run.backend,
                mark: *mark,
            }),
            Write::Finish { outcome, running_at, .. } => finishes.push(FinishWrite {
                task_id: key.task_id,
                attempt: key.attempt,
                backend: Some(slot.run.backend),
                outcome,
                timeout_seconds: slot.run.timeout_seconds,
                running_at: *running_at,
            }),
        }
    }
    (marks, finishes)
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
