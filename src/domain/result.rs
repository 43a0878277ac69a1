//! The result message the contract promises, and making program output storable. How a run
//! ended, and what phase and reason that gives, is `domain::outcome`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::phase::{Phase, Reason};

/// An artifact as listed in results.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Artifact {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// The result message body, field for field as in the contract.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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
    /// Whether the task ran in a pre-started (warm) sandbox of the local backend: `false` when
    /// its language has a warm pool but it waited for a cold start; null without a pool.
    #[serde(default)]
    pub warm: Option<bool>,
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
            warm: None,
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
            "task_id",
            "id",
            "tenant",
            "batch_id",
            "phase",
            "reason",
            "message",
            "exit_code",
            "result",
            "stdout",
            "stderr",
            "stdout_truncated",
            "stderr_truncated",
            "artifacts",
            "backend",
            "submitted_at",
            "admitted_at",
            "started_at",
            "finished_at",
            "queue_wait_ms",
            "duration_ms",
        ] {
            assert!(v.get(field).is_some(), "missing {field}");
        }
        assert_eq!(v["phase"], "Rejected");
        assert_eq!(v["reason"], "OOMKilled");
        assert_eq!(millis_between(Some(at), Some(at + chrono::Duration::milliseconds(1500))), Some(1500));
    }
}

/// Largest result message body. Output is capped by the backend, but JSON escaping can inflate
/// control characters six-fold, a program's result JSON re-serialises larger than written
/// (`9e15` becomes `9000000000000000.0`), artifact names may be long and escaped, and brokers cap
/// message sizes (16 MiB by default in RabbitMQ 4): a result that could never be published would
/// block the outbox.
pub const MAX_RESULT_BODY_BYTES: usize = 4 << 20;

/// Longest `message` kept in a result body.
pub const MAX_MESSAGE_BYTES: usize = 64 << 10;

fn to_body(r: &ResultMessage) -> Vec<u8> {
    serde_json::to_vec(r).expect("result messages always serialise")
}

/// Cuts `s` to at most `max` bytes on a character boundary; true if it cut.
fn cut_to(s: &mut String, max: usize) -> bool {
    if s.len() <= max {
        return false;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    true
}

fn note(r: &mut ResultMessage, what: &str) {
    let m = r.message.get_or_insert_with(String::new);
    if !m.is_empty() {
        m.push_str("; ");
    }
    m.push_str(what);
}

/// The serialized result, never larger than [`MAX_RESULT_BODY_BYTES`]. Every part is bounded,
/// in this order until it fits: the message (to [`MAX_MESSAGE_BYTES`]), stdout and stderr
/// (halved in turn, flagged by `stdout_truncated` / `stderr_truncated`), the program's result
/// JSON (dropped), then the artifact list (cut from the end). What was cut beyond the output
/// streams is said in `message`, which the contract has no other field for.
pub fn result_body(result: &ResultMessage) -> Vec<u8> {
    let body = to_body(result);
    if body.len() <= MAX_RESULT_BODY_BYTES {
        return body;
    }
    let mut r = result.clone();
    if let Some(m) = &mut r.message {
        if cut_to(m, MAX_MESSAGE_BYTES) {
            m.push_str(" [message cut]");
        }
    }
    // Sizes are computed part by part (compact JSON is the concatenation of its parts), so the
    // big parts are not serialised again on every cut.
    let escaped = |s: &str| serde_json::to_string(s).map_or(0, |j| j.len());
    let without_output = |r: &ResultMessage| {
        let mut t = r.clone();
        t.stdout.clear();
        t.stderr.clear();
        // Minus the two empty strings' quotes.
        to_body(&t).len() - 4
    };
    let fits = |base: usize, r: &ResultMessage| base + escaped(&r.stdout) + escaped(&r.stderr) <= MAX_RESULT_BODY_BYTES;
    let base = without_output(&r);
    while !(fits(base, &r) || r.stdout.is_empty() && r.stderr.is_empty()) {
        for (s, flag) in [(&mut r.stdout, &mut r.stdout_truncated), (&mut r.stderr, &mut r.stderr_truncated)] {
            if !s.is_empty() {
                let half = s.len() / 2;
                cut_to(s, half);
                *flag = true;
            }
        }
    }
    if fits(base, &r) {
        return to_body(&r);
    }
    if let Some(v) = r.result.take() {
        let size = serde_json::to_vec(&v).map_or(0, |b| b.len());
        note(
            &mut r,
            &format!("the result JSON ({size} bytes serialised) was dropped: the result message would exceed {MAX_RESULT_BODY_BYTES} bytes"),
        );
        let body = to_body(&r);
        if body.len() <= MAX_RESULT_BODY_BYTES {
            return body;
        }
    }
    // Artifacts: keep the longest prefix that fits (binary search over how many are kept).
    let total = r.artifacts.len();
    let all = std::mem::take(&mut r.artifacts);
    let with = |kept: usize, r: &ResultMessage| {
        let mut t = r.clone();
        t.artifacts = all[..kept].to_vec();
        note(
            &mut t,
            &format!(
                "{} of {total} artifacts not listed: the result message would exceed {MAX_RESULT_BODY_BYTES} bytes",
                total - kept
            ),
        );
        to_body(&t)
    };
    let (mut lo, mut hi) = (0usize, total);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if with(mid, &r).len() <= MAX_RESULT_BODY_BYTES {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    with(lo, &r)
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
        Value::Object(map) => {
            Value::Object(map.into_iter().map(|(k, v)| (k.replace('\0', "\u{FFFD}"), storable_json(v))).collect())
        }
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

    fn base() -> ResultMessage {
        ResultMessage::rejected(Uuid::nil(), "t", None, None, Reason::NonZeroExit, "m".into(), Utc::now())
    }

    fn back(body: &[u8]) -> ResultMessage {
        assert!(body.len() <= MAX_RESULT_BODY_BYTES, "{} bytes", body.len());
        serde_json::from_slice(body).unwrap()
    }

    #[test]
    fn oversized_output_is_cut_to_fit_and_flagged() {
        let mut r = base();
        r.stdout = "\u{1}".repeat(3 << 20); // escapes to 6 bytes each
        r.stderr = "é".repeat(1 << 20);
        let b = back(&result_body(&r));
        assert!(b.stdout_truncated && b.stderr_truncated);
        assert_eq!(b.message.as_deref(), Some("m"));
        let small = base();
        assert_eq!(back(&result_body(&small)), small);
    }

    #[test]
    fn a_result_json_that_reserialises_larger_is_dropped_and_said_so() {
        // 1.5 MB of `9e15,` becomes 5.7 MB of `9000000000000000.0,`.
        let mut r = base();
        let written = format!("[{}9e15]", "9e15,".repeat(300_000));
        r.result = Some(serde_json::from_str(&written).unwrap());
        r.stdout = "x".repeat(1 << 20);
        let b = back(&result_body(&r));
        assert!(b.result.is_none(), "the result JSON was kept");
        assert!(b.stdout_truncated);
        assert!(b.message.unwrap().contains("the result JSON"));
    }

    #[test]
    fn long_escaped_artifact_names_are_cut_from_the_list_and_said_so() {
        let mut r = base();
        r.artifacts = (0..3000)
            .map(|i| Artifact { name: format!("{i}/{}", "\u{7}".repeat(250)), size: 1, sha256: "0".repeat(64) })
            .collect();
        let b = back(&result_body(&r));
        assert!(!b.artifacts.is_empty() && b.artifacts.len() < 3000);
        assert_eq!(b.artifacts[0].name, r.artifacts[0].name);
        let m = b.message.unwrap();
        assert!(m.contains(&format!("{} of 3000 artifacts not listed", 3000 - b.artifacts.len())), "{m}");
    }

    #[test]
    fn a_huge_message_is_cut() {
        let mut r = base();
        r.message = Some("\u{1b}".repeat(1 << 20));
        let b = back(&result_body(&r));
        let m = b.message.unwrap();
        assert!(m.len() <= MAX_MESSAGE_BYTES + 20 && m.ends_with("[message cut]"));
    }

    #[test]
    fn every_part_at_once_still_fits() {
        let mut r = base();
        r.message = Some("m".repeat(1 << 20));
        r.stdout = "\u{1}".repeat(1 << 20);
        r.stderr = "\u{1}".repeat(1 << 20);
        r.result = Some(serde_json::Value::String("\u{1}".repeat(1 << 20)));
        r.artifacts = (0..2000)
            .map(|i| Artifact { name: format!("{i}{}", "\u{1}".repeat(255)), size: 1, sha256: String::new() })
            .collect();
        back(&result_body(&r));
    }
}
