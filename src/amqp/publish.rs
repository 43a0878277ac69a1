//! The result publisher: relays the outbox to RabbitMQ with publisher confirms.
//!
//! A result leaves the outbox only after the broker confirmed it, so a crash between "finished"
//! and "published" publishes it after restart. A crash between the confirm and the delete can
//! publish it twice; the AMQP `message_id` is the task id so consumers can drop the duplicate.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Confirmation};
use tokio_util::sync::CancellationToken;

use super::{connect, declare_topology, PHASE_HEADER};
use crate::domain::tenant::Tenants;
use crate::retry::Backoff;
use crate::store::{OutboxMessage, Store};

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

async fn session(ctx: &Publisher, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let conn = connect(&ctx.amqp_url, "agenttask-publisher").await?;
    let channel = conn.create_channel().await?;
    let tenants = ctx.tenants.borrow().clone();
    declare_topology(&channel, tenants.keys()).await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    ctx.readiness.up(PART);
    loop {
        // Idle, it would not notice a lost connection until the next result: check.
        if !conn.status().connected() {
            anyhow::bail!("the RabbitMQ connection was lost");
        }
        let batch = ctx.store.claim_outbox(BATCH).await?;
        if batch.messages.is_empty() {
            drop(batch);
            tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = conn.close(200, "agenttask publisher stopping".into()).await;
                    return Ok(());
                }
                _ = ctx.wake.notified() => {}
                // A safety net for a missed notification, not the normal path.
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
            continue;
        }
        let mut pending = Vec::with_capacity(batch.messages.len());
        for m in &batch.messages {
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
        for (m, confirm) in pending {
            match confirm.await? {
                Confirmation::Ack(None) | Confirmation::NotRequested => confirmed.push(m.message_id),
                Confirmation::Ack(Some(_returned)) => {
                    // Nobody listens on that reply queue any more; the result stays in SQL.
                    tracing::warn!(task_id = %m.message_id, queue = %m.routing_key, "result returned as unroutable: the reply queue does not exist");
                    confirmed.push(m.message_id);
                }
                Confirmation::Nack(_) => {
                    tracing::warn!(task_id = %m.message_id, "broker refused a result; will retry");
                }
            }
        }
        let all = confirmed.len() == batch.messages.len();
        batch.complete(&confirmed).await?;
        if !all {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
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
