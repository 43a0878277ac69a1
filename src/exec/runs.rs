//! Runs that live as futures in this process (the local sandbox, test fakes): launching spawns
//! the future on a tracker, cancelling drops it (which kills what it started), shutdown drops
//! them all and waits until their cleanup is done.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{EventSink, Outcome, RunEvent, RunKey};

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
    /// reported as `Finished`; if it is cancelled, `Finished` with `Cancelled` is reported once
    /// the future (and so everything it started) is dropped.
    pub fn launch<F, Fut>(&self, key: RunKey, events: EventSink, run: F)
    where
        F: FnOnce(Progress) -> Fut,
        Fut: Future<Output = Outcome> + Send + 'static,
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
            let outcome = tokio::select! {
                outcome = fut => Some(outcome),
                _ = token.cancelled() => None,
            };
            // The future is dropped here: its sandbox is gone before anything is reported.
            let outcome = match outcome {
                Some(o) => Some(o),
                None if *why.lock().expect("not poisoned") == Some(Stop::Cancel) => Some(Outcome::cancelled(started)),
                None => None,
            };
            runs.lock().expect("not poisoned").remove(&key);
            if let Some(outcome) = outcome {
                events.send(key, RunEvent::Finished(Box::new(outcome)));
            }
        });
    }

    /// Stops `key`'s run, which then reports `Cancelled`. A no-op for unknown keys.
    pub fn cancel(&self, key: RunKey) {
        self.stop(Some(key), Stop::Cancel);
    }

    /// Stops every run without reporting, and waits until they are gone.
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
