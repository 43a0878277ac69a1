//! Runs that live as futures in this process (the local sandbox, test fakes): launching spawns
//! the future on a tracker, cancelling drops it (which kills what it started), shutdown drops
//! them all and waits until their cleanup is done.
//!
//! A run may end in two steps: its outcome, reported at once, then a teardown (removing what it
//! used on the host) that runs after the report, off the task's critical path. The teardown is
//! still tracked: [`InProcessRuns::shutdown`] waits for it, and whatever the teardown releases
//! (the local backend's sandbox uid) is released only when it is done.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{BoxFuture, EventSink, Outcome, RunEvent, RunKey};

/// Reports a run's progress to the executor.
#[derive(Debug, Clone)]
pub struct Progress {
    key: RunKey,
    events: EventSink,
}

impl Progress {
    pub fn new(key: RunKey, events: EventSink) -> Self {
        Progress { key, events }
    }

    /// The run was placed (its sandbox is ready).
    pub fn scheduled(&self) {
        self.events.send(self.key, RunEvent::Scheduled { at: Utc::now() });
    }

    /// The program started.
    pub fn running(&self) {
        self.events.send(self.key, RunEvent::Running { at: Utc::now() });
    }
}

/// How a run's future ended: the outcome to report, and what is left to clean up after the
/// report. Nothing the teardown removes may be needed to decide the outcome.
pub struct Ended {
    pub outcome: Outcome,
    pub teardown: Option<BoxFuture<'static, ()>>,
}

impl From<Outcome> for Ended {
    /// An outcome with nothing left to clean up.
    fn from(outcome: Outcome) -> Self {
        Ended { outcome, teardown: None }
    }
}

/// Why a run's future was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Cancel,
    Shutdown,
}

/// The in-process runs of one backend.
type Handles = Arc<Mutex<HashMap<RunKey, (CancellationToken, Arc<Mutex<Option<Stop>>>)>>>;

#[derive(Debug, Default)]
pub struct InProcessRuns {
    tracker: TaskTracker,
    runs: Handles,
}

impl InProcessRuns {
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns `run(progress)` for `key`, unless that key is already running. Its outcome is
    /// reported as `Finished`, then its teardown runs; if it is cancelled, `Finished` with
    /// `Cancelled` is reported once the future (and so everything it started) is dropped.
    pub fn launch<F, Fut>(&self, key: RunKey, events: EventSink, run: F)
    where
        F: FnOnce(Progress) -> Fut,
        Fut: Future<Output = Ended> + Send + 'static,
    {
        let token = CancellationToken::new();
        let why = Arc::new(Mutex::new(None));
        {
            let mut runs = self.runs.lock().expect("not poisoned");
            if runs.contains_key(&key) {
                return;
            }
            runs.insert(key, (token.clone(), why.clone()));
        }
        let started = Utc::now();
        let fut = run(Progress::new(key, events.clone()));
        let runs = self.runs.clone();
        self.tracker.spawn(async move {
            let ended = tokio::select! {
                ended = fut => Some(ended),
                _ = token.cancelled() => None,
            };
            // A cancelled future is dropped here: its sandbox is gone before anything is reported.
            let (outcome, teardown) = match ended {
                Some(Ended { outcome, teardown }) => (Some(outcome), teardown),
                None if *why.lock().expect("not poisoned") == Some(Stop::Cancel) => {
                    (Some(Outcome::cancelled(started)), None)
                }
                None => (None, None),
            };
            // From here a cancel or a shutdown no longer reaches this run: its program is over,
            // and the teardown must finish whatever happens.
            runs.lock().expect("not poisoned").remove(&key);
            if let Some(outcome) = outcome {
                events.send(key, RunEvent::Finished(Box::new(outcome)));
            }
            if let Some(teardown) = teardown {
                teardown.await;
            }
        });
    }

    /// Stops `key`'s run, which then reports `Cancelled`. A no-op for unknown keys.
    pub fn cancel(&self, key: RunKey) {
        self.stop(Some(key), Stop::Cancel);
    }

    /// Stops every run without reporting, and waits until they and every teardown are done.
    pub async fn shutdown(&self) {
        self.stop(None, Stop::Shutdown);
        self.tracker.close();
        self.tracker.wait().await;
    }

    fn stop(&self, key: Option<RunKey>, stop: Stop) {
        let runs = self.runs.lock().expect("not poisoned");
        for (k, (token, why)) in runs.iter() {
            if key.is_none_or(|key| key == *k) {
                why.lock().expect("not poisoned").get_or_insert(stop);
                token.cancel();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::exec::Termination;

    fn key() -> RunKey {
        RunKey { task_id: uuid::Uuid::new_v4(), attempt: 1 }
    }

    fn outcome() -> Outcome {
        Outcome::bare(Termination::Exited, Utc::now(), Utc::now())
    }

    #[tokio::test]
    async fn the_outcome_is_reported_before_the_teardown_and_shutdown_waits_for_it() {
        let runs = InProcessRuns::new();
        let (sink, mut events) = EventSink::channel();
        let (release, gate) = tokio::sync::oneshot::channel::<()>();
        let torn_down = Arc::new(AtomicBool::new(false));
        let done = torn_down.clone();
        let k = key();
        runs.launch(k, sink, move |_| async move {
            let teardown: BoxFuture<'static, ()> = Box::pin(async move {
                let _ = gate.await;
                tokio::task::yield_now().await;
                done.store(true, Ordering::SeqCst);
            });
            Ended { outcome: outcome(), teardown: Some(teardown) }
        });
        let event = events.recv().await.expect("an event");
        assert_eq!(event.key, k);
        assert!(matches!(event.event, RunEvent::Finished(_)));
        assert!(!torn_down.load(Ordering::SeqCst), "reported while the teardown still waits");
        // Cancelling a run that reported its outcome reports nothing more and stops no teardown.
        runs.cancel(k);
        release.send(()).expect("the teardown waits");
        runs.shutdown().await;
        assert!(torn_down.load(Ordering::SeqCst), "shutdown returned before the teardown ended");
        assert!(events.try_recv().is_err(), "one Finished per run");
    }

    #[tokio::test]
    async fn a_cancelled_run_reports_cancelled_once() {
        let runs = InProcessRuns::new();
        let (sink, mut events) = EventSink::channel();
        let k = key();
        runs.launch(k, sink, |_| async move {
            std::future::pending::<()>().await;
            Ended::from(outcome())
        });
        runs.cancel(k);
        match events.recv().await.map(|e| e.event) {
            Some(RunEvent::Finished(o)) => assert_eq!(o.termination, Termination::Cancelled),
            other => panic!("expected a cancelled finish, got {other:?}"),
        }
        runs.shutdown().await;
        assert!(events.try_recv().is_err());
    }
}
