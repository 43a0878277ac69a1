//! HTTP endpoints: `/metrics`, `/healthz`, `/readyz`, and the task API used by `agentctl`.
//!
//! The task API is closed unless the service has an admin token (`AGENTTASK_ADMIN_TOKEN`);
//! requests must then carry it as `Authorization: Bearer <token>`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::body::Bytes;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::domain::result::ResultMessage;
use crate::metrics::Metrics;
use crate::store::{CancelOutcome, Position, Store, TaskRow, TenantStatus};

/// What the HTTP endpoints need, and nothing else.
pub struct Api {
    pub store: Store,
    pub metrics: Metrics,
    /// Opens the task and admin API; without it those endpoints are closed.
    pub admin_token: Option<String>,
    /// Whether the AMQP side is up (for `/readyz`).
    pub amqp_ready: Arc<std::sync::atomic::AtomicBool>,
}

pub async fn serve(listener: tokio::net::TcpListener, ctx: Arc<Api>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let app = router(ctx);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}

pub fn router(ctx: Arc<Api>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/tasks/{id}", get(get_task))
        .route("/v1/tasks/{id}/position", get(get_position))
        .route("/v1/tasks/{id}/cancel", post(cancel_task))
        .route("/v1/batches/{tenant}/{batch}/cancel", post(cancel_batch))
        .route("/v1/tenants", get(list_tenants).put(apply_tenants))
        .route("/v1/tenants/{name}", get(get_tenant))
        .with_state(ctx)
}

async fn readyz(State(ctx): State<Arc<Api>>) -> Response {
    let db = ctx.store.ping().await;
    let amqp = ctx.amqp_ready.load(Ordering::Relaxed);
    let body = format!("database: {}\nrabbitmq: {}\n", ok(db), ok(amqp));
    let status = if db && amqp { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, body).into_response()
}

fn ok(b: bool) -> &'static str {
    if b { "ok" } else { "not ready" }
}

async fn metrics(State(ctx): State<Arc<Api>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        ctx.metrics.render(),
    )
        .into_response()
}

/// An API error body: `{"error": "..."}` with a sentence that says what to do.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(ApiError { error: msg.into() })).into_response()
}

fn authorize(ctx: &Api, headers: &HeaderMap) -> Result<(), Response> {
    let Some(expected) = ctx.admin_token.as_deref() else {
        return Err(error(
            StatusCode::FORBIDDEN,
            "the task API is closed: start the service with AGENTTASK_ADMIN_TOKEN set, and pass \
             that token to agentctl as AGENTCTL_TOKEN",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err(error(StatusCode::UNAUTHORIZED, "missing or wrong token: set AGENTCTL_TOKEN"))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Debug, Deserialize)]
struct TaskQuery {
    tenant: Option<String>,
}

/// A task as the API shows it: the result message's fields plus what was asked for.
#[derive(Debug, Serialize, Deserialize)]
pub struct TaskView {
    #[serde(flatten)]
    pub result: ResultMessage,
    pub language: Option<String>,
    pub priority: i16,
    pub isolation: String,
    pub labels: serde_json::Value,
    pub timeout_seconds: Option<i32>,
    pub attempt: i32,
}

impl From<TaskRow> for TaskView {
    fn from(row: TaskRow) -> Self {
        TaskView {
            result: row.to_result(),
            language: row.language.map(|l| l.as_str().to_owned()),
            priority: row.priority,
            isolation: row.isolation,
            labels: row.labels.0,
            timeout_seconds: row.timeout_seconds,
            attempt: row.attempt,
        }
    }
}

/// `GET /v1/tasks/{id}`: `id` is a task id (uuid), or a client id with `?tenant=`.
async fn get_task(
    State(ctx): State<Arc<Api>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<TaskQuery>,
) -> Response {
    if let Err(resp) = authorize(&ctx, &headers) {
        return resp;
    }
    let found = match (uuid::Uuid::parse_str(&id), q.tenant.as_deref()) {
        // With a tenant, the id is first the client's key (agentctl's keys are uuids too).
        (parsed, Some(tenant)) => match ctx.store.find_task(tenant, &id).await {
            Ok(None) => match parsed {
                Ok(task_id) => ctx.store.get_task(task_id).await,
                Err(_) => Ok(None),
            },
            other => other,
        },
        (Ok(task_id), None) => ctx.store.get_task(task_id).await,
        (Err(_), None) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("{id:?} is not a task id (uuid); to look up a client id, pass ?tenant=NAME"),
            )
        }
    };
    match found {
        Ok(Some(row)) => Json(TaskView::from(row)).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no task {id}")),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("database error: {e}")),
    }
}

/// `GET /v1/tasks/{id}/position`: place in the tenant's queue and an estimated wait.
async fn get_position(State(ctx): State<Arc<Api>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Err(resp) = authorize(&ctx, &headers) {
        return resp;
    }
    let Ok(task_id) = uuid::Uuid::parse_str(&id) else {
        return error(StatusCode::BAD_REQUEST, format!("{id:?} is not a task id (uuid)"));
    };
    match ctx.store.position(task_id).await {
        Ok(Some(p)) => Json::<Position>(p).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no task {id}")),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("database error: {e}")),
    }
}

async fn list_tenants(State(ctx): State<Arc<Api>>, headers: HeaderMap) -> Response {
    if let Err(resp) = authorize(&ctx, &headers) {
        return resp;
    }
    match ctx.store.tenant_statuses().await {
        Ok(list) => Json::<Vec<TenantStatus>>(list).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("database error: {e}")),
    }
}

async fn get_tenant(State(ctx): State<Arc<Api>>, headers: HeaderMap, Path(name): Path<String>) -> Response {
    if let Err(resp) = authorize(&ctx, &headers) {
        return resp;
    }
    match ctx.store.tenant_statuses().await {
        Ok(list) => match list.into_iter().find(|t| t.tenant == name) {
            Some(t) => Json(t).into_response(),
            None => error(StatusCode::NOT_FOUND, format!("no tenant {name}")),
        },
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("database error: {e}")),
    }
}

/// What `PUT /v1/tenants` did.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApplyResult {
    pub tenants: Vec<String>,
}

/// `PUT /v1/tenants` with a tenants file (TOML) as the body: validates it whole, then makes it
/// the configuration of every process, without a restart and without touching queued tasks.
async fn apply_tenants(State(ctx): State<Arc<Api>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(resp) = authorize(&ctx, &headers) {
        return resp;
    }
    let Ok(text) = std::str::from_utf8(&body) else {
        return error(StatusCode::BAD_REQUEST, "the tenants file must be UTF-8 TOML");
    };
    let tenants = match crate::domain::tenant::parse_tenants(text) {
        Ok(t) => t,
        Err(e) => return error(StatusCode::UNPROCESSABLE_ENTITY, format!("tenants file refused: {e}")),
    };
    if let Err(e) = ctx.store.sync_tenants(&tenants).await {
        return error(StatusCode::SERVICE_UNAVAILABLE, format!("database error: {e}"));
    }
    // Every process (this one included) picks the change up from the tenants notification.
    let names = tenants.keys().map(|t| t.to_string()).collect();
    Json(ApplyResult { tenants: names }).into_response()
}

/// What a cancel request did, as `POST /v1/tasks/{id}/cancel` answers it.
#[derive(Debug, Serialize, Deserialize)]
pub struct CancelAnswer {
    pub task_id: uuid::Uuid,
    /// `cancelled` (it had not started; its result is out) or `stopping` (it was running; it is
    /// being killed and its result will say `Cancelled`).
    pub outcome: String,
    pub message: String,
}

/// `POST /v1/tasks/{id}/cancel`: a queued or admitted task ends `Cancelled` without running; a
/// running one is killed. Either way it gets exactly one result. A finished task is left alone
/// (409), an unknown one is a 404.
async fn cancel_task(State(ctx): State<Arc<Api>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Err(resp) = authorize(&ctx, &headers) {
        return resp;
    }
    let Ok(task_id) = uuid::Uuid::parse_str(&id) else {
        return error(StatusCode::BAD_REQUEST, format!("{id:?} is not a task id (uuid)"));
    };
    match ctx.store.request_cancel(task_id).await {
        Ok(CancelOutcome::Cancelled) => Json(CancelAnswer {
            task_id,
            outcome: "cancelled".into(),
            message: "cancelled before it ran".into(),
        })
        .into_response(),
        Ok(CancelOutcome::Requested) => (
            StatusCode::ACCEPTED,
            Json(CancelAnswer {
                task_id,
                outcome: "stopping".into(),
                message: "the task is running and is being stopped; its result will say Cancelled".into(),
            }),
        )
            .into_response(),
        Ok(CancelOutcome::AlreadyFinished(phase)) => error(
            StatusCode::CONFLICT,
            format!("task {task_id} already finished ({phase}); nothing to cancel"),
        ),
        Ok(CancelOutcome::NotFound) => error(StatusCode::NOT_FOUND, format!("no task {task_id}")),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("database error: {e}")),
    }
}

/// What `POST /v1/batches/{tenant}/{batch}/cancel` did.
#[derive(Debug, Serialize, Deserialize)]
pub struct BatchCancelAnswer {
    /// Tasks that had not started and are `Cancelled` now.
    pub cancelled: u64,
    /// Running tasks being stopped.
    pub stopping: u64,
}

/// `POST /v1/batches/{tenant}/{batch}/cancel`: cancels every unfinished task of a batch.
async fn cancel_batch(
    State(ctx): State<Arc<Api>>,
    headers: HeaderMap,
    Path((tenant, batch)): Path<(String, String)>,
) -> Response {
    if let Err(resp) = authorize(&ctx, &headers) {
        return resp;
    }
    let ids = match ctx.store.unfinished_in_batch(&tenant, &batch).await {
        Ok(ids) => ids,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, format!("database error: {e}")),
    };
    let mut answer = BatchCancelAnswer { cancelled: 0, stopping: 0 };
    for id in ids {
        match ctx.store.request_cancel(id).await {
            Ok(CancelOutcome::Cancelled) => answer.cancelled += 1,
            Ok(CancelOutcome::Requested) => answer.stopping += 1,
            // Finished meanwhile: nothing to do.
            Ok(_) => {}
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, format!("database error: {e}")),
        }
    }
    Json(answer).into_response()
}
