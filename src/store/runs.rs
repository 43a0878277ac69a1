//! Executions: claiming admitted tasks, the phases a backend reports, leases, cancellation and
//! the final write. The executor's half of the store.
//!
//! Every write names the attempt it belongs to (`where attempt = $n`), so an event of an older
//! run, or of an executor whose lease expired, can never move a task that a newer attempt owns.
//! A claimed task stays `Pending` (with a lease owner) until its backend reports it placed.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{Connection, PgConnection, PgExecutor};
use uuid::Uuid;

use super::tasks::queue_result_of;
use super::{Result, Store};
use crate::domain::outcome::Outcome;
use crate::domain::phase::{Phase, Reason};
use crate::domain::result::storable_text;
use crate::domain::task::{Language, Program};

/// A task handed to an executor: everything a backend needs, as stored. Columns that only a
/// rejected task can lack are still optional here; the executor refuses such a row loudly.
#[derive(Debug, Clone)]
pub struct ClaimedTask {
    pub task_id: Uuid,
    pub tenant: String,
    pub attempt: i32,
    pub language: Option<Language>,
    pub program: Option<Json<Program>>,
    pub timeout_seconds: Option<i32>,
    pub cpu_millis: Option<i64>,
    pub memory_bytes: Option<i64>,
    pub isolation: String,
    pub labels: Json<std::collections::BTreeMap<String, String>>,
    pub batch_id: Option<String>,
    pub priority: i16,
    /// `namespace/name` of the AgentTask it was applied as (Kubernetes only), else `None`.
    pub kube_object: Option<String>,
}

/// A run that an earlier process launched and this one now watches.
#[derive(Debug, Clone)]
pub struct AdoptedRun {
    pub task_id: Uuid,
    pub attempt: i32,
    pub tenant: String,
    pub language: Option<Language>,
    pub timeout_seconds: Option<i32>,
    pub isolation: String,
}

/// What a cancel request did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The task had not started: it is `Cancelled` now, with its one result queued.
    Cancelled,
    /// The task is with an executor, which has been asked to stop it; it ends `Cancelled`.
    Requested,
    /// Nothing to do: the task already ended in this phase.
    AlreadyFinished(Phase),
    NotFound,
}

/// Ends attempt `attempt` of `task_id` with `outcome` and queues its one result, in a transaction
/// on `conn`. False when the attempt no longer owns an active task (a newer attempt, a reaper or
/// a cancel got there first).
pub async fn finish(
    conn: &mut PgConnection,
    task_id: Uuid,
    attempt: i32,
    backend: Option<&str>,
    outcome: &Outcome,
    timeout_seconds: u32,
) -> Result<bool> {
    let (phase, reason) = outcome.phase_reason();
    let message = outcome.message(timeout_seconds);
    let message = storable_text(&message);
    let mut tx = conn.begin().await?;
    let moved = sqlx::query!(
        "update agenttask.tasks set phase = $3, reason = $4, message = $5, exit_code = $6, \
           result = $7, stdout = $8, stderr = $9, stdout_truncated = $10, \
           stderr_truncated = $11, artifacts = $12, started_at = coalesce(started_at, $13), \
           finished_at = $14, backend = coalesce($15, backend), lease_owner = null, \
           lease_expires_at = null, program = null, warm = $16 \
         where task_id = $1 and attempt = $2 and phase = any(agenttask.active_phases())",
        task_id,
        attempt,
        phase as _,
        reason as _,
        &*message,
        outcome.exit_code,
        outcome.stored_result().map(Json) as _,
        outcome.stdout.text,
        outcome.stderr.text,
        outcome.stdout.truncated,
        outcome.stderr.truncated,
        Json(&outcome.artifacts) as _,
        outcome.started_at,
        outcome.finished_at,
        backend,
        outcome.warm
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

/// Claims up to `limit` admitted, unclaimed tasks for `owner`, oldest admission first, and
/// starts a new attempt for each. They stay `Pending` until their backend places them.
pub async fn claim(conn: impl PgExecutor<'_>, owner: Uuid, limit: i64, lease: Duration) -> Result<Vec<ClaimedTask>> {
    Ok(sqlx::query_as!(
        ClaimedTask,
        r#"update agenttask.tasks t set attempt = t.attempt + 1, lease_owner = $1,
                 lease_expires_at = now() + make_interval(secs => $3)
               where t.task_id in (select task_id from agenttask.tasks
                 where phase = 'Pending' and lease_owner is null and cancel_requested_at is null
                 order by admitted_at limit $2 for update skip locked)
               returning t.task_id, t.tenant, t.attempt, t.language as "language: Language",
                 t.program as "program: Json<Program>", t.timeout_seconds, t.cpu_millis,
                 t.memory_bytes, t.isolation,
                 t.labels as "labels: Json<std::collections::BTreeMap<String, String>>",
                 t.batch_id, t.priority, t.kube_object"#,
        owner,
        limit,
        lease.as_secs_f64()
    )
    .fetch_all(conn)
    .await?)
}

/// `Pending` → `Scheduled`: the backend placed the run.
pub async fn mark_scheduled(conn: impl PgExecutor<'_>, task_id: Uuid, attempt: i32, backend: &str) -> Result<bool> {
    let done = sqlx::query!(
        "update agenttask.tasks set phase = $4, backend = $3 \
         where task_id = $1 and attempt = $2 and phase = $5",
        task_id,
        attempt,
        backend,
        Phase::Scheduled as _,
        Phase::Pending as _
    )
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// → `Running`: the program started. Accepted from `Pending` too, for backends that see
/// placement and start at once.
pub async fn mark_running(
    conn: impl PgExecutor<'_>,
    task_id: Uuid,
    attempt: i32,
    backend: &str,
    at: DateTime<Utc>,
) -> Result<bool> {
    let done = sqlx::query!(
        "update agenttask.tasks set phase = $5, started_at = $3, backend = $4 \
         where task_id = $1 and attempt = $2 and phase = any($6)",
        task_id,
        attempt,
        at,
        backend,
        Phase::Running as _,
        &[Phase::Pending, Phase::Scheduled] as &[Phase]
    )
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Extends the leases of the runs `owner` watches right now (not of everything it ever
/// claimed: a claim whose reply was lost must be able to expire).
pub async fn renew_leases(conn: impl PgExecutor<'_>, owner: Uuid, task_ids: &[Uuid], lease: Duration) -> Result<u64> {
    Ok(sqlx::query!(
        "update agenttask.tasks set lease_expires_at = now() + make_interval(secs => $2) \
         where lease_owner = $1 and task_id = any($3) and phase = any(agenttask.active_phases())",
        owner,
        lease.as_secs_f64(),
        task_ids
    )
    .execute(conn)
    .await?
    .rows_affected())
}

/// The runs of `owner` whose task someone asked to cancel.
pub async fn cancel_requested(conn: impl PgExecutor<'_>, owner: Uuid) -> Result<Vec<(Uuid, i32)>> {
    Ok(sqlx::query!(
        "select task_id, attempt from agenttask.tasks \
         where lease_owner = $1 and cancel_requested_at is not null and phase = any(agenttask.active_phases())",
        owner
    )
    .fetch_all(conn)
    .await?
    .into_iter()
    .map(|r| (r.task_id, r.attempt))
    .collect())
}

/// Takes over the leases of runs that an earlier process launched, when they are still the
/// task's current attempt. Returns those that are now `owner`'s.
pub async fn adopt(
    conn: impl PgExecutor<'_>,
    owner: Uuid,
    runs: &[(Uuid, i32)],
    lease: Duration,
) -> Result<Vec<AdoptedRun>> {
    let ids: Vec<Uuid> = runs.iter().map(|r| r.0).collect();
    let attempts: Vec<i32> = runs.iter().map(|r| r.1).collect();
    Ok(sqlx::query_as!(
        AdoptedRun,
        r#"update agenttask.tasks t set lease_owner = $1,
                 lease_expires_at = now() + make_interval(secs => $2)
               from unnest($3::uuid[], $4::int[]) as r(task_id, attempt)
               where t.task_id = r.task_id and t.attempt = r.attempt and t.phase = any(agenttask.active_phases())
               returning t.task_id, t.attempt, t.tenant, t.language as "language: Language",
                 t.timeout_seconds, t.isolation"#,
        owner,
        lease.as_secs_f64(),
        &ids,
        &attempts
    )
    .fetch_all(conn)
    .await?)
}

/// On a clean shutdown: hands `owner`'s unfinished runs back for another attempt, except
/// those someone cancelled, which end `Cancelled`. Each cancelled run ends in its own
/// transaction (a savepoint when `conn` is already in one).
pub async fn release(conn: &mut PgConnection, owner: Uuid) -> Result<u64> {
    for (task_id, attempt) in cancel_requested(&mut *conn, owner).await? {
        finish(conn, task_id, attempt, None, &Outcome::cancelled(Utc::now()), 0).await?;
    }
    Ok(sqlx::query!(
        "update agenttask.tasks set phase = $2, lease_owner = null, lease_expires_at = null, \
           started_at = null \
         where lease_owner = $1 and phase = any(agenttask.active_phases())",
        owner,
        Phase::Pending as _
    )
    .execute(conn)
    .await?
    .rows_affected())
}

/// Runs whose executor vanished (lease expired): cancelled ones end `Cancelled`; the others
/// run again while attempts remain, else fail. Returns how many were requeued and ended.
pub async fn reap_expired(conn: &mut PgConnection, max_attempts: i32) -> Result<(u64, u64)> {
    let requeued = sqlx::query!(
        "update agenttask.tasks set phase = $2, lease_owner = null, lease_expires_at = null, \
           started_at = null \
         where phase = any(agenttask.active_phases()) and lease_expires_at < now() and attempt < $1 \
           and cancel_requested_at is null",
        max_attempts,
        Phase::Pending as _
    )
    .execute(&mut *conn)
    .await?
    .rows_affected();
    // Whatever is still expired was cancelled or has used its attempts; `finish` is guarded
    // by the attempt, so two reapers cannot both end a task.
    let rows = sqlx::query!(
        r#"select task_id, attempt, cancel_requested_at is not null as "cancelled!" from agenttask.tasks
               where phase = any(agenttask.active_phases()) and lease_expires_at < now()"#
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut ended = 0;
    for r in rows {
        let now = Utc::now();
        let outcome = if r.cancelled {
            Outcome::cancelled(now)
        } else {
            Outcome::backend_error(
                format!("the executor running this task stopped responding {} times", r.attempt),
                now,
            )
        };
        if finish(conn, r.task_id, r.attempt, None, &outcome, 0).await? {
            ended += 1;
        }
    }
    Ok((requeued, ended))
}

/// Cancels a task: at once when it has not started, else by asking its executor (which
/// hears it through `agenttask_cancel` within milliseconds, or at its next lease renewal). In
/// a transaction on `conn`.
pub async fn request_cancel(conn: &mut PgConnection, task_id: Uuid) -> Result<CancelOutcome> {
    let mut tx = conn.begin().await?;
    let found = sqlx::query!(
        r#"select phase as "phase: Phase", lease_owner from agenttask.tasks where task_id = $1 for update"#,
        task_id
    )
    .fetch_optional(&mut *tx)
    .await?;
    let Some(found) = found else {
        return Ok(CancelOutcome::NotFound);
    };
    let phase = found.phase;
    if phase.is_terminal() {
        return Ok(CancelOutcome::AlreadyFinished(phase));
    }
    if phase == Phase::Queued || (phase == Phase::Pending && found.lease_owner.is_none()) {
        sqlx::query!(
            "update agenttask.tasks set phase = $2, reason = $3, \
               message = 'cancelled before it ran', finished_at = now(), program = null \
             where task_id = $1",
            task_id,
            Phase::Cancelled as _,
            Reason::Cancelled as _
        )
        .execute(&mut *tx)
        .await?;
        queue_result_of(&mut tx, task_id).await?;
        tx.commit().await?;
        return Ok(CancelOutcome::Cancelled);
    }
    sqlx::query!(
        "update agenttask.tasks set cancel_requested_at = coalesce(cancel_requested_at, now()) \
         where task_id = $1",
        task_id
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!("select pg_notify('agenttask_cancel', $1)", task_id.to_string()).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(CancelOutcome::Requested)
}

/// The unfinished tasks of a batch, to cancel them one by one.
pub async fn unfinished_in_batch(conn: impl PgExecutor<'_>, tenant: &str, batch_id: &str) -> Result<Vec<Uuid>> {
    Ok(sqlx::query_scalar!(
        // Unstarted tasks first: stopping a running one frees a slot, and the scheduler could
        // admit a queued task of the batch into it before its turn in the caller's loop.
        "select task_id from agenttask.tasks where tenant = $1 and batch_id = $2 \
         and phase = any(agenttask.unfinished_phases()) \
         order by array_position(array['Queued', 'Pending', 'Scheduled', 'Running'], phase), submitted_at",
        tenant,
        batch_id
    )
    .fetch_all(conn)
    .await?)
}

/// The tasks that have not started (queued, or admitted and not yet claimed) of every
/// tenant not in `tenants`: what a tenants file that drops a tenant leaves behind.
pub async fn unstarted_of_other_tenants(conn: impl PgExecutor<'_>, tenants: &[String]) -> Result<Vec<Uuid>> {
    Ok(sqlx::query_scalar!(
        "select task_id from agenttask.tasks where not (tenant = any($1)) \
         and (phase = 'Queued' or (phase = 'Pending' and lease_owner is null)) order by submitted_at",
        tenants
    )
    .fetch_all(conn)
    .await?)
}

/// Shorthands on the pool, one statement or transaction each.
impl Store {
    pub async fn claim(&self, owner: Uuid, limit: i64, lease: Duration) -> Result<Vec<ClaimedTask>> {
        claim(&self.pool, owner, limit, lease).await
    }

    pub async fn mark_scheduled(&self, task_id: Uuid, attempt: i32, backend: &str) -> Result<bool> {
        mark_scheduled(&self.pool, task_id, attempt, backend).await
    }

    pub async fn mark_running(&self, task_id: Uuid, attempt: i32, backend: &str, at: DateTime<Utc>) -> Result<bool> {
        mark_running(&self.pool, task_id, attempt, backend, at).await
    }

    /// Records how a run ended and queues the task's one result, in one transaction. Returns
    /// false when the task was no longer this attempt's to finish (a stale run).
    pub async fn finish(
        &self,
        task_id: Uuid,
        attempt: i32,
        backend: Option<&str>,
        outcome: &Outcome,
        timeout_seconds: u32,
    ) -> Result<bool> {
        finish(&mut *self.pool.acquire().await?, task_id, attempt, backend, outcome, timeout_seconds).await
    }

    pub async fn renew_leases(&self, owner: Uuid, task_ids: &[Uuid], lease: Duration) -> Result<u64> {
        renew_leases(&self.pool, owner, task_ids, lease).await
    }

    pub async fn cancel_requested(&self, owner: Uuid) -> Result<Vec<(Uuid, i32)>> {
        cancel_requested(&self.pool, owner).await
    }

    pub async fn adopt(&self, owner: Uuid, runs: &[(Uuid, i32)], lease: Duration) -> Result<Vec<AdoptedRun>> {
        adopt(&self.pool, owner, runs, lease).await
    }

    pub async fn release(&self, owner: Uuid) -> Result<u64> {
        release(&mut *self.pool.acquire().await?, owner).await
    }

    pub async fn reap_expired(&self, max_attempts: i32) -> Result<(u64, u64)> {
        reap_expired(&mut *self.pool.acquire().await?, max_attempts).await
    }

    pub async fn request_cancel(&self, task_id: Uuid) -> Result<CancelOutcome> {
        request_cancel(&mut *self.pool.acquire().await?, task_id).await
    }

    pub async fn unfinished_in_batch(&self, tenant: &str, batch_id: &str) -> Result<Vec<Uuid>> {
        unfinished_in_batch(&self.pool, tenant, batch_id).await
    }

    pub async fn unstarted_of_other_tenants(&self, tenants: &[String]) -> Result<Vec<Uuid>> {
        unstarted_of_other_tenants(&self.pool, tenants).await
    }
}
