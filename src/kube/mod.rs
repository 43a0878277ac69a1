//! The Kubernetes backends: admitted tasks become `AgentTask` custom resources, and a
//! controller in the kube-rs `Controller` style turns each into hardened objects (input
//! ConfigMaps, a default-deny NetworkPolicy, a Pod) and writes what it observes to the
//! AgentTask's status.
//!
//! # Layout
//! - [`crd`]: the `AgentTask` resource (spec, status, schema validation); `agenttask crd`.
//! - [`podspec`]: pure builders of every object a task becomes, and the parser of a pod's log;
//!   `agenttask render` prints their output.
//! - [`direct`]: pure: AgentTasks users apply themselves: their tenant (from the namespace),
//!   their validation (the ingest validator), the namespaces to watch.
//! - [`materialize`]: pure: an admitted [`crate::exec::Job`] → the AgentTask (and, for big
//!   inputs, the ConfigMaps it refers to).
//! - [`reconcile`]: the controller (reconcile, error policy, finalizer, Events, TTL and orphan
//!   cleanup), run by one process at a time under a Postgres advisory lock.
//! - [`render`]: `agenttask render`, the dry run.
//! - [`sandbox`]: pure builders of the agent-sandbox objects (`Sandbox`, `SandboxClaim`) of
//!   `--kube-backend sandbox`, and what their statuses say; the warm path's pure parts (the pool's
//!   template, pool and NetworkPolicy, eligibility, the pool decision, the hand-over request).
//! - `warm`: the warm path's I/O (claims on a tenant's warm pool, the hand-over to the claimed
//!   pod), called by the reconciler for `--kube-backend sandbox` tasks.
//! - [`backend`]: the [`crate::exec::Backend`] the executor drives: applies AgentTasks, watches
//!   their status and reports it as run events; cancels by deleting; adopts after a restart.
//!
//! The executor never talks to pods: it only sees the AgentTask's status, so the CR status,
//! the database row and the result message all come from the same observations.

pub mod backend;
pub mod crd;
pub mod direct;
pub mod materialize;
pub mod podspec;
pub mod reconcile;
pub mod render;
pub mod sandbox;
mod warm;

use std::time::Duration;

pub use podspec::{PodSettings, TaskDefaults};

/// Which flavour of the Kubernetes backend runs standard tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KubeBackendKind {
    /// A hardened Pod and a default-deny NetworkPolicy per task.
    Podjob,
    /// kubernetes-sigs agent-sandbox `Sandbox` objects, or claims on a tenant's warm pool.
    Sandbox,
}

/// Where the service's pod mounts the artifacts claim unless told otherwise.
pub const DEFAULT_ARTIFACTS_PVC_MOUNT: &str = "/var/lib/agenttask/artifacts-pvc";

/// The namespace of the service's pods in `deploy/kubernetes`.
pub const DEFAULT_SERVICE_NAMESPACE: &str = "agenttask-system";

/// The namespace prefix of `--namespace-per-tenant`: tenant `acme` lives in `agenttask-acme`.
pub const TENANT_NAMESPACE_PREFIX: &str = "agenttask-";

/// Checks a namespace name as the API server would (an RFC 1123 label).
pub fn check_namespace_name(name: &str) -> Result<(), String> {
    // A tenant name has exactly a namespace name's shape (an RFC 1123 label).
    crate::domain::tenant::TenantName::parse(name).map(drop).map_err(|_| {
        format!(
            "{name:?} is not a valid namespace name: at most 63 lowercase letters, digits and '-', \
             starting and ending with a letter or digit"
        )
    })
}

/// Checks a PersistentVolumeClaim name as the API server would (an RFC 1123 subdomain).
pub fn check_claim_name(name: &str) -> Result<(), String> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.len() <= 253 && name.split('.').all(label_ok) {
        return Ok(());
    }
    Err(format!(
        "{name:?} is not a valid claim name: at most 253 lowercase letters, digits, '-' and '.', \
         starting and ending with a letter or digit"
    ))
}

/// Where AgentTasks live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Namespaces {
    /// Every task in this namespace.
    Single(String),
    /// Each tenant's tasks in `<prefix><tenant>`.
    PerTenant { prefix: String },
}

impl Namespaces {
    pub fn for_tenant(&self, tenant: &str) -> String {
        match self {
            Namespaces::Single(ns) => ns.clone(),
            Namespaces::PerTenant { prefix } => format!("{prefix}{tenant}"),
        }
    }
}

/// Everything the Kubernetes backend and its reconciler need to know.
#[derive(Debug, Clone)]
pub struct KubeSettings {
    /// A kubeconfig file; without it the client is configured as kube-rs finds it.
    pub kubeconfig: Option<std::path::PathBuf>,
    pub namespaces: Namespaces,
    pub pods: PodSettings,
    pub defaults: TaskDefaults,
    /// How long a pod may wait for its image before the task fails with `ImagePullFailed`.
    pub image_pull_grace: Duration,
    /// `ttlSecondsAfterFinished` of AgentTasks the service makes.
    pub ttl_seconds_after_finished: u32,
    /// How often the reconciler looks for orphaned pods and ConfigMaps.
    pub orphan_sweep_every: Duration,
    /// Bound on the runs one executor process watches (bookkeeping only).
    pub max_runs: usize,
    /// What tasks become: podjob's Pod, or an agent-sandbox Sandbox.
    pub backend: KubeBackendKind,
    /// The agent-sandbox API version spoken with `backend: sandbox`.
    pub sandbox_version: sandbox::SandboxApiVersion,
    /// How long after a task's deadline agent-sandbox itself shuts its Sandbox down.
    pub sandbox_shutdown_grace: Duration,
    /// Where the service's pod mounts the artifacts claim (`pods.artifacts_claim`), if any.
    pub artifacts_pvc_mount: std::path::PathBuf,
    /// The namespace of the service's own pods: warm pools' NetworkPolicies admit only them.
    pub service_namespace: String,
}

impl Default for KubeSettings {
    fn default() -> Self {
        KubeSettings {
            kubeconfig: None,
            namespaces: Namespaces::Single("agenttask".into()),
            pods: PodSettings::default(),
            defaults: TaskDefaults::default(),
            image_pull_grace: Duration::from_secs(120),
            ttl_seconds_after_finished: crd::DEFAULT_TTL_SECONDS,
            orphan_sweep_every: Duration::from_secs(60),
            max_runs: 10_000,
            backend: KubeBackendKind::Podjob,
            sandbox_version: sandbox::SandboxApiVersion::default(),
            sandbox_shutdown_grace: sandbox::DEFAULT_SHUTDOWN_GRACE,
            artifacts_pvc_mount: DEFAULT_ARTIFACTS_PVC_MOUNT.into(),
            service_namespace: DEFAULT_SERVICE_NAMESPACE.into(),
        }
    }
}

impl KubeSettings {
    /// The artifacts claim's sink as the service's mount sees it, when a claim is configured.
    /// Cheap and without I/O; every instance counts usage from the claim itself, so the
    /// backend, the reconciler and the HTTP API may each hold their own.
    pub fn artifact_sink(&self) -> Option<crate::exec::artifacts::PvcSink> {
        self.pods
            .artifacts_claim
            .as_ref()
            .map(|_| crate::exec::artifacts::PvcSink::new(self.artifacts_pvc_mount.clone(), Default::default()))
    }
}

/// The name of the AgentTask of task `id`.
pub fn agent_task_name(task_id: uuid::Uuid) -> String {
    format!("at-{task_id}")
}

/// Why no Kubernetes client could be made; each says where the configuration came from.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("kubeconfig {}: {source}", path.display())]
    Kubeconfig {
        path: std::path::PathBuf,
        #[source]
        source: ::kube::config::KubeconfigError,
    },
    #[error("no usable kubeconfig or in-cluster configuration ({0}); pass --kubeconfig FILE or set KUBECONFIG")]
    Infer(#[source] ::kube::config::InferConfigError),
    #[error("cannot build a Kubernetes client: {0}")]
    Build(#[source] ::kube::Error),
}

/// A client from `settings.kubeconfig`, or from the kubeconfig or in-cluster configuration as
/// kube-rs finds it.
pub async fn client(settings: &KubeSettings) -> Result<::kube::Client, ClientError> {
    let config = match &settings.kubeconfig {
        Some(path) => {
            let bad = |source| ClientError::Kubeconfig { path: path.clone(), source };
            let kc = ::kube::config::Kubeconfig::read_from(path).map_err(bad)?;
            ::kube::Config::from_custom_kubeconfig(kc, &::kube::config::KubeConfigOptions::default())
                .await
                .map_err(bad)?
        }
        None => ::kube::Config::infer().await.map_err(ClientError::Infer)?,
    };
    ::kube::Client::try_from(config).map_err(ClientError::Build)
}
