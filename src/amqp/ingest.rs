//! Ingest: consumes every tenant's task queue, validates, stores, and only then acks.
//!
//! A message is acked only once its task (or its rejection and result) is committed in Postgres,
//! so a crash at any point leads to a redelivery, and redeliveries are idempotent on
//! `(tenant, client id)`. Database outages nack with requeue after a pause; they never drop a
//! message and never stop the consumer.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{connect, declare_topology, prop, tasks_queue, TASKS_EXCHANGE, UNROUTED_QUEUE};
use crate::config::BackendKind;
use crate::domain::phase::Reason;
use crate::domain::result::ResultMessage;
use crate::domain::tenant::TenantName;
use crate::domain::validate::{self, reply_route, BackendIsolation, Envelope, ReplyRoute};
use crate::service::Context;
use crate::store::{Inserted, NewRejection, NewTask, StoreError};

/// Runs until `shutdown`, reconnecting with backoff and re-subscribing when the tenants change.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    let mut tenants_rx = ctx.tenants.subscribe();
    let mut consumed: Vec<TenantName> = Vec::new();
    while !shutdown.is_cancelled() {
        tenants_rx.borrow_and_update();
        let current: Vec<TenantName> = ctx.tenants.borrow().keys().cloned().collect();
        let removed: Vec<TenantName> = consumed.iter().filter(|t| !current.contains(t)).cloned().collect();
        consumed = current;
        let session = consume_all(ctx.clone(), removed, shutdown.clone());
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tenants_rx.changed() => {
                tracing::info!("tenants changed; re-subscribing to task queues");
                backoff = Duration::from_millis(100);
                continue;
            }
            res = session => match res {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "ingest lost its RabbitMQ connection");
                }
            },
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// One connection's life: declare, consume every queue, return when any consumer ends.
async fn consume_all(ctx: Arc<Context>, removed: Vec<TenantName>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let conn = connect(&ctx.settings.amqp_url, "agenttask-ingest").await?;
    let tenants = ctx.tenants.borrow().clone();
    let setup = conn.create_channel().await?;
    declare_topology(&setup, tenants.keys()).await?;
    // A removed tenant's queue keeps what it holds, but new messages for that tenant go to the
    // alternate exchange and get an UnknownTenant result instead of waiting unanswered.
    for t in &removed {
        setup
            .queue_unbind(tasks_queue(t).as_str().into(), TASKS_EXCHANGE.into(), t.as_str().into(), FieldTable::default())
            .await?;
        tracing::info!(tenant = %t, "tenant removed; its task queue no longer receives messages");
    }
    let _ = setup.close(200, "topology declared".into()).await;

    let mut consumers = tokio::task::JoinSet::new();
    let mut queues: Vec<(Option<TenantName>, String)> =
        tenants.keys().map(|t| (Some(t.clone()), tasks_queue(t))).collect();
    queues.push((None, UNROUTED_QUEUE.to_owned()));
    for (tenant, queue) in queues {
        let channel = conn.create_channel().await?;
        channel
            .basic_qos(ctx.settings.prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                format!("agenttask-ingest-{}", Uuid::new_v4()).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let ctx = ctx.clone();
        let prefetch = ctx.settings.prefetch as usize;
        consumers.spawn(async move {
            // Keep the channel alive as long as its consumer.
            let _channel = channel;
            let result: Result<(), lapin::Error> = consumer
                .map(|d| {
                    let ctx = ctx.clone();
                    let tenant = tenant.clone();
                    // Stamped here, in delivery order, before messages are handled concurrently:
                    // this is what keeps a tenant's queue FIFO.
                    let received_at = receipt_stamp();
                    async move {
                        let delivery = d?;
                        match &tenant {
                            Some(t) => handle_task(&ctx, t, delivery, received_at).await,
                            None => handle_unrouted(&ctx, delivery).await,
                        };
                        Ok::<(), lapin::Error>(())
                    }
                })
                .buffer_unordered(prefetch)
                .fold(Ok(()), |acc, r| async move { acc.and(r) })
                .await;
            (queue, result)
        });
    }
    tracing::info!(tenants = tenants.len(), "ingest consuming");
    ctx.ready.amqp.store(true, std::sync::atomic::Ordering::Relaxed);
    let outcome = tokio::select! {
        _ = shutdown.cancelled() => Ok(()),
        ended = consumers.join_next() => match ended {
            Some(Ok((queue, Ok(())))) => Err(anyhow::anyhow!("consumer of {queue} was cancelled by the broker")),
            Some(Ok((queue, Err(e)))) => Err(anyhow::anyhow!("consumer of {queue} failed: {e}")),
            Some(Err(e)) => Err(anyhow::anyhow!("consumer task failed: {e}")),
            None => Ok(()),
        },
    };
    ctx.ready.amqp.store(false, std::sync::atomic::Ordering::Relaxed);
    consumers.abort_all();
    let _ = conn.close(200, "agenttask ingest stopping".into()).await;
    outcome
}

/// Validates and stores one task message, then acks it. Never panics, never drops.
/// A strictly increasing timestamp (microseconds, Postgres' resolution) for submitted_at, so
/// tasks received in order stay in order even when they arrive within the same microsecond.
fn receipt_stamp() -> chrono::DateTime<Utc> {
    use std::sync::atomic::{AtomicI64, Ordering};
    static LAST: AtomicI64 = AtomicI64::new(0);
    let now = Utc::now().timestamp_micros();
    let next = |prev: i64| now.max(prev + 1);
    let prev = LAST
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |p| Some(next(p)))
        .unwrap_or_else(|p| p);
    let stamp = next(prev);
    chrono::DateTime::from_timestamp_micros(stamp).unwrap_or_else(Utc::now)
}

async fn handle_task(ctx: &Context, tenant: &TenantName, delivery: Delivery, received_at: chrono::DateTime<Utc>) {
    let props = &delivery.properties;
    let message_id = prop(props.message_id());
    let correlation_id = prop(props.correlation_id()).or(message_id);
    let policy = ctx.tenants.borrow().get(tenant).cloned();
    let backend = match ctx.settings.backend {
        BackendKind::Local => BackendIsolation::StandardOnly,
        BackendKind::Kubernetes => BackendIsolation::Any,
    };
    let envelope = Envelope {
        body: &delivery.data,
        message_id,
        content_type: prop(props.content_type()),
    };
    let (reply, verdict) = match reply_route(tenant, prop(props.reply_to())) {
        Ok(reply) => {
            let verdict = match &policy {
                Some(policy) => validate::validate(tenant, policy, backend, &envelope),
                None => Err(validate::Rejection {
                    reason: Reason::UnknownTenant,
                    message: format!("tenant {tenant} is no longer configured"),
                    client_id: message_id.filter(|m| validate::is_valid_key(m)).map(str::to_owned),
                    batch_id: None,
                    language: None,
                }),
            };
            (reply, verdict)
        }
        // The reply goes to the tenant's own results queue, never to the refused address.
        Err(message) => (
            ReplyRoute::tenant_results(tenant),
            Err(validate::Rejection {
                reason: Reason::ValidationFailed,
                message,
                client_id: message_id.filter(|m| validate::is_valid_key(m)).map(str::to_owned),
                batch_id: None,
                language: None,
            }),
        ),
    };

    // The backlog cap: a full queue refuses new work instead of growing without bound.
    let verdict = match (verdict, &policy) {
        (Ok(sub), Some(policy)) => match ctx.store.queued_up_to(tenant.as_str(), policy.max_queued as i64).await {
            Ok(n) if n >= policy.max_queued as i64 => Err(validate::Rejection {
                reason: Reason::BacklogFull,
                message: format!(
                    "tenant {tenant} already has {} tasks queued (max_queued); retry later",
                    policy.max_queued
                ),
                client_id: sub.client_id,
                batch_id: sub.spec.batch_id,
                language: Some(sub.spec.language),
            }),
            _ => Ok(sub),
        },
        (v, _) => v,
    };

    let stored = match &verdict {
        Ok(sub) => {
            let res = ctx
                .store
                .insert_task(&NewTask {
                    tenant: tenant.as_str(),
                    client_id: sub.client_id.as_deref(),
                    spec: &sub.spec,
                    reply: &reply,
                    correlation_id,
                    submitted_at: received_at,
                })
                .await;
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
                    store_rejection(ctx, tenant, &rejection, &reply, correlation_id).await
                }
                other => other.map(|ins| (ins, None)),
            }
        }
        Err(rej) => {
            store_rejection(ctx, tenant, rej, &reply, correlation_id)
                .await
                .map(|(ins, _)| (ins, Some(rej.reason)))
        }
    };

    match stored {
        Ok((inserted, rejected)) => {
            match (inserted, rejected) {
                (Inserted::New(task_id), None) => {
                    ctx.metrics.submitted.with_label_values(&[tenant.as_str()]).inc();
                    tracing::debug!(%tenant, %task_id, "task queued");
                }
                (Inserted::New(task_id), Some(reason)) => {
                    ctx.metrics.rejected.with_label_values(&[tenant.as_str(), reason.as_str()]).inc();
                    tracing::info!(%tenant, %task_id, %reason, "task rejected");
                }
                (Inserted::Duplicate, _) => {
                    tracing::debug!(%tenant, "duplicate submit ignored (same id)");
                }
            }
            ack(&delivery).await;
        }
        Err(e) => {
            tracing::warn!(%tenant, error = %e, "cannot store task; will retry the message");
            ctx.ready.db.store(false, std::sync::atomic::Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = delivery
                .acker
                .nack(BasicNackOptions { requeue: true, ..Default::default() })
                .await;
        }
    }
}

async fn store_rejection(
    ctx: &Context,
    tenant: &TenantName,
    rejection: &validate::Rejection,
    reply: &ReplyRoute,
    correlation_id: Option<&str>,
) -> Result<(Inserted, Option<Reason>), StoreError> {
    let ins = ctx
        .store
        .insert_rejection(&NewRejection {
            tenant: tenant.as_str(),
            client_id: rejection.client_id.as_deref(),
            batch_id: rejection.batch_id.as_deref(),
            language: rejection.language,
            reason: rejection.reason,
            message: &rejection.message,
            reply,
            correlation_id,
        })
        .await?;
    Ok((ins, Some(rejection.reason)))
}

/// A message for a tenant that does not exist: reply `UnknownTenant` where it asked for a reply.
async fn handle_unrouted(ctx: &Context, delivery: Delivery) {
    let props = &delivery.properties;
    let key = delivery.routing_key.as_str();
    let message_id = prop(props.message_id());
    ctx.metrics.rejected.with_label_values(&["unknown", Reason::UnknownTenant.as_str()]).inc();
    // Only a syntactically valid tenant name can own an `agenttask.reply.<tenant>.` queue; for
    // anything else, only broker-generated reply queues are allowed.
    let name = TenantName::parse(key).unwrap_or_else(|_| TenantName::parse("invalid").expect("valid"));
    let route = match reply_route(&name, prop(props.reply_to())) {
        Ok(route) if props.reply_to().is_some() => route,
        _ => {
            tracing::info!(routing_key = %key.chars().take(64).collect::<String>(), "dropped a message for an unknown tenant without a usable reply_to");
            ack(&delivery).await;
            return;
        }
    };
    let result = ResultMessage::rejected(
        Uuid::new_v4(),
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
    let correlation_id = prop(props.correlation_id()).or(message_id);
    match ctx.store.enqueue_orphan_result(&result, &route, correlation_id).await {
        Ok(()) => ack(&delivery).await,
        Err(e) => {
            tracing::warn!(error = %e, "cannot store an UnknownTenant result; will retry");
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = delivery
                .acker
                .nack(BasicNackOptions { requeue: true, ..Default::default() })
                .await;
        }
    }
}

async fn ack(delivery: &Delivery) {
    if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
        // The broker will redeliver; the store dedups on the client key.
        tracing::warn!(error = %e, "ack failed; the message will be redelivered");
    }
}
