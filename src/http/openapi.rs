//! The OpenAPI document of the HTTP endpoints, served at `GET /openapi.json` (no token needed)
//! and kept in the repository as `deploy/openapi.json`.
//!
//! Nothing here is written by hand: the operations come from the `#[utoipa::path]` attributes on
//! the handlers, the schemas from `#[derive(ToSchema)]` on the very types the handlers return,
//! so the document cannot describe a field the API does not send. What every `/v1` operation has
//! in common (the bearer token, and the errors the token check and the database can answer) is
//! added once, by [`CommonToV1`], instead of on each handler.
//!
//! `agenttask openapi` prints [`json`]; the tests below fail when `deploy/openapi.json` differs
//! from it, or when a route of the router is missing from the document (or the other way round).

use std::sync::OnceLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi as Document, Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use super::*;

/// The document's name of the bearer-token security scheme.
const BEARER: &str = "bearer";

// The handler of this operation is `artifacts::get_artifact`; it is described here so that
// module stays about serving files. `name` may contain `/` (an artifact in a subdirectory): the
// router matches it with a wildcard, which OpenAPI cannot express, hence the description.
/// `GET /v1/tasks/{id}/artifacts/{name}`: one artifact of a finished task, as collected.
#[utoipa::path(get, path = "/v1/tasks/{id}/artifacts/{name}", tag = "tasks", operation_id = "get_artifact",
    params(
        ("id" = String, Path, description = "The task id (uuid)"),
        ("name" = String, Path, description = "The artifact's name as its task's `artifacts` lists it; may contain `/`"),
    ),
    responses(
        (status = 200, description = "The artifact's bytes; `ETag` is its sha256", content_type = "application/octet-stream", body = String),
        (status = 400, description = "Not a task id", body = ErrorBody),
        (status = 404, description = "No such task (or another tenant's), no such artifact, or no longer kept", body = ErrorBody),
    ))]
#[allow(dead_code)] // Only its generated `__path_` type is used: the handler is artifacts::get_artifact.
fn artifact_operation() {}

/// `GET /openapi.json`: this document.
#[utoipa::path(get, path = "/openapi.json", tag = "health",
    responses((status = 200, description = "This document", content_type = "application/json", body = Object)))]
pub(super) async fn serve() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], json()).into_response()
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "AgentTask task API",
        description = "Tasks, their logs and artifacts, batches, tenants and tokens. Every `/v1` \
            request carries `Authorization: Bearer TOKEN`: the service's admin token \
            (AGENTTASK_ADMIN_TOKEN) or a tenant's token (`agentctl tenant token create T`). A \
            tenant's token sees its own tenant only: another tenant's task, batch or tenant is a \
            404, exactly like one that does not exist. Every error is JSON `{\"code\", \"message\"}`."
    ),
    paths(
        healthz, readyz, metrics, serve,
        list_tasks, get_task, get_position, logs::get_logs, artifact_operation, cancel_task,
        get_batch, batch_results, cancel_batch,
        list_tenants, apply_tenants, get_tenant, create_sql_role,
        create_token, list_tokens, revoke_token,
    ),
    // ErrorBody is referenced by the modifier; Removed by a query parameter (neither is in a body).
    components(schemas(ErrorBody, Removed)),
    modifiers(&CommonToV1),
    tags(
        (name = "tasks", description = "Tasks: get, list, logs, artifacts, cancel, queue position"),
        (name = "batches", description = "Batches of tasks: status, results, cancel"),
        (name = "tenants", description = "Tenants (admin; a tenant's token reads its own tenant)"),
        (name = "tokens", description = "Tenants' API tokens (admin)"),
        (name = "health", description = "Probes, metrics and this document; no token needed"),
    )
)]
struct ApiDoc;

/// Adds the bearer-token scheme, and to every `/v1` operation the token requirement and the
/// errors any of them can answer before or beside its own work.
struct CommonToV1;

impl Modify for CommonToV1 {
    fn modify(&self, doc: &mut Document) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The admin token, or a tenant's token (`agentctl tenant token create T`)"))
                    .build(),
            ),
        );
        let error = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build(),
                )
                .build()
        };
        let common = [
            ("401", "`unauthorized`: a missing, wrong or revoked token"),
            ("503", "`unavailable`: the database cannot be reached; retry"),
        ];
        for (_, item) in doc.paths.paths.iter_mut().filter(|(p, _)| p.starts_with("/v1/")) {
            for op in [&mut item.get, &mut item.put, &mut item.post, &mut item.delete].into_iter().flatten() {
                op.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
                for (status, description) in common {
                    op.responses.responses.entry(status.to_owned()).or_insert_with(|| error(description).into());
                }
                // Without an admin token configured, a request that is not a tenant's token finds
                // the API closed; for the admin operations it is the same answer as a tenant's token.
                let closed = "`api_closed`: the service has no admin token and this is not a tenant's token";
                match op.responses.responses.get_mut("403") {
                    Some(utoipa::openapi::RefOr::T(r)) => {
                        r.description = format!("`forbidden`: {}; or {closed}", r.description);
                    }
                    _ => {
                        op.responses.responses.insert("403".to_owned(), error(closed).into());
                    }
                }
            }
        }
    }
}

/// The document, built once.
pub fn document() -> &'static Document {
    static DOC: OnceLock<Document> = OnceLock::new();
    DOC.get_or_init(ApiDoc::openapi)
}

/// The document as served and as `deploy/openapi.json` holds it: pretty JSON, one newline at the
/// end.
pub fn json() -> String {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| {
        let mut text = document().to_pretty_json().expect("an OpenAPI document always serializes to JSON");
        text.push('\n');
        text
    })
    .clone()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// `deploy/openapi.json` is generated; regenerate it with `agenttask openapi > deploy/openapi.json`.
    #[test]
    fn deploy_openapi_json_is_the_served_document() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/openapi.json");
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            on_disk == json(),
            "deploy/openapi.json differs from the document the service serves: run \
             `cargo run --bin agenttask -- openapi > deploy/openapi.json`"
        );
    }

    /// The routes of [`router`], read from its source: the document must have each, and nothing
    /// else, so a new route cannot go undocumented and a removed one cannot stay documented.
    #[test]
    fn every_route_is_documented_and_every_documented_path_is_a_route() {
        let source = include_str!("../http.rs");
        let routes: BTreeSet<String> = source
            .split(".route(\"")
            .skip(1)
            .map(|rest| rest.split('"').next().unwrap_or_default().replace("{*", "{"))
            .collect();
        assert!(routes.len() > 10, "the router's routes were not found in http.rs: {routes:?}");
        let documented: BTreeSet<String> = document().paths.paths.keys().cloned().collect();
        assert_eq!(routes, documented);
    }

    #[test]
    fn every_v1_operation_needs_the_bearer_token_and_documents_json_errors() {
        let doc: serde_json::Value = serde_json::from_str(&json()).unwrap();
        assert_eq!(doc["components"]["securitySchemes"][BEARER]["scheme"], "bearer");
        let error = &doc["components"]["schemas"]["ErrorBody"];
        assert_eq!(error["required"], serde_json::json!(["code", "message"]), "{error}");
        let mut operations = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                if path.starts_with("/v1/") {
                    operations += 1;
                    assert_eq!(op["security"], serde_json::json!([{ BEARER: [] }]), "{method} {path}");
                    for status in ["401", "403", "503"] {
                        let schema = &op["responses"][status]["content"]["application/json"]["schema"]["$ref"];
                        assert_eq!(schema, "#/components/schemas/ErrorBody", "{method} {path} {status}");
                    }
                } else {
                    assert!(op.get("security").is_none(), "{method} {path} needs no token");
                }
            }
        }
        assert!(operations >= 16, "{operations} /v1 operations");
    }

    /// Every `$ref` points at a schema the document has (a type named only in a parameter is
    /// not collected by itself).
    #[test]
    fn every_reference_resolves() {
        fn refs(v: &serde_json::Value, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(m) => {
                    if let Some(serde_json::Value::String(r)) = m.get("$ref") {
                        out.push(r.clone());
                    }
                    m.values().for_each(|v| refs(v, out));
                }
                serde_json::Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
                _ => {}
            }
        }
        let doc: serde_json::Value = serde_json::from_str(&json()).unwrap();
        let mut found = Vec::new();
        refs(&doc, &mut found);
        assert!(found.len() > 20);
        for r in found {
            let name = r.strip_prefix("#/components/schemas/").unwrap_or_else(|| panic!("unexpected $ref {r}"));
            assert!(doc["components"]["schemas"].get(name).is_some(), "$ref {r} does not resolve");
        }
    }

    /// The codes `ErrorBody` documents are the codes the API answers.
    #[test]
    fn the_documented_error_codes_are_the_api_errors_codes() {
        let doc: serde_json::Value = serde_json::from_str(&json()).unwrap();
        let said = doc["components"]["schemas"]["ErrorBody"]["properties"]["code"]["description"].as_str().unwrap();
        let documented: BTreeSet<&str> = said.split('`').skip(1).step_by(2).collect();
        let e = || String::new();
        let all = [
            ApiError::Closed,
            ApiError::Unauthorized,
            ApiError::Forbidden(e()),
            ApiError::BadRequest(e()),
            ApiError::NotFound(e()),
            ApiError::Conflict(e()),
            ApiError::Gone(e()),
            ApiError::Invalid(e()),
            ApiError::Store(crate::store::StoreError::Corrupt(e())),
            ApiError::Internal(e()),
        ];
        // A new variant must be added above (and to the documentation): this match says so.
        for a in &all {
            match a {
                ApiError::Closed
                | ApiError::Unauthorized
                | ApiError::Forbidden(_)
                | ApiError::BadRequest(_)
                | ApiError::NotFound(_)
                | ApiError::Conflict(_)
                | ApiError::Gone(_)
                | ApiError::Invalid(_)
                | ApiError::Store(_)
                | ApiError::Internal(_) => {}
            }
        }
        let answered: BTreeSet<&str> = all.iter().map(ApiError::code).collect();
        assert_eq!(documented, answered);
    }

    #[test]
    fn page_limits_are_the_listing_limits() {
        use crate::domain::listing::MAX_LIMIT;
        let doc: serde_json::Value = serde_json::from_str(&json()).unwrap();
        for path in ["/v1/tasks", "/v1/batches/{tenant}/{batch}/results"] {
            let params = doc["paths"][path]["get"]["parameters"].as_array().unwrap();
            let limit = params.iter().find(|p| p["name"] == "limit").unwrap();
            assert_eq!(limit["schema"]["maximum"].as_f64(), Some(MAX_LIMIT as f64), "{path}");
        }
    }
}
