//! Retention's SQL: removing old finished tasks' outputs, or the rows themselves, a bounded batch
//! per statement.
//!
//! Each statement is its own short transaction touching at most `limit` rows, picked oldest first
//! through a partial index and with `skip locked`, so a sweep over a million old rows never holds
//! many row locks for long nor waits behind a task being written. Only finished rows are touched
//! (`finished_at` is set in the same statement that makes a task terminal), so the statement-level
//! queued-count triggers see no change, and no phase changes, so no notification is sent.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::Result;

/// Postgres advisory lock held by the one process sweeping at a time ("AGTRETEN").
pub const RETENTION_LOCK: i64 = 0x4147_5452_4554_454E;

/// Removes stdout, stderr and the artifact list of at most `limit` tasks that finished before
/// `cutoff` and still hold them, and marks them; returns how many.
pub async fn remove_outputs(conn: &mut PgConnection, cutoff: DateTime<Utc>, limit: i64) -> Result<u64> {
    Ok(sqlx::query!(
        "update agenttask.tasks set stdout = null, stderr = null, artifacts = '[]', program = null,
           outputs_removed_at = now()
         where task_id in (
           select task_id from agenttask.tasks
           where finished_at is not null and outputs_removed_at is null and finished_at < $1
           order by finished_at limit $2 for update skip locked)",
        cutoff,
        limit
    )
    .execute(conn)
    .await?
    .rows_affected())
}

/// Deletes at most `limit` tasks that finished before `cutoff`; returns how many.
pub async fn delete_finished(conn: &mut PgConnection, cutoff: DateTime<Utc>, limit: i64) -> Result<u64> {
    Ok(sqlx::query!(
        "delete from agenttask.tasks
         where task_id in (
           select task_id from agenttask.tasks where finished_at is not null and finished_at < $1
           order by finished_at limit $2 for update skip locked)",
        cutoff,
        limit
    )
    .execute(conn)
    .await?
    .rows_affected())
}

/// Takes the retention lock if no other session holds it; `false` when another process sweeps.
pub async fn try_lock(conn: &mut PgConnection) -> Result<bool> {
    Ok(sqlx::query_scalar!(r#"select pg_try_advisory_lock($1) as "locked!""#, RETENTION_LOCK).fetch_one(conn).await?)
}

/// Gives the retention lock back.
pub async fn unlock(conn: &mut PgConnection) -> Result<()> {
    sqlx::query_scalar!("select pg_advisory_unlock($1)", RETENTION_LOCK).fetch_one(conn).await?;
    Ok(())
}
