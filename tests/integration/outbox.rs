//! Results the broker refuses, for real: retried with backoff, parked after
//! `--outbox-max-attempts` refusals (kept, counted, visible in SQL), re-queued by the operator's
//! SQL and then delivered exactly once.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use serde_json::json;

use agenttask::config::{BackendKind, Component};

use crate::support::*;

const WAIT: Duration = Duration::from_secs(60);

/// `(attempts, parked, last_error)` of a task's outbox row, if it has one.
async fn outbox_row(pool: &sqlx::PgPool, task_id: uuid::Uuid) -> Option<(i32, bool, Option<String>)> {
    sqlx::query_as("select attempts, parked_at is not null, last_error from agenttask.outbox where message_id = $1")
        .bind(task_id)
        .fetch_optional(pool)
        .await
        .unwrap()
}

/// Polls `f` until it returns something (within [`WAIT`]).
async fn until_some<T, F, Fut>(mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < end, "nothing within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn metric(svc: &Service, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://{}/metrics", svc.http_addr)).await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A reply queue that refuses every publish (`basic.nack`): full at length 0, rejecting
/// publishes when full. It expires on its own if the test dies.
async fn declare_refusing_queue(ch: &lapin::Channel, name: &str) {
    let mut args = FieldTable::default();
    args.insert(ShortString::from("x-max-length"), AMQPValue::LongLongInt(0));
    args.insert(ShortString::from("x-overflow"), AMQPValue::LongString(LongString::from("reject-publish")));
    args.insert(ShortString::from("x-expires"), AMQPValue::LongLongInt(600_000));
    ch.queue_declare(name.into(), QueueDeclareOptions::default(), args).await.unwrap();
}

#[tokio::test]
async fn a_refused_result_is_retried_then_parked_then_requeued_and_delivered_once() {
    let env = Env::new(ONE_TENANT).await;
    let tenant = env.tenant("a");
    let mut settings = env.settings(&Component::ALL);
    settings.backend = BackendKind::Null;
    settings.outbox_max_attempts = 3;
    let svc = env.start_with(settings).await;
    let pool = env.pg().await;
    let conn = env.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();

    let reply = format!("agenttask.reply.{tenant}.full");
    declare_refusing_queue(&ch, &reply).await;
    let props = lapin::BasicProperties::default()
        .with_content_type("application/json".into())
        .with_correlation_id("refused-1".into())
        .with_reply_to(reply.as_str().into());
    let task = json!({"id": "refused-1", "language": "python", "code": "print(1)"});
    let confirm = ch
        .basic_publish(
            "agenttask.tasks".into(),
            tenant.as_str().into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(&task).unwrap(),
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
    let task_id: uuid::Uuid = until_some(|| async {
        sqlx::query_scalar("select task_id from agenttask.tasks where client_id = 'refused-1'")
            .fetch_optional(&pool)
            .await
            .unwrap()
    })
    .await;

    // Retried: the refusal is counted, with the broker's reason, and the row stays unparked.
    let error = until_some(|| async {
        match outbox_row(&pool, task_id).await {
            Some((n, false, Some(error))) if n >= 1 => Some(error),
            _ => None,
        }
    })
    .await;
    assert!(error.contains("basic.nack"), "{error}");

    // Parked after 3 refusals (backoff 1 s, then 2 s): kept, visible, counted.
    eventually(WAIT, || async { matches!(outbox_row(&pool, task_id).await, Some((3, true, Some(_)))) }).await;
    let parked: Vec<(uuid::Uuid, i32)> =
        sqlx::query_as("select task_id, attempts from agenttask.parked_results").fetch_all(&pool).await.unwrap();
    assert_eq!(parked, [(task_id, 3)]);
    // Counted by the publisher at once, recounted by the scheduler (a parked result is not pending).
    eventually(WAIT, || async {
        metric(&svc, "agenttask_outbox_parked").await == Some(1.0)
            && metric(&svc, "agenttask_outbox_pending").await == Some(0.0)
    })
    .await;
    // Parked means no longer retried.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(outbox_row(&pool, task_id).await.map(|r| r.0), Some(3), "a parked result was retried");

    // The operator fixes the cause (a reply queue that accepts) and re-queues.
    ch.queue_delete(reply.as_str().into(), QueueDeleteOptions::default()).await.unwrap();
    let mut args = FieldTable::default();
    args.insert(ShortString::from("x-expires"), AMQPValue::LongLongInt(600_000));
    ch.queue_declare(reply.as_str().into(), QueueDeclareOptions::default(), args).await.unwrap();
    let mut results = ch
        .basic_consume(
            reply.as_str().into(),
            "test".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let requeued: i64 = sqlx::query_scalar("select agenttask.requeue_parked_results()").fetch_one(&pool).await.unwrap();
    assert_eq!(requeued, 1);

    // Delivered, once.
    let d = tokio::time::timeout(WAIT, results.next()).await.expect("the re-queued result arrives").unwrap().unwrap();
    let body: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
    assert_eq!(body["task_id"], task_id.to_string());
    assert_eq!(body["phase"], "Succeeded");
    assert_eq!(d.properties.correlation_id().as_ref().map(|c| c.as_str()), Some("refused-1"));
    settled(&env, &pool, &tenant).await;
    let again = tokio::time::timeout(Duration::from_secs(3), results.next()).await;
    assert!(again.is_err(), "a second copy arrived: {again:?}");
    eventually(WAIT, || async { metric(&svc, "agenttask_outbox_parked").await == Some(0.0) }).await;

    let _ = ch.queue_delete(reply.as_str().into(), QueueDeleteOptions::default()).await;
    let _ = conn.close(200, "ok".into()).await;
    svc.stop().await;
    env.cleanup().await;
}

/// A result the broker answers by closing the channel (its exchange does not exist): only that
/// result is charged and parked; the results published with it in the same batch still arrive,
/// each once.
#[tokio::test]
async fn a_result_that_closes_the_channel_is_parked_alone() {
    let env = Env::new(ONE_TENANT).await;
    let tenant = env.tenant("a");
    let mut settings = env.settings(&Component::ALL);
    settings.backend = BackendKind::Null;
    settings.outbox_max_attempts = 2;
    // Stage the outbox before the publisher runs, so the bad result shares a batch with others.
    let mut no_publisher = settings.clone();
    no_publisher.components.retain(|c| *c != Component::Publisher);
    let svc = env.start_with(no_publisher).await;
    let pool = env.pg().await;
    let mut client = Client::new(&env).await;
    let bad = uuid::Uuid::new_v4();
    sqlx::query(
        "insert into agenttask.outbox (message_id, exchange, routing_key, phase, body, created_at) \
         values ($1, $2, 'x', 'Succeeded', '{}', now() - interval '1 minute')",
    )
    .bind(bad)
    .bind(format!("agenttask.missing-{}", env.id))
    .execute(&pool)
    .await
    .unwrap();
    for i in 0..5 {
        client.submit(&tenant, &json!({"id": format!("ok-{i}"), "language": "python", "code": "1"})).await;
    }
    eventually(WAIT, || async { count(&pool, "select count(*) from agenttask.outbox").await == 6 }).await;
    svc.stop().await;

    let svc = env.start_with(settings).await;
    let mut ids = std::collections::BTreeSet::new();
    for _ in 0..5 {
        let (r, _) = client.next(WAIT).await;
        assert!(ids.insert(r["id"].as_str().unwrap().to_owned()), "a duplicate: {r}");
    }
    eventually(WAIT, || async { matches!(outbox_row(&pool, bad).await, Some((2, true, Some(_)))) }).await;
    assert_eq!(count(&pool, "select count(*) from agenttask.outbox").await, 1, "only the bad result stays");
    assert!(client.more(Duration::from_secs(3)).await.is_none(), "a result arrived twice");
    svc.stop().await;
    env.cleanup().await;
}
