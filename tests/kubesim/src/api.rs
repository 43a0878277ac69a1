//! HTTP: routing of the REST paths, content negotiation, reads, lists, watches and discovery.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc, Notify};

use crate::errors::{ApiError, ApiResult};
use crate::kubelet::Logs;
use crate::objects::{self, DeleteOpts, Deleted, FieldValidation, WriteCtx};
use crate::patch;
use crate::registry::ResourceType;
use crate::selectors::{FieldSelector, LabelSelector};
use crate::store::{Event, EventType, Inner};
use crate::table::{self, Include};

/// The server's state, shared by every request and background task.
pub struct App {
    pub inner: Mutex<Inner>,
    /// Wakes the garbage collector after writes that may concern it.
    pub gc_wake: Notify,
    /// Bumped to make every open watch end (test control: a watch restart).
    pub close_watches: tokio::sync::watch::Sender<u64>,
    pub logs: Logs,
    pub url: String,
    /// How often watches that asked for bookmarks get one.
    pub bookmark_interval: Duration,
    /// Where the `exec` kubelet keeps PersistentVolumeClaims' data: claim `NAME` of namespace
    /// `NS` is the directory `<pv_root>/NS/NAME` (`--pv-root`).
    pub pv_root: Option<std::path::PathBuf>,
}

impl App {
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lets the garbage collector run if the last writes asked for it.
    pub fn wake_gc(&self, inner: &mut Inner) {
        if inner.gc_dirty {
            self.gc_wake.notify_one();
        }
    }
}

type Query = HashMap<String, String>;

fn parse_query(q: Option<&str>) -> Query {
    form_urlencoded::parse(q.unwrap_or("").as_bytes()).into_owned().collect()
}

fn truthy(q: &Query, k: &str) -> bool {
    matches!(q.get(k).map(String::as_str), Some("true" | "1"))
}

/// What the client accepts, in its order of preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Table,
    Partial,
}

fn negotiate(headers: &HeaderMap) -> ApiResult<Format> {
    let accept = headers.get("accept").and_then(|a| a.to_str().ok()).unwrap_or("");
    if accept.trim().is_empty() {
        return Ok(Format::Json);
    }
    for mt in accept.split(',') {
        let mt = mt.trim();
        let params: Vec<&str> = mt.split(';').map(str::trim).collect();
        let base = params[0];
        let param = |k: &str| params.iter().find_map(|p| p.strip_prefix(&format!("{k}=")));
        if !(base == "application/json" || base == "*/*" || base == "application/*" || base == "application/yaml") {
            continue;
        }
        match (param("as"), param("g"), param("v")) {
            (None, _, _) => return Ok(Format::Json),
            (Some("Table"), Some("meta.k8s.io"), Some("v1" | "v1beta1")) => return Ok(Format::Table),
            (
                Some("PartialObjectMetadata" | "PartialObjectMetadataList"),
                Some("meta.k8s.io"),
                Some("v1" | "v1beta1"),
            ) => return Ok(Format::Partial),
            // Aggregated discovery and anything else: not offered, the client falls back.
            _ => continue,
        }
    }
    Err(ApiError::new(406, "NotAcceptable", format!("only the following media types are accepted: application/json, application/json;as=Table;v=v1;g=meta.k8s.io (requested {accept})")))
}

fn json_response(code: StatusCode, v: &Value) -> Response {
    (code, [("content-type", "application/json")], v.to_string()).into_response()
}

fn with_warnings(mut r: Response, warnings: &[String]) -> Response {
    for w in warnings {
        let text = format!("299 - {}", serde_json::to_string(w).unwrap_or_default());
        if let Ok(v) = HeaderValue::from_str(&text) {
            r.headers_mut().append("warning", v);
        }
    }
    r
}

/// The single entry point: every request comes here.
pub async fn handle(
    State(app): State<Arc<App>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let q = parse_query(uri.query());
    let resp = match route(&app, &method, uri.path(), &q, &headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    let streaming = truthy(&q, "watch") || truthy(&q, "follow");
    if prefers_yaml(&headers) && !streaming {
        return to_yaml(resp).await;
    }
    resp
}

/// Whether the first media type the client accepts is YAML.
fn prefers_yaml(headers: &HeaderMap) -> bool {
    let accept = headers.get("accept").and_then(|a| a.to_str().ok()).unwrap_or("");
    accept.split(',').next().is_some_and(|m| m.split(';').next().unwrap_or("").trim() == "application/yaml")
}

/// Re-encodes a JSON response as YAML (what kube-apiserver serves for `Accept: application/yaml`).
async fn to_yaml(resp: Response) -> Response {
    let is_json = resp.headers().get("content-type").is_some_and(|c| c.as_bytes() == b"application/json");
    if !is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "response body lost").into_response();
    };
    let yaml = serde_json::from_slice::<Value>(&bytes).ok().map(|v| crate::yaml::to_string(&v));
    match yaml {
        Some(y) => {
            parts.headers.insert("content-type", HeaderValue::from_static("application/yaml"));
            parts.headers.remove("content-length");
            Response::from_parts(parts, Body::from(y))
        }
        None => Response::from_parts(parts, Body::from(bytes)),
    }
}

async fn route(
    app: &Arc<App>,
    method: &Method,
    path: &str,
    q: &Query,
    headers: &HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        ["version"] => Ok(json_response(StatusCode::OK, &version())),
        ["healthz" | "readyz" | "livez"] => Ok((StatusCode::OK, "ok").into_response()),
        ["api"] => Ok(json_response(
            StatusCode::OK,
            &json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": app.url.trim_start_matches("http://")}]}),
        )),
        ["apis"] => Ok(json_response(StatusCode::OK, &group_list(&app.lock()))),
        ["apis", g] => {
            let inner = app.lock();
            let group = group_list(&inner)["groups"].as_array().unwrap().iter().find(|x| x["name"] == *g).cloned();
            match group {
                Some(mut gr) => {
                    gr["kind"] = json!("APIGroup");
                    gr["apiVersion"] = json!("v1");
                    Ok(json_response(StatusCode::OK, &gr))
                }
                None => Err(ApiError::no_resource()),
            }
        }
        ["api", "v1"] => resource_list(app, "", "v1"),
        ["apis", g, v] => resource_list(app, g, v),
        ["openapi", "v3"] => {
            let inner = app.lock();
            Ok(json_response(StatusCode::OK, &crate::openapi::root(&inner.registry, inner.rv)))
        }
        ["openapi", "v3", "api", "v1"] => openapi_gv(app, "", "v1"),
        ["openapi", "v3", "apis", g, v] => openapi_gv(app, g, v),
        ["kubesim", "close-watches"] if method == Method::POST => {
            app.close_watches.send_modify(|g| *g += 1);
            Ok(json_response(StatusCode::OK, &json!({"closed": true})))
        }
        ["kubesim", "compact"] if method == Method::POST => {
            let mut inner = app.lock();
            inner.compact();
            Ok(json_response(StatusCode::OK, &json!({"compactedTo": inner.rv.to_string()})))
        }
        ["api", "v1", rest @ ..] => resource_request(app, method, "", "v1", rest, q, headers, body).await,
        ["apis", g, v, rest @ ..] => resource_request(app, method, g, v, rest, q, headers, body).await,
        _ => Err(ApiError::no_resource()),
    }
}

fn openapi_gv(app: &App, group: &str, version: &str) -> ApiResult<Response> {
    match crate::openapi::group_version(&app.lock().registry, group, version) {
        Some(doc) => Ok(json_response(StatusCode::OK, &doc)),
        None => Err(ApiError::no_resource()),
    }
}

fn version() -> Value {
    json!({
        "major": "1", "minor": "32", "gitVersion": "v1.32.0-kubesim", "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.23.0", "compiler": "gc",
        "platform": format!("linux/{}", if cfg!(target_arch = "aarch64") { "arm64" } else { "amd64" }),
    })
}

fn group_list(inner: &Inner) -> Value {
    let groups: Vec<Value> = inner
        .registry
        .groups()
        .into_iter()
        .map(|(g, vs)| {
            let versions: Vec<Value> =
                vs.iter().map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v})).collect();
            let preferred = versions[0].clone();
            json!({"name": g, "versions": versions, "preferredVersion": preferred})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn resource_list(app: &App, group: &str, version: &str) -> ApiResult<Response> {
    match app.lock().registry.resource_list(group, version) {
        Some(l) => Ok(json_response(StatusCode::OK, &l)),
        None => Err(ApiError::no_resource()),
    }
}

/// A parsed resource path.
struct Target {
    rt: ResourceType,
    version: String,
    /// `None`: all namespaces (a list or watch of a namespaced resource) or cluster scope.
    ns: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_target(inner: &Inner, group: &str, version: &str, rest: &[&str]) -> ApiResult<Target> {
    let find = |r: &str| inner.registry.find(group, version, r).cloned().ok_or_else(ApiError::no_resource);
    let t = |rt: ResourceType, ns: Option<&str>, name: Option<&str>, sub: Option<&str>| Target {
        rt,
        version: version.to_string(),
        ns: ns.map(String::from),
        name: name.map(String::from),
        sub: sub.map(String::from),
    };
    let namespaced = |r: &str| inner.registry.find(group, version, r).is_some_and(|rt| rt.namespaced);
    match rest {
        ["namespaces", ns, res, tail @ ..] if namespaced(res) => {
            let rt = find(res)?;
            match tail {
                [] => Ok(t(rt, Some(ns), None, None)),
                [name] => Ok(t(rt, Some(ns), Some(name), None)),
                [name, sub] => Ok(t(rt, Some(ns), Some(name), Some(sub))),
                _ => Err(ApiError::no_resource()),
            }
        }
        [res] => Ok(t(find(res)?, None, None, None)),
        [res, name] => {
            let rt = find(res)?;
            if rt.namespaced {
                return Err(ApiError::no_resource());
            }
            Ok(t(rt, None, Some(name), None))
        }
        [res, name, sub] => {
            let rt = find(res)?;
            if rt.namespaced {
                return Err(ApiError::no_resource());
            }
            Ok(t(rt, None, Some(name), Some(sub)))
        }
        _ => Err(ApiError::no_resource()),
    }
}

fn write_ctx(q: &Query, headers: &HeaderMap) -> ApiResult<WriteCtx> {
    let manager = match q.get("fieldManager") {
        Some(m) if !m.is_empty() => m.clone(),
        _ => {
            let ua = headers.get("user-agent").and_then(|u| u.to_str().ok()).unwrap_or("unknown");
            ua.split('/').next().unwrap_or("unknown").to_string()
        }
    };
    let validation = match q.get("fieldValidation").map(String::as_str) {
        None | Some("") | Some("Warn") => FieldValidation::Warn,
        Some("Strict") => FieldValidation::Strict,
        Some("Ignore") => FieldValidation::Ignore,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "fieldValidation parameter unsupported: {other}. Must be one of Ignore, Warn, Strict"
            )))
        }
    };
    let dry_run = match q.get("dryRun").map(String::as_str) {
        None | Some("") => false,
        Some("All") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!("Invalid dryRun value: {other}: supported value: \"All\"")))
        }
    };
    Ok(WriteCtx { manager, validation, dry_run, internal: false, warnings: vec![] })
}

const PROTOBUF: &str = "application/vnd.kubernetes.protobuf";

fn media_type(headers: &HeaderMap) -> String {
    headers
        .get("content-type")
        .and_then(|c| c.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string()
}

/// A request body: JSON, YAML (`application/yaml`, `application/apply-patch+yaml`), or
/// Kubernetes protobuf for the kinds [`crate::protobuf`] knows.
fn parse_body(body: &Bytes, headers: &HeaderMap) -> ApiResult<Value> {
    if media_type(headers) == PROTOBUF {
        return crate::protobuf::decode(body).map_err(|e| ApiError::new(415, "UnsupportedMediaType", e));
    }
    if media_type(headers).ends_with("yaml") {
        // JSON is YAML too; anything else goes through the YAML parser.
        if let Ok(v) = serde_json::from_slice(body) {
            return Ok(v);
        }
        return serde_yaml::from_slice::<Value>(body)
            .map_err(|e| ApiError::bad_request(format!("error converting YAML to JSON: {e}")));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body of the request could not be decoded as JSON ({e})")))
}

#[allow(clippy::too_many_arguments)]
async fn resource_request(
    app: &Arc<App>,
    method: &Method,
    group: &str,
    version: &str,
    rest: &[&str],
    q: &Query,
    headers: &HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let target = parse_target(&app.lock(), group, version, rest)?;
    let ns = target.ns.clone().unwrap_or_default();
    let content_type = headers
        .get("content-type")
        .and_then(|c| c.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    match (&target.name, target.sub.as_deref()) {
        (None, None) => match *method {
            Method::GET if truthy(q, "watch") => watch(app, &target, q, negotiate(headers)?).await,
            Method::GET => list(app, &target, q, negotiate(headers)?),
            Method::POST => {
                if target.rt.namespaced && target.ns.is_none() {
                    return Err(ApiError::no_resource());
                }
                let mut ctx = write_ctx(q, headers)?;
                let obj = parse_body(&body, headers)?;
                let mut inner = app.lock();
                let created = objects::create(&mut inner, &target.rt, version, &ns, obj, &mut ctx)?;
                app.wake_gc(&mut inner);
                drop(inner);
                let created = objects::present(created, &target.rt, version);
                Ok(with_warnings(json_response(StatusCode::CREATED, &created), &ctx.warnings))
            }
            Method::DELETE => delete_collection(app, &target, q, headers, &body),
            _ => Err(ApiError::method_not_allowed("the server does not allow this method on the requested resource")),
        },
        (Some(name), sub) => {
            let sub = match sub {
                None => None,
                Some("status") if target.rt.status => Some("status"),
                Some("log") if target.rt.resource == "pods" && *method == Method::GET => {
                    return crate::kubelet::serve_log(app, &ns, name, q).await;
                }
                Some(_) => return Err(ApiError::no_resource()),
            };
            match *method {
                Method::GET => get(app, &target, name, q, negotiate(headers)?),
                Method::PUT => {
                    let mut ctx = write_ctx(q, headers)?;
                    let obj = parse_body(&body, headers)?;
                    let mut inner = app.lock();
                    let r = objects::update(&mut inner, &target.rt, version, &ns, name, obj, sub, &mut ctx, false)?;
                    app.wake_gc(&mut inner);
                    drop(inner);
                    Ok(with_warnings(
                        json_response(StatusCode::OK, &objects::present(r, &target.rt, version)),
                        &ctx.warnings,
                    ))
                }
                Method::PATCH => patch_request(app, &target, name, sub, &content_type, q, headers, &body),
                Method::DELETE if sub.is_none() => {
                    let ctx = write_ctx(q, headers)?;
                    let opts = delete_opts(q, &body, headers)?;
                    let mut inner = app.lock();
                    let r = objects::delete(&mut inner, &target.rt, &ns, name, &opts, &ctx)?;
                    app.wake_gc(&mut inner);
                    drop(inner);
                    Ok(match r {
                        Deleted::Object(o) => json_response(StatusCode::OK, &objects::present(o, &target.rt, version)),
                        Deleted::Status(s) => json_response(StatusCode::OK, &s),
                    })
                }
                _ => {
                    Err(ApiError::method_not_allowed("the server does not allow this method on the requested resource"))
                }
            }
        }
        (None, Some(_)) => Err(ApiError::no_resource()),
    }
}

fn delete_opts(q: &Query, body: &Bytes, headers: &HeaderMap) -> ApiResult<DeleteOpts> {
    let mut o = DeleteOpts {
        propagation: q.get("propagationPolicy").cloned(),
        grace: q.get("gracePeriodSeconds").and_then(|g| g.parse().ok()),
        ..Default::default()
    };
    if let Some(orphan) = q.get("orphanDependents") {
        o.propagation.get_or_insert_with(|| if orphan == "true" { "Orphan".into() } else { "Background".into() });
    }
    if !body.is_empty() {
        let b = parse_body(body, headers)?;
        if let Some(p) = b["propagationPolicy"].as_str() {
            o.propagation = Some(p.into());
        } else if let Some(orphan) = b["orphanDependents"].as_bool() {
            o.propagation = Some(if orphan { "Orphan".into() } else { "Background".into() });
        }
        if let Some(g) = b["gracePeriodSeconds"].as_i64() {
            o.grace = Some(g);
        }
        o.uid = b["preconditions"]["uid"].as_str().map(String::from);
        o.resource_version = b["preconditions"]["resourceVersion"].as_str().map(String::from);
    }
    Ok(o)
}

#[allow(clippy::too_many_arguments)]
fn patch_request(
    app: &Arc<App>,
    t: &Target,
    name: &str,
    sub: Option<&str>,
    content_type: &str,
    q: &Query,
    headers: &HeaderMap,
    body: &Bytes,
) -> ApiResult<Response> {
    let mut ctx = write_ctx(q, headers)?;
    let ns = t.ns.clone().unwrap_or_default();
    let accepted: &[&str] = if t.rt.is_custom() {
        &["application/json-patch+json", "application/merge-patch+json", "application/apply-patch+yaml"]
    } else {
        &[
            "application/json-patch+json",
            "application/merge-patch+json",
            "application/strategic-merge-patch+json",
            "application/apply-patch+yaml",
        ]
    };
    if !accepted.contains(&content_type) {
        return Err(ApiError::unsupported_media_type(accepted));
    }
    let patch_body = parse_body(body, headers)?;
    let mut inner = app.lock();
    if content_type == "application/apply-patch+yaml" {
        if q.get("fieldManager").is_none_or(|m| m.is_empty()) {
            return Err(ApiError::bad_request("PATCH, application/apply-patch+yaml requires fieldManager to be set"));
        }
        let force = truthy(q, "force");
        let (obj, created) =
            objects::apply(&mut inner, &t.rt, &t.version, &ns, name, patch_body, sub, force, &mut ctx)?;
        app.wake_gc(&mut inner);
        drop(inner);
        let code = if created { StatusCode::CREATED } else { StatusCode::OK };
        return Ok(with_warnings(json_response(code, &objects::present(obj, &t.rt, &t.version)), &ctx.warnings));
    }
    let key_ns = if t.rt.namespaced { ns.as_str() } else { "" };
    let Some(current) = inner.get(&t.rt.key(), key_ns, name).cloned() else {
        return Err(ApiError::not_found(&t.rt, name));
    };
    let mut obj = objects::present(current, &t.rt, &t.version);
    match content_type {
        "application/merge-patch+json" => patch::merge_patch(&mut obj, &patch_body),
        "application/strategic-merge-patch+json" => patch::strategic_merge(&mut obj, &patch_body, &t.rt.kind),
        _ => patch::json_patch(&mut obj, &patch_body).map_err(|e| ApiError::new(422, "Invalid", e))?,
    }
    let r = objects::update(&mut inner, &t.rt, &t.version, &ns, name, obj, sub, &mut ctx, false)?;
    app.wake_gc(&mut inner);
    drop(inner);
    Ok(with_warnings(json_response(StatusCode::OK, &objects::present(r, &t.rt, &t.version)), &ctx.warnings))
}

fn delete_collection(app: &Arc<App>, t: &Target, q: &Query, headers: &HeaderMap, body: &Bytes) -> ApiResult<Response> {
    let ctx = write_ctx(q, headers)?;
    let opts = delete_opts(q, body, headers)?;
    let (labels, fields) = selectors(t, q)?;
    let mut inner = app.lock();
    let names: Vec<(String, String)> = inner
        .list(&t.rt.key(), t.ns.as_deref().filter(|_| t.rt.namespaced))
        .into_iter()
        .filter(|o| labels.matches(o) && fields.matches(o))
        .map(|o| {
            (
                o["metadata"]["namespace"].as_str().unwrap_or_default().to_string(),
                o["metadata"]["name"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let mut items = vec![];
    for (ns, name) in names {
        match objects::delete(&mut inner, &t.rt, &ns, &name, &opts, &ctx)? {
            Deleted::Object(o) => items.push(objects::present(o, &t.rt, &t.version)),
            Deleted::Status(_) => {}
        }
    }
    app.wake_gc(&mut inner);
    let rv = inner.rv.to_string();
    drop(inner);
    Ok(json_response(
        StatusCode::OK,
        &json!({"kind": format!("{}List", t.rt.kind), "apiVersion": t.rt.api_version(&t.version), "metadata": {"resourceVersion": rv}, "items": items}),
    ))
}

fn selectors(t: &Target, q: &Query) -> ApiResult<(LabelSelector, FieldSelector)> {
    let labels = LabelSelector::parse(q.get("labelSelector").map(String::as_str).unwrap_or(""))?;
    let extra: Vec<String> =
        t.rt.crd_version(&t.version)
            .and_then(|v| v["selectableFields"].as_array())
            .into_iter()
            .flatten()
            .filter_map(|f| f["jsonPath"].as_str().map(String::from))
            .collect();
    let fields =
        FieldSelector::parse(q.get("fieldSelector").map(String::as_str).unwrap_or(""), &t.rt.resource, &extra)?;
    Ok((labels, fields))
}

fn include(q: &Query) -> Include {
    match q.get("includeObject").map(String::as_str) {
        Some("None") => Include::None,
        Some("Object") => Include::Object,
        _ => Include::Metadata,
    }
}

fn partial(o: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]})
}

fn get(app: &Arc<App>, t: &Target, name: &str, q: &Query, format: Format) -> ApiResult<Response> {
    let inner = app.lock();
    let ns = if t.rt.namespaced { t.ns.clone().unwrap_or_default() } else { String::new() };
    let obj = inner.get(&t.rt.key(), &ns, name).cloned().ok_or_else(|| ApiError::not_found(&t.rt, name))?;
    drop(inner);
    let obj = objects::present(obj, &t.rt, &t.version);
    Ok(match format {
        Format::Json => json_response(StatusCode::OK, &obj),
        Format::Partial => typed(&partial(&obj), "PartialObjectMetadata"),
        Format::Table => {
            let meta = json!({"resourceVersion": obj["metadata"]["resourceVersion"]});
            typed(&table::table(&t.rt, &t.version, &[obj], include(q), true, meta), "Table")
        }
    })
}

fn typed(v: &Value, as_: &str) -> Response {
    let ct = format!("application/json;as={as_};v=v1;g=meta.k8s.io");
    (StatusCode::OK, [("content-type", ct)], v.to_string()).into_response()
}

/// A continue token: the list's resourceVersion and the last key returned.
fn encode_continue(rv: u64, ns: &str, name: &str) -> String {
    let raw = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": format!("{ns}/{name}\u{0}")});
    base64::engine::general_purpose::URL_SAFE.encode(raw.to_string())
}

fn decode_continue(token: &str) -> ApiResult<(u64, String, String)> {
    let bad = || {
        ApiError::bad_request(
            "continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)",
        )
    };
    let raw = base64::engine::general_purpose::URL_SAFE.decode(token).map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    let rv = v["rv"].as_u64().ok_or_else(bad)?;
    let start = v["start"].as_str().ok_or_else(bad)?.trim_end_matches('\u{0}');
    let (ns, name) = start.split_once('/').ok_or_else(bad)?;
    Ok((rv, ns.to_string(), name.to_string()))
}

fn list(app: &Arc<App>, t: &Target, q: &Query, format: Format) -> ApiResult<Response> {
    let (labels, fields) = selectors(t, q)?;
    let limit: usize = q.get("limit").and_then(|l| l.parse().ok()).filter(|l| *l > 0).unwrap_or(usize::MAX);
    let inner = app.lock();
    let (list_rv, after) = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(c) => {
            let (rv, ns, name) = decode_continue(c)?;
            if rv < inner.oldest_rv {
                return Err(ApiError::gone("The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list."));
            }
            (rv, Some((ns, name)))
        }
        None => (inner.rv, None),
    };
    let ns_filter = t.ns.as_deref().filter(|_| t.rt.namespaced);
    let all: Vec<&Value> = inner
        .list(&t.rt.key(), ns_filter)
        .into_iter()
        .filter(|o| match &after {
            None => true,
            Some((ns, name)) => {
                let k = (
                    o["metadata"]["namespace"].as_str().unwrap_or_default(),
                    o["metadata"]["name"].as_str().unwrap_or_default(),
                );
                k > (ns.as_str(), name.as_str())
            }
        })
        .filter(|o| labels.matches(o) && fields.matches(o))
        .collect();
    let total = all.len();
    let page: Vec<Value> =
        all.into_iter().take(limit).map(|o| objects::present(o.clone(), &t.rt, &t.version)).collect();
    drop(inner);
    let mut meta = json!({"resourceVersion": list_rv.to_string()});
    if total > page.len() {
        let last = page.last().unwrap();
        meta["continue"] = json!(encode_continue(
            list_rv,
            last["metadata"]["namespace"].as_str().unwrap_or_default(),
            last["metadata"]["name"].as_str().unwrap_or_default()
        ));
        if labels.is_empty() && fields.name().is_none() && q.get("fieldSelector").is_none_or(|f| f.is_empty()) {
            meta["remainingItemCount"] = json!(total - page.len());
        }
    }
    Ok(match format {
        Format::Table => typed(&table::table(&t.rt, &t.version, &page, include(q), true, meta), "Table"),
        Format::Partial => {
            let items: Vec<Value> = page.iter().map(partial).collect();
            typed(
                &json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1", "metadata": meta, "items": items}),
                "PartialObjectMetadataList",
            )
        }
        Format::Json => {
            // Items of built-in lists carry no kind/apiVersion on the wire; custom ones do.
            let custom = t.rt.is_custom();
            let items: Vec<Value> = page
                .into_iter()
                .map(|mut o| {
                    if !custom {
                        if let Some(m) = o.as_object_mut() {
                            m.remove("kind");
                            m.remove("apiVersion");
                        }
                    }
                    o
                })
                .collect();
            json_response(
                StatusCode::OK,
                &json!({"kind": format!("{}List", t.rt.kind), "apiVersion": t.rt.api_version(&t.version), "metadata": meta, "items": items}),
            )
        }
    })
}

/// How a watch renders each object.
#[derive(Clone)]
struct Renderer {
    rt: ResourceType,
    version: String,
    format: Format,
    include: Include,
}

impl Renderer {
    fn render(&self, kind: &str, obj: &Value, first: &mut bool) -> Bytes {
        let obj = objects::present(obj.clone(), &self.rt, &self.version);
        let out = match self.format {
            Format::Json => obj,
            Format::Partial => partial(&obj),
            Format::Table => {
                let meta = json!({"resourceVersion": obj["metadata"]["resourceVersion"]});
                let t = table::table(&self.rt, &self.version, &[obj], self.include, *first, meta);
                *first = false;
                t
            }
        };
        let mut line = json!({"type": kind, "object": out}).to_string();
        line.push('\n');
        Bytes::from(line)
    }
}

fn bookmark(rt: &ResourceType, version: &str, rv: u64, initial_end: bool) -> Bytes {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    let mut line = json!({"type": "BOOKMARK", "object": {"kind": rt.kind, "apiVersion": rt.api_version(version), "metadata": meta}}).to_string();
    line.push('\n');
    Bytes::from(line)
}

/// What one stored event means to one watcher with selectors: ADDED when an object starts to
/// match, DELETED when it stops, as the watch cache does.
fn translate(
    ev: &Event,
    key: &str,
    ns: Option<&str>,
    labels: &LabelSelector,
    fields: &FieldSelector,
) -> Option<&'static str> {
    if ev.key != key || ns.is_some_and(|n| n != ev.namespace) {
        return None;
    }
    let m = |o: &Value| labels.matches(o) && fields.matches(o);
    let now = m(&ev.object);
    let before = ev.prev.as_ref().is_some_and(m);
    match ev.kind {
        EventType::Deleted => before.then_some("DELETED"),
        EventType::Added => now.then_some("ADDED"),
        EventType::Modified => match (before, now) {
            (true, true) => Some("MODIFIED"),
            (false, true) => Some("ADDED"),
            (true, false) => Some("DELETED"),
            (false, false) => None,
        },
    }
}

async fn watch(app: &Arc<App>, t: &Target, q: &Query, format: Format) -> ApiResult<Response> {
    let (labels, fields) = selectors(t, q)?;
    let ns = t.ns.clone().filter(|_| t.rt.namespaced);
    let key = t.rt.key();
    let bookmarks = truthy(q, "allowWatchBookmarks");
    let send_initial = truthy(q, "sendInitialEvents");
    let timeout = q.get("timeoutSeconds").and_then(|s| s.parse::<u64>().ok()).map(Duration::from_secs);
    let renderer = Renderer { rt: t.rt.clone(), version: t.version.clone(), format, include: include(q) };
    let mut first = true;
    let mut initial: Vec<Bytes> = vec![];
    let requested = q.get("resourceVersion").cloned().unwrap_or_default();
    let (rx, start_rv) = {
        let inner = app.lock();
        let rx = inner.tx.subscribe();
        if requested.is_empty() || requested == "0" || send_initial {
            for o in inner.list(&key, ns.as_deref()) {
                if labels.matches(o) && fields.matches(o) {
                    initial.push(renderer.render("ADDED", o, &mut first));
                }
            }
            if send_initial {
                initial.push(bookmark(&t.rt, &t.version, inner.rv, true));
            }
            (rx, inner.rv)
        } else {
            let rv: u64 = requested
                .parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {requested}")))?;
            if rv < inner.oldest_rv {
                // kube-apiserver answers 200 and sends the 410 as an ERROR event.
                let status = ApiError::gone(format!("too old resource version: {rv} ({})", inner.oldest_rv)).status();
                let mut line = json!({"type": "ERROR", "object": status}).to_string();
                line.push('\n');
                return Ok((StatusCode::OK, [("content-type", "application/json")], line).into_response());
            }
            for ev in inner.log.iter().filter(|e| e.rv > rv) {
                if let Some(kind) = translate(ev, &key, ns.as_deref(), &labels, &fields) {
                    initial.push(renderer.render(kind, &ev.object, &mut first));
                }
            }
            (rx, inner.rv)
        }
    };
    let (tx, out_rx) = mpsc::channel::<Result<Bytes, Infallible>>(256);
    let mut close = app.close_watches.subscribe();
    let interval = app.bookmark_interval;
    let rt = t.rt.clone();
    let version = t.version.clone();
    tokio::spawn(async move {
        let mut rx: broadcast::Receiver<Arc<Event>> = rx;
        for line in initial {
            if tx.send(Ok(line)).await.is_err() {
                return;
            }
        }
        let mut seen = start_rv;
        let deadline = timeout.map(|d| tokio::time::Instant::now() + d);
        let mut tick = tokio::time::interval(interval);
        tick.tick().await;
        loop {
            let until_deadline = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ev = rx.recv() => match ev {
                    Ok(ev) => {
                        if ev.rv <= seen { continue; }
                        seen = ev.rv;
                        if let Some(kind) = translate(&ev, &key, ns.as_deref(), &labels, &fields) {
                            if tx.send(Ok(renderer.render(kind, &ev.object, &mut first))).await.is_err() { return; }
                        }
                    }
                    // Too slow a reader, or the server is going away: end the watch, the client re-watches.
                    Err(_) => return,
                },
                _ = tick.tick(), if bookmarks => {
                    if tx.send(Ok(bookmark(&rt, &version, seen, false))).await.is_err() { return; }
                }
                _ = close.changed() => return,
                _ = until_deadline => return,
                _ = tx.closed() => return,
            }
        }
    });
    let stream = futures_util::stream::unfold(out_rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });
    let ct = match format {
        Format::Table => "application/json;as=Table;v=v1;g=meta.k8s.io",
        _ => "application/json",
    };
    Ok((StatusCode::OK, [("content-type", ct), ("cache-control", "no-cache, private")], Body::from_stream(stream))
        .into_response())
}
