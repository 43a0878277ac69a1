//! The admission plugins whose answers code under test can meet: RuntimeClass (a pod naming a
//! missing RuntimeClass is rejected, the class's pod overhead is copied in) and Pod Security
//! admission (the namespace's `pod-security.kubernetes.io/enforce` and `warn` levels, baseline
//! and restricted).

use serde_json::{json, Value};

use crate::errors::{ApiError, ApiResult};
use crate::registry::ResourceType;
use crate::store::Inner;

fn forbidden(rt: &ResourceType, name: &str, why: String) -> ApiError {
    let mut e = ApiError::forbidden(format!(
        "{} {name:?} is forbidden: {why}",
        rt.group_resource()
    ));
    e.details = Some(json!({"name": name, "kind": rt.resource}));
    e
}

/// Runs the admission plugins on a pod being created; returns warnings.
pub fn admit_pod(
    inner: &Inner,
    rt: &ResourceType,
    ns: &str,
    pod: &mut Value,
) -> ApiResult<Vec<String>> {
    let name = pod["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if let Some(rc) = pod["spec"]["runtimeClassName"]
        .as_str()
        .filter(|r| !r.is_empty())
    {
        let Some(class) = inner.get("node.k8s.io/runtimeclasses", "", rc) else {
            return Err(forbidden(
                rt,
                &name,
                format!("pod rejected: RuntimeClass {rc:?} not found"),
            ));
        };
        if let Some(o) = class["overhead"]["podFixed"].as_object() {
            pod["spec"]["overhead"] = Value::Object(o.clone());
        }
    }
    let labels = inner
        .get("/namespaces", "", ns)
        .map(|n| n["metadata"]["labels"].clone())
        .unwrap_or_default();
    let level = |mode: &str| {
        labels[format!("pod-security.kubernetes.io/{mode}")]
            .as_str()
            .map(String::from)
    };
    let mut warnings = vec![];
    if let Some(l) = level("enforce").filter(|l| l != "privileged") {
        let v = violations(pod, &l);
        if !v.is_empty() {
            return Err(forbidden(
                rt,
                &name,
                format!("violates PodSecurity \"{l}:latest\": {}", v.join(", ")),
            ));
        }
    }
    if let Some(l) = level("warn").filter(|l| l != "privileged") {
        let v = violations(pod, &l);
        if !v.is_empty() {
            warnings.push(format!(
                "would violate PodSecurity \"{l}:latest\": {}",
                v.join(", ")
            ));
        }
    }
    Ok(warnings)
}

fn containers(pod: &Value) -> Vec<&Value> {
    ["initContainers", "containers", "ephemeralContainers"]
        .iter()
        .flat_map(|l| pod["spec"][*l].as_array().into_iter().flatten())
        .collect()
}

fn names(cs: &[&Value]) -> String {
    let quoted: Vec<String> = cs
        .iter()
        .map(|c| format!("{:?}", c["name"].as_str().unwrap_or_default()))
        .collect();
    let noun = if cs.len() == 1 {
        "container"
    } else {
        "containers"
    };
    format!("{noun} {}", quoted.join(", "))
}

/// What a pod violates at `level` (`baseline` or `restricted`), in Pod Security admission's words.
pub fn violations(pod: &Value, level: &str) -> Vec<String> {
    let spec = &pod["spec"];
    let psc = &spec["securityContext"];
    let cs = containers(pod);
    let mut out = vec![];
    // Baseline.
    let host: Vec<&str> = ["hostNetwork", "hostPID", "hostIPC"]
        .into_iter()
        .filter(|k| spec[*k] == true)
        .collect();
    if !host.is_empty() {
        let parts: Vec<String> = host.iter().map(|k| format!("{k}=true")).collect();
        out.push(format!("host namespaces ({})", parts.join(", ")));
    }
    let privileged: Vec<&Value> = cs
        .iter()
        .copied()
        .filter(|c| c["securityContext"]["privileged"] == true)
        .collect();
    if !privileged.is_empty() {
        out.push(format!(
            "privileged ({} must not set securityContext.privileged=true)",
            names(&privileged)
        ));
    }
    const BASELINE_CAPS: [&str; 13] = [
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
    ];
    let added = |c: &Value| -> Vec<String> {
        c["securityContext"]["capabilities"]["add"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str().map(String::from))
            .collect()
    };
    let bad_caps: Vec<&Value> = cs
        .iter()
        .copied()
        .filter(|c| {
            added(c)
                .iter()
                .any(|a| !BASELINE_CAPS.contains(&a.as_str()))
        })
        .collect();
    if !bad_caps.is_empty() {
        out.push(format!("non-default capabilities ({} must not include capabilities in securityContext.capabilities.add)", names(&bad_caps)));
    }
    let host_paths: Vec<String> = spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["hostPath"].is_object())
        .map(|v| format!("{:?}", v["name"].as_str().unwrap_or_default()))
        .collect();
    if !host_paths.is_empty() {
        out.push(format!(
            "hostPath volumes (volume{} {})",
            if host_paths.len() == 1 { "" } else { "s" },
            host_paths.join(", ")
        ));
    }
    let host_ports: Vec<&Value> = cs
        .iter()
        .copied()
        .filter(|c| {
            c["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["hostPort"].as_i64().unwrap_or(0) != 0)
        })
        .collect();
    if !host_ports.is_empty() {
        out.push(format!("hostPort ({} uses hostPorts)", names(&host_ports)));
    }
    if level != "restricted" {
        return out;
    }
    // Restricted.
    const ALLOWED_VOLUMES: [&str; 8] = [
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    ];
    for v in spec["volumes"].as_array().into_iter().flatten() {
        if let Some(kind) = v.as_object().and_then(|m| m.keys().find(|k| *k != "name")) {
            if !ALLOWED_VOLUMES.contains(&kind.as_str()) {
                out.push(format!(
                    "restricted volume types (volume {:?} uses restricted volume type {kind:?})",
                    v["name"].as_str().unwrap_or_default()
                ));
            }
        }
    }
    let escalation: Vec<&Value> = cs
        .iter()
        .copied()
        .filter(|c| c["securityContext"]["allowPrivilegeEscalation"] != false)
        .collect();
    if !escalation.is_empty() {
        out.push(format!("allowPrivilegeEscalation != false ({} must set securityContext.allowPrivilegeEscalation=false)", names(&escalation)));
    }
    let caps_bad: Vec<&Value> = cs
        .iter()
        .copied()
        .filter(|c| {
            let drop_all = c["securityContext"]["capabilities"]["drop"]
                .as_array()
                .is_some_and(|d| d.iter().any(|x| x == "ALL"));
            !drop_all || added(c).iter().any(|a| a != "NET_BIND_SERVICE")
        })
        .collect();
    if !caps_bad.is_empty() {
        out.push(format!(
            "unrestricted capabilities ({} must set securityContext.capabilities.drop=[\"ALL\"])",
            names(&caps_bad)
        ));
    }
    let pod_non_root = psc["runAsNonRoot"] == true;
    let not_non_root: Vec<&Value> = cs
        .iter()
        .copied()
        .filter(|c| {
            let v = &c["securityContext"]["runAsNonRoot"];
            !(v == true || (v.is_null() && pod_non_root))
        })
        .collect();
    if !not_non_root.is_empty() {
        let who = if pod_non_root {
            names(&not_non_root)
        } else {
            format!("pod or {}", names(&not_non_root))
        };
        out.push(format!(
            "runAsNonRoot != true ({who} must set securityContext.runAsNonRoot=true)"
        ));
    }
    let root_users: Vec<&Value> = cs
        .iter()
        .copied()
        .filter(|c| c["securityContext"]["runAsUser"] == 0)
        .collect();
    if psc["runAsUser"] == 0 {
        out.push("runAsUser=0 (pod must not set runAsUser=0)".into());
    } else if !root_users.is_empty() {
        out.push(format!(
            "runAsUser=0 ({} must not set runAsUser=0)",
            names(&root_users)
        ));
    }
    let ok_seccomp = |s: &Value| {
        matches!(
            s["seccompProfile"]["type"].as_str(),
            Some("RuntimeDefault" | "Localhost")
        )
    };
    let pod_seccomp = ok_seccomp(psc);
    let no_seccomp: Vec<&Value> = cs
        .iter()
        .copied()
        .filter(|c| {
            let s = &c["securityContext"];
            if s["seccompProfile"].is_null() {
                !pod_seccomp
            } else {
                !ok_seccomp(s)
            }
        })
        .collect();
    if !no_seccomp.is_empty() {
        let who = if pod_seccomp {
            names(&no_seccomp)
        } else {
            format!("pod or {}", names(&no_seccomp))
        };
        out.push(format!("seccompProfile ({who} must set securityContext.seccompProfile.type to \"RuntimeDefault\" or \"Localhost\")"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restricted_pod_passes_and_default_pod_does_not() {
        let ok = json!({"spec": {
            "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "main", "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}}],
            "volumes": [{"name": "w", "emptyDir": {}}],
        }});
        assert!(
            violations(&ok, "restricted").is_empty(),
            "{:?}",
            violations(&ok, "restricted")
        );
        let bad = json!({"spec": {"containers": [{"name": "main"}], "volumes": [{"name": "h", "hostPath": {"path": "/"}}]}});
        assert_eq!(
            violations(&bad, "baseline"),
            vec![r#"hostPath volumes (volume "h")"#]
        );
        assert_eq!(
            violations(&bad, "restricted"),
            vec![
                r#"hostPath volumes (volume "h")"#,
                r#"restricted volume types (volume "h" uses restricted volume type "hostPath")"#,
                r#"allowPrivilegeEscalation != false (container "main" must set securityContext.allowPrivilegeEscalation=false)"#,
                r#"unrestricted capabilities (container "main" must set securityContext.capabilities.drop=["ALL"])"#,
                r#"runAsNonRoot != true (pod or container "main" must set securityContext.runAsNonRoot=true)"#,
                r#"seccompProfile (pod or container "main" must set securityContext.seccompProfile.type to "RuntimeDefault" or "Localhost")"#,
            ]
        );
    }
}
