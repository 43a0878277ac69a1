//! The task row every consumer reads, and the writes that finish a task: queueing its result in
//! the same transaction.
//!
//! Every transition names the phase it expects (`where phase = ...`) and, for executions, the
//! attempt it belongs to, so a stale executor or a second scheduler cannot move a task twice.

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use super::Result;
use crate::domain::phase::{Phase, Reason};
use crate::domain::result::{millis_between, result_body, Artifact, ResultMessage};
use crate::domain::task::Language;

/// A task as stored, for `agentctl get` and for shaping results.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TaskRow {
    pub task_id: Uuid,
    pub tenant: String,
    pub client_id: Option<String>,
    pub batch_id: Option<String>,
    /// Null only for a rejection of a message whose language could not be read.
    pub language: Option<Language>,
    pub phase: Phase,
    pub reason: Option<Reason>,
    pub message: Option<String>,
    pub priority: i16,
    pub timeout_seconds: Option<i32>,
    pub cpu_millis: Option<i64>,
    pub memory_bytes: Option<i64>,
    pub isolation: String,
    pub labels: Json<serde_json::Value>,
    pub exit_code: Option<i32>,
    pub result: Option<Json<serde_json::Value>>,
    pub stdout: Option<String>,
    pub stderr: Option<String>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub artifacts: Json<Vec<Artifact>>,
    pub backend: Option<String>,
    pub attempt: i32,
    pub submitted_at: DateTime<Utc>,
    pub admitted_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// When retention removed stdout, stderr and artifacts (see `crate::retention`).
    pub outputs_removed_at: Option<DateTime<Utc>>,
    /// See [`ResultMessage::warm`].
    pub warm: Option<bool>,
}

impl TaskRow {
    /// The contract's result message for this task. The phase and reason were decoded exactly
    /// when the row was read (an unreadable one is an error there, never a guess here).
    pub fn to_result(&self) -> ResultMessage {
        ResultMessage {
            task_id: self.task_id,
            id: self.client_id.clone(),
            tenant: self.tenant.clone(),
            batch_id: self.batch_id.clone(),
            phase: self.phase,
            reason: self.reason,
            message: self.message.clone(),
            exit_code: self.exit_code,
            result: self.result.as_ref().map(|j| j.0.clone()),
            stdout: self.stdout.clone().unwrap_or_default(),
            stderr: self.stderr.clone().unwrap_or_default(),
            stdout_truncated: self.stdout_truncated,
            stderr_truncated: self.stderr_truncated,
            artifacts: self.artifacts.0.clone(),
            backend: self.backend.clone(),
            submitted_at: self.submitted_at,
            admitted_at: self.admitted_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
            queue_wait_ms: millis_between(Some(self.submitted_at), self.admitted_at),
            duration_ms: millis_between(self.started_at, self.finished_at),
            warm: self.warm,
        }
    }
}

/// `sqlx::query_as!(TaskRow, ...)` for a query that selects every column of a [`TaskRow`]:
/// one column list for every reader of whole rows, still checked against the schema at compile
/// time. The argument is the rest of the query after the select list (`from ... where ...`),
/// a string literal, then the query's parameters.
macro_rules! select_task_rows {
    ($rest:literal $(, $arg:expr)* $(,)?) => {{
        use $crate::domain::phase::{Phase, Reason};
        use $crate::domain::result::Artifact;
        use $crate::domain::task::Language;
        use sqlx::types::Json;
        sqlx::query_as!(
            $crate::store::tasks::TaskRow,
            r#"select task_id, tenant, client_id, batch_id, language as "language: Language",
             phase as "phase: Phase", reason as "reason: Reason", message, priority,
             timeout_seconds, cpu_millis, memory_bytes, isolation,
             labels as "labels: Json<serde_json::Value>", exit_code,
             result as "result: Json<serde_json::Value>", stdout, stderr, stdout_truncated,
             stderr_truncated, artifacts as "artifacts: Json<Vec<Artifact>>", backend, attempt,
             submitted_at, admitted_at, started_at, finished_at, outputs_removed_at, warm
           "# + $rest,
            $($arg),*
        )
    }};
}
pub(super) use select_task_rows;

/// One task by id.
pub async fn fetch_row(conn: impl PgExecutor<'_>, task_id: Uuid) -> Result<Option<TaskRow>> {
    Ok(select_task_rows!("from agenttask.tasks where task_id = $1", task_id).fetch_optional(conn).await?)
}

/// Where a task's result is published: an exchange and a routing key (decided by `amqp::route`).
#[derive(Debug, Clone, Copy)]
pub struct ReplyTo<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
}

/// Routing of a task's result, as stored with the task.
pub(super) struct ReplyColumns {
    pub reply_exchange: String,
    pub reply_routing_key: String,
    pub correlation_id: Option<String>,
}

/// Queues the result of `task_id`, which just became terminal on `conn` (inside the caller's
/// transaction, so the transition and its result commit together).
pub(super) async fn queue_result_of(conn: &mut PgConnection, task_id: Uuid) -> Result<()> {
    let row = fetch_row(&mut *conn, task_id)
        .await?
        .ok_or_else(|| super::StoreError::Corrupt(format!("task {task_id} vanished inside its own transaction")))?;
    let route = sqlx::query!(
        "select reply_exchange, reply_routing_key, correlation_id, kube_object from agenttask.tasks where task_id = $1",
        task_id
    )
    .fetch_one(&mut *conn)
    .await?;
    if route.kube_object.is_some() {
        // Applied as an AgentTask: its status is its answer; there is no reply queue.
        return Ok(());
    }
    let route = ReplyColumns {
        reply_exchange: route.reply_exchange,
        reply_routing_key: route.reply_routing_key,
        correlation_id: route.correlation_id,
    };
    enqueue_result(conn, &row.to_result(), &route).await
}

/// Removes a rejected task's claim on a client key (its result was already queued).
pub(super) async fn forget_rejection(conn: impl PgExecutor<'_>, tenant: &str, client_id: Option<&str>) -> Result<()> {
    if let Some(key) = client_id {
        sqlx::query!(
            "delete from agenttask.tasks where tenant = $1 and client_id = $2 and phase = $3",
            tenant,
            key,
            Phase::Rejected as _
        )
        .execute(conn)
        .await?;
    }
    Ok(())
}

pub(super) async fn enqueue_result(
    conn: impl PgExecutor<'_>,
    result: &ResultMessage,
    route: &ReplyColumns,
) -> Result<()> {
    let body = result_body(result);
    sqlx::query!(
        "insert into agenttask.outbox (message_id, exchange, routing_key, correlation_id, phase, body, tenant) \
         values ($1, $2, $3, $4, $5, $6, $7) on conflict (message_id) do nothing",
        result.task_id,
        route.reply_exchange,
        route.reply_routing_key,
        route.correlation_id,
        result.phase as _,
        body,
        result.tenant
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Queues many results in one statement (see [`enqueue_result`]).
pub(super) async fn enqueue_results(
    conn: impl PgExecutor<'_>,
    results: &[(ResultMessage, ReplyColumns)],
) -> Result<()> {
    if results.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = results.iter().map(|(r, _)| r.task_id).collect();
    let exchanges: Vec<&str> = results.iter().map(|(_, c)| c.reply_exchange.as_str()).collect();
    let routing_keys: Vec<&str> = results.iter().map(|(_, c)| c.reply_routing_key.as_str()).collect();
    let correlation_ids: Vec<Option<&str>> = results.iter().map(|(_, c)| c.correlation_id.as_deref()).collect();
    let phases: Vec<Phase> = results.iter().map(|(r, _)| r.phase).collect();
    let bodies: Vec<Vec<u8>> = results.iter().map(|(r, _)| result_body(r)).collect();
    let tenants: Vec<&str> = results.iter().map(|(r, _)| r.tenant.as_str()).collect();
    sqlx::query!(
        "insert into agenttask.outbox (message_id, exchange, routing_key, correlation_id, phase, body, tenant) \
         select * from unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bytea[], $7::text[]) \
         on conflict (message_id) do nothing",
        &ids,
        &exchanges as _,
        &routing_keys as _,
        &correlation_ids as _,
        &phases as _,
        &bodies,
        &tenants as _
    )
    .execute(conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    fn finished_row() -> TaskRow {
        let submitted = DateTime::parse_from_rfc3339("2026-11-27T12:00:00Z").unwrap().with_timezone(&Utc);
        TaskRow {
            task_id: Uuid::nil(),
            tenant: "acme".into(),
            client_id: Some("k1".into()),
            batch_id: Some("b".into()),
            language: Some(Language::Python),
            phase: Phase::Failed,
            reason: Some(Reason::NonZeroExit),
            message: Some("the program exited with code 3".into()),
            priority: 0,
            timeout_seconds: Some(30),
            cpu_millis: Some(500),
            memory_bytes: Some(1 << 28),
            isolation: "standard".into(),
            labels: Json(serde_json::json!({"team": "x"})),
            exit_code: Some(3),
            result: Some(Json(serde_json::json!({"n": 1}))),
            stdout: Some("out\n".into()),
            stderr: None,
            stdout_truncated: true,
            stderr_truncated: false,
            artifacts: Json(vec![Artifact { name: "a.csv".into(), size: 3, sha256: "00".into() }]),
            backend: Some("local".into()),
            attempt: 1,
            submitted_at: submitted,
            admitted_at: Some(submitted + Duration::milliseconds(250)),
            started_at: Some(submitted + Duration::seconds(1)),
            finished_at: Some(submitted + Duration::milliseconds(3500)),
            outputs_removed_at: None,
            warm: None,
        }
    }

    #[test]
    fn a_finished_row_becomes_the_contracts_result_message() {
        let row = finished_row();
        let r = row.to_result();
        assert_eq!(
            (r.task_id, r.id.as_deref(), r.tenant.as_str(), r.batch_id.as_deref()),
            (Uuid::nil(), Some("k1"), "acme", Some("b"))
        );
        assert_eq!((r.phase, r.reason, r.exit_code), (Phase::Failed, Some(Reason::NonZeroExit), Some(3)));
        assert_eq!(r.message, row.message);
        assert_eq!(r.result, Some(serde_json::json!({"n": 1})));
        assert_eq!((r.stdout.as_str(), r.stderr.as_str()), ("out\n", ""), "a NULL stream is empty text");
        assert!(r.stdout_truncated && !r.stderr_truncated);
        assert_eq!(r.artifacts, row.artifacts.0);
        assert_eq!(r.backend.as_deref(), Some("local"));
        assert_eq!((r.queue_wait_ms, r.duration_ms), (Some(250), Some(2500)));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!((json["phase"].as_str(), json["reason"].as_str()), (Some("Failed"), Some("NonZeroExit")));
    }

    #[test]
    fn a_task_that_never_ran_has_no_timings() {
        let mut row = finished_row();
        (row.phase, row.reason, row.admitted_at, row.started_at, row.exit_code) =
            (Phase::Rejected, Some(Reason::BacklogFull), None, None, None);
        let r = row.to_result();
        assert_eq!((r.queue_wait_ms, r.duration_ms), (None, None));
        assert_eq!((r.phase, r.reason), (Phase::Rejected, Some(Reason::BacklogFull)));
    }
}
