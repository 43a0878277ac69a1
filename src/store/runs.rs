//! Executions: claiming admitted tasks, the phases a backend reports, leases, cancellation and
//! the final write. The executor's half of the store.
//!
//! Every write names the attempt it belongs to (`where attempt = $n`), so an event of an older
//! run, or of an executor whose lease expired, can never move a task that a newer attempt owns.
//! A claimed task stays `Pending` (with a lease owner) until its backend reports it placed.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use super::tasks::{commit_with_result, TaskRow, ROW_COLUMNS};
use super::{Result, Store};
use crate::domain::outcome::Outcome;
use crate::domain::phase::Phase;
use crate::domain::result::storable_text;
use crate::domain::task::Program;

/// The phases in which a task belongs to an execution (and holds capacity).
const ACTIVE: &str = "('Pending', 'Scheduled', 'Running')";

/// A task handed to an executor: everything a backend needs, as stored. Columns that only a
/// rejected task can lack are still optional here; the executor refuses such a row loudly.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ClaimedTask {
    pub task_id: Uuid,
    pub tenant: String,
    pub attempt: i32,
    pub language: Option<String>,
    pub program: Option<Json<Program>>,
    pub timeout_seconds: Option<i32>,
    pub cpu_millis: Option<i64>,
    pub memory_bytes: Option<i64>,
    pub isolation: String,
    pub labels: Json<std::collections::BTreeMap<String, String>>,
    pub batch_id: Option<String>,
    pub priority: i16,
}

/// A run that an earlier process launched and this one now watches.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AdoptedRun {
    pub task_id: Uuid,
    pub attempt: i32,
    pub tenant: String,
    pub language: Option<String>,
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

impl Store {
    /// Claims up to `limit` admitted, unclaimed tasks for `owner`, oldest admission first, and
    /// starts a new attempt for each. They stay `Pending` until their backend places them.
    pub async fn claim(&self, owner: Uuid, limit: i64, lease: Duration) -> Result<Vec<ClaimedTask>> {
        Ok(sqlx::query_as(
            "update agenttask.tasks t set attempt = t.attempt + 1, lease_owner = $1, \
               lease_expires_at = now() + make_interval(secs => $3) \
             where t.task_id in (select task_id from agenttask.tasks \
               where phase = 'Pending' and lease_owner is null and cancel_requested_at is null \
               order by admitted_at limit $2 for update skip locked) \
             returning t.task_id, t.tenant, t.attempt, t.language, t.program, t.timeout_seconds, \
               t.cpu_millis, t.memory_bytes, t.isolation, t.labels, t.batch_id, t.priority",
        )
        .bind(owner)
        .bind(limit)
        .bind(lease.as_secs_f64())
        .fetch_all(&self.pool)
        .await?)
    }

    /// `Pending` → `Scheduled`: the backend placed the run.
    pub async fn mark_scheduled(&self, task_id: Uuid, attempt: i32, backend: &str) -> Result<bool> {
        let done = sqlx::query(
            "update agenttask.tasks set phase = 'Scheduled', backend = $3 \
             where task_id = $1 and attempt = $2 and phase = 'Pending'",
        )
        .bind(task_id)
        .bind(attempt)
        .bind(backend)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// → `Running`: the program started. Accepted from `Pending` too, for backends that see
    /// placement and start at once.
    pub async fn mark_running(&self, task_id: Uuid, attempt: i32, backend: &str, at: DateTime<Utc>) -> Result<bool> {
        let done = sqlx::query(
            "update agenttask.tasks set phase = 'Running', started_at = $3, backend = $4 \
             where task_id = $1 and attempt = $2 and phase in ('Pending', 'Scheduled')",
        )
        .bind(task_id)
        .bind(attempt)
        .bind(at)
        .bind(backend)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
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
        let (phase, reason) = outcome.phase_reason();
        let mut tx = self.pool.begin().await?;
        let row: Option<TaskRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "update agenttask.tasks set phase = $3, reason = $4, message = $5, exit_code = $6, \
               result = $7, stdout = $8, stderr = $9, stdout_truncated = $10, \
               stderr_truncated = $11, artifacts = $12, started_at = coalesce(started_at, $13), \
               finished_at = $14, backend = coalesce($15, backend), warm = $16, lease_owner = null, \
               lease_expires_at = null, program = null \
             where task_id = $1 and attempt = $2 and phase in {ACTIVE} \
             returning {ROW_COLUMNS}"
        )))
        .bind(task_id)
        .bind(attempt)
        .bind(phase.as_str())
        .bind(reason.map(|r| r.as_str()))
        .bind(storable_text(&outcome.message(timeout_seconds)))
        .bind(outcome.exit_code)
        .bind(outcome.stored_result().map(Json))
        .bind(&outcome.stdout.text)
        .bind(&outcome.stderr.text)
        .bind(outcome.stdout.truncated)
        .bind(outcome.stderr.truncated)
        .bind(Json(&outcome.artifacts))
        .bind(outcome.started_at)
        .bind(outcome.finished_at)
        .bind(backend)
        .bind(outcome.warm)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(false);
        };
        commit_with_result(tx, &row).await?;
        Ok(true)
    }

    /// Extends the leases of the runs `owner` watches right now (not of everything it ever
    /// claimed: a claim whose reply was lost must be able to expire).
    pub async fn renew_leases(&self, owner: Uuid, task_ids: &[Uuid], lease: Duration) -> Result<u64> {
        Ok(sqlx::query(sqlx::AssertSqlSafe(format!(
            "update agenttask.tasks set lease_expires_at = now() + make_interval(secs => $2) \
             where lease_owner = $1 and task_id = any($3) and phase in {ACTIVE}"
        )))
        .bind(owner)
        .bind(lease.as_secs_f64())
        .bind(task_ids)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// The runs of `owner` whose task someone asked to cancel.
    pub async fn cancel_requested(&self, owner: Uuid) -> Result<Vec<(Uuid, i32)>> {
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "select task_id, attempt from agenttask.tasks \
             where lease_owner = $1 and cancel_requested_at is not null and phase in {ACTIVE}"
        )))
        .bind(owner)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Takes over the leases of runs that an earlier process launched, when they are still the
    /// task's current attempt. Returns those that are now `owner`'s.
    pub async fn adopt(&self, owner: Uuid, runs: &[(Uuid, i32)], lease: Duration) -> Result<Vec<AdoptedRun>> {
        let ids: Vec<Uuid> = runs.iter().map(|r| r.0).collect();
        let attempts: Vec<i32> = runs.iter().map(|r| r.1).collect();
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "update agenttask.tasks t set lease_owner = $1, \
               lease_expires_at = now() + make_interval(secs => $2) \
             from unnest($3::uuid[], $4::int[]) as r(task_id, attempt) \
             where t.task_id = r.task_id and t.attempt = r.attempt and t.phase in {ACTIVE} \
             returning t.task_id, t.attempt, t.tenant, t.language, t.timeout_seconds, t.isolation"
        )))
        .bind(owner)
        .bind(lease.as_secs_f64())
        .bind(&ids)
        .bind(&attempts)
        .fetch_all(&self.pool)
        .await?)
    }

    /// On a clean shutdown: hands `owner`'s unfinished runs back for another attempt, except
    /// those someone cancelled, which end `Cancelled`.
    pub async fn release(&self, owner: Uuid) -> Result<u64> {
        for (task_id, attempt) in self.cancel_requested(owner).await? {
            self.finish(task_id, attempt, None, &Outcome::cancelled(Utc::now()), 0).await?;
        }
        Ok(sqlx::query(sqlx::AssertSqlSafe(format!(
            "update agenttask.tasks set phase = 'Pending', lease_owner = null, lease_expires_at = null, \
               started_at = null \
             where lease_owner = $1 and phase in {ACTIVE}"
        )))
        .bind(owner)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// Runs whose executor vanished (lease expired): cancelled ones end `Cancelled`; the others
    /// run again while attempts remain, else fail. Returns how many were requeued and ended.
    pub async fn reap_expired(&self, max_attempts: i32) -> Result<(u64, u64)> {
        let requeued = sqlx::query(sqlx::AssertSqlSafe(format!(
            "update agenttask.tasks set phase = 'Pending', lease_owner = null, lease_expires_at = null, \
               started_at = null \
             where phase in {ACTIVE} and lease_expires_at < now() and attempt < $1 \
               and cancel_requested_at is null"
        )))
        .bind(max_attempts)
        .execute(&self.pool)
        .await?
        .rows_affected();
        // Whatever is still expired was cancelled or has used its attempts; `finish` is guarded
        // by the attempt, so two reapers cannot both end a task.
        let rows: Vec<(Uuid, i32, bool)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "select task_id, attempt, cancel_requested_at is not null from agenttask.tasks \
             where phase in {ACTIVE} and lease_expires_at < now()"
        )))
        .fetch_all(&self.pool)
        .await?;
        let mut ended = 0;
        for (task_id, attempt, cancelled) in rows {
            let now = Utc::now();
            let outcome = if cancelled {
                Outcome::cancelled(now)
            } else {
                Outcome::backend_error(
                    format!("the executor running this task stopped responding {attempt} times"),
                    now,
                )
            };
            if self.finish(task_id, attempt, None, &outcome, 0).await? {
                ended += 1;
            }
        }
        Ok((requeued, ended))
    }

    /// Cancels a task: at once when it has not started, else by asking its executor (which
    /// hears it through `agenttask_cancel` within milliseconds, or at its next lease renewal).
    pub async fn request_cancel(&self, task_id: Uuid) -> Result<CancelOutcome> {
        let mut tx = self.pool.begin().await?;
        let found: Option<(String, Option<Uuid>)> = sqlx::query_as(
            "select phase, lease_owner from agenttask.tasks where task_id = $1 for update",
        )
        .bind(task_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((phase, owner)) = found else {
            return Ok(CancelOutcome::NotFound);
        };
        let phase: Phase = phase.parse().map_err(|e: String| {
            super::StoreError::Corrupt(format!("task {task_id} has an unreadable phase: {e}"))
        })?;
        if phase.is_terminal() {
            return Ok(CancelOutcome::AlreadyFinished(phase));
        }
        if phase == Phase::Queued || (phase == Phase::Pending && owner.is_none()) {
            let row: TaskRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "update agenttask.tasks set phase = 'Cancelled', reason = 'Cancelled', \
                   message = 'cancelled before it ran', finished_at = now(), program = null \
                 where task_id = $1 returning {ROW_COLUMNS}"
            )))
            .bind(task_id)
            .fetch_one(&mut *tx)
            .await?;
            commit_with_result(tx, &row).await?;
            return Ok(CancelOutcome::Cancelled);
        }
        sqlx::query(
            "update agenttask.tasks set cancel_requested_at = coalesce(cancel_requested_at, now()) \
             where task_id = $1",
        )
        .bind(task_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("select pg_notify('agenttask_cancel', $1)")
            .bind(task_id.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(CancelOutcome::Requested)
    }

    /// The unfinished tasks of a batch, to cancel them one by one.
    /// Queued tasks come first: cancelling them before their running siblings means that a
    /// sibling's slot, freed by its stop, can never admit one of them meanwhile.
    pub async fn unfinished_in_batch(&self, tenant: &str, batch_id: &str) -> Result<Vec<Uuid>> {
        Ok(sqlx::query_scalar(
            "select task_id from agenttask.tasks where tenant = $1 and batch_id = $2 \
             and phase in ('Queued', 'Pending', 'Scheduled', 'Running') \
             order by phase = 'Queued' desc, submitted_at",
        )
        .bind(tenant)
        .bind(batch_id)
        .fetch_all(&self.pool)
        .await?)
    }
}
