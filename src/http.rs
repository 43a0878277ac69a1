//! HTTP endpoints: `/metrics`, `/healthz`, `/readyz`, the task API used by `agentctl`, and its
//! OpenAPI document at `/openapi.json` (see [`openapi`]).
//!
//! Every task API request carries a token as `Authorization: Bearer <token>`: the service's
//! admin token (`AGENTTASK_ADMIN_TOKEN`; without it the admin endpoints are closed), or a
//! tenant's token (`agentctl tenant token create T`). A tenant's token sees and acts on its own
//! tenant's tasks only: another tenant's task is answered exactly like a task that does not
//! exist (404), so a token cannot even learn which ids exist elsewhere. A tenant's token may
//! read its own tenant (`GET /v1/tenants/{name}`); listing and changing tenants and managing
//! tokens need the admin token (403 for a tenant's).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

mod artifacts;
mod logs;
pub mod openapi;

use crate::domain::result::ResultMessage;
use crate::domain::token;
use crate::metrics::Metrics;
use crate::store::{
    BatchStatus, CancelOutcome, Position, Store, StoreError, TaskRow, TaskSummary, TenantStatus, TokenInfo,
};

/// What the HTTP endpoints need, and nothing else.
pub struct Api {
    pub store: Store,
    pub metrics: Metrics,
    /// The admin token: opens the admin API (without it those endpoints are closed; tenants' tokens
    /// still work).
    pub admin_token: Option<String>,
    /// What the components of this process say about their connections (for `/readyz`).
    pub readiness: Arc<crate::readiness::Readiness>,
    /// The backend of this process's executor, if it runs one: where running tasks' output is
    /// read for `logs?follow=true`.
    pub backend: Option<Arc<dyn crate::exec::Backend>>,
    /// Where collected artifacts are kept (the data directory, or the artifacts claim of the
    /// Kubernetes backend), when this process can read them.
    pub artifacts: Option<Arc<dyn crate::exec::artifacts::ArtifactSink>>,
}

/// The HTTP server stopped serving (an I/O error on its listener).
#[derive(Debug, thiserror::Error)]
#[error("the HTTP server stopped: {0}")]
pub struct ServeError(#[source] std::io::Error);

/// Serves the endpoints on `listener` until `shutdown`.
///
/// # Errors
/// [`ServeError`] when the listener fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    ctx: Arc<Api>,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let app = router(ctx);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .map_err(ServeError)
}

pub fn router(ctx: Arc<Api>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(openapi::serve))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/tasks", get(list_tasks))
        .route("/v1/tasks/{id}", get(get_task))
        .route("/v1/tasks/{id}/position", get(get_position))
        .route("/v1/tasks/{id}/logs", get(logs::get_logs))
        .route("/v1/tasks/{id}/artifacts/{*name}", get(artifacts::get_artifact))
        .route("/v1/tasks/{id}/cancel", post(cancel_task))
        .route("/v1/batches/{tenant}/{batch}", get(get_batch))
        .route("/v1/batches/{tenant}/{batch}/results", get(batch_results))
        .route("/v1/batches/{tenant}/{batch}/cancel", post(cancel_batch))
        .route("/v1/tenants", get(list_tenants).put(apply_tenants))
        .route("/v1/tenants/{name}", get(get_tenant))
        .route("/v1/tenants/{name}/tokens", post(create_token))
        .route("/v1/tenants/{name}/sql-role", post(create_sql_role))
        .route("/v1/tokens", get(list_tokens))
        .route("/v1/tokens/{id}", axum::routing::delete(revoke_token))
        .with_state(ctx)
}

#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "The process is up", body = String, content_type = "text/plain; charset=utf-8")))]
async fn healthz() -> &'static str {
    "ok\n"
}

/// What is down in this process, and why: the components' connections, the database, the
/// migrations. Empty when ready.
async fn down_parts(ctx: &Api) -> std::collections::BTreeMap<String, String> {
    let mut down = ctx.readiness.down_parts();
    match ctx.store.migrations_applied().await {
        Ok(true) => {}
        Ok(false) => {
            down.insert("migrations".into(), "not all applied: run `agenttask migrate`".into());
        }
        Err(e) => {
            down.insert("database".into(), e.to_string());
        }
    }
    down
}

/// `/readyz`'s answer.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReadyAnswer {
    pub ready: bool,
    /// What is down, and why.
    pub down: std::collections::BTreeMap<String, String>,
}

/// `/readyz`: 200 when the database answers, the migrations are applied and every consumer and
/// the publisher of this process are connected; otherwise 503 naming what is down.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "Ready", body = ReadyAnswer),
        (status = 503, description = "Not ready: `down` names what is down, and why", body = ReadyAnswer),
    ))]
async fn readyz(State(ctx): State<Arc<Api>>) -> Response {
    let down = down_parts(&ctx).await;
    let status = if down.is_empty() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(ReadyAnswer { ready: down.is_empty(), down })).into_response()
}

#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain; version=0.0.4")))]
async fn metrics(State(ctx): State<Arc<Api>>) -> Response {
    // Prometheus scrapes /metrics, not /readyz: readiness is evaluated here too, so alerts see it.
    ctx.metrics.ready.set(i64::from(down_parts(&ctx).await.is_empty()));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], ctx.metrics.render()).into_response()
}

/// The body of every API error, as the contract says: `{"code", "message"}`. `code` is a stable
/// machine-readable name; `message` is a sentence that says what to do.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// One of `unauthorized`, `api_closed`, `forbidden`, `bad_request`, `not_found`, `conflict`,
    /// `gone`, `invalid`, `unavailable`, `internal`.
    pub code: String,
    pub message: String,
}

/// Everything a task API handler can fail with; one place maps each to its status and code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "the service has no admin token, so the admin API is closed: start it with \
         AGENTTASK_ADMIN_TOKEN set and pass that token to agentctl as AGENTCTL_TOKEN, or use a \
         tenant's token"
    )]
    Closed,
    #[error("missing, wrong or revoked token: set AGENTCTL_TOKEN to the admin token or a tenant's token")]
    Unauthorized,
    /// A tenant's token asked for something only the admin may do.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// What was asked for existed and was removed for good (retention).
    #[error("{0}")]
    Gone(String),
    /// The request was understood but its content is refused (a tenants file that does not
    /// validate).
    #[error("{0}")]
    Invalid(String),
    #[error("database error: {0}")]
    Store(#[from] StoreError),
    /// The service itself failed (no randomness for a token).
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The `code` of the error body; also the metric label.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Closed => "api_closed",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::Gone(_) => "gone",
            ApiError::Invalid(_) => "invalid",
            ApiError::Store(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Closed => StatusCode::FORBIDDEN,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Gone(_) => StatusCode::GONE,
            ApiError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Store(e) = &self {
            tracing::warn!(error = %e, "task API: database error");
        }
        let body = ErrorBody { code: self.code().to_owned(), message: self.to_string() };
        (self.status(), Json(body)).into_response()
    }
}

/// Who a request comes from, by its bearer token. Taking `Caller` as a handler argument is what
/// closes the handler to requests without a valid token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The service's admin token: sees every tenant.
    Admin,
    /// A tenant's token: sees this tenant's tasks only.
    Tenant(String),
}

impl Caller {
    /// Whether this caller may see and act on `tenant`'s tasks.
    pub fn sees(&self, tenant: &str) -> bool {
        match self {
            Caller::Admin => true,
            Caller::Tenant(own) => own == tenant,
        }
    }
}

impl FromRequestParts<Arc<Api>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, ctx: &Arc<Api>) -> Result<Caller, ApiError> {
        let given = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let Some(given) = given.filter(|g| !g.is_empty()) else {
            return Err(if ctx.admin_token.is_some() { ApiError::Unauthorized } else { ApiError::Closed });
        };
        if let Some(presented) = token::parse(given) {
            // The id finds the row; the secret's hash is compared in constant time.
            let Some((tenant, stored)) = ctx.store.live_token(presented.id).await? else {
                return Err(ApiError::Unauthorized);
            };
            if !token::digests_equal(&presented.secret_sha256, &stored) {
                return Err(ApiError::Unauthorized);
            }
            if let Err(e) = ctx.store.touch_token(presented.id).await {
                tracing::warn!(error = %e, "task API: could not record a token's use");
            }
            return Ok(Caller::Tenant(tenant));
        }
        match ctx.admin_token.as_deref() {
            None => Err(ApiError::Closed),
            Some(expected) if token::is_admin_token(given, expected) => Ok(Caller::Admin),
            Some(_) => Err(ApiError::Unauthorized),
        }
    }
}

/// Proof that a request carries the admin token: taking `Admin` as a handler argument is what
/// closes the handler to everyone else (a tenant's token gets 403).
pub struct Admin;

impl FromRequestParts<Arc<Api>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, ctx: &Arc<Api>) -> Result<Admin, ApiError> {
        match Caller::from_request_parts(parts, ctx).await? {
            Caller::Admin => Ok(Admin),
            Caller::Tenant(_) => Err(ApiError::Forbidden(
                "this needs the admin token: a tenant's token cannot manage tenants or tokens".into(),
            )),
        }
    }
}

fn task_id(id: &str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::parse_str(id).map_err(|_| ApiError::BadRequest(format!("{id:?} is not a task id (uuid)")))
}

#[derive(Debug, Deserialize)]
struct TaskQuery {
    tenant: Option<String>,
}

/// A task as the API shows it: the result message's fields plus what was asked for.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskView {
    #[serde(flatten)]
    pub result: ResultMessage,
    pub language: Option<String>,
    pub priority: i16,
    pub isolation: String,
    pub labels: serde_json::Value,
    pub timeout_seconds: Option<i32>,
    pub attempt: i32,
    /// When retention removed the task's stdout, stderr and artifacts (they read as empty from
    /// then on); absent while they are kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs_removed_at: Option<chrono::DateTime<chrono::Utc>>,
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
            outputs_removed_at: row.outputs_removed_at,
        }
    }
}

/// `GET /v1/tasks/{id}`: `id` is a task id (uuid), or a client id with `?tenant=`.
#[utoipa::path(get, path = "/v1/tasks/{id}", tag = "tasks",
    params(
        ("id" = String, Path, description = "A task id (uuid), or a client id (idempotency key) of the tenant"),
        ("tenant" = Option<String>, Query, description = "Look `id` up as this tenant's client id first (a tenant's token always looks in its own tenant)"),
    ),
    responses(
        (status = 200, description = "The task", body = TaskView),
        (status = 400, description = "`id` is not a uuid and no tenant was given", body = ErrorBody),
        (status = 404, description = "No such task, or another tenant's", body = ErrorBody),
    ))]
async fn get_task(
    caller: Caller,
    State(ctx): State<Arc<Api>>,
    Path(id): Path<String>,
    Query(q): Query<TaskQuery>,
) -> Result<Json<TaskView>, ApiError> {
    // A tenant's token looks client ids up in its own tenant.
    let tenant = match (&caller, q.tenant) {
        (Caller::Tenant(own), None) => Some(own.clone()),
        (_, tenant) => tenant,
    };
    let found = match (uuid::Uuid::parse_str(&id), tenant.as_deref()) {
        // With a tenant, the id is first the client's key (agentctl's keys are uuids too).
        (parsed, Some(tenant)) => match ctx.store.find_task(tenant, &id).await? {
            None => match parsed {
                Ok(task_id) => ctx.store.get_task(task_id).await?,
                Err(_) => None,
            },
            found => found,
        },
        (Ok(task_id), None) => ctx.store.get_task(task_id).await?,
        (Err(_), None) => {
            return Err(ApiError::BadRequest(format!(
                "{id:?} is not a task id (uuid); to look up a client id, pass ?tenant=NAME"
            )))
        }
    };
    let row = found.filter(|r| caller.sees(&r.tenant)).ok_or_else(|| ApiError::NotFound(format!("no task {id}")))?;
    Ok(Json(TaskView::from(row)))
}

/// A page of `GET /v1/tasks`.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskPage {
    pub items: Vec<TaskSummary>,
    /// Pass as `cursor=` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// `GET /v1/tasks?tenant=&batch=&phase=&label=KEY=VALUE&since=&until=&cursor=&limit=`: tasks,
/// newest first, one page at a time (`phase` takes a comma-separated list; `label` repeats).
/// A tenant's token lists its own tenant only, whatever `tenant=` says.
#[utoipa::path(get, path = "/v1/tasks", tag = "tasks",
    params(
        ("tenant" = Option<String>, Query, description = "Only this tenant's tasks (a tenant's token always lists its own)"),
        ("batch" = Option<String>, Query, description = "Only this batch's tasks"),
        ("phase" = Option<String>, Query, description = "Only tasks in one of these phases, comma-separated (e.g. `Failed,Cancelled`)"),
        ("label" = Option<Vec<String>>, Query, description = "Only tasks with this label, `KEY=VALUE`; repeat for several (all must match)"),
        ("since" = Option<String>, Query, format = DateTime, description = "Submitted at or after (RFC 3339)"),
        ("until" = Option<String>, Query, format = DateTime, description = "Submitted before (RFC 3339)"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page, as it is"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 1000, description = "Tasks per page [default: 100]"),
    ),
    responses(
        (status = 200, description = "One page of tasks, newest first", body = TaskPage),
        (status = 400, description = "A parameter that cannot be used (named in the message)", body = ErrorBody),
    ))]
async fn list_tasks(
    caller: Caller,
    State(ctx): State<Arc<Api>>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Json<TaskPage>, ApiError> {
    let mut filter =
        crate::domain::listing::TaskFilter::from_pairs(&pairs).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    if let Caller::Tenant(own) = &caller {
        match &filter.tenant {
            // Another tenant's tasks are as absent as unknown ones: an empty list.
            Some(t) if t != own => return Ok(Json(TaskPage { items: vec![], next_cursor: None })),
            _ => filter.tenant = Some(own.clone()),
        }
    }
    let (items, next) = ctx.store.list_tasks(&filter).await?;
    Ok(Json(TaskPage { items, next_cursor: next.map(|c| c.encode()) }))
}

/// `GET /v1/tasks/{id}/position`: place in the tenant's queue and an estimated wait.
#[utoipa::path(get, path = "/v1/tasks/{id}/position", tag = "tasks",
    params(("id" = String, Path, description = "The task id (uuid)")),
    responses(
        (status = 200, description = "Its place in its tenant's queue and an estimated wait", body = Position),
        (status = 400, description = "Not a task id", body = ErrorBody),
        (status = 404, description = "No such task, or another tenant's", body = ErrorBody),
    ))]
async fn get_position(
    caller: Caller,
    State(ctx): State<Arc<Api>>,
    Path(id): Path<String>,
) -> Result<Json<Position>, ApiError> {
    let p = ctx.store.position(task_id(&id)?).await?;
    Ok(Json(p.filter(|p| caller.sees(&p.tenant)).ok_or_else(|| ApiError::NotFound(format!("no task {id}")))?))
}

/// `GET /v1/tenants` (admin): every configured tenant, its quotas and load.
#[utoipa::path(get, path = "/v1/tenants", tag = "tenants",
    responses(
        (status = 200, description = "Every configured tenant, its quotas and load", body = Vec<TenantStatus>),
        (status = 403, description = "a tenant's token: this needs the admin token", body = ErrorBody),
    ))]
async fn list_tenants(_: Admin, State(ctx): State<Arc<Api>>) -> Result<Json<Vec<TenantStatus>>, ApiError> {
    Ok(Json(ctx.store.tenant_statuses().await?))
}

/// `GET /v1/tenants/{name}`: a tenant's configuration and load. The admin token reads any
/// tenant; a tenant's token reads its own (another tenant is a 404, as for tasks, so a token
/// cannot learn which tenants exist).
#[utoipa::path(get, path = "/v1/tenants/{name}", tag = "tenants",
    params(("name" = String, Path, description = "The tenant")),
    responses(
        (status = 200, description = "The tenant's quotas and load", body = TenantStatus),
        (status = 404, description = "No such tenant, or (for a tenant's token) another tenant", body = ErrorBody),
    ))]
async fn get_tenant(
    caller: Caller,
    State(ctx): State<Arc<Api>>,
    Path(name): Path<String>,
) -> Result<Json<TenantStatus>, ApiError> {
    if !caller.sees(&name) {
        return Err(ApiError::NotFound(format!("no tenant {name}")));
    }
    let list = ctx.store.tenant_statuses().await?;
    let t = list.into_iter().find(|t| t.tenant == name);
    Ok(Json(t.ok_or_else(|| ApiError::NotFound(format!("no tenant {name}")))?))
}

/// What `PUT /v1/tenants` did.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApplyResult {
    pub tenants: Vec<String>,
    /// Unstarted tasks of removed tenants that were cancelled (with `?removed=cancel`).
    #[serde(default)]
    pub cancelled: u64,
}

/// What happens to the unstarted tasks of tenants that a tenants file no longer has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Removed {
    /// They stay queued (and their queue keeps its messages) until the tenant comes back.
    #[default]
    Keep,
    /// They end `Cancelled`, each with its one result. Running tasks finish normally.
    Cancel,
}

#[derive(Debug, Deserialize)]
struct ApplyQuery {
    #[serde(default)]
    removed: Removed,
}

/// `PUT /v1/tenants?removed=keep|cancel` with a tenants file (TOML) as the body: validates it
/// whole, then makes it the configuration of every process, without a restart. Queued tasks of
/// tenants that stay are untouched; those of removed tenants are kept (default) or cancelled.
#[utoipa::path(put, path = "/v1/tenants", tag = "tenants",
    params(("removed" = Option<Removed>, Query, description = "What happens to unstarted tasks of tenants the file no longer has [default: keep]")),
    request_body(content = String, content_type = "application/toml", description = "A tenants file (TOML)"),
    responses(
        (status = 200, description = "The file is in force in every process", body = ApplyResult),
        (status = 400, description = "The body is not UTF-8", body = ErrorBody),
        (status = 403, description = "a tenant's token: this needs the admin token", body = ErrorBody),
        (status = 422, description = "The file does not validate (the message names the tenant and field)", body = ErrorBody),
    ))]
async fn apply_tenants(
    _: Admin,
    State(ctx): State<Arc<Api>>,
    Query(q): Query<ApplyQuery>,
    body: Bytes,
) -> Result<Json<ApplyResult>, ApiError> {
    let text =
        std::str::from_utf8(&body).map_err(|_| ApiError::BadRequest("the tenants file must be UTF-8 TOML".into()))?;
    let tenants = crate::domain::tenant::parse_tenants(text)
        .map_err(|e| ApiError::Invalid(format!("tenants file refused: {e}")))?;
    ctx.store.sync_tenants(&tenants).await?;
    // Every process (this one included) picks the change up from the tenants notification.
    let names: Vec<String> = tenants.keys().map(|t| t.to_string()).collect();
    let mut cancelled = 0;
    if q.removed == Removed::Cancel {
        for id in ctx.store.unstarted_of_other_tenants(&names).await? {
            if ctx.store.request_cancel(id).await? == CancelOutcome::Cancelled {
                cancelled += 1;
            }
        }
    }
    Ok(Json(ApplyResult { tenants: names, cancelled }))
}

/// What a cancel request did, as `POST /v1/tasks/{id}/cancel` answers it.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
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
#[utoipa::path(post, path = "/v1/tasks/{id}/cancel", tag = "tasks",
    params(("id" = String, Path, description = "The task id (uuid)")),
    responses(
        (status = 200, description = "It had not started and is `Cancelled` now", body = CancelAnswer),
        (status = 202, description = "It is running and is being stopped; its result will say `Cancelled`", body = CancelAnswer),
        (status = 400, description = "Not a task id", body = ErrorBody),
        (status = 404, description = "No such task, or another tenant's", body = ErrorBody),
        (status = 409, description = "It already finished", body = ErrorBody),
    ))]
async fn cancel_task(
    caller: Caller,
    State(ctx): State<Arc<Api>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let task_id = task_id(&id)?;
    // A task's tenant never changes, so checking it before the cancel is enough.
    if let Caller::Tenant(own) = &caller {
        if ctx.store.get_task(task_id).await?.is_none_or(|r| &r.tenant != own) {
            return Err(ApiError::NotFound(format!("no task {task_id}")));
        }
    }
    Ok(match ctx.store.request_cancel(task_id).await? {
        CancelOutcome::Cancelled => {
            Json(CancelAnswer { task_id, outcome: "cancelled".into(), message: "cancelled before it ran".into() })
                .into_response()
        }
        CancelOutcome::Requested => (
            StatusCode::ACCEPTED,
            Json(CancelAnswer {
                task_id,
                outcome: "stopping".into(),
                message: "the task is running and is being stopped; its result will say Cancelled".into(),
            }),
        )
            .into_response(),
        CancelOutcome::AlreadyFinished(phase) => {
            return Err(ApiError::Conflict(format!("task {task_id} already finished ({phase}); nothing to cancel")))
        }
        CancelOutcome::NotFound => return Err(ApiError::NotFound(format!("no task {task_id}"))),
    })
}

/// What `POST /v1/batches/{tenant}/{batch}/cancel` did.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BatchCancelAnswer {
    /// Tasks that had not started and are `Cancelled` now.
    pub cancelled: u64,
    /// Running tasks being stopped.
    pub stopping: u64,
}

/// `POST /v1/batches/{tenant}/{batch}/cancel`: cancels every unfinished task of a batch.
#[utoipa::path(post, path = "/v1/batches/{tenant}/{batch}/cancel", tag = "batches",
    params(("tenant" = String, Path, description = "The batch's tenant"), ("batch" = String, Path, description = "The batch id")),
    responses(
        (status = 200, description = "What was cancelled, and what is being stopped", body = BatchCancelAnswer),
        (status = 404, description = "Another tenant's batch", body = ErrorBody),
    ))]
async fn cancel_batch(
    caller: Caller,
    State(ctx): State<Arc<Api>>,
    Path((tenant, batch)): Path<(String, String)>,
) -> Result<Json<BatchCancelAnswer>, ApiError> {
    if !caller.sees(&tenant) {
        return Err(ApiError::NotFound(format!("no batch {batch} of tenant {tenant}")));
    }
    let ids = ctx.store.unfinished_in_batch(&tenant, &batch).await?;
    let mut answer = BatchCancelAnswer { cancelled: 0, stopping: 0 };
    for id in ids {
        match ctx.store.request_cancel(id).await? {
            CancelOutcome::Cancelled => answer.cancelled += 1,
            CancelOutcome::Requested => answer.stopping += 1,
            // Finished meanwhile: nothing to do.
            CancelOutcome::AlreadyFinished(_) | CancelOutcome::NotFound => {}
        }
    }
    Ok(Json(answer))
}

/// A token just created, as `POST /v1/tenants/{name}/tokens` answers it: the only time its
/// text is ever shown.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreatedToken {
    #[serde(flatten)]
    pub info: TokenInfo,
    pub token: String,
}

/// `POST /v1/tenants/{name}/tokens` (admin): a new API token for a configured tenant.
#[utoipa::path(post, path = "/v1/tenants/{name}/tokens", tag = "tokens",
    params(("name" = String, Path, description = "The tenant")),
    responses(
        (status = 201, description = "The new token; its text is shown only now", body = CreatedToken),
        (status = 403, description = "a tenant's token: this needs the admin token", body = ErrorBody),
        (status = 404, description = "No such tenant", body = ErrorBody),
    ))]
async fn create_token(
    _: Admin,
    State(ctx): State<Arc<Api>>,
    Path(tenant): Path<String>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| ApiError::Internal(format!("no randomness for a token: {e}")))?;
    let new = token::NewToken::from_random(uuid::Uuid::new_v4(), secret);
    let info = ctx.store.create_token(&tenant, &new).await?.ok_or_else(|| {
        ApiError::NotFound(format!(
            "no tenant {tenant}: apply a tenants file that has it first (agentctl tenant apply)"
        ))
    })?;
    Ok((StatusCode::CREATED, Json(CreatedToken { info, token: new.token })))
}

#[derive(Debug, Deserialize)]
struct TokensQuery {
    tenant: Option<String>,
}

/// `GET /v1/tokens?tenant=` (admin): every token (or one tenant's), revoked ones too; never a
/// secret.
#[utoipa::path(get, path = "/v1/tokens", tag = "tokens",
    params(("tenant" = Option<String>, Query, description = "Only this tenant's tokens")),
    responses(
        (status = 200, description = "Tokens, revoked ones too; never a secret", body = Vec<TokenInfo>),
        (status = 403, description = "a tenant's token: this needs the admin token", body = ErrorBody),
    ))]
async fn list_tokens(
    _: Admin,
    State(ctx): State<Arc<Api>>,
    Query(q): Query<TokensQuery>,
) -> Result<Json<Vec<TokenInfo>>, ApiError> {
    Ok(Json(ctx.store.list_tokens(q.tenant.as_deref()).await?))
}

/// `DELETE /v1/tokens/{id}` (admin): the token authenticates nothing from now on.
#[utoipa::path(delete, path = "/v1/tokens/{id}", tag = "tokens",
    params(("id" = String, Path, description = "The token id (uuid)")),
    responses(
        (status = 200, description = "The token, revoked (again is a no-op)", body = TokenInfo),
        (status = 400, description = "Not a token id", body = ErrorBody),
        (status = 403, description = "a tenant's token: this needs the admin token", body = ErrorBody),
        (status = 404, description = "No such token", body = ErrorBody),
    ))]
async fn revoke_token(
    _: Admin,
    State(ctx): State<Arc<Api>>,
    Path(id): Path<String>,
) -> Result<Json<TokenInfo>, ApiError> {
    let parsed =
        uuid::Uuid::parse_str(&id).map_err(|_| ApiError::BadRequest(format!("{id:?} is not a token id (uuid)")))?;
    Ok(Json(ctx.store.revoke_token(parsed).await?.ok_or_else(|| ApiError::NotFound(format!("no token {id}")))?))
}

/// What `POST /v1/tenants/{name}/sql-role` made.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SqlRole {
    pub tenant: String,
    pub role: String,
    /// With the new password: shown only now.
    pub connection_string: String,
}

/// `POST /v1/tenants/{name}/sql-role` (admin): creates the tenant's read-only Postgres role, or
/// gives the existing one a new password; answers its connection string. The role reads the
/// views of the contract, through row-level security only its tenant's rows, and no table.
#[utoipa::path(post, path = "/v1/tenants/{name}/sql-role", tag = "tenants",
    params(("name" = String, Path, description = "The tenant")),
    responses(
        (status = 200, description = "The role and its connection string, with a new password shown only now", body = SqlRole),
        (status = 400, description = "Not a tenant name", body = ErrorBody),
        (status = 403, description = "a tenant's token: this needs the admin token", body = ErrorBody),
        (status = 404, description = "No such tenant", body = ErrorBody),
    ))]
async fn create_sql_role(
    _: Admin,
    State(ctx): State<Arc<Api>>,
    Path(tenant): Path<String>,
) -> Result<Json<SqlRole>, ApiError> {
    let name = crate::domain::tenant::TenantName::parse(&tenant).map_err(ApiError::BadRequest)?;
    let mut random = [0u8; 24];
    getrandom::fill(&mut random).map_err(|e| ApiError::Internal(format!("no randomness for a password: {e}")))?;
    let password = {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random)
    };
    let role = name.sql_role();
    if !ctx.store.ensure_sql_role(&tenant, &role, &password).await? {
        return Err(ApiError::NotFound(format!(
            "no tenant {tenant}: apply a tenants file that has it first (agentctl tenant apply)"
        )));
    }
    let connection_string = ctx.store.connection_string_for(&role, &password);
    Ok(Json(SqlRole { tenant, role, connection_string }))
}

/// `GET /v1/batches/{tenant}/{batch}`: counts by phase and duration percentiles (the row of
/// `agenttask.batch_summary`). 404 for a batch without tasks, or of another tenant.
#[utoipa::path(get, path = "/v1/batches/{tenant}/{batch}", tag = "batches",
    params(("tenant" = String, Path, description = "The batch's tenant"), ("batch" = String, Path, description = "The batch id")),
    responses(
        (status = 200, description = "Counts by phase and duration percentiles", body = BatchStatus),
        (status = 404, description = "No task in this batch, or another tenant's batch", body = ErrorBody),
    ))]
async fn get_batch(
    caller: Caller,
    State(ctx): State<Arc<Api>>,
    Path((tenant, batch)): Path<(String, String)>,
) -> Result<Json<BatchStatus>, ApiError> {
    let found = if caller.sees(&tenant) { ctx.store.batch_status(&tenant, &batch).await? } else { None };
    Ok(Json(found.ok_or_else(|| ApiError::NotFound(format!("no batch {batch} of tenant {tenant}")))?))
}

/// A page of `GET /v1/batches/{tenant}/{batch}/results`.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ResultPage {
    /// The contract's result messages, oldest task first.
    pub items: Vec<ResultMessage>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ResultsQuery {
    cursor: Option<String>,
    /// Text, so that a bad one gets the API's JSON error rather than axum's plain one.
    limit: Option<String>,
}

/// `GET /v1/batches/{tenant}/{batch}/results?cursor=&limit=`: every task's result message (or
/// where it stands, for unfinished ones), oldest first, a page at a time.
#[utoipa::path(get, path = "/v1/batches/{tenant}/{batch}/results", tag = "batches",
    params(
        ("tenant" = String, Path, description = "The batch's tenant"),
        ("batch" = String, Path, description = "The batch id"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page, as it is"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 1000, description = "Results per page [default: 100]"),
    ),
    responses(
        (status = 200, description = "One page of result messages, oldest task first", body = ResultPage),
        (status = 400, description = "A bad cursor or limit", body = ErrorBody),
        (status = 404, description = "No task in this batch, or another tenant's batch", body = ErrorBody),
    ))]
async fn batch_results(
    caller: Caller,
    State(ctx): State<Arc<Api>>,
    Path((tenant, batch)): Path<(String, String)>,
    Query(q): Query<ResultsQuery>,
) -> Result<Json<ResultPage>, ApiError> {
    use crate::domain::listing::{Cursor, DEFAULT_LIMIT, MAX_LIMIT};
    let after = match q.cursor.as_deref() {
        None => None,
        Some(c) => Some(Cursor::decode(c).ok_or_else(|| {
            ApiError::BadRequest("bad parameter \"cursor\": pass next_cursor from the previous page as it is".into())
        })?),
    };
    let limit = match q.limit.as_deref() {
        None => DEFAULT_LIMIT,
        Some(l) => l.parse().ok().filter(|n| (1..=MAX_LIMIT).contains(n)).ok_or_else(|| {
            ApiError::BadRequest(format!("bad parameter \"limit\": {l:?}: expected a number from 1 to {MAX_LIMIT}"))
        })?,
    };
    if !caller.sees(&tenant) {
        return Err(ApiError::NotFound(format!("no batch {batch} of tenant {tenant}")));
    }
    let (rows, next) = ctx.store.batch_tasks(&tenant, &batch, after, limit).await?;
    if rows.is_empty() && after.is_none() {
        return Err(ApiError::NotFound(format!("no batch {batch} of tenant {tenant}")));
    }
    Ok(Json(ResultPage { items: rows.iter().map(TaskRow::to_result).collect(), next_cursor: next.map(|c| c.encode()) }))
}
