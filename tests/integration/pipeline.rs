//! End to end through the real service: publish on RabbitMQ, read the result back.

use std::time::Duration;

use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use serde_json::{json, Value};

use agenttask::config::Component;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn python_round_trip_with_stdout_exit_code_and_result() {
    let Started { env, svc, mut client, tenant } = started(ONE_TENANT).await;
    let code = r#"
import json, os, sys
data = sys.stdin.read()
print("hello", sys.argv[1], os.environ["GREETING"], open("input.txt").read(), data)
json.dump({"answer": 42, "cwd": os.getcwd()}, open(os.environ["AGENTTASK_RESULT_FILE"], "w"))
"#;
    client
        .submit(
            &tenant,
            &json!({
                "id": "round-trip-1", "language": "python", "code": code,
                "args": ["arg1"], "env": {"GREETING": "hi"}, "stdin": "from-stdin",
                "files": {"input.txt": {"content": "file-data"}},
                "batch_id": "b1", "labels": {"suite": "pipeline"},
            }),
        )
        .await;
    let (r, props) = client.next(WAIT).await;
    assert_eq!(r["phase"], "Succeeded", "{r:#}");
    assert_eq!(r["exit_code"], 0);
    assert_eq!(r["stdout"], "hello arg1 hi file-data from-stdin\n");
    assert_eq!(r["result"]["answer"], 42);
    assert_eq!(r["id"], "round-trip-1");
    assert_eq!(r["tenant"], tenant.as_str());
    assert_eq!(r["batch_id"], "b1");
    assert_eq!(r["backend"], "local");
    assert_eq!(r["reason"], Value::Null);
    for t in ["submitted_at", "admitted_at", "started_at", "finished_at"] {
        assert!(r[t].is_string(), "{t} missing: {r:#}");
    }
    assert!(r["duration_ms"].as_i64().unwrap() >= 0);
    // AMQP properties of the contract.
    assert_eq!(props.correlation_id().as_ref().unwrap().as_str(), "round-trip-1");
    assert_eq!(props.message_id().as_ref().unwrap().as_str(), r["task_id"].as_str().unwrap());
    assert_eq!(header(&props, "x-agenttask-phase").as_deref(), Some("Succeeded"));

    // The result stays queryable in SQL through the documented view.
    let pool = env.pg().await;
    let (phase, exit, stdout, result, labels): (String, i32, String, Value, Value) = sqlx::query_as(
        "select phase, exit_code, stdout, result, labels from agenttask.task_results where client_id = 'round-trip-1'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((phase.as_str(), exit), ("Succeeded", 0));
    assert!(stdout.starts_with("hello arg1"));
    assert_eq!(result["answer"], 42);
    assert_eq!(labels["suite"], "pipeline");
    let (total, succeeded): (i64, i64) =
        sqlx::query_as("select total, succeeded from agenttask.batch_summary where batch_id = 'b1'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((total, succeeded), (1, 1));
    pool.close().await;
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn every_validation_rule_gives_a_rejected_result_with_its_reason() {
    let Started { env, svc, mut client, tenant } = started("[tenants.{t}-a]\nmax_code_bytes = 100\n").await;
    let ok = json!({"language": "python", "code": "print(1)"});
    let with = |k: &str, v: Value| {
        let mut t = ok.clone();
        t[k] = v;
        t
    };
    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (b"not json".to_vec(), "ValidationFailed", "not a valid task"),
        (serde_json::to_vec(&with("colour", json!("red"))).unwrap(), "ValidationFailed", "unknown field"),
        (serde_json::to_vec(&json!({"code": "1"})).unwrap(), "ValidationFailed", "language is required"),
        (serde_json::to_vec(&with("language", json!("ruby"))).unwrap(), "ValidationFailed", "unknown language"),
        (serde_json::to_vec(&json!({"language": "python"})).unwrap(), "ValidationFailed", "code is required"),
        (serde_json::to_vec(&with("code", json!("x".repeat(101)))).unwrap(), "ValidationFailed", "max_code_bytes"),
        (serde_json::to_vec(&with("id", json!("bad id"))).unwrap(), "ValidationFailed", "id must match"),
        (
            serde_json::to_vec(&with("files", json!({"../x": {"content": "a"}}))).unwrap(),
            "ValidationFailed",
            "file name",
        ),
        (serde_json::to_vec(&with("env", json!({"AGENTTASK_X": "1"}))).unwrap(), "ValidationFailed", "reserved"),
        (serde_json::to_vec(&with("timeout_seconds", json!(100000))).unwrap(), "ValidationFailed", "timeout_seconds"),
        (
            serde_json::to_vec(&with("resources", json!({"memory": "64Gi"}))).unwrap(),
            "ValidationFailed",
            "resources.memory",
        ),
        (serde_json::to_vec(&with("priority", json!(1000))).unwrap(), "ValidationFailed", "priority"),
        (serde_json::to_vec(&with("batch_id", json!("a b"))).unwrap(), "ValidationFailed", "batch_id"),
        (serde_json::to_vec(&with("isolation", json!("gvisor"))).unwrap(), "IsolationNotAllowed", "not allowed"),
        (serde_json::to_vec(&with("code", json!("a\u{0}b"))).unwrap(), "ValidationFailed", "NUL"),
    ];
    for (i, (body, _, _)) in cases.iter().enumerate() {
        client.publish_raw(&tenant, body, client.props(&format!("case-{i}"))).await;
    }
    let mut seen = std::collections::HashMap::new();
    for _ in 0..cases.len() {
        let (r, props) = client.next(WAIT).await;
        seen.insert(props.correlation_id().as_ref().unwrap().as_str().to_owned(), r);
    }
    for (i, (_, reason, needle)) in cases.iter().enumerate() {
        let r = &seen[&format!("case-{i}")];
        assert_eq!(r["phase"], "Rejected", "case {i}: {r:#}");
        assert_eq!(r["reason"], *reason, "case {i}: {r:#}");
        assert!(r["message"].as_str().unwrap().contains(needle), "case {i}: {r:#}");
    }
    // Rejections are stored too, and the consumer kept working: a valid task still runs.
    client.submit(&tenant, &json!({"id": "after", "language": "python", "code": "print(2)"})).await;
    let (r, _) = client.next(WAIT).await;
    assert_eq!((r["phase"].as_str(), r["stdout"].as_str()), (Some("Succeeded"), Some("2\n")));
    let pool = env.pg().await;
    let rejected: i64 = sqlx::query_scalar("select count(*) from agenttask.task_results where phase = 'Rejected'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rejected, cases.len() as i64);
    pool.close().await;
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn unknown_tenant_gets_an_unknown_tenant_result() {
    let env = Env::new(ONE_TENANT).await;
    let svc = env.start().await;
    let mut client = Client::new(&env).await;
    let nobody = env.tenant("nobody");
    client.submit(&nobody, &json!({"id": "lost-1", "language": "python", "code": "print(1)"})).await;
    let (r, props) = client.next(WAIT).await;
    assert_eq!(r["phase"], "Rejected");
    assert_eq!(r["reason"], "UnknownTenant");
    assert!(r["message"].as_str().unwrap().contains(&nobody));
    assert_eq!(props.correlation_id().as_ref().unwrap().as_str(), "lost-1");
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn reply_to_into_another_tenants_queue_is_refused() {
    let env = Env::new("[tenants.{t}-a]\n[tenants.{t}-b]\n").await;
    let svc = env.start().await;
    let client = Client::new(&env).await;
    let (a, b) = (env.tenant("a"), env.tenant("b"));
    let victim = format!("agenttask.tasks.{b}");
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_reply_to(victim.as_str().into())
        .with_message_id("evil-1".into());
    let body = json!({"language": "python", "code": "print('pwned')"});
    client.publish_raw(&a, &serde_json::to_vec(&body).unwrap(), props).await;
    // The refusal goes to a's own results queue, never to b's task queue.
    let results = format!("agenttask.results.{a}");
    let ch = client.conn.create_channel().await.unwrap();
    let mut got = None;
    for _ in 0..600 {
        if let Ok(Some(m)) = ch.basic_get(results.as_str().into(), BasicGetOptions { no_ack: true }).await {
            got = Some(serde_json::from_slice::<Value>(&m.delivery.data).unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = got.unwrap();
    assert_eq!(r["phase"], "Rejected");
    assert_eq!(r["reason"], "ValidationFailed");
    assert!(r["message"].as_str().unwrap().contains("reply_to"), "{r:#}");
    assert_eq!(r["id"], "evil-1");
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let q = ch.queue_declare(victim.as_str().into(), passive, FieldTable::default()).await.unwrap();
    assert_eq!(q.message_count(), 0, "nothing may land in another tenant's queue");
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn resubmitting_the_same_id_creates_no_second_task() {
    let Started { env, svc, mut client, tenant } = started(ONE_TENANT).await;
    let task = json!({"id": "same-1", "language": "python", "code": "print('once')"});
    for _ in 0..3 {
        client.submit(&tenant, &task).await;
    }
    // Also the AMQP message_id as the key.
    let body = serde_json::to_vec(&json!({"language": "python", "code": "print(1)"})).unwrap();
    for _ in 0..2 {
        client.publish_raw(&tenant, &body, client.props("mid").with_message_id("mid-1".into())).await;
    }
    let (r, _) = client.next(WAIT).await;
    assert_eq!(r["phase"], "Succeeded", "{r:#}");
    let (r2, _) = client.next(WAIT).await;
    assert_eq!(r2["phase"], "Succeeded", "{r2:#}");
    let pool = env.pg().await;
    // All five messages handled and every result published: a second result would be here.
    settled(&env, &pool, &tenant).await;
    assert!(client.more(Duration::from_millis(500)).await.is_none(), "exactly one result per key");
    let n: i64 = sqlx::query_scalar("select count(*) from agenttask.tasks").fetch_one(&pool).await.unwrap();
    assert_eq!(n, 2);
    pool.close().await;
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_timeout_kills_the_task() {
    let Started { env, svc, mut client, tenant } = started(ONE_TENANT).await;
    client
        .submit(&tenant, &json!({"id": "slow", "language": "python", "code": "import time\nprint('start', flush=True)\ntime.sleep(60)", "timeout_seconds": 1}))
        .await;
    let (r, _) = client.next(WAIT).await;
    assert_eq!((r["phase"].as_str(), r["reason"].as_str()), (Some("Failed"), Some("TimedOut")), "{r:#}");
    assert!(r["duration_ms"].as_i64().unwrap() < 10_000, "{r:#}");
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn stdout_is_capped_and_flagged() {
    let Started { env, svc, mut client, tenant } = started_with(ONE_TENANT, |env| {
        let mut settings = env.settings(&Component::ALL);
        settings.output_limit_bytes = 64 * 1024;
        settings
    })
    .await;
    client
        .submit(
            &tenant,
            &json!({"id": "loud", "language": "python", "code": "import sys\nsys.stdout.write('x' * 10_000_000)"}),
        )
        .await;
    let (r, _) = client.next(WAIT).await;
    assert_eq!(r["stdout_truncated"], true, "{}", r["message"]);
    assert_eq!(r["stdout"].as_str().unwrap().len(), 64 * 1024);
    assert_eq!(r["phase"], "Failed");
    assert_eq!(r["reason"], "OutputLimitExceeded");
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn results_are_published_after_a_restart_between_finish_and_publish() {
    let env = Env::new(ONE_TENANT).await;
    // First life: everything but the publisher, so the result stays in the outbox.
    let svc = env.start_with(env.settings(&[Component::Ingest, Component::Scheduler, Component::Executor])).await;
    let mut client = Client::new(&env).await;
    client.submit(&env.tenant("a"), &json!({"id": "outbox-1", "language": "python", "code": "print('kept')"})).await;
    let pool = env.pg().await;
    eventually(WAIT, || {
        let pool = pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar("select count(*) from agenttask.outbox").fetch_one(&pool).await.unwrap();
            n == 1
        }
    })
    .await;
    svc.stop().await;
    assert!(client.more(Duration::from_millis(500)).await.is_none());
    // Second life: the publisher alone delivers it, once.
    let svc = env.start_with(env.settings(&[Component::Publisher])).await;
    let (r, _) = client.next(WAIT).await;
    assert_eq!((r["id"].as_str(), r["stdout"].as_str()), (Some("outbox-1"), Some("kept\n")));
    settled(&env, &pool, &env.tenant("a")).await;
    assert!(client.more(Duration::from_millis(500)).await.is_none(), "published exactly once");
    let left: i64 = sqlx::query_scalar("select count(*) from agenttask.outbox").fetch_one(&pool).await.unwrap();
    assert_eq!(left, 0);
    pool.close().await;
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn dropped_connections_lose_nothing_and_duplicate_nothing() {
    let env = Env::with_vhost("[tenants.{t}-a]\nmax_concurrency = 4\n").await;
    let svc = env.start().await;
    let tenant = env.tenant("a");
    let client = Client::new(&env).await;
    const N: usize = 60;
    for i in 0..N {
        // No reply_to: results go to the tenant's durable results queue, which survives the drop.
        let body = serde_json::to_vec(
            &json!({"id": format!("drop-{i}"), "language": "python", "code": format!("print({i})")}),
        )
        .unwrap();
        let props = BasicProperties::default().with_content_type("application/json".into());
        client.publish_raw(&tenant, &body, props).await;
    }
    let pool = env.pg().await;
    // Drop every connection of the vhost (the service's and ours) while tasks are in flight.
    eventually(WAIT, || {
        let pool = pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar("select count(*) from agenttask.tasks where phase = 'Succeeded'")
                .fetch_one(&pool)
                .await
                .unwrap();
            n >= 5
        }
    })
    .await;
    rabbitmqctl(&["close_all_connections", "--vhost", env.vhost.as_deref().unwrap(), "test: drop mid-flight"]).await;
    // Everything still completes, exactly once.
    eventually(Duration::from_secs(90), || {
        let pool = pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar("select count(*) from agenttask.tasks where phase = 'Succeeded'")
                .fetch_one(&pool)
                .await
                .unwrap();
            let outbox: i64 =
                sqlx::query_scalar("select count(*) from agenttask.outbox").fetch_one(&pool).await.unwrap();
            n == N as i64 && outbox == 0
        }
    })
    .await;
    let tasks: i64 = sqlx::query_scalar("select count(*) from agenttask.tasks").fetch_one(&pool).await.unwrap();
    assert_eq!(tasks, N as i64, "no duplicate tasks");
    let conn = env.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let mut ids = std::collections::HashSet::new();
    let mut total = 0;
    while let Ok(Some(m)) =
        ch.basic_get(format!("agenttask.results.{tenant}").as_str().into(), BasicGetOptions { no_ack: true }).await
    {
        let r: Value = serde_json::from_slice(&m.delivery.data).unwrap();
        ids.insert(r["id"].as_str().unwrap().to_owned());
        total += 1;
    }
    assert_eq!(ids.len(), N, "every task has its result");
    // A crash between a confirm and its outbox delete may legitimately duplicate a result
    // (same message_id); a plain connection drop must not duplicate many.
    assert!(total <= N + 4, "{total} results for {N} tasks");
    pool.close().await;
    let _ = conn.close(200, "ok".into()).await;
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn agentctl_submits_waits_and_gets() {
    let env = Env::new(ONE_TENANT).await;
    let svc = env.start().await;
    let tenant = env.tenant("a");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentctl"))
        .args(["submit", "--tenant", &tenant, "-c", "print(6 * 7)", "--wait", "--id", "ctl-1"])
        .env("AGENTCTL_AMQP_URL", &env.amqp_url)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "42\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Succeeded"));

    let get = |args: Vec<String>, token: Option<&str>| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentctl"));
        cmd.args(args).env("AGENTCTL_SERVER", format!("http://{}", svc.http_addr)).env_remove("AGENTCTL_TOKEN");
        if let Some(t) = token {
            cmd.env("AGENTCTL_TOKEN", t);
        }
        cmd.output()
    };
    let out = get(
        vec!["get".into(), "ctl-1".into(), "--tenant".into(), tenant.clone(), "-o".into(), "json".into()],
        Some("test-admin-token"),
    )
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["phase"].as_str(), v["stdout"].as_str()), (Some("Succeeded"), Some("42\n")));
    let out = get(vec!["get".into(), v["task_id"].as_str().unwrap().into()], Some("test-admin-token")).await.unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("Succeeded"));
    // Without the token: refused, non-zero, with a hint.
    let out = get(vec!["get".into(), "ctl-1".into(), "--tenant".into(), tenant.clone()], None).await.unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("AGENTCTL_TOKEN"));
    // A failing task: exit status 1.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentctl"))
        .args(["submit", "--tenant", &tenant, "-c", "raise SystemExit(3)", "--wait"])
        .env("AGENTCTL_AMQP_URL", &env.amqp_url)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NonZeroExit"));
    svc.stop().await;

    // Broker unreachable: a clear error and exit status 2.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentctl"))
        .args(["submit", "--tenant", &tenant, "-c", "print(1)"])
        .env("AGENTCTL_AMQP_URL", format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port()))
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect to RabbitMQ"));
    env.cleanup().await;
}

#[tokio::test]
async fn a_corrected_resubmit_after_a_rejection_gets_its_own_result() {
    let Started { env, svc, mut client, tenant } = started(ONE_TENANT).await;
    client.submit(&tenant, &json!({"id": "fixme", "language": "python", "code": "print(1)", "colour": "red"})).await;
    let (r, _) = client.next(WAIT).await;
    assert_eq!((r["phase"].as_str(), r["reason"].as_str()), (Some("Rejected"), Some("ValidationFailed")), "{r:#}");
    client.submit(&tenant, &json!({"id": "fixme", "language": "python", "code": "print('fixed')"})).await;
    let (r, _) = client.next(WAIT).await;
    assert_eq!((r["phase"].as_str(), r["stdout"].as_str()), (Some("Succeeded"), Some("fixed\n")), "{r:#}");
    // An accepted id stays taken: a third publish creates nothing and answers nothing.
    client.submit(&tenant, &json!({"id": "fixme", "language": "python", "code": "print('again')"})).await;
    let pool = env.pg().await;
    settled(&env, &pool, &tenant).await;
    assert!(client.more(Duration::from_millis(500)).await.is_none());
    assert_eq!(
        count(&pool, "select count(*) from agenttask.tasks").await,
        1,
        "the rejection gave way, the third publish added nothing"
    );
    pool.close().await;
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn nul_characters_in_properties_and_field_names_are_answered_not_looped() {
    let Started { env, svc, mut client, tenant } = started(ONE_TENANT).await;
    // Postgres text cannot hold NUL: the correlation id and the quoted field name must not
    // make the message impossible to store (it would be retried forever).
    let body = br#"{"language": "python", "code": "print(1)", "x\u0000y": 1}"#;
    let props = client.props("corr\0id").with_message_id("nul-1".into());
    client.publish_raw(&tenant, body, props).await;
    let (r, props) = client.next(WAIT).await;
    assert_eq!((r["phase"].as_str(), r["reason"].as_str()), (Some("Rejected"), Some("ValidationFailed")), "{r:#}");
    assert!(!props.correlation_id().as_ref().unwrap().as_str().contains('\0'));
    client.submit(&tenant, &json!({"id": "after-nul", "language": "python", "code": "print(2)"})).await;
    let (r, _) = client.next(WAIT).await;
    assert_eq!(r["phase"], "Succeeded", "{r:#}");
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn agentctl_human_output_escapes_terminal_controls_and_json_keeps_them() {
    let env = Env::new(ONE_TENANT).await;
    let svc = env.start().await;
    let tenant = env.tenant("a");
    let code = r#"
import os
print("\x1b]0;pwned\x07\x1b[2Jcleared")
open(os.path.join(os.environ["AGENTTASK_ARTIFACTS_DIR"], "evil\x1b[31m\nname"), "w").write("x")
"#;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentctl"))
        .args(["submit", "--tenant", &tenant, "-c", code, "--wait", "--id", "ctl-esc"])
        .env("AGENTCTL_AMQP_URL", &env.amqp_url)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!out.stdout.contains(&0x1b) && !out.stderr.contains(&0x1b), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "\\x1b]0;pwned\\x07\\x1b[2Jcleared\n");
    let get = |json: bool| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentctl"));
        cmd.args(["get", "ctl-esc", "--tenant", &tenant])
            .env("AGENTCTL_SERVER", format!("http://{}", svc.http_addr))
            .env("AGENTCTL_TOKEN", "test-admin-token");
        if json {
            cmd.args(["-o", "json"]);
        }
        cmd.output()
    };
    let human = get(false).await.unwrap();
    assert!(human.status.success(), "{}", String::from_utf8_lossy(&human.stderr));
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(!human.stdout.contains(&0x1b), "{text}");
    assert!(text.contains("ARTIFACT    evil\\x1b[31m\\nname (1 bytes"), "{text}");
    // `-o json` is the data unchanged.
    let v: Value = serde_json::from_slice(&get(true).await.unwrap().stdout).unwrap();
    assert_eq!(v["artifacts"][0]["name"], "evil\u{1b}[31m\nname");
    assert_eq!(v["stdout"], "\u{1b}]0;pwned\u{7}\u{1b}[2Jcleared\n");
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn artifacts_past_the_tenants_quota_are_not_stored_and_the_result_says_so() {
    // acme may keep 100 KiB of artifacts; globex the default (1 GiB).
    let env = Env::new("[tenants.{t}-acme]\nmax_artifact_bytes = 102400\n[tenants.{t}-globex]\n").await;
    let svc = env.start().await;
    let mut client = Client::new(&env).await;
    let code = "import os\nopen(os.path.join(os.environ['AGENTTASK_ARTIFACTS_DIR'], 'big.bin'), 'wb').write(os.urandom(200 * 1024))\nprint('ok')\n";
    for suffix in ["acme", "globex"] {
        client
            .submit(&env.tenant(suffix), &json!({"id": format!("art-{suffix}"), "language": "python", "code": code}))
            .await;
    }
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..2 {
        let (r, _) = client.next(WAIT).await;
        seen.insert(r["tenant"].as_str().unwrap().to_owned(), r);
    }
    let acme = &seen[&env.tenant("acme")];
    assert_eq!((acme["phase"].as_str(), acme["stdout"].as_str()), (Some("Succeeded"), Some("ok\n")), "{acme:#}");
    assert_eq!(acme["artifacts"].as_array().unwrap().len(), 0, "{acme:#}");
    let message = acme["message"].as_str().unwrap();
    assert!(message.contains("not stored") && message.contains("max_artifact_bytes = 102400"), "{message}");
    let globex = &seen[&env.tenant("globex")];
    assert_eq!(globex["phase"], "Succeeded", "{globex:#}");
    assert_eq!(globex["artifacts"][0]["name"], "big.bin", "{globex:#}");
    assert!(!globex["message"].as_str().unwrap_or_default().contains("not stored"), "{globex:#}");
    svc.stop().await;
    env.cleanup().await;
}

/// `GET /v1/tasks/{id}/artifacts/{name}` serves exactly the files collection recorded, byte for
/// byte, and nothing else.
#[tokio::test]
async fn artifacts_are_downloaded_by_their_recorded_names_only() {
    use sha2::Digest as _;
    let Started { env, svc, mut client, tenant } = started("[tenants.{t}-a]\n").await;
    let code = "import os\nd = os.environ['AGENTTASK_ARTIFACTS_DIR']\nos.makedirs(os.path.join(d, 'plots'))\n\
                open(os.path.join(d, 'plots', 'fig.bin'), 'wb').write(bytes(range(256)) * 40)\n\
                open(os.path.join(d, 'notes.txt'), 'w').write('hello')\n";
    client.submit(&tenant, &json!({"id": "art", "language": "python", "code": code})).await;
    let (r, _) = client.next(WAIT).await;
    assert_eq!(r["phase"], "Succeeded", "{r:#}");
    let id = r["task_id"].as_str().unwrap().to_owned();
    let http = reqwest::Client::new();
    let get = |path: String| {
        let http = http.clone();
        let url = format!("http://{}/v1/tasks/{id}/artifacts/{path}", svc.http_addr);
        async move { http.get(url).bearer_auth("test-admin-token").send().await.unwrap() }
    };
    let resp = get("plots/fig.bin".into()).await;
    assert_eq!(resp.status(), 200);
    let etag = resp.headers()["etag"].to_str().unwrap().to_owned();
    let body = resp.bytes().await.unwrap();
    let want: Vec<u8> = (0..40).flat_map(|_| 0u8..=255).collect();
    assert_eq!(body.as_ref(), want.as_slice());
    assert_eq!(etag, format!("\"sha256:{:x}\"", sha2::Sha256::digest(&want)));
    let listed: Vec<&str> = r["artifacts"].as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap()).collect();
    assert!(listed.contains(&"plots/fig.bin") && listed.contains(&"notes.txt"), "{listed:?}");
    assert_eq!(get("notes.txt".into()).await.text().await.unwrap(), "hello");
    // Anything not recorded is a 404 with a JSON error, however it is spelled.
    // (Encoded, so that no client normalizes the dots away before the service sees them.)
    for bad in ["missing.txt", "plots%2F..%2Fnotes.txt", "..%2F..%2Fetc%2Fpasswd", "plots"] {
        let resp = get(bad.into()).await;
        assert_eq!(resp.status(), 404, "{bad}");
        let e: Value = resp.json().await.unwrap();
        assert_eq!(e["code"], "not_found", "{bad}: {e}");
    }

    // agentctl artifacts ID -o DIR: the same bytes, in the same tree, checked by sha256.
    let out_dir = tempfile::tempdir().unwrap();
    let dest = out_dir.path().join("out");
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentctl"))
        .args(["--server", &format!("http://{}", svc.http_addr), "--token", "test-admin-token"])
        .args(["artifacts", &id, "-o", dest.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(std::fs::read(dest.join("plots/fig.bin")).unwrap(), want);
    assert_eq!(std::fs::read_to_string(dest.join("notes.txt")).unwrap(), "hello");
    assert!(String::from_utf8_lossy(&run.stdout).contains("plots/fig.bin"));
    // Without -o it says what to do; a format name is still a format for other commands.
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentctl"))
        .args(["--server", &format!("http://{}", svc.http_addr), "--token", "test-admin-token", "artifacts", &id])
        .output()
        .await
        .unwrap();
    assert_eq!(run.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&run.stderr).contains("-o DIR"));
    svc.stop().await;
    env.cleanup().await;
}

/// Reads one sample of the service's `/metrics` (0 when the series does not exist yet).
async fn metric(svc: &Service, series: &str) -> f64 {
    let text = reqwest::get(format!("http://{}/metrics", svc.http_addr)).await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn warm_sandboxes_run_python_and_r_and_every_result_says_whether_it_was_warm() {
    // The defaults: two warm Python sandboxes and one R.
    let Started { env, svc, mut client, tenant } = started(ONE_TENANT).await;
    eventually(Duration::from_secs(60), || async {
        metric(&svc, "agenttask_warm_pool_size{language=\"python\"}").await == 2.0
            && metric(&svc, "agenttask_warm_pool_size{language=\"r\"}").await == 1.0
    })
    .await;
    client.submit(&tenant, &json!({"id": "warm-py", "language": "python", "code": "print(6 * 7)"})).await;
    let (py, _) = client.next(WAIT).await;
    assert_eq!(
        (&py["phase"], &py["stdout"], &py["warm"]),
        (&json!("Succeeded"), &json!("42\n"), &json!(true)),
        "{py:#}"
    );
    client.submit(&tenant, &json!({"id": "warm-r", "language": "r", "code": "cat(6 * 7)"})).await;
    let (r, _) = client.next(WAIT).await;
    assert_eq!((&r["phase"], &r["stdout"], &r["warm"]), (&json!("Succeeded"), &json!("42"), &json!(true)), "{r:#}");
    // A task that sets a variable only a fresh interpreter reads starts cold, and says so.
    client
        .submit(&tenant, &json!({"id": "cold-py", "language": "python", "code": "print(1)", "env": {"TZ": "UTC"}}))
        .await;
    let (cold, _) = client.next(WAIT).await;
    assert_eq!((&cold["phase"], &cold["warm"]), (&json!("Succeeded"), &json!(false)), "{cold:#}");
    // The stored rows say the same.
    let pool = env.pg().await;
    let rows: Vec<(String, Option<bool>)> =
        sqlx::query_as("select client_id, warm from agenttask.tasks order by client_id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        rows,
        [("cold-py".to_string(), Some(false)), ("warm-py".to_string(), Some(true)), ("warm-r".to_string(), Some(true))]
    );
    assert_eq!(metric(&svc, "agenttask_warm_pool_hits_total{language=\"python\"}").await, 1.0);
    assert_eq!(metric(&svc, "agenttask_warm_pool_hits_total{language=\"r\"}").await, 1.0);
    assert_eq!(metric(&svc, "agenttask_warm_pool_misses_total{language=\"python\",reason=\"env\"}").await, 1.0);
    assert!(metric(&svc, "agenttask_warm_pool_warmup_seconds_count{language=\"r\"}").await >= 1.0);
    pool.close().await;
    svc.stop().await;
}
