//! Ingest's group commit keeps every guarantee of one transaction per message: each message gets
//! exactly one result, duplicates and bad messages included, and a SIGKILL while groups are
//! being committed loses nothing and duplicates nothing. The null backend runs the tasks, so
//! the control plane is what is tested.

use std::collections::HashMap;
use std::time::Duration;

use agenttask::config::BackendKind;
use futures_util::future::join_all;
use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;
use serde_json::{json, Value};

use crate::support::*;

/// A message to publish: the tenant (routing key), the body and its properties.
type Message = (String, Vec<u8>, BasicProperties);

/// A valid `print(1)` task, told apart by its label `l`, for the tests that call the store directly.
fn print_spec(label: &str) -> agenttask::domain::task::TaskSpec {
    use agenttask::domain::task::{Language, Program, TaskSpec};
    TaskSpec {
        language: Language::Python,
        program: Program { code: "print(1)".into(), ..Program::default() },
        timeout_seconds: 30,
        cpu_millis: 500,
        memory_bytes: 256 << 20,
        priority: 0,
        batch_id: None,
        labels: [("l".to_owned(), label.to_owned())].into(),
        isolation: "standard".into(),
    }
}

/// Publishes every message with pipelined confirms (all in flight, then every confirm checked).
async fn publish_all(client: &Client, messages: &[Message]) {
    let mut confirms = Vec::with_capacity(messages.len());
    for (tenant, body, props) in messages {
        let confirm = client
            .channel
            .basic_publish(
                "agenttask.tasks".into(),
                tenant.as_str().into(),
                BasicPublishOptions::default(),
                body,
                props.clone(),
            )
            .await
            .unwrap();
        confirms.push(confirm);
    }
    for c in join_all(confirms).await {
        assert!(c.unwrap().is_ack(), "publish not confirmed");
    }
}

/// The messages of one run: for every unit of 10, six valid tasks with ids, two duplicates of
/// them, one invalid message with an id and one valid task without an id; returned with the
/// distinct correlation ids that must each get exactly one result.
fn mixed_messages(client: &Client, tenants: &[String], units: usize) -> (Vec<Message>, Vec<String>) {
    let mut messages = Vec::new();
    let mut expected = Vec::new();
    for u in 0..units {
        let tenant = &tenants[u % tenants.len()];
        for k in 0..6 {
            let id = format!("ok-{u}-{k}");
            let body = serde_json::to_vec(&json!({"id": id, "language": "python", "code": "print(1)"})).unwrap();
            messages.push((tenant.clone(), body, client.props(&id)));
            expected.push(id);
        }
        for k in [0, 3] {
            // The same message again, as a client retrying after a lost confirm would send it.
            let id = format!("ok-{u}-{k}");
            let body = serde_json::to_vec(&json!({"id": id, "language": "python", "code": "print(1)"})).unwrap();
            messages.push((tenant.clone(), body, client.props(&id)));
        }
        let bad = format!("bad-{u}");
        let body = if u % 2 == 0 {
            serde_json::to_vec(&json!({"id": bad, "language": "cobol", "code": "DISPLAY 1."})).unwrap()
        } else {
            b"{\"id\": \"not json".to_vec()
        };
        messages.push((tenant.clone(), body, client.props(&bad).with_message_id(bad.as_str().into())));
        expected.push(bad);
        let anon = format!("anon-{u}");
        let body = serde_json::to_vec(&json!({"language": "python", "code": "print(2)"})).unwrap();
        messages.push((tenant.clone(), body, client.props(&anon)));
        expected.push(anon);
    }
    (messages, expected)
}

/// Results read until every keyed message and `anonymous` messages without a key have one,
/// then two quiet seconds more (a second result would follow its first closely): for each key
/// (or `task:<id>` for a task without one), the task ids its results carried.
async fn collect_results(
    client: &mut Client,
    keyed: &[String],
    anonymous: usize,
    within: Duration,
) -> HashMap<String, Vec<String>> {
    let mut got: HashMap<String, Vec<String>> = HashMap::new();
    let deadline = tokio::time::Instant::now() + within;
    let anon = |got: &HashMap<String, Vec<String>>| got.keys().filter(|k| k.starts_with("task:")).count();
    while keyed.iter().any(|k| !got.contains_key(k)) || anon(&got) < anonymous {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(result) = client.more(left.max(Duration::from_millis(1))).await else {
            let missing = keyed.iter().filter(|k| !got.contains_key(*k)).count();
            panic!(
                "no result within {within:?} for {missing} keyed messages; {} of {anonymous} anonymous results",
                anon(&got)
            );
        };
        record(&mut got, &result);
    }
    while let Some(result) = client.more(Duration::from_secs(2)).await {
        record(&mut got, &result);
    }
    got
}

fn record(got: &mut HashMap<String, Vec<String>>, result: &Value) {
    let task_id = result["task_id"].as_str().expect("a result has a task id").to_owned();
    let key = result["id"].as_str().map(str::to_owned).unwrap_or_else(|| format!("task:{task_id}"));
    got.entry(key).or_default().push(task_id);
}

#[tokio::test]
async fn every_message_gets_exactly_one_result_with_duplicates_and_bad_messages_mixed_in() {
    let env = Env::new("[defaults]\nmax_concurrency = 256\nmax_queued = 100000\nrate_per_second = 100000\nburst = 100000\n[tenants.{t}-a]\n[tenants.{t}-b]\n[tenants.{t}-c]\n").await;
    let tenants = vec![env.tenant("a"), env.tenant("b"), env.tenant("c")];
    let mut settings = env.settings(&agenttask::config::Component::ALL);
    settings.backend = BackendKind::Null;
    settings.max_running = 256;
    let svc = env.start_with(settings).await;
    let mut client = Client::new(&env).await;
    let pool = env.pg().await;

    // 2,000 units: 20,000 messages, of which 4,000 duplicates and 2,000 invalid.
    let (messages, expected_keys) = mixed_messages(&client, &tenants, 2_000);
    assert_eq!(messages.len(), 20_000);
    publish_all(&client, &messages).await;
    let anonymous = expected_keys.iter().filter(|k| k.starts_with("anon-")).count();
    let keyed: Vec<String> = expected_keys.iter().filter(|k| !k.starts_with("anon-")).cloned().collect();
    let got = collect_results(&mut client, &keyed, anonymous, Duration::from_secs(600)).await;
    // No crash here, so not even a redelivered result: exactly one each.
    let more: Vec<_> = got.iter().filter(|(_, r)| r.len() != 1).collect();
    assert!(more.is_empty(), "more than one result: {:?}", &more[..more.len().min(10)]);
    assert_eq!(got.len(), keyed.len() + anonymous, "a result for something that was not sent");
    assert_eq!(count(&pool, "select count(*) from agenttask.tasks").await, 16_000);
    assert_eq!(count(&pool, "select count(*) from agenttask.tasks where phase = 'Rejected'").await, 2_000);
    assert_eq!(count(&pool, "select count(*) from agenttask.tasks where phase = 'Succeeded'").await, 14_000);
    assert_eq!(count(&pool, "select count(*) from agenttask.outbox").await, 0);

    pool.close().await;
    let _ = client.conn.close(200, "ok".into()).await;
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_sigkill_while_groups_commit_loses_nothing_and_duplicates_nothing() {
    let env = Env::new("[defaults]\nmax_concurrency = 256\nmax_queued = 100000\nrate_per_second = 100000\nburst = 100000\n[tenants.{t}-a]\n[tenants.{t}-b]\n").await;
    let tenants = vec![env.tenant("a"), env.tenant("b")];
    let null = [("AGENTTASK_BACKEND", "null")];
    let mut first = env.spawn_process_with("first", "ingest,scheduler,executor,publisher", free_port(), 256, &null);
    let conn = env.connect().await;
    for t in &tenants {
        let queue = format!("agenttask.tasks.{t}");
        eventually(Duration::from_secs(30), || queue_has_consumer(&conn, &queue)).await;
    }
    let mut client = Client::new(&env).await;
    let pool = env.pg().await;

    // Only keyed, valid tasks and duplicates here: every distinct id must end as one row and
    // one result across the kill.
    let mut messages = Vec::new();
    let mut ids = Vec::new();
    for i in 0..6_000 {
        let id = format!("k-{i}");
        let body = serde_json::to_vec(&json!({"id": id, "language": "python", "code": "print(1)"})).unwrap();
        messages.push((tenants[i % 2].clone(), body.clone(), client.props(&id)));
        if i % 5 == 0 {
            messages.push((tenants[i % 2].clone(), body, client.props(&id)));
        }
        ids.push(id);
    }
    publish_all(&client, &messages).await;
    // Killed once ingest is well under way, so groups are being committed at that moment.
    eventually(Duration::from_secs(120), || {
        let pool = pool.clone();
        async move { count(&pool, "select count(*) from agenttask.tasks").await >= 1_500 }
    })
    .await;
    first.child.start_kill().unwrap();
    first.child.wait().await.unwrap();
    let stored_at_kill = count(&pool, "select count(*) from agenttask.tasks").await;
    assert!(stored_at_kill < 6_000, "the kill came after everything was stored; nothing was tested");

    let mut second = env.spawn_process_with("second", "ingest,scheduler,executor,publisher", free_port(), 256, &null);
    let got = collect_results(&mut client, &ids, 0, Duration::from_secs(600)).await;
    assert_eq!(got.len(), ids.len());
    // A result confirmed by the broker just before the kill, whose outbox row was not yet
    // deleted, is published again (same task, same message_id, which consumers dedup on); a
    // second *task* for one message would be a loss of idempotency.
    for (id, task_ids) in &got {
        assert!(task_ids.iter().all(|t| t == &task_ids[0]), "{id} got results of different tasks: {task_ids:?}");
    }
    assert_eq!(count(&pool, "select count(*) from agenttask.tasks").await, 6_000);
    assert_eq!(count(&pool, "select count(*) from agenttask.tasks where phase = 'Succeeded'").await, 6_000);

    pool.close().await;
    let _ = client.conn.close(200, "ok".into()).await;
    let _ = conn.close(200, "ok".into()).await;
    unsafe { libc::kill(second.child.id().unwrap() as i32, libc::SIGTERM) };
    let _ = tokio::time::timeout(Duration::from_secs(20), second.child.wait()).await;
    env.cleanup().await;
}

/// The set-based insert gives every answer one-by-one inserts would, in the same order, with
/// duplicates (of stored tasks and within the set), a fresh publish replacing an earlier
/// rejection, and a backlog cap that a duplicate does not use up; and a value Postgres refuses
/// undoes the whole set, so ingest can fall back to one by one.
#[tokio::test]
async fn a_set_insert_answers_as_one_by_one_inserts_would() {
    use agenttask::store::{self, BacklogFull, Inserted, NewRejection, NewTask, ReplyTo, Store};
    use chrono::Utc;

    let env = Env::new("[tenants.{t}-one]\n[tenants.{t}-set]\n").await;
    let db = Store::connect(&env.database_url, 2).await.unwrap();
    let pool = db.pool();
    let ok = print_spec("ok");
    let reply = ReplyTo { exchange: "", routing_key: "results" };
    let keys = [Some("k0"), Some("k1"), Some("k1"), Some("r1"), Some("k2"), Some("k3"), Some("k4"), Some("k0"), None];
    // Each tenant starts with `k0` queued and `r1` rejected, and may hold 5 queued tasks.
    let mut answers = Vec::new();
    for suffix in ["one", "set"] {
        let tenant = env.tenant(suffix);
        let task = |key: Option<&'static str>| NewTask {
            tenant: tenant.as_str(),
            client_id: key,
            spec: &ok,
            reply,
            correlation_id: key,
            submitted_at: Utc::now(),
            kube_object: None,
            max_queued: Some(5),
        };
        let mut conn = pool.acquire().await.unwrap();
        assert!(matches!(store::insert_task(&mut conn, &task(Some("k0")), true).await.unwrap(), Ok(Inserted::New(_))));
        let rejection = NewRejection {
            tenant: tenant.as_str(),
            client_id: Some("r1"),
            batch_id: None,
            language: Some(agenttask::domain::task::Language::Python),
            reason: agenttask::domain::phase::Reason::ValidationFailed,
            message: "bad",
            reply,
            correlation_id: None,
            kube_object: None,
        };
        assert!(matches!(store::insert_rejection(&mut conn, &rejection, true).await.unwrap(), Inserted::New(_)));
        let tasks: Vec<NewTask<'_>> = keys.iter().map(|&k| task(k)).collect();
        let fresh = vec![true; tasks.len()];
        let got = if suffix == "one" {
            let mut got = Vec::new();
            for t in &tasks {
                got.push(store::insert_task(&mut conn, t, true).await.unwrap());
            }
            got
        } else {
            store::insert_tasks(&mut conn, &tasks, &fresh).await.unwrap()
        };
        let shape: Vec<&str> = got
            .iter()
            .map(|a| match a {
                Ok(Inserted::New(_)) => "new",
                Ok(Inserted::Duplicate) => "duplicate",
                Err(BacklogFull { .. }) => "full",
            })
            .collect();
        let stored: Vec<(Option<String>, String)> = sqlx::query_as(
            "select client_id, phase from agenttask.tasks where tenant = $1 order by client_id nulls last",
        )
        .bind(&tenant)
        .fetch_all(pool)
        .await
        .unwrap();
        let counted: i64 = sqlx::query_scalar("select queued from agenttask.queued_counts where tenant = $1")
            .bind(&tenant)
            .fetch_one(pool)
            .await
            .unwrap();
        answers.push((shape, stored, counted));
    }
    assert_eq!(answers[0], answers[1], "one by one, then as a set");
    let (shape, _, counted) = &answers[1];
    assert_eq!(
        shape,
        &["duplicate", "new", "duplicate", "new", "new", "new", "full", "full", "full"],
        "k0 exists; k1 twice; r1 replaces its rejection; the cap of 5 is reached at k3"
    );
    assert_eq!(*counted, 5);

    // A NUL in a label is refused by `jsonb`: the error says so, and nothing of the set stays.
    let tenant = env.tenant("one");
    let bad = print_spec("nul \u{0} here");
    let tasks = [Some("b1"), Some("b2")].map(|key| NewTask {
        tenant: tenant.as_str(),
        client_id: key,
        spec: if key == Some("b2") { &bad } else { &ok },
        reply,
        correlation_id: None,
        submitted_at: Utc::now(),
        kube_object: None,
        max_queued: None,
    });
    let mut conn = pool.acquire().await.unwrap();
    let err = store::insert_tasks(&mut conn, &tasks, &[true, true]).await.unwrap_err();
    assert!(err.is_bad_value(), "{err}");
    let left: i64 = sqlx::query_scalar("select count(*) from agenttask.tasks where client_id in ('b1', 'b2')")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    drop(conn);
    pool.close().await;
    env.cleanup().await;
}

/// An admission round moves tasks out of a tenant's queue while an ingest transaction of that
/// tenant holds its entry counter (as a group commit of hundreds of messages does for tens of
/// milliseconds under a flood): the round must not wait for it, and the cap stays exact.
#[tokio::test]
async fn an_admission_does_not_wait_for_an_ingest_holding_the_tenants_counter() {
    use agenttask::store::{self, AdmissionRound, BacklogFull, Inserted, NewTask, ReplyTo, Store};
    use chrono::Utc;

    let env = Env::new("[tenants.{t}-a]\n").await;
    let db = Store::connect(&env.database_url, 4).await.unwrap();
    let pool = db.pool();
    let tenant = env.tenant("a");
    let spec = print_spec("a");
    let task = |key: &'static str| NewTask {
        tenant: tenant.as_str(),
        client_id: Some(key),
        spec: &spec,
        reply: ReplyTo { exchange: "", routing_key: "results" },
        correlation_id: None,
        submitted_at: Utc::now(),
        kube_object: None,
        max_queued: Some(3),
    };
    let mut conn = pool.acquire().await.unwrap();
    let Ok(Inserted::New(first)) = store::insert_task(&mut conn, &task("k1"), true).await.unwrap() else {
        panic!("k1 not inserted")
    };
    assert!(matches!(store::insert_task(&mut conn, &task("k2"), true).await.unwrap(), Ok(Inserted::New(_))));

    // An ingest transaction inserts a third task and stays open, holding the tenant's counter.
    let mut ingest = pool.begin().await.unwrap();
    assert!(matches!(store::insert_task(&mut ingest, &task("k3"), true).await.unwrap(), Ok(Inserted::New(_))));

    // The admission of the first task commits meanwhile. A lock wait would be an error here
    // rather than a slow test: the round may not wait for any lock at all.
    let mut leader = pool.acquire().await.unwrap();
    sqlx::query("set lock_timeout = '2s'").execute(&mut *leader).await.unwrap();
    let mut round = AdmissionRound::begin(&mut leader).await.unwrap();
    let admitted = round.admit(&[first]).await.expect("the admission waited for the ingest's lock");
    assert_eq!(admitted.iter().map(|a| a.task_id).collect::<Vec<_>>(), vec![first]);
    round.commit().await.unwrap();
    ingest.commit().await.unwrap();

    // Three tasks entered and one left: two are queued, and the cap of 3 has room for one more.
    let counted: i64 = sqlx::query_scalar("select queued from agenttask.queued_counts where tenant = $1")
        .bind(tenant.as_str())
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(counted, 2);
    assert!(matches!(store::insert_task(&mut conn, &task("k4"), true).await.unwrap(), Ok(Inserted::New(_))));
    assert!(matches!(store::insert_task(&mut conn, &task("k5"), true).await.unwrap(), Err(BacklogFull { .. })));
    let queued: i64 = sqlx::query_scalar("select count(*) from agenttask.tasks where tenant = $1 and phase = 'Queued'")
        .bind(tenant.as_str())
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(queued, 3);
}
