//! Executions: claiming admitted tasks, the phases a backend reports, leases, cancellation and
//! the final write. The executor's half of the store.
//!
//! Every write names the attempt it belongs to (`where attempt = $n`), so an event of an older
//! run, or of an executor whose lease expired, can never move a task that a newer attempt owns.
//! A claimed task stays `Pending` (with a lease owner) until its backend reports it placed.
//!
//! Executors write progress marks and outcomes in batches ([`write_journal`]): one transaction
//! and three statements for any number of runs, each row guarded as a single write would be.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{Connection, PgConnection, PgExecutor};
use uuid::Uuid;

use super::tasks::{enqueue_results, queue_result_of, ReplyColumns, TaskRow};
use super::{Result, Store};
use crate::domain::outcome::Outcome;
use crate::domain::phase::{Phase, Reason};
use crate::domain::result::{storable_text, Artifact};
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

/// A run's progress as its backend reported it, before the run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// `Pending` → `Scheduled`: the backend placed the run.
    Scheduled,
    /// → `Running`: the program started. Accepted from `Pending` too, for backends that see
    /// placement and start at once.
    Running { at: DateTime<Utc> },
}

/// One run's progress, for [`write_journal`].
#[derive(Debug, Clone, Copy)]
pub struct MarkWrite<'a> {
    pub task_id: Uuid,
    pub attempt: i32,
    pub backend: &'a str,
    pub mark: Mark,
}

/// How one run ended, for [`write_journal`].
#[derive(Debug, Clone, Copy)]
pub struct FinishWrite<'a> {
    pub task_id: Uuid,
    pub attempt: i32,
    /// Recorded as the task's `backend` (kept as it is when `None`).
    pub backend: Option<&'a str>,
    pub outcome: &'a Outcome,
    /// For the message of a run that timed out.
    pub timeout_seconds: u32,
    /// When a `Running` mark of this run was folded into this write instead of being written
    /// first: its time, which is what the task's `started_at` would have been.
    pub running_at: Option<DateTime<Utc>>,
}

/// Which writes of a [`write_journal`] batch moved their task, in the order given. A write that
/// did not is a stale one: its attempt no longer owns the task, or the task has moved past it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JournalWritten {
    pub marked: Vec<bool>,
    pub finished: Vec<bool>,
}

/// Writes a batch of the executor's runs in one transaction on `conn`: every progress mark in one
/// statement, every final write in another (which returns the finished rows), and the results of
/// those rows in a third, so that each finished task's one result commits with its transition.
///
/// Each write is guarded exactly as a single one would be: by the attempt, and by the phases it
/// may move from. A batch must hold at most one write per run (the executor's journal folds a
/// run's marks into its finish); two attempts of one task may share a batch, since only the
/// current one matches.
///
/// # Errors
/// Any failed statement fails the whole batch and nothing of it is written. When Postgres refuses
/// a value ([`super::StoreError::is_bad_value`]), writing the batch's entries one by one finds
/// the culprit.
pub async fn write_journal(
    conn: &mut PgConnection,
    marks: &[MarkWrite<'_>],
    finishes: &[FinishWrite<'_>],
) -> Result<JournalWritten> {
    let mut tx = conn.begin().await?;
    let marked = if marks.is_empty() { Vec::new() } else { write_marks(&mut tx, marks).await? };
    let finished = if finishes.is_empty() { Vec::new() } else { write_finishes(&mut tx, finishes).await? };
    tx.commit().await?;
    Ok(JournalWritten { marked, finished })
}

/// The marks of [`write_journal`], in one statement.
async fn write_marks(conn: &mut PgConnection, marks: &[MarkWrite<'_>]) -> Result<Vec<bool>> {
    let ids: Vec<Uuid> = marks.iter().map(|m| m.task_id).collect();
    let attempts: Vec<i32> = marks.iter().map(|m| m.attempt).collect();
    let backends: Vec<&str> = marks.iter().map(|m| m.backend).collect();
    let phases: Vec<Phase> = marks
        .iter()
        .map(|m| match m.mark {
            Mark::Scheduled => Phase::Scheduled,
            Mark::Running { .. } => Phase::Running,
        })
        .collect();
    let at: Vec<Option<DateTime<Utc>>> = marks
        .iter()
        .map(|m| match m.mark {
            Mark::Scheduled => None,
            Mark::Running { at } => Some(at),
        })
        .collect();
    let moved = sqlx::query!(
        "update agenttask.tasks t set phase = m.phase, backend = m.backend, \
           started_at = case when m.phase = $6 then m.at else t.started_at end \
         from unnest($1::uuid[], $2::int[], $3::text[], $4::text[], $5::timestamptz[]) \
           as m(task_id, attempt, backend, phase, at) \
         where t.task_id = m.task_id and t.attempt = m.attempt \
           and (t.phase = $7 or (m.phase = $6 and t.phase = $8)) \
         returning t.task_id, t.attempt",
        &ids,
        &attempts,
        &backends as _,
        &phases as _,
        &at as _,
        Phase::Running as _,
        Phase::Pending as _,
        Phase::Scheduled as _
    )
    .fetch_all(&mut *conn)
    .await?;
    let moved: std::collections::HashSet<(Uuid, i32)> = moved.into_iter().map(|r| (r.task_id, r.attempt)).collect();
    Ok(marks.iter().map(|m| moved.contains(&(m.task_id, m.attempt))).collect())
}

/// The final writes of [`write_journal`]: one statement ends the tasks and returns their rows,
/// a second queues their results (none for tasks applied as Kubernetes objects, whose status
/// is their answer).
async fn write_finishes(conn: &mut PgConnection, finishes: &[FinishWrite<'_>]) -> Result<Vec<bool>> {
    let n = finishes.len();
    let mut ids = Vec::with_capacity(n);
    let mut attempts = Vec::with_capacity(n);
    let mut phases = Vec::with_capacity(n);
    let mut reasons = Vec::with_capacity(n);
    let mut messages = Vec::with_capacity(n);
    let mut exit_codes = Vec::with_capacity(n);
    let mut program_results = Vec::with_capacity(n);
    let mut stdouts = Vec::with_capacity(n);
    let mut stderrs = Vec::with_capacity(n);
    let mut stdout_truncated = Vec::with_capacity(n);
    let mut stderr_truncated = Vec::with_capacity(n);
    let mut artifacts = Vec::with_capacity(n);
    let mut started_at = Vec::with_capacity(n);
    let mut finished_at = Vec::with_capacity(n);
    let mut backends = Vec::with_capacity(n);
    let mut warm = Vec::with_capacity(n);
    for f in finishes {
        let o = f.outcome;
        let (phase, reason) = o.phase_reason();
        ids.push(f.task_id);
        attempts.push(f.attempt);
        phases.push(phase);
        reasons.push(reason);
        messages.push(storable_text(&o.message(f.timeout_seconds)).into_owned());
        exit_codes.push(o.exit_code);
        program_results.push(o.stored_result().map(Json));
        stdouts.push(o.stdout.text.as_str());
        stderrs.push(o.stderr.text.as_str());
        stdout_truncated.push(o.stdout.truncated);
        stderr_truncated.push(o.stderr.truncated);
        artifacts.push(Json(&o.artifacts));
        started_at.push(f.running_at.unwrap_or(o.started_at));
        finished_at.push(o.finished_at);
        backends.push(f.backend);
        warm.push(o.warm);
    }
    let rows = sqlx::query!(
        r#"update agenttask.tasks t set phase = f.phase, reason = f.reason, message = f.message,
             exit_code = f.exit_code, result = f.result, stdout = f.stdout, stderr = f.stderr,
             stdout_truncated = f.stdout_truncated, stderr_truncated = f.stderr_truncated,
             artifacts = f.artifacts, started_at = coalesce(t.started_at, f.started_at),
             finished_at = f.finished_at, backend = coalesce(f.backend, t.backend), lease_owner = null,
             lease_expires_at = null, program = null, warm = f.warm
           from unnest($1::uuid[], $2::int[], $3::text[], $4::text[], $5::text[], $6::int[], $7::jsonb[],
                       $8::text[], $9::text[], $10::bool[], $11::bool[], $12::jsonb[], $13::timestamptz[],
                       $14::timestamptz[], $15::text[], $16::bool[])
             as f(task_id, attempt, phase, reason, message, exit_code, result, stdout, stderr,
                  stdout_truncated, stderr_truncated, artifacts, started_at, finished_at, backend, warm)
           where t.task_id = f.task_id and t.attempt = f.attempt and t.phase = any(agenttask.active_phases())
           returning t.task_id, t.tenant, t.client_id, t.batch_id, t.language as "language: Language",
             t.phase as "phase: Phase", t.reason as "reason: Reason", t.message, t.priority,
             t.timeout_seconds, t.cpu_millis, t.memory_bytes, t.isolation,
             t.labels as "labels: Json<serde_json::Value>", t.exit_code,
             t.result as "result: Json<serde_json::Value>", t.stdout, t.stderr, t.stdout_truncated,
             t.stderr_truncated, t.artifacts as "artifacts: Json<Vec<Artifact>>", t.backend, t.attempt,
             t.submitted_at, t.admitted_at, t.started_at, t.finished_at, t.outputs_removed_at, t.warm,
             t.reply_exchange, t.reply_routing_key, t.correlation_id, t.kube_object"#,
        &ids,
        &attempts,
        &phases as _,
        &reasons as _,
        &messages,
        &exit_codes as _,
        &program_results as _,
        &stdouts as _,
        &stderrs as _,
        &stdout_truncated,
        &stderr_truncated,
        &artifacts as _,
        &started_at,
        &finished_at,
        &backends as _,
        &warm as _
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut moved = std::collections::HashSet::with_capacity(rows.len());
    let mut results = Vec::with_capacity(rows.len());
    for r in rows {
        moved.insert((r.task_id, r.attempt));
        if r.kube_object.is_some() {
            // Applied as an AgentTask: its status is its answer; there is no reply queue.
            continue;
        }
        let route = ReplyColumns {
            reply_exchange: r.reply_exchange,
            reply_routing_key: r.reply_routing_key,
            correlation_id: r.correlation_id,
        };
        let row = TaskRow {
            task_id: r.task_id,
            tenant: r.tenant,
            client_id: r.client_id,
            batch_id: r.batch_id,
            language: r.language,
            phase: r.phase,
            reason: r.reason,
            message: r.message,
            priority: r.priority,
            timeout_seconds: r.timeout_seconds,
            cpu_millis: r.cpu_millis,
            memory_bytes: r.memory_bytes,
            isolation: r.isolation,
            labels: r.labels,
            exit_code: r.exit_code,
            result: r.result,
            stdout: r.stdout,
            stderr: r.stderr,
            stdout_truncated: r.stdout_truncated,
            stderr_truncated: r.stderr_truncated,
            artifacts: r.artifacts,
            backend: r.backend,
            attempt: r.attempt,
            submitted_at: r.submitted_at,
            admitted_at: r.admitted_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
            outputs_removed_at: r.outputs_removed_at,
            warm: r.warm,
        };
        results.push((row.to_result(), route));
    }
    enqueue_results(&mut *conn, &results).await?;
    Ok(finishes.iter().map(|f| moved.contains(&(f.task_id, f.attempt))).collect())
}

/// Ends attempt `attempt` of `task_id` with `outcome` and queues its one result, in a transaction
/// on `conn` (a savepoint when `conn` is already in one). False when the attempt no longer owns
/// an active task (a newer attempt, a reaper or a cancel got there first).
pub async fn finish(
    conn: &mut PgConnection,
    task_id: Uuid,
    attempt: i32,
    backend: Option<&str>,
    outcome: &Outcome,
    timeout_seconds: u32,
) -> Result<bool> {
    let write = FinishWrite { task_id, attempt, backend, outcome, timeout_seconds, running_at: None };
    Ok(write_journal(conn, &[], &[write]).await?.finished == [true])
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

    /// Writes a batch of runs' marks and outcomes in one transaction; see [`write_journal`].
    pub async fn write_journal(&self, marks: &[MarkWrite<'_>], finishes: &[FinishWrite<'_>]) -> Result<JournalWritten> {
        write_journal(&mut *self.pool.acquire().await?, marks, finishes).await
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
