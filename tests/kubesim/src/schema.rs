//! Structural-schema handling for custom resources (pruning, defaulting, validation against the
//! CRD's `openAPIV3Schema`), unknown-field detection for built-in kinds, and metadata validation.

use regex::Regex;
use serde_json::{json, Map, Value};

use crate::errors::{show, Cause};

/// What processing an object against a schema found.
#[derive(Debug, Default)]
pub struct Outcome {
    pub causes: Vec<Cause>,
    /// Fields not declared in the schema, as `spec.foo`; they have been pruned.
    pub unknown: Vec<String>,
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

/// Prunes, defaults and validates a custom object against its CRD version's schema.
pub fn process_custom(schema: &Value, obj: &mut Value) -> Outcome {
    let mut out = Outcome::default();
    let Some(map) = obj.as_object_mut() else {
        out.causes
            .push(Cause::invalid("", obj, "must be an object"));
        return out;
    };
    let props = &schema["properties"];
    let keys: Vec<String> = map.keys().cloned().collect();
    for k in keys {
        if k == "apiVersion" || k == "kind" || k == "metadata" {
            continue;
        }
        match props.get(&k) {
            Some(s) if map[&k].is_null() && s["nullable"] != true => {
                map.remove(&k);
            }
            Some(s) => walk(s, map.get_mut(&k).unwrap(), &k, &mut out, true),
            None if schema["x-kubernetes-preserve-unknown-fields"] == true => {}
            None => {
                map.remove(&k);
                out.unknown.push(k);
            }
        }
    }
    apply_defaults(schema, map);
    for r in schema["required"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r.as_str())
    {
        if !map.contains_key(r) {
            out.causes.push(Cause::required(r));
        }
    }
    out
}

fn apply_defaults(schema: &Value, map: &mut Map<String, Value>) {
    for (k, s) in schema["properties"].as_object().into_iter().flatten() {
        if !map.contains_key(k) {
            if let Some(d) = s.get("default") {
                let mut d = d.clone();
                // Defaults are themselves defaulted (as the apiserver does for nested defaults).
                if let Some(m) = d.as_object_mut() {
                    apply_defaults(s, m);
                }
                map.insert(k.clone(), d);
            }
        }
    }
}

/// Type name as the validator prints it.
fn type_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_error(path: &str, v: &Value, want: &str) -> Cause {
    Cause::new(
        "FieldValueTypeInvalid",
        path,
        format!(
            "Invalid value: {}: {path} in body must be of type {want}: {:?}",
            show(v),
            type_of(v)
        ),
    )
}

/// Prunes unknown fields (when `prune`), applies defaults and validates `v` at `path`.
fn walk(schema: &Value, v: &mut Value, path: &str, out: &mut Outcome, prune: bool) {
    if schema["x-kubernetes-int-or-string"] == true {
        if !(v.is_string() || v.is_i64() || v.is_u64()) {
            out.causes.push(type_error(path, v, "integer,string"));
        }
        return;
    }
    if v.is_null() {
        if schema["nullable"] != true && schema.get("type").is_some() {
            out.causes.push(type_error(
                path,
                v,
                schema["type"].as_str().unwrap_or("object"),
            ));
        }
        return;
    }
    let ty = schema["type"].as_str().unwrap_or("");
    match ty {
        "object" => {
            let Some(map) = v.as_object_mut() else {
                out.causes.push(type_error(path, v, "object"));
                return;
            };
            let props = &schema["properties"];
            let addl = &schema["additionalProperties"];
            let preserve = schema["x-kubernetes-preserve-unknown-fields"] == true;
            let embedded = schema["x-kubernetes-embedded-resource"] == true;
            let keys: Vec<String> = map.keys().cloned().collect();
            for k in keys {
                let child_path = join(path, &k);
                // A null for a field that is not nullable is dropped before defaulting.
                if map[&k].is_null()
                    && props
                        .get(&k)
                        .or(addl.as_object().map(|_| addl))
                        .is_some_and(|s| s["nullable"] != true)
                {
                    map.remove(&k);
                    continue;
                }
                if let Some(s) = props.get(&k) {
                    walk(s, map.get_mut(&k).unwrap(), &child_path, out, prune);
                } else if addl.is_object() {
                    walk(addl, map.get_mut(&k).unwrap(), &child_path, out, prune);
                } else if preserve
                    || *addl == true
                    || (embedded && ["apiVersion", "kind", "metadata"].contains(&k.as_str()))
                {
                } else if prune {
                    map.remove(&k);
                    out.unknown.push(child_path);
                }
            }
            apply_defaults(schema, map);
            for r in schema["required"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r.as_str())
            {
                if !map.contains_key(r) {
                    out.causes.push(Cause::required(join(path, r)));
                }
            }
            if let Some(n) = schema["maxProperties"].as_u64() {
                if map.len() as u64 > n {
                    out.causes.push(Cause::new(
                        "FieldValueTooMany",
                        path,
                        format!("Too many: {}: must have at most {n} items", map.len()),
                    ));
                }
            }
            if let Some(n) = schema["minProperties"].as_u64() {
                if (map.len() as u64) < n {
                    out.causes.push(Cause::invalid(
                        path,
                        &json!(map.len()),
                        format!("{path} in body should have at least {n} properties"),
                    ));
                }
            }
        }
        "array" => {
            let Some(items) = v.as_array_mut() else {
                out.causes.push(type_error(path, v, "array"));
                return;
            };
            if let Some(n) = schema["maxItems"].as_u64() {
                if items.len() as u64 > n {
                    out.causes.push(Cause::new(
                        "FieldValueTooMany",
                        path,
                        format!("Too many: {}: must have at most {n} items", items.len()),
                    ));
                }
            }
            if let Some(n) = schema["minItems"].as_u64() {
                if (items.len() as u64) < n {
                    out.causes.push(Cause::invalid(
                        path,
                        &json!(items.len()),
                        format!("{path} in body should have at least {n} items"),
                    ));
                }
            }
            let item_schema = &schema["items"];
            for (i, item) in items.iter_mut().enumerate() {
                if item_schema.is_object() {
                    walk(item_schema, item, &format!("{path}[{i}]"), out, prune);
                }
            }
            if schema["x-kubernetes-list-type"] == "set" {
                for i in 0..items.len() {
                    if items[..i].contains(&items[i]) {
                        out.causes.push(Cause::new(
                            "FieldValueDuplicate",
                            format!("{path}[{i}]"),
                            format!("Duplicate value: {}", show(&items[i])),
                        ));
                    }
                }
            }
            if schema["x-kubernetes-list-type"] == "map" {
                let keys: Vec<&str> = schema["x-kubernetes-list-map-keys"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|k| k.as_str())
                    .collect();
                for i in 0..items.len() {
                    let key_of = |x: &Value| keys.iter().map(|k| x[*k].clone()).collect::<Vec<_>>();
                    if items[..i].iter().any(|o| key_of(o) == key_of(&items[i])) {
                        let key: Map<String, Value> = keys
                            .iter()
                            .map(|k| (k.to_string(), items[i][*k].clone()))
                            .collect();
                        out.causes.push(Cause::new(
                            "FieldValueDuplicate",
                            format!("{path}[{i}]"),
                            format!("Duplicate value: {}", Value::Object(key)),
                        ));
                    }
                }
            }
        }
        "string" => {
            let Some(s) = v.as_str() else {
                out.causes.push(type_error(path, v, "string"));
                return;
            };
            let len = s.chars().count() as u64;
            if let Some(n) = schema["maxLength"].as_u64() {
                if len > n {
                    out.causes.push(Cause::new(
                        "FieldValueTooLong",
                        path,
                        format!("Too long: may not be more than {n} bytes"),
                    ));
                }
            }
            if let Some(n) = schema["minLength"].as_u64() {
                if len < n {
                    out.causes.push(Cause::invalid(
                        path,
                        v,
                        format!("{path} in body should be at least {n} chars long"),
                    ));
                }
            }
            if let Some(p) = schema["pattern"].as_str() {
                if let Ok(re) = Regex::new(p) {
                    if !re.is_match(s) {
                        out.causes.push(Cause::invalid(
                            path,
                            v,
                            format!("{path} in body should match '{p}'"),
                        ));
                    }
                }
            }
            if schema["format"] == "date-time" && chrono::DateTime::parse_from_rfc3339(s).is_err() {
                out.causes.push(Cause::invalid(
                    path,
                    v,
                    format!("{path} in body must be of type date-time: {s:?}"),
                ));
            }
        }
        "integer" => {
            if !(v.is_i64() || v.is_u64()) {
                out.causes.push(type_error(path, v, "integer"));
                return;
            }
            bounds(schema, v, path, out);
        }
        "number" => {
            if !v.is_number() {
                out.causes.push(type_error(path, v, "number"));
                return;
            }
            bounds(schema, v, path, out);
        }
        "boolean" if !v.is_boolean() => {
            out.causes.push(type_error(path, v, "boolean"));
            return;
        }
        _ => {}
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(v) {
            let list: Vec<String> = allowed.iter().map(show).collect();
            out.causes.push(Cause::new(
                "FieldValueNotSupported",
                path,
                format!(
                    "Unsupported value: {}: supported values: {}",
                    show(v),
                    list.join(", ")
                ),
            ));
        }
    }
    for (keyword, need) in [("allOf", 0usize), ("anyOf", 1), ("oneOf", 1)] {
        let Some(branches) = schema[keyword].as_array() else {
            continue;
        };
        let passing = branches
            .iter()
            .filter(|b| {
                let mut scratch = Outcome::default();
                walk(b, &mut v.clone(), path, &mut scratch, false);
                scratch.causes.is_empty()
            })
            .count();
        let ok = match keyword {
            "allOf" => passing == branches.len(),
            "anyOf" => passing >= need,
            _ => passing == need,
        };
        if !ok {
            let what = match keyword {
                "allOf" => "must validate all the schemas (allOf)",
                "anyOf" => "must validate at least one schema (anyOf)",
                _ => "must validate one and only one schema (oneOf)",
            };
            out.causes
                .push(Cause::invalid(path, v, format!("{path} in body {what}")));
        }
    }
    if schema["not"].is_object() {
        let mut scratch = Outcome::default();
        walk(&schema["not"], &mut v.clone(), path, &mut scratch, false);
        if scratch.causes.is_empty() {
            out.causes.push(Cause::invalid(
                path,
                v,
                format!("{path} in body must not validate the schema (not)"),
            ));
        }
    }
}

fn bounds(schema: &Value, v: &Value, path: &str, out: &mut Outcome) {
    let x = v.as_f64().unwrap_or_default();
    if let Some(m) = schema["minimum"].as_f64() {
        let excl = schema["exclusiveMinimum"] == true;
        if x < m || (excl && x == m) {
            let rel = if excl {
                "greater than"
            } else {
                "greater than or equal to"
            };
            out.causes.push(Cause::invalid(
                path,
                v,
                format!("{path} in body should be {rel} {}", schema["minimum"]),
            ));
        }
    }
    if let Some(m) = schema["maximum"].as_f64() {
        let excl = schema["exclusiveMaximum"] == true;
        if x > m || (excl && x == m) {
            let rel = if excl {
                "less than"
            } else {
                "less than or equal to"
            };
            out.causes.push(Cause::invalid(
                path,
                v,
                format!("{path} in body should be {rel} {}", schema["maximum"]),
            ));
        }
    }
    if let Some(m) = schema["multipleOf"].as_f64() {
        if m != 0.0 && (x / m).fract() != 0.0 {
            out.causes.push(Cause::invalid(
                path,
                v,
                format!(
                    "{path} in body should be a multiple of {}",
                    schema["multipleOf"]
                ),
            ));
        }
    }
}

/// Known fields of the built-in kinds: `"*"` accepts anything below, `[shape]` is a list of shape.
fn builtin_shape(kind: &str) -> Value {
    let any = json!("*");
    let container = json!({
        "name": any, "image": any, "command": any, "args": any, "workingDir": any, "ports": any,
        "envFrom": any, "env": any, "resources": any, "resizePolicy": any, "restartPolicy": any,
        "volumeMounts": any, "volumeDevices": any, "livenessProbe": any, "readinessProbe": any,
        "startupProbe": any, "lifecycle": any, "terminationMessagePath": any,
        "terminationMessagePolicy": any, "imagePullPolicy": any, "securityContext": any,
        "stdin": any, "stdinOnce": any, "tty": any,
    });
    let pod_spec = json!({
        "volumes": any, "initContainers": [container], "containers": [container],
        "ephemeralContainers": any, "restartPolicy": any, "terminationGracePeriodSeconds": any,
        "activeDeadlineSeconds": any, "dnsPolicy": any, "nodeSelector": any,
        "serviceAccountName": any, "serviceAccount": any, "automountServiceAccountToken": any,
        "nodeName": any, "hostNetwork": any, "hostPID": any, "hostIPC": any,
        "shareProcessNamespace": any, "securityContext": any, "imagePullSecrets": any,
        "hostname": any, "subdomain": any, "affinity": any, "schedulerName": any,
        "tolerations": any, "hostAliases": any, "priorityClassName": any, "priority": any,
        "dnsConfig": any, "readinessGates": any, "runtimeClassName": any,
        "enableServiceLinks": any, "preemptionPolicy": any, "overhead": any,
        "topologySpreadConstraints": any, "setHostnameAsFQDN": any, "os": any, "hostUsers": any,
        "schedulingGates": any, "resourceClaims": any, "resources": any,
    });
    let body = match kind {
        "Pod" => json!({"spec": pod_spec, "status": any}),
        "ConfigMap" => json!({"data": any, "binaryData": any, "immutable": any}),
        "Secret" => json!({"data": any, "stringData": any, "type": any, "immutable": any}),
        "Event" => json!({
            "involvedObject": any, "reason": any, "message": any, "source": any,
            "firstTimestamp": any, "lastTimestamp": any, "count": any, "type": any,
            "eventTime": any, "series": any, "action": any, "related": any,
            "reportingComponent": any, "reportingInstance": any,
        }),
        "ServiceAccount" => {
            json!({"secrets": any, "imagePullSecrets": any, "automountServiceAccountToken": any})
        }
        "NetworkPolicy" => {
            json!({"spec": {"podSelector": any, "ingress": any, "egress": any, "policyTypes": any}, "status": any})
        }
        "Lease" => json!({"spec": {
            "holderIdentity": any, "leaseDurationSeconds": any, "acquireTime": any, "renewTime": any,
            "leaseTransitions": any, "strategy": any, "preferredHolder": any,
        }}),
        "RuntimeClass" => json!({"handler": any, "overhead": any, "scheduling": any}),
        _ => json!({"spec": any, "status": any}),
    };
    let mut body = body;
    body["apiVersion"] = any.clone();
    body["kind"] = any;
    body["metadata"] = object_meta_shape();
    body
}

fn object_meta_shape() -> Value {
    let any = json!("*");
    json!({
        "name": any, "generateName": any, "namespace": any, "selfLink": any, "uid": any,
        "resourceVersion": any, "generation": any, "creationTimestamp": any,
        "deletionTimestamp": any, "deletionGracePeriodSeconds": any, "labels": any,
        "annotations": any, "ownerReferences": any, "finalizers": any, "managedFields": any,
    })
}

fn unknown_in(shape: &Value, v: &Value, path: &str, out: &mut Vec<String>) {
    match (shape, v) {
        (Value::Object(fields), Value::Object(m)) => {
            for (k, child) in m {
                let p = join(path, k);
                match fields.get(k) {
                    Some(s) => unknown_in(s, child, &p, out),
                    None => out.push(p),
                }
            }
        }
        (Value::Array(s), Value::Array(items)) if !s.is_empty() => {
            for (i, item) in items.iter().enumerate() {
                unknown_in(&s[0], item, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// Fields of a built-in object that its kind does not have.
pub fn unknown_builtin_fields(kind: &str, obj: &Value) -> Vec<String> {
    let mut out = vec![];
    unknown_in(&builtin_shape(kind), obj, "", &mut out);
    out
}

/// Unknown fields in `metadata` (custom objects: the rest is the schema's business).
pub fn unknown_meta_fields(obj: &Value) -> Vec<String> {
    let mut out = vec![];
    unknown_in(&object_meta_shape(), &obj["metadata"], "metadata", &mut out);
    out
}

const DNS1123_LABEL: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
const DNS1123_SUBDOMAIN: &str =
    "^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// Validates the name (a DNS-1123 subdomain, or label for namespaces), labels and annotations.
pub fn validate_meta(obj: &Value, label_name: bool) -> Vec<Cause> {
    let mut causes = vec![];
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    if name.is_empty() {
        causes.push(Cause::new(
            "FieldValueRequired",
            "metadata.name",
            "Required value: name or generateName is required",
        ));
    } else if label_name {
        if name.len() > 63 || !Regex::new(DNS1123_LABEL).unwrap().is_match(name) {
            causes.push(Cause::invalid(
                "metadata.name",
                &json!(name),
                "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')",
            ));
        }
    } else if name.len() > 253 || !Regex::new(DNS1123_SUBDOMAIN).unwrap().is_match(name) {
        causes.push(Cause::invalid(
            "metadata.name",
            &json!(name),
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')",
        ));
    }
    let value_re = Regex::new("^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$").unwrap();
    let name_re = Regex::new("^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$").unwrap();
    let key_ok = |k: &str| {
        let (prefix, n) = match k.rsplit_once('/') {
            Some((p, n)) => (Some(p), n),
            None => (None, k),
        };
        n.len() <= 63
            && name_re.is_match(n)
            && prefix.is_none_or(|p| {
                !p.is_empty()
                    && p.len() <= 253
                    && Regex::new(DNS1123_SUBDOMAIN).unwrap().is_match(p)
            })
    };
    for (section, check_values) in [("labels", true), ("annotations", false)] {
        let Some(m) = obj["metadata"][section].as_object() else {
            if !obj["metadata"][section].is_null() {
                causes.push(Cause::invalid(
                    format!("metadata.{section}"),
                    &obj["metadata"][section],
                    "must be a map of strings",
                ));
            }
            continue;
        };
        for (k, v) in m {
            if !key_ok(k) {
                causes.push(Cause::invalid(
                    format!("metadata.{section}"),
                    &json!(k),
                    "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')",
                ));
            }
            match v.as_str() {
                Some(s) if check_values && (s.len() > 63 || !value_re.is_match(s)) => causes.push(Cause::invalid(
                    "metadata.labels",
                    v,
                    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')",
                )),
                Some(_) => {}
                None => causes.push(type_error(&format!("metadata.{section}.{k}"), v, "string")),
            }
        }
    }
    causes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Value {
        json!({"type": "object", "properties": {
            "spec": {"type": "object", "required": ["language"], "properties": {
                "language": {"type": "string", "enum": ["python", "r"]},
                "timeout": {"type": "integer", "minimum": 1, "default": 30},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
            }},
            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
        }})
    }

    #[test]
    fn prunes_defaults_and_validates() {
        let mut o = json!({"apiVersion": "a/v1", "kind": "K", "metadata": {"name": "x"},
            "spec": {"language": "python", "bogus": 1, "labels": {"a": "b"}, "free": {"x": {"y": 1}}}});
        let out = process_custom(&schema(), &mut o);
        assert!(out.causes.is_empty(), "{:?}", out.causes);
        assert_eq!(out.unknown, vec!["spec.bogus".to_string()]);
        assert_eq!(o["spec"]["timeout"], 30);
        assert_eq!(o["spec"]["free"]["x"]["y"], 1);
        assert!(o["spec"].get("bogus").is_none());

        let mut bad = json!({"spec": {"language": "ruby", "timeout": 0, "labels": {"a": 1}}});
        let texts: Vec<String> = process_custom(&schema(), &mut bad)
            .causes
            .iter()
            .map(Cause::text)
            .collect();
        assert_eq!(texts, vec![
            "spec.labels.a: Invalid value: 1: spec.labels.a in body must be of type string: \"integer\"",
            "spec.language: Unsupported value: \"ruby\": supported values: \"python\", \"r\"",
            "spec.timeout: Invalid value: 0: spec.timeout in body should be greater than or equal to 1",
        ]);
        let mut nulls = json!({"spec": {"language": "r", "timeout": null}, "status": null});
        assert!(process_custom(&schema(), &mut nulls).causes.is_empty());
        assert_eq!(nulls, json!({"spec": {"language": "r", "timeout": 30}}));
        let mut missing = json!({"spec": {}});
        let texts: Vec<String> = process_custom(&schema(), &mut missing)
            .causes
            .iter()
            .map(Cause::text)
            .collect();
        assert_eq!(texts, vec!["spec.language: Required value"]);
    }

    #[test]
    fn builtin_unknown_fields() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "bogus": 1},
            "spec": {"containers": [{"name": "c", "image": "i", "imagee": "typo"}], "nodeName": "n"}});
        assert_eq!(
            unknown_builtin_fields("Pod", &pod),
            vec!["metadata.bogus", "spec.containers[0].imagee"]
        );
    }

    #[test]
    fn names_and_labels() {
        assert!(validate_meta(&json!({"metadata": {"name": "ok-name.x"}}), false).is_empty());
        assert_eq!(
            validate_meta(&json!({"metadata": {"name": "Bad_Name"}}), false).len(),
            1
        );
        assert_eq!(
            validate_meta(&json!({"metadata": {"name": "a.b"}}), true).len(),
            1
        );
        assert_eq!(
            validate_meta(
                &json!({"metadata": {"name": "a", "labels": {"k": "bad value"}}}),
                false
            )
            .len(),
            1
        );
    }
}
