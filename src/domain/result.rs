//! The result message the contract promises, and making program output storable. How a run
//! ended, and what phase and reason that gives, is `domain::outcome`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::phase::{Phase, Reason};

/// An artifact as listed in results.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// The result message body, field for field as in the contract.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultMessage {
    pub task_id: Uuid,
    pub id: Option<String>,
    pub tenant: String,
    pub batch_id: Option<String>,
    pub phase: Phase,
    pub reason: Option<Reason>,
    pub message: Option<String>,
    pub exit_code: Option<i32>,
    pub result: Option<serde_json::Value>,
    pub stdout: String,
    pub stderr: String,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub artifacts: Vec<Artifact>,
    pub backend: Option<String>,
    pub submitted_at: DateTime<Utc>,
    pub admitted_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub queue_wait_ms: Option<i64>,
    pub duration_ms: Option<i64>,
}

/// Milliseconds between two instants, when both are known.
pub fn millis_between(from: Option<DateTime<Utc>>, to: Option<DateTime<Utc>>) -> Option<i64> {
    match (from, to) {
        (Some(a), Some(b)) => Some((b - a).num_milliseconds().max(0)),
        _ => None,
    }
}

impl ResultMessage {
    /// A `Rejected` result for a message that never became a task.
    pub fn rejected(
        task_id: Uuid,
        tenant: &str,
        id: Option<String>,
        batch_id: Option<String>,
        reason: Reason,
        message: String,
        at: DateTime<Utc>,
    ) -> Self {
        ResultMessage {
            task_id,
            id,
            tenant: tenant.to_owned(),
            batch_id,
            phase: Phase::Rejected,
            reason: Some(reason),
            message: Some(message),
            exit_code: None,
            result: None,
            stdout: String::new(),
            stderr: String::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            artifacts: Vec::new(),
            backend: None,
            submitted_at: at,
            admitted_at: None,
            started_at: None,
            finished_at: Some(at),
            queue_wait_ms: None,
            duration_ms: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_json_has_contract_field_names() {
        let at = Utc::now();
        let r = ResultMessage::rejected(Uuid::nil(), "acme", Some("k".into()), None, Reason::OomKilled, "m".into(), at);
        let v = serde_json::to_value(&r).unwrap();
        for field in [
            "task_id", "id", "tenant", "batch_id", "phase", "reason", "message", "exit_code",
            "result", "stdout", "stderr", "stdout_truncated", "stderr_truncated", "artifacts",
            "backend", "submitted_at", "admitted_at", "started_at", "finished_at",
            "queue_wait_ms", "duration_ms",
        ] {
            assert!(v.get(field).is_some(), "missing {field}");
        }
        assert_eq!(v["phase"], "Rejected");
        assert_eq!(v["reason"], "OOMKilled");
        assert_eq!(millis_between(Some(at), Some(at + chrono::Duration::milliseconds(1500))), Some(1500));
    }
}

/// Largest result message body. Output is capped by the backend, but JSON escaping can inflate
/// control characters six-fold and brokers cap message sizes (16 MiB by default in RabbitMQ 4):
/// a result that could never be published would block the outbox.
pub const MAX_RESULT_BODY_BYTES: usize = 4 << 20;

/// The serialized result, with stdout and stderr cut (and flagged) until it fits.
pub fn result_body(result: &ResultMessage) -> Vec<u8> {
    let body = serde_json::to_vec(result).expect("result messages always serialise");
    if body.len() <= MAX_RESULT_BODY_BYTES {
        return body;
    }
    let mut r = result.clone();
    let halve = |s: &mut String, flag: &mut bool| {
        if !s.is_empty() {
            let mut cut = s.len() / 2;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s.truncate(cut);
            *flag = true;
        }
    };
    loop {
        halve(&mut r.stdout, &mut r.stdout_truncated);
        halve(&mut r.stderr, &mut r.stderr_truncated);
        let body = serde_json::to_vec(&r).expect("result messages always serialise");
        if body.len() <= MAX_RESULT_BODY_BYTES || (r.stdout.is_empty() && r.stderr.is_empty()) {
            return body;
        }
    }
}

/// Text Postgres can store: NUL replaced. For anything that may carry bytes from a message or a
/// program (error messages quoting input, correlation ids, backend stderr).
pub fn storable_text(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('\0') {
        std::borrow::Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// Replaces NUL in every string and key of a JSON document: Postgres `jsonb` cannot store
/// `\u0000`, and a program's result file may contain anything.
pub fn storable_json(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::String(s) if s.contains('\0') => Value::String(s.replace('\0', "\u{FFFD}")),
        Value::Array(items) => Value::Array(items.into_iter().map(storable_json).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (k.replace('\0', "\u{FFFD}"), storable_json(v)))
                .collect(),
        ),
        other => other,
    }
}

#[cfg(test)]
mod storable_tests {
    #[test]
    fn nul_is_replaced_everywhere() {
        let v = serde_json::json!({"a\u{0}": ["x\u{0}", {"k": "\u{0}"}], "n": 1});
        let s = serde_json::to_string(&super::storable_json(v)).unwrap();
        assert!(!s.contains("\\u0000"), "{s}");
        assert!(s.contains("\"n\":1"));
    }
}

#[cfg(test)]
mod body_tests {
    use super::*;

    #[test]
    fn oversized_results_are_cut_to_fit() {
        let mut r = ResultMessage::rejected(Uuid::nil(), "t", None, None, Reason::NonZeroExit, "m".into(), Utc::now());
        r.stdout = "\u{1}".repeat(3 << 20); // escapes to 6 bytes each
        r.stderr = "é".repeat(1 << 20);
        let body = result_body(&r);
        assert!(body.len() <= MAX_RESULT_BODY_BYTES);
        let back: ResultMessage = serde_json::from_slice(&body).unwrap();
        assert!(back.stdout_truncated && back.stderr_truncated);
        let small = result_body(&ResultMessage::rejected(Uuid::nil(), "t", None, None, Reason::NonZeroExit, "m".into(), Utc::now()));
        assert!(!serde_json::from_slice::<ResultMessage>(&small).unwrap().stdout_truncated);
    }
}
