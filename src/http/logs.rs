//! `GET /v1/tasks/{id}/logs`: a task's stdout, and with `follow=true` a stream of it while it
//! runs, for every backend.
//!
//! A finished task's output is the stored one. A running task's output comes from the backend
//! of this process ([`crate::exec::Backend::live_output`]: the local sandbox's pipe buffer, or
//! the pod's log); following polls it and sends what is new, then the stored remainder once the
//! task has ended, so the stream ends exactly when the task does and never repeats a byte.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{Api, ApiError, Caller, ErrorBody};
use crate::store::TaskRow;

/// How often a followed task's output is looked at.
const FOLLOW_EVERY: Duration = Duration::from_millis(250);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LogsQuery {
    #[serde(default)]
    follow: bool,
}

async fn row(api: &Api, id: uuid::Uuid) -> Result<TaskRow, ApiError> {
    api.store.get_task(id).await?.ok_or_else(|| ApiError::NotFound(format!("no task {id}")))
}

/// What there is to show of the task now, and whether it is final.
async fn output_now(api: &Api, row: &TaskRow) -> (Vec<u8>, bool) {
    if row.phase.is_terminal() {
        return (row.stdout.clone().unwrap_or_default().into_bytes(), true);
    }
    let live = match &api.backend {
        Some(b) => b.live_output(row.task_id).await,
        None => None,
    };
    (live.unwrap_or_default(), false)
}

/// `GET /v1/tasks/{id}/logs?follow=`: the task's stdout; with `follow=true`, streamed until the
/// task ends.
#[utoipa::path(get, path = "/v1/tasks/{id}/logs", tag = "tasks",
    params(
        ("id" = String, Path, description = "The task id (uuid)"),
        ("follow" = Option<bool>, Query, description = "Stream the output while the task runs; the response ends when the task does"),
    ),
    responses(
        (status = 200, description = "The task's stdout", body = String, content_type = "text/plain; charset=utf-8"),
        (status = 400, description = "Not a task id, or an unknown parameter", body = ErrorBody),
        (status = 404, description = "No such task, or another tenant's", body = ErrorBody),
        (status = 410, description = "`gone`: retention removed the task's output", body = ErrorBody),
    ))]
pub(super) async fn get_logs(
    caller: Caller,
    State(api): State<Arc<Api>>,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, ApiError> {
    let id = uuid::Uuid::parse_str(&id).map_err(|_| ApiError::BadRequest(format!("{id:?} is not a task id (uuid)")))?;
    let first = row(&api, id).await?;
    // Another tenant's task is as absent as an unknown one.
    if !caller.sees(&first.tenant) {
        return Err(ApiError::NotFound(format!("no task {id}")));
    }
    if let Some(at) = first.outputs_removed_at {
        return Err(ApiError::Gone(format!(
            "the output of task {id} was removed by retention on {}; its result, exit code and \
             timings are kept (agentctl get {id})",
            at.format("%Y-%m-%d")
        )));
    }
    let text = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    if !q.follow {
        let (out, _) = output_now(&api, &first).await;
        return Ok((text, out).into_response());
    }
    // State: bytes already sent, and whether the end was sent.
    let stream = futures_util::stream::unfold((api, 0usize, false), move |(api, sent, done)| async move {
        if done {
            return None;
        }
        loop {
            let row = match row(&api, id).await {
                Ok(r) => r,
                Err(e) => return Some((Err(std::io::Error::other(e.to_string())), (api, sent, true))),
            };
            let (out, last) = output_now(&api, &row).await;
            if out.len() > sent || last {
                let chunk = Bytes::copy_from_slice(out.get(sent..).unwrap_or_default());
                let sent = sent.max(out.len());
                return Some((Ok::<_, std::io::Error>(chunk), (api, sent, last)));
            }
            tokio::time::sleep(FOLLOW_EVERY).await;
        }
    });
    Ok((text, Body::from_stream(stream)).into_response())
}
