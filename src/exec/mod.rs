//! Execution backends: the seam between "this task was admitted" and "this is what happened".
//!
//! The executor loop (in `crate::executor`) claims admitted tasks from the store, turns each into a
//! [`Job`], hands it to a [`Backend`] and records the [`Outcome`]. A backend only runs code; it
//! never touches Postgres or AMQP, so it can be tested on its own and swapped (local sandbox today,
//! Kubernetes later, a null backend for load tests).

pub mod local;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::domain::task::Language;

/// Everything a backend needs to run one task. Already validated and capped by the tenant's policy.
#[derive(Debug, Clone)]
pub struct Job {
    pub task_id: Uuid,
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
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    /// The tenant's artifact storage quota (`max_artifact_bytes`), over everything retained.
    pub artifact_quota_bytes: u64,
}

/// How a run ended, before it is mapped to a phase and reason (see `domain::result`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Termination {
    /// The program exited by itself (the exit code may still be non-zero) or was killed by a
    /// signal that was not ours (`exit_code` is then `128 + signal`).
    Exited,
    /// The wall-clock deadline passed and the whole process tree was killed.
    TimedOut,
    /// The memory limit was hit.
    OomKilled,
    /// stdout/stderr or a written file exceeded its cap.
    OutputLimitExceeded,
    /// The backend itself failed (could not start the sandbox, I/O error, ...).
    BackendError(String),
}

/// What the program wrote to `AGENTTASK_RESULT_FILE`.
#[derive(Debug, Clone, PartialEq)]
pub enum ProgramResult {
    /// No file was written.
    Missing,
    /// A valid JSON document.
    Json(serde_json::Value),
    /// A file was written but it is not valid JSON, or it is too large; the text says which.
    Invalid(String),
}

/// A captured output stream, capped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Captured {
    /// Lossy UTF-8, NUL bytes replaced, at most the configured cap.
    pub text: String,
    pub truncated: bool,
}

pub use crate::domain::result::Artifact;

/// The backend's report of one finished run.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub termination: Termination,
    pub exit_code: Option<i32>,
    pub stdout: Captured,
    pub stderr: Captured,
    pub result: ProgramResult,
    pub artifacts: Vec<Artifact>,
    /// Why some or all artifacts were not stored (quota, free-space floor, sparse files); the
    /// task's outcome is unaffected, the result message says so.
    pub artifacts_note: Option<String>,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
}

/// A boxed future, so backends can sit behind `dyn Backend`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Runs jobs somewhere. Implementations must be cancel-safe in the sense that dropping the future
/// kills whatever it started (the service drops runs on shutdown).
pub trait Backend: Send + Sync + 'static {
    /// Name recorded as the task's `backend` (`local`, `podjob`, ...).
    fn name(&self) -> &'static str;
    /// Runs one job to completion. Never panics on bad code: every failure is an [`Outcome`].
    fn run(&self, job: Job) -> BoxFuture<'_, Outcome>;
}

impl Outcome {
    /// An outcome for a run that could not start.
    pub fn backend_error(message: String, at: DateTime<Utc>) -> Self {
        Outcome {
            termination: Termination::BackendError(message),
            exit_code: None,
            stdout: Captured::default(),
            stderr: Captured::default(),
            result: ProgramResult::Missing,
            artifacts: Vec::new(),
            artifacts_note: None,
            started_at: at,
            finished_at: Utc::now(),
        }
    }
}
