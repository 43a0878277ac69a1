//! Label and field selectors, and the simple JSONPath that printer columns use.

use serde_json::Value;

use crate::errors::{ApiError, ApiResult};

#[derive(Debug, Clone, PartialEq)]
enum Op {
    Eq(String),
    NotEq(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    NotExists,
}

/// A parsed label selector (`a=b,c!=d,e in (f,g),!h`).
#[derive(Debug, Clone, Default)]
pub struct LabelSelector {
    reqs: Vec<(String, Op)>,
}

impl LabelSelector {
    pub fn parse(s: &str) -> ApiResult<Self> {
        let mut reqs = vec![];
        // Split on commas outside parentheses.
        let mut parts = vec![];
        let mut depth = 0;
        let mut cur = String::new();
        for c in s.chars() {
            match c {
                '(' => {
                    depth += 1;
                    cur.push(c)
                }
                ')' => {
                    depth -= 1;
                    cur.push(c)
                }
                ',' if depth == 0 => parts.push(std::mem::take(&mut cur)),
                _ => cur.push(c),
            }
        }
        parts.push(cur);
        let bad = |p: &str| ApiError::bad_request(format!("unable to parse requirement: {p}"));
        for part in parts.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
            if let Some(k) = part.strip_prefix('!') {
                reqs.push((k.trim().to_string(), Op::NotExists));
            } else if let Some((k, v)) = part.split_once("!=") {
                reqs.push((k.trim().into(), Op::NotEq(v.trim().into())));
            } else if let Some((k, v)) = part.split_once("==") {
                reqs.push((k.trim().into(), Op::Eq(v.trim().into())));
            } else if let Some((k, v)) = part.split_once('=') {
                reqs.push((k.trim().into(), Op::Eq(v.trim().into())));
            } else if let Some((k, rest)) = split_word(part, " notin ") {
                reqs.push((k, Op::NotIn(set(rest).ok_or_else(|| bad(part))?)));
            } else if let Some((k, rest)) = split_word(part, " in ") {
                reqs.push((k, Op::In(set(rest).ok_or_else(|| bad(part))?)));
            } else if part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
            {
                reqs.push((part.to_string(), Op::Exists));
            } else {
                return Err(bad(part));
            }
        }
        Ok(LabelSelector { reqs })
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        self.reqs.iter().all(|(k, op)| {
            let v = labels.get(k).and_then(|v| v.as_str());
            match op {
                Op::Eq(x) => v == Some(x.as_str()),
                Op::NotEq(x) => v != Some(x.as_str()),
                Op::In(xs) => v.is_some_and(|v| xs.iter().any(|x| x == v)),
                Op::NotIn(xs) => v.is_none_or(|v| !xs.iter().any(|x| x == v)),
                Op::Exists => v.is_some(),
                Op::NotExists => v.is_none(),
            }
        })
    }

    pub fn is_empty(&self) -> bool {
        self.reqs.is_empty()
    }
}

fn split_word(part: &str, word: &str) -> Option<(String, String)> {
    let i = part.find(word)?;
    Some((
        part[..i].trim().to_string(),
        part[i + word.len()..].trim().to_string(),
    ))
}

fn set(s: String) -> Option<Vec<String>> {
    let inner = s.trim().strip_prefix('(')?.strip_suffix(')')?;
    Some(
        inner
            .split(',')
            .map(|x| x.trim().to_string())
            .filter(|x| !x.is_empty())
            .collect(),
    )
}

/// A parsed field selector (`metadata.name=x,status.phase!=Running`).
#[derive(Debug, Clone, Default)]
pub struct FieldSelector {
    reqs: Vec<(String, bool, String)>,
}

/// The fields a resource can be selected by, beyond `metadata.name` and `metadata.namespace`
/// (the per-kind `GetAttrs` / `AddFieldLabelConversionFunc` lists of kube-apiserver).
fn supported_fields(resource: &str) -> &'static [&'static str] {
    match resource {
        "pods" => &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
        "events" => &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
        "secrets" => &["type"],
        "namespaces" => &["status.phase"],
        "nodes" => &["spec.unschedulable"],
        _ => &[],
    }
}

impl FieldSelector {
    /// Parses and checks the field labels against what the resource supports (400 otherwise).
    pub fn parse(s: &str, resource: &str, extra: &[String]) -> ApiResult<Self> {
        let mut reqs = vec![];
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, neg, v) = if let Some((k, v)) = part.split_once("!=") {
                (k, true, v)
            } else if let Some((k, v)) = part.split_once("==") {
                (k, false, v)
            } else if let Some((k, v)) = part.split_once('=') {
                (k, false, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: '{s}'; can't understand '{part}'"
                )));
            };
            let k = k.trim();
            let ok = k == "metadata.name"
                || k == "metadata.namespace"
                || supported_fields(resource).contains(&k)
                || extra.iter().any(|e| e.trim_start_matches('.') == k);
            if !ok {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {k}"
                )));
            }
            reqs.push((k.to_string(), neg, v.trim().to_string()));
        }
        Ok(FieldSelector { reqs })
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.reqs.iter().all(|(k, neg, want)| {
            let got = if k == "source" {
                field_str(obj, "source.component")
            } else {
                field_str(obj, k)
            };
            (got == *want) != *neg
        })
    }

    /// The name this selector pins (`metadata.name=x`), if any.
    pub fn name(&self) -> Option<&str> {
        self.reqs
            .iter()
            .find(|(k, neg, _)| k == "metadata.name" && !neg)
            .map(|(_, _, v)| v.as_str())
    }
}

/// A dotted field of an object as the string a field selector compares with (missing is `""`).
fn field_str(obj: &Value, path: &str) -> String {
    let mut cur = obj;
    for p in path.split('.') {
        cur = &cur[p];
    }
    match cur {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Evaluates the JSONPath subset that printer columns use: `.a.b`, `.a[0]`, `.a[*].b`,
/// `.a[?(@.type=="Ready")].status`. Returns every match.
pub fn jsonpath<'a>(obj: &'a Value, path: &str) -> Vec<&'a Value> {
    let path = path
        .trim()
        .trim_start_matches('{')
        .trim_end_matches('}')
        .trim_start_matches('$');
    let mut cur: Vec<&Value> = vec![obj];
    let mut rest = path;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            let name = &r[..end];
            rest = &r[end..];
            if name.is_empty() {
                continue;
            }
            cur = cur.into_iter().filter_map(|v| v.get(name)).collect();
        } else if let Some(r) = rest.strip_prefix('[') {
            let Some(end) = r.find(']') else {
                return vec![];
            };
            let inner = &r[..end];
            rest = &r[end + 1..];
            if inner == "*" {
                cur = cur
                    .into_iter()
                    .flat_map(|v| v.as_array().into_iter().flatten())
                    .collect();
            } else if let Ok(i) = inner.parse::<i64>() {
                cur = cur
                    .into_iter()
                    .filter_map(|v| {
                        let a = v.as_array()?;
                        let i = if i < 0 { a.len() as i64 + i } else { i };
                        a.get(usize::try_from(i).ok()?)
                    })
                    .collect();
            } else if let Some(f) = inner.strip_prefix("?(@.").and_then(|f| f.strip_suffix(')')) {
                let (field, want) = match f.split_once("==") {
                    Some((a, b)) => (
                        a.trim(),
                        Some(b.trim().trim_matches(|c| c == '"' || c == '\'')),
                    ),
                    None => (f.trim(), None),
                };
                cur = cur
                    .into_iter()
                    .flat_map(|v| v.as_array().into_iter().flatten())
                    .filter(|item| {
                        let mut x = *item;
                        for p in field.split('.') {
                            x = &x[p];
                        }
                        match want {
                            Some(w) => match x {
                                Value::String(s) => s == w,
                                Value::Null => false,
                                // Numbers and booleans compare by their JSON text.
                                other => serde_json::to_string(other).is_ok_and(|t| t == w),
                            },
                            None => !x.is_null(),
                        }
                    })
                    .collect();
            } else {
                let key = inner.trim_matches(|c| c == '\'' || c == '"');
                cur = cur.into_iter().filter_map(|v| v.get(key)).collect();
            }
        } else {
            return vec![];
        }
    }
    cur
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selectors() {
        let o = json!({"metadata": {"labels": {"app": "a", "tier": "web"}}});
        for (sel, want) in [
            ("app=a", true),
            ("app==a,tier=web", true),
            ("app!=a", false),
            ("app in (a, b),tier notin (db)", true),
            ("tier in (db)", false),
            ("app", true),
            ("!app", false),
            ("!missing", true),
            ("", true),
        ] {
            assert_eq!(
                LabelSelector::parse(sel).unwrap().matches(&o),
                want,
                "{sel}"
            );
        }
    }

    #[test]
    fn field_selectors_check_labels() {
        let o =
            json!({"metadata": {"name": "x", "namespace": "n"}, "status": {"phase": "Running"}});
        assert!(
            FieldSelector::parse("metadata.name=x,status.phase!=Failed", "pods", &[])
                .unwrap()
                .matches(&o)
        );
        assert!(!FieldSelector::parse("status.phase=Failed", "pods", &[])
            .unwrap()
            .matches(&o));
        let err = FieldSelector::parse("spec.foo=1", "configmaps", &[]).unwrap_err();
        assert_eq!(
            (err.code, err.message.as_str()),
            (400, "field label not supported: spec.foo")
        );
    }

    #[test]
    fn jsonpath_subset() {
        let o = json!({"status": {"conditions": [{"type": "A", "status": "False"}, {"type": "Ready", "status": "True"}]}, "spec": {"l": [1, 2]}});
        assert_eq!(
            jsonpath(&o, ".status.conditions[?(@.type==\"Ready\")].status"),
            vec![&json!("True")]
        );
        assert_eq!(jsonpath(&o, "{.spec.l[1]}"), vec![&json!(2)]);
        let n = json!({"items": [{"n": 1, "v": "a"}, {"n": 2, "v": "b"}]});
        assert_eq!(jsonpath(&n, ".items[?(@.n==2)].v"), vec![&json!("b")]);
        assert_eq!(jsonpath(&o, ".spec.l[*]").len(), 2);
        assert!(jsonpath(&o, ".spec.missing").is_empty());
    }
}
