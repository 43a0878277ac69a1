//! Pure: AgentTasks that users apply themselves with kubectl, without RabbitMQ.
//!
//! Such an object is a task submission like a message on a tenant's queue, so it goes through
//! the same validator: its spec is turned into the task message it stands for and validated
//! against its tenant's policy. The tenant comes from the object's namespace, never from the
//! object itself (`spec.tenant` is informational), and fields only the service may set
//! (`admission`, `inputsFrom`) are refused.

use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::crd::{AgentTaskSpec, TaskLanguage};
use super::Namespaces;
use crate::domain::phase::Reason;
use crate::domain::tenant::{TenantName, Tenants};
use crate::domain::validate::{self, BackendIsolation, Envelope, Rejection, Submission};

/// The tenant whose AgentTasks live in namespace `ns`: with `--namespace-per-tenant`,
/// `agenttask-<tenant>`; otherwise the tenant whose `namespaces` in the tenants file list it.
pub fn tenant_of_namespace(ns: &str, namespaces: &Namespaces, tenants: &Tenants) -> Option<TenantName> {
    match namespaces {
        Namespaces::PerTenant { prefix } => {
            let name = TenantName::parse(ns.strip_prefix(prefix.as_str())?).ok()?;
            tenants.contains_key(&name).then_some(name)
        }
        Namespaces::Single(_) => {
            tenants.iter().find(|(_, policy)| policy.namespaces.iter().any(|n| n == ns)).map(|(name, _)| name.clone())
        }
    }
}

/// Which namespaces the controller and the backend watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Namespace(String),
    /// Every namespace: per-tenant namespaces, or tenants that name namespaces of their own.
    All,
}

/// The watch scope for these settings and tenants: one namespace needs only a Role there;
/// tenants' own namespaces need the cluster-wide view.
pub fn watch_scope(namespaces: &Namespaces, tenants: &Tenants) -> Scope {
    match namespaces {
        Namespaces::Single(ns) if tenants.values().all(|p| p.namespaces.iter().all(|n| n == ns)) => {
            Scope::Namespace(ns.clone())
        }
        _ => Scope::All,
    }
}

/// [`watch_scope`] for the tenants in force now.
pub fn current_scope(namespaces: &Namespaces, tenants: &tokio::sync::watch::Receiver<Arc<Tenants>>) -> Scope {
    watch_scope(namespaces, &tenants.borrow())
}

/// The task message an AgentTask spec stands for (the contract's task message fields).
pub fn task_message(spec: &AgentTaskSpec) -> Value {
    let mut m = Map::new();
    let language = match spec.language {
        TaskLanguage::Python => "python",
        TaskLanguage::R => "r",
    };
    m.insert("language".into(), json!(language));
    m.insert("code".into(), json!(spec.code));
    if !spec.files.is_empty() {
        let files: Map<String, Value> = spec
            .files
            .iter()
            .map(|(name, f)| {
                let mut file = Map::new();
                if let Some(c) = &f.content {
                    file.insert("content".into(), json!(c));
                }
                if let Some(c) = &f.content_base64 {
                    file.insert("content_base64".into(), json!(c));
                }
                (name.clone(), Value::Object(file))
            })
            .collect();
        m.insert("files".into(), Value::Object(files));
    }
    if let Some(s) = &spec.stdin {
        m.insert("stdin".into(), json!(s));
    }
    if !spec.args.is_empty() {
        m.insert("args".into(), json!(spec.args));
    }
    if !spec.env.is_empty() {
        m.insert("env".into(), json!(spec.env));
    }
    if let Some(t) = spec.timeout_seconds {
        m.insert("timeout_seconds".into(), json!(t));
    }
    if let Some(r) = &spec.resources {
        let mut res = Map::new();
        if let Some(c) = &r.cpu {
            res.insert("cpu".into(), json!(c));
        }
        if let Some(mem) = &r.memory {
            res.insert("memory".into(), json!(mem));
        }
        m.insert("resources".into(), Value::Object(res));
    }
    if let Some(p) = spec.priority {
        m.insert("priority".into(), json!(p));
    }
    if let Some(b) = &spec.batch_id {
        m.insert("batch_id".into(), json!(b));
    }
    if !spec.labels.is_empty() {
        m.insert("labels".into(), json!(spec.labels));
    }
    if let Some(i) = &spec.isolation {
        m.insert("isolation".into(), json!(i));
    }
    Value::Object(m)
}

/// The answer to an AgentTask in a namespace that belongs to no tenant.
pub fn unknown_tenant(spec: &AgentTaskSpec, namespace: &str) -> Rejection {
    Rejection {
        reason: Reason::UnknownTenant,
        message: format!(
            "namespace {namespace} belongs to no tenant: list it in a tenant's `namespaces` in the tenants \
             file (or, with --namespace-per-tenant, use agenttask-<tenant>)"
        ),
        client_id: None,
        batch_id: spec.batch_id.clone(),
        language: None,
    }
}

/// Validates a directly applied AgentTask for its namespace's tenant, as ingest validates a
/// message.
pub fn validate_applied(
    spec: &AgentTaskSpec,
    tenant: &TenantName,
    policy: &crate::domain::tenant::TenantPolicy,
) -> Result<Submission, Rejection> {
    let refuse = |reason: Reason, message: String| Rejection {
        reason,
        message,
        client_id: None,
        batch_id: spec.batch_id.clone(),
        language: None,
    };
    if spec.admission.is_some() {
        return Err(refuse(
            Reason::ValidationFailed,
            "spec.admission is set by the service when it admits a task; remove it".into(),
        ));
    }
    if !spec.inputs_from.is_empty() {
        return Err(refuse(
            Reason::ValidationFailed,
            "spec.inputsFrom is only for AgentTasks the service makes; put code and files inline".into(),
        ));
    }
    let body = serde_json::to_vec(&task_message(spec)).expect("a JSON value serializes");
    let mut sub =
        validate::validate(tenant, policy, BackendIsolation::Any, &Envelope { body: &body, ..Default::default() })?;
    // The object is the identity; there is no client idempotency key.
    sub.client_id = None;
    Ok(sub)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::tenant::parse_tenants;
    use crate::kube::crd::{Admission, InputFile, TaskResources};

    fn tenants() -> Tenants {
        parse_tenants("[tenants.acme]\nnamespaces = [\"acme-evals\"]\nmax_timeout_seconds = 60\n[tenants.globex]\n")
            .unwrap()
    }

    #[test]
    fn the_namespace_names_the_tenant() {
        let t = tenants();
        let single = Namespaces::Single("agenttask".into());
        assert_eq!(tenant_of_namespace("acme-evals", &single, &t).unwrap().as_str(), "acme");
        assert_eq!(tenant_of_namespace("agenttask", &single, &t), None);
        assert_eq!(tenant_of_namespace("globex", &single, &t), None);
        let per = Namespaces::PerTenant { prefix: "agenttask-".into() };
        assert_eq!(tenant_of_namespace("agenttask-globex", &per, &t).unwrap().as_str(), "globex");
        assert_eq!(tenant_of_namespace("agenttask-initech", &per, &t), None, "not configured");
        assert_eq!(tenant_of_namespace("acme-evals", &per, &t), None, "per-tenant mode maps by name only");
    }

    #[test]
    fn tenants_namespaces_widen_the_watch() {
        let single = Namespaces::Single("agenttask".into());
        assert_eq!(watch_scope(&single, &tenants()), Scope::All);
        let plain = parse_tenants("[tenants.a]\n").unwrap();
        assert_eq!(watch_scope(&single, &plain), Scope::Namespace("agenttask".into()));
        assert_eq!(watch_scope(&Namespaces::PerTenant { prefix: "p-".into() }, &plain), Scope::All);
    }

    fn spec() -> AgentTaskSpec {
        AgentTaskSpec {
            language: TaskLanguage::R,
            code: "cat(1)".into(),
            files: [("d.csv".to_owned(), InputFile { content: Some("a,b".into()), content_base64: None })].into(),
            resources: Some(TaskResources { cpu: Some("250m".into()), memory: Some("64Mi".into()) }),
            timeout_seconds: Some(20),
            batch_id: Some("b1".into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_valid_spec_becomes_the_same_submission_as_its_message() {
        let t = tenants();
        let (name, policy) = t.iter().next().unwrap();
        let sub = validate_applied(&spec(), name, policy).unwrap();
        assert_eq!(sub.client_id, None);
        assert_eq!(sub.spec.timeout_seconds, 20);
        assert_eq!(sub.spec.cpu_millis, 250);
        assert_eq!(sub.spec.memory_bytes, 64 << 20);
        assert_eq!(sub.spec.batch_id.as_deref(), Some("b1"));
        assert_eq!(sub.spec.language, crate::domain::task::Language::R);
    }

    #[test]
    fn bad_specs_are_refused_with_the_validators_reasons() {
        let t = tenants();
        let (name, policy) = t.iter().next().unwrap();
        let reason = |s: &AgentTaskSpec| validate_applied(s, name, policy).unwrap_err().reason;
        let mut too_long = spec();
        too_long.timeout_seconds = Some(600);
        assert_eq!(reason(&too_long), Reason::ValidationFailed, "over the tenant's max_timeout_seconds");
        let mut forged = spec();
        forged.admission = Some(Admission { task_id: uuid::Uuid::nil().to_string(), attempt: 1 });
        assert_eq!(reason(&forged), Reason::ValidationFailed);
        let mut external = spec();
        external.inputs_from = vec!["cm".into()];
        assert_eq!(reason(&external), Reason::ValidationFailed);
        let mut env = spec();
        env.env.insert("AGENTTASK_RESULT_FILE".into(), "/etc/passwd".into());
        assert_eq!(reason(&env), Reason::ValidationFailed, "reserved names, as at ingest");
        let unknown = unknown_tenant(&spec(), "elsewhere");
        assert_eq!(unknown.reason, Reason::UnknownTenant);
        assert!(unknown.message.contains("namespace elsewhere"), "{}", unknown.message);
    }
}
