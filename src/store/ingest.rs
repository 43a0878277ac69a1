//! Ingest's half of the store: idempotent inserts of accepted and rejected messages, with the
//! exact `max_queued` check (per-tenant counters of tasks that entered and left the queue, kept
//! by triggers; the insert locks the entry counter, admissions write only the exit counter).
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

/// Inserts a validated task as `Queued`, unless `(tenant, client_id)` exists: [`insert_tasks`]
/// of one task.
///
/// With `replace_rejected` (a fresh publish, not a broker redelivery), an earlier *rejection*
/// under the same key gives way: the client fixed its message and tries again.
pub async fn insert_task(
    conn: &mut PgConnection,
    t: &NewTask<'_>,
    replace_rejected: bool,
) -> Result<Result<Inserted, BacklogFull>> {
    let mut answers = insert_tasks(conn, std::slice::from_ref(t), &[replace_rejected]).await?;
    Ok(answers.pop().expect("one answer per task"))
}

/// Inserts validated tasks as `Queued`, with the answers one-by-one inserts would give, in the
/// same order, in a few set-based statements: each tenant's entry counter is
/// locked once, and the tasks go in by one `insert ... select from unnest(...)` per round.
///
/// `replace_rejected[i]` is [`insert_task`]'s flag for `tasks[i]`. Runs in one savepoint: on a
/// value Postgres refuses, nothing of the set is written and the error is returned, so the
/// caller can fall back to inserting one by one and refuse only the bad one.
pub async fn insert_tasks(
    conn: &mut PgConnection,
    tasks: &[NewTask<'_>],
    replace_rejected: &[bool],
) -> Result<Vec<Result<Inserted, BacklogFull>>> {
    debug_assert_eq!(tasks.len(), replace_rejected.len());
    let mut tx = conn.begin().await?;

    // Entry counters first, in tenant order (the order every writer locks them in), so the caps
    // hold exactly: nothing else puts a capped tenant's task in its queue until commit.
    let caps: std::collections::BTreeMap<&str, i64> =
        tasks.iter().filter_map(|t| Some((t.tenant, i64::try_from(t.max_queued?).unwrap_or(i64::MAX)))).collect();
    // Each capped tenant's queued tasks, counted on as this set inserts them.
    let mut queued: std::collections::HashMap<&str, i64> = std::collections::HashMap::with_capacity(caps.len());
    if !caps.is_empty() {
        let capped: Vec<&str> = caps.keys().copied().collect();
        // An upsert that changes nothing still locks the row it finds, as `for update` would:
        // one statement creates and locks every entry counter, and the locks are held until
        // commit, so concurrent inserts of a tenant take turns and the cap holds exactly.
        let entries = sqlx::query!(
            "insert into agenttask.queue_entries as c (tenant) select * from unnest($1::text[]) order by 1 \
             on conflict (tenant) do update set entered = c.entered \
             returning tenant, entered",
            &capped as &[&str]
        )
        .fetch_all(&mut *tx)
        .await?;
        // Read after the locks are held (a later snapshot than the statement above, which may
        // have waited for them), so no exit committed before this transaction's turn is missed.
        // Exits are not locked: admissions go on meanwhile, and one committing right now only
        // makes this count one too high, as if the insert had come first.
        let exits: std::collections::HashMap<String, i64> = sqlx::query!(
            "select tenant, exited from agenttask.queue_exits where tenant = any($1::text[])",
            &capped as &[&str]
        )
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|x| (x.tenant, x.exited))
        .collect();
        for c in entries {
            if let Some((&tenant, _)) = caps.get_key_value(c.tenant.as_str()) {
                queued.insert(tenant, c.entered - exits.get(tenant).copied().unwrap_or(0));
            }
        }
    }
    // How many more of a tenant's tasks fit; `None` when it has no cap.
    let room = |queued: &std::collections::HashMap<&str, i64>, tenant: &str| {
        caps.get(tenant).map(|cap| cap.saturating_sub(queued.get(tenant).copied().unwrap_or(0)))
    };

    // A fresh publish's key gives way to an earlier rejection under it, before anything of
    // the set is inserted (a rejection is never `Queued`, so the counts above stand).
    let (forget_tenants, forget_keys): (Vec<&str>, Vec<&str>) = tasks
        .iter()
        .zip(replace_rejected)
        .filter(|(_, fresh)| **fresh)
        .filter_map(|(t, _)| Some((t.tenant, t.client_id?)))
        .unzip();
    if !forget_keys.is_empty() {
        sqlx::query!(
            "delete from agenttask.tasks t using unnest($1::text[], $2::text[]) as k(tenant, client_id) \
             where t.tenant = k.tenant and t.client_id = k.client_id and t.phase = $3",
            &forget_tenants as &[&str],
            &forget_keys as &[&str],
            Phase::Rejected as _
        )
        .execute(&mut *tx)
        .await?;
    }

    // Rounds: each takes, in order, as many of a tenant's waiting tasks as its backlog has room
    // for. A duplicate takes no room, so when a round holds one, the next round offers that
    // room to the tenant's next task, which is the answer one-by-one inserts would give.
    let mut answers: Vec<Option<Result<Inserted, BacklogFull>>> = vec![None; tasks.len()];
    let mut waiting: Vec<usize> = (0..tasks.len()).collect();
    loop {
        let mut offered: std::collections::HashMap<&str, i64> = std::collections::HashMap::new();
        let (round, rest): (Vec<usize>, Vec<usize>) = waiting.iter().partition(|&&i| {
            let tenant = tasks[i].tenant;
            let Some(left) = room(&queued, tenant) else { return true };
            let taken = offered.entry(tenant).or_default();
            *taken += 1;
            *taken <= left
        });
        if round.is_empty() {
            break;
        }
        let ids: Vec<Uuid> = round.iter().map(|_| Uuid::new_v4()).collect();
        let inserted = insert_round(&mut tx, tasks, &round, &ids).await?;
        let mut dropped = false;
        for (&i, id) in round.iter().zip(&ids) {
            if inserted.contains(id) {
                answers[i] = Some(Ok(Inserted::New(*id)));
                if let Some(n) = queued.get_mut(tasks[i].tenant) {
                    *n += 1;
                }
            } else {
                answers[i] = Some(Ok(Inserted::Duplicate));
                dropped = true;
            }
        }
        waiting = rest;
        if !dropped || waiting.is_empty() {
            break;
        }
    }
    tx.commit().await?;
    Ok(answers
        .into_iter()
        .zip(tasks)
        .map(|(answer, t)| {
            // Left waiting: its tenant's backlog was full.
            answer.unwrap_or_else(|| Err(BacklogFull { queued: queued.get(t.tenant).copied().unwrap_or_default() }))
        })
        .collect())
}

/// One `insert ... select from unnest(...)` of `tasks[round]` under `ids`; the ids that went in
/// (the others' keys existed).
async fn insert_round(
    conn: &mut PgConnection,
    tasks: &[NewTask<'_>],
    round: &[usize],
    ids: &[Uuid],
) -> Result<std::collections::HashSet<Uuid>> {
    let n = round.len();
    let mut tenants = Vec::with_capacity(n);
    let mut client_ids = Vec::with_capacity(n);
    let mut batch_ids = Vec::with_capacity(n);
    let mut languages = Vec::with_capacity(n);
    let mut priorities = Vec::with_capacity(n);
    let mut timeouts = Vec::with_capacity(n);
    let mut cpus = Vec::with_capacity(n);
    let mut memories = Vec::with_capacity(n);
    let mut isolations = Vec::with_capacity(n);
    let mut labels = Vec::with_capacity(n);
    let mut programs = Vec::with_capacity(n);
    let mut exchanges = Vec::with_capacity(n);
    let mut routing_keys = Vec::with_capacity(n);
    let mut correlation_ids = Vec::with_capacity(n);
    let mut submitted = Vec::with_capacity(n);
    let mut kube_objects = Vec::with_capacity(n);
    for &i in round {
        let t = &tasks[i];
        let spec = t.spec;
        tenants.push(t.tenant);
        client_ids.push(t.client_id);
        batch_ids.push(spec.batch_id.as_deref());
        languages.push(spec.language.as_str());
        priorities.push(spec.priority);
        timeouts.push(i32::try_from(spec.timeout_seconds).unwrap_or(i32::MAX));
        cpus.push(i64::try_from(spec.cpu_millis).unwrap_or(i64::MAX));
        memories.push(i64::try_from(spec.memory_bytes).unwrap_or(i64::MAX));
        isolations.push(spec.isolation.as_str());
        labels.push(Json(&spec.labels));
        programs.push(Json(&spec.program));
        exchanges.push(t.reply.exchange);
        routing_keys.push(t.reply.routing_key);
        correlation_ids.push(t.correlation_id.map(storable_text));
        submitted.push(t.submitted_at);
        kube_objects.push(t.kube_object);
    }
    let correlation_ids: Vec<Option<&str>> = correlation_ids.iter().map(|c| c.as_deref()).collect();
    let rows = sqlx::query_scalar!(
        "insert into agenttask.tasks (task_id, tenant, client_id, batch_id, language, phase, \
           priority, timeout_seconds, cpu_millis, memory_bytes, isolation, labels, program, \
           reply_exchange, reply_routing_key, correlation_id, submitted_at, kube_object) \
         select n.task_id, n.tenant, n.client_id, n.batch_id, n.language, $18, n.priority, n.timeout_seconds, \
           n.cpu_millis, n.memory_bytes, n.isolation, n.labels, n.program, n.reply_exchange, \
           n.reply_routing_key, n.correlation_id, n.submitted_at, n.kube_object \
         from unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::smallint[], $7::int[], \
                     $8::bigint[], $9::bigint[], $10::text[], $11::jsonb[], $12::jsonb[], $13::text[], \
                     $14::text[], $15::text[], $16::timestamptz[], $17::text[]) with ordinality \
           as n(task_id, tenant, client_id, batch_id, language, priority, timeout_seconds, cpu_millis, \
                memory_bytes, isolation, labels, program, reply_exchange, reply_routing_key, \
                correlation_id, submitted_at, kube_object, ord) \
         order by n.ord \
         on conflict (tenant, client_id) where client_id is not null do nothing \
         returning task_id",
        ids,
        &tenants as &[&str],
        &client_ids as &[Option<&str>],
        &batch_ids as &[Option<&str>],
        &languages as &[&str],
        &priorities,
        &timeouts,
        &cpus,
        &memories,
        &isolations as &[&str],
        &labels as _,
        &programs as _,
        &exchanges as &[&str],
        &routing_keys as &[&str],
        &correlation_ids as &[Option<&str>],
        &submitted,
        &kube_objects as &[Option<&str>],
        Phase::Queued as _
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().collect())
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
