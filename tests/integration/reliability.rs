//! Outages, caused for real through a TCP proxy in front of the shared RabbitMQ or Postgres (so
//! no other test is disturbed): `/readyz` says what is down while it is, and recovers after.

use std::time::Duration;

use agenttask::config::Component;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(60);

/// Waits until `/readyz` answers `code`, and returns the body it answered with.
async fn ready_becomes(svc: &Service, code: u16) -> serde_json::Value {
    let end = tokio::time::Instant::now() + WAIT;
    loop {
        let (c, body) = readyz(svc.http_addr).await;
        if c == code {
            return body;
        }
        assert!(tokio::time::Instant::now() < end, "/readyz stayed {c} ({body}); expected {code}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn readyz_names_a_broker_outage_and_recovers() {
    let env = Env::new(ONE_TENANT).await;
    let proxy = Proxy::start("127.0.0.1:5672").await;
    let mut settings = env.settings(&Component::ALL);
    settings.amqp_url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port);
    let svc = env.start_with(settings).await;
    let body = ready_becomes(&svc, 200).await;
    assert_eq!(body["ready"], true, "{body}");

    proxy.cut();
    let body = ready_becomes(&svc, 503).await;
    assert_eq!(body["ready"], false, "{body}");
    let down: Vec<&String> = body["down"].as_object().unwrap().keys().collect();
    // Whichever connection notices first (a tenant's consumer, the unrouted queue's, the
    // publisher): a RabbitMQ part is named.
    assert!(down.iter().any(|k| k.starts_with("rabbitmq ") || k.as_str() == "result publisher"), "{body}");
    assert!(!down.iter().any(|k| k.as_str() == "database"), "the database is fine: {body}");

    proxy.restore();
    let body = ready_becomes(&svc, 200).await;
    assert!(body["down"].as_object().unwrap().is_empty(), "{body}");
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn readyz_names_a_database_outage_and_recovers() {
    let env = Env::new(ONE_TENANT).await;
    let proxy = Proxy::start("127.0.0.1:5432").await;
    let mut settings = env.settings(&Component::ALL);
    settings.database_url = format!("postgres://postgres@127.0.0.1:{}/agenttask_test_{}", proxy.port, env.id);
    let svc = env.start_with(settings).await;
    ready_becomes(&svc, 200).await;

    proxy.cut();
    let body = ready_becomes(&svc, 503).await;
    assert!(body["down"]["database"].is_string(), "{body}");

    proxy.restore();
    let body = ready_becomes(&svc, 200).await;
    assert_eq!(body["ready"], true, "{body}");
    // It recovered, not crashed: the service still runs and stops cleanly.
    svc.stop().await;
    env.cleanup().await;
}
