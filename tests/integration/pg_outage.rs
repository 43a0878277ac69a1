//! Postgres outages, for real, on a private Postgres 15 server started for each test (the shared
//! server is never touched): restarted mid-run, stopped for 20 s, and the service's pool
//! exhausted. Through all of them 500 tasks (null backend) each end with exactly one result,
//! messages that arrive meanwhile wait unacknowledged in RabbitMQ, and `/readyz` tells the truth
//! (503 naming the database during the 20 s stop and the exhausted pool, 200 after; a restart
//! is over too fast to sample it reliably, so there only "200 after" is checked).
//!
//! `PG_OUTAGE_LOG=FILE` writes the service's log there, for when one of these fails.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

use agenttask::config::{BackendKind, Component};

use crate::support::*;

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const TASKS: usize = 500;
const WAIT: Duration = Duration::from_secs(60);

/// A Postgres server of this test's own, in a temporary directory, on a free port. Dropping it
/// stops the server (immediately) and removes its files.
pub struct PrivatePostgres {
    dir: tempfile::TempDir,
    pub port: u16,
}

/// Postgres refuses to run as root: then run its tools as the `postgres` user.
fn as_server_user(program: &str) -> std::process::Command {
    let root = std::process::Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let path = format!("{PG_BIN}/{program}");
    if root {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--", &path]);
        c
    } else {
        std::process::Command::new(path)
    }
}

impl PrivatePostgres {
    pub async fn start() -> PrivatePostgres {
        let dir = tempfile::Builder::new().prefix("agenttask-pg-").tempdir().unwrap();
        // The server user must own its directory (a no-op when that is us).
        let _ = std::process::Command::new("chown").args(["postgres:", dir.path().to_str().unwrap()]).status();
        let pg = PrivatePostgres { dir, port: free_port() };
        let out = as_server_user("initdb")
            .args(["-D", pg.data().to_str().unwrap(), "-A", "trust", "-U", "postgres", "--no-sync"])
            .output()
            .expect("initdb runs");
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        pg.pg_ctl(&["start"]).await;
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// `pg_ctl ACTION` (start, stop, restart), waiting for it to complete.
    pub async fn pg_ctl(&self, action: &[&str]) {
        let opts =
            format!("-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off", self.port, self.dir.path().display());
        let mut cmd = as_server_user("pg_ctl");
        cmd.args(["-D", self.data().to_str().unwrap(), "-w", "-m", "fast", "-o", &opts])
            .args(["-l", self.dir.path().join("log").to_str().unwrap()])
            .args(action);
        let out = tokio::process::Command::from(cmd).output().await.expect("pg_ctl runs");
        assert!(out.status.success(), "pg_ctl {action:?}: {}{}", String::from_utf8_lossy(&out.stdout), self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ =
            as_server_user("pg_ctl").args(["-D", self.data().to_str().unwrap(), "-m", "immediate", "stop"]).output();
    }
}

#[derive(Debug, Clone, Copy)]
enum Outage {
    /// `pg_ctl restart -m fast`: every connection is cut, the server is back within a second.
    Restart,
    /// `pg_ctl stop`, 20 s, `pg_ctl start`.
    Stopped20s,
    /// Every connection of the service's pool (2) stuck behind a lock the test holds for 20 s:
    /// the pool is exhausted, acquiring a connection times out.
    PoolExhausted,
}

/// Submits 500 tasks over a few seconds, causes the outage in the middle of them, and checks
/// that each task has exactly one result, none rejected, and `/readyz` before, during and after.
async fn five_hundred_tasks_through(outage: Outage) {
    if let Ok(path) = std::env::var("PG_OUTAGE_LOG") {
        let file = std::fs::File::create(path).unwrap();
        let _ = tracing_subscriber::fmt()
            .with_writer(std::sync::Mutex::new(file))
            .with_env_filter("info,agenttask=debug")
            .with_ansi(false)
            .try_init();
    }
    let pg = PrivatePostgres::start().await;
    let env = Env::new(ONE_TENANT).await;
    let tenant = env.tenant("a");
    let mut settings = env.settings(&Component::ALL);
    settings.database_url = pg.url("agenttask");
    settings.backend = BackendKind::Null;
    settings.max_running = 32;
    if let Outage::PoolExhausted = outage {
        settings.database_pool_size = 2;
    }
    let svc = env.start_with(settings).await;
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&pg.url("agenttask")).await.unwrap();
    let mut client = Client::new(&env).await;

    // The first half before the outage, the second half during it (a second publishing
    // connection, so the outage does not wait for the publishing).
    for i in 0..TASKS / 2 {
        client.submit(&tenant, &json!({"id": format!("t{i}"), "language": "python", "code": "1"})).await;
    }
    let mut results: BTreeMap<String, usize> = BTreeMap::new();
    let mut phases: BTreeMap<String, usize> = BTreeMap::new();
    // Mid-run: some results are out, not all.
    while results.len() < 50 {
        let (r, _) = client.next(WAIT).await;
        *phases.entry(r["phase"].as_str().unwrap_or("?").to_owned()).or_default() += 1;
        *results.entry(r["id"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    // Its own connection, replying to the first client's queue.
    let publisher = Client::new(&env).await;
    let (tenant2, env_queue) = (tenant.clone(), format!("agenttask.tasks.{tenant}"));
    let reply_queue = client.reply_queue.clone();
    let second_half = async move {
        for i in TASKS / 2..TASKS {
            let id = format!("t{i}");
            let props = lapin::BasicProperties::default()
                .with_content_type("application/json".into())
                .with_correlation_id(id.as_str().into())
                .with_reply_to(reply_queue.as_str().into());
            let body = serde_json::to_vec(&json!({"id": id, "language": "python", "code": "1"})).unwrap();
            publisher.publish_raw(&tenant2, &body, props).await;
        }
        publisher
    };

    let mut saw_not_ready = false;
    let mut waiting_in_rabbitmq = 0;
    match outage {
        Outage::Restart => {
            let (_, publisher) = tokio::join!(pg.pg_ctl(&["restart"]), second_half);
            drop(publisher);
        }
        Outage::Stopped20s => {
            pg.pg_ctl(&["stop"]).await;
            let publisher = second_half.await;
            let end = tokio::time::Instant::now() + Duration::from_secs(20);
            while tokio::time::Instant::now() < end {
                let (code, body) = readyz(svc.http_addr).await;
                if code == 503 {
                    assert!(body["down"]["database"].is_string(), "{body}");
                    saw_not_ready = true;
                }
                waiting_in_rabbitmq = waiting_in_rabbitmq.max(queue_messages(&env, &env_queue).await.unwrap_or(0));
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            drop(publisher);
            pg.pg_ctl(&["start"]).await;
        }
        Outage::PoolExhausted => {
            let mut locker = pool.begin().await.unwrap();
            sqlx::query("lock table agenttask.tasks in access exclusive mode").execute(&mut *locker).await.unwrap();
            let publisher = second_half.await;
            let end = tokio::time::Instant::now() + Duration::from_secs(20);
            while tokio::time::Instant::now() < end {
                let (code, body) = tokio::time::timeout(Duration::from_secs(15), readyz(svc.http_addr))
                    .await
                    .unwrap_or((0, json!(null)));
                if code == 503 {
                    assert!(body["down"]["database"].is_string(), "{body}");
                    saw_not_ready = true;
                }
                waiting_in_rabbitmq = waiting_in_rabbitmq.max(queue_messages(&env, &env_queue).await.unwrap_or(0));
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            drop(publisher);
            locker.rollback().await.unwrap();
        }
    }
    if !matches!(outage, Outage::Restart) {
        assert!(saw_not_ready, "/readyz never said the database was down during the {outage:?} outage");
        assert!(waiting_in_rabbitmq > 0, "no message waited in RabbitMQ during the {outage:?} outage");
    }

    // Every task gets its result.
    while results.len() < TASKS {
        let Some(r) = client.more(Duration::from_secs(45)).await else {
            panic!(
                "only {} of {TASKS} results after the {outage:?} outage; {}",
                results.len(),
                diagnose(&pool, &env, &env_queue).await
            );
        };
        *phases.entry(r["phase"].as_str().unwrap_or("?").to_owned()).or_default() += 1;
        *results.entry(r["id"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    // Ready again, and everything settled: nothing waits in RabbitMQ or in the outbox.
    let (code, body) = readyz(svc.http_addr).await;
    assert_eq!(code, 200, "{body}");
    settled(&env, &pool, &tenant).await;
    while let Some(r) = client.more(Duration::from_secs(2)).await {
        *results.entry(r["id"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    let twice: Vec<_> = results.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "results delivered more than once after the {outage:?} outage: {twice:?}");
    assert_eq!(results.len(), TASKS);
    assert_eq!(phases.get("Succeeded"), Some(&TASKS), "{phases:?}");
    // One task per message: redeliveries created none twice.
    assert_eq!(count(&pool, "select count(*) from agenttask.tasks").await, TASKS as i64);
    assert_eq!(count(&pool, "select count(*) from agenttask.tasks where phase = 'Succeeded'").await, TASKS as i64);

    svc.stop().await;
    pool.close().await;
    env.cleanup().await;
    drop(pg);
}

/// Where the missing results are: tasks by phase, the outbox, the task queue.
async fn diagnose(pool: &sqlx::PgPool, env: &Env, queue: &str) -> String {
    let phases: Vec<(String, i64)> = sqlx::query_as("select phase, count(*) from agenttask.tasks group by phase")
        .fetch_all(pool)
        .await
        .unwrap_or_default();
    let outbox: Vec<(i32, bool, Option<String>)> = sqlx::query_as(
        "select attempts, parked_at is not null, last_error from agenttask.outbox order by created_at limit 3",
    )
    .fetch_all(pool)
    .await
    .unwrap_or_default();
    let outbox_rows = count(pool, "select count(*) from agenttask.outbox").await;
    format!(
        "tasks by phase {phases:?}; outbox {outbox_rows} rows, oldest {outbox:?}; {queue}: {:?} messages",
        queue_messages(env, queue).await
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_mid_run_loses_and_duplicates_nothing() {
    five_hundred_tasks_through(Outage::Restart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_for_20s_mid_run_loses_and_duplicates_nothing() {
    five_hundred_tasks_through(Outage::Stopped20s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_pool_loses_and_duplicates_nothing() {
    five_hundred_tasks_through(Outage::PoolExhausted).await;
}
