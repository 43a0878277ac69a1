//! The write path, as kube-apiserver's generic registry runs it: defaulting, validation, metadata
//! (uid, creationTimestamp, generation, resourceVersion, managedFields), preconditions, status
//! subresource rules, finalizers and graceful deletion. Everything runs under the store lock.

use base64::Engine;
use chrono::{SecondsFormat, Utc};
use serde_json::{json, Value};

use crate::errors::{ApiError, ApiResult, Cause};
use crate::registry::ResourceType;
use crate::schema;
use crate::ssa::{self, Shape};
use crate::store::{EventType, Inner};

/// `fieldValidation`: what to do with fields the kind does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldValidation {
    Strict,
    Warn,
    Ignore,
}

/// Who writes, and how.
#[derive(Debug, Clone)]
pub struct WriteCtx {
    pub manager: String,
    pub validation: FieldValidation,
    pub dry_run: bool,
    /// Written by the emulator itself (scheduler, kubelet, controllers): may set what users may not.
    pub internal: bool,
    /// `Warning` headers to send back.
    pub warnings: Vec<String>,
}

impl WriteCtx {
    pub fn internal(manager: &str) -> Self {
        WriteCtx {
            manager: manager.into(),
            validation: FieldValidation::Ignore,
            dry_run: false,
            internal: true,
            warnings: vec![],
        }
    }
}

pub fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

pub fn new_uid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The object as served in `version` (custom resources are stored once and served in each version
/// without conversion, as with `conversion.strategy: None`).
pub fn present(mut obj: Value, rt: &ResourceType, version: &str) -> Value {
    if rt.group == "events.k8s.io" {
        obj = events_from_core(obj);
    }
    if let Some(m) = obj.as_object_mut() {
        m.insert("apiVersion".into(), json!(rt.api_version(version)));
        m.insert("kind".into(), json!(rt.kind));
    }
    obj
}

fn shape<'a>(rt: &'a ResourceType, version: &str) -> (Option<&'a str>, Option<&'a Value>) {
    let schema = rt
        .crd_version(version)
        .map(|v| &v["schema"]["openAPIV3Schema"]);
    (Some(rt.kind.as_str()), schema)
}

/// Checks (and for custom resources prunes and defaults) the fields of an incoming object.
fn check_fields(
    rt: &ResourceType,
    version: &str,
    obj: &mut Value,
    ctx: &mut WriteCtx,
) -> ApiResult<Vec<Cause>> {
    let mut unknown = schema::unknown_meta_fields(obj);
    let mut causes = vec![];
    if let Some(s) = shape(rt, version).1 {
        let out = schema::process_custom(s, obj);
        unknown.extend(out.unknown);
        causes = out.causes;
    } else {
        unknown = schema::unknown_builtin_fields(&rt.kind, obj);
    }
    // Decoding into the kind's type drops what it does not have.
    for f in &unknown {
        drop_field(obj, f);
    }
    match ctx.validation {
        FieldValidation::Strict if !unknown.is_empty() => {
            let list: Vec<String> = unknown
                .iter()
                .map(|f| format!("unknown field {f:?}"))
                .collect();
            return Err(ApiError::bad_request(format!(
                "strict decoding error: {}",
                list.join(", ")
            )));
        }
        FieldValidation::Warn => ctx
            .warnings
            .extend(unknown.iter().map(|f| format!("unknown field {f:?}"))),
        _ => {}
    }
    Ok(causes)
}

/// Removes the field at a path like `spec.containers[0].bogus`.
fn drop_field(obj: &mut Value, path: &str) {
    let mut parts: Vec<&str> = path.split('.').collect();
    let Some(last) = parts.pop() else { return };
    let mut cur = obj;
    for p in parts {
        let (name, index) = match p.split_once('[') {
            Some((n, i)) => (n, i.trim_end_matches(']').parse::<usize>().ok()),
            None => (p, None),
        };
        let Some(next) = cur.get_mut(name) else {
            return;
        };
        cur = match index {
            Some(i) => match next.get_mut(i) {
                Some(v) => v,
                None => return,
            },
            None => next,
        };
    }
    if let Some(m) = cur.as_object_mut() {
        m.remove(last);
    }
}

/// `events.k8s.io/v1` field names and their core/v1 (storage) names.
const EVENT_FIELDS: [(&str, &str); 6] = [
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
];

fn rename(mut obj: Value, pairs: &[(&str, &str)], forward: bool) -> Value {
    if let Some(m) = obj.as_object_mut() {
        for (a, b) in pairs {
            let (from, to) = if forward { (a, b) } else { (b, a) };
            if let Some(v) = m.remove(*from) {
                m.insert(to.to_string(), v);
            }
        }
    }
    obj
}

fn events_from_core(obj: Value) -> Value {
    let mut pairs = EVENT_FIELDS.to_vec();
    pairs.push(("reportingController", "reportingComponent"));
    rename(obj, &pairs, false)
}

fn events_to_core(obj: Value) -> Value {
    let mut pairs = EVENT_FIELDS.to_vec();
    pairs.push(("reportingController", "reportingComponent"));
    let mut o = rename(obj, &pairs, true);
    o["apiVersion"] = json!("v1");
    o
}

/// Checks apiVersion and kind, then brings the object to its storage form.
fn check_type(rt: &ResourceType, version: &str, obj: &mut Value) -> ApiResult<()> {
    check_type_only(rt, version, obj)?;
    if rt.group == "events.k8s.io" {
        *obj = events_to_core(std::mem::take(obj));
    }
    Ok(())
}

fn check_type_only(rt: &ResourceType, version: &str, obj: &mut Value) -> ApiResult<()> {
    if !obj.is_object() {
        return Err(ApiError::bad_request(
            "the body of the request must be a JSON object",
        ));
    }
    let want = rt.api_version(version);
    match obj["apiVersion"].as_str() {
        None | Some("") if !rt.is_custom() => obj["apiVersion"] = json!(want),
        None | Some("") => {
            return Err(ApiError::bad_request(format!(
                "Object 'apiVersion' is missing in '{obj}'"
            )))
        }
        Some(v) if v != want => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({want})"
            )))
        }
        _ => {}
    }
    match obj["kind"].as_str() {
        None | Some("") if !rt.is_custom() => obj["kind"] = json!(rt.kind),
        None | Some("") => {
            return Err(ApiError::bad_request(format!(
                "Object 'Kind' is missing in '{obj}'"
            )))
        }
        Some(k) if k != rt.kind => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                rt.kind
            )))
        }
        _ => {}
    }
    if !obj["metadata"].is_object() {
        if obj["metadata"].is_null() {
            obj["metadata"] = json!({});
        } else {
            return Err(ApiError::bad_request("metadata must be an object"));
        }
    }
    Ok(())
}

fn check_namespace(
    inner: &Inner,
    rt: &ResourceType,
    ns: &str,
    obj: &mut Value,
    name: &str,
    creating: bool,
) -> ApiResult<()> {
    if !rt.namespaced {
        if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("namespace");
        }
        return Ok(());
    }
    match obj["metadata"]["namespace"].as_str() {
        Some(n) if !n.is_empty() && n != ns => return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        )),
        _ => obj["metadata"]["namespace"] = json!(ns),
    }
    if creating {
        let Some(nsobj) = inner.get("/namespaces", "", ns) else {
            return Err(ApiError::namespace_not_found(ns));
        };
        if !nsobj["metadata"]["deletionTimestamp"].is_null() {
            return Err(ApiError::new(
                403,
                "Forbidden",
                format!("{} {name:?} is forbidden: unable to create new content in namespace {ns} because it is being terminated", rt.group_resource()),
            ));
        }
    }
    Ok(())
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let bytes = uuid::Uuid::new_v4().into_bytes();
    bytes[..5]
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

/// Everything but metadata and status: what a change to bumps `generation`.
fn spec_part(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
        m.remove("apiVersion");
        m.remove("kind");
    }
    o
}

fn finalizers(obj: &Value) -> Vec<String> {
    obj["metadata"]["finalizers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f.as_str().map(String::from))
        .collect()
}

/// POST to a collection.
pub fn create(
    inner: &mut Inner,
    rt: &ResourceType,
    version: &str,
    ns: &str,
    mut obj: Value,
    ctx: &mut WriteCtx,
) -> ApiResult<Value> {
    check_type(rt, version, &mut obj)?;
    if obj["metadata"]["name"].as_str().is_none_or(str::is_empty) {
        if let Some(g) = obj["metadata"]["generateName"].as_str() {
            obj["metadata"]["name"] = json!(format!("{g}{}", random_suffix()));
        }
    }
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    check_namespace(inner, rt, ns, &mut obj, &name, true)?;
    let mut causes = check_fields(rt, version, &mut obj, ctx)?;
    causes.extend(schema::validate_meta(&obj, rt.resource == "namespaces"));
    prepare_create(rt, &mut obj, ctx, &mut causes);
    if rt.key() == "/pods" && !ctx.internal {
        let warnings = crate::admission::admit_pod(inner, rt, ns, &mut obj)?;
        ctx.warnings.extend(warnings);
    }
    if !causes.is_empty() {
        return Err(ApiError::invalid(rt, &name, causes));
    }
    if inner
        .get(&rt.key(), if rt.namespaced { ns } else { "" }, &name)
        .is_some()
    {
        return Err(ApiError::already_exists(rt, &name));
    }
    let meta = obj["metadata"].as_object_mut().unwrap();
    for k in [
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "selfLink",
    ] {
        meta.remove(k);
    }
    meta.insert("uid".into(), json!(new_uid()));
    meta.insert("creationTimestamp".into(), json!(now()));
    if rt.generation {
        meta.insert("generation".into(), json!(1));
    }
    if rt.status && !ctx.internal && rt.resource != "pods" && rt.resource != "namespaces" {
        if let Some(m) = obj.as_object_mut() {
            m.remove("status");
        }
    }
    if obj["metadata"]["managedFields"]
        .as_array()
        .is_none_or(|a| a.is_empty())
    {
        let (kind, schema) = shape(rt, version);
        ssa::record_update(
            None,
            &mut obj,
            Shape { kind, schema },
            &ctx.manager,
            &rt.api_version(version),
            None,
            &now(),
        );
    }
    store_new(inner, rt, ns, obj, ctx)
}

/// Stores a new object (used by create and by apply-creates).
fn store_new(
    inner: &mut Inner,
    rt: &ResourceType,
    ns: &str,
    obj: Value,
    ctx: &WriteCtx,
) -> ApiResult<Value> {
    if ctx.dry_run {
        return Ok(obj);
    }
    let stored = inner.put(
        &rt.key(),
        if rt.namespaced { ns } else { "" },
        obj,
        EventType::Added,
    );
    after_write(inner, rt, &stored);
    if !stored["metadata"]["ownerReferences"].is_null() {
        inner.gc_dirty = true;
    }
    Ok(stored)
}

/// Kind-specific defaults and checks on create (the registry strategies' PrepareForCreate/Validate).
fn prepare_create(rt: &ResourceType, obj: &mut Value, ctx: &WriteCtx, causes: &mut Vec<Cause>) {
    match (rt.group.as_str(), rt.resource.as_str()) {
        ("", "pods") => prepare_pod(obj, ctx, causes),
        ("", "namespaces") => {
            obj["spec"] = json!({"finalizers": ["kubernetes"]});
            obj["status"] = json!({"phase": "Active"});
            let name = obj["metadata"]["name"].clone();
            obj["metadata"]["labels"]["kubernetes.io/metadata.name"] = name;
        }
        ("", "secrets") => {
            normalize_secret(obj, causes);
            if obj["type"].is_null() {
                obj["type"] = json!("Opaque");
            }
        }
        ("apiextensions.k8s.io", "customresourcedefinitions") => validate_crd(obj, causes),
        ("", "events") if obj["involvedObject"].is_null() => {
            causes.push(Cause::required("involvedObject"))
        }
        ("events.k8s.io", "events") => {
            // Stored in the core form already: check the events.k8s.io/v1 required fields.
            for (field, stored) in [
                ("eventTime", "eventTime"),
                ("reportingController", "reportingComponent"),
                ("reportingInstance", "reportingInstance"),
                ("action", "action"),
                ("reason", "reason"),
                ("regarding", "involvedObject"),
            ] {
                if obj[stored].is_null() || obj[stored] == "" {
                    causes.push(Cause::required(field));
                }
            }
        }
        _ => {}
    }
}

fn normalize_secret(obj: &mut Value, causes: &mut Vec<Cause>) {
    if let Some(sd) = obj.as_object_mut().and_then(|m| m.remove("stringData")) {
        for (k, v) in sd.as_object().into_iter().flatten() {
            let enc =
                base64::engine::general_purpose::STANDARD.encode(v.as_str().unwrap_or_default());
            obj["data"][k] = json!(enc);
        }
    }
    for (k, v) in obj["data"].as_object().into_iter().flatten() {
        if v.as_str()
            .is_none_or(|s| base64::engine::general_purpose::STANDARD.decode(s).is_err())
        {
            causes.push(Cause::invalid(
                format!("data[{k}]"),
                v,
                "must be base64 encoded",
            ));
        }
    }
}

fn prepare_pod(obj: &mut Value, ctx: &WriteCtx, causes: &mut Vec<Cause>) {
    let spec = &mut obj["spec"];
    if spec["containers"].as_array().is_none_or(|c| c.is_empty()) {
        causes.push(Cause::required("spec.containers"));
    }
    let defaults = [
        ("restartPolicy", json!("Always")),
        ("terminationGracePeriodSeconds", json!(30)),
        ("dnsPolicy", json!("ClusterFirst")),
        ("schedulerName", json!("default-scheduler")),
        ("securityContext", json!({})),
        ("serviceAccountName", json!("default")),
        ("enableServiceLinks", json!(true)),
        ("preemptionPolicy", json!("PreemptLowerPriority")),
        ("priority", json!(0)),
    ];
    for (k, v) in defaults {
        if spec[k].is_null() {
            spec[k] = v;
        }
    }
    if spec["serviceAccount"].is_null() {
        spec["serviceAccount"] = spec["serviceAccountName"].clone();
    }
    if spec["tolerations"].is_null() {
        spec["tolerations"] = json!([
            {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
            {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
        ]);
    }
    let mut guaranteed = true;
    let mut any_resources = false;
    for list in ["initContainers", "containers"] {
        for (i, c) in spec[list].as_array_mut().into_iter().flatten().enumerate() {
            if c["name"].as_str().is_none_or(str::is_empty) {
                causes.push(Cause::required(format!("spec.{list}[{i}].name")));
            }
            if c["image"].as_str().is_none_or(str::is_empty) {
                causes.push(Cause::required(format!("spec.{list}[{i}].image")));
            }
            if c["terminationMessagePath"].is_null() {
                c["terminationMessagePath"] = json!("/dev/termination-log");
            }
            if c["terminationMessagePolicy"].is_null() {
                c["terminationMessagePolicy"] = json!("File");
            }
            if c["imagePullPolicy"].is_null() {
                let image = c["image"].as_str().unwrap_or_default();
                let tagged = image
                    .rsplit('/')
                    .next()
                    .is_some_and(|last| last.contains(':') || last.contains('@'));
                let latest = image.ends_with(":latest");
                c["imagePullPolicy"] = json!(if !tagged || latest {
                    "Always"
                } else {
                    "IfNotPresent"
                });
            }
            if c["resources"].is_null() {
                c["resources"] = json!({});
            }
            // A limit without a request gets the limit as request.
            if let Some(lim) = c["resources"]["limits"].as_object().cloned() {
                for (k, v) in lim {
                    if c["resources"]["requests"][&k].is_null() {
                        c["resources"]["requests"][&k] = v;
                    }
                }
            }
            let r = &c["resources"];
            any_resources |= !r["requests"].is_null() || !r["limits"].is_null();
            for res in ["cpu", "memory"] {
                if r["limits"][res].is_null() || r["limits"][res] != r["requests"][res] {
                    guaranteed = false;
                }
            }
        }
    }
    // The ServiceAccount admission plugin mounts the API token unless told not to.
    let automount = spec["automountServiceAccountToken"]
        .as_bool()
        .unwrap_or(true);
    if automount && !ctx.internal {
        let vol = format!("kube-api-access-{}", random_suffix());
        let volumes = spec["volumes"].as_array().cloned().unwrap_or_default();
        let mut volumes = volumes;
        volumes.push(json!({"name": vol, "projected": {"defaultMode": 420, "sources": [
            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
        ]}}));
        spec["volumes"] = Value::Array(volumes);
        for c in spec["containers"].as_array_mut().into_iter().flatten() {
            let mut mounts = c["volumeMounts"].as_array().cloned().unwrap_or_default();
            mounts.push(json!({"name": vol, "readOnly": true, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}));
            c["volumeMounts"] = Value::Array(mounts);
        }
    }
    let qos = if guaranteed && any_resources {
        "Guaranteed"
    } else if any_resources {
        "Burstable"
    } else {
        "BestEffort"
    };
    obj["status"] = json!({"phase": "Pending", "qosClass": qos});
}

fn validate_crd(obj: &Value, causes: &mut Vec<Cause>) {
    let spec = &obj["spec"];
    let group = spec["group"].as_str().unwrap_or_default();
    let plural = spec["names"]["plural"].as_str().unwrap_or_default();
    if group.is_empty() {
        causes.push(Cause::required("spec.group"));
    }
    if plural.is_empty() {
        causes.push(Cause::required("spec.names.plural"));
    }
    if spec["names"]["kind"].as_str().is_none_or(str::is_empty) {
        causes.push(Cause::required("spec.names.kind"));
    }
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    if !group.is_empty() && !plural.is_empty() && name != format!("{plural}.{group}") {
        causes.push(Cause::invalid(
            "metadata.name",
            &json!(name),
            "must be spec.names.plural+\".\"+spec.group",
        ));
    }
    match spec["scope"].as_str() {
        Some("Namespaced" | "Cluster") => {}
        _ => causes.push(Cause::new(
            "FieldValueNotSupported",
            "spec.scope",
            format!(
                "Unsupported value: {}: supported values: \"Cluster\", \"Namespaced\"",
                crate::errors::show(&spec["scope"])
            ),
        )),
    }
    let versions = spec["versions"].as_array().cloned().unwrap_or_default();
    if versions.is_empty() {
        causes.push(Cause::invalid(
            "spec.versions",
            &json!(null),
            "must have exactly one version marked as storage version",
        ));
    } else if versions.iter().filter(|v| v["storage"] == true).count() != 1 {
        causes.push(Cause::invalid(
            "spec.versions",
            &spec["versions"],
            "must have exactly one version marked as storage version",
        ));
    }
    for (i, v) in versions.iter().enumerate() {
        if !v["schema"]["openAPIV3Schema"].is_object() {
            causes.push(Cause::new(
                "FieldValueRequired",
                format!("spec.versions[{i}].schema.openAPIV3Schema"),
                "Required value: schemas are required",
            ));
        }
    }
}

/// Hooks that run after any stored change: CRDs change what is served.
fn after_write(inner: &mut Inner, rt: &ResourceType, stored: &Value) {
    if rt.key() == "apiextensions.k8s.io/customresourcedefinitions" {
        inner.registry.apply_crd(stored);
        if stored["status"]["conditions"]
            .as_array()
            .is_none_or(|c| !c.iter().any(|c| c["type"] == "Established"))
            && stored["metadata"]["deletionTimestamp"].is_null()
        {
            // What the apiextensions controllers do right after a CRD is stored.
            let mut crd = stored.clone();
            let t = now();
            let storage: Vec<Value> = crd["spec"]["versions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|v| v["storage"] == true)
                .map(|v| v["name"].clone())
                .collect();
            crd["status"] = json!({
                "acceptedNames": crd["spec"]["names"],
                "conditions": [
                    {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": t},
                    {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": t},
                ],
                "storedVersions": storage,
            });
            if finalizers(&crd)
                .iter()
                .all(|f| f != "customresourcecleanup.apiextensions.k8s.io")
            {
                let mut f = finalizers(&crd);
                f.push("customresourcecleanup.apiextensions.k8s.io".into());
                crd["metadata"]["finalizers"] = json!(f);
            }
            let shape = Shape {
                kind: Some("CustomResourceDefinition"),
                schema: None,
            };
            ssa::record_update(
                Some(stored),
                &mut crd,
                shape,
                "kube-apiserver",
                "apiextensions.k8s.io/v1",
                Some("status"),
                &t,
            );
            let crd = inner.put(&rt.key(), "", crd, EventType::Modified);
            inner.registry.apply_crd(&crd);
        }
    }
    if rt.key() == "/namespaces" && stored["metadata"]["deletionTimestamp"].is_null() {
        let ns = stored["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        seed_namespace(inner, &ns);
    }
}

/// What controllers put into every new namespace: the `default` ServiceAccount and `kube-root-ca.crt`.
fn seed_namespace(inner: &mut Inner, ns: &str) {
    let t = now();
    if inner.get("/serviceaccounts", ns, "default").is_none() {
        let sa = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {
            "name": "default", "namespace": ns, "uid": new_uid(), "creationTimestamp": t}});
        inner.put("/serviceaccounts", ns, sa, EventType::Added);
    }
    if inner.get("/configmaps", ns, "kube-root-ca.crt").is_none() {
        let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
            "name": "kube-root-ca.crt", "namespace": ns, "uid": new_uid(), "creationTimestamp": t,
            "annotations": {"kubernetes.io/description": "Contains a CA bundle that can be used to verify the kube-apiserver when using internal endpoints such as the internal service IP or kubernetes.default.svc. No other usage is guaranteed across distributions of Kubernetes clusters."}},
            "data": {"ca.crt": "-----BEGIN CERTIFICATE-----\nkubesim has no CA: it serves plain HTTP\n-----END CERTIFICATE-----\n"}});
        inner.put("/configmaps", ns, cm, EventType::Added);
    }
}

/// PUT (and the second half of every patch): replaces an existing object.
#[allow(clippy::too_many_arguments)]
pub fn update(
    inner: &mut Inner,
    rt: &ResourceType,
    version: &str,
    ns: &str,
    name: &str,
    mut obj: Value,
    sub: Option<&str>,
    ctx: &mut WriteCtx,
    managed: bool,
) -> ApiResult<Value> {
    let ns = if rt.namespaced { ns } else { "" };
    let Some(old) = inner.get(&rt.key(), ns, name).cloned() else {
        return Err(ApiError::not_found(rt, name));
    };
    check_type(rt, version, &mut obj)?;
    match obj["metadata"]["name"].as_str() {
        Some(n) if n != name => {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({n}) does not match the name on the URL ({name})"
            )))
        }
        None | Some("") => obj["metadata"]["name"] = json!(name),
        _ => {}
    }
    check_namespace(inner, rt, ns, &mut obj, name, false)?;
    match obj["metadata"]["resourceVersion"].as_str() {
        Some(rv) if !rv.is_empty() && rv != old["metadata"]["resourceVersion"] => {
            return Err(ApiError::stale(rt, name))
        }
        None | Some("") if !rt.unconditional_update && !ctx.internal => {
            return Err(ApiError::invalid(
                rt,
                name,
                vec![Cause::invalid(
                    "metadata.resourceVersion",
                    &json!(0),
                    "must be specified for an update",
                )],
            ))
        }
        _ => {}
    }
    let mut causes = vec![];
    if sub == Some("status") {
        // /status changes only status (and nothing a user could sneak in through metadata).
        let mut new = old.clone();
        new["status"] = obj["status"].clone();
        if rt.is_custom() {
            let out =
                schema::process_custom(shape(rt, version).1.unwrap_or(&Value::Null), &mut new);
            causes = out.causes;
        }
        if let Some(m) = obj["metadata"].get("managedFields") {
            new["metadata"]["managedFields"] = m.clone();
        }
        obj = new;
    } else {
        causes = check_fields(rt, version, &mut obj, ctx)?;
        causes.extend(schema::validate_meta(&obj, rt.resource == "namespaces"));
        if rt.status || rt.resource == "pods" {
            match old.get("status") {
                Some(s) => obj["status"] = s.clone(),
                None => {
                    if let Some(m) = obj.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        }
        if rt.resource == "secrets" {
            normalize_secret(&mut obj, &mut causes);
        }
        validate_update(rt, &old, &obj, ctx, &mut causes);
    }
    if !causes.is_empty() {
        return Err(ApiError::invalid(rt, name, causes));
    }
    // Metadata the client cannot change.
    for k in [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
    ] {
        match old["metadata"].get(k) {
            Some(v) => obj["metadata"][k] = v.clone(),
            None => {
                obj["metadata"].as_object_mut().unwrap().remove(k);
            }
        }
    }
    obj["metadata"].as_object_mut().unwrap().remove("selfLink");
    if !old["metadata"]["deletionTimestamp"].is_null() {
        let before = finalizers(&old);
        let added: Vec<String> = finalizers(&obj)
            .into_iter()
            .filter(|f| !before.contains(f))
            .collect();
        if !added.is_empty() && !ctx.internal {
            return Err(ApiError::invalid(
                rt,
                name,
                vec![Cause::forbidden("metadata.finalizers", format!("no new finalizers can be added if the object is being deleted, found new finalizers {added:?}"))],
            ));
        }
    }
    if rt.generation && spec_part(&old) != spec_part(&obj) {
        let g = old["metadata"]["generation"].as_i64().unwrap_or(0);
        obj["metadata"]["generation"] = json!(g + 1);
    }
    if !managed {
        normalize_managed_times(&mut obj);
        let client_set = obj["metadata"]
            .get("managedFields")
            .filter(|m| **m != old["metadata"]["managedFields"])
            .cloned();
        match client_set {
            // A client that sets managedFields replaces them (an empty list clears them).
            Some(m) if m.as_array().is_some_and(|a| a.is_empty()) => {
                obj["metadata"]
                    .as_object_mut()
                    .unwrap()
                    .remove("managedFields");
            }
            Some(_) => {}
            None => {
                obj["metadata"]["managedFields"] = old["metadata"]["managedFields"].clone();
                if obj["metadata"]["managedFields"].is_null() {
                    obj["metadata"]
                        .as_object_mut()
                        .unwrap()
                        .remove("managedFields");
                }
                let (kind, schema) = shape(rt, version);
                ssa::record_update(
                    Some(&old),
                    &mut obj,
                    Shape { kind, schema },
                    &ctx.manager,
                    &rt.api_version(version),
                    sub,
                    &now(),
                );
            }
        }
    }
    store_update(inner, rt, ns, name, old, obj, ctx)
}

/// Times in client-sent managedFields as the server writes them (RFC 3339, seconds, `Z`), so a
/// client that re-sends what it read (in any RFC 3339 spelling) changes nothing.
fn normalize_managed_times(obj: &mut Value) {
    for e in obj["metadata"]["managedFields"]
        .as_array_mut()
        .into_iter()
        .flatten()
    {
        if let Some(t) = e["time"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        {
            e["time"] = json!(t
                .with_timezone(&Utc)
                .to_rfc3339_opts(SecondsFormat::Secs, true));
        }
    }
}

/// The rules of `ValidateUpdate` the emulator keeps: immutable pod specs and immutable ConfigMaps/Secrets.
fn validate_update(
    rt: &ResourceType,
    old: &Value,
    new: &Value,
    ctx: &WriteCtx,
    causes: &mut Vec<Cause>,
) {
    match (rt.group.as_str(), rt.resource.as_str()) {
        ("", "pods") if !ctx.internal => {
            let strip = |o: &Value| {
                let mut s = o["spec"].clone();
                for list in ["containers", "initContainers"] {
                    for c in s[list].as_array_mut().into_iter().flatten() {
                        c["image"] = Value::Null;
                    }
                }
                for k in [
                    "activeDeadlineSeconds",
                    "tolerations",
                    "terminationGracePeriodSeconds",
                    "schedulingGates",
                ] {
                    if let Some(m) = s.as_object_mut() {
                        m.remove(k);
                    }
                }
                s
            };
            if strip(old) != strip(new) {
                causes.push(Cause::forbidden(
                    "spec",
                    "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
                ));
            }
        }
        ("", "configmaps" | "secrets") if old["immutable"] == true => {
            for f in ["data", "binaryData"] {
                if old[f] != new[f] {
                    causes.push(Cause::forbidden(
                        f,
                        "field is immutable when `immutable` is set",
                    ));
                }
            }
            if new["immutable"] != true {
                causes.push(Cause::forbidden(
                    "immutable",
                    "field is immutable when `immutable` is set",
                ));
            }
        }
        _ => {}
    }
}

fn store_update(
    inner: &mut Inner,
    rt: &ResourceType,
    ns: &str,
    name: &str,
    old: Value,
    mut obj: Value,
    ctx: &WriteCtx,
) -> ApiResult<Value> {
    obj["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
    if obj == old {
        // A no-op write changes nothing, not even the resourceVersion.
        return Ok(old);
    }
    if ctx.dry_run {
        return Ok(obj);
    }
    let deleting = !obj["metadata"]["deletionTimestamp"].is_null();
    let grace_left = rt.resource == "pods"
        && obj["metadata"]["deletionGracePeriodSeconds"]
            .as_i64()
            .unwrap_or(0)
            > 0;
    if deleting && finalizers(&obj).is_empty() && !grace_left && rt.resource != "namespaces" {
        inner
            .objects
            .insert((rt.key(), ns.to_string(), name.to_string()), obj);
        let removed = inner.remove(&rt.key(), ns, name).unwrap();
        after_remove(inner, rt, &removed);
        return Ok(removed);
    }
    let stored = inner.put(&rt.key(), ns, obj, EventType::Modified);
    if deleting || stored["metadata"]["ownerReferences"] != old["metadata"]["ownerReferences"] {
        inner.gc_dirty = true;
    }
    after_write(inner, rt, &stored);
    Ok(stored)
}

fn after_remove(inner: &mut Inner, rt: &ResourceType, removed: &Value) {
    if rt.key() == "apiextensions.k8s.io/customresourcedefinitions" {
        inner
            .registry
            .remove_crd(removed["metadata"]["name"].as_str().unwrap_or_default());
    }
}

/// `DeleteOptions`, from the body or the query.
#[derive(Debug, Clone, Default)]
pub struct DeleteOpts {
    pub propagation: Option<String>,
    pub grace: Option<i64>,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

pub enum Deleted {
    /// Still there (finalizers, graceful deletion) or removed and returned as an object.
    Object(Value),
    /// Removed; answered with a `Status` (kinds whose registry does not return the object).
    Status(Value),
}

/// DELETE of one object.
pub fn delete(
    inner: &mut Inner,
    rt: &ResourceType,
    ns: &str,
    name: &str,
    opts: &DeleteOpts,
    ctx: &WriteCtx,
) -> ApiResult<Deleted> {
    let ns = if rt.namespaced { ns } else { "" };
    let Some(old) = inner.get(&rt.key(), ns, name).cloned() else {
        return Err(ApiError::not_found(rt, name));
    };
    let uid = old["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if let Some(u) = &opts.uid {
        if *u != uid {
            return Err(ApiError::conflict(
                rt,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {u}, UID in object meta: {uid}"
                ),
            ));
        }
    }
    if let Some(rv) = &opts.resource_version {
        let cur = old["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default();
        if rv != cur {
            return Err(ApiError::conflict(
                rt,
                name,
                &format!("Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {cur}"),
            ));
        }
    }
    if rt.resource == "namespaces" && ["default", "kube-system", "kube-public"].contains(&name) {
        return Err(ApiError::forbidden(format!(
            "namespaces {name:?} is forbidden: this namespace may not be deleted"
        )));
    }
    let mut obj = old.clone();
    let mut fins = finalizers(&obj);
    match opts.propagation.as_deref() {
        Some("Orphan") => {
            fins.retain(|f| f != "foregroundDeletion");
            if !fins.contains(&"orphan".to_string()) {
                fins.push("orphan".into());
            }
        }
        Some("Foreground") => {
            fins.retain(|f| f != "orphan");
            if !fins.contains(&"foregroundDeletion".to_string()) {
                fins.push("foregroundDeletion".into());
            }
        }
        Some("Background") | None => {}
        Some(other) => {
            return Err(ApiError::invalid(
                rt,
                name,
                vec![Cause::new("FieldValueNotSupported", "propagationPolicy", format!("Unsupported value: {other:?}: supported values: \"Foreground\", \"Background\", \"Orphan\", \"nil\""))],
            ))
        }
    }
    if !fins.is_empty() || !obj["metadata"]["finalizers"].is_null() {
        obj["metadata"]["finalizers"] = json!(fins);
        if fins.is_empty() {
            obj["metadata"]
                .as_object_mut()
                .unwrap()
                .remove("finalizers");
        }
    }
    let pod_grace = if rt.resource == "pods" {
        let bound = obj["spec"]["nodeName"]
            .as_str()
            .is_some_and(|n| !n.is_empty());
        let terminal = matches!(
            obj["status"]["phase"].as_str(),
            Some("Succeeded" | "Failed")
        );
        let g = opts
            .grace
            .or(obj["spec"]["terminationGracePeriodSeconds"].as_i64())
            .unwrap_or(30);
        if bound && !terminal {
            g.max(0)
        } else {
            0
        }
    } else {
        0
    };
    let already = !old["metadata"]["deletionTimestamp"].is_null();
    if rt.resource == "namespaces" {
        if !already {
            obj["metadata"]["deletionTimestamp"] = json!(now());
            obj["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            obj["status"]["phase"] = json!("Terminating");
        }
        let stored = if obj != old && !ctx.dry_run {
            inner.put(&rt.key(), ns, obj, EventType::Modified)
        } else {
            obj
        };
        inner.gc_dirty = true;
        return Ok(Deleted::Object(stored));
    }
    if !fins.is_empty() || pod_grace > 0 {
        if !already {
            let at = Utc::now() + chrono::Duration::seconds(pod_grace);
            obj["metadata"]["deletionTimestamp"] =
                json!(at.to_rfc3339_opts(SecondsFormat::Secs, true));
            obj["metadata"]["deletionGracePeriodSeconds"] = json!(pod_grace);
            if let Some(g) = old["metadata"]["generation"].as_i64() {
                obj["metadata"]["generation"] = json!(g + 1);
            }
        } else if rt.resource == "pods"
            && pod_grace
                < obj["metadata"]["deletionGracePeriodSeconds"]
                    .as_i64()
                    .unwrap_or(0)
        {
            obj["metadata"]["deletionGracePeriodSeconds"] = json!(pod_grace);
        }
        if ctx.dry_run || obj == old {
            return Ok(Deleted::Object(obj));
        }
        let stored = inner.put(&rt.key(), ns, obj, EventType::Modified);
        inner.gc_dirty = true;
        return Ok(Deleted::Object(stored));
    }
    if ctx.dry_run {
        return Ok(Deleted::Object(obj));
    }
    if obj != old {
        inner
            .objects
            .insert((rt.key(), ns.to_string(), name.to_string()), obj);
    }
    let removed = inner.remove(&rt.key(), ns, name).unwrap();
    after_remove(inner, rt, &removed);
    if rt.return_deleted_object {
        Ok(Deleted::Object(removed))
    } else {
        Ok(Deleted::Status(json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
            "details": {"name": name, "group": rt.group, "kind": rt.resource, "uid": uid},
        })))
    }
}

/// Server-side apply: creates or updates, recording `ctx.manager` as an `Apply` manager.
#[allow(clippy::too_many_arguments)]
pub fn apply(
    inner: &mut Inner,
    rt: &ResourceType,
    version: &str,
    ns: &str,
    name: &str,
    mut applied: Value,
    sub: Option<&str>,
    force: bool,
    ctx: &mut WriteCtx,
) -> ApiResult<(Value, bool)> {
    check_type(rt, version, &mut applied)?;
    match applied["metadata"]["name"].as_str() {
        Some(n) if n != name => {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({n}) does not match the name on the URL ({name})"
            )))
        }
        _ => applied["metadata"]["name"] = json!(name),
    }
    if let Some(m) = applied["metadata"].as_object_mut() {
        if m.contains_key("managedFields") {
            return Err(ApiError::bad_request("metadata.managedFields must be nil"));
        }
    }
    if ctx.validation == FieldValidation::Strict {
        // Apply builds a typed object from the configuration first: undeclared fields fail there.
        let mut probe = applied.clone();
        let mut scratch = WriteCtx {
            validation: FieldValidation::Warn,
            warnings: vec![],
            ..ctx.clone()
        };
        check_fields(rt, version, &mut probe, &mut scratch)?;
        if let Some(first) = scratch.warnings.first() {
            let field = first.trim_start_matches("unknown field ").trim_matches('"');
            return Err(ApiError::bad_request(format!(
                "failed to create typed patch object ({}{name}; {}, Kind={}): .{field}: field not declared in schema",
                if rt.namespaced { format!("{ns}/") } else { String::new() },
                rt.api_version(version),
                rt.kind
            )));
        }
    }
    let key_ns = if rt.namespaced { ns } else { "" };
    let live = inner.get(&rt.key(), key_ns, name).cloned();
    if live.is_none() && sub.is_some() {
        // A subresource of an object that does not exist.
        return Err(ApiError::not_found(rt, name));
    }
    if let Some(rv) = applied["metadata"]["resourceVersion"].as_str() {
        if live
            .as_ref()
            .is_none_or(|l| l["metadata"]["resourceVersion"] != rv)
        {
            return Err(ApiError::stale(rt, name));
        }
    }
    let (kind, schema) = shape(rt, version);
    let shape = Shape { kind, schema };
    let t = now();
    let merged = ssa::apply(live.as_ref(), &applied, shape, &ctx.manager, &rt.api_version(version), sub, force, &t).map_err(|conflicts| {
        let n = conflicts.len();
        let lines: Vec<String> = conflicts.iter().map(|c| format!("conflict with {:?} using {}: {}", c.manager, c.api_version, c.field)).collect();
        let message = if n == 1 {
            format!("Apply failed with 1 conflict: {}", lines[0])
        } else {
            format!("Apply failed with {n} conflicts: {}", lines.join("\n"))
        };
        let causes: Vec<Value> = conflicts
            .iter()
            .map(|c| json!({"reason": "FieldManagerConflict", "message": format!("conflict with {:?} using {}", c.manager, c.api_version), "field": c.field}))
            .collect();
        let mut e = ApiError::new(409, "Conflict", message);
        e.details = Some(json!({"name": name, "group": rt.group, "kind": rt.resource, "causes": causes}));
        e
    })?;
    match live {
        None => {
            let mut obj = merged;
            let managed = obj["metadata"]["managedFields"].clone();
            obj["metadata"]
                .as_object_mut()
                .unwrap()
                .remove("managedFields");
            let mut created = create_with_managed(inner, rt, version, ns, obj, managed, ctx)?;
            created = present(created, rt, version);
            Ok((created, true))
        }
        Some(_) => Ok((
            update(inner, rt, version, ns, name, merged, sub, ctx, true)?,
            false,
        )),
    }
}

fn create_with_managed(
    inner: &mut Inner,
    rt: &ResourceType,
    version: &str,
    ns: &str,
    obj: Value,
    managed: Value,
    ctx: &mut WriteCtx,
) -> ApiResult<Value> {
    let mut obj = obj;
    obj["metadata"]["managedFields"] = managed;
    create(inner, rt, version, ns, obj, ctx)
}
