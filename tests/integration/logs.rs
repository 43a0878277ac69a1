//! A task's log lines, from ingest to its result, carry its task id (and, where the stage knows
//! it, its tenant) through one span per stage, in the JSON format the service writes with
//! `--log-format json` (`with_current_span`), so an operator can join them.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use agenttask::config::{BackendKind, Component};

use crate::support::*;

const WAIT: Duration = Duration::from_secs(60);

/// Log output kept in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

impl Captured {
    fn lines(&self) -> Vec<Value> {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect()
    }
}

/// The lines whose span carries `task_id`.
fn lines_of(lines: &[Value], task_id: &str) -> Vec<Value> {
    lines.iter().filter(|l| l["span"]["task_id"] == task_id).cloned().collect()
}

fn stages(lines: &[Value]) -> BTreeSet<String> {
    lines.iter().filter_map(|l| l["span"]["name"].as_str().map(str::to_owned)).collect()
}

// The default (current-thread) runtime: the service's tasks all run on this thread, so the
// subscriber set as this thread's default sees all of them and no other test's.
#[tokio::test]
async fn a_tasks_log_lines_carry_its_task_id_from_ingest_to_its_result() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_current_span(true)
        .with_span_list(false)
        .with_env_filter("agenttask=debug")
        .with_writer(captured.clone())
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);

    let env = Env::new(ONE_TENANT).await;
    let tenant = env.tenant("a");
    let mut settings = env.settings(&Component::ALL);
    settings.backend = BackendKind::Null;
    let svc = env.start_with(settings).await;
    let mut client = Client::new(&env).await;
    client.submit(&tenant, &json!({"id": "traced", "language": "python", "code": "1"})).await;
    let (result, _) = client.next(WAIT).await;
    let task_id = result["task_id"].as_str().unwrap().to_owned();

    // Every stage logged in its span (the publisher's line follows the broker's confirm).
    let expected: BTreeSet<String> = ["ingest", "admit", "execute", "publish"].map(String::from).into();
    let end = tokio::time::Instant::now() + WAIT;
    while stages(&lines_of(&captured.lines(), &task_id)) != expected {
        assert!(
            tokio::time::Instant::now() < end,
            "stages logged for {task_id}: {:?}",
            stages(&lines_of(&captured.lines(), &task_id))
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mine = lines_of(&captured.lines(), &task_id);
    for line in &mine {
        // The outbox does not know the tenant; every earlier stage names it.
        if line["span"]["name"] != "publish" {
            assert_eq!(line["span"]["tenant"], tenant.as_str(), "{line}");
        }
    }
    let messages: Vec<&str> = mine.iter().filter_map(|l| l["fields"]["message"].as_str()).collect();
    for m in ["task queued", "task admitted", "run launched", "task finished", "result published"] {
        assert!(messages.contains(&m), "no {m:?} line for the task: {messages:?}");
    }
    // Another task's lines are not mixed in.
    client.submit(&tenant, &json!({"id": "other", "language": "python", "code": "1"})).await;
    let (other, _) = client.next(WAIT).await;
    assert_ne!(other["task_id"], task_id);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(lines_of(&captured.lines(), &task_id).len(), mine.len(), "lines of another task carried this task's id");

    svc.stop().await;
    env.cleanup().await;
}
