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
use crate::domain::task::{Language, TaskSpec};

/// Where a task's result is published: an exchange and a routing key (decided by `amqp::route`).
#[derive(Debug, Clone, Copy)]
pub struct ReplyTo<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
}

/// A validated task to insert as `Queued`.
pub struct NewTask<'a> {
    pub tenant: &'a str,
    pub client_id: Option<&'a str>,
    pub spec: &'a TaskSpec,
    pub reply: ReplyTo<'a>,
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
    pub reply: ReplyTo<'a>,
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
    /// Whether the run took a warm sandbox (see `Outcome::warm`).
    pub warm: Option<bool>,
}

pub(super) const ROW_COLUMNS: &str = "task_id, tenant, client_id, batch_id, language, phase, reason, message, \
    priority, timeout_seconds, cpu_millis, memory_bytes, isolation, labels, exit_code, result, \
    stdout, stderr, stdout_truncated, stderr_truncated, artifacts, backend, attempt, \
    submitted_at, admitted_at, started_at, finished_at, warm";

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
            warm: self.warm,
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
        .bind(t.reply.exchange)
        .bind(t.reply.routing_key)
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
        .bind(r.reply.exchange)
        .bind(r.reply.routing_key)
        .bind(r.correlation_id.map(storable_text))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(Inserted::Duplicate);
        };
        let route = ReplyColumns {
            reply_exchange: r.reply.exchange.to_owned(),
            reply_routing_key: r.reply.routing_key.to_owned(),
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
        reply: ReplyTo<'_>,
        correlation_id: Option<&str>,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let route = ReplyColumns {
            reply_exchange: reply.exchange.to_owned(),
            reply_routing_key: reply.routing_key.to_owned(),
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
pub(super) async fn commit_with_result(mut tx: Transaction<'static, Postgres>, row: &TaskRow) -> Result<()> {
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

