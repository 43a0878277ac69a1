//! Ingest: consumes every tenant's task queue, validates, stores, and only then acks.
//!
//! A message is acked only once its task (or its rejection and result) is committed in Postgres,
//! so a crash at any point leads to a redelivery, and redeliveries are idempotent on
//! `(tenant, client id)`. Database outages are retried while the message is held; they never
//! drop a message and never stop the consumer.
//!
//! Writes are group-committed: every consumer hands its message's write to one of a few group
//! writers, always the same one for a tenant (so two writers never wait for each other's lock
//! on a tenant's backlog counter), and each writer commits whatever is waiting in one
//! transaction, its accepted tasks inserted as a set (one statement per run of them; one by one
//! only when Postgres refuses a value). A writer takes its waiting writes round-robin across
//! tenants ([`super::intake`]), so one tenant's flood does not delay another tenant's next
//! message by several commits.
//! A commit costs a WAL flush, so a group of a hundred costs about what one message did; each
//! message is still acked only after the commit that holds it.
//!
//! Each queue's consumer has its own channel (its own prefetch) on one of a few connections
//! shared by all queues ([`super::connections`]). At shutdown each consumer stops taking
//! deliveries, finishes those it holds (stored, then acked), and only then are the connections
//! closed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use super::connections::{Connections, CLOSE_WAIT, INGEST_CONNECTIONS};
use super::intake::{Intake, Shards};
use super::route::{reply_route, unrouted_reply_route, unrouted_task_id, ReplyRoute};
use super::{declare_exchanges, declare_tenant, prop, tasks_queue, AmqpError, TASKS_EXCHANGE, UNROUTED_QUEUE};
use crate::domain::phase::Reason;
use crate::domain::result::ResultMessage;
use crate::domain::tenant::TenantName;
use crate::domain::tenant::{TenantPolicy, Tenants};
use crate::domain::validate::{self, BackendIsolation, Envelope};
use crate::metrics::Metrics;
use crate::retry::Backoff;
use crate::store::{insert_rejection, insert_task, insert_tasks, Inserted, NewRejection, NewTask, Store, StoreError};
use sqlx::PgConnection;

/// What ingest needs, and nothing else.
pub struct Ingest {
    pub store: Store,
    pub metrics: Metrics,
    pub tenants: tokio::sync::watch::Receiver<Arc<Tenants>>,
    pub amqp_url: String,
    /// Unacknowledged messages per tenant queue.
    pub prefetch: u16,
    /// Which isolations the service's backend can run; others are refused at the door.
    pub isolation: BackendIsolation,
    /// Where each consumer says whether it is consuming (read by `/readyz`).
    pub readiness: Arc<crate::readiness::Readiness>,
    /// Where the group writers run (the service's supervisor tracker).
    pub tracker: tokio_util::task::TaskTracker,
}

/// The readiness part of the shared topology (exchanges, unrouted and dead-letter queues).
const TOPOLOGY_PART: &str = "rabbitmq topology";

/// How long a stopping consumer may take to finish the messages it holds (each stored, then
/// acked) before it lets go of them; well inside the supervisor's grace.
const DRAIN: Duration = Duration::from_secs(10);

/// Pause between declaring queues and consuming them: RabbitMQ 3.10 can answer a
/// `basic.consume` on a quorum queue created a moment ago by crashing the channel with an
/// internal error, which closes the whole connection (every queue sharing it).
const NEW_QUEUE_SETTLE: Duration = Duration::from_millis(500);

/// Registers ingest with `/readyz` as not ready yet. Called before [`run`] is spawned too, so
/// that no request between the HTTP endpoint's start and ingest's finds it ready.
pub fn starting(ctx: &Ingest) {
    ctx.readiness.down(TOPOLOGY_PART, "starting");
}

/// Runs until `shutdown`: one consumer per tenant queue (and one for unknown tenants), each on
/// its own channel over a few shared connections, started and stopped as tenants come and go.
/// Returns once every consumer has stopped and the connections are closed.
///
/// A message the AMQP client cannot parse at all drops the connection it arrives on, at every
/// redelivery, until the broker's delivery limit dead-letters it: the queues sharing that
/// connection (about one in [`INGEST_CONNECTIONS`]) pause and reconnect meanwhile; the others
/// are not affected.
pub async fn run(ctx: Arc<Ingest>, shutdown: CancellationToken) {
    let connections = Arc::new(Connections::new(ctx.amqp_url.clone(), INGEST_CONNECTIONS));
    let mut backoff = Backoff::reconnect();
    starting(&ctx);
    loop {
        let declared = tokio::select! {
            _ = shutdown.cancelled() => break,
            res = declare_shared(&connections) => res,
        };
        match declared {
            Ok(()) => {
                ctx.readiness.up(TOPOLOGY_PART);
                break;
            }
            Err(e) => {
                ctx.readiness.down(TOPOLOGY_PART, format!("cannot declare the AMQP topology: {e}"));
                tracing::warn!(error = %e, retry_in = ?backoff.peek(), "cannot declare the AMQP topology")
            }
        }
        if !backoff.wait(&shutdown).await {
            break;
        }
    }
    // The consumers' own tracker, so that the connections close only after the last of them.
    let consumers_running = tokio_util::task::TaskTracker::new();
    let writes = Arc::new(Shards::<Write>::new(GROUP_WRITERS, GROUP_QUEUE));
    for shard in 0..writes.len() {
        ctx.tracker.spawn(group_writer(ctx.clone(), writes.clone(), shard));
    }
    let mut tenants_rx = ctx.tenants.clone();
    let mut consumers: HashMap<Option<TenantName>, CancellationToken> = HashMap::new();
    while !shutdown.is_cancelled() {
        let current: Vec<TenantName> = tenants_rx.borrow_and_update().keys().cloned().collect();
        let wanted: HashSet<Option<TenantName>> =
            current.iter().cloned().map(Some).chain(std::iter::once(None)).collect();
        let new: Vec<TenantName> =
            current.iter().filter(|t| !consumers.contains_key(&Some((*t).clone()))).cloned().collect();
        // Not ready until each new queue is consumed: registered now, before anything awaits.
        for queue in wanted.iter().filter(|q| !consumers.contains_key(*q)) {
            ctx.readiness.down(&consumer_part(&queue_name(queue.as_ref())), "starting");
        }
        if !new.is_empty() {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                () = declare_up_front(&connections, &new) => {}
            }
        }
        for queue in &wanted {
            if !consumers.contains_key(queue) {
                let stop = shutdown.child_token();
                let name = queue_name(queue.as_ref());
                let part = consumer_part(&name);
                let consumer = consume_queue(
                    ctx.clone(),
                    connections.clone(),
                    writes.clone(),
                    (queue.clone(), name, part),
                    stop.clone(),
                );
                consumers_running.spawn(consumer);
                consumers.insert(queue.clone(), stop);
            }
        }
        let removed: Vec<Option<TenantName>> = consumers.keys().filter(|q| !wanted.contains(q)).cloned().collect();
        for queue in removed {
            if let Some(stop) = consumers.remove(&queue) {
                stop.cancel();
            }
            if let Some(tenant) = queue {
                consumers_running.spawn(unbind_removed(connections.clone(), tenant, shutdown.clone()));
            }
        }
        tracing::info!(tenants = current.len(), "ingest consuming");
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = tenants_rx.changed() => if changed.is_err() { break },
        }
    }
    for stop in consumers.values() {
        stop.cancel();
    }
    consumers_running.close();
    consumers_running.wait().await;
    // Every consumer has its answers: the group writers take what is left, then end.
    writes.close();
    connections.close().await;
}

fn queue_name(tenant: Option<&TenantName>) -> String {
    tenant.map_or_else(|| UNROUTED_QUEUE.to_owned(), tasks_queue)
}

/// The `/readyz` part of a queue's consumer.
fn consumer_part(queue: &str) -> String {
    format!("rabbitmq consumer of {queue}")
}

/// Why a consumer's channel ended; it opens a new one with backoff either way.
#[derive(Debug, thiserror::Error)]
enum ConsumerEnded {
    /// The connection could not be opened, or it or the channel failed.
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    /// The broker cancelled the consumer (the queue was deleted, or the node is shutting down).
    #[error("the broker cancelled the consumer")]
    Cancelled,
}

impl From<lapin::Error> for ConsumerEnded {
    fn from(e: lapin::Error) -> Self {
        ConsumerEnded::Amqp(e.into())
    }
}

async fn declare_shared(connections: &Connections) -> Result<(), AmqpError> {
    let ch = connections.channel(UNROUTED_QUEUE).await?;
    declare_exchanges(&ch).await?;
    let _ = ch.close(200, "topology declared".into()).await;
    Ok(())
}

/// Queue declarations in flight at once when declaring tenants' queues up front.
const DECLARE_CONCURRENCY: usize = 32;

/// Declares the task and results queues of `tenants` (new tenants, or all of them at start)
/// before their consumers start, then waits [`NEW_QUEUE_SETTLE`] so that no consumer's
/// `basic.consume` reaches a quorum queue created a moment ago. Best effort: a consumer whose
/// queue could not be declared here declares it itself.
async fn declare_up_front(connections: &Connections, tenants: &[TenantName]) {
    let declared: Vec<Result<(), AmqpError>> = futures_util::stream::iter(tenants.iter().cloned())
        .map(|t| async move {
            let ch = connections.channel(&tasks_queue(&t)).await?;
            declare_tenant(&ch, &t).await?;
            let _ = ch.close(200, "declared".into()).await;
            Ok(())
        })
        .buffer_unordered(DECLARE_CONCURRENCY)
        .collect()
        .await;
    if let Some(Err(e)) = declared.iter().find(|r| r.is_err()) {
        let failed = declared.iter().filter(|r| r.is_err()).count();
        tracing::debug!(failed, error = %e, "some tenant queues could not be declared up front; their consumers retry");
    }
    tokio::time::sleep(NEW_QUEUE_SETTLE).await;
}

/// A removed tenant's queue keeps what it holds, but new messages for that tenant go to the
/// alternate exchange and get an UnknownTenant result instead of waiting unanswered.
async fn unbind_removed(connections: Arc<Connections>, tenant: TenantName, shutdown: CancellationToken) {
    let queue = tasks_queue(&tenant);
    let unbind = async {
        let ch = connections.channel(&queue).await?;
        ch.queue_unbind(queue.as_str().into(), TASKS_EXCHANGE.into(), tenant.as_str().into(), FieldTable::default())
            .await?;
        let _ = ch.close(200, "unbound".into()).await;
        Ok::<(), AmqpError>(())
    };
    let res = tokio::select! {
        _ = shutdown.cancelled() => return,
        res = unbind => res,
    };
    match res {
        Ok(()) => tracing::info!(%tenant, "tenant removed; its task queue no longer receives messages"),
        Err(e) => tracing::warn!(%tenant, error = %e, "could not unbind a removed tenant's queue"),
    }
}

/// Keeps one queue consumed until `stop`, opening a new channel with backoff whenever it ends.
async fn consume_queue(
    ctx: Arc<Ingest>,
    connections: Arc<Connections>,
    writes: Arc<Shards<Write>>,
    (tenant, queue, part): (Option<TenantName>, String, String),
    stop: CancellationToken,
) {
    let mut backoff = Backoff::reconnect();
    while !stop.is_cancelled() {
        let started = std::time::Instant::now();
        let res = consume_once(&ctx, &connections, &writes, tenant.as_ref(), &queue, &part, &stop).await;
        // A session that lasted is not part of a failure streak.
        if started.elapsed() > Duration::from_secs(30) {
            backoff.reset();
        }
        if let Err(e) = res {
            ctx.readiness.down(&part, format!("not consuming: {e}"));
            // A lost shared connection is logged once by its slot, not by each of its queues.
            tracing::debug!(%queue, error = %e, retry_in = ?backoff.peek(), "consumer's channel ended; reopening");
        }
        if !backoff.wait(&stop).await {
            break;
        }
    }
    // Stopped (shutdown, or the tenant was removed): no longer part of this process.
    ctx.readiness.forget(&part);
}

/// One channel's life for one queue. Returns Ok when stopped, Err when the channel, its
/// connection or the consumer ended.
async fn consume_once(
    ctx: &Arc<Ingest>,
    connections: &Connections,
    writes: &Arc<Shards<Write>>,
    tenant: Option<&TenantName>,
    queue: &str,
    part: &str,
    stop: &CancellationToken,
) -> Result<(), ConsumerEnded> {
    let tag = format!("agenttask-ingest-{}", Uuid::new_v4());
    let setup = async {
        let channel = connections.channel(queue).await?;
        if let Some(t) = tenant {
            // Declared up front already (see `declare_up_front`); again here, cheaply, in case
            // the queue was deleted since.
            declare_tenant(&channel, t).await?;
        }
        channel.basic_qos(ctx.prefetch, BasicQosOptions::default()).await?;
        let consumer = channel
            .basic_consume(queue.into(), tag.as_str().into(), BasicConsumeOptions::default(), FieldTable::default())
            .await?;
        Ok::<_, ConsumerEnded>((channel, consumer))
    };
    let (channel, consumer) = tokio::select! {
        _ = stop.cancelled() => return Ok(()),
        res = setup => res?,
    };
    ctx.readiness.up(part);
    let prefetch = ctx.prefetch as usize;
    let consumed = consumer
        .map(|d| {
            let ctx = ctx.clone();
            let writes = writes.clone();
            let tenant = tenant.cloned();
            // Stamped here, in delivery order, before messages are handled concurrently:
            // this is what keeps a tenant's queue FIFO.
            let received_at = receipt_stamp();
            async move {
                let delivery = d?;
                match &tenant {
                    Some(t) => {
                        // The task's id is known once it is stored; `handle_task` records it.
                        let span = tracing::info_span!("ingest", tenant = %t, task_id = tracing::field::Empty);
                        handle_task(&ctx, &writes, t, delivery, received_at).instrument(span).await
                    }
                    None => handle_unrouted(&ctx, delivery).await,
                };
                Ok::<(), lapin::Error>(())
            }
        })
        .buffer_unordered(prefetch)
        .fold(Ok(()), |acc, r| async move { acc.and(r) });
    tokio::pin!(consumed);
    let outcome = tokio::select! {
        _ = stop.cancelled() => {
            // No new deliveries; the ones already here are stored and acked (the stream ends
            // once they are handled), within a bound so shutdown stays inside its grace.
            // A broker that does not answer the cancel would not take the acks either.
            let cancel = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default());
            let cancelled = matches!(tokio::time::timeout(CLOSE_WAIT, cancel).await, Ok(Ok(())));
            if cancelled && tokio::time::timeout(DRAIN, &mut consumed).await.is_err() {
                tracing::warn!(%queue, "messages still being stored at shutdown are left to redelivery");
            }
            Ok(())
        }
        res = &mut consumed => match res {
            Ok(()) => Err(ConsumerEnded::Cancelled),
            Err(e) => Err(e.into()),
        },
    };
    if channel.status().connected() {
        // Unacked messages on it go back to the queue.
        let close = channel.close(200, "agenttask ingest consumer stopping".into());
        let _ = tokio::time::timeout(CLOSE_WAIT, close).await;
    }
    outcome
}

/// A strictly increasing timestamp (microseconds, Postgres' resolution) for submitted_at, so
/// tasks received in order stay in order even when they arrive within the same microsecond.
fn receipt_stamp() -> chrono::DateTime<Utc> {
    use std::sync::atomic::{AtomicI64, Ordering};
    static LAST: AtomicI64 = AtomicI64::new(0);
    let now = Utc::now().timestamp_micros();
    let next = |prev: i64| now.max(prev + 1);
    let prev = LAST.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |p| Some(next(p))).unwrap_or_else(|p| p);
    let stamp = next(prev);
    chrono::DateTime::from_timestamp_micros(stamp).unwrap_or_else(Utc::now)
}

/// Validates and stores one task message, then acks it. Never panics, never drops.
async fn handle_task(
    ctx: &Ingest,
    writes: &Shards<Write>,
    tenant: &TenantName,
    delivery: Delivery,
    received_at: chrono::DateTime<Utc>,
) {
    let props = &delivery.properties;
    let message_id = prop(props.message_id());
    let correlation_id = prop(props.correlation_id()).or(message_id);
    let policy = ctx.tenants.borrow().get(tenant).cloned();
    let envelope = Envelope { body: &delivery.data, message_id, content_type: prop(props.content_type()) };
    let (reply, verdict) = decide(tenant, policy.as_ref(), ctx.isolation, &envelope, prop(props.reply_to()));
    let write = Arc::new(WriteSpec {
        tenant: tenant.clone(),
        verdict,
        max_queued: policy.as_ref().map(|p| p.max_queued),
        reply,
        correlation_id: correlation_id.map(str::to_owned),
        received_at,
        fresh: !delivery.redelivered,
    });

    // A database outage is retried here, holding the message, rather than nacked: every
    // redelivery counts against the queue's delivery limit, which is meant for poison only. The
    // backlog check is part of the insert: when it cannot be made, the message waits (it is
    // neither admitted past the cap nor refused for a full queue it may not have).
    let mut backoff = Backoff::write();
    let stored = loop {
        let (done, answer) = tokio::sync::oneshot::channel();
        if writes.push(tenant.as_str(), Write { spec: write.clone(), done }).await.is_err() {
            // Ingest is stopping: the message stays unacked and is redelivered.
            return;
        }
        match answer.await {
            Ok(Ok(done)) => break done,
            Ok(Err(GroupFailed)) => {
                // The group writer has logged why, once for the whole group.
                tracing::debug!(%tenant, retry_in = ?backoff.peek(), "cannot store task; retrying");
                if !delivery.acker.usable() {
                    // The channel is gone: the broker redelivers the message elsewhere.
                    return;
                }
                backoff.sleep().await;
            }
            Err(_) => return,
        }
    };
    match stored {
        (Inserted::New(task_id), None) => {
            tracing::Span::current().record("task_id", tracing::field::display(task_id));
            ctx.metrics.submitted.with_label_values(&[tenant.as_str()]).inc();
            tracing::debug!("task queued");
        }
        (Inserted::New(task_id), Some(reason)) => {
            tracing::Span::current().record("task_id", tracing::field::display(task_id));
            ctx.metrics.rejected.with_label_values(&[tenant.as_str(), reason.as_str()]).inc();
            tracing::info!(%reason, "task rejected");
        }
        (Inserted::Duplicate, _) => {
            tracing::debug!(%tenant, "duplicate submit ignored (same id)");
        }
    }
    ack(&delivery).await;
}

/// Where a task message's result goes and whether it is accepted, before the backlog check
/// (which needs the database). Pure: every kind of bad message is decided here.
fn decide(
    tenant: &TenantName,
    policy: Option<&TenantPolicy>,
    backend: BackendIsolation,
    envelope: &Envelope<'_>,
    reply_to: Option<&str>,
) -> (ReplyRoute, Result<validate::Submission, validate::Rejection>) {
    match reply_route(tenant, reply_to) {
        Ok(reply) => {
            let verdict = match policy {
                Some(policy) => validate::validate(tenant, policy, backend, envelope),
                None => Err(validate::Rejection::before_parsing(
                    Reason::UnknownTenant,
                    format!("tenant {tenant} is no longer configured"),
                    envelope.message_id,
                )),
            };
            (reply, verdict)
        }
        // The reply goes to the tenant's own results queue, never to the refused address.
        Err(message) => (
            ReplyRoute::tenant_results(tenant),
            Err(validate::Rejection::before_parsing(Reason::ValidationFailed, message, envelope.message_id)),
        ),
    }
}

/// Writers committing groups at once, each for its own share of the tenants ([`Shards`]): one
/// can collect while another waits for its commit.
const GROUP_WRITERS: usize = 2;
/// Messages in one group at most; a larger group only makes its first message wait longer.
const GROUP_MAX: usize = 256;
/// Writes waiting for the writers, all together; consumers wait (holding their messages) when
/// their writer's share is full.
const GROUP_QUEUE: usize = 4096;

/// One message's write, as ingest decided it before touching the database.
struct WriteSpec {
    tenant: TenantName,
    verdict: Result<validate::Submission, validate::Rejection>,
    max_queued: Option<u64>,
    reply: ReplyRoute,
    correlation_id: Option<String>,
    received_at: chrono::DateTime<Utc>,
    /// A first delivery rather than a redelivery: an earlier rejection under its key gives way.
    fresh: bool,
}

/// A write handed to a group writer, and where its outcome goes once its group has committed.
struct Write {
    spec: Arc<WriteSpec>,
    done: tokio::sync::oneshot::Sender<Result<(Inserted, Option<Reason>), GroupFailed>>,
}

/// The group this write was in did not commit; the writer has logged why.
#[derive(Debug)]
struct GroupFailed;

/// Takes whatever writes of its shard are waiting (at least one, at most [`GROUP_MAX`],
/// round-robin across tenants) and commits them in one transaction. Ends when the intake is
/// closed and empty.
async fn group_writer(ctx: Arc<Ingest>, writes: Arc<Shards<Write>>, shard: usize) {
    let intake: &Intake<Write> = writes.shard(shard);
    while let Some(mut group) = intake.take(GROUP_MAX).await {
        // The same order of tenants' counter-row locks in every group, so two service processes
        // never wait on each other in a cycle. Stable: a tenant's messages keep their order.
        group.sort_by(|a, b| a.spec.tenant.cmp(&b.spec.tenant));
        match commit_group(&ctx, &group).await {
            Ok(outcomes) => {
                ctx.metrics.ingest_group_size.observe(group.len() as f64);
                for (w, outcome) in group.into_iter().zip(outcomes) {
                    let _ = w.done.send(Ok(outcome));
                }
            }
            Err(e) => {
                ctx.metrics.errors.with_label_values(&["ingest", e.metric_label()]).inc();
                tracing::warn!(error = %e, messages = group.len(), "cannot store a group of tasks; each is retried");
                for w in group {
                    let _ = w.done.send(Err(GroupFailed));
                }
            }
        }
    }
}

async fn commit_group(ctx: &Ingest, group: &[Write]) -> Result<Vec<(Inserted, Option<Reason>)>, StoreError> {
    let mut tx = ctx.store.pool().begin().await?;
    let mut outcomes = Vec::with_capacity(group.len());
    // Runs of accepted tasks go in as sets; a rejection between them keeps its place, so a
    // key's answers come out in the order its messages arrived, as one by one.
    let mut rest = group;
    while let Some(first) = rest.first() {
        if first.spec.verdict.is_err() {
            outcomes.push(store(&mut tx, &first.spec).await?);
            rest = &rest[1..];
            continue;
        }
        let run = rest.iter().take_while(|w| w.spec.verdict.is_ok()).count();
        outcomes.extend(store_accepted(&mut tx, &rest[..run]).await?);
        rest = &rest[run..];
    }
    tx.commit().await?;
    Ok(outcomes)
}

/// Stores a run of accepted tasks with one set-based insert. When Postgres refuses a value in
/// it, the set is undone and each is stored on its own, so only the bad one is refused.
async fn store_accepted(conn: &mut PgConnection, run: &[Write]) -> Result<Vec<(Inserted, Option<Reason>)>, StoreError> {
    let subs: Vec<(&WriteSpec, &validate::Submission)> =
        run.iter().filter_map(|w| Some((&*w.spec, w.spec.verdict.as_ref().ok()?))).collect();
    let tasks: Vec<NewTask<'_>> = subs.iter().map(|(w, sub)| new_task(w, sub)).collect();
    let fresh: Vec<bool> = subs.iter().map(|(w, _)| w.fresh).collect();
    let answers = match insert_tasks(&mut *conn, &tasks, &fresh).await {
        Ok(answers) => answers,
        Err(e) if e.is_bad_value() => {
            tracing::debug!(error = %e, tasks = run.len(), "a value in the group was refused; storing its tasks one by one");
            let mut outcomes = Vec::with_capacity(run.len());
            for w in run {
                outcomes.push(store(&mut *conn, &w.spec).await?);
            }
            return Ok(outcomes);
        }
        Err(e) => return Err(e),
    };
    let mut outcomes = Vec::with_capacity(run.len());
    for ((w, sub), answer) in subs.into_iter().zip(answers) {
        outcomes.push(match answer {
            Ok(ins) => (ins, None),
            Err(full) => backlog_full(conn, w, sub, full).await?,
        });
    }
    Ok(outcomes)
}

fn new_task<'a>(w: &'a WriteSpec, sub: &'a validate::Submission) -> NewTask<'a> {
    NewTask {
        tenant: w.tenant.as_str(),
        client_id: sub.client_id.as_deref(),
        spec: &sub.spec,
        reply: w.reply.as_reply_to(),
        correlation_id: w.correlation_id.as_deref(),
        submitted_at: w.received_at,
        kube_object: None,
        max_queued: w.max_queued,
    }
}

async fn backlog_full(
    conn: &mut PgConnection,
    w: &WriteSpec,
    sub: &validate::Submission,
    full: crate::store::BacklogFull,
) -> Result<(Inserted, Option<Reason>), StoreError> {
    tracing::debug!(tenant = %w.tenant, queued = full.queued, "backlog full");
    let rejection = validate::backlog_full(&w.tenant, sub, w.max_queued.unwrap_or_default());
    store_rejection(conn, w, &rejection).await
}

/// Stores a task or its rejection inside the group's transaction (each insert is its own
/// savepoint, so one refused value does not undo the others). `Some(reason)` in the answer
/// when it was a rejection (also when the backlog was full).
async fn store(conn: &mut PgConnection, w: &WriteSpec) -> Result<(Inserted, Option<Reason>), StoreError> {
    match &w.verdict {
        Ok(sub) => {
            let res = insert_task(&mut *conn, &new_task(w, sub), w.fresh).await;
            match res {
                // A value Postgres refuses is the message's fault: reject it instead of looping.
                Err(e) if e.is_bad_value() => {
                    let rejection = validate::Rejection {
                        reason: Reason::ValidationFailed,
                        message: format!("the task could not be stored: {e}"),
                        client_id: sub.client_id.clone(),
                        batch_id: sub.spec.batch_id.clone(),
                        language: Some(sub.spec.language),
                    };
                    store_rejection(conn, w, &rejection).await
                }
                Ok(Err(full)) => backlog_full(conn, w, sub, full).await,
                Ok(Ok(ins)) => Ok((ins, None)),
                Err(e) => Err(e),
            }
        }
        Err(rej) => store_rejection(conn, w, rej).await,
    }
}

async fn store_rejection(
    conn: &mut PgConnection,
    w: &WriteSpec,
    rejection: &validate::Rejection,
) -> Result<(Inserted, Option<Reason>), StoreError> {
    let ins = insert_rejection(
        conn,
        &NewRejection {
            tenant: w.tenant.as_str(),
            client_id: rejection.client_id.as_deref(),
            batch_id: rejection.batch_id.as_deref(),
            language: rejection.language,
            reason: rejection.reason,
            message: &rejection.message,
            reply: w.reply.as_reply_to(),
            correlation_id: w.correlation_id.as_deref(),
            kube_object: None,
        },
        w.fresh,
    )
    .await?;
    Ok((ins, Some(rejection.reason)))
}

/// A message for a tenant that does not exist: reply `UnknownTenant` where it asked for a reply.
async fn handle_unrouted(ctx: &Ingest, delivery: Delivery) {
    let props = &delivery.properties;
    let key = delivery.routing_key.as_str();
    let message_id = prop(props.message_id());
    // "(unknown)" cannot be a tenant name, so it never collides with a real tenant's series.
    ctx.metrics.rejected.with_label_values(&["(unknown)", Reason::UnknownTenant.as_str()]).inc();
    let route = match unrouted_reply_route(key, prop(props.reply_to())) {
        Ok(route) if props.reply_to().is_some() => route,
        _ => {
            tracing::info!(routing_key = %key.chars().take(64).collect::<String>(), "dropped a message for an unknown tenant without a usable reply_to");
            ack(&delivery).await;
            return;
        }
    };
    let correlation_id = prop(props.correlation_id()).or(message_id);
    let result = ResultMessage::rejected(
        unrouted_task_id(key, message_id, correlation_id, &delivery.data),
        key.get(..key.len().min(63)).unwrap_or(""),
        message_id.filter(|m| validate::is_valid_key(m)).map(str::to_owned),
        None,
        Reason::UnknownTenant,
        format!(
            "no tenant named {:?} is configured; publish to an existing tenant's routing key",
            key.chars().take(64).collect::<String>()
        ),
        Utc::now(),
    );
    let mut backoff = Backoff::write();
    loop {
        match ctx.store.enqueue_orphan_result(&result, route.as_reply_to(), correlation_id).await {
            Ok(()) => break,
            Err(e) => {
                ctx.metrics.errors.with_label_values(&["ingest", e.metric_label()]).inc();
                tracing::warn!(error = %e, retry_in = ?backoff.peek(), "cannot store an UnknownTenant result; retrying");
                if !delivery.acker.usable() {
                    return;
                }
                backoff.sleep().await;
            }
        }
    }
    ack(&delivery).await;
}

async fn ack(delivery: &Delivery) {
    if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
        // The broker will redeliver; the store dedups on the client key.
        tracing::warn!(error = %e, "ack failed; the message will be redelivered");
    }
}

#[cfg(test)]
mod tests {
    //! The handler's decision for each kind of message, without a broker or a database: where
    //! the result goes, and accepted or rejected with which reason.

    use super::*;
    use crate::amqp::route::RESULTS_EXCHANGE;

    fn tenant() -> TenantName {
        TenantName::parse("acme").unwrap()
    }

    fn env<'a>(body: &'a [u8], message_id: Option<&'a str>) -> Envelope<'a> {
        Envelope { body, message_id, content_type: Some("application/json") }
    }

    const GOOD: &[u8] = br#"{"id": "k1", "language": "python", "code": "print(1)", "batch_id": "b"}"#;

    fn decided(
        policy: Option<&TenantPolicy>,
        backend: BackendIsolation,
        envelope: &Envelope<'_>,
        reply_to: Option<&str>,
    ) -> (ReplyRoute, Result<validate::Submission, validate::Rejection>) {
        decide(&tenant(), policy, backend, envelope, reply_to)
    }

    fn reason_of(v: &Result<validate::Submission, validate::Rejection>) -> Option<Reason> {
        v.as_ref().err().map(|r| r.reason)
    }

    #[test]
    fn a_good_message_is_accepted_and_answered_where_it_asked() {
        let p = TenantPolicy::default();
        let (route, v) = decided(Some(&p), BackendIsolation::Any, &env(GOOD, None), Some("amq.gen-abc"));
        assert_eq!((route.exchange.as_str(), route.routing_key.as_str()), ("", "amq.gen-abc"));
        assert_eq!(v.unwrap().client_id.as_deref(), Some("k1"));
        let (route, v) = decided(Some(&p), BackendIsolation::Any, &env(GOOD, None), None);
        assert_eq!((route.exchange.as_str(), route.routing_key.as_str()), (RESULTS_EXCHANGE, "acme"));
        assert!(v.is_ok());
    }

    #[test]
    fn each_kind_of_bad_message_gets_its_reason_and_keeps_its_key() {
        let p = TenantPolicy { max_code_bytes: 8, ..TenantPolicy::default() };
        let cases: [(&str, &[u8], Reason); 6] = [
            ("not json", b"{nope", Reason::ValidationFailed),
            (
                "unknown field",
                br#"{"id": "k1", "language": "python", "code": "1", "colour": 1}"#,
                Reason::ValidationFailed,
            ),
            ("unknown language", br#"{"id": "k1", "language": "cobol", "code": "1"}"#, Reason::ValidationFailed),
            (
                "code over the tenant's cap",
                br#"{"id": "k1", "language": "python", "code": "print(12345)"}"#,
                Reason::ValidationFailed,
            ),
            (
                "isolation not allowed",
                br#"{"id": "k1", "language": "python", "code": "1", "isolation": "gvisor"}"#,
                Reason::IsolationNotAllowed,
            ),
            (
                "env name reserved",
                br#"{"id": "k1", "language": "python", "code": "1", "env": {"AGENTTASK_X": "1"}}"#,
                Reason::ValidationFailed,
            ),
        ];
        for (what, body, reason) in cases {
            let (route, v) = decided(Some(&p), BackendIsolation::Any, &env(body, Some("m-1")), None);
            assert_eq!(reason_of(&v), Some(reason), "{what}");
            assert_eq!(route.routing_key, "acme", "{what}: the tenant's results queue");
            let key = v.unwrap_err().client_id;
            assert!(
                key.as_deref() == Some("k1") || key.as_deref() == Some("m-1"),
                "{what}: the key survives ({key:?})"
            );
        }
    }

    #[test]
    fn a_foreign_reply_to_is_refused_and_answered_on_the_tenants_own_queue() {
        let p = TenantPolicy::default();
        for bad in ["agenttask.reply.globex.x", "agenttask.tasks.globex", "some-queue"] {
            let (route, v) = decided(Some(&p), BackendIsolation::Any, &env(GOOD, None), Some(bad));
            assert_eq!(reason_of(&v), Some(Reason::ValidationFailed), "{bad}");
            assert_eq!((route.exchange.as_str(), route.routing_key.as_str()), (RESULTS_EXCHANGE, "acme"), "{bad}");
        }
    }

    #[test]
    fn a_tenant_removed_meanwhile_is_unknown() {
        let (_, v) = decided(None, BackendIsolation::Any, &env(GOOD, Some("m-1")), None);
        assert_eq!(reason_of(&v), Some(Reason::UnknownTenant));
    }

    #[test]
    fn a_non_standard_isolation_is_refused_by_a_local_only_backend() {
        let p = TenantPolicy { isolation: vec!["standard".into(), "gvisor".into()], ..TenantPolicy::default() };
        let body = br#"{"language": "python", "code": "1", "isolation": "gvisor"}"#;
        let (_, v) = decided(Some(&p), BackendIsolation::StandardOnly, &env(body, None), None);
        assert_eq!(reason_of(&v), Some(Reason::IsolationNotAllowed));
        let (_, v) = decided(Some(&p), BackendIsolation::Any, &env(body, None), None);
        assert!(v.is_ok());
    }

    #[test]
    fn a_full_backlog_refuses_with_backlog_full_naming_the_setting() {
        let p = TenantPolicy::default();
        let (_, v) = decided(Some(&p), BackendIsolation::Any, &env(GOOD, None), None);
        let r = validate::backlog_full(&tenant(), &v.unwrap(), 3);
        assert_eq!(r.reason, Reason::BacklogFull);
        assert_eq!((r.client_id.as_deref(), r.batch_id.as_deref()), (Some("k1"), Some("b")));
        assert!(r.message.contains("3 tasks queued (max_queued)"), "{}", r.message);
    }
}
