//! `--relay`: RabbitMQ alone doing the message work the service does for each task, with no
//! Postgres and no processing, as the floor any design of the service stands on.
//!
//! Per task, as in a service run: the load generator publishes a task-sized message with a
//! confirm to one of `--queues` quorum queues (the kind tenants' task queues are, or classic
//! ones with `--classic-queues`, for comparison); a relay, on a
//! few shared connections with one channel and the service's prefetch per queue, consumes it,
//! publishes a result-sized message to its `reply_to` (direct reply-to) with a confirm, and acks
//! the task; the load generator takes the reply. Everything overlaps, bounded by --concurrency.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation};

use agenttask::amqp::connect;
use agenttask::domain::phase::{Phase, Reason};
use agenttask::domain::result::{result_body, ResultMessage};

/// The relay's connections, as many as the service's ingest shares across all tenant queues.
const RELAY_CONNECTIONS: usize = agenttask::amqp::connections::INGEST_CONNECTIONS;
/// Deliveries each queue's channel holds unacked: the service's default `--prefetch`.
const PREFETCH: u16 = 16;

pub struct Figures {
    pub tasks: usize,
    pub queues: usize,
    pub quorum: bool,
    pub task_bytes: usize,
    pub result_bytes: usize,
    pub seconds: f64,
    pub latency_ms: Vec<f64>,
}

/// A result as the service sends it for a `print(1)` that succeeded, so replies are the real size.
fn result_message(task_id: uuid::Uuid, id: &str) -> Vec<u8> {
    let now = chrono::Utc::now();
    let mut r = ResultMessage::rejected(
        task_id,
        "tenant-0001",
        Some(id.to_owned()),
        None,
        Reason::ValidationFailed,
        String::new(),
        now,
    );
    r.phase = Phase::Succeeded;
    r.reason = None;
    r.message = None;
    r.exit_code = Some(0);
    r.stdout = "1\n".into();
    r.backend = Some("local".into());
    r.admitted_at = Some(now);
    r.started_at = Some(now);
    r.finished_at = Some(now);
    r.queue_wait_ms = Some(0);
    r.duration_ms = Some(0);
    result_body(&r)
}

async fn declare_queue(channel: &Channel, name: &str, quorum: bool) -> Result<(), lapin::Error> {
    let mut args = FieldTable::default();
    let kind = if quorum { "quorum" } else { "classic" };
    args.insert(ShortString::from("x-queue-type"), AMQPValue::LongString(LongString::from(kind)));
    channel
        .queue_declare(name.into(), QueueDeclareOptions { durable: true, ..Default::default() }, args)
        .await
        .map(|_| ())
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Consumes one queue until the connection closes: reply to each task, then ack it once the
/// broker confirmed the reply.
async fn relay_queue(channel: Channel, replies: Channel, queue: String) -> Result<(), BoxError> {
    channel.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(queue.as_str().into(), "relay".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    let mut pending = FuturesUnordered::new();
    loop {
        tokio::select! {
            delivery = consumer.next() => {
                let Some(delivery) = delivery else { return Ok(()) };
                let delivery = delivery?;
                let id = delivery.properties.correlation_id().as_ref().map(|c| c.as_str().to_owned()).unwrap_or_default();
                let Some(reply_to) = delivery.properties.reply_to().as_ref().map(|r| r.as_str().to_owned()) else {
                    delivery.acker.ack(BasicAckOptions::default()).await?;
                    continue;
                };
                let body = result_message(uuid::Uuid::new_v4(), &id);
                let props = BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_correlation_id(id.as_str().into())
                    .with_delivery_mode(2);
                let confirm = replies
                    .basic_publish("".into(), reply_to.as_str().into(), BasicPublishOptions::default(), &body, props)
                    .await?;
                pending.push(async move {
                    if !confirm.await?.is_ack() {
                        return Err::<(), BoxError>("the broker refused a reply".into());
                    }
                    delivery.acker.ack(BasicAckOptions::default()).await?;
                    Ok(())
                });
            }
            Some(done) = pending.next(), if !pending.is_empty() => { done?; }
        }
    }
}

/// Runs `count` tasks through `queues` quorum (or classic) queues named `<prefix>.<n>` and a
/// relay; deletes the queues after.
pub async fn run(
    amqp_url: &str,
    prefix: &str,
    count: usize,
    queues: usize,
    quorum: bool,
    concurrency: usize,
    deadline: Duration,
) -> Result<Figures, Box<dyn std::error::Error>> {
    let names: Vec<String> = (0..queues).map(|i| format!("{prefix}.{i}")).collect();
    let client = connect(amqp_url, "agenttask-loadtest-relay-client").await?;
    let publish = client.create_channel().await?;
    for name in &names {
        declare_queue(&publish, name, quorum).await?;
    }
    let result = relay_and_offer(amqp_url, &publish, &names, count, concurrency, deadline).await;
    for name in &names {
        let ch = client.create_channel().await?;
        let _ = ch.queue_delete(name.as_str().into(), QueueDeleteOptions::default()).await;
        let _ = ch.close(200, "deleted".into()).await;
    }
    let _ = client.close(200, "done".into()).await;
    let (seconds, latency_ms, task_bytes) = result?;
    let result_bytes = result_message(uuid::Uuid::new_v4(), &uuid::Uuid::new_v4().to_string()).len();
    Ok(Figures { tasks: count, queues, quorum, task_bytes, result_bytes, seconds, latency_ms })
}

/// The relay's connections and consumers, and the offered load; (seconds, latencies in ms, task
/// message bytes).
async fn relay_and_offer(
    amqp_url: &str,
    publish: &Channel,
    names: &[String],
    count: usize,
    concurrency: usize,
    deadline: Duration,
) -> Result<(f64, Vec<f64>, usize), Box<dyn std::error::Error>> {
    let mut relays = Vec::new();
    let mut reply_channels = Vec::new();
    for i in 0..RELAY_CONNECTIONS {
        let conn = connect(amqp_url, &format!("agenttask-loadtest-relay-{i}")).await?;
        let replies = conn.create_channel().await?;
        replies.confirm_select(ConfirmSelectOptions::default()).await?;
        reply_channels.push(replies);
        relays.push(conn);
    }
    let mut relay_tasks = tokio::task::JoinSet::new();
    for (i, name) in names.iter().enumerate() {
        let conn = &relays[i % RELAY_CONNECTIONS];
        let channel = conn.create_channel().await?;
        relay_tasks.spawn(relay_queue(channel, reply_channels[i % RELAY_CONNECTIONS].clone(), name.clone()));
    }

    let mut replies = super::reply_consumer(publish, "relay-client").await?;
    let task_body = super::task_message(&uuid::Uuid::new_v4().to_string(), super::plan::Body::Print);
    let started = Instant::now();
    let until = tokio::time::Instant::now() + deadline;
    let mut in_flight: HashMap<String, Instant> = HashMap::new();
    let mut confirms = FuturesUnordered::new();
    let mut latency_ms = Vec::with_capacity(count);
    let mut sent = 0usize;
    while latency_ms.len() < count {
        while sent < count && in_flight.len() < concurrency.max(1) {
            let id = uuid::Uuid::new_v4().to_string();
            let props = super::task_properties(&id);
            let queue = &names[sent % names.len()];
            let confirm = publish
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions { mandatory: true, ..Default::default() },
                    &task_body,
                    props,
                )
                .await?;
            confirms.push(confirm);
            in_flight.insert(id, Instant::now());
            sent += 1;
        }
        tokio::select! {
            reply = replies.next() => {
                let Some(delivery) = reply else { return Err("the broker closed the reply consumer".into()) };
                let delivery = delivery?;
                let id = delivery.properties.correlation_id().as_ref().map(|c| c.as_str().to_owned()).unwrap_or_default();
                if let Some(sent_at) = in_flight.remove(&id) {
                    latency_ms.push(sent_at.elapsed().as_secs_f64() * 1000.0);
                }
            }
            Some(confirmed) = confirms.next(), if !confirms.is_empty() => {
                if !matches!(confirmed?, Confirmation::Ack(None)) {
                    return Err("the broker refused or returned a task message".into());
                }
            }
            Some(ended) = relay_tasks.join_next() => {
                return Err(format!("a relay consumer stopped: {:?}", ended.map_err(|e| e.to_string())).into());
            }
            _ = tokio::time::sleep_until(until) => {
                return Err(format!("deadline passed with {} of {count} replies", latency_ms.len()).into());
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    relay_tasks.abort_all();
    for conn in relays {
        let _ = conn.close(200, "done".into()).await;
    }
    Ok((seconds, latency_ms, task_body.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the real broker: every task comes back once, and the queues are gone after.
    #[tokio::test]
    async fn every_task_gets_its_reply_and_the_queues_are_deleted() {
        let url = std::env::var("AGENTTASK_AMQP_URL").unwrap_or_else(|_| agenttask::config::DEFAULT_AMQP_URL.into());
        let prefix = format!("agenttask-loadtest.relay-test.{}", uuid::Uuid::new_v4().simple());
        let f = run(&url, &prefix, 300, 3, true, 64, Duration::from_secs(60)).await.expect("the relay run completes");
        assert_eq!(f.latency_ms.len(), 300, "one reply per task");
        assert!(f.result_bytes > f.task_bytes, "replies are result-sized ({} bytes)", f.result_bytes);
        assert!(f.seconds > 0.0);
        let conn = connect(&url, "relay-test").await.unwrap();
        for i in 0..3 {
            // A passive declare of a queue that does not exist closes its channel: one each.
            let ch = conn.create_channel().await.unwrap();
            let left = ch
                .queue_declare(
                    format!("{prefix}.{i}").as_str().into(),
                    QueueDeclareOptions { passive: true, ..Default::default() },
                    FieldTable::default(),
                )
                .await;
            assert!(left.is_err(), "queue {prefix}.{i} was deleted after the run");
        }
        let _ = conn.close(200, "done".into()).await;
    }
}
