//! Fair-share admission through the real service: starvation, quotas, backlog cap, live tenant
//! changes, queue position, and two schedulers with a leader killed.

use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::options::ConfirmSelectOptions;
use serde_json::{json, Value};

use agenttask::config::Component;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_flood_from_one_tenant_does_not_starve_another() {
    let env = Env::new(
        "[defaults]\nrate_per_second = 100000\nmax_queued = 100000\n\
         [tenants.{t}-a]\nmax_concurrency = 100\n[tenants.{t}-b]\nmax_concurrency = 100\n",
    )
    .await;
    let svc = env.start().await; // max_running = 4
    let (a, b) = (env.tenant("a"), env.tenant("b"));
    let conn = env.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    for i in 0..5000 {
        publish_plain(&ch, &a, &sleeper(&format!("a-{i}"), 0.3)).await;
    }
    ch.wait_for_confirms().await.unwrap();
    let pool = env.pg().await;
    // A holds every slot and has a deep backlog.
    eventually(WAIT, || {
        let pool = pool.clone();
        async move {
            count(&pool, "select count(*) from agenttask.tasks where phase in ('Pending','Scheduled','Running')").await
                == 4
                && count(&pool, "select count(*) from agenttask.tasks where phase = 'Queued'").await > 1000
        }
    })
    .await;
    for i in 0..10 {
        publish_plain(&ch, &b, &json!({"id": format!("b-{i}"), "language": "python", "code": "print('b')"})).await;
    }
    // The moment B's first task is visible in the queue, note how many of A's were admitted.
    let a_admitted = |before: Option<DateTime<Utc>>| {
        let pool = pool.clone();
        let a = a.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "select count(*) from agenttask.tasks where tenant = $1 and admitted_at is not null \
                 and ($2::timestamptz is null or admitted_at < $2)",
            )
            .bind(&a)
            .bind(before)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let mut a_before = None;
    for _ in 0..6000 {
        let visible: i64 = sqlx::query_scalar("select count(*) from agenttask.tasks where tenant = $1")
            .bind(&b)
            .fetch_one(&pool)
            .await
            .unwrap();
        if visible > 0 {
            a_before = Some(a_admitted(None).await);
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let a_before = a_before.expect("B's tasks were stored");
    let b_tenant = b.clone();
    let pool2 = pool.clone();
    let first_b: std::sync::Arc<tokio::sync::Mutex<Option<DateTime<Utc>>>> = Default::default();
    let slot = first_b.clone();
    eventually(WAIT, move || {
        let pool = pool2.clone();
        let b = b_tenant.clone();
        let slot = slot.clone();
        async move {
            let first: Option<DateTime<Utc>> =
                sqlx::query_scalar("select min(admitted_at) from agenttask.tasks where tenant = $1")
                    .bind(&b)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            *slot.lock().await = first;
            first.is_some()
        }
    })
    .await;
    let b_admitted = first_b.lock().await.unwrap();
    // Once B has a queued task, A may win at most the one round that was already deciding:
    // B waits for one completion, not for A's backlog.
    let a_in_between = a_admitted(Some(b_admitted)).await - a_before;
    assert!(a_in_between <= 1, "A was admitted {a_in_between} times before B's first task");
    // And then B keeps getting its share: all ten of B's tasks finish while A's backlog is still deep.
    let b_tenant = b.clone();
    let pool3 = pool.clone();
    eventually(WAIT, move || {
        let pool = pool3.clone();
        let b = b_tenant.clone();
        async move {
            let done: i64 =
                sqlx::query_scalar("select count(*) from agenttask.tasks where tenant = $1 and phase = 'Succeeded'")
                    .bind(&b)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            done == 10
        }
    })
    .await;
    let a_queued: i64 = count(&pool, "select count(*) from agenttask.tasks where phase = 'Queued'").await;
    assert!(a_queued > 1000, "B finished only after A's backlog drained ({a_queued} left)");
    // The fairness metrics are exported.
    let metrics = reqwest::get(format!("http://{}/metrics", svc.http_addr)).await.unwrap().text().await.unwrap();
    for needle in [
        format!("agenttask_fair_share{{tenant=\"{a}\"}}"),
        "agenttask_fairness_index".to_owned(),
        format!("agenttask_tasks_admitted_total{{tenant=\"{b}\"}} 10"),
    ] {
        assert!(metrics.contains(&needle), "{needle} missing from /metrics");
    }
    pool.close().await;
    let _ = conn.close(200, "ok".into()).await;
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn max_concurrency_holds_and_the_backlog_cap_rejects() {
    let Started { env, svc, mut client, tenant } =
        started("[tenants.{t}-a]\nmax_concurrency = 1\nmax_queued = 3\n").await;
    let pool = env.pg().await;
    client.submit(&tenant, &sleeper("long", 8.0)).await;
    until_count(WAIT, &pool, "select count(*) from agenttask.tasks where phase = 'Running'", |n| n == 1).await;
    for i in 0..3 {
        client.submit(&tenant, &json!({"id": format!("q-{i}"), "language": "python", "code": "print(1)"})).await;
    }
    until_count(WAIT, &pool, "select count(*) from agenttask.tasks where phase = 'Queued'", |n| n == 3).await;
    client.submit(&tenant, &json!({"id": "one-too-many", "language": "python", "code": "print(1)"})).await;
    let (r, _) = client.next(WAIT).await;
    assert_eq!((r["id"].as_str(), r["reason"].as_str()), (Some("one-too-many"), Some("BacklogFull")), "{r:#}");
    assert!(r["message"].as_str().unwrap().contains("max_queued"));
    // max_concurrency = 1: the queued tasks never ran alongside the long one.
    let running =
        count(&pool, "select count(*) from agenttask.tasks where phase in ('Pending','Scheduled','Running')").await;
    assert_eq!(running, 1);
    for _ in 0..4 {
        let (r, _) = client.next(WAIT).await;
        assert_eq!(r["phase"], "Succeeded", "{r:#}");
    }
    let overlaps: i64 = count(
        &pool,
        "select count(*) from agenttask.tasks x join agenttask.tasks y on x.task_id < y.task_id \
         where x.phase = 'Succeeded' and y.phase = 'Succeeded' \
         and x.admitted_at < y.finished_at and y.admitted_at < x.finished_at",
    )
    .await;
    assert_eq!(overlaps, 0, "two tasks of a max_concurrency=1 tenant overlapped");
    pool.close().await;
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn position_and_priority_within_a_tenant() {
    let Started { env, svc, client, tenant } = started("[tenants.{t}-a]\nmax_concurrency = 1\n").await;
    let pool = env.pg().await;
    client.submit(&tenant, &sleeper("blocker", 30.0)).await;
    until_count(WAIT, &pool, "select count(*) from agenttask.tasks where phase = 'Running'", |n| n == 1).await;
    for id in ["p1", "p2", "p3"] {
        client.submit(&tenant, &json!({"id": id, "language": "python", "code": "print(1)"})).await;
    }
    client.submit(&tenant, &json!({"id": "urgent", "language": "python", "code": "print(1)", "priority": 50})).await;
    until_count(WAIT, &pool, "select count(*) from agenttask.tasks where phase = 'Queued'", |n| n == 4).await;
    let id_of = |cid: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, uuid::Uuid>("select task_id from agenttask.tasks where client_id = $1")
                .bind(cid)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let ctl = |args: Vec<String>| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentctl"));
        cmd.args(args)
            .env("AGENTCTL_SERVER", format!("http://{}", svc.http_addr))
            .env("AGENTCTL_TOKEN", "test-admin-token");
        cmd.output()
    };
    let p3 = id_of("p3").await;
    let out = ctl(vec!["position".into(), p3.to_string(), "-o".into(), "json".into()]).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let p: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((p["position"].as_i64(), p["queued"].as_i64()), (Some(4), Some(4)), "{p:#}");
    let urgent = id_of("urgent").await;
    let out = ctl(vec!["position".into(), urgent.to_string()]).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("#1 of 4"), "{text}");
    assert!(text.contains("estimated wait"), "{text}");
    pool.close().await;
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn tenant_apply_changes_quotas_and_tenants_without_a_restart() {
    let env = Env::new("[tenants.{t}-a]\nmax_concurrency = 1\n").await;
    let svc = env.start().await;
    let tenant = env.tenant("a");
    let pool = env.pg().await;
    let client = Client::new(&env).await;
    for i in 0..6 {
        client.submit(&tenant, &sleeper(&format!("s-{i}"), 2.0)).await;
    }
    until_count(WAIT, &pool, "select count(*) from agenttask.tasks where phase = 'Running'", |n| n == 1).await;
    // Raise the quota and add a tenant, live.
    let file = env.dir.path().join("new-tenants.toml");
    std::fs::write(&file, format!("[tenants.{tenant}]\nmax_concurrency = 4\n[tenants.{}]\n", env.tenant("b"))).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentctl"))
        .args(["tenant", "apply", "-f", file.to_str().unwrap()])
        .env("AGENTCTL_SERVER", format!("http://{}", svc.http_addr))
        .env("AGENTCTL_TOKEN", "test-admin-token")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("applied 2 tenants"));
    eventually(WAIT, || {
        let pool = pool.clone();
        async move {
            count(&pool, "select count(*) from agenttask.tasks where phase in ('Pending','Scheduled','Running')").await
                == 4
        }
    })
    .await;
    // The new tenant's queue is consumed.
    let mut client_b = Client::new(&env).await;
    let queue_b = format!("agenttask.tasks.{}", env.tenant("b"));
    eventually(WAIT, || queue_has_consumer(&client_b.conn, &queue_b)).await;
    client_b.submit(&env.tenant("b"), &json!({"id": "new-tenant", "language": "python", "code": "print('b')"})).await;
    let (r, _) = client_b.next(WAIT).await;
    assert_eq!((r["phase"].as_str(), r["stdout"].as_str()), (Some("Succeeded"), Some("b\n")), "{r:#}");
    // A bad file changes nothing and says why.
    let tenant_list = || async {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentctl"))
            .args(["tenant", "list", "-o", "json"])
            .env("AGENTCTL_SERVER", format!("http://{}", svc.http_addr))
            .env("AGENTCTL_TOKEN", "test-admin-token")
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let list: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        list.iter()
            .map(|t| (t["tenant"].as_str().unwrap().to_owned(), t["policy"]["max_concurrency"].as_u64().unwrap()))
            .collect::<Vec<_>>()
    };
    let before = tenant_list().await;
    assert_eq!(before, vec![(tenant.clone(), 4), (env.tenant("b"), 8)]);
    let body = reqwest::Client::new()
        .put(format!("http://{}/v1/tenants", svc.http_addr))
        .bearer_auth("test-admin-token")
        .body("[tenants.Bad]\n")
        .send()
        .await
        .unwrap();
    assert_eq!(body.status(), 422);
    let err: Value = body.json().await.unwrap();
    assert_eq!(err["code"], "invalid", "{err}");
    assert!(err["message"].as_str().unwrap().contains("not a valid tenant name"), "{err}");
    // Read back after the refused apply: the same tenants with the same quotas.
    assert_eq!(tenant_list().await, before, "a refused tenants file changed the tenants");
    pool.close().await;
    svc.stop().await;
    env.cleanup().await;
}

/// Two scheduler processes against one database; the leader is killed with SIGKILL mid-stream.
/// No task is admitted twice, the tenant's concurrency is never exceeded, everything finishes.
/// Also: SIGHUP makes a process reload the tenants file.
#[tokio::test]
async fn two_schedulers_never_double_admit_and_a_standby_takes_over() {
    let env = Env::new("[tenants.{t}-a]\nmax_concurrency = 3\n").await;
    let tenant = env.tenant("a");
    // The workers: ingest, executor, publisher. Then two schedulers.
    let worker_http = free_port();
    let mut worker = env.spawn_process("worker", "ingest,executor,publisher,http", worker_http, 10);
    // Ready: /readyz answers 200 (the database is migrated, RabbitMQ is up).
    await_ready(format!("127.0.0.1:{worker_http}").parse().unwrap()).await;
    let pool = env.pg().await;
    let mut s1 = env.spawn_process("s1", "scheduler", free_port(), 10);
    // Leadership is the scheduler lock in Postgres: one session holds it, a standby waits on it.
    eventually(WAIT, || leadership(&pool, true, 1)).await;
    let mut s2 = env.spawn_process("s2", "scheduler", free_port(), 10);
    eventually(WAIT, || leadership(&pool, false, 1)).await;
    assert!(leadership(&pool, true, 1).await, "two leaders at once");
    // Wait for ingest to consume before publishing.
    let conn = env.connect().await;
    let queue_a = format!("agenttask.tasks.{tenant}");
    eventually(WAIT, || queue_has_consumer(&conn, &queue_a)).await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    const N: i64 = 30;
    for i in 0..N {
        publish_plain(&ch, &tenant, &sleeper(&format!("ha-{i}"), 0.2)).await;
    }
    ch.wait_for_confirms().await.unwrap();
    until_count(WAIT, &pool, "select count(*) from agenttask.tasks where phase = 'Succeeded'", |n| n >= 5).await;
    s1.child.start_kill().unwrap();
    s1.child.wait().await.unwrap();
    // The standby took the lock: one holder, nobody waiting.
    eventually(WAIT, || async { leadership(&pool, true, 1).await && leadership(&pool, false, 0).await }).await;
    eventually(Duration::from_secs(120), || {
        let pool = pool.clone();
        async move { count(&pool, "select count(*) from agenttask.tasks where phase = 'Succeeded'").await == N }
    })
    .await;
    // The quota, from the stored intervals: a task holds a slot from its admission to its end.
    // The most tasks holding slots at once is the most intervals covering one admission instant.
    let max = count(
        &pool,
        "select coalesce(max(n), 0) from (select count(*) as n from agenttask.tasks x \
           join agenttask.tasks y on y.admitted_at <= x.admitted_at and y.finished_at > x.admitted_at \
           group by x.task_id) m",
    )
    .await;
    assert!(max <= 3, "max_concurrency 3 exceeded: {max} tasks held slots at once");
    assert!(max >= 2, "the tasks never overlapped ({max}): this run proves nothing about the quota");
    let reruns = count(&pool, "select count(*) from agenttask.tasks where attempt <> 1").await;
    assert_eq!(reruns, 0, "a task ran more than once");
    assert_eq!(count(&pool, "select count(*) from agenttask.tasks").await, N);

    // SIGHUP: the worker reloads the file and starts consuming a new tenant's queue.
    let b = env.tenant("b");
    std::fs::write(&env.tenants_path, format!("[tenants.{tenant}]\nmax_concurrency = 3\n[tenants.{b}]\n")).unwrap();
    let pid = worker.child.id().unwrap() as i32;
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let queue_b = format!("agenttask.tasks.{b}");
    eventually(WAIT, || queue_has_consumer(&conn, &queue_b)).await;
    publish_plain(&ch, &b, &json!({"id": "after-hup", "language": "python", "code": "print(1)"})).await;
    eventually(WAIT, || {
        let pool = pool.clone();
        async move {
            count(&pool, "select count(*) from agenttask.tasks where client_id = 'after-hup' and phase = 'Succeeded'")
                .await
                == 1
        }
    })
    .await;

    pool.close().await;
    let _ = conn.close(200, "ok".into()).await;
    for p in [&mut s2, &mut worker] {
        unsafe { libc::kill(p.child.id().unwrap() as i32, libc::SIGTERM) };
        let status =
            tokio::time::timeout(Duration::from_secs(20), p.child.wait()).await.expect("stops on SIGTERM").unwrap();
        assert!(status.success(), "clean exit on SIGTERM");
    }
    env.cleanup().await;
}

/// Whether `n` sessions hold (`granted`) or wait for the scheduler's leadership lock in this
/// test's database.
async fn leadership(pool: &sqlx::PgPool, granted: bool, n: i64) -> bool {
    let found: i64 = sqlx::query_scalar(
        "select count(*) from pg_locks where locktype = 'advisory' and granted = $1 \
         and database = (select oid from pg_database where datname = current_database()) \
         and ((classid::bigint << 32) | objid::bigint) = $2",
    )
    .bind(granted)
    .bind(0x4147_454e_5454_534b_i64)
    .fetch_one(pool)
    .await
    .unwrap();
    found == n
}

#[tokio::test]
async fn a_task_larger_than_the_whole_service_is_rejected() {
    let Started { env, svc, mut client, tenant } = started_with("[tenants.{t}-a]\nmax_memory = \"4Gi\"\n", |env| {
        let mut settings = env.settings(&Component::ALL);
        settings.capacity_memory_bytes = Some(1 << 30);
        settings
    })
    .await;
    client
        .submit(
            &tenant,
            &json!({"id": "huge", "language": "python", "code": "print(1)", "resources": {"memory": "2Gi"}}),
        )
        .await;
    let (r, _) = client.next(WAIT).await;
    assert_eq!(r["phase"], "Rejected", "{r:#}");
    assert!(r["message"].as_str().unwrap().contains("whole capacity"), "{r:#}");
    let _: Value = r;
    svc.stop().await;
    env.cleanup().await;
}

/// `max_queued` holds exactly while 64 publishers race and ingest stores many messages at once:
/// the count and the insert are one step (a locked per-tenant counter), not two.
#[tokio::test]
async fn the_backlog_cap_is_exact_under_64_concurrent_publishers() {
    let env = Env::new("[tenants.{t}-a]\nmax_queued = 5\nrate_per_second = 100000\n").await;
    // No scheduler: nothing leaves the queue, so every insert past the fifth must be refused.
    let mut settings = env.settings(&[Component::Ingest, Component::Http]);
    settings.prefetch = 256;
    let svc = env.start_with(settings).await;
    let tenant = env.tenant("a");
    let pool = env.pg().await;
    let conn = env.connect().await;
    let mut publishers = Vec::new();
    for p in 0..64 {
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(lapin::options::ConfirmSelectOptions::default()).await.unwrap();
        let tenant = tenant.clone();
        publishers.push(tokio::spawn(async move {
            for i in 0..4 {
                let id = format!("p{p}-{i}");
                crate::support::publish_plain(
                    &ch,
                    &tenant,
                    &json!({"id": id, "language": "python", "code": "print(1)"}),
                )
                .await;
            }
        }));
    }
    for p in publishers {
        p.await.unwrap();
    }
    // A positive end: every one of the 256 messages is stored, as a task or as a rejection.
    until_count(WAIT, &pool, "select count(*) from agenttask.tasks", |n| n == 256).await;
    assert_eq!(count(&pool, "select count(*) from agenttask.tasks where phase = 'Queued'").await, 5);
    assert_eq!(count(&pool, "select count(*) from agenttask.tasks where reason = 'BacklogFull'").await, 251);
    // The counter agrees with the rows it counts.
    let counted: i64 = sqlx::query_scalar("select queued from agenttask.queued_counts where tenant = $1")
        .bind(&tenant)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(counted, 5);
    let _ = conn.close(200, "ok".into()).await;
    svc.stop().await;
    env.cleanup().await;
}
