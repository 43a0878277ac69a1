//! YAML output (`Accept: application/yaml`). Strings that a YAML 1.1 reader (PyYAML, go-yaml v2)
//! would take for something else (`yes`, `on`, `1e3`, `null`, ...) are quoted, as kube-apiserver's
//! encoder quotes them.

use serde_json::Value;

fn plain_ok(s: &str) -> bool {
    const WORDS: [&str; 22] = [
        "y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO", "true", "True", "TRUE", "false", "False", "FALSE",
        "on", "On", "ON", "off", "Off", "OFF",
    ];
    if s.is_empty() || WORDS.contains(&s) || matches!(s, "null" | "Null" | "NULL" | "~") {
        return false;
    }
    if s.parse::<f64>().is_ok() || s.starts_with(['0', '+', '-', '.']) && s.chars().any(|c| c.is_ascii_digit()) {
        return false;
    }
    let first = s.chars().next().unwrap();
    if "-?:,[]{}#&*!|>'\"%@`".contains(first) || s.starts_with(' ') || s.ends_with(' ') {
        return false;
    }
    !(s.contains(": ") || s.contains(" #") || s.ends_with(':') || s.chars().any(|c| c.is_control()))
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) if plain_ok(s) => s.clone(),
        // A JSON string is a valid YAML double-quoted scalar.
        Value::String(s) => serde_json::to_string(s).unwrap_or_default(),
        Value::Array(a) if a.is_empty() => "[]".into(),
        Value::Object(m) if m.is_empty() => "{}".into(),
        _ => String::new(),
    }
}

fn is_block(v: &Value) -> bool {
    matches!(v, Value::Array(a) if !a.is_empty()) || matches!(v, Value::Object(m) if !m.is_empty())
}

fn emit(v: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                let key = scalar(&Value::String(k.clone()));
                if is_block(child) {
                    out.push_str(&format!("{pad}{key}:\n"));
                    // Lists under a key sit at the key's indentation, as kubectl prints them.
                    emit(child, if child.is_array() { indent } else { indent + 2 }, out);
                } else {
                    out.push_str(&format!("{pad}{key}: {}\n", scalar(child)));
                }
            }
        }
        Value::Array(a) if !a.is_empty() => {
            for item in a {
                if is_block(item) {
                    let mut inner = String::new();
                    emit(item, indent + 2, &mut inner);
                    // The item's first line starts after "- ".
                    out.push_str(&format!("{pad}- {}", &inner[indent + 2..]));
                } else {
                    out.push_str(&format!("{pad}- {}\n", scalar(item)));
                }
            }
        }
        other => out.push_str(&format!("{pad}{}\n", scalar(other))),
    }
}

/// A JSON value as a YAML document.
pub fn to_string(v: &Value) -> String {
    let mut out = String::new();
    emit(v, 0, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trips_through_a_yaml_reader() {
        let v = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "x", "labels": {"a": "yes", "b": "1.0", "c": "", "d": "null"}, "finalizers": ["f/1"]},
            "data": {"script": "print(1)\nprint(2)\n", "colon": "a: b", "hash": "#x", "dash": "-1", "plain": "hello world"},
            "list": [{"name": "a", "value": 1}, [1, 2], {}, []],
            "n": 3, "t": true, "z": null,
        });
        let text = to_string(&v);
        let back: Value = serde_yaml::from_str(&text).unwrap();
        assert_eq!(back, v, "{text}");
        assert!(text.contains("a: \"yes\"\n") && text.contains("plain: hello world\n"), "{text}");
    }
}
