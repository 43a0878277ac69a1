//! The execution seam end to end: cancelling from agentctl, and the null backend.

use std::time::{Duration, Instant};

use lapin::options::BasicPublishOptions;
use serde_json::{json, Value};

use agenttask::config::{BackendKind, Component};

use crate::support::*;

const WAIT: Duration = Duration::from_secs(30);

/// Runs the real agentctl binary against the service; returns (exit code, stdout, stderr).
async fn agentctl(svc: &Service, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentctl"))
        .args(["--server", &format!("http://{}", svc.http_addr), "--token", "test-admin-token"])
        .args(args)
        .env_remove("AGENTCTL_TENANT")
        .output()
        .await
        .expect("agentctl runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn agentctl_cancels_a_queued_and_a_running_task_each_with_exactly_one_result() {
    let env = Env::new("[tenants.{t}-a]\nmax_concurrency = 1\n").await;
    let svc = env.start().await;
    let mut client = Client::new(&env).await;
    let pool = env.pg().await;
    let tenant = env.tenant("a");
    // The first one runs (a 30 s sleep); the second waits behind it (concurrency 1).
    client.submit(&tenant, &sleeper("runs", 30.0)).await;
    // Generous: on a loaded 2-core host a sandbox may wait for a free uid slot.
    eventually(Duration::from_secs(90), || async { phase(&pool, "runs").await == "Running" }).await;
    client.submit(&tenant, &sleeper("waits", 30.0)).await;
    eventually(WAIT, || async { !phase(&pool, "waits").await.is_empty() }).await;
    assert_eq!(phase(&pool, "waits").await, "Queued");

    // Queued: cancelled at once, without running.
    let waits = task_id(&pool, "waits").await;
    let (code, out, err) = agentctl(&svc, &["cancel", &waits]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("cancelled before it ran"), "{out}");
    let (r, props) = client.next(WAIT).await;
    assert_eq!(
        (r["id"].as_str(), r["phase"].as_str(), r["reason"].as_str()),
        (Some("waits"), Some("Cancelled"), Some("Cancelled")),
        "{r:#}"
    );
    assert_eq!(r["started_at"], Value::Null, "it never ran: {r:#}");
    assert_eq!(header(&props, "x-agenttask-phase").as_deref(), Some("Cancelled"));

    // Running: killed; its result is Cancelled too.
    let runs = task_id(&pool, "runs").await;
    let asked = Instant::now();
    let (code, out, err) = agentctl(&svc, &["cancel", &runs]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("being stopped"), "{out}");
    let (r, _) = client.next(WAIT).await;
    let took = asked.elapsed();
    assert_eq!(
        (r["id"].as_str(), r["phase"].as_str(), r["reason"].as_str()),
        (Some("runs"), Some("Cancelled"), Some("Cancelled")),
        "{r:#}"
    );
    assert_eq!(r["backend"], "local");
    eprintln!("running task cancelled: result {took:?} after the request");
    // Far below the 30 s sleep: the sandbox was killed, not waited for.
    assert!(took < Duration::from_secs(10), "cancel took {took:?}");

    // Exactly one result each: both rows are terminal and the outbox is drained, and nothing
    // more arrived.
    eventually(WAIT, || async { count(&pool, "select count(*) from agenttask.outbox").await == 0 }).await;
    assert_eq!(
        count(&pool, "select count(*) from agenttask.tasks where phase = 'Cancelled' and reason = 'Cancelled'").await,
        2
    );
    assert!(client.more(Duration::from_millis(500)).await.is_none());

    // A finished task: nothing changes, and agentctl says so with exit 1.
    let (code, _, err) = agentctl(&svc, &["cancel", &runs]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("already finished (Cancelled)"), "{err}");
    // An unknown one: a 404 with a message, exit 2.
    let (code, _, err) = agentctl(&svc, &["cancel", &uuid::Uuid::new_v4().to_string()]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("404") && err.contains("no task"), "{err}");
    assert!(client.more(Duration::from_millis(300)).await.is_none());
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn agentctl_cancels_a_whole_batch() {
    let env = Env::new("[tenants.{t}-a]\nmax_concurrency = 1\n").await;
    let svc = env.start().await;
    let mut client = Client::new(&env).await;
    let pool = env.pg().await;
    let tenant = env.tenant("a");
    for i in 0..3 {
        let mut task = sleeper(&format!("b-{i}"), 30.0);
        task["batch_id"] = json!("batch-1");
        client.submit(&tenant, &task).await;
    }
    // Generous: on a loaded 2-core host a sandbox may wait for a free uid slot.
    eventually(Duration::from_secs(90), || async {
        count(&pool, "select count(*) from agenttask.tasks where batch_id = 'batch-1' and phase = 'Running'").await == 1
            && count(&pool, "select count(*) from agenttask.tasks where batch_id = 'batch-1' and phase = 'Queued'")
                .await
                == 2
    })
    .await;
    let (code, out, err) = agentctl(&svc, &["cancel", "--tenant", &tenant, "--batch", "batch-1"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("2 cancelled before running, 1 being stopped"), "{out}");
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (r, _) = client.next(WAIT).await;
        assert_eq!(r["phase"], "Cancelled", "{r:#}");
        ids.push(r["id"].as_str().unwrap().to_owned());
    }
    ids.sort();
    assert_eq!(ids, ["b-0", "b-1", "b-2"]);
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn two_thousand_tasks_through_the_null_backend_all_succeed() {
    const N: usize = 2000;
    let env = Env::new("[tenants.{t}-a]\nmax_concurrency = 256\nrate_per_second = 100000\nmax_queued = 100000\n").await;
    let mut settings = env.settings(&Component::ALL);
    settings.backend = BackendKind::Null;
    settings.max_running = 256;
    let svc = env.start_with(settings).await;
    let mut client = Client::new(&env).await;
    let tenant = env.tenant("a");
    // Publish with pipelined confirms, then wait for them all.
    let mut confirms = Vec::with_capacity(N);
    for i in 0..N {
        let body =
            serde_json::to_vec(&json!({"id": format!("n-{i}"), "language": "python", "code": "print(1)"})).unwrap();
        let c = client
            .channel
            .basic_publish(
                "agenttask.tasks".into(),
                tenant.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                client.props(&format!("n-{i}")),
            )
            .await
            .unwrap();
        confirms.push(c);
    }
    for c in confirms {
        assert!(c.await.unwrap().is_ack());
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..N {
        let (r, _) = client.next(Duration::from_secs(120)).await;
        assert_eq!(
            (r["phase"].as_str(), r["exit_code"].as_i64(), r["backend"].as_str()),
            (Some("Succeeded"), Some(0), Some("null")),
            "{r:#}"
        );
        assert_eq!(r["stdout"], "");
        assert!(seen.insert(r["id"].as_str().unwrap().to_owned()), "duplicate result {r:#}");
    }
    assert_eq!(seen.len(), N);
    let pool = env.pg().await;
    assert_eq!(
        count(&pool, "select count(*) from agenttask.tasks where phase = 'Succeeded' and backend = 'null'").await,
        N as i64
    );
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_removed_tenants_unstarted_tasks_are_kept_or_cancelled_as_the_operator_says() {
    let env = Env::new("[tenants.{t}-a]\n[tenants.{t}-b]\nmax_concurrency = 1\n").await;
    let svc = env.start().await;
    let mut client = Client::new(&env).await;
    let pool = env.pg().await;
    let b = env.tenant("b");
    client.submit(&b, &sleeper("b-runs", 30.0)).await;
    eventually(Duration::from_secs(90), || async { phase(&pool, "b-runs").await == "Running" }).await;
    client.submit(&b, &sleeper("b-waits-1", 1.0)).await;
    client.submit(&b, &sleeper("b-waits-2", 1.0)).await;
    eventually(WAIT, || async {
        phase(&pool, "b-waits-1").await == "Queued" && phase(&pool, "b-waits-2").await == "Queued"
    })
    .await;
    let only_a = env.dir.path().join("only-a.toml");
    std::fs::write(&only_a, format!("[tenants.{}]\n", env.tenant("a"))).unwrap();
    let file = only_a.to_str().unwrap();

    // Keep (the default): b's queued tasks stay queued.
    let (code, out, err) = agentctl(&svc, &["tenant", "apply", "-f", file]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains("cancelled"), "{out}");
    assert_eq!(phase(&pool, "b-waits-1").await, "Queued");

    // Cancel: each unstarted task gets its one Cancelled result; the running one goes on.
    let (code, out, err) = agentctl(&svc, &["tenant", "apply", "-f", file, "--removed", "cancel"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("cancelled 2 unstarted tasks of removed tenants"), "{out}");
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (r, _) = client.next(WAIT).await;
        assert_eq!((r["phase"].as_str(), r["reason"].as_str()), (Some("Cancelled"), Some("Cancelled")), "{r:#}");
        ids.push(r["id"].as_str().unwrap().to_owned());
    }
    ids.sort();
    assert_eq!(ids, ["b-waits-1", "b-waits-2"]);
    assert_eq!(phase(&pool, "b-runs").await, "Running");
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn the_executors_store_calls_compose_in_a_callers_transaction() {
    use agenttask::store::{self, Store};
    let env = Env::new(ONE_TENANT).await;
    let tenant = env.tenant("a");
    let db = Store::connect(&env.database_url, 2).await.unwrap();
    let pool = db.pool();
    let id = uuid::Uuid::new_v4();
    sqlx::query(
        "insert into agenttask.tasks (task_id, tenant, phase, reply_exchange, reply_routing_key, admitted_at) \
         values ($1, $2, 'Pending', '', 'x', now())",
    )
    .bind(id)
    .bind(&tenant)
    .execute(pool)
    .await
    .unwrap();
    let state = || async {
        sqlx::query_as::<_, (String, i32, Option<uuid::Uuid>)>(
            "select phase, attempt, lease_owner from agenttask.tasks where task_id = $1",
        )
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
    };
    let owner = uuid::Uuid::new_v4();
    let lease = Duration::from_secs(30);

    // Claimed and marked running in the caller's transaction, which then rolls back: nothing
    // of it is left, and the task can still be claimed.
    let mut tx = pool.begin().await.unwrap();
    let claimed = store::claim(&mut *tx, owner, 10, lease).await.unwrap();
    assert_eq!(claimed.iter().map(|c| c.task_id).collect::<Vec<_>>(), [id]);
    let running = store::MarkWrite {
        task_id: id,
        attempt: claimed[0].attempt,
        backend: "null",
        mark: store::Mark::Running { at: chrono::Utc::now() },
    };
    assert_eq!(store::write_journal(&mut tx, &[running], &[]).await.unwrap().marked, [true]);
    assert_eq!(state().await, ("Pending".into(), 0, None), "uncommitted work is invisible outside");
    tx.rollback().await.unwrap();
    assert_eq!(state().await, ("Pending".into(), 0, None));

    // The same calls committed together take effect together.
    let mut tx = pool.begin().await.unwrap();
    let claimed = store::claim(&mut *tx, owner, 10, lease).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let placed =
        store::MarkWrite { task_id: id, attempt: claimed[0].attempt, backend: "null", mark: store::Mark::Scheduled };
    assert_eq!(store::write_journal(&mut tx, &[placed], &[]).await.unwrap().marked, [true]);
    tx.commit().await.unwrap();
    assert_eq!(state().await, ("Scheduled".into(), 1, Some(owner)));
    pool.close().await;
    env.cleanup().await;
}

/// The executor's journal against the real schema: one batch of marks and outcomes is written
/// in one transaction, each write guarded by its attempt and phase; a value Postgres refuses
/// fails the whole batch and leaves nothing behind, so the executor can find it run by run; each
/// finished task queues exactly one result (none for a task applied as a Kubernetes object).
#[tokio::test]
async fn a_journal_batch_is_guarded_per_run_atomic_and_queues_one_result_each() {
    use agenttask::exec::{Outcome, Termination};
    use agenttask::store::{self, FinishWrite, Mark, MarkWrite, Store};
    let env = Env::new(ONE_TENANT).await;
    let tenant = env.tenant("a");
    let db = Store::connect(&env.database_url, 2).await.unwrap();
    let pool = db.pool();
    let insert = |phase: &'static str, attempt: i32, kube: Option<&'static str>| {
        let tenant = tenant.clone();
        async move {
            let id = uuid::Uuid::new_v4();
            sqlx::query(
                "insert into agenttask.tasks (task_id, tenant, client_id, language, phase, attempt, timeout_seconds, \
                   reply_exchange, reply_routing_key, correlation_id, admitted_at, kube_object) \
                 values ($1, $2, $3, 'python', $4, $5, 30, '', 'replies', 'corr-' || $3, now(), $6)",
            )
            .bind(id)
            .bind(&tenant)
            .bind(id.to_string())
            .bind(phase)
            .bind(attempt)
            .bind(kube)
            .execute(pool)
            .await
            .unwrap();
            id
        }
    };
    // Attempt 1 of `stale` reports, but attempt 2 owns the task now.
    let stale = insert("Running", 2, None).await;
    let refused = insert("Running", 1, None).await;
    let ok = insert("Scheduled", 1, None).await;
    let failed = insert("Running", 1, None).await;
    let applied = insert("Running", 1, Some("ns/applied")).await;
    let placed = insert("Pending", 1, None).await;
    let started = insert("Scheduled", 1, None).await;
    let now = chrono::Utc::now();
    let running_at = now - chrono::Duration::seconds(2);
    let exited = |code: i32, stdout: &str| {
        let mut o = Outcome::bare(Termination::Exited, now - chrono::Duration::seconds(1), now);
        o.exit_code = Some(code);
        o.stdout.text = stdout.into();
        o
    };
    let (stale_o, refused_o, ok_o, failed_o, applied_o) =
        (exited(0, ""), exited(0, "a\0b"), exited(0, "hi\n"), exited(2, ""), exited(0, ""));
    let finish = |task_id, attempt, outcome, running_at| FinishWrite {
        task_id,
        attempt,
        backend: Some("null"),
        outcome,
        timeout_seconds: 30,
        running_at,
    };
    let marks = [
        MarkWrite { task_id: placed, attempt: 1, backend: "null", mark: Mark::Scheduled },
        MarkWrite { task_id: started, attempt: 1, backend: "null", mark: Mark::Running { at: running_at } },
    ];
    let state = |id| async move {
        sqlx::query_as::<_, (String, Option<String>, i32)>(
            "select phase, reason, (select count(*)::int from agenttask.outbox where message_id = $1) \
             from agenttask.tasks where task_id = $1",
        )
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
    };

    // With the refused value: nothing of the batch is written.
    let mut conn = pool.acquire().await.unwrap();
    let all = [
        finish(stale, 1, &stale_o, None),
        finish(refused, 1, &refused_o, None),
        finish(ok, 1, &ok_o, Some(running_at)),
        finish(failed, 1, &failed_o, None),
        finish(applied, 1, &applied_o, None),
    ];
    let err = store::write_journal(&mut conn, &marks, &all).await.unwrap_err();
    assert!(err.is_bad_value(), "{err}");
    assert_eq!(state(ok).await, ("Scheduled".into(), None, 0));
    assert_eq!(state(placed).await, ("Pending".into(), None, 0));
    assert_eq!(count(pool, "select count(*) from agenttask.outbox").await, 0);

    // Without it, every write is decided by its own guard.
    let rest = [all[0], all[2], all[3], all[4]];
    let written = store::write_journal(&mut conn, &marks, &rest).await.unwrap();
    assert_eq!(written.marked, [true, true]);
    assert_eq!(written.finished, [false, true, true, true]);
    assert_eq!(state(stale).await, ("Running".into(), None, 0), "the stale attempt changed nothing");
    assert_eq!(state(ok).await, ("Succeeded".into(), None, 1));
    assert_eq!(state(failed).await, ("Failed".into(), Some("NonZeroExit".into()), 1));
    assert_eq!(state(applied).await, ("Succeeded".into(), None, 0), "an applied object's status is its answer");
    assert_eq!(state(placed).await, ("Scheduled".into(), None, 0));
    assert_eq!(state(started).await, ("Running".into(), None, 0));
    // The result carries the row as written: the folded Running mark's start, the output, the route.
    let (body, routing_key, correlation_id): (Vec<u8>, String, Option<String>) =
        sqlx::query_as("select body, routing_key, correlation_id from agenttask.outbox where message_id = $1")
            .bind(ok)
            .fetch_one(pool)
            .await
            .unwrap();
    let result: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((result["phase"].as_str(), result["stdout"].as_str()), (Some("Succeeded"), Some("hi\n")), "{result:#}");
    assert_eq!(result["id"].as_str(), Some(ok.to_string().as_str()));
    let started_at: chrono::DateTime<chrono::Utc> = result["started_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(started_at.timestamp_millis(), running_at.timestamp_millis(), "{result:#}");
    assert_eq!((routing_key.as_str(), correlation_id), ("replies", Some(format!("corr-{ok}"))));

    // Written again (a retry after a lost commit reply): nothing moves, no second result.
    let again = store::write_journal(&mut conn, &marks, &rest).await.unwrap();
    assert_eq!((again.marked, again.finished), (vec![false, false], vec![false; 4]));
    assert_eq!(count(pool, "select count(*) from agenttask.outbox").await, 2);

    // The culprit alone is refused too; its stand-in BackendError is stored with its one result.
    let err = store::write_journal(&mut conn, &[], &[all[1]]).await.unwrap_err();
    assert!(err.is_bad_value(), "{err}");
    let stand_in = Outcome::backend_error(format!("the task's outcome could not be stored: {err}"), now);
    let written = store::write_journal(&mut conn, &[], &[finish(refused, 1, &stand_in, None)]).await.unwrap();
    assert_eq!(written.finished, [true]);
    assert_eq!(state(refused).await, ("Failed".into(), Some("BackendError".into()), 1));
    drop(conn);
    pool.close().await;
    env.cleanup().await;
}

/// A program that prints a line, then keeps running for `secs` before printing another.
fn two_lines(id: &str, secs: f64) -> Value {
    let code = format!("import time\nprint('first', flush=True)\ntime.sleep({secs})\nprint('second')\n");
    json!({"id": id, "language": "python", "code": code, "timeout_seconds": 60})
}

#[tokio::test]
async fn agentctl_logs_follows_a_running_task_to_its_end() {
    use tokio::io::AsyncBufReadExt as _;
    let env = Env::new("[tenants.{t}-a]\n").await;
    let svc = env.start().await;
    let mut client = Client::new(&env).await;
    let pool = env.pg().await;
    client.submit(&env.tenant("a"), &two_lines("talks", 4.0)).await;
    // Generous: on a loaded 2-core host a sandbox may wait for a free uid slot.
    eventually(Duration::from_secs(90), || async { phase(&pool, "talks").await == "Running" }).await;
    let id = task_id(&pool, "talks").await;
    let mut follow = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentctl"))
        .args(["--server", &format!("http://{}", svc.http_addr), "--token", "test-admin-token"])
        .args(["logs", "-f", &id])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("agentctl runs");
    let mut lines = tokio::io::BufReader::new(follow.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(WAIT, lines.next_line()).await.expect("a first line").unwrap();
    assert_eq!(first.as_deref(), Some("first"));
    // The first line came while the program was still sleeping: it was streamed, not replayed.
    assert_eq!(phase(&pool, "talks").await, "Running");
    let second = tokio::time::timeout(WAIT, lines.next_line()).await.expect("a second line").unwrap();
    assert_eq!(second.as_deref(), Some("second"));
    assert_eq!(tokio::time::timeout(WAIT, lines.next_line()).await.expect("the end").unwrap(), None);
    let status = tokio::time::timeout(WAIT, follow.wait()).await.expect("agentctl ends with the task").unwrap();
    assert!(status.success());
    let (r, _) = client.next(WAIT).await;
    assert_eq!(r["phase"], "Succeeded", "{r:#}");

    // Without -f: the stored output of a finished task.
    let (code, out, err) = agentctl(&svc, &["logs", &id]).await;
    assert_eq!((code, out.as_str()), (0, "first\nsecond\n"), "{err}");
    // Unknown and malformed ids: an error that says so, exit 2.
    let (code, _, err) = agentctl(&svc, &["logs", &uuid::Uuid::new_v4().to_string()]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no task"), "{err}");
    let (code, _, err) = agentctl(&svc, &["logs", "not-a-uuid"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a task id"), "{err}");
    svc.stop().await;
    env.cleanup().await;
}
