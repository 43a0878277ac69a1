//! JSON merge patch (RFC 7386), JSON patch (RFC 6902) and strategic merge patch for built-ins.

use serde_json::{Map, Value};

/// The merge key of a list field of a built-in kind (its `patchMergeKey`), which is also the key of
/// the associative list in server-side apply. `None`: the list is atomic.
pub fn merge_key(kind: Option<&str>, field: &str) -> Option<&'static str> {
    match field {
        "ownerReferences" => return Some("uid"),
        "conditions" => return Some("type"),
        _ => {}
    }
    if kind != Some("Pod") {
        return None;
    }
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "resourceClaims"
        | "readinessGates" => {
            if field == "readinessGates" {
                "conditionType"
            } else {
                "name"
            }
        }
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "ports" => "containerPort",
        "hostAliases" => "ip",
        _ => return None,
    })
}

/// Lists of scalars that strategic merge patch and apply treat as sets.
pub fn is_set_list(field: &str) -> bool {
    field == "finalizers"
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().unwrap();
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// Applies an RFC 6902 JSON patch; the error is the message the apiserver would give.
pub fn json_patch(target: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops
        .as_array()
        .ok_or("json patch must be an array of operations")?;
    for op in ops {
        let path = op["path"]
            .as_str()
            .ok_or("missing path in json patch operation")?;
        match op["op"].as_str().unwrap_or_default() {
            "add" => add(
                target,
                path,
                op.get("value").ok_or("missing value")?.clone(),
            )?,
            "remove" => {
                remove(target, path)?;
            }
            "replace" => {
                let slot = pointer_mut(target, path).ok_or_else(|| {
                    format!("replace operation does not apply: doc is missing key: {path}")
                })?;
                *slot = op.get("value").ok_or("missing value")?.clone();
            }
            "move" => {
                let from = op["from"].as_str().ok_or("missing from")?;
                let v = remove(target, from)?;
                add(target, path, v)?;
            }
            "copy" => {
                let from = op["from"].as_str().ok_or("missing from")?;
                let v = target
                    .pointer(from)
                    .ok_or_else(|| {
                        format!("copy operation does not apply: doc is missing from path: {from}")
                    })?
                    .clone();
                add(target, path, v)?;
            }
            "test" => {
                // A missing member tests equal to null (as kube-apiserver's JSON patch does).
                let got = target.pointer(path).unwrap_or(&Value::Null);
                if Some(got) != op.get("value") {
                    return Err(format!("testing value {path} failed: test failed"));
                }
            }
            other => return Err(format!("Unexpected kind: {other}")),
        }
    }
    Ok(())
}

fn unescape(s: &str) -> String {
    s.replace("~1", "/").replace("~0", "~")
}

fn pointer_mut<'a>(target: &'a mut Value, path: &str) -> Option<&'a mut Value> {
    if path.is_empty() {
        return Some(target);
    }
    target.pointer_mut(path)
}

fn split(path: &str) -> Result<(&str, String), String> {
    let i = path
        .rfind('/')
        .ok_or_else(|| format!("invalid path {path:?}"))?;
    Ok((&path[..i], unescape(&path[i + 1..])))
}

fn add(target: &mut Value, path: &str, v: Value) -> Result<(), String> {
    if path.is_empty() {
        *target = v;
        return Ok(());
    }
    let (parent, last) = split(path)?;
    let p = pointer_mut(target, parent)
        .ok_or_else(|| format!("add operation does not apply: doc is missing path: {path:?}"))?;
    match p {
        Value::Object(m) => {
            m.insert(last, v);
        }
        Value::Array(a) => {
            if last == "-" {
                a.push(v);
            } else {
                let i: usize = last
                    .parse()
                    .map_err(|_| format!("invalid array index {last:?}"))?;
                if i > a.len() {
                    return Err(format!(
                        "add operation does not apply: index {i} out of bounds"
                    ));
                }
                a.insert(i, v);
            }
        }
        _ => {
            return Err(format!(
                "add operation does not apply: doc is missing path: {path:?}"
            ))
        }
    }
    Ok(())
}

fn remove(target: &mut Value, path: &str) -> Result<Value, String> {
    let (parent, last) = split(path)?;
    let missing = || format!("remove operation does not apply: doc is missing path: {path:?}");
    match pointer_mut(target, parent).ok_or_else(missing)? {
        Value::Object(m) => m.remove(&last).ok_or_else(missing),
        Value::Array(a) => {
            let i: usize = last.parse().map_err(|_| missing())?;
            if i >= a.len() {
                return Err(missing());
            }
            Ok(a.remove(i))
        }
        _ => Err(missing()),
    }
}

/// Strategic merge patch for a built-in `kind`: maps merge, lists with a merge key merge by it,
/// `finalizers` merge as a set, other lists are replaced; honours `$patch`, `$retainKeys`,
/// `$deleteFromPrimitiveList/…` and ignores `$setElementOrder/…`.
pub fn strategic_merge(target: &mut Value, patch: &Value, kind: &str) {
    smp(target, patch, Some(kind));
}

fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(
            a.iter()
                .filter(|x| x.get("$patch").is_none() || x.as_object().is_some_and(|o| o.len() > 1))
                .map(strip_directives)
                .collect(),
        ),
        other => other.clone(),
    }
}

fn smp(target: &mut Value, patch: &Value, kind: Option<&str>) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    match p.get("$patch").and_then(|d| d.as_str()) {
        Some("replace") => {
            *target = strip_directives(patch);
            return;
        }
        Some("delete") => {
            *target = Value::Object(Map::new());
            return;
        }
        _ => {}
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().unwrap();
    if let Some(keep) = p.get("$retainKeys").and_then(|k| k.as_array()) {
        t.retain(|k, _| keep.iter().any(|x| x == k));
    }
    for (k, v) in p {
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Some(del)) = (t.get_mut(field), v.as_array()) {
                list.retain(|x| !del.contains(x));
            }
            continue;
        }
        if k.starts_with('$') {
            continue;
        }
        if v.is_null() {
            t.remove(k);
            continue;
        }
        match (t.get_mut(k), v) {
            (Some(cur @ Value::Object(_)), Value::Object(_)) => smp(cur, v, kind),
            (Some(Value::Array(cur)), Value::Array(items)) => {
                if items
                    .iter()
                    .any(|i| i.get("$patch").and_then(|d| d.as_str()) == Some("replace"))
                {
                    *cur = items
                        .iter()
                        .filter(|i| i.get("$patch").is_none())
                        .map(strip_directives)
                        .collect();
                } else if let Some(key) = merge_key(kind, k) {
                    merge_list(cur, items, key, kind);
                } else if is_set_list(k) {
                    for i in items {
                        if !cur.contains(i) {
                            cur.push(i.clone());
                        }
                    }
                } else {
                    *cur = items.iter().map(strip_directives).collect();
                }
            }
            _ => {
                t.insert(k.clone(), strip_directives(v));
            }
        }
    }
}

fn merge_list(cur: &mut Vec<Value>, items: &[Value], key: &str, kind: Option<&str>) {
    for item in items {
        let pos = cur
            .iter()
            .position(|c| c.get(key).is_some() && c.get(key) == item.get(key));
        if item.get("$patch").and_then(|d| d.as_str()) == Some("delete") {
            if let Some(i) = pos {
                cur.remove(i);
            }
            continue;
        }
        match pos {
            Some(i) => smp(&mut cur[i], item, kind),
            None => cur.push(strip_directives(item)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_removes_nulls() {
        let mut t = json!({"a": 1, "b": {"c": 2, "d": 3}, "l": [1, 2]});
        merge_patch(&mut t, &json!({"a": null, "b": {"c": 5}, "l": [3]}));
        assert_eq!(t, json!({"b": {"c": 5, "d": 3}, "l": [3]}));
    }

    #[test]
    fn json_patch_ops() {
        let mut t = json!({"metadata": {"labels": {"a/b": "1"}}, "l": [1, 2]});
        json_patch(
            &mut t,
            &json!([
                {"op": "test", "path": "/l/0", "value": 1},
                {"op": "add", "path": "/l/-", "value": 3},
                {"op": "remove", "path": "/metadata/labels/a~1b"},
                {"op": "replace", "path": "/l/0", "value": 9},
            ]),
        )
        .unwrap();
        assert_eq!(t, json!({"metadata": {"labels": {}}, "l": [9, 2, 3]}));
        assert!(json_patch(&mut t, &json!([{"op": "test", "path": "/l/0", "value": 1}])).is_err());
        assert!(json_patch(&mut t, &json!([{"op": "remove", "path": "/nope"}])).is_err());
        json_patch(
            &mut t,
            &json!([{"op": "test", "path": "/metadata/finalizers", "value": null}]),
        )
        .unwrap();
    }

    #[test]
    fn strategic_merge_containers_by_name() {
        let mut pod = json!({"metadata": {"finalizers": ["a"]}, "spec": {"containers": [
            {"name": "a", "image": "x", "env": [{"name": "E", "value": "1"}]},
            {"name": "b", "image": "y"},
        ]}});
        strategic_merge(
            &mut pod,
            &json!({"metadata": {"finalizers": ["b"]}, "spec": {"containers": [
                {"name": "a", "image": "x2", "env": [{"name": "F", "value": "2"}]},
                {"name": "b", "$patch": "delete"},
                {"name": "c", "image": "z"},
            ]}}),
            "Pod",
        );
        assert_eq!(
            pod,
            json!({"metadata": {"finalizers": ["a", "b"]}, "spec": {"containers": [
                {"name": "a", "image": "x2", "env": [{"name": "E", "value": "1"}, {"name": "F", "value": "2"}]},
                {"name": "c", "image": "z"},
            ]}})
        );
        strategic_merge(
            &mut pod,
            &json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]}}),
            "Pod",
        );
        assert_eq!(pod["metadata"]["finalizers"], json!(["b"]));
    }
}
