//! The Postgres notifications the service sends and listens to, parsed into typed events next
//! to the SQL that sends them (the triggers in `migrations/`, `pg_notify` in `runs.rs`).

use uuid::Uuid;

use crate::domain::phase::Phase;

/// A task changed phase: `"<phase>:<tenant>"` (trigger `tasks_notify`).
pub const TASKS: &str = "agenttask_tasks";
/// A result waits in the outbox (trigger `outbox_notify`).
pub const OUTBOX: &str = "agenttask_outbox";
/// The tenants changed (trigger `tenants_notify`).
pub const TENANTS: &str = "agenttask_tenants";
/// Someone asked to cancel a running task: the payload is its id (`Store::request_cancel`).
pub const CANCEL: &str = "agenttask_cancel";

pub const CHANNELS: [&str; 4] = [TASKS, OUTBOX, TENANTS, CANCEL];

/// One notification, understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notification {
    TaskPhase { phase: Phase, tenant: String },
    Outbox,
    Tenants,
    Cancel(Uuid),
}

impl Notification {
    /// `None` for a channel or payload this version does not know (logged by the caller).
    pub fn parse(channel: &str, payload: &str) -> Option<Notification> {
        match channel {
            TASKS => {
                let (phase, tenant) = payload.split_once(':')?;
                Some(Notification::TaskPhase { phase: phase.parse().ok()?, tenant: tenant.to_owned() })
            }
            OUTBOX => Some(Notification::Outbox),
            TENANTS => Some(Notification::Tenants),
            CANCEL => payload.parse().ok().map(Notification::Cancel),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_parse_into_events() {
        assert_eq!(
            Notification::parse(TASKS, "Queued:acme"),
            Some(Notification::TaskPhase { phase: Phase::Queued, tenant: "acme".into() })
        );
        assert_eq!(Notification::parse(OUTBOX, ""), Some(Notification::Outbox));
        let id = Uuid::new_v4();
        assert_eq!(Notification::parse(CANCEL, &id.to_string()), Some(Notification::Cancel(id)));
        assert_eq!(Notification::parse(TASKS, "Nope:acme"), None);
        assert_eq!(Notification::parse(CANCEL, "not-a-uuid"), None);
        assert_eq!(Notification::parse("other", ""), None);
    }
}
