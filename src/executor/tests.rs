//! The executor against an in-memory store and backend: every transition, cancel in every
//! phase, adoption after a restart, and a stale attempt's late event. The fake store applies the
//! same guards as the SQL in `store::runs` (phase and attempt), so a test that passes here
//! exercises the executor's decisions, not the fake's leniency.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use sqlx::types::Json;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::*;
use crate::domain::phase::Phase;
use crate::domain::task::Program;
use crate::domain::validate::BackendIsolation;
use crate::exec::{BackendError, Termination};

#[derive(Debug, Clone)]
struct FakeTask {
    phase: Phase,
    attempt: i32,
    owner: Option<Uuid>,
    cancel_requested: bool,
    backend: Option<String>,
    reason: Option<crate::domain::phase::Reason>,
    finishes: u32,
}

#[derive(Default)]
struct FakeStore {
    tasks: Mutex<HashMap<Uuid, FakeTask>>,
    /// Journal writes fail as if the database were down.
    down: std::sync::atomic::AtomicBool,
    /// A journal write panics (a bug in the writer's path).
    panics: std::sync::atomic::AtomicBool,
    /// Every journal write tried: when (on tokio's clock), how many marks and finishes, and
    /// whether it was stored.
    journal_writes: Mutex<Vec<JournalCall>>,
    /// Notified after every journal write tried.
    journal_written: Notify,
}

#[derive(Debug, Clone)]
struct JournalCall {
    at: tokio::time::Instant,
    marks: usize,
    finishes: usize,
    stored: bool,
}

fn database_down<T: Send + 'static>() -> BoxFuture<'static, Result<T, StoreError>> {
    Box::pin(async { Err(StoreError::Sql(sqlx::Error::PoolTimedOut)) })
}

/// What Postgres answers to text it cannot store (a NUL byte): SQLSTATE 22021, a data exception.
#[derive(Debug)]
struct RefusedValue;

impl std::fmt::Display for RefusedValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("invalid byte sequence for encoding \"UTF8\": 0x00")
    }
}

impl std::error::Error for RefusedValue {}

impl sqlx::error::DatabaseError for RefusedValue {
    fn message(&self) -> &str {
        "invalid byte sequence for encoding \"UTF8\": 0x00"
    }
    fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
        Some("22021".into())
    }
    fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self
    }
    fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
        self
    }
    fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self
    }
    fn kind(&self) -> sqlx::error::ErrorKind {
        sqlx::error::ErrorKind::Other
    }
}

const ACTIVE: [Phase; 3] = [Phase::Pending, Phase::Scheduled, Phase::Running];

impl FakeStore {
    fn admit(&self) -> Uuid {
        let id = Uuid::new_v4();
        self.tasks.lock().unwrap().insert(
            id,
            FakeTask {
                phase: Phase::Pending,
                attempt: 0,
                owner: None,
                cancel_requested: false,
                backend: None,
                reason: None,
                finishes: 0,
            },
        );
        id
    }

    fn get(&self, id: Uuid) -> FakeTask {
        self.tasks.lock().unwrap()[&id].clone()
    }

    fn update<R>(&self, id: Uuid, f: impl FnOnce(&mut FakeTask) -> R) -> R {
        f(self.tasks.lock().unwrap().get_mut(&id).unwrap())
    }

    /// What `Store::request_cancel` does for a task that is with an executor.
    fn request_cancel(&self, id: Uuid) {
        self.update(id, |t| t.cancel_requested = true);
    }
}

fn ok<T: Send + 'static>(v: T) -> BoxFuture<'static, Result<T, StoreError>> {
    Box::pin(async move { Ok(v) })
}

impl ExecutorStore for FakeStore {
    fn claim(&self, owner: Uuid, limit: i64, _lease: Duration) -> BoxFuture<'_, Result<Vec<ClaimedTask>, StoreError>> {
        let mut out = Vec::new();
        for (id, t) in self.tasks.lock().unwrap().iter_mut() {
            if out.len() as i64 >= limit {
                break;
            }
            if t.phase == Phase::Pending && t.owner.is_none() && !t.cancel_requested {
                t.attempt += 1;
                t.owner = Some(owner);
                out.push(ClaimedTask {
                    task_id: *id,
                    tenant: "acme".into(),
                    attempt: t.attempt,
                    language: Some(Language::Python),
                    program: Some(Json(Program { code: "print(1)".into(), ..Default::default() })),
                    timeout_seconds: Some(5),
                    cpu_millis: Some(500),
                    memory_bytes: Some(64 << 20),
                    isolation: "standard".into(),
                    labels: Json(Default::default()),
                    batch_id: None,
                    priority: 0,
                    kube_object: None,
                });
            }
        }
        ok(out)
    }

    /// The guards of `store::write_journal`, all or nothing: a text with a NUL byte refuses the
    /// whole batch, as Postgres does.
    fn write_journal<'a>(
        &'a self,
        marks: &'a [MarkWrite<'a>],
        finishes: &'a [FinishWrite<'a>],
    ) -> BoxFuture<'a, Result<JournalWritten, StoreError>> {
        assert!(!self.panics.load(std::sync::atomic::Ordering::SeqCst), "a bug in the journal's path");
        let down = self.down.load(std::sync::atomic::Ordering::SeqCst);
        let refused = finishes.iter().any(|f| f.outcome.stdout.text.contains('\0'));
        self.journal_writes.lock().unwrap().push(JournalCall {
            at: tokio::time::Instant::now(),
            marks: marks.len(),
            finishes: finishes.len(),
            stored: !down && !refused,
        });
        self.journal_written.notify_waiters();
        if down {
            return database_down();
        }
        if refused {
            return Box::pin(async { Err(StoreError::Sql(sqlx::Error::Database(Box::new(RefusedValue)))) });
        }
        let mut tasks = self.tasks.lock().unwrap();
        let mut written = JournalWritten::default();
        for m in marks {
            let t = tasks.get_mut(&m.task_id).unwrap();
            let moved = t.attempt == m.attempt
                && match m.mark {
                    Mark::Scheduled => t.phase == Phase::Pending,
                    Mark::Running { .. } => matches!(t.phase, Phase::Pending | Phase::Scheduled),
                };
            if moved {
                t.phase = match m.mark {
                    Mark::Scheduled => Phase::Scheduled,
                    Mark::Running { .. } => Phase::Running,
                };
                t.backend = Some(m.backend.to_owned());
            }
            written.marked.push(moved);
        }
        for f in finishes {
            let t = tasks.get_mut(&f.task_id).unwrap();
            let moved = t.attempt == f.attempt && ACTIVE.contains(&t.phase);
            if moved {
                t.phase = f.outcome.phase_reason().0;
                t.reason = f.outcome.phase_reason().1;
                t.owner = None;
                t.finishes += 1;
            }
            written.finished.push(moved);
        }
        ok(written)
    }

    fn renew_leases<'a>(
        &'a self,
        _owner: Uuid,
        ids: &'a [Uuid],
        _lease: Duration,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        ok(ids.len() as u64)
    }

    fn cancel_requested(&self, owner: Uuid) -> BoxFuture<'_, Result<Vec<(Uuid, i32)>, StoreError>> {
        let runs = self
            .tasks
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, t)| t.owner == Some(owner) && t.cancel_requested && ACTIVE.contains(&t.phase))
            .map(|(id, t)| (*id, t.attempt))
            .collect();
        ok(runs)
    }

    fn adopt<'a>(
        &'a self,
        owner: Uuid,
        runs: &'a [(Uuid, i32)],
        _lease: Duration,
    ) -> BoxFuture<'a, Result<Vec<AdoptedRun>, StoreError>> {
        let mut out = Vec::new();
        for (id, attempt) in runs {
            if let Some(t) = self.tasks.lock().unwrap().get_mut(id) {
                if t.attempt == *attempt && ACTIVE.contains(&t.phase) {
                    t.owner = Some(owner);
                    out.push(AdoptedRun {
                        task_id: *id,
                        attempt: *attempt,
                        tenant: "acme".into(),
                        language: Some(Language::Python),
                        timeout_seconds: Some(5),
                        isolation: "standard".into(),
                    });
                }
            }
        }
        ok(out)
    }

    fn release(&self, owner: Uuid) -> BoxFuture<'_, Result<u64, StoreError>> {
        let mut n = 0;
        for t in self.tasks.lock().unwrap().values_mut() {
            if t.owner == Some(owner) && ACTIVE.contains(&t.phase) {
                t.phase = Phase::Pending;
                t.owner = None;
                n += 1;
            }
        }
        ok(n)
    }
}

/// A backend whose runs the test drives by hand.
#[derive(Default)]
struct FakeBackend {
    survives: bool,
    /// Runs "left by an earlier process", returned by `adopt`.
    leftover: Vec<RunKey>,
    sinks: Mutex<HashMap<RunKey, EventSink>>,
    launched: Mutex<Vec<RunKey>>,
    cancelled: Mutex<Vec<RunKey>>,
}

impl FakeBackend {
    fn emit(&self, key: RunKey, event: RunEvent) {
        let sink = self.sinks.lock().unwrap().get(&key).cloned().expect("run is known");
        sink.send(key, event);
    }

    fn launched(&self) -> Vec<RunKey> {
        self.launched.lock().unwrap().clone()
    }

    fn finish_ok(&self, key: RunKey) {
        let mut o = Outcome::bare(Termination::Exited, Utc::now(), Utc::now());
        o.exit_code = Some(0);
        self.emit(key, RunEvent::Finished(Box::new(o)));
    }
}

impl Backend for FakeBackend {
    fn name_for(&self, _isolation: &str) -> &'static str {
        "fake"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { isolation: BackendIsolation::Any, runs_survive_restart: self.survives, max_runs: 8 }
    }

    fn launch(self: Arc<Self>, job: Job, events: EventSink) -> BoxFuture<'static, Result<(), BackendError>> {
        Box::pin(async move {
            let mut sinks = self.sinks.lock().unwrap();
            if let std::collections::hash_map::Entry::Vacant(e) = sinks.entry(job.key) {
                e.insert(events);
                self.launched.lock().unwrap().push(job.key);
            }
            Ok(())
        })
    }

    fn cancel(&self, key: RunKey) -> BoxFuture<'_, Result<(), BackendError>> {
        self.cancelled.lock().unwrap().push(key);
        if let Some(sink) = self.sinks.lock().unwrap().remove(&key) {
            sink.send(key, RunEvent::Finished(Box::new(Outcome::cancelled(Utc::now()))));
        }
        Box::pin(async { Ok(()) })
    }

    fn adopt(self: Arc<Self>, events: EventSink) -> BoxFuture<'static, Result<Vec<RunKey>, BackendError>> {
        Box::pin(async move {
            for key in &self.leftover {
                self.sinks.lock().unwrap().insert(*key, events.clone());
            }
            Ok(self.leftover.clone())
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

struct Harness {
    store: Arc<FakeStore>,
    backend: Arc<FakeBackend>,
    wake: Arc<Notify>,
    cancels: mpsc::UnboundedSender<Uuid>,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
    metrics: Metrics,
}

fn start(store: Arc<FakeStore>, backend: Arc<FakeBackend>) -> Harness {
    let (cancels, rx) = mpsc::unbounded_channel();
    let wake = Arc::new(Notify::new());
    let shutdown = CancellationToken::new();
    let metrics = Metrics::new();
    let executor = Executor {
        store: store.clone(),
        backend: backend.clone(),
        metrics: metrics.clone(),
        wake: wake.clone(),
        cancels: rx,
        lease: Duration::from_millis(300),
        tenants: tokio::sync::watch::channel(Arc::new(Default::default())).1,
    };
    let handle = tokio::spawn(executor.run(shutdown.clone()));
    Harness { store, backend, wake, cancels, shutdown, handle, metrics }
}

impl Harness {
    async fn stop(self) {
        self.shutdown.cancel();
        self.handle.await.unwrap();
    }
}

/// Waits until `f` holds (a positive signal), failing after 5 s.
async fn until(what: &str, f: impl Fn() -> bool) {
    let end = tokio::time::Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(tokio::time::Instant::now() < end, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn launched_run(h: &Harness, task: Uuid) -> RunKey {
    until("the task is launched", || h.backend.launched().iter().any(|k| k.task_id == task)).await;
    *h.backend.launched().iter().find(|k| k.task_id == task).unwrap()
}

/// A task admitted, launched and reported running: its id and run.
async fn a_running_task(h: &Harness) -> (Uuid, RunKey) {
    let task = h.store.admit();
    h.wake.notify_one();
    let key = launched_run(h, task).await;
    h.backend.emit(key, RunEvent::Running { at: Utc::now() });
    until("Running", || h.store.get(task).phase == Phase::Running).await;
    (task, key)
}

#[tokio::test]
async fn phases_follow_the_backend_and_the_outcome_is_written_once() {
    let h = start(Arc::default(), Arc::default());
    let task = h.store.admit();
    h.wake.notify_one();
    let key = launched_run(&h, task).await;
    assert_eq!(key.attempt, 1);
    // Claimed but not placed: still Pending.
    assert_eq!(h.store.get(task).phase, Phase::Pending);
    h.backend.emit(key, RunEvent::Scheduled { at: Utc::now() });
    until("Scheduled", || h.store.get(task).phase == Phase::Scheduled).await;
    assert_eq!(h.store.get(task).backend.as_deref(), Some("fake"));
    h.backend.emit(key, RunEvent::Running { at: Utc::now() });
    until("Running", || h.store.get(task).phase == Phase::Running).await;
    h.backend.finish_ok(key);
    until("Succeeded", || h.store.get(task).phase == Phase::Succeeded).await;
    // A duplicate Finished changes nothing. Events are handled in order, so once a later run's
    // outcome is written, the duplicate before it has been handled.
    h.backend.finish_ok(key);
    let (later, later_key) = a_running_task(&h).await;
    h.backend.finish_ok(later_key);
    until("the later run is written", || h.store.get(later).phase == Phase::Succeeded).await;
    assert_eq!(h.store.get(task).finishes, 1);
    h.stop().await;
}

/// More admitted tasks than the backend has room for: the rest are claimed as runs end, with
/// no wake-up and no timer (the heartbeat also claims; on tokio's paused clock it never fires
/// while tasks are busy, and the clock must not move).
#[tokio::test(start_paused = true)]
async fn tasks_beyond_the_backends_room_are_claimed_as_runs_end() {
    let h = start(Arc::default(), Arc::default());
    let tasks: Vec<Uuid> = (0..10).map(|_| h.store.admit()).collect();
    h.wake.notify_one();
    until("the room is filled", || h.backend.launched().len() == 8).await;
    let ended_at = tokio::time::Instant::now();
    for key in h.backend.launched() {
        h.backend.finish_ok(key);
    }
    // Yielding (not sleeping) lets the executor work without letting the clock move.
    for _ in 0..10_000 {
        if h.backend.launched().len() == 10 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(h.backend.launched().len(), 10, "the last two were claimed when runs ended");
    assert_eq!(tokio::time::Instant::now(), ended_at, "without waiting for the heartbeat");
    for key in h.backend.launched().into_iter().skip(8) {
        h.backend.finish_ok(key);
    }
    for t in tasks {
        until("Succeeded", || h.store.get(t).phase == Phase::Succeeded).await;
        assert_eq!(h.store.get(t).finishes, 1);
    }
    h.stop().await;
}

/// Without its journal writer no run would ever end: if the writer panics, the executor stops
/// on its own, so that the supervisor restarts the process.
#[tokio::test]
async fn the_executor_stops_when_its_journal_writer_panics() {
    let h = start(Arc::default(), Arc::default());
    let task = h.store.admit();
    h.wake.notify_one();
    let key = launched_run(&h, task).await;
    h.store.panics.store(true, std::sync::atomic::Ordering::SeqCst);
    h.backend.finish_ok(key);
    let stopped = tokio::time::timeout(Duration::from_secs(5), h.handle).await;
    assert!(matches!(stopped, Ok(Ok(()))), "the executor returned by itself: {stopped:?}");
    assert!(!h.shutdown.is_cancelled());
}

/// A decision, not a fallback: a run whose `Running` mark cannot be written keeps running (the
/// program is already going), the failure is counted, and once the database is back the mark
/// and then the outcome are written, the outcome once.
#[tokio::test]
async fn a_failed_running_mark_is_counted_and_the_run_still_finishes() {
    let h = start(Arc::default(), Arc::default());
    let task = h.store.admit();
    h.wake.notify_one();
    let key = launched_run(&h, task).await;
    h.store.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let errors = || h.metrics.errors.with_label_values(&["executor", "database_unreachable"]).get();
    h.backend.emit(key, RunEvent::Running { at: Utc::now() });
    // The positive signal that the event was handled: its failure was counted.
    until("the failed mark is counted", || errors() >= 1).await;
    assert_eq!(h.store.get(task).phase, Phase::Pending, "the mark was not written");
    assert!(h.backend.cancelled.lock().unwrap().is_empty(), "and the run was not stopped");
    // The outcome arrives during the outage and waits behind the mark's retries.
    h.backend.finish_ok(key);
    h.store.down.store(false, std::sync::atomic::Ordering::SeqCst);
    until("Succeeded", || h.store.get(task).phase == Phase::Succeeded).await;
    assert_eq!(h.store.get(task).finishes, 1);
    let stored = h.store.journal_writes.lock().unwrap().iter().filter(|c| c.stored).count();
    assert!(stored >= 1, "written once the database was back");
    h.stop().await;
}

#[tokio::test]
async fn cancel_stops_a_run_in_every_phase_and_ignores_finished_ones() {
    let h = start(Arc::default(), Arc::default());
    // One task per phase a running task can be in when the cancel arrives.
    let claimed = h.store.admit();
    let scheduled = h.store.admit();
    let running = h.store.admit();
    let finished = h.store.admit();
    h.wake.notify_one();
    let keys: Vec<RunKey> =
        futures_util::future::join_all([claimed, scheduled, running, finished].map(|t| launched_run(&h, t))).await;
    h.backend.emit(keys[1], RunEvent::Scheduled { at: Utc::now() });
    h.backend.emit(keys[2], RunEvent::Running { at: Utc::now() });
    h.backend.finish_ok(keys[3]);
    until("phases reached", || {
        h.store.get(scheduled).phase == Phase::Scheduled
            && h.store.get(running).phase == Phase::Running
            && h.store.get(finished).phase == Phase::Succeeded
    })
    .await;
    // Cancel requests arrive as notifications (claimed, scheduled) or are found by the
    // heartbeat's poll (running: no notification sent).
    h.store.request_cancel(claimed);
    h.store.request_cancel(scheduled);
    h.store.request_cancel(running);
    h.cancels.send(claimed).unwrap();
    h.cancels.send(scheduled).unwrap();
    h.cancels.send(finished).unwrap();
    for t in [claimed, scheduled, running] {
        until("Cancelled", || h.store.get(t).phase == Phase::Cancelled).await;
        assert_eq!(h.store.get(t).finishes, 1);
    }
    assert_eq!(h.store.get(finished).phase, Phase::Succeeded);
    assert!(!h.backend.cancelled.lock().unwrap().iter().any(|k| k.task_id == finished));
    h.stop().await;
}

#[tokio::test]
async fn a_stale_attempts_late_event_is_ignored() {
    let h = start(Arc::default(), Arc::default());
    let (task, key) = a_running_task(&h).await;
    // An event of attempt 0 (an earlier run) arrives late, on the same channel.
    let stale = RunKey { task_id: task, attempt: key.attempt - 1 };
    let sink = h.backend.sinks.lock().unwrap()[&key].clone();
    let mut o = Outcome::bare(Termination::Exited, Utc::now(), Utc::now());
    o.exit_code = Some(3);
    sink.send(stale, RunEvent::Finished(Box::new(o)));
    // The current run finishes afterwards, through the same channel: once it is recorded, the
    // stale event before it has been handled too.
    h.backend.finish_ok(key);
    until("Succeeded", || h.store.get(task).phase == Phase::Succeeded).await;
    assert_eq!(h.store.get(task).finishes, 1);
    h.stop().await;
}

#[tokio::test]
async fn runs_that_survive_a_restart_are_adopted_and_stale_ones_stopped() {
    let store: Arc<FakeStore> = Arc::default();
    // An earlier process launched attempt 2 of `task` and attempt 1 of `old`, whose task has
    // since moved on to attempt 2 under someone else.
    let task = store.admit();
    let old = store.admit();
    let earlier = Uuid::new_v4();
    for t in [task, old] {
        store.update(t, |t| {
            t.phase = Phase::Running;
            t.attempt = 2;
            t.owner = Some(earlier);
        });
    }
    let current = RunKey { task_id: task, attempt: 2 };
    let stale = RunKey { task_id: old, attempt: 1 };
    let backend = Arc::new(FakeBackend { survives: true, leftover: vec![current, stale], ..Default::default() });
    let h = start(store, backend);
    until("the stale run is stopped", || h.backend.cancelled.lock().unwrap().contains(&stale)).await;
    until("the run is adopted", || h.store.get(task).owner.is_some_and(|o| o != earlier)).await;
    // Nothing was launched a second time.
    assert!(h.backend.launched().is_empty());
    h.backend.finish_ok(current);
    until("Succeeded", || h.store.get(task).phase == Phase::Succeeded).await;
    // The stale run's cancellation did not touch the task's current attempt.
    assert_eq!(h.store.get(old).phase, Phase::Running);
    h.stop().await;
}

#[tokio::test]
async fn shutdown_hands_back_runs_that_die_with_the_process_and_keeps_those_that_survive() {
    let h = start(Arc::default(), Arc::default());
    let (task, _) = a_running_task(&h).await;
    let store = h.store.clone();
    h.stop().await;
    assert_eq!(store.get(task).phase, Phase::Pending, "handed back for another attempt");
    assert_eq!(store.get(task).owner, None);

    let backend = Arc::new(FakeBackend { survives: true, ..Default::default() });
    let h = start(Arc::default(), backend);
    let (task, _) = a_running_task(&h).await;
    let store = h.store.clone();
    h.stop().await;
    assert_eq!(store.get(task).phase, Phase::Running, "left running for the next process");
}

fn watched(task_id: Uuid, attempt: i32) -> Watched {
    Watched {
        key: RunKey { task_id, attempt },
        tenant: "acme".into(),
        language: Some(Language::Python),
        timeout_seconds: 5,
        backend: "fake",
        finishing: true,
    }
}

fn exited(code: i32, stdout: &str) -> Box<Outcome> {
    let mut o = Outcome::bare(Termination::Exited, Utc::now(), Utc::now());
    o.exit_code = Some(code);
    o.stdout.text = stdout.into();
    Box::new(o)
}

/// One batch holds a stale attempt's outcome, an outcome Postgres refuses, two normal outcomes
/// and a mark. The batch is refused as a whole; written run by run, each normal outcome and the
/// mark are stored, the refused outcome becomes a `BackendError`, the stale one changes nothing,
/// and the loop hears of every finished run exactly once.
#[tokio::test]
async fn a_batch_with_a_stale_attempt_and_a_refused_value_stores_every_other_run() {
    let store: Arc<FakeStore> = Arc::default();
    let [stale, refused, first, second, placed] = [(); 5].map(|_| store.admit());
    for t in [stale, refused, first, second] {
        store.update(t, |t| (t.phase, t.attempt) = (Phase::Running, 1));
    }
    // Someone else runs attempt 2 of `stale` now.
    store.update(stale, |t| t.attempt = 2);
    store.update(placed, |t| t.attempt = 1);
    let (done_tx, mut done) = mpsc::unbounded_channel();
    let metrics = Metrics::new();
    let writer = JournalWriter { store: store.clone(), metrics: metrics.clone(), done: done_tx };
    let (journal, reports) = mpsc::unbounded_channel();
    let finishes =
        [(stale, exited(3, "")), (refused, exited(0, "a\0b")), (first, exited(0, "")), (second, exited(1, ""))];
    for (task, outcome) in finishes {
        journal.send((watched(task, 1), Report::Finish(outcome))).unwrap();
    }
    journal.send((watched(placed, 1), Report::Mark(Mark::Scheduled))).unwrap();
    // Everything is waiting before the writer starts, so its first batch holds all of it.
    drop(journal);
    writer.run(reports).await;

    let calls = store.journal_writes.lock().unwrap().clone();
    assert_eq!((calls[0].marks, calls[0].finishes, calls[0].stored), (1, 4, false), "{calls:?}");
    assert_eq!(store.get(stale).phase, Phase::Running, "the stale attempt's outcome changed nothing");
    assert_eq!(store.get(stale).finishes, 0);
    assert_eq!(
        (store.get(refused).phase, store.get(refused).reason),
        (Phase::Failed, Some(crate::domain::phase::Reason::BackendError))
    );
    assert_eq!(store.get(first).phase, Phase::Succeeded);
    assert_eq!(store.get(second).phase, Phase::Failed);
    assert_eq!(store.get(placed).phase, Phase::Scheduled);
    for t in [refused, first, second] {
        assert_eq!(store.get(t).finishes, 1);
    }
    let mut reported = Vec::new();
    while let Ok(task) = done.try_recv() {
        reported.push(task);
    }
    reported.sort();
    let mut expected = vec![stale, refused, first, second];
    expected.sort();
    assert_eq!(reported, expected, "every finished run is over for the loop, once");
    let finished = |phase: &str, reason: &str| metrics.finished.with_label_values(&["acme", phase, reason]).get();
    assert_eq!(
        (finished("Succeeded", ""), finished("Failed", "NonZeroExit"), finished("Failed", "BackendError")),
        (1, 1, 1)
    );
}

/// Latency: a lone outcome is written at once, not when a batch fills or a timer fires. Tokio's
/// clock is paused and only moves when every task waits on a timer, so an outcome written at the
/// instant it was reported was never held back.
#[tokio::test(start_paused = true)]
async fn a_single_outcome_is_written_without_waiting_for_a_batch() {
    let h = start(Arc::default(), Arc::default());
    let (task, key) = a_running_task(&h).await;
    let written = h.store.journal_written.notified();
    let reported_at = tokio::time::Instant::now();
    h.backend.finish_ok(key);
    written.await;
    let call = h.store.journal_writes.lock().unwrap().last().cloned().unwrap();
    assert_eq!((call.marks, call.finishes, call.stored), (0, 1, true));
    assert_eq!(call.at, reported_at, "no timer ran between the report and the write");
    assert_eq!(h.store.get(task).phase, Phase::Succeeded);
    h.stop().await;
}

#[test]
fn a_stored_task_without_its_program_is_refused_not_guessed() {
    let claimed = ClaimedTask {
        task_id: Uuid::new_v4(),
        tenant: "acme".into(),
        attempt: 1,
        language: None,
        program: None,
        timeout_seconds: None,
        cpu_millis: None,
        memory_bytes: None,
        isolation: "standard".into(),
        labels: Json(Default::default()),
        batch_id: None,
        priority: 0,
        kube_object: None,
    };
    let err = job_of(&claimed, 1 << 30).unwrap_err();
    assert!(err.contains("no language"), "{err}");
    let mut with_language = claimed;
    with_language.language = Some(Language::Python);
    with_language.program = Some(Json(Program::default()));
    let err = job_of(&with_language, 1 << 30).unwrap_err();
    assert!(err.contains("no timeout"), "{err}");
}
