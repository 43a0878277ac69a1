//! Retention against a real Postgres: old finished tasks lose their outputs (or their rows),
//! recent and unfinished ones keep everything, the SQL views keep answering, and batches keep
//! consistent counts.

use std::time::Duration;

use chrono::Utc;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use agenttask::config::Component;
use agenttask::metrics::Metrics;
use agenttask::retention::{sweep_once, Retention, Swept};
use agenttask::store::Store;

use crate::support::*;

const DAY: i64 = 86_400;

/// Stores a task of `tenant` in batch `batch` that was submitted `age_days` ago and, when
/// `finished`, ended then with outputs: stdout, stderr, a JSON result and one artifact.
async fn task(pool: &sqlx::PgPool, tenant: &str, batch: &str, phase: &str, age_days: i64) -> uuid::Uuid {
    let id = uuid::Uuid::new_v4();
    let at = Utc::now() - chrono::Duration::seconds(age_days * DAY);
    let finished = matches!(phase, "Succeeded" | "Failed" | "Cancelled" | "Rejected");
    sqlx::query(
        "insert into agenttask.tasks (task_id, tenant, client_id, batch_id, language, phase, exit_code, \
           result, stdout, stderr, artifacts, reply_exchange, reply_routing_key, submitted_at, admitted_at, \
           started_at, finished_at) \
         values ($1, $2, $1::text, $3, 'python', $4, case when $5 then 0 end, \
           case when $5 then '{\"score\": 1}'::jsonb end, 'out', 'err', \
           '[{\"name\": \"a.txt\", \"size\": 1, \"sha256\": \"00\"}]', '', 'nowhere', $6, $6, $6, \
           case when $5 then $6 + interval '2 seconds' end)",
    )
    .bind(id)
    .bind(tenant)
    .bind(batch)
    .bind(phase)
    .bind(finished)
    .bind(at)
    .execute(pool)
    .await
    .unwrap();
    id
}

/// (stdout, stderr, artifacts, result, outputs removed) of a task as stored.
async fn outputs(
    pool: &sqlx::PgPool,
    id: uuid::Uuid,
) -> (Option<String>, Option<String>, serde_json::Value, Option<serde_json::Value>, bool) {
    sqlx::query_as(
        "select stdout, stderr, artifacts, result, outputs_removed_at is not null from agenttask.tasks where task_id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// The batch's row of `agenttask.batch_summary` (counts only), and what the table says.
async fn batch_counts(pool: &sqlx::PgPool, tenant: &str, batch: &str) -> ((i64, i64, i64, i64), i64) {
    let view: (i64, i64, i64, i64) = sqlx::query_as(
        "select total, running, succeeded, failed from agenttask.batch_summary where tenant = $1 and batch_id = $2",
    )
    .bind(tenant)
    .bind(batch)
    .fetch_one(pool)
    .await
    .unwrap();
    let rows: i64 = sqlx::query_scalar("select count(*) from agenttask.tasks where tenant = $1 and batch_id = $2")
        .bind(tenant)
        .bind(batch)
        .fetch_one(pool)
        .await
        .unwrap();
    (view, rows)
}

async fn sweep(store: &Store, metrics: &Metrics, delete_rows: bool) -> Option<Swept> {
    let policy = Retention { keep_for: Duration::from_secs(30 * DAY as u64), delete_rows };
    sweep_once(store, &policy, Utc::now(), metrics, &CancellationToken::new()).await.unwrap()
}

fn counted(metrics: &Metrics, action: &str) -> u64 {
    metrics.retention.with_label_values(&[action]).get()
}

#[tokio::test]
async fn old_finished_tasks_lose_their_outputs_then_their_rows_and_the_views_keep_answering() {
    let env = Env::new("[tenants.{t}-a]\n").await;
    let tenant = env.tenant("a");
    let store = Store::connect(&env.database_url, 2).await.unwrap();
    // The tenants, for agenttask.tenant_usage.
    store.sync_tenants(&agenttask::config::load_tenants_file(&env.tenants_path).unwrap()).await.unwrap();
    let pool = env.pg().await;
    let metrics = Metrics::new();

    let old_ok = task(&pool, &tenant, "b", "Succeeded", 40).await;
    let old_failed = task(&pool, &tenant, "b", "Failed", 31).await;
    let recent = task(&pool, &tenant, "b", "Succeeded", 29).await;
    let running = task(&pool, &tenant, "b", "Running", 40).await;
    let queued = task(&pool, &tenant, "b", "Queued", 40).await;
    // More than one batch of old tasks: the sweep goes on until none is left.
    sqlx::query(
        "insert into agenttask.tasks (task_id, tenant, batch_id, language, phase, stdout, stderr, \
           reply_exchange, reply_routing_key, submitted_at, finished_at) \
         select gen_random_uuid(), $1, 'bulk', 'python', 'Succeeded', 'out', 'err', '', 'nowhere', \
           now() - interval '60 days', now() - interval '60 days' + n * interval '1 second' \
         from generate_series(1, 2500) n",
    )
    .bind(&tenant)
    .execute(&pool)
    .await
    .unwrap();
    let before = batch_counts(&pool, &tenant, "b").await;
    assert_eq!(before, ((5, 1, 2, 1), 5));

    // Another process holds the lock: this one skips the round and changes nothing.
    let mut other = store.dedicated_connection().await.unwrap();
    sqlx::query("select pg_advisory_lock($1)")
        .bind(agenttask::store::retention::RETENTION_LOCK)
        .execute(&mut other)
        .await
        .unwrap();
    assert_eq!(sweep(&store, &metrics, false).await, None);
    assert_eq!(outputs(&pool, old_ok).await.0.as_deref(), Some("out"));
    // Given back explicitly: a dropped connection's lock is released only once the server
    // notices, which a test must not race.
    sqlx::query("select pg_advisory_unlock($1)")
        .bind(agenttask::store::retention::RETENTION_LOCK)
        .execute(&mut other)
        .await
        .unwrap();
    sqlx::Connection::close(other).await.unwrap();

    let swept = sweep(&store, &metrics, false).await.unwrap();
    assert_eq!(swept, Swept { outputs_removed: 2502, deleted: 0 });
    assert_eq!(counted(&metrics, "outputs_removed"), 2502);
    for id in [old_ok, old_failed] {
        let (stdout, stderr, artifacts, result, removed) = outputs(&pool, id).await;
        assert_eq!((stdout, stderr, artifacts, removed), (None, None, json!([]), true));
        // The program's JSON result is kept: it is what evaluations score.
        assert_eq!(result, Some(json!({"score": 1})));
    }
    for id in [recent, running, queued] {
        let (stdout, stderr, artifacts, _, removed) = outputs(&pool, id).await;
        assert_eq!((stdout.as_deref(), stderr.as_deref(), removed), (Some("out"), Some("err"), false));
        assert_eq!(artifacts.as_array().map(Vec::len), Some(1));
    }
    // The views answer as before, with null outputs for the swept tasks.
    let view: (String, Option<String>, Option<serde_json::Value>, Option<i32>) =
        sqlx::query_as("select phase, stdout, result, exit_code from agenttask.task_results where task_id = $1")
            .bind(old_ok)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(view, ("Succeeded".into(), None, Some(json!({"score": 1})), Some(0)));
    assert_eq!(batch_counts(&pool, &tenant, "b").await, before, "batch_summary unchanged");
    let usage: i64 = sqlx::query_scalar("select queued from agenttask.tenant_usage where tenant = $1")
        .bind(&tenant)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(usage, 1);

    // A row is visited once.
    assert_eq!(sweep(&store, &metrics, false).await, Some(Swept::default()));

    // Deleting rows reaches the already swept ones too; unfinished and recent rows stay, and the
    // batch's counts follow its rows.
    let swept = sweep(&store, &metrics, true).await.unwrap();
    assert_eq!(swept, Swept { outputs_removed: 0, deleted: 2502 });
    assert_eq!(counted(&metrics, "deleted"), 2502);
    let left: Vec<uuid::Uuid> =
        sqlx::query_scalar("select task_id from agenttask.tasks order by task_id").fetch_all(&pool).await.unwrap();
    let mut expected = vec![recent, running, queued];
    expected.sort();
    assert_eq!(left, expected);
    assert_eq!(batch_counts(&pool, &tenant, "b").await, ((3, 1, 1, 0), 3));
    let bulk: i64 = sqlx::query_scalar("select count(*) from agenttask.batch_summary where batch_id = 'bulk'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(bulk, 0, "a batch whose tasks are all gone is gone from the view");
    // The queued-count triggers saw no queued task go.
    let counter: i64 = sqlx::query_scalar("select queued from agenttask.queued_counts where tenant = $1")
        .bind(&tenant)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(counter, 1);

    pool.close().await;
    store.pool().close().await;
    env.cleanup().await;
}

#[tokio::test]
async fn the_service_sweeps_with_its_scheduler_and_the_api_shows_what_is_kept() {
    let env = Env::new("[tenants.{t}-a]\n").await;
    let tenant = env.tenant("a");
    // The schema exists before the service starts, so the old task is there at its first sweep.
    drop(Store::connect(&env.database_url, 1).await.unwrap());
    let pool = env.pg().await;
    let old = task(&pool, &tenant, "b", "Succeeded", 40).await;
    let recent = task(&pool, &tenant, "b", "Succeeded", 1).await;
    let svc = env.start_with(env.settings(&[Component::Http, Component::Scheduler])).await;

    eventually(Duration::from_secs(20), || async { outputs(&pool, old).await.4 }).await;
    let (status, body) = api_call(&svc, reqwest::Method::GET, &format!("/v1/tasks/{old}"), "test-admin-token").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!((body["stdout"].as_str(), body["stderr"].as_str()), (Some(""), Some("")), "{body}");
    assert_eq!((body["artifacts"].clone(), body["result"].clone()), (json!([]), json!({"score": 1})), "{body}");
    assert!(body["outputs_removed_at"].is_string(), "{body}");
    let (status, body) =
        api_call(&svc, reqwest::Method::GET, &format!("/v1/tasks/{old}/logs"), "test-admin-token").await;
    assert_eq!((status, body["code"].as_str()), (410, Some("gone")), "{body}");
    assert!(body["message"].as_str().is_some_and(|m| m.contains("removed by retention")), "{body}");
    let (_, body) = api_call(&svc, reqwest::Method::GET, &format!("/v1/tasks/{recent}"), "test-admin-token").await;
    assert_eq!(body["stdout"].as_str(), Some("out"), "a recent task keeps its outputs: {body}");
    assert!(body.get("outputs_removed_at").is_none(), "{body}");
    let metrics = reqwest::get(format!("http://{}/metrics", svc.http_addr)).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("agenttask_retention_tasks_total{action=\"outputs_removed\"} 1"), "{metrics}");

    svc.stop().await;
    pool.close().await;
    env.cleanup().await;
}
