//! `agenttask render`: a task message in, every Kubernetes object it would become out, as YAML,
//! from the same validator and builders the service uses (a dry run, like `helm template`).
//! Rendered objects are not stored anywhere, so they carry no ownerReferences (those need the
//! AgentTask's uid) and the task id is the nil uuid. With `--backend sandbox` and a tenant whose
//! `warm_pool` is set, an eligible task renders as its claim and the pool's NetworkPolicy, followed
//! by the pool's template and pool, which an operator applies once.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use base64::Engine as _;
use clap::{Args, ValueEnum};
use serde::Serialize;

use super::crd::TaskBackend;
use super::{materialize, podspec, sandbox, KubeSettings, Namespaces};
use crate::domain::tenant::{TenantName, TenantPolicy};
use crate::domain::validate::{validate, BackendIsolation, Envelope};
use crate::exec::{Job, RunKey};

/// Which backend's objects to render.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RenderBackend {
    Podjob,
    Runtimeclass,
    Sandbox,
}

#[derive(Debug, Clone, Args)]
pub struct RenderArgs {
    /// podjob (standard isolation), runtimeclass (a task asking for a RuntimeClass) or sandbox
    #[arg(long, value_enum)]
    pub backend: RenderBackend,
    /// The tenant the task belongs to
    #[arg(long)]
    pub tenant: String,
    /// Tenants file to take the tenant's policy from [default: the contract's defaults, with
    /// the task's isolation allowed]
    #[arg(long, env = "AGENTTASK_TENANTS")]
    pub tenants: Option<PathBuf>,
    /// Namespace of the objects [default: agenttask]
    #[arg(long)]
    pub namespace: Option<String>,
    /// Put them in agenttask-<tenant>
    #[arg(long)]
    pub namespace_per_tenant: bool,
    /// The artifacts claim the service is configured with (--artifacts-pvc): the pod mounts
    /// its sub-path for the task [default: none]
    #[arg(long, env = "AGENTTASK_ARTIFACTS_PVC")]
    pub artifacts_pvc: Option<String>,
    /// Namespace the service's own pods run in (the service's --service-namespace): a warm
    /// pool's NetworkPolicy admits only them [default: agenttask-system]
    #[arg(long, env = "AGENTTASK_SERVICE_NAMESPACE")]
    pub service_namespace: Option<String>,
    /// The task message body (JSON), or - for stdin
    pub task: PathBuf,
}

/// Runs `render`; exit 0 with the YAML on stdout, 1 when the task is refused, 2 for usage.
pub fn main(args: &RenderArgs) -> ExitCode {
    match render(args) {
        Ok(yaml) => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        Err((code, message)) => {
            eprintln!("error: {message}");
            ExitCode::from(code)
        }
    }
}

fn yaml_doc<T: Serialize>(out: &mut String, obj: &T) {
    out.push_str("---\n");
    out.push_str(&serde_saphyr::to_string(obj).expect("Kubernetes objects serialize"));
}

/// The warm path's objects: the claim on `pool` and the pool's NetworkPolicy, which the service
/// applies, then the pool's template and the pool, which the operator applies once (with the
/// token Secret, made by hand so that it is in no file).
fn warm(
    out: &mut String,
    task: &super::crd::AgentTask,
    ns: &str,
    pool: &str,
    settings: &KubeSettings,
    resources: &sandbox::PoolResources,
    deadline: chrono::DateTime<chrono::Utc>,
) {
    let version = sandbox::SandboxApiVersion::default();
    let name = task.metadata.name.clone().unwrap_or_default();
    let mut labels = podspec::labels_of(task);
    labels.insert(sandbox::LABEL_CLAIM_POOL.to_owned(), pool.to_owned());
    let meta = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        name: Some(podspec::pod_name(&name, 1)),
        namespace: Some(ns.to_owned()),
        labels: Some(labels),
        ..Default::default()
    };
    let shutdown = sandbox::shutdown_time(deadline, sandbox::DEFAULT_SHUTDOWN_GRACE);
    out.push_str(&format!(
        "# The task claims a pre-warmed sandbox of warm pool {pool}; the service then hands the task's code and \
         inputs to the claimed pod's task agent (src/kube/agent-sandbox.md).\n"
    ));
    yaml_doc(out, &sandbox::claim(meta, version, pool, pool, shutdown));
    yaml_doc(out, &sandbox::pool_network_policy(pool, ns, &settings.service_namespace));
    out.push_str(&format!(
        "# Applied once by the operator for warm pool {pool}, with its token Secret:\n\
         #   kubectl -n {ns} create secret generic {} --from-literal=token=$(openssl rand -hex 32)\n",
        sandbox::token_secret_name(pool)
    ));
    yaml_doc(out, &sandbox::warm_template(pool, ns, &settings.pods, resources, version));
    yaml_doc(out, &sandbox::warm_pool(pool, ns, RENDERED_REPLICAS, version));
}

/// The `replicas` of a rendered warm pool (the operator sizes it; it scales like a Deployment).
const RENDERED_REPLICAS: u32 = 2;

/// The YAML, or an exit code and a message.
pub fn render(args: &RenderArgs) -> Result<String, (u8, String)> {
    let backend = match args.backend {
        RenderBackend::Sandbox => TaskBackend::Sandbox,
        RenderBackend::Podjob => TaskBackend::Podjob,
        RenderBackend::Runtimeclass => TaskBackend::Runtimeclass,
    };
    let tenant = TenantName::parse(&args.tenant).map_err(|e| (2, format!("--tenant: {e}")))?;
    let body = if args.task.as_os_str() == "-" {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut b)
            .map_err(|e| (2, format!("cannot read stdin: {e}")))?;
        b
    } else {
        std::fs::read(&args.task).map_err(|e| (2, format!("cannot read {}: {e}", args.task.display())))?
    };
    let policy = match &args.tenants {
        Some(path) => {
            let tenants = crate::config::load_tenants_file(path).map_err(|e| (2, e.to_string()))?;
            tenants
                .get(&tenant)
                .cloned()
                .ok_or_else(|| (2, format!("tenant {tenant:?} is not in {}", path.display())))?
        }
        None => {
            // A preview: allow whatever isolation the task names.
            let mut p = TenantPolicy::default();
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
                if let Some(i) = v.get("isolation").and_then(|i| i.as_str()) {
                    p.isolation.push(i.to_owned());
                }
            }
            p
        }
    };
    let env = Envelope { body: &body, message_id: None, content_type: Some("application/json") };
    let sub = validate(&tenant, &policy, BackendIsolation::Any, &env)
        .map_err(|r| (1, format!("the task would be Rejected ({}): {}", r.reason.as_str(), r.message)))?;
    let spec = sub.spec;
    match (backend, spec.isolation.as_str()) {
        (TaskBackend::Podjob, iso) if iso != "standard" => {
            return Err((2, format!("the task asks for isolation {iso:?}: render it with --backend runtimeclass")))
        }
        (TaskBackend::Runtimeclass, "standard") => {
            return Err((2, "the runtimeclass backend runs tasks whose isolation is a RuntimeClass (e.g. \"gvisor\"); this task's is \"standard\"".into()))
        }
        _ => {}
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut files = std::collections::BTreeMap::new();
    for (name, encoded) in &spec.program.files {
        files.insert(name.clone(), b64.decode(encoded).map_err(|e| (1, format!("file {name}: {e}")))?);
    }
    let job = Job {
        key: RunKey { task_id: uuid::Uuid::nil(), attempt: 1 },
        tenant: tenant.as_str().to_owned(),
        language: spec.language,
        code: spec.program.code.clone(),
        files,
        stdin: spec.program.stdin.clone(),
        args: spec.program.args.clone(),
        env: spec.program.env.clone(),
        timeout: Duration::from_secs(u64::from(spec.timeout_seconds)),
        cpu_millis: spec.cpu_millis,
        memory_bytes: spec.memory_bytes,
        isolation: spec.isolation.clone(),
        labels: spec.labels.clone(),
        batch_id: spec.batch_id.clone(),
        priority: spec.priority,
        artifact_quota_bytes: policy.max_artifact_bytes,
        kube_object: None,
    };
    let mut settings = KubeSettings::default();
    if args.namespace_per_tenant {
        settings.namespaces = Namespaces::PerTenant { prefix: super::TENANT_NAMESPACE_PREFIX.into() };
    } else if let Some(ns) = &args.namespace {
        settings.namespaces = Namespaces::Single(ns.clone());
    }
    if let Some(claim) = &args.artifacts_pvc {
        super::check_claim_name(claim).map_err(|e| (2, format!("--artifacts-pvc: {e}")))?;
        settings.pods.artifacts_claim = Some(claim.clone());
    }
    if let Some(ns) = &args.service_namespace {
        super::check_namespace_name(ns).map_err(|e| (2, format!("--service-namespace: {e}")))?;
        settings.service_namespace = ns.clone();
    }
    let ns = settings.namespaces.for_tenant(tenant.as_str());
    let (task, external) = materialize::agent_task(&job, &ns, backend, settings.ttl_seconds_after_finished);
    let mut out = String::from("# Rendered by `agenttask render`: the objects this task becomes (dry run).\n");
    yaml_doc(&mut out, &task);
    let deadline = chrono::Utc::now() + chrono::Duration::seconds(i64::from(spec.timeout_seconds));
    if let (TaskBackend::Sandbox, Some(pool)) = (backend, policy.warm_pool.as_deref()) {
        let resources =
            sandbox::PoolResources { cpu_millis: policy.default_cpu_millis, memory_bytes: policy.default_memory_bytes };
        match sandbox::warm_ineligible(&task, &resources, settings.pods.artifacts_claim.is_some()) {
            None => {
                warm(&mut out, &task, &ns, pool, &settings, &resources, deadline);
                return Ok(out);
            }
            Some(why) => out.push_str(&format!("# Runs cold, not on warm pool {pool}: {why}.\n")),
        }
    }
    if backend == TaskBackend::Sandbox {
        // The cold path, shut down as if it were created now.
        let objects = sandbox::build(
            &task,
            &settings.pods,
            &settings.defaults,
            sandbox::SandboxApiVersion::default(),
            deadline,
            sandbox::DEFAULT_SHUTDOWN_GRACE,
        )
        .map_err(|e| (1, e.to_string()))?;
        for cm in external.iter().chain(&objects.config_maps) {
            yaml_doc(&mut out, cm);
        }
        yaml_doc(&mut out, &objects.network_policy);
        yaml_doc(&mut out, &objects.sandbox);
        return Ok(out);
    }
    let objects = podspec::build(&task, &settings.pods, &settings.defaults).map_err(|e| (1, e.to_string()))?;
    for cm in external.iter().chain(&objects.config_maps) {
        yaml_doc(&mut out, cm);
    }
    yaml_doc(&mut out, &objects.network_policy);
    yaml_doc(&mut out, &objects.pod);
    Ok(out)
}
