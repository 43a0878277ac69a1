//! Retention: finished tasks' stdout, stderr and artifacts are removed once they are older than
//! `--retention-days`; with `--retention-delete-rows`, the task rows themselves are deleted.
//!
//! What stays (without deleting rows): every column of `agenttask.task_results` but `stdout` and
//! `stderr` (null from then on), so phases, exit codes, the programs' JSON `result`, labels and
//! timings keep answering SQL, and `agenttask.batch_summary` keeps its counts and percentiles.
//!
//! The database side runs in every process with the scheduler, but only one process sweeps at a
//! time: a sweep first takes a Postgres advisory lock without waiting, and a process that does
//! not get it skips that round. Rows are swept a bounded batch per statement (see
//! [`crate::store::retention`]), oldest first, and each is marked so it is never visited again.
//!
//! Artifact *files* live on the executors' disks, where the database sweep cannot reach them:
//! each executor's existing artifact sweep removes them after the same period (the service sets
//! its TTL from this setting), so files and their listing go together.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store::{retention as sql, Store, StoreError};

/// Rows per statement: small enough that each statement is a short transaction.
const BATCH: i64 = 1000;

/// How often the database is swept.
const EVERY: Duration = Duration::from_secs(600);

/// The retention setting, resolved: how long finished tasks keep their outputs, and whether the
/// rows go too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub keep_for: Duration,
    pub delete_rows: bool,
}

impl Retention {
    /// Tasks that finished before this instant are retained away.
    pub fn cutoff(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        chrono::Duration::from_std(self.keep_for)
            .ok()
            .and_then(|d| now.checked_sub_signed(d))
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
    }
}

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    pub outputs_removed: u64,
    pub deleted: u64,
}

/// Sweeps everything older than the cutoff, a batch at a time, unless another process is sweeping
/// (then `None`). Stops between batches when `shutdown` is cancelled.
///
/// # Errors
/// When Postgres cannot be reached or refuses a statement; batches done before stay done.
pub async fn sweep_once(
    store: &Store,
    policy: &Retention,
    now: DateTime<Utc>,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<Option<Swept>, StoreError> {
    // A session of its own: the lock is the session's, and dies with it if this process does.
    let mut conn = store.dedicated_connection().await?;
    if !sql::try_lock(&mut conn).await? {
        return Ok(None);
    }
    let cutoff = policy.cutoff(now);
    let mut swept = Swept::default();
    let result = async {
        while !shutdown.is_cancelled() {
            let n = if policy.delete_rows {
                let n = sql::delete_finished(&mut conn, cutoff, BATCH).await?;
                swept.deleted += n;
                metrics.retention.with_label_values(&["deleted"]).inc_by(n);
                n
            } else {
                let n = sql::remove_outputs(&mut conn, cutoff, BATCH).await?;
                swept.outputs_removed += n;
                metrics.retention.with_label_values(&["outputs_removed"]).inc_by(n);
                n
            };
            if n < BATCH as u64 {
                break;
            }
            // Between batches, room for the writes of running work.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok::<_, StoreError>(())
    }
    .await;
    // Closing the session releases the lock as well; unlocking first just says so sooner.
    let _ = sql::unlock(&mut conn).await;
    let _ = sqlx::Connection::close(conn).await;
    result.map(|()| Some(swept))
}

/// Sweeps now and every ten minutes until `shutdown`. Failures are logged and counted
/// (`agenttask_errors_total{component="retention"}`) and the next round tries again.
pub async fn run(store: Store, policy: Retention, metrics: Metrics, shutdown: CancellationToken) {
    loop {
        match sweep_once(&store, &policy, Utc::now(), &metrics, &shutdown).await {
            Ok(Some(s)) if s.outputs_removed + s.deleted > 0 => tracing::info!(
                outputs_removed = s.outputs_removed,
                deleted = s.deleted,
                "retention: finished tasks older than the retention period swept"
            ),
            Ok(_) => {}
            Err(e) => {
                metrics.errors.with_label_values(&["retention", e.metric_label()]).inc();
                tracing::warn!(error = %e, "retention sweep failed; retrying at the next round");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cutoff_is_the_retention_period_before_now() {
        let now = DateTime::parse_from_rfc3339("2026-11-27T12:00:00Z").unwrap().with_timezone(&Utc);
        let p = Retention { keep_for: Duration::from_secs(30 * 86_400), delete_rows: false };
        assert_eq!(p.cutoff(now).to_rfc3339(), "2026-10-28T12:00:00+00:00");
        // A period longer than the calendar reaches back to the beginning: nothing is removed.
        let forever = Retention { keep_for: Duration::MAX, delete_rows: false };
        assert_eq!(forever.cutoff(now), DateTime::<Utc>::MIN_UTC);
    }
}
