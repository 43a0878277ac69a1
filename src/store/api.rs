//! The task API's half of the store: reading tasks and a queued task's place in line.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use super::tasks::{fetch_row, select_task_rows, TaskRow};
use super::{Result, Store};
use crate::domain::listing::{Cursor, TaskFilter};
use crate::domain::phase::{Phase, Reason};
use crate::domain::result::millis_between;

/// A queued task's place in its tenant's queue.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
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
    Ok(select_task_rows!("from agenttask.tasks where tenant = $1 and client_id = $2", tenant, client_id)
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

/// A task as `GET /v1/tasks` lists it: what identifies it and how it ended, without its code
/// or output (`GET /v1/tasks/{id}` has those).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct TaskSummary {
    pub task_id: Uuid,
    /// The client's idempotency key.
    pub id: Option<String>,
    pub tenant: String,
    pub batch_id: Option<String>,
    pub language: Option<String>,
    pub phase: Phase,
    pub reason: Option<Reason>,
    pub exit_code: Option<i32>,
    pub labels: serde_json::Value,
    pub submitted_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub duration_ms: Option<i64>,
}

/// One page of tasks, newest first, and the cursor of the next page (none after the last).
pub async fn list_tasks(conn: impl PgExecutor<'_>, f: &TaskFilter) -> Result<(Vec<TaskSummary>, Option<Cursor>)> {
    let phases: Option<Vec<String>> = f.phases.as_ref().map(|p| p.iter().map(|p| p.as_str().to_owned()).collect());
    let labels = f.labels.clone().map(serde_json::Value::Object);
    let mut rows = sqlx::query!(
        r#"select task_id, client_id, tenant, batch_id, language, phase as "phase: Phase",
             reason as "reason: Reason", exit_code, labels, submitted_at, started_at, finished_at
           from agenttask.tasks
           where ($1::text is null or tenant = $1)
             and ($2::text is null or batch_id = $2)
             and ($3::text[] is null or phase = any($3))
             and ($4::jsonb is null or labels @> $4)
             and ($5::timestamptz is null or submitted_at >= $5)
             and ($6::timestamptz is null or submitted_at < $6)
             and ($7::timestamptz is null or (submitted_at, task_id) < ($7, $8::uuid))
           order by submitted_at desc, task_id desc
           limit $9"#,
        f.tenant,
        f.batch,
        phases.as_deref(),
        labels,
        f.since,
        f.until,
        f.after.map(|c| c.submitted_at),
        f.after.map(|c| c.task_id),
        // One more than a page: whether it exists says whether there is a next page.
        f.limit + 1
    )
    .fetch_all(conn)
    .await?;
    let more = rows.len() as i64 > f.limit;
    rows.truncate(f.limit as usize);
    let next = rows.last().filter(|_| more).map(|r| Cursor { submitted_at: r.submitted_at, task_id: r.task_id });
    let items = rows
        .into_iter()
        .map(|r| TaskSummary {
            duration_ms: millis_between(r.started_at, r.finished_at),
            task_id: r.task_id,
            id: r.client_id,
            tenant: r.tenant,
            batch_id: r.batch_id,
            language: r.language,
            phase: r.phase,
            reason: r.reason,
            exit_code: r.exit_code,
            labels: r.labels,
            submitted_at: r.submitted_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
        })
        .collect();
    Ok((items, next))
}

impl Store {
    pub async fn list_tasks(&self, f: &TaskFilter) -> Result<(Vec<TaskSummary>, Option<Cursor>)> {
        list_tasks(&self.pool, f).await
    }
}

/// A batch as `GET /v1/batches/{tenant}/{batch}` shows it: the row of `agenttask.batch_summary`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct BatchStatus {
    pub tenant: String,
    pub batch_id: String,
    pub total: i64,
    pub queued: i64,
    /// Admitted and not finished (Pending, Scheduled or Running).
    pub running: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub rejected: i64,
    pub cancelled: i64,
    pub first_submitted_at: Option<DateTime<Utc>>,
    pub last_finished_at: Option<DateTime<Utc>>,
    pub p50_duration_ms: Option<i64>,
    pub p95_duration_ms: Option<i64>,
}

/// One batch's counts and percentiles, read from the contract's view; `None` when it has no task.
pub async fn batch_status(conn: impl PgExecutor<'_>, tenant: &str, batch: &str) -> Result<Option<BatchStatus>> {
    Ok(sqlx::query_as!(
        BatchStatus,
        r#"select tenant as "tenant!", batch_id as "batch_id!", total as "total!", queued as "queued!",
             running as "running!", succeeded as "succeeded!", failed as "failed!", rejected as "rejected!",
             cancelled as "cancelled!", first_submitted_at, last_finished_at, p50_duration_ms, p95_duration_ms
           from agenttask.batch_summary where tenant = $1 and batch_id = $2"#,
        tenant,
        batch
    )
    .fetch_optional(conn)
    .await?)
}

/// A page of a batch's tasks, oldest first, after `after`; and the cursor of the next page.
pub async fn batch_tasks(
    conn: impl PgExecutor<'_>,
    tenant: &str,
    batch: &str,
    after: Option<Cursor>,
    limit: i64,
) -> Result<(Vec<TaskRow>, Option<Cursor>)> {
    let mut rows = select_task_rows!(
        r#"from agenttask.tasks
           where tenant = $1 and batch_id = $2
             and ($3::timestamptz is null or (submitted_at, task_id) > ($3, $4::uuid))
           order by submitted_at, task_id
           limit $5"#,
        tenant,
        batch,
        after.map(|c| c.submitted_at),
        after.map(|c| c.task_id),
        limit + 1
    )
    .fetch_all(conn)
    .await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next = rows.last().filter(|_| more).map(|r| Cursor { submitted_at: r.submitted_at, task_id: r.task_id });
    Ok((rows, next))
}

impl Store {
    pub async fn batch_status(&self, tenant: &str, batch: &str) -> Result<Option<BatchStatus>> {
        batch_status(&self.pool, tenant, batch).await
    }

    pub async fn batch_tasks(
        &self,
        tenant: &str,
        batch: &str,
        after: Option<Cursor>,
        limit: i64,
    ) -> Result<(Vec<TaskRow>, Option<Cursor>)> {
        batch_tasks(&self.pool, tenant, batch, after, limit).await
    }
}
