//! `GET /v1/tasks/{id}/artifacts/{name}`: one artifact of a finished task, as collected.
//!
//! Only names the service recorded for the task are served (collection already refused links,
//! special files and anything past the caps), so a request cannot reach any other file: the
//! name is looked up in the task's row, never joined to a path as given. The bytes come from
//! the process's artifact sink, whichever backend ran the task.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::{Api, ApiError, Caller};

pub(super) async fn get_artifact(
    caller: Caller,
    State(api): State<Arc<Api>>,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let id = uuid::Uuid::parse_str(&id).map_err(|_| ApiError::BadRequest(format!("{id:?} is not a task id (uuid)")))?;
    let row = api
        .store
        .get_task(id)
        .await?
        .filter(|r| caller.sees(&r.tenant))
        .ok_or_else(|| ApiError::NotFound(format!("no task {id}")))?;
    let artifact = row
        .artifacts
        .0
        .iter()
        .find(|a| a.name == name)
        .ok_or_else(|| ApiError::NotFound(format!("task {id} has no artifact {name:?}")))?;
    let Some(sink) = api.artifacts.clone() else {
        return Err(ApiError::NotFound(format!("artifacts are not kept where this process can read them ({name:?})")));
    };
    let (tenant, stored) = (row.tenant.clone(), artifact.name.clone());
    let file = tokio::task::spawn_blocking(move || sink.open(&tenant, id, &stored))
        .await
        .map_err(|e| ApiError::Internal(format!("opening an artifact failed: {e}")))?
        .map_err(|_| ApiError::NotFound(format!("artifact {name:?} of task {id} is no longer kept (expired)")))?;
    let file = tokio::fs::File::from_std(file);
    let stream = tokio_util::io::ReaderStream::new(file);
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, artifact.size.to_string()),
            (header::ETAG, format!("\"sha256:{}\"", artifact.sha256)),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}
