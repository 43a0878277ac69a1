//! The null backend: every task succeeds at once, with exit code 0 and no output.
//!
//! It exists to measure the control plane (ingest, admission, execution bookkeeping, results)
//! apart from code execution. It runs no code at all, so it is never the default and the
//! service warns when it is selected.

use std::sync::Arc;

use chrono::Utc;

use super::{Backend, BackendError, BoxFuture, Capabilities, EventSink, Job, Outcome, RunEvent, RunKey, Termination};
use crate::domain::validate::BackendIsolation;

/// Runs nothing; see the module docs.
#[derive(Debug, Default)]
pub struct NullBackend;

/// Plenty for bookkeeping: a null run is over before the executor looks again.
const MAX_RUNS: usize = 4096;

impl Backend for NullBackend {
    fn name_for(&self, _isolation: &str) -> &'static str {
        "null"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { isolation: BackendIsolation::Any, runs_survive_restart: false, max_runs: MAX_RUNS }
    }

    fn launch(self: Arc<Self>, job: Job, events: EventSink) -> BoxFuture<'static, Result<(), BackendError>> {
        Box::pin(async move {
            let at = Utc::now();
            events.send(job.key, RunEvent::Scheduled { at });
            events.send(job.key, RunEvent::Running { at });
            let mut outcome = Outcome::bare(Termination::Exited, at, at);
            outcome.exit_code = Some(0);
            events.send(job.key, RunEvent::Finished(Box::new(outcome)));
            Ok(())
        })
    }

    fn cancel(&self, _key: RunKey) -> BoxFuture<'_, Result<(), BackendError>> {
        // Null runs finish the moment they start: there is never one to stop.
        Box::pin(async { Ok(()) })
    }

    fn adopt(self: Arc<Self>, _events: EventSink) -> BoxFuture<'static, Result<Vec<RunKey>, BackendError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}
