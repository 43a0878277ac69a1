//! The scheduler's half of the store: leadership, one admission round in a transaction on the
//! leader's session, and refusing a queued task that can never be admitted.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Postgres, Transaction};
use uuid::Uuid;

use super::tasks::queue_result_of;
use super::{Result, Store};
use crate::domain::phase::{Phase, Reason};
use crate::domain::result::storable_text;

/// The scheduler leadership lock: only the session holding it admits, and it admits on that
/// very session, so a leader that lost its connection cannot commit another admission.
const LEADER_LOCK: i64 = 0x4147_454e_5454_534b; // "AGENTTSK"

/// Admitted work per tenant: what counts against quotas and capacity.
#[derive(Debug, Clone)]
pub struct RunningUsage {
    pub tenant: String,
    pub tasks: i64,
    pub cpu_millis: i64,
    pub memory_bytes: i64,
}

/// A queued task as admission sees it.
#[derive(Debug, Clone)]
pub struct QueuedHead {
    pub tenant: String,
    pub task_id: Uuid,
    pub cpu_millis: i64,
    pub memory_bytes: i64,
    pub submitted_at: DateTime<Utc>,
}

/// A task moved from `Queued` to `Pending`.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub task_id: Uuid,
    pub tenant: String,
    pub submitted_at: DateTime<Utc>,
}

/// Waits until this session holds the scheduler leadership. Cancel-safe in the sense that
/// dropping the future and the connection gives the lock up.
pub async fn acquire_leadership(conn: &mut PgConnection) -> Result<()> {
    sqlx::query!("select pg_advisory_lock($1)", LEADER_LOCK).execute(&mut *conn).await?;
    Ok(())
}

/// One admission decision, in a transaction on the leader's session.
pub struct AdmissionRound<'c> {
    tx: Transaction<'c, Postgres>,
}

impl<'c> AdmissionRound<'c> {
    pub async fn begin(conn: &'c mut PgConnection) -> Result<AdmissionRound<'c>> {
        use sqlx::Connection;
        Ok(AdmissionRound { tx: conn.begin().await? })
    }

    /// Tasks holding capacity, per tenant.
    pub async fn running_usage(&mut self) -> Result<Vec<RunningUsage>> {
        Ok(sqlx::query_as!(
            RunningUsage,
            r#"select tenant, count(*) as "tasks!", coalesce(sum(cpu_millis), 0)::bigint as "cpu_millis!",
                 coalesce(sum(memory_bytes), 0)::bigint as "memory_bytes!" from agenttask.tasks
               where phase = any(agenttask.active_phases()) group by tenant"#
        )
        .fetch_all(&mut *self.tx)
        .await?)
    }

    /// The first `limits[i]` queued tasks of each of `tenants[i]`, in admission order.
    pub async fn queued_heads(&mut self, tenants: &[String], limits: &[i32]) -> Result<Vec<QueuedHead>> {
        Ok(sqlx::query_as!(
            QueuedHead,
            r#"select t.tenant as "tenant!", q.task_id, q.cpu_millis as "cpu_millis!",
                 q.memory_bytes as "memory_bytes!", q.submitted_at
               from unnest($1::text[], $2::int[]) as t(tenant, n)
               cross join lateral (select task_id, priority, submitted_at,
                   coalesce(cpu_millis, 0) as cpu_millis, coalesce(memory_bytes, 0) as memory_bytes
                 from agenttask.tasks where tenant = t.tenant and phase = 'Queued'
                 order by priority desc, submitted_at, task_id limit t.n) q
               order by t.tenant, q.priority desc, q.submitted_at, q.task_id"#,
            tenants,
            limits
        )
        .fetch_all(&mut *self.tx)
        .await?)
    }

    /// `Queued` → `Pending` for these tasks; returns those that moved.
    pub async fn admit(&mut self, ids: &[Uuid]) -> Result<Vec<Admitted>> {
        Ok(sqlx::query_as!(
            Admitted,
            "update agenttask.tasks set phase = $2, admitted_at = now() \
             where task_id = any($1) and phase = $3 returning task_id, tenant, submitted_at",
            ids,
            Phase::Pending as _,
            Phase::Queued as _
        )
        .fetch_all(&mut *self.tx)
        .await?)
    }

    pub async fn commit(self) -> Result<()> {
        self.tx.commit().await?;
        Ok(())
    }
}

/// Refuses a queued task that can never be admitted (for example, larger than the whole
/// service's capacity), with its result. False if it was no longer queued.
pub async fn reject_queued(conn: &mut PgConnection, task_id: Uuid, reason: Reason, message: &str) -> Result<bool> {
    use sqlx::Connection;
    let message = storable_text(message);
    let mut tx = conn.begin().await?;
    let moved = sqlx::query!(
        "update agenttask.tasks set phase = $4, reason = $2, message = $3, \
           finished_at = now(), program = null \
         where task_id = $1 and phase = $5",
        task_id,
        reason as _,
        &*message,
        Phase::Rejected as _,
        Phase::Queued as _
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if moved == 0 {
        return Ok(false);
    }
    queue_result_of(&mut tx, task_id).await?;
    tx.commit().await?;
    Ok(true)
}

impl Store {
    pub async fn reject_queued(&self, task_id: Uuid, reason: Reason, message: &str) -> Result<bool> {
        reject_queued(&mut *self.pool.acquire().await?, task_id, reason, message).await
    }
}
