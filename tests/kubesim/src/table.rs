//! The `Table` format (`application/json;as=Table;v=v1;g=meta.k8s.io`) that `kubectl get` asks for:
//! the built-in kinds' printer columns and a CRD's `additionalPrinterColumns`.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::registry::ResourceType;
use crate::selectors::jsonpath;

/// What each row carries in `object` (`includeObject`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Include {
    None,
    Metadata,
    Object,
}

/// `duration.HumanDuration` of apimachinery: `45s`, `3m12s`, `5h`, `12d`, `2y30d`.
pub fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    let s = secs.max(0);
    if s < 120 {
        return format!("{s}s");
    }
    let m = s / 60;
    if m < 10 {
        return if s % 60 == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{}s", s % 60)
        };
    }
    if m < 180 {
        return format!("{m}m");
    }
    let h = m / 60;
    if h < 8 {
        return if m % 60 == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{}m", m % 60)
        };
    }
    if h < 48 {
        return format!("{h}h");
    }
    if h < 24 * 8 {
        return if h % 24 == 0 {
            format!("{}d", h / 24)
        } else {
            format!("{}d{}h", h / 24, h % 24)
        };
    }
    if h < 24 * 365 * 2 {
        return format!("{}d", h / 24);
    }
    if h < 24 * 365 * 8 {
        let dy = (h / 24) % 365;
        return if dy == 0 {
            format!("{}y", h / 24 / 365)
        } else {
            format!("{}y{dy}d", h / 24 / 365)
        };
    }
    format!("{}y", h / 24 / 365)
}

fn age(ts: &Value) -> Value {
    match ts
        .as_str()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
    {
        Some(t) => json!(human_duration(
            (Utc::now() - t.with_timezone(&Utc)).num_seconds()
        )),
        None => json!("<unknown>"),
    }
}

fn col(name: &str, ty: &str, format: &str, description: &str, priority: i64) -> Value {
    json!({"name": name, "type": ty, "format": format, "description": description, "priority": priority})
}

fn name_col() -> Value {
    col("Name", "string", "name", "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names", 0)
}

fn age_col() -> Value {
    col("Age", "string", "", "CreationTimestamp is a timestamp representing the server time when this object was created. It is not guaranteed to be set in happens-before order across separate operations. Clients may not set this value. It is represented in RFC3339 form and is in UTC.\n\nPopulated by the system. Read-only. Null for lists. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata", 0)
}

/// Column definitions for a resource served in `version`.
pub fn columns(rt: &ResourceType, version: &str) -> Vec<Value> {
    if let Some(v) = rt.crd_version(version) {
        let mut cols = vec![name_col()];
        match v["additionalPrinterColumns"].as_array() {
            Some(extra) if !extra.is_empty() => {
                for c in extra {
                    cols.push(col(
                        c["name"].as_str().unwrap_or_default(),
                        c["type"].as_str().unwrap_or("string"),
                        c["format"].as_str().unwrap_or_default(),
                        c["description"].as_str().unwrap_or_default(),
                        c["priority"].as_i64().unwrap_or(0),
                    ));
                }
            }
            _ => cols.push(age_col()),
        }
        return cols;
    }
    let s = |n: &str, d: &str| col(n, "string", "", d, 0);
    let mut cols = vec![name_col()];
    match rt.resource.as_str() {
        "pods" => {
            cols.extend([
                s("Ready", "The aggregate readiness state of this pod for accepting traffic."),
                s("Status", "The aggregate status of the containers in this pod."),
                s("Restarts", "The number of times the containers in this pod have been restarted and when the last container in this pod has restarted."),
                age_col(),
                col("IP", "string", "", "IP address allocated to the pod. Routable at least within the cluster. Empty if not yet allocated.", 1),
                col("Node", "string", "", "NodeName is a request to schedule this pod onto a specific node.", 1),
            ]);
            return cols;
        }
        "namespaces" => cols.push(s("Status", "The status of the namespace")),
        "configmaps" => cols.push(col(
            "Data",
            "integer",
            "",
            "Data contains the configuration data.",
            0,
        )),
        "secrets" => cols.extend([
            s("Type", "The type of the secret"),
            col("Data", "integer", "", "The number of data fields", 0),
        ]),
        "serviceaccounts" => cols.push(col(
            "Secrets",
            "integer",
            "",
            "Secrets is a list of the secrets in the same namespace.",
            0,
        )),
        "networkpolicies" => cols.push(s(
            "Pod-Selector",
            "Selects the pods to which this NetworkPolicy object applies.",
        )),
        "leases" => cols.push(s("Holder", "The holder of the lease")),
        "runtimeclasses" => cols.push(s(
            "Handler",
            "The name of the underlying runtime and configuration.",
        )),
        "nodes" => cols.extend([
            s("Status", "The status of the node"),
            s("Roles", "The roles of the node"),
            age_col(),
            s("Version", "Kubelet Version reported by the node."),
        ]),
        "events" => {
            return vec![
                s("Last Seen", "The time of the last occurrence"),
                s("Type", "Type of this event"),
                s("Reason", "Short, machine understandable string"),
                s("Object", "The object this Event is about"),
                s(
                    "Message",
                    "A human-readable description of the status of this operation.",
                ),
            ]
        }
        "customresourcedefinitions" => {
            cols.push(col("Created At", "date", "", "", 0));
            return cols;
        }
        _ => {}
    }
    if rt.resource != "nodes" {
        cols.push(age_col());
    }
    cols
}

fn pod_cells(o: &Value) -> Vec<Value> {
    let statuses = o["status"]["containerStatuses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let total = o["spec"]["containers"].as_array().map_or(0, |c| c.len());
    let ready = statuses.iter().filter(|s| s["ready"] == true).count();
    let restarts: i64 = statuses
        .iter()
        .map(|s| s["restartCount"].as_i64().unwrap_or(0))
        .sum();
    // The logic of kubectl's (server-side) pod printer.
    let mut reason = o["status"]["reason"]
        .as_str()
        .or(o["status"]["phase"].as_str())
        .unwrap_or("Pending")
        .to_string();
    let mut running = false;
    for s in statuses.iter().rev() {
        if let Some(r) = s["state"]["waiting"]["reason"]
            .as_str()
            .filter(|r| !r.is_empty())
        {
            reason = r.to_string();
        } else if let Some(r) = s["state"]["terminated"]["reason"]
            .as_str()
            .filter(|r| !r.is_empty())
        {
            reason = r.to_string();
        } else if s["state"]["terminated"].is_object() {
            let t = &s["state"]["terminated"];
            reason = match t["signal"].as_i64() {
                Some(sig) if sig != 0 => format!("Signal:{sig}"),
                _ => format!("ExitCode:{}", t["exitCode"].as_i64().unwrap_or(0)),
            };
        } else if s["ready"] == true && s["state"]["running"].is_object() {
            running = true;
        }
    }
    if reason == "Completed" && running {
        reason = "Running".into();
    }
    if !o["metadata"]["deletionTimestamp"].is_null()
        && !matches!(o["status"]["phase"].as_str(), Some("Succeeded" | "Failed"))
    {
        reason = "Terminating".into();
    }
    vec![
        json!(format!("{ready}/{total}")),
        json!(reason),
        json!(restarts),
        age(&o["metadata"]["creationTimestamp"]),
        json!(o["status"]["podIP"].as_str().unwrap_or("<none>")),
        json!(o["spec"]["nodeName"].as_str().unwrap_or("<none>")),
    ]
}

fn cells(rt: &ResourceType, version: &str, o: &Value) -> Vec<Value> {
    let name = o["metadata"]["name"].clone();
    if let Some(v) = rt.crd_version(version) {
        let mut out = vec![name];
        match v["additionalPrinterColumns"].as_array() {
            Some(extra) if !extra.is_empty() => {
                for c in extra {
                    let found = jsonpath(o, c["jsonPath"].as_str().unwrap_or_default());
                    let cell = match found.first() {
                        None => Value::Null,
                        Some(v) if c["type"] == "date" => age(v),
                        Some(_) if found.len() > 1 => {
                            json!(found.iter().map(|x| plain(x)).collect::<Vec<_>>().join(","))
                        }
                        Some(v) if c["type"] == "string" && !v.is_string() => json!(plain(v)),
                        Some(v) => (*v).clone(),
                    };
                    out.push(cell);
                }
            }
            _ => out.push(age(&o["metadata"]["creationTimestamp"])),
        }
        return out;
    }
    let created = age(&o["metadata"]["creationTimestamp"]);
    let count = |v: &Value| {
        json!(v.as_object().map_or(0, |m| m.len()) + v.as_array().map_or(0, |a| a.len()))
    };
    let mut out = vec![name];
    match rt.resource.as_str() {
        "pods" => {
            out.extend(pod_cells(o));
            return out;
        }
        "namespaces" => out.push(o["status"]["phase"].clone()),
        "configmaps" => out.push(json!(
            count(&o["data"]).as_u64().unwrap_or(0) + count(&o["binaryData"]).as_u64().unwrap_or(0)
        )),
        "secrets" => out.extend([o["type"].clone(), count(&o["data"])]),
        "serviceaccounts" => out.push(count(&o["secrets"])),
        "networkpolicies" => {
            let sel = &o["spec"]["podSelector"]["matchLabels"];
            let s: Vec<String> = sel
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| format!("{k}={}", plain(v)))
                .collect();
            out.push(json!(if s.is_empty() {
                "<none>".to_string()
            } else {
                s.join(",")
            }));
        }
        "leases" => out.push(json!(o["spec"]["holderIdentity"]
            .as_str()
            .unwrap_or_default())),
        "runtimeclasses" => out.push(o["handler"].clone()),
        "nodes" => {
            out.extend([
                json!("Ready"),
                json!("<none>"),
                created,
                json!(o["status"]["nodeInfo"]["kubeletVersion"]
                    .as_str()
                    .unwrap_or("")),
            ]);
            return out;
        }
        "events" => {
            let last = if o["lastTimestamp"].is_string() {
                &o["lastTimestamp"]
            } else {
                &o["eventTime"]
            };
            let io = if o["involvedObject"].is_object() {
                &o["involvedObject"]
            } else {
                &o["regarding"]
            };
            return vec![
                age(last),
                o["type"].clone(),
                o["reason"].clone(),
                json!(format!(
                    "{}/{}",
                    io["kind"].as_str().unwrap_or_default().to_lowercase(),
                    io["name"].as_str().unwrap_or_default()
                )),
                if o["message"].is_null() {
                    o["note"].clone()
                } else {
                    o["message"].clone()
                },
            ];
        }
        "customresourcedefinitions" => {
            out.push(o["metadata"]["creationTimestamp"].clone());
            return out;
        }
        _ => {}
    }
    out.push(created);
    out
}

fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn row_object(o: &Value, include: Include) -> Option<Value> {
    match include {
        Include::None => None,
        Include::Object => Some(o.clone()),
        Include::Metadata => Some(
            json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]}),
        ),
    }
}

/// A `Table` of `objects`; `headers: false` leaves out the column definitions (watch events after
/// the first).
pub fn table(
    rt: &ResourceType,
    version: &str,
    objects: &[Value],
    include: Include,
    headers: bool,
    list_meta: Value,
) -> Value {
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let mut r = json!({"cells": cells(rt, version, o)});
            if let Some(obj) = row_object(o, include) {
                r["object"] = obj;
            }
            r
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "columnDefinitions": if headers { Value::Array(columns(rt, version)) } else { json!([]) },
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations() {
        for (s, want) in [
            (5, "5s"),
            (119, "119s"),
            (192, "3m12s"),
            (600, "10m"),
            (3 * 3600 + 60, "3h1m"),
            (30 * 3600, "30h"),
            (3 * 86400 + 3600, "3d1h"),
            (40 * 86400, "40d"),
        ] {
            assert_eq!(human_duration(s), want);
        }
    }
}
