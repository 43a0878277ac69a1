//! Tasks: idempotent inserts and guarded transitions.
//!
//! Every transition names the phase it expects (`where phase = ...`) and, for executions, the
//! attempt it belongs to, so a stale executor or a second scheduler cannot move a task twice.

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::{Result, Store};
use crate::domain::phase::{Phase, Reason};
use crate::domain::result::{millis_between, storable_text, Artifact, ResultMessage};
use crate::domain::task::{Language, Program, TaskSpec};
use crate::domain::validate::ReplyRoute;

/// A validated task to insert as `Queued`.
pub struct NewTask<'a> {
    pub tenant: &'a str,
    pub client_id: Option<&'a str>,
    pub spec: &'a TaskSpec,
    pub reply: &'a ReplyRoute,
    pub correlation_id: Option<&'a str>,
    /// When ingest received it; orders the tenant's queue.
    pub submitted_at: DateTime<Utc>,
}

/// A refused message, stored as a `Rejected` task so it stays queryable and idempotent.
pub struct NewRejection<'a> {
    pub tenant: &'a str,
    pub client_id: Option<&'a str>,
    pub batch_id: Option<&'a str>,
    pub language: Option<Language>,
    pub reason: Reason,
    pub message: &'a str,
    pub reply: &'a ReplyRoute,
    pub correlation_id: Option<&'a str>,
}

/// What an insert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// A new task with this id.
    New(Uuid),
    /// The `(tenant, client_id)` already existed: nothing was written.
    Duplicate,
}

/// A task handed to an executor.
#[derive(Debug, Clone)]
pub struct ClaimedTask {
    pub task_id: Uuid,
    pub tenant: String,
    pub attempt: i32,
    pub language: Language,
    pub program: Program,
    pub timeout_seconds: u32,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
}

/// A finished execution, as the executor reports it.
#[derive(Debug, Clone)]
pub struct FinishedRun {
    pub phase: Phase,
    pub reason: Option<Reason>,
    pub message: String,
    pub exit_code: Option<i32>,
    pub result: Option<serde_json::Value>,
    pub stdout: String,
    pub stderr: String,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub artifacts: Vec<Artifact>,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
}

/// A task as stored, for `agentctl get` and for shaping results.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct TaskRow {
    pub task_id: Uuid,
    pub tenant: String,
    pub client_id: Option<String>,
    pub batch_id: Option<String>,
    pub language: Option<String>,
    pub phase: String,
    pub reason: Option<String>,
    pub message: Option<String>,
    pub priority: i16,
    pub timeout_seconds: Option<i32>,
    pub cpu_millis: Option<i64>,
    pub memory_bytes: Option<i64>,
    pub isolation: String,
    pub labels: Json<serde_json::Value>,
    pub exit_code: Option<i32>,
    pub result: Option<Json<serde_json::Value>>,
    pub stdout: Option<String>,
    pub stderr: Option<String>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub artifacts: Json<Vec<Artifact>>,
    pub backend: Option<String>,
    pub attempt: i32,
    pub submitted_at: DateTime<Utc>,
    pub admitted_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

const ROW_COLUMNS: &str = "task_id, tenant, client_id, batch_id, language, phase, reason, message, \
    priority, timeout_seconds, cpu_millis, memory_bytes, isolation, labels, exit_code, result, \
    stdout, stderr, stdout_truncated, stderr_truncated, artifacts, backend, attempt, \
    submitted_at, admitted_at, started_at, finished_at";

impl TaskRow {
    /// The contract's result message for this task.
    pub fn to_result(&self) -> ResultMessage {
        ResultMessage {
            task_id: self.task_id,
            id: self.client_id.clone(),
            tenant: self.tenant.clone(),
            batch_id: self.batch_id.clone(),
            phase: self.phase.parse().unwrap_or(Phase::Failed),
            reason: self.reason.as_deref().and_then(|r| r.parse().ok()),
            message: self.message.clone(),
            exit_code: self.exit_code,
            result: self.result.as_ref().map(|j| j.0.clone()),
            stdout: self.stdout.clone().unwrap_or_default(),
            stderr: self.stderr.clone().unwrap_or_default(),
            stdout_truncated: self.stdout_truncated,
            stderr_truncated: self.stderr_truncated,
            artifacts: self.artifacts.0.clone(),
            backend: self.backend.clone(),
            submitted_at: self.submitted_at,
            admitted_at: self.admitted_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
            queue_wait_ms: millis_between(Some(self.submitted_at), self.admitted_at),
            duration_ms: millis_between(self.started_at, self.finished_at),
        }
    }
}

/// Routing of a task's result, kept with the task.
#[derive(sqlx::FromRow)]
struct ReplyColumns {
    reply_exchange: String,
    reply_routing_key: String,
    correlation_id: Option<String>,
}

impl Store {
    /// Inserts a validated task as `Queued`, unless `(tenant, client_id)` exists.
    ///
    /// With `replace_rejected` (a fresh publish, not a broker redelivery), an earlier *rejection*
    /// under the same key gives way: the client fixed its message and tries again.
    pub async fn insert_task(&self, t: &NewTask<'_>, replace_rejected: bool) -> Result<Inserted> {
        let task_id = Uuid::new_v4();
        let spec = t.spec;
        let mut tx = self.pool.begin().await?;
        if replace_rejected {
            forget_rejection(&mut tx, t.tenant, t.client_id).await?;
        }
        let inserted: Option<Uuid> = sqlx::query_scalar(
            "insert into agenttask.tasks (task_id, tenant, client_id, batch_id, language, phase, \
               priority, timeout_seconds, cpu_millis, memory_bytes, isolation, labels, program, \
               reply_exchange, reply_routing_key, correlation_id, submitted_at) \
             values ($1, $2, $3, $4, $5, 'Queued', $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) \
             on conflict (tenant, client_id) where client_id is not null do nothing \
             returning task_id",
        )
        .bind(task_id)
        .bind(t.tenant)
        .bind(t.client_id)
        .bind(spec.batch_id.as_deref())
        .bind(spec.language.as_str())
        .bind(spec.priority)
        .bind(spec.timeout_seconds as i32)
        .bind(spec.cpu_millis as i64)
        .bind(spec.memory_bytes as i64)
        .bind(&spec.isolation)
        .bind(Json(&spec.labels))
        .bind(Json(&spec.program))
        .bind(&t.reply.exchange)
        .bind(&t.reply.routing_key)
        .bind(t.correlation_id.map(storable_text))
        .bind(t.submitted_at)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(inserted.map_or(Inserted::Duplicate, Inserted::New))
    }

    /// Stores a rejection and its result message in one transaction, unless the client key was
    /// seen before (then the earlier task's result stands, and nothing is sent twice). With
    /// `replace_rejected`, an earlier rejection under the key is replaced (a fresh publish gets
    /// its own answer).
    pub async fn insert_rejection(&self, r: &NewRejection<'_>, replace_rejected: bool) -> Result<Inserted> {
        let mut tx = self.pool.begin().await?;
        if replace_rejected {
            forget_rejection(&mut tx, r.tenant, r.client_id).await?;
        }
        let task_id = Uuid::new_v4();
        let row: Option<TaskRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "insert into agenttask.tasks (task_id, tenant, client_id, batch_id, language, phase, \
               reason, message, reply_exchange, reply_routing_key, correlation_id, finished_at) \
             values ($1, $2, $3, $4, $5, 'Rejected', $6, $7, $8, $9, $10, now()) \
             on conflict (tenant, client_id) where client_id is not null do nothing \
             returning {ROW_COLUMNS}"
        )))
        .bind(task_id)
        .bind(r.tenant)
        .bind(r.client_id)
        .bind(r.batch_id)
        .bind(r.language.map(Language::as_str))
        .bind(r.reason.as_str())
        .bind(storable_text(r.message))
        .bind(&r.reply.exchange)
        .bind(&r.reply.routing_key)
        .bind(r.correlation_id.map(storable_text))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(Inserted::Duplicate);
        };
        let route = ReplyColumns {
            reply_exchange: r.reply.exchange.clone(),
            reply_routing_key: r.reply.routing_key.clone(),
            correlation_id: r.correlation_id.map(|c| storable_text(c).into_owned()),
        };
        enqueue_result(&mut tx, &row.to_result(), &route).await?;
        tx.commit().await?;
        Ok(Inserted::New(task_id))
    }

    /// Queues a result for a message that has no tenant row to hang on (unknown tenant).
    pub async fn enqueue_orphan_result(
        &self,
        result: &ResultMessage,
        reply: &ReplyRoute,
        correlation_id: Option<&str>,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let route = ReplyColumns {
            reply_exchange: reply.exchange.clone(),
            reply_routing_key: reply.routing_key.clone(),
            correlation_id: correlation_id.map(|c| storable_text(c).into_owned()),
        };
        enqueue_result(&mut tx, result, &route).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn get_task(&self, task_id: Uuid) -> Result<Option<TaskRow>> {
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "select {ROW_COLUMNS} from agenttask.tasks where task_id = $1"
        )))
        .bind(task_id)
        .fetch_optional(&self.pool)
        .await?)
    }

    pub async fn find_task(&self, tenant: &str, client_id: &str) -> Result<Option<TaskRow>> {
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "select {ROW_COLUMNS} from agenttask.tasks where tenant = $1 and client_id = $2"
        )))
        .bind(tenant)
        .bind(client_id)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Claims up to `limit` admitted tasks for an executor, oldest admission first. The lease
    /// lets another executor take them over if this one dies.
    pub async fn claim_pending(
        &self,
        owner: Uuid,
        backend: &str,
        limit: i64,
        lease: std::time::Duration,
    ) -> Result<Vec<ClaimedTask>> {
        #[derive(sqlx::FromRow)]
        struct Row {
            task_id: Uuid,
            tenant: String,
            attempt: i32,
            language: Option<String>,
            program: Option<Json<Program>>,
            timeout_seconds: Option<i32>,
            cpu_millis: Option<i64>,
            memory_bytes: Option<i64>,
        }
        let rows: Vec<Row> = sqlx::query_as(
            "update agenttask.tasks t set phase = 'Scheduled', attempt = t.attempt + 1, \
               lease_owner = $1, lease_expires_at = now() + make_interval(secs => $4), backend = $2 \
             where t.task_id in (select task_id from agenttask.tasks where phase = 'Pending' \
               order by admitted_at limit $3 for update skip locked) \
             returning t.task_id, t.tenant, t.attempt, t.language, t.program, t.timeout_seconds, \
               t.cpu_millis, t.memory_bytes",
        )
        .bind(owner)
        .bind(backend)
        .bind(limit)
        .bind(lease.as_secs_f64())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| ClaimedTask {
                task_id: r.task_id,
                tenant: r.tenant,
                attempt: r.attempt,
                language: r.language.as_deref().and_then(|l| l.parse().ok()).unwrap_or(Language::Python),
                program: r.program.map(|p| p.0).unwrap_or_default(),
                timeout_seconds: r.timeout_seconds.unwrap_or(1).max(1) as u32,
                cpu_millis: r.cpu_millis.unwrap_or(0).max(0) as u64,
                memory_bytes: r.memory_bytes.unwrap_or(0).max(0) as u64,
            })
            .collect())
    }

    /// `Scheduled` → `Running` when the process has started.
    pub async fn mark_running(&self, task_id: Uuid, attempt: i32, at: DateTime<Utc>) -> Result<bool> {
        let done = sqlx::query(
            "update agenttask.tasks set phase = 'Running', started_at = $3 \
             where task_id = $1 and attempt = $2 and phase = 'Scheduled'",
        )
        .bind(task_id)
        .bind(attempt)
        .bind(at)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Extends the leases of the tasks `owner` is running right now (not of everything it ever
    /// claimed: a claim whose reply was lost must be able to expire).
    pub async fn renew_leases(&self, owner: Uuid, running: &[Uuid], lease: std::time::Duration) -> Result<u64> {
        Ok(sqlx::query(
            "update agenttask.tasks set lease_expires_at = now() + make_interval(secs => $2) \
             where lease_owner = $1 and task_id = any($3) and phase in ('Scheduled', 'Running')",
        )
        .bind(owner)
        .bind(lease.as_secs_f64())
        .bind(running)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// On a clean shutdown: hands `owner`'s unfinished tasks back for another run.
    pub async fn release(&self, owner: Uuid) -> Result<u64> {
        Ok(sqlx::query(
            "update agenttask.tasks set phase = 'Pending', lease_owner = null, lease_expires_at = null, \
               started_at = null \
             where lease_owner = $1 and phase in ('Scheduled', 'Running')",
        )
        .bind(owner)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// Tasks whose executor vanished (lease expired): run again while attempts remain, else fail.
    /// Returns how many were requeued and failed.
    pub async fn reap_expired(&self, max_attempts: i32) -> Result<(u64, u64)> {
        let requeued = sqlx::query(
            "update agenttask.tasks set phase = 'Pending', lease_owner = null, lease_expires_at = null, \
               started_at = null \
             where phase in ('Scheduled', 'Running') and lease_expires_at < now() and attempt < $1",
        )
        .bind(max_attempts)
        .execute(&self.pool)
        .await?
        .rows_affected();
        // Whatever is still expired has used its attempts; `finish` is guarded by the attempt,
        // so two reapers cannot both fail a task.
        let rows: Vec<(Uuid, i32)> = sqlx::query_as(
            "select task_id, attempt from agenttask.tasks \
             where phase in ('Scheduled', 'Running') and lease_expires_at < now()",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut failed = 0;
        for (task_id, attempt) in rows {
            let now = Utc::now();
            let run = FinishedRun {
                phase: Phase::Failed,
                reason: Some(Reason::BackendError),
                message: format!("the executor running this task stopped responding {attempt} times"),
                exit_code: None,
                result: None,
                stdout: String::new(),
                stderr: String::new(),
                stdout_truncated: false,
                stderr_truncated: false,
                artifacts: Vec::new(),
                started_at: now,
                finished_at: now,
            };
            if self.finish(task_id, attempt, &run).await? {
                failed += 1;
            }
        }
        Ok((requeued, failed))
    }

    /// Records a finished execution and queues its result, in one transaction. Returns false when
    /// the task was no longer this attempt's to finish (a stale executor).
    pub async fn finish(&self, task_id: Uuid, attempt: i32, run: &FinishedRun) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let row: Option<TaskRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "update agenttask.tasks set phase = $3, reason = $4, message = $5, exit_code = $6, \
               result = $7, stdout = $8, stderr = $9, stdout_truncated = $10, \
               stderr_truncated = $11, artifacts = $12, started_at = coalesce(started_at, $13), \
               finished_at = $14, lease_owner = null, lease_expires_at = null, program = null \
             where task_id = $1 and attempt = $2 and phase in ('Scheduled', 'Running') \
             returning {ROW_COLUMNS}"
        )))
        .bind(task_id)
        .bind(attempt)
        .bind(run.phase.as_str())
        .bind(run.reason.map(Reason::as_str))
        .bind(storable_text(&run.message))
        .bind(run.exit_code)
        .bind(run.result.as_ref().map(Json))
        .bind(&run.stdout)
        .bind(&run.stderr)
        .bind(run.stdout_truncated)
        .bind(run.stderr_truncated)
        .bind(Json(&run.artifacts))
        .bind(run.started_at)
        .bind(run.finished_at)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(false);
        };
        commit_with_result(tx, &row).await?;
        Ok(true)
    }

    /// Mirrors the configured tenants for the SQL views.
    pub async fn sync_tenants(&self, tenants: &crate::domain::tenant::Tenants) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let names: Vec<String> = tenants.keys().map(|t| t.as_str().to_owned()).collect();
        sqlx::query("delete from agenttask.tenants where not (name = any($1))")
            .bind(&names)
            .execute(&mut *tx)
            .await?;
        let weights: Vec<i32> = tenants.values().map(|p| p.weight as i32).collect();
        let concurrency: Vec<i32> = tenants.values().map(|p| p.max_concurrency as i32).collect();
        let policies: Vec<Json<&crate::domain::tenant::TenantPolicy>> = tenants.values().map(Json).collect();
        sqlx::query(
            "insert into agenttask.tenants (name, weight, max_concurrency, policy, updated_at) \
             select *, now() from unnest($1::text[], $2::int[], $3::int[], $4::jsonb[]) \
             on conflict (name) do update set weight = excluded.weight, \
             max_concurrency = excluded.max_concurrency, policy = excluded.policy, updated_at = now()",
        )
        .bind(&names)
        .bind(&weights)
        .bind(&concurrency)
        .bind(&policies)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// Queues the result of a task that just became terminal in `tx`, and commits both together.
async fn commit_with_result(mut tx: Transaction<'static, Postgres>, row: &TaskRow) -> Result<()> {
    let route: ReplyColumns = sqlx::query_as(
        "select reply_exchange, reply_routing_key, correlation_id from agenttask.tasks where task_id = $1",
    )
    .bind(row.task_id)
    .fetch_one(&mut *tx)
    .await?;
    enqueue_result(&mut tx, &row.to_result(), &route).await?;
    tx.commit().await?;
    Ok(())
}

/// Removes a rejected task's claim on a client key (its result was already queued).
async fn forget_rejection(tx: &mut Transaction<'static, Postgres>, tenant: &str, client_id: Option<&str>) -> Result<()> {
    if let Some(key) = client_id {
        sqlx::query("delete from agenttask.tasks where tenant = $1 and client_id = $2 and phase = 'Rejected'")
            .bind(tenant)
            .bind(key)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

async fn enqueue_result(
    tx: &mut Transaction<'static, Postgres>,
    result: &ResultMessage,
    route: &ReplyColumns,
) -> Result<()> {
    let body = crate::domain::result::result_body(result);
    sqlx::query(
        "insert into agenttask.outbox (message_id, exchange, routing_key, correlation_id, phase, body) \
         values ($1, $2, $3, $4, $5, $6) on conflict (message_id) do nothing",
    )
    .bind(result.task_id)
    .bind(&route.reply_exchange)
    .bind(&route.reply_routing_key)
    .bind(&route.correlation_id)
    .bind(result.phase.as_str())
    .bind(body)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The scheduler leadership lock: only the session holding it admits, and it admits on that
/// very session, so a leader that lost its connection cannot commit another admission.
const LEADER_LOCK: i64 = 0x4147_454e_5454_534b; // "AGENTTSK"

/// Admitted work per tenant: what counts against quotas and capacity.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RunningUsage {
    pub tenant: String,
    pub tasks: i64,
    pub cpu_millis: i64,
    pub memory_bytes: i64,
}

/// A queued task as admission sees it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct QueuedHead {
    pub tenant: String,
    pub task_id: Uuid,
    pub cpu_millis: i64,
    pub memory_bytes: i64,
    pub submitted_at: DateTime<Utc>,
}

/// Waits until this session holds the scheduler leadership. Cancel-safe in the sense that
/// dropping the future and the connection gives the lock up.
pub async fn acquire_leadership(conn: &mut sqlx::PgConnection) -> Result<()> {
    sqlx::query("select pg_advisory_lock($1)").bind(LEADER_LOCK).execute(&mut *conn).await?;
    Ok(())
}

/// One admission decision, in a transaction on the leader's session.
pub struct AdmissionRound<'c> {
    tx: Transaction<'c, Postgres>,
}

impl<'c> AdmissionRound<'c> {
    pub async fn begin(conn: &'c mut sqlx::PgConnection) -> Result<AdmissionRound<'c>> {
        use sqlx::Connection;
        Ok(AdmissionRound { tx: conn.begin().await? })
    }

    /// Tasks holding capacity, per tenant.
    pub async fn running_usage(&mut self) -> Result<Vec<RunningUsage>> {
        Ok(sqlx::query_as(
            "select tenant, count(*) as tasks, coalesce(sum(cpu_millis), 0)::bigint as cpu_millis, \
               coalesce(sum(memory_bytes), 0)::bigint as memory_bytes from agenttask.tasks \
             where phase in ('Pending', 'Scheduled', 'Running') group by tenant",
        )
        .fetch_all(&mut *self.tx)
        .await?)
    }

    /// The first `limit` queued tasks of each of `tenants`, in admission order.
    pub async fn queued_heads(&mut self, tenants: &[String], limit: i32) -> Result<Vec<QueuedHead>> {
        Ok(sqlx::query_as(
            "select t.tenant, q.task_id, q.cpu_millis, q.memory_bytes, q.submitted_at \
             from unnest($1::text[]) as t(tenant) \
             cross join lateral (select task_id, priority, submitted_at, \
                 coalesce(cpu_millis, 0) as cpu_millis, coalesce(memory_bytes, 0) as memory_bytes \
               from agenttask.tasks where tenant = t.tenant and phase = 'Queued' \
               order by priority desc, submitted_at, task_id limit $2) q \
             order by t.tenant, q.priority desc, q.submitted_at, q.task_id",
        )
        .bind(tenants)
        .bind(limit)
        .fetch_all(&mut *self.tx)
        .await?)
    }

    /// `Queued` → `Pending` for these tasks; returns those that moved.
    pub async fn admit(&mut self, ids: &[Uuid]) -> Result<Vec<(Uuid, String, DateTime<Utc>)>> {
        Ok(sqlx::query_as(
            "update agenttask.tasks set phase = 'Pending', admitted_at = now() \
             where task_id = any($1) and phase = 'Queued' returning task_id, tenant, submitted_at",
        )
        .bind(ids)
        .fetch_all(&mut *self.tx)
        .await?)
    }

    pub async fn commit(self) -> Result<()> {
        self.tx.commit().await?;
        Ok(())
    }
}

impl Store {
    /// Refuses a queued task that can never be admitted (for example, larger than the whole
    /// service's capacity), with its result.
    pub async fn reject_queued(&self, task_id: Uuid, reason: Reason, message: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let row: Option<TaskRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "update agenttask.tasks set phase = 'Rejected', reason = $2, message = $3, \
               finished_at = now(), program = null \
             where task_id = $1 and phase = 'Queued' returning {ROW_COLUMNS}"
        )))
        .bind(task_id)
        .bind(reason.as_str())
        .bind(storable_text(message))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(false);
        };
        commit_with_result(tx, &row).await?;
        Ok(true)
    }

    /// Queued tasks of `tenant`, counting at most to `cap` (enough to enforce a backlog cap
    /// without scanning a huge queue).
    pub async fn queued_up_to(&self, tenant: &str, cap: i64) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "select count(*) from (select 1 from agenttask.tasks \
             where tenant = $1 and phase = 'Queued' limit $2) q",
        )
        .bind(tenant)
        .bind(cap)
        .fetch_one(&self.pool)
        .await?)
    }

    /// The configured tenants as stored (the shared truth across processes).
    pub async fn load_tenants(&self) -> Result<crate::domain::tenant::Tenants> {
        let rows: Vec<(String, Json<crate::domain::tenant::TenantPolicy>)> =
            sqlx::query_as("select name, policy from agenttask.tenants order by name")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(name, policy)| {
                crate::domain::tenant::TenantName::parse(&name).ok().map(|n| (n, policy.0))
            })
            .collect())
    }

    /// Queued and active counts per configured tenant, for gauges.
    pub async fn phase_counts(&self) -> Result<Vec<(String, i64, i64)>> {
        Ok(sqlx::query_as("select tenant, queued, running from agenttask.tenant_usage")
            .fetch_all(&self.pool)
            .await?)
    }
}

/// A queued task's place in its tenant's queue.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Position {
    pub task_id: Uuid,
    pub tenant: String,
    pub phase: String,
    /// 1 = next to be admitted for this tenant; null when not queued.
    pub position: Option<i64>,
    pub queued: i64,
    /// Tasks of this tenant admitted in the last five minutes, per second.
    pub admitted_per_second: f64,
    /// position ÷ admitted_per_second; null when unknown (nothing admitted recently).
    pub estimated_wait_seconds: Option<f64>,
}

/// A tenant's configuration and load, as `agentctl tenant list|get` shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TenantStatus {
    pub tenant: String,
    pub policy: crate::domain::tenant::TenantPolicy,
    pub queued: i64,
    pub running: i64,
    pub admitted_last_minute: i64,
}

impl Store {
    pub async fn position(&self, task_id: Uuid) -> Result<Option<Position>> {
        let row: Option<(String, String, i16, DateTime<Utc>)> = sqlx::query_as(
            "select tenant, phase, priority, submitted_at from agenttask.tasks where task_id = $1",
        )
        .bind(task_id)
        .fetch_optional(&self.pool)
        .await?;
        let Some((tenant, phase, priority, submitted_at)) = row else {
            return Ok(None);
        };
        let ahead: Option<i64> = if phase == "Queued" {
            Some(
                sqlx::query_scalar(
                    "select count(*) from agenttask.tasks where tenant = $1 and phase = 'Queued' \
                     and (priority > $2 or (priority = $2 and (submitted_at, task_id) < ($3, $4)))",
                )
                .bind(&tenant)
                .bind(priority)
                .bind(submitted_at)
                .bind(task_id)
                .fetch_one(&self.pool)
                .await?,
            )
        } else {
            None
        };
        let (queued, recent): (i64, i64) = sqlx::query_as(
            "select (select count(*) from agenttask.tasks where tenant = $1 and phase = 'Queued'), \
                    (select count(*) from agenttask.tasks where tenant = $1 \
                       and admitted_at > now() - interval '5 minutes')",
        )
        .bind(&tenant)
        .fetch_one(&self.pool)
        .await?;
        let rate = recent as f64 / 300.0;
        let position = ahead.map(|a| a + 1);
        Ok(Some(Position {
            task_id,
            tenant,
            phase,
            position,
            queued,
            admitted_per_second: rate,
            estimated_wait_seconds: position.filter(|_| rate > 0.0).map(|p| p as f64 / rate),
        }))
    }

    pub async fn tenant_statuses(&self) -> Result<Vec<TenantStatus>> {
        let rows: Vec<(String, Json<crate::domain::tenant::TenantPolicy>, i64, i64, i64)> = sqlx::query_as(
            "select u.tenant, t.policy, u.queued, u.running, u.admitted_last_minute \
             from agenttask.tenant_usage u join agenttask.tenants t on t.name = u.tenant order by u.tenant",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(tenant, policy, queued, running, admitted_last_minute)| TenantStatus {
                tenant,
                policy: policy.0,
                queued,
                running,
                admitted_last_minute,
            })
            .collect())
    }
}

