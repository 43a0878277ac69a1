//! Messages built to break the consumer itself, sent as raw AMQP frames (a well-behaved client
//! library refuses to produce them): the service must survive them and keep serving everyone.
//!
//! A message the AMQP client cannot parse at all (a property that is not UTF-8) drops the
//! connection it arrives on at every delivery until the quorum queue's delivery limit
//! dead-letters it: only the tenants sharing that connection pause meanwhile.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::json;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(60);

fn shortstr(out: &mut Vec<u8>, s: &[u8]) {
    out.push(s.len() as u8);
    out.extend_from_slice(s);
}

fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![kind];
    f.extend_from_slice(&channel.to_be_bytes());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(payload);
    f.push(0xCE);
    f
}

fn method(class: u16, id: u16, args: &[u8]) -> Vec<u8> {
    let mut m = class.to_be_bytes().to_vec();
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(args);
    m
}

/// Reads one frame, returning (type, class, method) for method frames.
fn read_frame(s: &mut TcpStream) -> (u8, u16, u16, Vec<u8>) {
    let mut head = [0u8; 7];
    s.read_exact(&mut head).unwrap();
    let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
    let mut payload = vec![0u8; size + 1];
    s.read_exact(&mut payload).unwrap();
    payload.pop();
    let (class, id) = if head[0] == 1 && payload.len() >= 4 {
        (u16::from_be_bytes([payload[0], payload[1]]), u16::from_be_bytes([payload[2], payload[3]]))
    } else {
        (0, 0)
    };
    (head[0], class, id, payload)
}

fn expect_method(s: &mut TcpStream, class: u16, id: u16) -> Vec<u8> {
    loop {
        let (kind, c, m, payload) = read_frame(s);
        if kind == 1 && (c, m) == (class, id) {
            return payload;
        }
        assert!(
            kind != 1 || (c, m) != (10, 50),
            "broker closed the connection: {:?}",
            String::from_utf8_lossy(&payload)
        );
    }
}

/// Publishes one message whose content header carries `properties` (already encoded, with
/// their flag word first), speaking AMQP 0-9-1 by hand.
fn raw_publish(vhost: &str, routing_key: &str, properties: &[u8], body: &[u8]) {
    let mut s = TcpStream::connect("127.0.0.1:5672").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"AMQP\x00\x00\x09\x01").unwrap();
    expect_method(&mut s, 10, 10); // Connection.Start
    let mut args = 0u32.to_be_bytes().to_vec(); // client properties: empty table
    shortstr(&mut args, b"PLAIN");
    let response = b"\x00guest\x00guest";
    args.extend_from_slice(&(response.len() as u32).to_be_bytes());
    args.extend_from_slice(response);
    shortstr(&mut args, b"en_US");
    s.write_all(&frame(1, 0, &method(10, 11, &args))).unwrap(); // StartOk
    let tune = expect_method(&mut s, 10, 30);
    let mut tune_ok = tune[4..10].to_vec(); // channel-max, frame-max
    tune_ok.extend_from_slice(&0u16.to_be_bytes()); // no heartbeats
    s.write_all(&frame(1, 0, &method(10, 31, &tune_ok))).unwrap();
    let mut open = Vec::new();
    shortstr(&mut open, vhost.as_bytes());
    shortstr(&mut open, b"");
    open.push(0);
    s.write_all(&frame(1, 0, &method(10, 40, &open))).unwrap();
    expect_method(&mut s, 10, 41);
    s.write_all(&frame(1, 1, &method(20, 10, &[0]))).unwrap();
    expect_method(&mut s, 20, 11);
    // Publisher confirms, so we know the broker took the message.
    s.write_all(&frame(1, 1, &method(85, 10, &[0]))).unwrap();
    expect_method(&mut s, 85, 11);
    let mut publish = 0u16.to_be_bytes().to_vec();
    shortstr(&mut publish, b"agenttask.tasks");
    shortstr(&mut publish, routing_key.as_bytes());
    publish.push(0);
    s.write_all(&frame(1, 1, &method(60, 40, &publish))).unwrap();
    let mut header = 60u16.to_be_bytes().to_vec();
    header.extend_from_slice(&0u16.to_be_bytes());
    header.extend_from_slice(&(body.len() as u64).to_be_bytes());
    header.extend_from_slice(properties);
    s.write_all(&frame(2, 1, &header)).unwrap();
    s.write_all(&frame(3, 1, body)).unwrap();
    expect_method(&mut s, 60, 80); // Basic.Ack
}

/// Properties: content-type application/json and a headers table nesting `depth` field arrays.
fn nested_headers(depth: usize) -> Vec<u8> {
    let mut value = Vec::new();
    for _ in 0..depth {
        let mut outer = vec![b'A'];
        outer.extend_from_slice(&(value.len() as u32).to_be_bytes());
        outer.extend_from_slice(&value);
        value = outer;
    }
    let mut table = Vec::new();
    shortstr(&mut table, b"x-nest");
    table.extend_from_slice(&value);
    let flags: u16 = (1 << 15) | (1 << 13); // content-type, headers
    let mut p = flags.to_be_bytes().to_vec();
    shortstr(&mut p, b"application/json");
    p.extend_from_slice(&(table.len() as u32).to_be_bytes());
    p.extend_from_slice(&table);
    p
}

#[tokio::test]
async fn poison_messages_do_not_stop_the_service() {
    let env = Env::new("[tenants.{t}-a]\n[tenants.{t}-b]\n").await;
    let (a, b) = (env.tenant("a"), env.tenant("b"));
    let mut svc = env.spawn_process("svc", "ingest,scheduler,executor,publisher", free_port(), 4);
    let conn = loop {
        let c = env.connect().await;
        if queue_has_consumer(&c, &format!("agenttask.tasks.{a}")).await
            && queue_has_consumer(&c, &format!("agenttask.tasks.{b}")).await
        {
            break c;
        }
        let _ = c.close(200, "ok".into()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let pool = env.pg().await;

    // Headers nested 20,000 deep (100 KB): parsing them recursively on a small stack would abort
    // the whole process. The message is an ordinary task otherwise, and runs.
    let body = serde_json::to_vec(&json!({"id": "nested", "language": "python", "code": "print('deep')"})).unwrap();
    let key = a.clone();
    tokio::task::spawn_blocking(move || raw_publish("/", &key, &nested_headers(20_000), &body)).await.unwrap();
    eventually(WAIT, || {
        let pool = pool.clone();
        async move {
            count(&pool, "select count(*) from agenttask.tasks where client_id = 'nested' and phase = 'Succeeded'")
                .await
                == 1
        }
    })
    .await;
    assert!(svc.child.try_wait().unwrap().is_none(), "the service died:\n{}", svc.log_text());

    // And the service still serves every tenant afterwards.
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(lapin::options::ConfirmSelectOptions::default()).await.unwrap();
    for (tenant, id) in [(&b, "after-b"), (&a, "after-a")] {
        publish_plain(&ch, tenant, &json!({"id": id, "language": "python", "code": "print('ok')"})).await;
    }
    eventually(WAIT, || {
        let pool = pool.clone();
        async move {
            count(&pool, "select count(*) from agenttask.tasks where client_id in ('after-a', 'after-b') and phase = 'Succeeded'").await == 2
        }
    })
    .await;
    assert!(svc.child.try_wait().unwrap().is_none(), "the service died:\n{}", svc.log_text());
    pool.close().await;
    let _ = conn.close(200, "ok".into()).await;
    unsafe { libc::kill(svc.child.id().unwrap() as i32, libc::SIGTERM) };
    let _ = tokio::time::timeout(Duration::from_secs(20), svc.child.wait()).await;
    env.cleanup().await;
}

/// Properties whose content type is not UTF-8: the AMQP client cannot parse the message at all.
fn unreadable_content_type() -> Vec<u8> {
    let flags: u16 = 1 << 15; // content-type
    let mut p = flags.to_be_bytes().to_vec();
    shortstr(&mut p, b"application/\xff\xfe");
    p
}

/// `count` suffixes whose tenants' task queues are on ingest connection `slot` (or, with
/// `same = false`, on any other connection).
fn suffixes_on(env: &Env, slot: usize, same: bool, count: usize) -> Vec<String> {
    use agenttask::amqp::connections::{slot_of, INGEST_CONNECTIONS};
    (0..)
        .map(|i| format!("s{i}"))
        .filter(|s| (slot_of(&format!("agenttask.tasks.t{}-{s}", env.id), INGEST_CONNECTIONS) == slot) == same)
        .take(count)
        .collect()
}

#[tokio::test]
async fn an_unreadable_message_pauses_only_the_tenants_sharing_its_connection() {
    let env = Env::with_vhost("").await;
    let vhost = env.vhost.clone().expect("own vhost");
    // `poisoned` and `neighbour` share a connection; `other` is on another one.
    let poisoned_slot = agenttask::amqp::connections::slot_of(
        &format!("agenttask.tasks.t{}-s0", env.id),
        agenttask::amqp::connections::INGEST_CONNECTIONS,
    );
    let same = suffixes_on(&env, poisoned_slot, true, 2);
    let different = suffixes_on(&env, poisoned_slot, false, 1);
    let (poisoned, neighbour, other) = (env.tenant(&same[0]), env.tenant(&same[1]), env.tenant(&different[0]));
    let toml: String = [&poisoned, &neighbour, &other].iter().map(|t| format!("[tenants.{t}]\n")).collect();
    std::fs::write(&env.tenants_path, toml).unwrap();
    let null = [("AGENTTASK_BACKEND", "null")];
    let svc = env.spawn_process_with("svc", "ingest,scheduler,executor,publisher", free_port(), 4, &null);
    let conn = loop {
        let c = env.connect().await;
        let mut all = true;
        for t in [&poisoned, &neighbour, &other] {
            all &= queue_has_consumer(&c, &format!("agenttask.tasks.{t}")).await;
        }
        if all {
            break c;
        }
        let _ = c.close(200, "ok".into()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let pool = env.pg().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(lapin::options::ConfirmSelectOptions::default()).await.unwrap();

    let body = serde_json::to_vec(&json!({"id": "unreadable", "language": "python", "code": "print(1)"})).unwrap();
    let (v, key) = (vhost.clone(), poisoned.clone());
    tokio::task::spawn_blocking(move || raw_publish(&v, &key, &unreadable_content_type(), &body)).await.unwrap();
    // The message drops its connection at once, at every delivery.
    eventually(WAIT, || async { svc.log_text().contains("an ingest connection was lost") }).await;

    // Meanwhile a tenant on another connection is served as usual.
    let during = std::time::Instant::now();
    publish_plain(&ch, &other, &json!({"id": "other-during", "language": "python", "code": "print(1)"})).await;
    eventually(WAIT, || {
        let pool = pool.clone();
        async move { phase(&pool, "other-during").await == "Succeeded" }
    })
    .await;
    let other_took = during.elapsed();
    let dead_lettered = queue_messages(&env, "agenttask.deadletter").await.unwrap_or(0);

    // After the delivery limit the broker parks it, and every tenant is served again.
    eventually(Duration::from_secs(180), || async { queue_messages(&env, "agenttask.deadletter").await == Some(1) })
        .await;
    for (tenant, id) in [(&poisoned, "poisoned-after"), (&neighbour, "neighbour-after"), (&other, "other-after")] {
        publish_plain(&ch, tenant, &json!({"id": id, "language": "python", "code": "print(1)"})).await;
    }
    eventually(WAIT, || {
        let pool = pool.clone();
        async move {
            count(&pool, "select count(*) from agenttask.tasks where client_id like '%-after' and phase = 'Succeeded'")
                .await
                == 3
        }
    })
    .await;
    assert_eq!(count(&pool, "select count(*) from agenttask.tasks where client_id = 'unreadable'").await, 0);
    let log = svc.log_text();
    let losses = log.matches("an ingest connection was lost").count();
    // Only the poisoned connection was dropped, once per delivery: the broker dead-letters the
    // message when its delivery count passes the limit, so after the limit plus one.
    let most = agenttask::amqp::DELIVERY_LIMIT as usize + 1;
    assert!((1..=most).contains(&losses), "{losses} connection losses:\n{log}");
    assert_eq!(service_errors(&log), Vec::<&str>::new(), "the service logged no error");
    assert_eq!(dead_lettered, 0, "the other tenant was served while the message was still being redelivered");
    eprintln!(
        "unreadable message: {losses} connection losses; a tenant on another connection served in {other_took:?}"
    );
    pool.close().await;
    let _ = conn.close(200, "ok".into()).await;
    let mut svc = svc;
    unsafe { libc::kill(svc.child.id().unwrap() as i32, libc::SIGTERM) };
    let _ = tokio::time::timeout(Duration::from_secs(20), svc.child.wait()).await;
    env.cleanup().await;
}
