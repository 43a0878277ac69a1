//! Many tenants on one service process: every tenant's queue is consumed, over a handful of
//! shared AMQP connections, and SIGTERM still stops it well within its grace period.
//!
//! Runs in its own vhost, so that deleting the vhost at the end removes its quorum queues (left
//! behind, thousands of them slow the broker down for everyone).
//!
//! A thousand tenants are 2,000 quorum queues, and RabbitMQ 3.x reserves three file handles per
//! quorum queue from a budget it sizes from its open-files limit: at the default 1,024 it stops
//! completing AMQP handshakes, for every client, after about 300 queues. `deploy/local/test.sh`
//! raises the local broker's limit; the test checks the budget first and says what to do rather
//! than wedge a broker that was not raised.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use serde_json::json;

use crate::support::*;

const TENANTS: usize = 1000;

/// The bound on connections, whatever the number of tenants.
const MAX_CONNECTIONS: usize = 8;

/// The supervisor's grace period (`agenttask::supervise::GRACE`): what Kubernetes would wait.
const GRACE: Duration = Duration::from_secs(30);

/// This vhost's connections named by the service (`agenttask-...`), from the broker's side.
/// RabbitMQ 3.10 shows a client's connection name only inside its client properties.
async fn service_connections(vhost: &str) -> Vec<String> {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "vhost", "client_properties"])
        .output()
        .await
        .expect("rabbitmqctl runs");
    assert!(out.status.success(), "rabbitmqctl list_connections: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(v, _)| *v == vhost)
        .filter_map(|(_, props)| {
            let name = &props[props.find("\"agenttask-")? + 1..];
            Some(name[..name.find('"')?].to_owned())
        })
        .collect()
}

/// The broker's file-handle budget (`file_handle_cache`), if `rabbitmqctl` can ask it.
async fn broker_file_handles() -> Option<u64> {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(["-q", "eval", "file_handle_cache:get_limit()."])
        .output()
        .await
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

fn threads_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|n| n.trim().parse().ok())
}

#[tokio::test]
async fn many_tenants_are_consumed_over_a_few_connections_and_stop_promptly() {
    // Two quorum queues per tenant, three handles each, and room for every other test's sockets.
    let needed = (TENANTS * 2 * 3 + 1000) as u64;
    let handles = broker_file_handles().await.expect("rabbitmqctl reports the broker's file-handle limit");
    assert!(
        handles >= needed,
        "RabbitMQ has {handles} file handles; {TENANTS} tenants need {needed}, or the broker stops accepting \
         connections. Raise its open-files limit and restart it (deploy/local/test.sh does, for the local broker)"
    );
    let tenants_toml: String = (0..TENANTS).map(|i| format!("[tenants.{{t}}-{i:04}]\n")).collect();
    let env = Env::with_vhost(&tenants_toml).await;
    let vhost = env.vhost.clone().expect("own vhost");
    let tenants: Vec<String> = (0..TENANTS).map(|i| env.tenant(&format!("{i:04}"))).collect();
    let port = free_port();
    let started = Instant::now();
    let mut svc = env.spawn_process("svc", "ingest,http", port, 4);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // Generous: on a first start the broker creates every tenant's quorum queue.
    eventually(Duration::from_secs(120), || async move { readyz(addr).await.0 == 200 }).await;
    let ready_after = started.elapsed();

    // Ready means every tenant's queue has a consumer: check each from the broker's side.
    let conn = env.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let mut unconsumed = Vec::new();
    for t in &tenants {
        let q = format!("agenttask.tasks.{t}");
        let ok = ch.queue_declare(q.as_str().into(), passive, FieldTable::default()).await.expect("queue declared");
        if ok.consumer_count() < 1 {
            unconsumed.push(q);
        }
    }
    assert!(unconsumed.is_empty(), "{} queues without a consumer once ready: {:?}", unconsumed.len(), unconsumed);

    let names = service_connections(&vhost).await;
    assert!(!names.is_empty(), "the service's connections are visible in list_connections");
    assert!(names.len() <= MAX_CONNECTIONS, "{} connections for {TENANTS} tenants: {names:?}", names.len());
    let threads = threads_of(svc.child.id().unwrap());

    // And each consumer works: one task to every tenant, all stored.
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let props = BasicProperties::default().with_content_type("application/json".into());
    let mut confirms = Vec::with_capacity(TENANTS);
    for t in &tenants {
        let body =
            serde_json::to_vec(&json!({"id": format!("one-{t}"), "language": "python", "code": "print(1)"})).unwrap();
        let confirm = ch
            .basic_publish(
                "agenttask.tasks".into(),
                t.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                props.clone(),
            )
            .await
            .unwrap();
        confirms.push(confirm);
    }
    for confirm in join_all(confirms).await {
        assert!(confirm.unwrap().is_ack(), "publish confirmed");
    }
    let pool = env.pg().await;
    eventually(Duration::from_secs(120), || {
        let pool = pool.clone();
        async move {
            count(&pool, "select count(distinct tenant) from agenttask.tasks where client_id like 'one-%'").await
                == TENANTS as i64
        }
    })
    .await;
    pool.close().await;
    let _ = conn.close(200, "ok".into()).await;

    let stopping = Instant::now();
    unsafe { libc::kill(svc.child.id().unwrap() as i32, libc::SIGTERM) };
    let status = tokio::time::timeout(GRACE, svc.child.wait())
        .await
        .unwrap_or_else(|_| panic!("still running {GRACE:?} after SIGTERM:\n{}", svc.log_text()))
        .unwrap();
    let stopped_in = stopping.elapsed();
    assert!(status.success(), "clean exit on SIGTERM ({status}):\n{}", svc.log_text());
    let log = svc.log_text();
    assert_eq!(service_errors(&log), Vec::<&str>::new(), "the service logged no error");
    eprintln!(
        "{TENANTS} tenants: ready after {ready_after:?}, {} connections, {threads:?} threads, \
         {} shared connections lost meanwhile, exit {stopped_in:?} after SIGTERM",
        names.len(),
        log.matches("an ingest connection was lost").count(),
    );
    env.cleanup().await;
}
