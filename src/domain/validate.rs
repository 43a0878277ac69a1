//! Turning an untrusted AMQP message into a [`TaskSpec`], or into a [`Rejection`] a person can act on.
//!
//! Everything here is pure: the caller passes the body and the AMQP properties it received, the
//! tenant's policy and what the backend can run. Every rule of the contract's task table is
//! checked; unknown fields are refused; every size is capped *before* anything is decoded into
//! memory-hungry forms; strings that Postgres could not store (NUL) are refused here rather than
//! failing later in a way that would loop the message.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::Deserialize;

use super::phase::Reason;
use super::quantity::{format_cpu, format_memory, parse_cpu_millis, parse_memory_bytes};
use super::task::{Language, Program, TaskSpec};
use super::tenant::{TenantName, TenantPolicy};

/// Caps that the contract leaves to the service. Documented in the README.
pub mod limits {
    /// Whole message body, before parsing. Generous: code plus files plus stdin.
    pub const MAX_BODY_BYTES: usize = 24 << 20;
    pub const MAX_FILES: usize = 64;
    /// Sum of all decoded input files.
    pub const MAX_FILES_BYTES: usize = 8 << 20;
    pub const MAX_FILE_NAME_BYTES: usize = 255;
    pub const MAX_STDIN_BYTES: usize = 4 << 20;
    pub const MAX_ARGS: usize = 256;
    pub const MAX_ARGS_BYTES: usize = 64 << 10;
    pub const MAX_ENV: usize = 64;
    pub const MAX_ENV_VALUE_BYTES: usize = 4096;
    pub const MAX_LABELS: usize = 32;
    pub const MAX_LABEL_KEY_BYTES: usize = 63;
    pub const MAX_LABEL_VALUE_BYTES: usize = 256;
    pub use crate::domain::quantity::MIN_MEMORY_BYTES;
    pub const PRIORITY_RANGE: std::ops::RangeInclusive<i64> = -100..=100;
}

/// The parts of an AMQP delivery that validation looks at.
#[derive(Debug, Clone, Copy, Default)]
pub struct Envelope<'a> {
    pub body: &'a [u8],
    pub message_id: Option<&'a str>,
    pub content_type: Option<&'a str>,
}

/// A task that passed every rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Submission {
    /// The idempotency key: the body's `id`, else the AMQP `message_id`.
    pub client_id: Option<String>,
    pub spec: TaskSpec,
}

/// A task that was refused. Carries what could be salvaged so the result still names the
/// client's id and batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub reason: Reason,
    pub message: String,
    pub client_id: Option<String>,
    pub batch_id: Option<String>,
    pub language: Option<Language>,
}

impl Rejection {
    /// A rejection decided before the body is read (unknown tenant, refused `reply_to`): the
    /// AMQP `message_id` is the only key there is, when it is a valid one.
    pub fn before_parsing(reason: Reason, message: String, message_id: Option<&str>) -> Self {
        Rejection {
            reason,
            message,
            client_id: message_id.filter(|m| is_valid_key(m)).map(str::to_owned),
            batch_id: None,
            language: None,
        }
    }
}

/// The raw wire form; `deny_unknown_fields` is what makes a typo a rejection instead of a
/// silently ignored setting.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTask {
    id: Option<String>,
    language: Option<String>,
    code: Option<String>,
    #[serde(default)]
    files: BTreeMap<String, RawFile>,
    stdin: Option<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    timeout_seconds: Option<i64>,
    resources: Option<RawResources>,
    priority: Option<i64>,
    batch_id: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    isolation: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    content: Option<String>,
    content_base64: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResources {
    cpu: Option<String>,
    memory: Option<String>,
}

/// Loose view used only to salvage `id` and `batch_id` for a rejection's result.
#[derive(Debug, Deserialize)]
struct Salvage {
    id: Option<serde_json::Value>,
    batch_id: Option<serde_json::Value>,
}

/// `[A-Za-z0-9._:-]{1,128}`: the syntax of `id` and `batch_id`.
pub fn is_valid_key(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-'))
}

fn is_valid_env_name(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_uppercase() || c == b'_')
        && b.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_')
}

/// A plain file name: no directory part, not hidden-special, printable ASCII subset.
fn is_valid_file_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= limits::MAX_FILE_NAME_BYTES
        && s != "."
        && s != ".."
        && s.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

fn is_valid_label_key(s: &str) -> bool {
    (1..=limits::MAX_LABEL_KEY_BYTES).contains(&s.len())
        && s.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-' | b'/'))
}

fn no_nul(field: &str, s: &str) -> Result<(), String> {
    if s.contains('\0') {
        Err(format!("{field} contains a NUL character, which is not allowed"))
    } else {
        Ok(())
    }
}

/// File names the sandbox itself writes in the working directory; inputs may not shadow them.
pub const RESERVED_FILE_NAMES: [&str; 2] = ["main.py", "main.R"];

/// What the running backend can provide, so a task is refused at the door rather than failing
/// later (the local sandbox offers only `standard`; Kubernetes also offers runtime classes).
#[derive(Debug, Clone, Copy)]
pub enum BackendIsolation {
    StandardOnly,
    Any,
}

/// The answer to a valid task whose tenant already has `max_queued` tasks queued: a full queue
/// refuses new work instead of growing without bound.
pub fn backlog_full(tenant: &TenantName, sub: &Submission, max_queued: u64) -> Rejection {
    Rejection {
        reason: Reason::BacklogFull,
        message: format!("tenant {tenant} already has {max_queued} tasks queued (max_queued); retry later"),
        client_id: sub.client_id.clone(),
        batch_id: sub.spec.batch_id.clone(),
        language: Some(sub.spec.language),
    }
}

/// Validates one message for `tenant`.
pub fn validate(
    tenant: &TenantName,
    policy: &TenantPolicy,
    backend: BackendIsolation,
    env: &Envelope<'_>,
) -> Result<Submission, Rejection> {
    let salvage = salvage(env);
    let reject = |reason: Reason, message: String| Rejection {
        reason,
        message,
        client_id: salvage.0.clone(),
        batch_id: salvage.1.clone(),
        language: None,
    };
    let fail = |message: String| reject(Reason::ValidationFailed, message);

    if let Some(ct) = env.content_type {
        let base = ct.split(';').next().unwrap_or("").trim();
        if !base.eq_ignore_ascii_case("application/json") {
            return Err(fail(format!("content_type {ct:?} is not supported; publish the task as application/json")));
        }
    }
    if env.body.len() > limits::MAX_BODY_BYTES {
        return Err(fail(format!(
            "message body is {} bytes; the limit is {} bytes",
            env.body.len(),
            limits::MAX_BODY_BYTES
        )));
    }
    let raw: RawTask =
        serde_json::from_slice(env.body).map_err(|e| fail(format!("message body is not a valid task: {e}")))?;

    let client_id = match (&raw.id, env.message_id) {
        (Some(id), _) if !is_valid_key(id) => return Err(fail("id must match [A-Za-z0-9._:-]{1,128}".to_owned())),
        (Some(id), _) => Some(id.clone()),
        (None, Some(mid)) if !is_valid_key(mid) => {
            return Err(fail(
                "AMQP message_id is used as the task id when the body has no id, and must match \
                 [A-Za-z0-9._:-]{1,128}; set a valid \"id\" in the body or message_id"
                    .to_owned(),
            ))
        }
        (None, Some(mid)) => Some(mid.to_owned()),
        (None, None) => None,
    };
    let reject = |reason: Reason, message: String, language: Option<Language>| Rejection {
        reason,
        message,
        client_id: client_id.clone(),
        batch_id: salvage.1.clone(),
        language,
    };
    let fail = |message: String| reject(Reason::ValidationFailed, message, None);

    let language: Language = match raw.language.as_deref() {
        None => return Err(fail("language is required: \"python\" or \"r\"".into())),
        Some(l) => l.parse().map_err(fail)?,
    };
    let fail = |message: String| reject(Reason::ValidationFailed, message, Some(language));

    let code = raw.code.ok_or_else(|| fail("code is required".into()))?;
    if code.len() as u64 > policy.max_code_bytes {
        return Err(fail(format!(
            "code is {} bytes; this tenant's max_code_bytes is {}",
            code.len(),
            policy.max_code_bytes
        )));
    }
    no_nul("code", &code).map_err(fail)?;

    if raw.files.len() > limits::MAX_FILES {
        return Err(fail(format!("at most {} files are allowed", limits::MAX_FILES)));
    }
    let mut files = BTreeMap::new();
    let mut files_bytes = 0usize;
    let b64 = base64::engine::general_purpose::STANDARD;
    for (name, file) in raw.files {
        if !is_valid_file_name(&name) {
            return Err(fail(format!(
                "file name {name:?} is not allowed: use a plain name of letters, digits, '.', \
                 '_' and '-' (no directories)"
            )));
        }
        if RESERVED_FILE_NAMES.contains(&name.as_str()) {
            return Err(fail(format!("file name {name:?} is reserved for the task's code")));
        }
        let bytes = match (file.content, file.content_base64) {
            (Some(text), None) => text.into_bytes(),
            (None, Some(encoded)) => {
                if encoded.len() > limits::MAX_FILES_BYTES / 3 * 4 + 4 {
                    return Err(fail(format!("file {name:?} is too large")));
                }
                b64.decode(encoded.trim())
                    .map_err(|e| fail(format!("file {name:?}: content_base64 is not valid base64: {e}")))?
            }
            _ => return Err(fail(format!("file {name:?} must have exactly one of \"content\" or \"content_base64\""))),
        };
        files_bytes += bytes.len();
        if files_bytes > limits::MAX_FILES_BYTES {
            return Err(fail(format!("input files add up to more than {} bytes", limits::MAX_FILES_BYTES)));
        }
        files.insert(name, b64.encode(bytes));
    }

    if let Some(stdin) = &raw.stdin {
        if stdin.len() > limits::MAX_STDIN_BYTES {
            return Err(fail(format!("stdin is {} bytes; the limit is {}", stdin.len(), limits::MAX_STDIN_BYTES)));
        }
        no_nul("stdin", stdin).map_err(fail)?;
    }

    if raw.args.len() > limits::MAX_ARGS {
        return Err(fail(format!("at most {} args are allowed", limits::MAX_ARGS)));
    }
    if raw.args.iter().map(|a| a.len()).sum::<usize>() > limits::MAX_ARGS_BYTES {
        return Err(fail(format!("args add up to more than {} bytes", limits::MAX_ARGS_BYTES)));
    }
    for (i, a) in raw.args.iter().enumerate() {
        no_nul(&format!("args[{i}]"), a).map_err(fail)?;
    }

    if raw.env.len() > limits::MAX_ENV {
        return Err(fail(format!("at most {} env entries are allowed", limits::MAX_ENV)));
    }
    for (name, value) in &raw.env {
        if !is_valid_env_name(name) {
            return Err(fail(format!("env name {name:?} is not allowed: use [A-Z_][A-Z0-9_]*")));
        }
        if name.starts_with("AGENTTASK_") {
            return Err(fail(format!(
                "env name {name:?} is reserved: names starting AGENTTASK_ are set by the service"
            )));
        }
        if value.len() > limits::MAX_ENV_VALUE_BYTES {
            return Err(fail(format!("env {name} is longer than {} bytes", limits::MAX_ENV_VALUE_BYTES)));
        }
        no_nul(&format!("env {name}"), value).map_err(fail)?;
    }

    let timeout_seconds = match raw.timeout_seconds {
        None => policy.default_timeout_seconds,
        Some(t) if t >= 1 && t <= policy.max_timeout_seconds as i64 => t as u32,
        Some(t) => {
            return Err(fail(format!(
                "timeout_seconds {t} is out of range: use 1..={} for this tenant",
                policy.max_timeout_seconds
            )))
        }
    };

    let (cpu, memory) = match raw.resources {
        Some(r) => (r.cpu, r.memory),
        None => (None, None),
    };
    let cpu_millis = match cpu {
        None => policy.default_cpu_millis,
        Some(s) => parse_cpu_millis(&s).map_err(|e| fail(format!("resources.cpu: {e}")))?,
    };
    if cpu_millis == 0 || cpu_millis > policy.max_cpu_millis {
        return Err(fail(format!(
            "resources.cpu {} is out of range: this tenant allows at most {}",
            format_cpu(cpu_millis),
            format_cpu(policy.max_cpu_millis)
        )));
    }
    let memory_bytes = match memory {
        None => policy.default_memory_bytes,
        Some(s) => parse_memory_bytes(&s).map_err(|e| fail(format!("resources.memory: {e}")))?,
    };
    if memory_bytes < limits::MIN_MEMORY_BYTES || memory_bytes > policy.max_memory_bytes {
        return Err(fail(format!(
            "resources.memory {} is out of range: use {}..={} for this tenant",
            format_memory(memory_bytes),
            format_memory(limits::MIN_MEMORY_BYTES),
            format_memory(policy.max_memory_bytes)
        )));
    }

    let priority = raw.priority.unwrap_or(0);
    if !limits::PRIORITY_RANGE.contains(&priority) {
        return Err(fail(format!("priority {priority} is out of range -100..=100")));
    }

    if let Some(b) = &raw.batch_id {
        if !is_valid_key(b) {
            return Err(fail("batch_id must match [A-Za-z0-9._:-]{1,128}".into()));
        }
    }

    if raw.labels.len() > limits::MAX_LABELS {
        return Err(fail(format!("at most {} labels are allowed", limits::MAX_LABELS)));
    }
    for (k, v) in &raw.labels {
        if !is_valid_label_key(k) {
            return Err(fail(format!("label key {k:?} is not allowed: 1-63 letters, digits, '.', '_', '-', '/'")));
        }
        if v.len() > limits::MAX_LABEL_VALUE_BYTES {
            return Err(fail(format!("label {k} is longer than {} bytes", limits::MAX_LABEL_VALUE_BYTES)));
        }
        no_nul(&format!("label {k}"), v).map_err(fail)?;
    }

    let isolation = raw.isolation.unwrap_or_else(|| "standard".to_owned());
    if !policy.isolation.contains(&isolation) {
        return Err(reject(
            Reason::IsolationNotAllowed,
            format!(
                "isolation {:?} is not allowed for tenant {tenant}; allowed: {}",
                isolation.chars().take(64).collect::<String>(),
                policy.isolation.join(", ")
            ),
            Some(language),
        ));
    }
    if isolation != "standard" && matches!(backend, BackendIsolation::StandardOnly) {
        return Err(reject(
            Reason::IsolationNotAllowed,
            format!(
                "isolation {isolation:?} needs the kubernetes backend; this service runs the \
                 local backend, which offers only \"standard\""
            ),
            Some(language),
        ));
    }

    Ok(Submission {
        client_id,
        spec: TaskSpec {
            language,
            program: Program { code, files, stdin: raw.stdin, args: raw.args, env: raw.env },
            timeout_seconds,
            cpu_millis,
            memory_bytes,
            priority: priority as i16,
            batch_id: raw.batch_id,
            labels: raw.labels,
            isolation,
        },
    })
}

/// Best effort: the `id` and `batch_id` of a body that may be invalid, only when they are
/// themselves valid keys.
fn salvage(env: &Envelope<'_>) -> (Option<String>, Option<String>) {
    let key = |v: Option<serde_json::Value>| match v {
        Some(serde_json::Value::String(s)) if is_valid_key(&s) => Some(s),
        _ => None,
    };
    let parsed: Option<Salvage> =
        if env.body.len() <= limits::MAX_BODY_BYTES { serde_json::from_slice(env.body).ok() } else { None };
    let (id, batch) = match parsed {
        Some(s) => (key(s.id), key(s.batch_id)),
        None => (None, None),
    };
    let id = id.or_else(|| env.message_id.filter(|m| is_valid_key(m)).map(str::to_owned));
    (id, batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tenant() -> TenantName {
        TenantName::parse("acme").unwrap()
    }

    fn run(body: serde_json::Value) -> Result<Submission, Rejection> {
        let bytes = serde_json::to_vec(&body).unwrap();
        validate(
            &tenant(),
            &TenantPolicy::default(),
            BackendIsolation::StandardOnly,
            &Envelope { body: &bytes, message_id: None, content_type: Some("application/json") },
        )
    }

    fn rejected(body: serde_json::Value, needle: &str) -> Rejection {
        let r = run(body.clone()).expect_err(&format!("{body} accepted"));
        assert!(r.message.contains(needle), "{body}: {:?} lacks {needle:?}", r.message);
        r
    }

    #[test]
    fn minimal_task_gets_tenant_defaults() {
        let s = run(json!({"language": "python", "code": "print(1)"})).unwrap();
        assert_eq!(s.client_id, None);
        assert_eq!(s.spec.timeout_seconds, 30);
        assert_eq!((s.spec.cpu_millis, s.spec.memory_bytes), (500, 256 << 20));
        assert_eq!(s.spec.isolation, "standard");
    }

    #[test]
    fn full_task_round_trips() {
        let s = run(json!({
            "id": "job-1", "language": "r", "code": "cat(1)",
            "files": {"a.csv": {"content": "x,y"}, "b.bin": {"content_base64": "AAEC"}},
            "stdin": "in", "args": ["--x"], "env": {"MODE": "fast"},
            "timeout_seconds": 10, "resources": {"cpu": "250m", "memory": "64Mi"},
            "priority": -5, "batch_id": "b:1", "labels": {"team": "eval"}, "isolation": "standard"
        }))
        .unwrap();
        assert_eq!(s.client_id.as_deref(), Some("job-1"));
        assert_eq!(s.spec.language, Language::R);
        assert_eq!(s.spec.program.files["b.bin"], "AAEC");
        assert_eq!(s.spec.program.files["a.csv"], "eCx5");
        assert_eq!((s.spec.cpu_millis, s.spec.priority), (250, -5));
    }

    #[test]
    fn every_rule_rejects_with_an_actionable_message() {
        let base = |extra: serde_json::Value| {
            let mut v = json!({"language": "python", "code": "print(1)"});
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            v
        };
        rejected(base(json!({"colour": "red"})), "unknown field `colour`");
        rejected(json!({"code": "1"}), "language is required");
        rejected(base(json!({"language": "ruby"})), "unknown language");
        rejected(json!({"language": "python"}), "code is required");
        rejected(base(json!({"code": "x".repeat((1 << 20) + 1)})), "max_code_bytes");
        rejected(base(json!({"code": "a\u{0}b"})), "NUL");
        rejected(base(json!({"id": "has space"})), "id must match");
        rejected(base(json!({"id": "x".repeat(129)})), "id must match");
        rejected(base(json!({"files": {"../etc/passwd": {"content": "x"}}})), "not allowed");
        rejected(base(json!({"files": {"a/b": {"content": "x"}}})), "not allowed");
        rejected(base(json!({"files": {"..": {"content": "x"}}})), "not allowed");
        rejected(base(json!({"files": {"main.py": {"content": "x"}}})), "reserved");
        rejected(base(json!({"files": {"a": {}}})), "exactly one");
        rejected(base(json!({"files": {"a": {"content": "x", "content_base64": "eA=="}}})), "exactly one");
        rejected(base(json!({"files": {"a": {"content_base64": "!!"}}})), "base64");
        rejected(base(json!({"files": {"a": {"content": "x", "mode": 7}}})), "unknown field");
        rejected(base(json!({"stdin": "x".repeat(limits::MAX_STDIN_BYTES + 1)})), "stdin");
        rejected(base(json!({"args": vec!["a"; 257]})), "args");
        rejected(base(json!({"args": [1]})), "not a valid task");
        rejected(base(json!({"env": {"lower": "x"}})), "env name");
        rejected(base(json!({"env": {"AGENTTASK_RESULT_FILE": "/etc/passwd"}})), "reserved");
        rejected(base(json!({"env": {"A": "x".repeat(5000)}})), "longer");
        rejected(base(json!({"timeout_seconds": 0})), "timeout_seconds");
        rejected(base(json!({"timeout_seconds": 601})), "1..=600");
        rejected(base(json!({"timeout_seconds": 1.5})), "not a valid task");
        rejected(base(json!({"resources": {"cpu": "3"}})), "at most 2");
        rejected(base(json!({"resources": {"cpu": "lots"}})), "resources.cpu");
        rejected(base(json!({"resources": {"memory": "2Gi"}})), "resources.memory");
        rejected(base(json!({"resources": {"memory": "1Ki"}})), "resources.memory");
        rejected(base(json!({"resources": {"gpu": "1"}})), "unknown field `gpu`");
        rejected(base(json!({"priority": 101})), "priority");
        rejected(base(json!({"batch_id": ""})), "batch_id");
        let labels: serde_json::Map<_, _> = (0..33).map(|i| (format!("k{i}"), json!("v"))).collect();
        rejected(base(json!({"labels": labels})), "labels");
        rejected(base(json!({"labels": {"bad key": "v"}})), "label key");
        let r = rejected(base(json!({"isolation": "gvisor"})), "not allowed for tenant");
        assert_eq!(r.reason, Reason::IsolationNotAllowed);
    }

    #[test]
    fn rejections_keep_salvaged_ids() {
        let r = rejected(json!({"id": "k1", "batch_id": "b1", "language": "cobol", "code": ""}), "language");
        assert_eq!((r.client_id.as_deref(), r.batch_id.as_deref()), (Some("k1"), Some("b1")));
        assert_eq!(r.reason, Reason::ValidationFailed);
    }

    #[test]
    fn garbage_bodies_are_rejected_not_panicking() {
        for body in [&b""[..], b"null", b"[]", b"{", b"\xff\xfe", b"{\"language\":\"python\",\"code\":\"\\ud800\"}"] {
            let r = validate(
                &tenant(),
                &TenantPolicy::default(),
                BackendIsolation::StandardOnly,
                &Envelope { body, message_id: Some("m-1"), content_type: None },
            );
            let r = r.expect_err("garbage accepted");
            assert_eq!(r.reason, Reason::ValidationFailed);
            assert_eq!(r.client_id.as_deref(), Some("m-1"));
        }
        let deep = "[".repeat(10_000);
        let r = validate(
            &tenant(),
            &TenantPolicy::default(),
            BackendIsolation::StandardOnly,
            &Envelope { body: deep.as_bytes(), message_id: None, content_type: None },
        );
        assert!(r.is_err());
    }

    #[test]
    fn message_id_is_the_fallback_key_and_is_checked() {
        let body = br#"{"language":"python","code":"1"}"#;
        let ok = |mid| {
            validate(
                &tenant(),
                &TenantPolicy::default(),
                BackendIsolation::StandardOnly,
                &Envelope { body, message_id: Some(mid), content_type: None },
            )
        };
        assert_eq!(ok("abc").unwrap().client_id.as_deref(), Some("abc"));
        assert!(ok("a b").unwrap_err().message.contains("message_id"));
    }

    #[test]
    fn wrong_content_type_is_rejected() {
        let r = validate(
            &tenant(),
            &TenantPolicy::default(),
            BackendIsolation::StandardOnly,
            &Envelope { body: b"{}", message_id: None, content_type: Some("text/plain") },
        );
        assert!(r.unwrap_err().message.contains("application/json"));
    }

    #[test]
    fn runtime_classes_need_a_backend_that_has_them() {
        let mut policy = TenantPolicy::default();
        policy.isolation.push("gvisor".into());
        let body = br#"{"language":"python","code":"1","isolation":"gvisor"}"#;
        let env = Envelope { body, message_id: None, content_type: None };
        let r = validate(&tenant(), &policy, BackendIsolation::StandardOnly, &env).unwrap_err();
        assert!(r.message.contains("kubernetes backend"));
        assert!(validate(&tenant(), &policy, BackendIsolation::Any, &env).is_ok());
    }
}
