//! Ingest's half of the store: idempotent inserts of accepted and rejected messages, with the
//! exact `max_queued` check (a per-tenant counter kept by triggers, locked by the insert).
//!
//! The functions take a connection or a pool (`impl PgExecutor`, `&mut PgConnection`), so a
//! caller can put them inside its own transaction; the `Store` methods are the pool-backed
//! shorthands the service uses.

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{Connection, PgConnection, PgExecutor};
use uuid::Uuid;

use super::tasks::{enqueue_result, forget_rejection, queue_result_of, ReplyColumns, ReplyTo};
use super::{Result, Store};
use crate::domain::phase::{Phase, Reason};
use crate::domain::result::{storable_text, ResultMessage};
use crate::domain::task::{Language, TaskSpec};

/// A validated task to insert as `Queued`.
pub struct NewTask<'a> {
    pub tenant: &'a str,
    pub client_id: Option<&'a str>,
    pub spec: &'a TaskSpec,
    pub reply: ReplyTo<'a>,
    pub correlation_id: Option<&'a str>,
    /// When ingest received it; orders the tenant's queue.
    pub submitted_at: DateTime<Utc>,
    /// `namespace/name` of the AgentTask it was applied as, for a task that came from
    /// Kubernetes instead of RabbitMQ: it has no reply queue (`reply` is empty and unused).
    pub kube_object: Option<&'a str>,
    /// The tenant's `max_queued`: the task is not inserted when that many are queued already.
    pub max_queued: Option<u64>,
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
    /// As [`NewTask::kube_object`].
    pub kube_object: Option<&'a str>,
}

/// What an insert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// A new task with this id.
    New(Uuid),
    /// The `(tenant, client_id)` already existed: nothing was written.
    Duplicate,
}

/// The tenant already had `max_queued` tasks queued: nothing was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BacklogFull {
    pub queued: i64,
}

fn route_of(reply: ReplyTo<'_>, correlation_id: Option<&str>) -> ReplyColumns {
    ReplyColumns {
        reply_exchange: reply.exchange.to_owned(),
        reply_routing_key: reply.routing_key.to_owned(),
        correlation_id: correlation_id.map(|c| storable_text(c).into_owned()),
    }
}

/// Inserts a validated task as `Queued`, unless `(tenant, client_id)` exists.
///
/// With `replace_rejected` (a fresh publish, not a broker redelivery), an earlier *rejection*
/// under the same key gives way: the client fixed its message and tries again.
pub async fn insert_task(
    conn: &mut PgConnection,
    t: &NewTask<'_>,
    replace_rejected: bool,
) -> Result<Result<Inserted, BacklogFull>> {
    let spec = t.spec;
    let correlation_id = t.correlation_id.map(storable_text);
    let mut tx = conn.begin().await?;
    if let Some(cap) = t.max_queued {
        // The tenant's counter row is locked until commit: concurrent inserts of the tenant
        // take turns, so the cap holds exactly.
        sqlx::query!("insert into agenttask.queued_counts (tenant) values ($1) on conflict do nothing", t.tenant)
            .execute(&mut *tx)
            .await?;
        let queued =
            sqlx::query_scalar!("select queued from agenttask.queued_counts where tenant = $1 for update", t.tenant)
                .fetch_one(&mut *tx)
                .await?;
        if queued >= i64::try_from(cap).unwrap_or(i64::MAX) {
            return Ok(Err(BacklogFull { queued }));
        }
    }
    if replace_rejected {
        forget_rejection(&mut *tx, t.tenant, t.client_id).await?;
    }
    let inserted = sqlx::query_scalar!(
        "insert into agenttask.tasks (task_id, tenant, client_id, batch_id, language, phase, \
           priority, timeout_seconds, cpu_millis, memory_bytes, isolation, labels, program, \
           reply_exchange, reply_routing_key, correlation_id, submitted_at, kube_object) \
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18) \
         on conflict (tenant, client_id) where client_id is not null do nothing \
         returning task_id",
        Uuid::new_v4(),
        t.tenant,
        t.client_id,
        spec.batch_id.as_deref(),
        spec.language as _,
        Phase::Queued as _,
        spec.priority,
        spec.timeout_seconds as i32,
        spec.cpu_millis as i64,
        spec.memory_bytes as i64,
        spec.isolation,
        Json(&spec.labels) as _,
        Json(&spec.program) as _,
        t.reply.exchange,
        t.reply.routing_key,
        correlation_id.as_deref(),
        t.submitted_at,
        t.kube_object
    )
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Ok(inserted.map_or(Inserted::Duplicate, Inserted::New)))
}

/// Stores a rejection and its result message in one transaction, unless the client key was
/// seen before (then the earlier task's result stands, and nothing is sent twice). With
/// `replace_rejected`, an earlier rejection under the key is replaced (a fresh publish gets its
/// own answer).
pub async fn insert_rejection(
    conn: &mut PgConnection,
    r: &NewRejection<'_>,
    replace_rejected: bool,
) -> Result<Inserted> {
    let message = storable_text(r.message);
    let correlation_id = r.correlation_id.map(storable_text);
    let mut tx = conn.begin().await?;
    if replace_rejected {
        forget_rejection(&mut *tx, r.tenant, r.client_id).await?;
    }
    let inserted = sqlx::query_scalar!(
        "insert into agenttask.tasks (task_id, tenant, client_id, batch_id, language, phase, \
           reason, message, reply_exchange, reply_routing_key, correlation_id, kube_object, finished_at) \
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, now()) \
         on conflict (tenant, client_id) where client_id is not null do nothing \
         returning task_id",
        Uuid::new_v4(),
        r.tenant,
        r.client_id,
        r.batch_id,
        r.language as _,
        Phase::Rejected as _,
        r.reason as _,
        &*message,
        r.reply.exchange,
        r.reply.routing_key,
        correlation_id.as_deref(),
        r.kube_object
    )
    .fetch_optional(&mut *tx)
    .await?;
    let Some(task_id) = inserted else {
        return Ok(Inserted::Duplicate);
    };
    queue_result_of(&mut tx, task_id).await?;
    tx.commit().await?;
    Ok(Inserted::New(task_id))
}

/// Queues a result for a message that has no tenant row to hang on (unknown tenant).
pub async fn enqueue_orphan_result(
    conn: impl PgExecutor<'_>,
    result: &ResultMessage,
    reply: ReplyTo<'_>,
    correlation_id: Option<&str>,
) -> Result<()> {
    enqueue_result(conn, result, &route_of(reply, correlation_id)).await
}

impl Store {
    pub async fn insert_task(&self, t: &NewTask<'_>, replace_rejected: bool) -> Result<Result<Inserted, BacklogFull>> {
        insert_task(&mut *self.pool.acquire().await?, t, replace_rejected).await
    }

    pub async fn insert_rejection(&self, r: &NewRejection<'_>, replace_rejected: bool) -> Result<Inserted> {
        insert_rejection(&mut *self.pool.acquire().await?, r, replace_rejected).await
    }

    pub async fn enqueue_orphan_result(
        &self,
        result: &ResultMessage,
        reply: ReplyTo<'_>,
        correlation_id: Option<&str>,
    ) -> Result<()> {
        enqueue_orphan_result(&self.pool, result, reply, correlation_id).await
    }
}
