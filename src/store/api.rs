//! The task API's half of the store: reading tasks and a queued task's place in line.

use sqlx::PgExecutor;
use uuid::Uuid;

use super::tasks::{fetch_row, TaskRow};
use super::{Result, Store};
use crate::domain::phase::{Phase, Reason};
use crate::domain::result::Artifact;
use crate::domain::task::Language;
use sqlx::types::Json;

/// A queued task's place in its tenant's queue.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Position {
    pub task_id: Uuid,
    pub tenant: String,
    pub phase: Phase,
    /// 1 = next to be admitted for this tenant; null when not queued.
    pub position: Option<i64>,
    pub queued: i64,
    /// Tasks of this tenant admitted in the last five minutes, per second.
    pub admitted_per_second: f64,
    /// position ÷ admitted_per_second; null when unknown (nothing admitted recently).
    pub estimated_wait_seconds: Option<f64>,
}

pub async fn find_task(conn: impl PgExecutor<'_>, tenant: &str, client_id: &str) -> Result<Option<TaskRow>> {
    Ok(sqlx::query_as!(
        TaskRow,
        r#"select task_id, tenant, client_id, batch_id, language as "language: Language",
             phase as "phase: Phase", reason as "reason: Reason", message, priority,
             timeout_seconds, cpu_millis, memory_bytes, isolation,
             labels as "labels: Json<serde_json::Value>", exit_code,
             result as "result: Json<serde_json::Value>", stdout, stderr, stdout_truncated,
             stderr_truncated, artifacts as "artifacts: Json<Vec<Artifact>>", backend, attempt,
             submitted_at, admitted_at, started_at, finished_at
           from agenttask.tasks where tenant = $1 and client_id = $2"#,
        tenant,
        client_id
    )
    .fetch_optional(conn)
    .await?)
}

/// Where a task stands in its tenant's queue. The reads share one snapshot when `conn` is in a
/// transaction.
pub async fn position(conn: &mut sqlx::PgConnection, task_id: Uuid) -> Result<Option<Position>> {
    let Some(task) = sqlx::query!(
        r#"select tenant, phase as "phase: Phase", priority, submitted_at from agenttask.tasks where task_id = $1"#,
        task_id
    )
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    let ahead: Option<i64> = if task.phase == Phase::Queued {
        Some(
            sqlx::query_scalar!(
                r#"select count(*) as "n!" from agenttask.tasks where tenant = $1 and phase = 'Queued'
                   and (priority > $2 or (priority = $2 and (submitted_at, task_id) < ($3, $4)))"#,
                task.tenant,
                task.priority,
                task.submitted_at,
                task_id
            )
            .fetch_one(&mut *conn)
            .await?,
        )
    } else {
        None
    };
    let load = sqlx::query!(
        r#"select (select count(*) from agenttask.tasks where tenant = $1 and phase = 'Queued') as "queued!",
                  (select count(*) from agenttask.tasks where tenant = $1
                     and admitted_at > now() - interval '5 minutes') as "recent!""#,
        task.tenant
    )
    .fetch_one(&mut *conn)
    .await?;
    let rate = load.recent as f64 / 300.0;
    let position = ahead.map(|a| a + 1);
    Ok(Some(Position {
        task_id,
        tenant: task.tenant,
        phase: task.phase,
        position,
        queued: load.queued,
        admitted_per_second: rate,
        estimated_wait_seconds: position.filter(|_| rate > 0.0).map(|p| p as f64 / rate),
    }))
}

impl Store {
    pub async fn get_task(&self, task_id: Uuid) -> Result<Option<TaskRow>> {
        fetch_row(&self.pool, task_id).await
    }

    pub async fn find_task(&self, tenant: &str, client_id: &str) -> Result<Option<TaskRow>> {
        find_task(&self.pool, tenant, client_id).await
    }

    pub async fn position(&self, task_id: Uuid) -> Result<Option<Position>> {
        position(&mut *self.pool.acquire().await?, task_id).await
    }
}
