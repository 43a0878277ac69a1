//! Phases and reasons: the one vocabulary shared by the database, results, the CRD status and
//! `agentctl`. Stored as text so users' SQL reads them without casts.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a task is in its life. See the contract for the transitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub enum Phase {
    /// Accepted and durable, waiting for admission.
    Queued,
    /// Admitted; a backend job exists or is being created.
    Pending,
    /// Placed: a process, pod or sandbox was assigned.
    Scheduled,
    Running,
    Succeeded,
    Failed,
    /// Never admitted: invalid, unknown tenant, over a quota.
    Rejected,
    Cancelled,
}

impl Phase {
    pub const ALL: [Phase; 8] = [
        Phase::Queued,
        Phase::Pending,
        Phase::Scheduled,
        Phase::Running,
        Phase::Succeeded,
        Phase::Failed,
        Phase::Rejected,
        Phase::Cancelled,
    ];

    /// Admitted and holding capacity (counts against `max_concurrency` and `--max-running`).
    /// SQL's copy is `agenttask.active_phases()`; a test keeps the two equal.
    pub const ACTIVE: [Phase; 3] = [Phase::Pending, Phase::Scheduled, Phase::Running];

    /// Not yet terminal: still waiting or holding capacity. SQL's copy is
    /// `agenttask.unfinished_phases()`.
    pub const UNFINISHED: [Phase; 4] = [Phase::Queued, Phase::Pending, Phase::Scheduled, Phase::Running];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Queued => "Queued",
            Phase::Pending => "Pending",
            Phase::Scheduled => "Scheduled",
            Phase::Running => "Running",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
            Phase::Rejected => "Rejected",
            Phase::Cancelled => "Cancelled",
        }
    }

    /// A terminal phase has exactly one result message and never changes again.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed | Phase::Rejected | Phase::Cancelled)
    }

    /// One of [`Phase::ACTIVE`].
    pub fn is_active(self) -> bool {
        Phase::ACTIVE.contains(&self)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Phase {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Phase::ALL.into_iter().find(|p| p.as_str().eq_ignore_ascii_case(s)).ok_or_else(|| {
            let names: Vec<_> = Phase::ALL.iter().map(|p| p.as_str()).collect();
            format!("unknown phase {s:?}; expected one of {}", names.join(", "))
        })
    }
}

/// Why a task ended where it did (CamelCase on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub enum Reason {
    NonZeroExit,
    TimedOut,
    #[serde(rename = "OOMKilled")]
    OomKilled,
    OutputLimitExceeded,
    ValidationFailed,
    UnknownTenant,
    BacklogFull,
    IsolationNotAllowed,
    Cancelled,
    BackendError,
    ImagePullFailed,
    PodMissing,
}

impl Reason {
    pub const ALL: [Reason; 12] = [
        Reason::NonZeroExit,
        Reason::TimedOut,
        Reason::OomKilled,
        Reason::OutputLimitExceeded,
        Reason::ValidationFailed,
        Reason::UnknownTenant,
        Reason::BacklogFull,
        Reason::IsolationNotAllowed,
        Reason::Cancelled,
        Reason::BackendError,
        Reason::ImagePullFailed,
        Reason::PodMissing,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NonZeroExit => "NonZeroExit",
            Reason::TimedOut => "TimedOut",
            Reason::OomKilled => "OOMKilled",
            Reason::OutputLimitExceeded => "OutputLimitExceeded",
            Reason::ValidationFailed => "ValidationFailed",
            Reason::UnknownTenant => "UnknownTenant",
            Reason::BacklogFull => "BacklogFull",
            Reason::IsolationNotAllowed => "IsolationNotAllowed",
            Reason::Cancelled => "Cancelled",
            Reason::BackendError => "BackendError",
            Reason::ImagePullFailed => "ImagePullFailed",
            Reason::PodMissing => "PodMissing",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Reason {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reason::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| format!("unknown reason {s:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_text_and_json() {
        for p in Phase::ALL {
            assert_eq!(p.as_str().parse::<Phase>(), Ok(p));
            assert_eq!(serde_json::to_string(&p).unwrap(), format!("\"{p}\""));
        }
        for r in Reason::ALL {
            assert_eq!(r.as_str().parse::<Reason>(), Ok(r));
            assert_eq!(serde_json::to_string(&r).unwrap(), format!("\"{r}\""));
        }
        assert_eq!(Reason::OomKilled.as_str(), "OOMKilled");
    }

    #[test]
    fn terminal_and_active_are_disjoint() {
        for p in Phase::ALL {
            assert!(!(p.is_terminal() && p.is_active()), "{p}");
            assert_eq!(Phase::UNFINISHED.contains(&p), !p.is_terminal(), "{p}");
        }
        assert!("nope".parse::<Phase>().unwrap_err().contains("Queued"));
    }
}
