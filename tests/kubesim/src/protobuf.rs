//! Request bodies in Kubernetes protobuf (`application/vnd.kubernetes.protobuf`), which client-go's
//! generated clients always send for built-in kinds: `kubectl create namespace|configmap|secret|
//! serviceaccount` use them. Decoded into the JSON form for the kinds listed in [`decode`];
//! responses are always JSON (clients accept it).
//!
//! The envelope is the 4-byte magic `k8s\0` and a `runtime.Unknown` message (typeMeta = 1,
//! raw = 2, contentEncoding = 3, contentType = 4); `raw` is the object in the field numbers of
//! `k8s.io/api/.../generated.proto`. `DeleteOptions` bodies are decoded too.

use base64::Engine;
use serde_json::{json, Map, Value};

/// How a field is encoded.
#[derive(Clone, Copy)]
enum T {
    Str,
    Bytes,
    Int,
    Bool,
    /// `metav1.Time` (seconds = 1, nanos = 2), as RFC 3339.
    Time,
    Msg(&'static [(u64, &'static str, T)]),
    RepStr,
    RepMsg(&'static [(u64, &'static str, T)]),
    MapStr,
    /// `map<string, bytes>`, as base64 strings (how JSON carries `[]byte`).
    MapBytes,
}

const OWNER_REF: &[(u64, &str, T)] = &[
    (5, "apiVersion", T::Str),
    (1, "kind", T::Str),
    (3, "name", T::Str),
    (4, "uid", T::Str),
    (6, "controller", T::Bool),
    (7, "blockOwnerDeletion", T::Bool),
];

const OBJECT_META: &[(u64, &str, T)] = &[
    (1, "name", T::Str),
    (2, "generateName", T::Str),
    (3, "namespace", T::Str),
    (5, "uid", T::Str),
    (6, "resourceVersion", T::Str),
    (7, "generation", T::Int),
    (8, "creationTimestamp", T::Time),
    (9, "deletionTimestamp", T::Time),
    (10, "deletionGracePeriodSeconds", T::Int),
    (11, "labels", T::MapStr),
    (12, "annotations", T::MapStr),
    (13, "ownerReferences", T::RepMsg(OWNER_REF)),
    (14, "finalizers", T::RepStr),
];

const NAMESPACE: &[(u64, &str, T)] = &[
    (1, "metadata", T::Msg(OBJECT_META)),
    (2, "spec", T::Msg(&[(1, "finalizers", T::RepStr)])),
];
const CONFIGMAP: &[(u64, &str, T)] = &[
    (1, "metadata", T::Msg(OBJECT_META)),
    (2, "data", T::MapStr),
    (3, "binaryData", T::MapBytes),
    (4, "immutable", T::Bool),
];
const SECRET: &[(u64, &str, T)] = &[
    (1, "metadata", T::Msg(OBJECT_META)),
    (2, "data", T::MapBytes),
    (3, "type", T::Str),
    (4, "stringData", T::MapStr),
    (5, "immutable", T::Bool),
];
const DELETE_OPTIONS: &[(u64, &str, T)] = &[
    (1, "gracePeriodSeconds", T::Int),
    (
        2,
        "preconditions",
        T::Msg(&[(1, "uid", T::Str), (2, "resourceVersion", T::Str)]),
    ),
    (3, "orphanDependents", T::Bool),
    (4, "propagationPolicy", T::Str),
];
const OBJECT_REF: &[(u64, &str, T)] = &[
    (1, "kind", T::Str),
    (2, "namespace", T::Str),
    (3, "name", T::Str),
    (4, "uid", T::Str),
    (5, "apiVersion", T::Str),
];
const SERVICE_ACCOUNT: &[(u64, &str, T)] = &[
    (1, "metadata", T::Msg(OBJECT_META)),
    (2, "secrets", T::RepMsg(OBJECT_REF)),
    (3, "imagePullSecrets", T::RepMsg(&[(1, "name", T::Str)])),
    (4, "automountServiceAccountToken", T::Bool),
];

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self.b.split_first().ok_or("truncated varint")?;
            self.b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.b.len() < n {
            return Err("truncated field".into());
        }
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(a)
    }

    /// The next field: number and its value (varint or bytes; fixed-width ones as bytes).
    fn field(&mut self) -> Result<Option<(u64, Wire<'a>)>, String> {
        if self.b.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let v = match key & 7 {
            0 => Wire::Varint(self.varint()?),
            1 => Wire::Bytes(self.take(8)?),
            2 => {
                let n = self.varint()? as usize;
                Wire::Bytes(self.take(n)?)
            }
            5 => Wire::Bytes(self.take(4)?),
            w => return Err(format!("unsupported wire type {w}")),
        };
        Ok(Some((key >> 3, v)))
    }
}

enum Wire<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

fn message(b: &[u8], schema: &[(u64, &str, T)]) -> Result<Value, String> {
    let mut out = Map::new();
    let mut r = Reader { b };
    while let Some((n, w)) = r.field()? {
        let Some((_, name, t)) = schema.iter().find(|(num, _, _)| *num == n) else {
            continue;
        };
        let name = name.to_string();
        match (t, w) {
            (T::Str, Wire::Bytes(s)) => {
                if !s.is_empty() {
                    out.insert(name, json!(String::from_utf8_lossy(s)));
                }
            }
            (T::Bytes, Wire::Bytes(s)) => {
                out.insert(
                    name,
                    json!(base64::engine::general_purpose::STANDARD.encode(s)),
                );
            }
            (T::Int, Wire::Varint(v)) => {
                if v != 0 {
                    out.insert(name, json!(v as i64));
                }
            }
            (T::Bool, Wire::Varint(v)) => {
                out.insert(name, json!(v != 0));
            }
            (T::Time, Wire::Bytes(s)) => {
                let t = message(s, &[(1, "s", T::Int), (2, "n", T::Int)])?;
                if let Some(secs) = t["s"].as_i64() {
                    if let Some(dt) = chrono::DateTime::from_timestamp(secs, 0) {
                        out.insert(
                            name,
                            json!(dt.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
                        );
                    }
                }
            }
            (T::Msg(s), Wire::Bytes(b)) => {
                let m = message(b, s)?;
                if m.as_object().is_some_and(|m| !m.is_empty()) {
                    out.insert(name, m);
                }
            }
            (T::RepStr, Wire::Bytes(s)) => {
                let list = out.entry(name).or_insert_with(|| json!([]));
                list.as_array_mut()
                    .unwrap()
                    .push(json!(String::from_utf8_lossy(s)));
            }
            (T::RepMsg(s), Wire::Bytes(b)) => {
                let m = message(b, s)?;
                out.entry(name)
                    .or_insert_with(|| json!([]))
                    .as_array_mut()
                    .unwrap()
                    .push(m);
            }
            (T::MapStr | T::MapBytes, Wire::Bytes(b)) => {
                let entry = message(
                    b,
                    &[
                        (1, "k", T::Str),
                        (
                            2,
                            "v",
                            if matches!(t, T::MapStr) {
                                T::Str
                            } else {
                                T::Bytes
                            },
                        ),
                    ],
                )?;
                let k = entry["k"].as_str().unwrap_or_default().to_string();
                let v = if entry["v"].is_null() {
                    json!("")
                } else {
                    entry["v"].clone()
                };
                out.entry(name).or_insert_with(|| json!({}))[k] = v;
            }
            _ => return Err(format!("unexpected encoding for field {name}")),
        }
    }
    Ok(Value::Object(out))
}

/// Decodes a protobuf request body into JSON; Err is the reason it cannot be (unknown kind,
/// malformed data).
pub fn decode(body: &[u8]) -> Result<Value, String> {
    let raw = body
        .strip_prefix(b"k8s\0")
        .ok_or("missing the k8s protobuf magic prefix")?;
    let unknown = message(
        raw,
        &[
            (
                1,
                "typeMeta",
                T::Msg(&[(1, "apiVersion", T::Str), (2, "kind", T::Str)]),
            ),
            (2, "raw", T::Bytes),
        ],
    )?;
    let api_version = unknown["typeMeta"]["apiVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let kind = unknown["typeMeta"]["kind"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(unknown["raw"].as_str().unwrap_or_default())
        .map_err(|e| e.to_string())?;
    let schema = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => NAMESPACE,
        ("v1", "ConfigMap") => CONFIGMAP,
        ("v1", "Secret") => SECRET,
        ("v1", "ServiceAccount") => SERVICE_ACCOUNT,
        (_, "DeleteOptions") => DELETE_OPTIONS,
        _ => return Err(format!("kubesim decodes protobuf only for v1 Namespace, ConfigMap, Secret and ServiceAccount, not {api_version} {kind}; send JSON")),
    };
    let mut obj = message(&bytes, schema)?;
    obj["apiVersion"] = json!(api_version);
    obj["kind"] = json!(kind);
    if obj.get("metadata").is_none() {
        obj["metadata"] = json!({});
    }
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_what_kubectl_create_sends() {
        // `kubectl create namespace demo` and `kubectl create configmap x --from-literal=a=b` (1.32).
        let ns = b"k8s\x00\n\x0f\n\x02v1\x12\tNamespace\x12\x1c\n\x14\n\x04demo\x12\x00\x1a\x00\"\x00*\x002\x008\x00B\x00\x12\x00\x1a\x02\n\x00\x1a\x00\"\x00";
        assert_eq!(
            decode(ns).unwrap(),
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}})
        );
        let cm = b"k8s\x00\n\x0f\n\x02v1\x12\tConfigMap\x12\x1b\n\x11\n\x01x\x12\x00\x1a\x00\"\x00*\x002\x008\x00B\x00\x12\x06\n\x01a\x12\x01b\x1a\x00\"\x00";
        assert_eq!(
            decode(cm).unwrap(),
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "b"}})
        );
        assert!(decode(b"k8s\x00\n\t\n\x02v1\x12\x03Pod")
            .unwrap_err()
            .contains("not v1 Pod"));
    }
}
