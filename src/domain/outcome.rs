//! How a run ended: the one type every backend reports, and from which both the stored row and
//! the result message are derived (`phase_reason`, `message`, `stored_result`).
//!
//! Backends say *what happened* ([`Termination`], exit code, output); what that means for the task
//! (phase, reason, the sentence a person reads) is decided here, once, for every backend.

use chrono::{DateTime, Utc};

use super::phase::{Phase, Reason};
use super::result::{storable_json, Artifact};

/// How a run ended, as the backend saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Termination {
    /// The program exited by itself (the exit code may still be non-zero) or was killed by a
    /// signal that was not ours (`exit_code` is then `128 + signal`).
    Exited,
    /// The wall-clock deadline passed and the whole process tree (or pod) was killed.
    TimedOut,
    /// The memory limit was hit.
    OomKilled,
    /// stdout/stderr or a written file exceeded its cap.
    OutputLimitExceeded,
    /// Someone cancelled the task while it ran; it was killed.
    Cancelled,
    /// The task's image could not be pulled (Kubernetes), after a grace period.
    ImagePullFailed(String),
    /// The pod running the task disappeared without reporting an ending (Kubernetes).
    PodMissing(String),
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

/// A backend's report of one finished run.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub termination: Termination,
    pub exit_code: Option<i32>,
    pub stdout: Captured,
    pub stderr: Captured,
    pub result: ProgramResult,
    pub artifacts: Vec<Artifact>,
    /// Why some or all artifacts were not kept (a quota, disk space), for the result message.
    pub artifacts_note: Option<String>,
    /// How the backend launched the run when that is worth telling (e.g. a warm pool that had
    /// no ready replica, so the task ran cold), for the result message.
    pub launch_note: Option<String>,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// Whether the run took a pre-started (warm) sandbox: `Some(false)` when its language has a
    /// warm pool but the task started cold; `None` where there is no pool.
    pub warm: Option<bool>,
}

impl Outcome {
    /// A run that ended with `termination` and produced nothing.
    pub fn bare(termination: Termination, started_at: DateTime<Utc>, finished_at: DateTime<Utc>) -> Self {
        Outcome {
            termination,
            exit_code: None,
            stdout: Captured::default(),
            stderr: Captured::default(),
            result: ProgramResult::Missing,
            artifacts: Vec::new(),
            artifacts_note: None,
            launch_note: None,
            started_at,
            finished_at,
            warm: None,
        }
    }

    /// A run that could not start or whose backend failed.
    pub fn backend_error(message: String, started_at: DateTime<Utc>) -> Self {
        Self::bare(Termination::BackendError(message), started_at, Utc::now())
    }

    /// A run that was killed because the task was cancelled.
    pub fn cancelled(started_at: DateTime<Utc>) -> Self {
        Self::bare(Termination::Cancelled, started_at, Utc::now())
    }

    /// The phase and reason of the task this run finishes.
    pub fn phase_reason(&self) -> (Phase, Option<Reason>) {
        match self.termination {
            Termination::Exited if self.exit_code == Some(0) => (Phase::Succeeded, None),
            Termination::Exited => (Phase::Failed, Some(Reason::NonZeroExit)),
            Termination::TimedOut => (Phase::Failed, Some(Reason::TimedOut)),
            Termination::OomKilled => (Phase::Failed, Some(Reason::OomKilled)),
            Termination::OutputLimitExceeded => (Phase::Failed, Some(Reason::OutputLimitExceeded)),
            Termination::Cancelled => (Phase::Cancelled, Some(Reason::Cancelled)),
            Termination::ImagePullFailed(_) => (Phase::Failed, Some(Reason::ImagePullFailed)),
            Termination::PodMissing(_) => (Phase::Failed, Some(Reason::PodMissing)),
            Termination::BackendError(_) => (Phase::Failed, Some(Reason::BackendError)),
        }
    }

    /// The sentence a person reads in the result's `message`, so that nobody has to decode
    /// reasons: what happened, and what to change when it was the task's fault.
    pub fn message(&self, timeout_seconds: u32) -> String {
        let mut message = match (&self.termination, self.exit_code) {
            (Termination::Exited, Some(0)) => "exited with code 0".to_owned(),
            (Termination::Exited, Some(c)) if c > 128 => {
                format!("exited with code {c} (killed by signal {})", c - 128)
            }
            (Termination::Exited, Some(c)) => format!("exited with code {c}"),
            (Termination::Exited, None) => "exited without a code".to_owned(),
            (Termination::TimedOut, _) => {
                format!("killed after the {timeout_seconds}s timeout; raise timeout_seconds if it needs longer")
            }
            (Termination::OomKilled, _) => {
                "killed for using more than its memory limit; ask for more resources.memory".to_owned()
            }
            (Termination::OutputLimitExceeded, _) => {
                "killed for writing more output than allowed (stdout/stderr or file size cap)".to_owned()
            }
            (Termination::Cancelled, _) => "cancelled while it ran; it was stopped".to_owned(),
            (Termination::ImagePullFailed(d), _) => format!("the task's image could not be pulled: {d}"),
            (Termination::PodMissing(d), _) => format!("the pod running the task disappeared: {d}"),
            (Termination::BackendError(d), _) => format!("the backend failed to run the task: {d}"),
        };
        if let ProgramResult::Invalid(why) = &self.result {
            message.push_str(&format!("; AGENTTASK_RESULT_FILE ignored: {why}"));
        }
        if let Some(note) = &self.artifacts_note {
            message.push_str(&format!("; {note}"));
        }
        if let Some(note) = &self.launch_note {
            message.push_str(&format!("; {note}"));
        }
        message
    }

    /// The program's result as Postgres can store it (NUL replaced), when there is one.
    pub fn stored_result(&self) -> Option<serde_json::Value> {
        match &self.result {
            ProgramResult::Json(v) => Some(storable_json(v.clone())),
            ProgramResult::Missing | ProgramResult::Invalid(_) => None,
        }
    }

    /// Run time in seconds, for the duration histogram.
    pub fn duration_seconds(&self) -> f64 {
        (self.finished_at - self.started_at).num_milliseconds().max(0) as f64 / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(termination: Termination, code: Option<i32>) -> Outcome {
        let mut o = Outcome::bare(termination, Utc::now(), Utc::now());
        o.exit_code = code;
        o
    }

    #[test]
    fn every_ending_has_its_phase_and_reason() {
        let cases = [
            (Termination::Exited, Some(0), Phase::Succeeded, None),
            (Termination::Exited, Some(3), Phase::Failed, Some(Reason::NonZeroExit)),
            (Termination::Exited, Some(137), Phase::Failed, Some(Reason::NonZeroExit)),
            (Termination::Exited, None, Phase::Failed, Some(Reason::NonZeroExit)),
            (Termination::TimedOut, None, Phase::Failed, Some(Reason::TimedOut)),
            (Termination::OomKilled, Some(137), Phase::Failed, Some(Reason::OomKilled)),
            (Termination::OutputLimitExceeded, None, Phase::Failed, Some(Reason::OutputLimitExceeded)),
            (Termination::Cancelled, None, Phase::Cancelled, Some(Reason::Cancelled)),
            (Termination::ImagePullFailed("x".into()), None, Phase::Failed, Some(Reason::ImagePullFailed)),
            (Termination::PodMissing("x".into()), None, Phase::Failed, Some(Reason::PodMissing)),
            (Termination::BackendError("x".into()), None, Phase::Failed, Some(Reason::BackendError)),
        ];
        for (termination, code, phase, reason) in cases {
            let o = with(termination.clone(), code);
            assert_eq!(o.phase_reason(), (phase, reason), "{termination:?} {code:?}");
            assert!(!o.message(5).is_empty());
        }
    }

    #[test]
    fn messages_say_what_to_change() {
        assert!(with(Termination::Exited, Some(137)).message(5).contains("signal 9"));
        assert!(with(Termination::TimedOut, None).message(5).contains("5s timeout"));
        assert!(with(Termination::OomKilled, None).message(5).contains("resources.memory"));
        assert!(with(Termination::BackendError("no bwrap".into()), None).message(5).contains("no bwrap"));
        let mut o = with(Termination::Exited, Some(0));
        o.result = ProgramResult::Invalid("not JSON".into());
        o.artifacts_note = Some("artifacts not stored: quota full".into());
        let m = o.message(5);
        assert!(m.contains("AGENTTASK_RESULT_FILE ignored: not JSON") && m.contains("quota full"), "{m}");
        o.launch_note = Some("warm pool py had no ready replica: ran cold".into());
        assert!(o.message(5).ends_with("; warm pool py had no ready replica: ran cold"));
        assert_eq!(o.stored_result(), None);
    }

    #[test]
    fn stored_result_has_no_nul() {
        let mut o = with(Termination::Exited, Some(0));
        o.result = ProgramResult::Json(serde_json::json!({"k": "a\u{0}b"}));
        assert_eq!(o.stored_result().unwrap()["k"], "a\u{FFFD}b");
    }
}
