//! A JSONL file of tasks turned into the messages `agentctl batch submit` publishes, every line
//! checked by the service's own validator first. Pure: text in, messages and complaints out.
//!
//! Each line is a task message of the contract. The batch comes from `--batch` (a line may
//! repeat it, not name another); a line without `language` gets `--lang`, else `python`, as
//! `agentctl submit -c` does. Every message gets an idempotency key, so that submitting the file
//! again skips what was accepted: the line's `id`, else one derived from the batch and the line
//! number ([`derived_key`]). Line numbers count from 1 and include blank lines (which are
//! skipped), so they match an editor's.

use std::collections::HashMap;

use serde_json::Value;
use sha2::Digest as _;

use crate::domain::tenant::{TenantName, TenantPolicy};
use crate::domain::validate::{is_valid_key, validate, BackendIsolation, Envelope};

/// One task ready to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// 1-based line number in the file.
    pub line: usize,
    /// The idempotency key (the body's `id` and the AMQP `message_id`).
    pub key: String,
    pub body: Vec<u8>,
}

/// A line that cannot be submitted, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BadLine {
    pub line: usize,
    pub message: String,
}

/// The key of a line without an `id`: `BATCH:LINE`, or when that would be longer than a key may
/// be, the first 32 hex digits of the batch's sha256 in its place. Deterministic, so a second run
/// over the same file finds the same keys.
pub fn derived_key(batch: &str, line: usize) -> String {
    let key = format!("{batch}:{line}");
    if is_valid_key(&key) {
        return key;
    }
    let digest = sha2::Sha256::digest(batch.as_bytes());
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("{hex}:{line}")
}

/// What validation may assume of the tenant when its quotas cannot be read (a token that may
/// not read tenants): everything but the quotas is still checked here, and the service applies
/// the quotas when the task arrives.
fn without_quotas(isolation: &Value) -> TenantPolicy {
    TenantPolicy {
        max_timeout_seconds: u32::MAX,
        max_cpu_millis: u64::MAX,
        max_memory_bytes: u64::MAX,
        max_code_bytes: u64::MAX,
        isolation: vec![isolation.as_str().unwrap_or("standard").to_owned()],
        ..TenantPolicy::default()
    }
}

/// Every line of `text` as a task for `tenant`'s batch `batch`, or why it cannot be one.
/// `policy` is the tenant's, when it could be read.
pub fn prepare(
    text: &str,
    tenant: &TenantName,
    batch: &str,
    default_language: Option<&str>,
    policy: Option<&TenantPolicy>,
) -> (Vec<Task>, Vec<BadLine>) {
    let mut tasks = Vec::new();
    let mut bad = Vec::new();
    let mut keys: HashMap<String, usize> = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        match prepare_line(raw, line, tenant, batch, default_language, policy) {
            Ok(task) => match keys.get(&task.key) {
                Some(first) => bad.push(BadLine {
                    line,
                    message: format!("id {:?} is also line {first}'s; every task needs its own id", task.key),
                }),
                None => {
                    keys.insert(task.key.clone(), line);
                    tasks.push(task);
                }
            },
            Err(message) => bad.push(BadLine { line, message }),
        }
    }
    (tasks, bad)
}

fn prepare_line(
    raw: &str,
    line: usize,
    tenant: &TenantName,
    batch: &str,
    default_language: Option<&str>,
    policy: Option<&TenantPolicy>,
) -> Result<Task, String> {
    let mut value: Value = serde_json::from_str(raw).map_err(|e| format!("not valid JSON: {e}"))?;
    let Some(obj) = value.as_object_mut() else {
        return Err("not a JSON object; each line is one task message".into());
    };
    match obj.get("batch_id") {
        None => {}
        Some(Value::String(b)) if b == batch => {}
        Some(other) => {
            return Err(format!(
                "batch_id {other} differs from --batch {batch}; leave batch_id out, the batch comes from --batch"
            ))
        }
    }
    obj.insert("batch_id".into(), Value::from(batch));
    if !obj.contains_key("language") {
        obj.insert("language".into(), Value::from(default_language.unwrap_or("python")));
    }
    let key = match obj.get("id") {
        Some(Value::String(id)) => id.clone(),
        Some(_) => return Err("id must be a string".into()),
        None => {
            let key = derived_key(batch, line);
            obj.insert("id".into(), Value::from(key.as_str()));
            key
        }
    };
    let fallback;
    let policy = match policy {
        Some(p) => p,
        None => {
            fallback = without_quotas(obj.get("isolation").unwrap_or(&Value::Null));
            &fallback
        }
    };
    let body = serde_json::to_vec(&value).map_err(|e| e.to_string())?;
    let envelope = Envelope { body: &body, message_id: Some(&key), content_type: Some("application/json") };
    // The backend decides what isolation it can offer; the service checks that on arrival.
    validate(tenant, policy, BackendIsolation::Any, &envelope).map_err(|r| r.message)?;
    Ok(Task { line, key, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant() -> TenantName {
        TenantName::parse("acme").unwrap()
    }

    fn body(t: &Task) -> Value {
        serde_json::from_slice(&t.body).unwrap()
    }

    #[test]
    fn good_lines_get_the_batch_a_language_and_a_key() {
        let text = concat!(
            "{\"id\": \"p1\", \"language\": \"r\", \"code\": \"cat(1)\"}\n",
            "\n",
            "{\"code\": \"print(2)\", \"labels\": {\"problem\": \"fizz\"}}\n",
            "{\"code\": \"print(3)\", \"batch_id\": \"eval-1\"}\n",
        );
        let (tasks, bad) = prepare(text, &tenant(), "eval-1", None, None);
        assert_eq!(bad, []);
        assert_eq!(
            tasks.iter().map(|t| (t.line, t.key.as_str())).collect::<Vec<_>>(),
            [(1, "p1"), (3, "eval-1:3"), (4, "eval-1:4")]
        );
        assert_eq!(
            body(&tasks[0]),
            serde_json::json!({"id": "p1", "language": "r", "code": "cat(1)", "batch_id": "eval-1"})
        );
        assert_eq!(body(&tasks[1])["language"], "python");
        assert_eq!(body(&tasks[1])["id"], "eval-1:3");
        let (tasks, _) = prepare("{\"code\": \"cat(1)\"}\n", &tenant(), "b", Some("r"), None);
        assert_eq!(body(&tasks[0])["language"], "r");
    }

    #[test]
    fn every_bad_line_is_reported_with_its_number_and_reason() {
        let text = concat!(
            "{\"code\": \"print(1)\"}\n",
            "{\"code\": \"print(2)\"\n",
            "[1, 2]\n",
            "{\"code\": \"x\", \"langauge\": \"python\"}\n",
            "{\"code\": \"x\", \"batch_id\": \"other\"}\n",
            "{\"id\": \"dup\", \"code\": \"x\"}\n",
            "{\"id\": \"dup\", \"code\": \"y\"}\n",
            "{\"id\": \"no spaces\", \"code\": \"x\"}\n",
            "{\"code\": \"x\", \"priority\": 500}\n",
            "{\"code\": \"x\", \"language\": \"cobol\"}\n",
        );
        let (tasks, bad) = prepare(text, &tenant(), "b", None, None);
        assert_eq!(tasks.iter().map(|t| t.line).collect::<Vec<_>>(), [1, 6]);
        let lines: Vec<usize> = bad.iter().map(|b| b.line).collect();
        assert_eq!(lines, [2, 3, 4, 5, 7, 8, 9, 10]);
        let says = |line: usize, what: &str| {
            let b = bad.iter().find(|b| b.line == line).unwrap();
            assert!(b.message.contains(what), "line {line}: {}", b.message);
        };
        says(2, "not valid JSON");
        says(3, "not a JSON object");
        says(4, "langauge");
        says(5, "differs from --batch b");
        says(7, "also line 6");
        says(8, "[A-Za-z0-9._:-]");
        says(9, "priority 500");
        says(10, "cobol");
    }

    #[test]
    fn the_tenants_quotas_apply_when_known() {
        let line = "{\"code\": \"print(1)\", \"timeout_seconds\": 100}\n";
        let policy = TenantPolicy { max_timeout_seconds: 60, ..TenantPolicy::default() };
        let (_, bad) = prepare(line, &tenant(), "b", None, Some(&policy));
        assert!(bad[0].message.contains("timeout_seconds 100"), "{bad:?}");
        let (tasks, bad) = prepare(line, &tenant(), "b", None, None);
        assert_eq!((tasks.len(), bad.len()), (1, 0));
    }

    #[test]
    fn derived_keys_are_stable_and_always_valid() {
        assert_eq!(derived_key("eval-1", 7), "eval-1:7");
        assert_eq!(derived_key("eval-1", 7), derived_key("eval-1", 7));
        let long = "b".repeat(128);
        let k = derived_key(&long, 12345);
        assert!(is_valid_key(&k) && k.ends_with(":12345") && k.len() == 32 + 6, "{k}");
        assert_ne!(derived_key(&long, 1), derived_key(&"c".repeat(128), 1));
    }
}
