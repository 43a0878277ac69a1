//! Every manifest the project emits, checked against the Kubernetes schemas with
//! `kubernetes-validate --strict` (PyPI; `deploy/local/common.sh` installs it): the objects
//! `agenttask render` makes for each backend (Pods, NetworkPolicies, ConfigMaps, big inputs
//! split over several ConfigMaps), the CRD, and everything under deploy/ (also as kustomize
//! builds it).

use std::path::{Path, PathBuf};
use std::process::Command;

use agenttask::kube::render::{render, RenderArgs, RenderBackend};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `kubernetes-validate --strict` on `files`; returns its report, failing on any error.
fn validate(files: &[PathBuf]) -> String {
    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict"])
        .args(files)
        .output()
        .expect("python3 runs (deploy/local/common.sh installs kubernetes-validate)");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "kubernetes-validate --strict refused:\n{report}");
    assert!(!report.contains("ERROR"), "{report}");
    report
}

fn rendered(dir: &Path, name: &str, backend: RenderBackend, task: serde_json::Value) -> PathBuf {
    let input = dir.join(format!("{name}.json"));
    std::fs::write(&input, serde_json::to_vec(&task).unwrap()).unwrap();
    let args = RenderArgs {
        backend,
        tenant: "acme".into(),
        tenants: None,
        namespace: None,
        namespace_per_tenant: false,
        artifacts_pvc: None,
        service_namespace: None,
        task: input,
    };
    let yaml = render(&args).unwrap_or_else(|(c, m)| panic!("render {name} failed ({c}): {m}"));
    let out = dir.join(format!("{name}.yaml"));
    std::fs::write(&out, yaml).unwrap();
    out
}

#[test]
fn rendered_objects_pass_strict_schema_validation() {
    let dir = tempfile::tempdir().unwrap();
    let big = "x".repeat(900 * 1024);
    let files = [
        rendered(
            dir.path(),
            "podjob",
            RenderBackend::Podjob,
            serde_json::json!({
                "language": "python", "code": "print(1)", "args": ["a"], "env": {"K": "v"}, "stdin": "in",
                "files": {"data.csv": {"content": "a,b\n"}, "blob": {"content_base64": "AAEC"}},
                "resources": {"cpu": "250m", "memory": "128Mi"}, "timeout_seconds": 20, "batch_id": "b-1"
            }),
        ),
        rendered(
            dir.path(),
            "runtimeclass",
            RenderBackend::Runtimeclass,
            serde_json::json!({
                "language": "r", "code": "cat(1)", "isolation": "gvisor"
            }),
        ),
        rendered(
            dir.path(),
            "big",
            RenderBackend::Podjob,
            serde_json::json!({
                "language": "python", "code": "print(1)",
                "files": {"a.txt": {"content": big}, "b.txt": {"content": big}, "c.txt": {"content": big}}
            }),
        ),
    ];
    let report = validate(&files);
    for kind in ["pod/", "networkpolicy/", "configmap/"] {
        assert!(report.contains(&format!("passed for resource {kind}")), "no {kind} was validated:\n{report}");
    }
    // The big task's inputs are split: several ConfigMaps, each under the 1 MiB limit.
    let big_yaml = std::fs::read_to_string(&files[2]).unwrap();
    assert!(big_yaml.matches("kind: ConfigMap").count() >= 4, "{}", &big_yaml[..2000]);
    let pod = std::fs::read_to_string(&files[1]).unwrap();
    assert!(pod.contains("runtimeClassName: gvisor"), "{pod}");
}

/// `render --backend sandbox`: the cold path's Sandbox. kubernetes-validate has no schema for
/// agent-sandbox's kinds, so its pod template is checked as the Pod the controller makes of it.
#[test]
fn rendered_sandbox_pod_template_passes_strict_schema_validation() {
    let dir = tempfile::tempdir().unwrap();
    let file = rendered(
        dir.path(),
        "sandbox",
        RenderBackend::Sandbox,
        serde_json::json!({"language": "python", "code": "print(1)", "isolation": "gvisor", "timeout_seconds": 20}),
    );
    let yaml = std::fs::read_to_string(&file).unwrap();
    let docs: Vec<serde_json::Value> = yaml
        .split("\n---\n")
        .skip(1)
        .map(|d| serde_saphyr::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}")))
        .collect();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["AgentTask", "ConfigMap", "NetworkPolicy", "Sandbox"], "{yaml}");
    assert_eq!(docs[0]["spec"]["backend"], "sandbox");
    let sb = &docs[3];
    assert_eq!(sb["apiVersion"], "agents.x-k8s.io/v1beta1");
    assert_eq!(sb["spec"]["shutdownPolicy"], "Delete");
    let shutdown = chrono::DateTime::parse_from_rfc3339(sb["spec"]["shutdownTime"].as_str().unwrap()).unwrap();
    let after = shutdown.with_timezone(&chrono::Utc) - chrono::Utc::now();
    assert!(after > chrono::Duration::seconds(300) && after <= chrono::Duration::seconds(321), "{after}");
    let template = &sb["spec"]["podTemplate"];
    assert_eq!(template["spec"]["runtimeClassName"], "gvisor");
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": sb["metadata"]["name"], "namespace": sb["metadata"]["namespace"],
            "labels": template["metadata"]["labels"]},
        "spec": template["spec"],
    });
    let pod_file = dir.path().join("sandbox-pod.json");
    std::fs::write(&pod_file, serde_json::to_vec(&pod).unwrap()).unwrap();
    let report = validate(&[file, pod_file]);
    for kind in ["pod/", "networkpolicy/", "configmap/"] {
        assert!(report.contains(&format!("passed for resource {kind}")), "no {kind} was validated:\n{report}");
    }
}

/// `render --backend sandbox` for a tenant with a warm pool: the claim and the pool's
/// NetworkPolicy, then the pool's template and the pool for the operator. The NetworkPolicy and
/// the template's pod (as the Pod agent-sandbox makes of it) pass strict validation.
#[test]
fn rendered_warm_pool_objects_pass_strict_schema_validation() {
    let dir = tempfile::tempdir().unwrap();
    let tenants = dir.path().join("tenants.toml");
    std::fs::write(&tenants, "[tenants.acme]\nwarm_pool = \"py\"\n").unwrap();
    let input = dir.path().join("task.json");
    std::fs::write(&input, r#"{"language": "python", "code": "print(1)", "timeout_seconds": 20}"#).unwrap();
    let args = RenderArgs {
        backend: RenderBackend::Sandbox,
        tenant: "acme".into(),
        tenants: Some(tenants),
        namespace: None,
        namespace_per_tenant: false,
        artifacts_pvc: None,
        service_namespace: None,
        task: input,
    };
    let yaml = render(&args).unwrap_or_else(|(c, m)| panic!("render failed ({c}): {m}"));
    let docs: Vec<serde_json::Value> = yaml
        .split("\n---\n")
        .skip(1)
        .map(|d| serde_saphyr::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}")))
        .collect();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["AgentTask", "SandboxClaim", "NetworkPolicy", "SandboxTemplate", "SandboxWarmPool"], "{yaml}");
    let claim = &docs[1];
    assert_eq!(claim["spec"]["warmPoolRef"]["name"], "py");
    assert_eq!(claim["spec"]["lifecycle"]["shutdownPolicy"], "Delete");
    assert!(yaml.contains("kubectl -n agenttask create secret generic py-agent-token"), "{yaml}");
    let template = &docs[3]["spec"]["podTemplate"];
    assert_eq!(docs[3]["spec"]["networkPolicyManagement"], "Unmanaged");
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "py-abcde", "namespace": "agenttask", "labels": template["metadata"]["labels"]},
        "spec": template["spec"],
    });
    let np = serde_json::json!(docs[2]);
    let (pod_file, np_file) = (dir.path().join("pool-pod.json"), dir.path().join("pool-np.json"));
    std::fs::write(&pod_file, serde_json::to_vec(&pod).unwrap()).unwrap();
    std::fs::write(&np_file, serde_json::to_vec(&np).unwrap()).unwrap();
    let report = validate(&[pod_file, np_file]);
    for kind in ["pod/", "networkpolicy/"] {
        assert!(report.contains(&format!("passed for resource {kind}")), "no {kind} was validated:\n{report}");
    }
    // The pool's agent port admits the service's pods only, from its namespace (--service-namespace).
    let from = &np["spec"]["ingress"][0]["from"][0];
    assert_eq!(from["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"], "agenttask-system", "{np:#}");
    assert_eq!(from["podSelector"]["matchLabels"]["app.kubernetes.io/name"], "agenttask", "{np:#}");
    let elsewhere = RenderArgs { service_namespace: Some("platform".into()), ..args.clone() };
    let yaml = render(&elsewhere).unwrap_or_else(|(c, m)| panic!("render failed ({c}): {m}"));
    assert!(yaml.contains("kubernetes.io/metadata.name: platform"), "{yaml}");
    let bad = RenderArgs { service_namespace: Some("Not_A_Namespace".into()), ..args.clone() };
    assert!(matches!(render(&bad), Err((2, m)) if m.starts_with("--service-namespace")));
    // Not warm: an R task of the same tenant renders the cold Sandbox, saying why.
    let input = dir.path().join("r.json");
    std::fs::write(&input, r#"{"language": "r", "code": "cat(1)"}"#).unwrap();
    let yaml = render(&RenderArgs { task: input, ..args }).unwrap_or_else(|(c, m)| panic!("render failed ({c}): {m}"));
    assert!(yaml.contains("# Runs cold, not on warm pool py: the warm pool runs Python tasks only."), "{yaml}");
    assert!(yaml.contains("kind: Sandbox\n"), "{yaml}");
}

#[test]
fn deploy_manifests_pass_strict_schema_validation() {
    let mut files = vec![root().join("deploy/crd.yaml")];
    for entry in std::fs::read_dir(root().join("deploy/kubernetes")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "yaml") {
            files.push(p);
        }
    }
    assert!(files.len() >= 6, "{files:?}");
    // What `kubectl apply -k deploy/` would apply, built by the machine's kubectl.
    let built =
        Command::new("/usr/bin/kubectl").args(["kustomize"]).arg(root().join("deploy")).output().expect("kubectl runs");
    assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
    let dir = tempfile::tempdir().unwrap();
    let kustomized = dir.path().join("kustomized.yaml");
    std::fs::write(&kustomized, &built.stdout).unwrap();
    files.push(kustomized);
    let report = validate(&files);
    for kind in [
        "customresourcedefinition/",
        "deployment/",
        "role/",
        "rolebinding/",
        "serviceaccount/",
        "service/",
        "configmap/",
        "namespace/",
    ] {
        assert!(report.contains(&format!("passed for resource {kind}")), "no {kind} was validated:\n{report}");
    }
}

/// The artifacts claim: the component deploy/artifacts-pvc (claims, and the Deployment mounting
/// one), as kustomize builds deploy/ with it, and a pod rendered with `--artifacts-pvc`.
#[test]
fn the_artifacts_claim_component_and_pod_pass_strict_schema_validation() {
    let dir = tempfile::tempdir().unwrap();
    // An overlay of deploy/ with the component, as an operator's kustomization would be (kustomize
    // refuses absolute roots and overlays inside their base, so it reaches deploy/ by a link).
    std::os::unix::fs::symlink(root().join("deploy"), dir.path().join("deploy")).unwrap();
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        "resources:\n  - deploy\ncomponents:\n  - deploy/artifacts-pvc\n",
    )
    .unwrap();
    let built = Command::new("/usr/bin/kubectl").args(["kustomize"]).arg(dir.path()).output().expect("kubectl runs");
    assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
    let kustomized = dir.path().join("kustomized.yaml");
    std::fs::write(&kustomized, &built.stdout).unwrap();
    let yaml = String::from_utf8_lossy(&built.stdout).into_owned();
    assert!(yaml.contains("claimName: task-artifacts") && yaml.contains("value: task-artifacts"), "{yaml}");

    let input = dir.path().join("task.json");
    std::fs::write(&input, br#"{"language": "python", "code": "print(1)"}"#).unwrap();
    let args = RenderArgs {
        backend: RenderBackend::Podjob,
        tenant: "acme".into(),
        tenants: None,
        namespace: None,
        namespace_per_tenant: false,
        artifacts_pvc: Some("task-artifacts".into()),
        service_namespace: None,
        task: input,
    };
    let pod = render(&args).unwrap_or_else(|(c, m)| panic!("render failed ({c}): {m}"));
    assert!(pod.contains("claimName: task-artifacts") && pod.contains("subPath: runs/acme/"), "{pod}");
    let rendered = dir.path().join("rendered.yaml");
    std::fs::write(&rendered, pod).unwrap();

    let report = validate(&[kustomized, rendered]);
    for kind in ["persistentvolume/", "persistentvolumeclaim/", "deployment/", "pod/"] {
        assert!(report.contains(&format!("passed for resource {kind}")), "no {kind} was validated:\n{report}");
    }
}

#[test]
fn rbac_has_no_wildcards() {
    let rbac = std::fs::read_to_string(root().join("deploy/kubernetes/rbac.yaml")).unwrap();
    assert!(!rbac.contains('*'), "wildcard in RBAC:\n{rbac}");
    assert!(!rbac.contains("ClusterRole"), "the default install needs no cluster-wide rights");
    // The cluster-wide variant grants exactly the same rules.
    let cluster = std::fs::read_to_string(root().join("deploy/kubernetes/rbac-cluster.yaml")).unwrap();
    assert!(!cluster.contains('*'), "wildcard in RBAC:\n{cluster}");
    let rules = |text: &str| {
        let start = text.find("rules:").expect("rules");
        text[start..text[start..].find("---").map_or(text.len(), |e| start + e)].to_owned()
    };
    assert_eq!(rules(&cluster), rules(&rbac));
}
