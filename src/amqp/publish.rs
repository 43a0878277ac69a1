//! The result publisher: relays the outbox to RabbitMQ with publisher confirms.
//!
//! A result leaves the outbox only after the broker confirmed it, so a crash between "finished"
//! and "published" publishes it after restart. A crash between the confirm and the delete can
//! publish it twice; the AMQP `message_id` is the task id so consumers can drop the duplicate.
//!
//! A result the broker refuses (a `basic.nack`, or a channel it closes over that publish) is
//! retried with backoff and parked after `--outbox-max-attempts` refusals (see
//! [`crate::store::RetryPolicy`]), so it stops being retried but is never dropped. When the
//! channel closes over a batch, the next rounds publish one result at a time until they find
//! the one it closes over, so the refusal is counted on that result and on no other.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Confirmation};
use tokio_util::sync::CancellationToken;

use super::{connect, declare_topology, PHASE_HEADER};
use crate::domain::tenant::Tenants;
use crate::retry::Backoff;
use crate::store::{OutboxMessage, Refusal, RetryPolicy, Store};

/// What the result publisher needs, and nothing else.
pub struct Publisher {
    pub store: Store,
    /// Tenants whose results queues it declares.
    pub tenants: tokio::sync::watch::Receiver<Arc<Tenants>>,
    pub amqp_url: String,
    /// Notified when results wait in the outbox.
    pub wake: Arc<tokio::sync::Notify>,
    /// Where it says whether it can publish (read by `/readyz`).
    pub readiness: Arc<crate::readiness::Readiness>,
    /// How often a refused result is retried before it is parked.
    pub retry: RetryPolicy,
    /// Updated as soon as this publisher parks a result (the scheduler recounts it too).
    pub metrics: crate::metrics::Metrics,
}

const PART: &str = "result publisher";

/// Results published per round trip to the broker.
const BATCH: i64 = 128;

pub async fn run(ctx: Arc<Publisher>, shutdown: CancellationToken) {
    let mut backoff = Backoff::reconnect();
    ctx.readiness.down(PART, "starting");
    while !shutdown.is_cancelled() {
        match session(&ctx, &shutdown).await {
            Ok(()) => break,
            Err(e) => {
                ctx.readiness.down(PART, format!("{e:#}"));
                tracing::warn!(error = %e, retry_in = ?backoff.peek(), "result publisher lost its connection")
            }
        }
        if !backoff.wait(&shutdown).await {
            break;
        }
    }
}

async fn open_channel(conn: &lapin::Connection) -> Result<lapin::Channel, lapin::Error> {
    let channel = conn.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(channel)
}

/// One connection's life.
async fn session(ctx: &Publisher, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let conn = connect(&ctx.amqp_url, "agenttask-publisher").await?;
    let mut channel = open_channel(&conn).await?;
    let tenants = ctx.tenants.borrow().clone();
    declare_topology(&channel, tenants.keys()).await?;
    ctx.readiness.up(PART);
    // After the broker closed the channel over a batch: rounds left to publish one result at a
    // time, looking for the culprit (a batch at most, so one bad result cannot slow every
    // later round).
    let mut one_at_a_time: i64 = 0;
    let mut db_backoff = Backoff::reconnect();
    loop {
        // Idle, it would not notice a lost connection until the next result: check.
        if !conn.status().connected() {
            anyhow::bail!("the RabbitMQ connection was lost");
        }
        let batch = match ctx.store.claim_outbox(if one_at_a_time > 0 { 1 } else { BATCH }).await {
            Ok(batch) => {
                db_backoff.reset();
                batch
            }
            Err(e) => {
                // The database is away (`/readyz` says so); the broker connection is fine: keep it.
                tracing::warn!(error = %e, retry_in = ?db_backoff.peek(), "cannot read the outbox; retrying");
                if !db_backoff.wait(shutdown).await {
                    return Ok(());
                }
                continue;
            }
        };
        if batch.messages.is_empty() {
            drop(batch);
            tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = conn.close(200, "agenttask publisher stopping".into()).await;
                    return Ok(());
                }
                _ = ctx.wake.notified() => {}
                // A safety net for a missed notification, and the clock of retries' backoff.
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
            continue;
        }
        let (confirmed, refused) = match publish_batch(&channel, &batch.messages).await {
            Ok(outcome) => outcome,
            Err(e) if conn.status().connected() && is_channel_refusal(&e) => {
                // The broker closed the channel over something in this batch. Alone in its
                // batch, the result is the culprit: count it. Otherwise look for it.
                tracing::warn!(error = %e, batch = batch.messages.len(), "the broker closed the publishing channel");
                if let [m] = batch.messages.as_slice() {
                    let refusal = Refusal { message_id: m.message_id, attempts: m.attempts, error: e.to_string() };
                    record(ctx, batch, Vec::new(), vec![refusal], shutdown).await;
                    one_at_a_time = 0;
                } else {
                    drop(batch);
                    one_at_a_time = BATCH;
                }
                channel = open_channel(&conn).await?;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        record(ctx, batch, confirmed, refused, shutdown).await;
        one_at_a_time = (one_at_a_time - 1).max(0);
    }
}

/// Records what the broker did with a batch: deletes the confirmed results, counts refusals.
/// The broker's answers are facts, so when the database is away this keeps trying (on a new
/// transaction: the claim's is gone) until it answers, rather than publish confirmed results
/// again. Only a shutdown gives up (they are then published again at the next start: the rare
/// duplicate the module docs describe).
async fn record(
    ctx: &Publisher,
    batch: crate::store::OutboxBatch,
    confirmed: Vec<uuid::Uuid>,
    refused: Vec<Refusal>,
    shutdown: &CancellationToken,
) {
    let mut result = batch.complete(&confirmed, &refused, &ctx.retry).await;
    let mut backoff = Backoff::write();
    loop {
        match result {
            Ok(parked) => return report_parked(ctx, &parked),
            Err(e) => {
                tracing::warn!(error = %e, confirmed = confirmed.len(), refused = refused.len(), retry_in = ?backoff.peek(), "cannot record published results; retrying");
                if !backoff.wait(shutdown).await {
                    return;
                }
            }
        }
        result = ctx.store.record_publish_outcome(&confirmed, &refused, &ctx.retry).await;
    }
}

/// Publishes a batch and waits for every confirm: the ids the broker took, and the results it
/// refused. An error means the channel or the connection failed.
async fn publish_batch(
    channel: &lapin::Channel,
    messages: &[OutboxMessage],
) -> Result<(Vec<uuid::Uuid>, Vec<Refusal>), lapin::Error> {
    let mut pending = Vec::with_capacity(messages.len());
    for m in messages {
        let confirm = channel
            .basic_publish(
                m.exchange.as_str().into(),
                m.routing_key.as_str().into(),
                // Mandatory tells us when a reply queue is gone; RabbitMQ reports direct
                // reply-to deliveries as unroutable even when they arrive, so not for those.
                BasicPublishOptions {
                    mandatory: !m.routing_key.starts_with("amq.rabbitmq.reply-to"),
                    ..Default::default()
                },
                &m.body,
                properties(m),
            )
            .await?;
        pending.push((m, confirm));
    }
    let mut confirmed = Vec::with_capacity(pending.len());
    let mut refused = Vec::new();
    for (m, confirm) in pending {
        // The last stage of the task's life.
        let span = tracing::info_span!("publish", task_id = %m.message_id, tenant = m.tenant.as_deref(), queue = %m.routing_key);
        // Awaited outside the span (a span entered across an await would claim other tasks'
        // lines); what follows runs in it.
        let confirmation = confirm.await?;
        let _in_span = span.enter();
        match confirmation {
            Confirmation::Ack(None) | Confirmation::NotRequested => {
                tracing::debug!("result published");
                confirmed.push(m.message_id)
            }
            Confirmation::Ack(Some(_returned)) => {
                // Nobody listens on that reply queue any more; the result stays in SQL.
                tracing::warn!("result returned as unroutable: the reply queue does not exist");
                confirmed.push(m.message_id);
            }
            Confirmation::Nack(_) => {
                tracing::warn!(attempts = m.attempts + 1, "broker refused a result; will retry");
                refused.push(Refusal {
                    message_id: m.message_id,
                    attempts: m.attempts,
                    error: format!(
                        "RabbitMQ refused the publish to exchange {:?}, routing key {:?} (basic.nack: e.g. the queue is full and rejects publishes)",
                        m.exchange, m.routing_key
                    ),
                });
            }
        }
    }
    Ok((confirmed, refused))
}

/// Whether the broker closed the channel (a soft error, over one publish) rather than the
/// connection failing.
fn is_channel_refusal(e: &lapin::Error) -> bool {
    use lapin::ErrorKind;
    match e.kind() {
        ErrorKind::ProtocolError(amqp) => matches!(amqp.kind(), lapin::protocol::AMQPErrorKind::Soft(_)),
        ErrorKind::InvalidChannelState(..) => true,
        _ => false,
    }
}

fn report_parked(ctx: &Publisher, parked: &[uuid::Uuid]) {
    for id in parked {
        ctx.metrics.outbox_parked.inc();
        ctx.metrics.errors.with_label_values(&[PART, "result_parked"]).inc();
        tracing::error!(
            task_id = %id,
            attempts = ctx.retry.max_attempts,
            "the broker refused this result too often: parked, no longer retried (see agenttask.parked_results; \
             re-queue with `select agenttask.requeue_parked_results()`)"
        );
    }
}

fn properties(m: &OutboxMessage) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(ShortString::from(PHASE_HEADER), AMQPValue::LongString(LongString::from(m.phase.clone())));
    let mut props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(m.message_id.to_string().into())
        .with_headers(headers);
    if let Some(c) = m.correlation_id.as_deref().and_then(|c| ShortString::try_new(c.to_owned()).ok()) {
        props = props.with_correlation_id(c);
    }
    props
}
