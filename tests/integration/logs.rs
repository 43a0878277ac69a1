//! A task's log lines, from ingest to its result, carry its task id and tenant through one span
//! per stage, in the service's own JSON logs (`agenttask serve --log-format json`, read from
//! the process's stderr), so an operator can join them.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

const WAIT: Duration = Duration::from_secs(60);

fn json_lines(path: &std::path::Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // A line still being written is skipped; the next read has it whole.
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// The lines whose span carries `task_id`.
fn lines_of(lines: &[Value], task_id: &str) -> Vec<Value> {
    lines.iter().filter(|l| l["span"]["task_id"] == task_id).cloned().collect()
}

fn stages(lines: &[Value]) -> BTreeSet<String> {
    lines.iter().filter_map(|l| l["span"]["name"].as_str().map(str::to_owned)).collect()
}

#[tokio::test]
async fn a_tasks_json_log_lines_carry_its_task_id_and_tenant_from_ingest_to_its_result() {
    let env = Env::new(ONE_TENANT).await;
    let tenant = env.tenant("a");
    let log = env.dir.path().join("svc.log");
    let _svc = tokio::process::Command::new(env!("CARGO_BIN_EXE_agenttask"))
        .args(["serve", "--log-format", "json", "--backend", "null"])
        .env("AGENTTASK_DATABASE_URL", &env.database_url)
        .env("AGENTTASK_AMQP_URL", &env.amqp_url)
        .env("AGENTTASK_TENANTS", &env.tenants_path)
        .env("AGENTTASK_DATA_DIR", env.dir.path().join("data"))
        .env("AGENTTASK_HTTP_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("AGENTTASK_DATABASE_POOL_SIZE", "4")
        .env("AGENTTASK_LOG", "info,agenttask=debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("agenttask starts");
    let queue = format!("agenttask.tasks.{tenant}");
    let conn = env.connect().await;
    eventually(WAIT, || queue_has_consumer(&conn, &queue)).await;
    let mut client = Client::new(&env).await;
    client.submit(&tenant, &json!({"id": "traced", "language": "python", "code": "1"})).await;
    let (result, _) = client.next(WAIT).await;
    let task_id = result["task_id"].as_str().unwrap().to_owned();

    // Every stage logged in its span. The lines of different stages are written by different
    // components, in no fixed order (the result may be published before the executor logs
    // "task finished"), so wait for all of them.
    let expected: BTreeSet<String> = ["ingest", "admit", "execute", "publish"].map(String::from).into();
    let wanted = ["task queued", "task admitted", "run launched", "task finished", "result published"];
    let messages = |lines: &[Value]| -> BTreeSet<String> {
        lines.iter().filter_map(|l| l["fields"]["message"].as_str().map(str::to_owned)).collect()
    };
    let end = tokio::time::Instant::now() + WAIT;
    let mine = loop {
        let mine = lines_of(&json_lines(&log), &task_id);
        let seen = messages(&mine);
        if stages(&mine) == expected && wanted.iter().all(|m| seen.contains(*m)) {
            break mine;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "for {task_id}: stages {:?}, lines {seen:?}\n{}",
            stages(&mine),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for line in &mine {
        assert_eq!(line["span"]["tenant"], tenant.as_str(), "{line}");
    }
    // Another task's lines carry its own id, not this one's.
    client.submit(&tenant, &json!({"id": "other", "language": "python", "code": "1"})).await;
    let (other, _) = client.next(WAIT).await;
    let other_id = other["task_id"].as_str().unwrap().to_owned();
    assert_ne!(other_id, task_id);
    eventually(WAIT, || async {
        let others = lines_of(&json_lines(&log), &other_id);
        stages(&others) == expected && messages(&others).contains("task finished")
    })
    .await;
    assert_eq!(lines_of(&json_lines(&log), &task_id).len(), mine.len(), "another task's lines carried this id");

    let _ = conn.close(200, "ok".into()).await;
    drop(_svc);
    env.cleanup().await;
}
