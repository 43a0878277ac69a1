//! Field ownership (`metadata.managedFields`, `FieldsV1`) and server-side apply.
//!
//! A field set is a set of paths; a path element is `f:<field>`, `k:<json of the item's keys>` for
//! an item of an associative list, or `v:<json value>` for an item of a set. Lists are associative
//! when they have a merge key (built-ins) or `x-kubernetes-list-type: map` (custom resources), sets
//! for `finalizers` or `x-kubernetes-list-type: set`, otherwise atomic (owned as one field).

use std::collections::BTreeSet;

use serde_json::{json, Map, Value};

use crate::patch::{is_set_list, merge_key};

pub type Path = Vec<String>;
pub type FieldSet = BTreeSet<Path>;

/// How lists of one kind are keyed: built-in merge keys, or the CRD schema.
#[derive(Clone, Copy)]
pub struct Shape<'a> {
    pub kind: Option<&'a str>,
    pub schema: Option<&'a Value>,
}

enum ListType {
    Map(Vec<String>),
    Set,
    Atomic,
}

fn list_type(shape: Shape, field: &str, schema: Option<&Value>) -> ListType {
    if let Some(s) = schema {
        return match s["x-kubernetes-list-type"].as_str() {
            Some("map") => ListType::Map(
                s["x-kubernetes-list-map-keys"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|k| k.as_str().map(String::from))
                    .collect(),
            ),
            Some("set") => ListType::Set,
            _ if field == "finalizers" => ListType::Set,
            _ if field == "ownerReferences" => ListType::Map(vec!["uid".into()]),
            _ => ListType::Atomic,
        };
    }
    if shape.schema.is_some() && field != "finalizers" && field != "ownerReferences" {
        return ListType::Atomic;
    }
    if let Some(k) = merge_key(shape.kind, field) {
        ListType::Map(vec![k.to_string()])
    } else if is_set_list(field) {
        ListType::Set
    } else {
        ListType::Atomic
    }
}

fn child_schema<'a>(schema: Option<&'a Value>, field: &str) -> Option<&'a Value> {
    let s = schema?;
    s["properties"]
        .get(field)
        .or_else(|| s.get("additionalProperties").filter(|a| a.is_object()))
}

fn item_key(item: &Value, keys: &[String]) -> String {
    let m: Map<String, Value> = keys.iter().map(|k| (k.clone(), item[k].clone())).collect();
    format!("k:{}", Value::Object(m))
}

/// The fields an object (or applied configuration) sets; identity fields are not tracked.
pub fn fields_of(obj: &Value, shape: Shape) -> FieldSet {
    let mut out = FieldSet::new();
    let Some(m) = obj.as_object() else { return out };
    for (k, v) in m {
        match k.as_str() {
            "apiVersion" | "kind" => {}
            "metadata" => {
                for mk in ["labels", "annotations", "finalizers", "ownerReferences"] {
                    if let Some(mv) = v.get(mk) {
                        collect(
                            mv,
                            mk,
                            shape,
                            None,
                            vec!["f:metadata".into(), format!("f:{mk}")],
                            &mut out,
                        );
                    }
                }
            }
            _ => collect(
                v,
                k,
                shape,
                child_schema(shape.schema, k),
                vec![format!("f:{k}")],
                &mut out,
            ),
        }
    }
    out
}

fn collect(
    v: &Value,
    field: &str,
    shape: Shape,
    schema: Option<&Value>,
    path: Path,
    out: &mut FieldSet,
) {
    match v {
        Value::Object(m)
            if !m.is_empty() && schema.is_none_or(|s| s["x-kubernetes-map-type"] != "atomic") =>
        {
            for (k, child) in m {
                let mut p = path.clone();
                p.push(format!("f:{k}"));
                collect(child, k, shape, child_schema(schema, k), p, out);
            }
        }
        Value::Array(items) if !items.is_empty() => match list_type(shape, field, schema) {
            ListType::Map(keys) => {
                let item_schema = schema.map(|s| &s["items"]);
                for item in items {
                    let mut p = path.clone();
                    p.push(item_key(item, &keys));
                    out.insert(p.clone());
                    if let Some(m) = item.as_object() {
                        for (k, child) in m {
                            let mut cp = p.clone();
                            cp.push(format!("f:{k}"));
                            collect(child, k, shape, child_schema(item_schema, k), cp, out);
                        }
                    }
                }
            }
            ListType::Set => {
                for item in items {
                    let mut p = path.clone();
                    p.push(format!("v:{item}"));
                    out.insert(p);
                }
            }
            ListType::Atomic => {
                out.insert(path);
            }
        },
        _ => {
            out.insert(path);
        }
    }
}

/// The value at a field path, if the object has it.
pub fn resolve<'a>(obj: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = obj;
    for el in path {
        cur = if let Some(f) = el.strip_prefix("f:") {
            cur.get(f)?
        } else if let Some(k) = el.strip_prefix("k:") {
            let keys: Map<String, Value> = serde_json::from_str(k).ok()?;
            cur.as_array()?
                .iter()
                .find(|i| keys.iter().all(|(kk, kv)| &i[kk] == kv))?
        } else if let Some(v) = el.strip_prefix("v:") {
            let want: Value = serde_json::from_str(v).ok()?;
            cur.as_array()?.iter().find(|i| **i == want)?
        } else {
            return None;
        };
    }
    Some(cur)
}

/// Removes the field at `path` from `obj` (list items are removed from their list).
fn remove_path(obj: &mut Value, path: &[String]) {
    let Some((last, parent)) = path.split_last() else {
        return;
    };
    let mut cur = obj;
    for el in parent {
        let next = if let Some(f) = el.strip_prefix("f:") {
            cur.get_mut(f)
        } else if let Some(k) = el.strip_prefix("k:") {
            let keys: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
            cur.as_array_mut().and_then(|a| {
                a.iter_mut()
                    .find(|i| keys.iter().all(|(kk, kv)| &i[kk] == kv))
            })
        } else {
            None
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    if let Some(f) = last.strip_prefix("f:") {
        if let Some(m) = cur.as_object_mut() {
            m.remove(f);
        }
    } else if let Some(k) = last.strip_prefix("k:") {
        let keys: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
        if let Some(a) = cur.as_array_mut() {
            a.retain(|i| !keys.iter().all(|(kk, kv)| &i[kk] == kv));
        }
    } else if let Some(v) = last.strip_prefix("v:") {
        let want: Value = serde_json::from_str(v).unwrap_or_default();
        if let Some(a) = cur.as_array_mut() {
            a.retain(|i| *i != want);
        }
    }
}

/// `FieldsV1` JSON for a field set.
pub fn to_fields_v1(set: &FieldSet) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut cur = &mut root;
        for el in path {
            cur = cur
                .entry(el.clone())
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .unwrap();
        }
        // A node that is itself a member and also has children is marked with ".".
        let _ = cur;
    }
    // Second pass: mark list items (members with children) with ".".
    for path in set {
        let mut cur = &mut root;
        for el in path {
            cur = cur.get_mut(el).unwrap().as_object_mut().unwrap();
        }
        if !cur.is_empty() && !cur.contains_key(".") {
            cur.insert(".".into(), json!({}));
        }
    }
    Value::Object(root)
}

/// The field set a `FieldsV1` JSON describes.
pub fn from_fields_v1(v: &Value) -> FieldSet {
    fn walk(v: &Value, path: &mut Path, out: &mut FieldSet) {
        let Some(m) = v.as_object() else { return };
        for (k, child) in m {
            if k == "." {
                out.insert(path.clone());
                continue;
            }
            path.push(k.clone());
            if child.as_object().is_none_or(|c| c.is_empty()) {
                out.insert(path.clone());
            } else {
                walk(child, path, out);
            }
            path.pop();
        }
    }
    let mut out = FieldSet::new();
    walk(v, &mut vec![], &mut out);
    out
}

/// A field path as apply conflicts print it: `.spec.containers[name="c"].image`.
pub fn display(path: &[String]) -> String {
    let mut s = String::new();
    for el in path {
        if let Some(f) = el.strip_prefix("f:") {
            s.push('.');
            s.push_str(f);
        } else if let Some(k) = el.strip_prefix("k:") {
            let keys: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
            let parts: Vec<String> = keys.iter().map(|(k, v)| format!("{k}={v}")).collect();
            s.push_str(&format!("[{}]", parts.join(",")));
        } else if let Some(v) = el.strip_prefix("v:") {
            s.push_str(&format!("[={v}]"));
        }
    }
    s
}

/// One `managedFields` entry.
#[derive(Debug, Clone)]
pub struct Entry {
    pub manager: String,
    pub operation: String,
    pub api_version: String,
    pub time: String,
    pub subresource: Option<String>,
    pub fields: FieldSet,
}

pub fn read_entries(obj: &Value) -> Vec<Entry> {
    obj["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| Entry {
            manager: e["manager"].as_str().unwrap_or_default().into(),
            operation: e["operation"].as_str().unwrap_or_default().into(),
            api_version: e["apiVersion"].as_str().unwrap_or_default().into(),
            time: e["time"].as_str().unwrap_or_default().into(),
            subresource: e["subresource"].as_str().map(String::from),
            fields: from_fields_v1(&e["fieldsV1"]),
        })
        .collect()
}

pub fn write_entries(obj: &mut Value, entries: &[Entry]) {
    let list: Vec<Value> = entries
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut v = json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": to_fields_v1(&e.fields),
            });
            if let Some(s) = &e.subresource {
                v["subresource"] = json!(s);
            }
            v
        })
        .collect();
    if list.is_empty() {
        if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("managedFields");
        }
    } else {
        obj["metadata"]["managedFields"] = Value::Array(list);
    }
}

/// Records a non-apply write by `manager`: it takes the fields it changed from everyone else, and
/// fields that disappeared are nobody's any more.
pub fn record_update(
    old: Option<&Value>,
    new: &mut Value,
    shape: Shape,
    manager: &str,
    api_version: &str,
    sub: Option<&str>,
    now: &str,
) {
    let mut entries = old.map(read_entries).unwrap_or_default();
    let new_fields = fields_of(new, shape);
    let changed: FieldSet = new_fields
        .iter()
        .filter(|p| match old {
            None => true,
            Some(o) => match (resolve(o, p), resolve(new, p)) {
                (Some(a), Some(b)) => {
                    let item = p.last().is_some_and(|l| l.starts_with("k:"));
                    !item && a != b
                }
                _ => true,
            },
        })
        .cloned()
        .collect();
    let removed: FieldSet = match old {
        Some(o) => fields_of(o, shape)
            .into_iter()
            .filter(|p| resolve(new, p).is_none())
            .collect(),
        None => FieldSet::new(),
    };
    for e in entries.iter_mut() {
        e.fields.retain(|p| !removed.contains(p));
        if !(e.manager == manager && e.operation == "Update" && e.subresource.as_deref() == sub) {
            e.fields.retain(|p| !changed.contains(p));
        }
    }
    if !changed.is_empty() {
        match entries.iter_mut().find(|e| {
            e.manager == manager && e.operation == "Update" && e.subresource.as_deref() == sub
        }) {
            Some(e) => {
                e.fields.extend(changed);
                e.time = now.into();
                e.api_version = api_version.into();
            }
            None => entries.push(Entry {
                manager: manager.into(),
                operation: "Update".into(),
                api_version: api_version.into(),
                time: now.into(),
                subresource: sub.map(String::from),
                fields: changed,
            }),
        }
    }
    write_entries(new, &entries);
}

/// An apply conflict: the field and the manager that owns it with another value.
pub struct Conflict {
    pub field: String,
    pub manager: String,
    pub api_version: String,
}

/// Server-side apply of `applied` onto `live` (None: the object is new). Returns the merged
/// object with its managedFields, or the conflicts when not forced.
#[allow(clippy::too_many_arguments)]
pub fn apply(
    live: Option<&Value>,
    applied: &Value,
    shape: Shape,
    manager: &str,
    api_version: &str,
    sub: Option<&str>,
    force: bool,
    now: &str,
) -> Result<Value, Vec<Conflict>> {
    let applied_set = fields_of(applied, shape);
    let mut entries = live.map(read_entries).unwrap_or_default();
    let mine = |e: &Entry| {
        e.manager == manager && e.operation == "Apply" && e.subresource.as_deref() == sub
    };
    let mut conflicts = vec![];
    if let Some(live) = live {
        for e in entries.iter().filter(|e| !mine(e) && e.manager != manager) {
            for p in applied_set.intersection(&e.fields) {
                if p.last().is_some_and(|l| l.starts_with("k:")) {
                    continue;
                }
                if resolve(live, p) != resolve(applied, p) {
                    conflicts.push(Conflict {
                        field: display(p),
                        manager: e.manager.clone(),
                        api_version: e.api_version.clone(),
                    });
                }
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflicts);
    }
    if force {
        if let Some(live) = live {
            for e in entries.iter_mut().filter(|e| !mine(e)) {
                e.fields.retain(|p| {
                    !applied_set.contains(p) || resolve(live, p) == resolve(applied, p)
                });
            }
        }
    }
    let mut obj = live.cloned().unwrap_or_else(|| json!({}));
    let previous: FieldSet = entries
        .iter()
        .filter(|e| mine(e))
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    let others: FieldSet = entries
        .iter()
        .filter(|e| !mine(e))
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    // Fields this manager applied before and no longer does, and nobody else owns, go away.
    let mut dropped: Vec<&Path> = previous
        .iter()
        .filter(|p| !applied_set.contains(*p) && !others.contains(*p))
        .collect();
    dropped.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in dropped {
        remove_path(&mut obj, p);
    }
    merge_applied(&mut obj, applied, shape, None, "");
    entries.retain(|e| !mine(e));
    entries.push(Entry {
        manager: manager.into(),
        operation: "Apply".into(),
        api_version: api_version.into(),
        time: now.into(),
        subresource: sub.map(String::from),
        fields: applied_set,
    });
    write_entries(&mut obj, &entries);
    Ok(obj)
}

fn merge_applied(
    target: &mut Value,
    applied: &Value,
    shape: Shape,
    schema: Option<&Value>,
    field: &str,
) {
    match applied {
        Value::Object(am) if schema.is_none_or(|s| s["x-kubernetes-map-type"] != "atomic") => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in am {
                if field.is_empty() && k == "metadata" {
                    let tm = t.entry("metadata").or_insert_with(|| json!({}));
                    for (mk, mv) in v.as_object().into_iter().flatten() {
                        if mk == "managedFields" || mk == "resourceVersion" {
                            continue;
                        }
                        merge_applied(
                            tm.as_object_mut()
                                .unwrap()
                                .entry(mk.clone())
                                .or_insert(Value::Null),
                            mv,
                            shape,
                            None,
                            mk,
                        );
                    }
                    continue;
                }
                let cs = if field.is_empty() {
                    child_schema(shape.schema, k)
                } else {
                    child_schema(schema, k)
                };
                merge_applied(t.entry(k.clone()).or_insert(Value::Null), v, shape, cs, k);
            }
        }
        Value::Array(items) => match list_type(shape, field, schema) {
            ListType::Map(keys) => {
                if !target.is_array() {
                    *target = json!([]);
                }
                let t = target.as_array_mut().unwrap();
                let item_schema = schema.map(|s| &s["items"]);
                for item in items {
                    match t.iter_mut().find(|x| keys.iter().all(|k| x[k] == item[k])) {
                        Some(x) => {
                            for (k, v) in item.as_object().into_iter().flatten() {
                                let cs = child_schema(item_schema, k);
                                merge_applied(
                                    x.as_object_mut()
                                        .unwrap()
                                        .entry(k.clone())
                                        .or_insert(Value::Null),
                                    v,
                                    shape,
                                    cs,
                                    k,
                                );
                            }
                        }
                        None => t.push(item.clone()),
                    }
                }
            }
            ListType::Set => {
                if !target.is_array() {
                    *target = json!([]);
                }
                let t = target.as_array_mut().unwrap();
                for item in items {
                    if !t.contains(item) {
                        t.push(item.clone());
                    }
                }
            }
            ListType::Atomic => *target = applied.clone(),
        },
        other => *target = other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: &str = "2026-01-01T00:00:00Z";

    fn cm(data: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "d"}, "data": data})
    }

    #[test]
    fn apply_owns_conflicts_and_removes() {
        let shape = Shape {
            kind: Some("ConfigMap"),
            schema: None,
        };
        let a = apply(
            None,
            &cm(json!({"x": "1", "y": "2"})),
            shape,
            "a",
            "v1",
            None,
            false,
            NOW,
        )
        .ok()
        .unwrap();
        assert_eq!(
            a["metadata"]["managedFields"][0]["fieldsV1"],
            json!({"f:data": {"f:x": {}, "f:y": {}}})
        );
        // Another manager applying a different value for x conflicts...
        let err = apply(
            Some(&a),
            &cm(json!({"x": "9"})),
            shape,
            "b",
            "v1",
            None,
            false,
            NOW,
        )
        .err()
        .unwrap();
        assert_eq!(
            (err[0].field.as_str(), err[0].manager.as_str()),
            (".data.x", "a")
        );
        // ...unless forced, which moves x to b.
        let b = apply(
            Some(&a),
            &cm(json!({"x": "9"})),
            shape,
            "b",
            "v1",
            None,
            true,
            NOW,
        )
        .ok()
        .unwrap();
        assert_eq!(b["data"], json!({"x": "9", "y": "2"}));
        // a now applies without y and x: y is removed, x stays (b owns it).
        let c = apply(
            Some(&b),
            &cm(json!({"z": "3"})),
            shape,
            "a",
            "v1",
            None,
            false,
            NOW,
        )
        .ok()
        .unwrap();
        assert_eq!(c["data"], json!({"x": "9", "z": "3"}));
    }

    #[test]
    fn containers_are_keyed_by_name() {
        let shape = Shape {
            kind: Some("Pod"),
            schema: None,
        };
        let pod = json!({"spec": {"containers": [{"name": "main", "image": "a"}]}});
        let set = fields_of(&pod, shape);
        let v1 = to_fields_v1(&set);
        assert_eq!(
            v1,
            json!({"f:spec": {"f:containers": {"k:{\"name\":\"main\"}": {".": {}, "f:image": {}, "f:name": {}}}}})
        );
        assert_eq!(from_fields_v1(&v1), set);
    }

    #[test]
    fn updates_take_ownership() {
        let shape = Shape {
            kind: Some("ConfigMap"),
            schema: None,
        };
        let a = apply(
            None,
            &cm(json!({"x": "1"})),
            shape,
            "a",
            "v1",
            None,
            false,
            NOW,
        )
        .ok()
        .unwrap();
        let mut new = a.clone();
        new["data"]["x"] = json!("2");
        record_update(Some(&a), &mut new, shape, "editor", "v1", None, NOW);
        let managers: Vec<&str> = new["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["manager"].as_str().unwrap())
            .collect();
        assert_eq!(managers, vec!["editor"]);
    }
}
