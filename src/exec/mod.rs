//! Execution backends: the seam between "this task was admitted" and "this is what happened".
//!
//! The executor (`crate::executor`) claims admitted tasks, turns each into a [`Job`] and
//! *launches* it on a [`Backend`]. From then on the backend *reports* what it observes as
//! [`Event`]s: the run was placed ([`RunEvent::Scheduled`]), the program started
//! ([`RunEvent::Running`]), the run finished with an [`Outcome`]. The executor turns those into
//! guarded store updates; a backend never touches Postgres or AMQP, so it can be tested alone.
//!
//! Runs are keyed by [`RunKey`] (task id and attempt): launching a key twice is a no-op, and an
//! event of an older attempt cannot move a task that a newer attempt owns.
//!
//! Two kinds of backends fit this seam, and [`Capabilities::runs_survive_restart`] tells them
//! apart:
//! - runs that live in this process ([`local`], [`null`]): they die with it, and the executor
//!   hands their tasks back on shutdown;
//! - runs that live elsewhere (Kubernetes pods): they outlive a restart, [`Backend::adopt`] lists
//!   them to the next process, which goes on observing them.

pub mod artifacts;
pub mod local;
pub mod null;
mod runs;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use uuid::Uuid;

pub use crate::domain::outcome::{Captured, Outcome, ProgramResult, Termination};
pub use crate::domain::result::Artifact;
use crate::domain::task::Language;
use crate::domain::validate::BackendIsolation;
pub use runs::{Ended, InProcessRuns, Progress};

/// One execution of one task: the task and the attempt that the store handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunKey {
    pub task_id: Uuid,
    pub attempt: i32,
}

impl std::fmt::Display for RunKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}#{}", self.task_id, self.attempt)
    }
}

/// Everything a backend needs to run one task. Already validated and capped by the tenant's policy.
#[derive(Debug, Clone)]
pub struct Job {
    pub key: RunKey,
    pub tenant: String,
    pub language: Language,
    pub code: String,
    /// Read-only input files, by plain file name (validated: no `/`, no `..`, no NUL).
    pub files: BTreeMap<String, Vec<u8>>,
    pub stdin: Option<String>,
    pub args: Vec<String>,
    /// The task's own environment; never contains `AGENTTASK_*` names (validated at ingest).
    pub env: BTreeMap<String, String>,
    pub timeout: Duration,
    /// Resolved CPU request and limit, in millicores.
    pub cpu_millis: u64,
    /// Resolved memory request and limit, in bytes.
    pub memory_bytes: u64,
    /// `standard`, or the runtime class the task asked for (already allowed for its tenant).
    pub isolation: String,
    pub labels: BTreeMap<String, String>,
    pub batch_id: Option<String>,
    pub priority: i16,
    /// The tenant's artifact storage quota (`max_artifact_bytes`), over everything retained.
    pub artifact_quota_bytes: u64,
    /// `namespace/name` of the AgentTask a user applied directly (the Kubernetes backend runs
    /// it in that object instead of making one); `None` for tasks from RabbitMQ.
    pub kube_object: Option<String>,
}

impl Job {
    pub fn task_id(&self) -> Uuid {
        self.key.task_id
    }
}

/// What a backend observed about one run.
#[derive(Debug, Clone, PartialEq)]
pub enum RunEvent {
    /// The run was placed: a sandbox prepared, a pod bound to a node.
    Scheduled { at: DateTime<Utc> },
    /// The program started.
    Running { at: DateTime<Utc> },
    /// The run ended; nothing more will be reported for this key. (Boxed: an outcome carries
    /// output and notes, far larger than the other events.)
    Finished(Box<Outcome>),
}

/// An observation with the run it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub key: RunKey,
    pub event: RunEvent,
}

/// Where a backend reports events. Unbounded on purpose: a run reports at most three events,
/// the executor holds at most [`Capabilities::max_runs`] runs, and a backend must never block
/// on reporting (it may be inside a kill or a cleanup).
#[derive(Debug, Clone)]
pub struct EventSink(mpsc::UnboundedSender<Event>);

impl EventSink {
    pub fn channel() -> (EventSink, mpsc::UnboundedReceiver<Event>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (EventSink(tx), rx)
    }

    /// Reports `event` for `key`. After the executor stopped listening, events are dropped: the
    /// store decides from leases what happens to such runs.
    pub fn send(&self, key: RunKey, event: RunEvent) {
        let _ = self.0.send(Event { key, event });
    }
}

/// What a backend can do; the executor and ingest adapt to it.
#[derive(Debug, Clone, Copy)]
pub struct Capabilities {
    /// Which `isolation` values it can run (ingest refuses the others with `IsolationNotAllowed`).
    pub isolation: BackendIsolation,
    /// Whether a run goes on when the service process stops (and must then be adopted).
    pub runs_survive_restart: bool,
    /// How many runs one executor process watches at once: the host's sandbox slots for the
    /// local backend; for remote runs only a bound on bookkeeping.
    pub max_runs: usize,
}

/// Why a backend call failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Worth retrying later (an API server or a host resource is briefly unavailable).
    #[error("backend temporarily unavailable: {0}")]
    Unavailable(String),
    /// The request can never succeed as given.
    #[error("backend refused the run: {0}")]
    Refused(String),
}

/// A boxed future, so backends can sit behind `dyn Backend`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Runs jobs somewhere and reports what happens to them.
///
/// Contract for implementations:
/// - [`Backend::launch`] is idempotent per [`RunKey`] and returns once the run is started (or
///   refused); progress and the outcome come later through the [`EventSink`]. Every launched
///   run ends in exactly one [`RunEvent::Finished`], unless the process stops first.
/// - Bad code never makes a backend panic or error: every failure of the *task* is an
///   [`Outcome`]; [`BackendError`] is for failures of the backend itself.
pub trait Backend: Send + Sync + 'static {
    /// Name recorded as the task's `backend` for a job with this isolation (`local`, `null`,
    /// `podjob`, `runtimeclass`, `sandbox`).
    fn name_for(&self, isolation: &str) -> &'static str;
    fn capabilities(&self) -> Capabilities;
    /// Starts `job` unless a run with its key exists.
    fn launch(self: Arc<Self>, job: Job, events: EventSink) -> BoxFuture<'static, Result<(), BackendError>>;
    /// Stops a run; it then reports `Finished` with [`Termination::Cancelled`]. Unknown or
    /// finished keys are a no-op.
    fn cancel(&self, key: RunKey) -> BoxFuture<'_, Result<(), BackendError>>;
    /// The runs this backend owns that an earlier process launched; from now on their events go
    /// to `events`. Backends whose runs die with the process own none.
    fn adopt(self: Arc<Self>, events: EventSink) -> BoxFuture<'static, Result<Vec<RunKey>, BackendError>>;
    /// The process is stopping: runs that die with it are stopped now (without reporting);
    /// runs that survive are left alone.
    fn shutdown(&self) -> BoxFuture<'_, ()>;
    /// What a running task has written to stdout so far (capped as its result is), for
    /// following its output; `None` when this process sees no live output of it (it is not
    /// running here, or it ended: then its stored output is the answer).
    fn live_output(&self, _task_id: Uuid) -> BoxFuture<'_, Option<Vec<u8>>> {
        Box::pin(async { None })
    }
}
