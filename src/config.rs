//! Service settings: flags, then `AGENTTASK_*` environment variables, then an optional
//! `agenttask.toml`, then built-in defaults. Resolving them is pure apart from reading files, and
//! every error says which setting to fix.
//!
//! The settings are declared once, in [`ServeArgs`]: clap reads it from flags and the
//! environment, serde reads the same struct from `agenttask.toml` (same names, snake_case,
//! unknown keys refused). [`Settings`] is the resolved, validated form.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use serde::Deserialize;

use crate::domain::quantity::{parse_cpu_millis, parse_memory_bytes};
use crate::domain::tenant::{parse_tenants, Tenants};

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/agenttask";
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:9464";

/// Where admitted tasks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// A bubblewrap sandbox on this host; needs no cluster.
    Local,
    /// AgentTask custom resources reconciled into Pods or Sandboxes in a cluster.
    Kubernetes,
    /// Runs NO code: every task succeeds at once with exit code 0 and empty output. Only for
    /// measuring the control plane (ingest, admission, results) apart from execution.
    Null,
}

/// The parts of the service that `serve` can run; each can scale on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Component {
    /// Consumes tenants' task queues and stores tasks.
    Ingest,
    /// Admits queued tasks under quotas.
    Scheduler,
    /// Runs admitted tasks on the local backend.
    Executor,
    /// Publishes results from the outbox with publisher confirms.
    Publisher,
    /// Serves /metrics, /healthz, /readyz and the task API.
    Http,
}

impl Component {
    pub const ALL: [Component; 5] =
        [Component::Ingest, Component::Scheduler, Component::Executor, Component::Publisher, Component::Http];
}

/// `agenttask serve` flags. Every one can also come from the environment or `agenttask.toml`
/// (the file holds every field but `config`).
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeArgs {
    /// Postgres URL; the database is created if missing [default: postgres://postgres@127.0.0.1:5432/agenttask]
    #[arg(long, env = "AGENTTASK_DATABASE_URL")]
    pub database_url: Option<String>,
    /// RabbitMQ URL [default: amqp://guest:guest@127.0.0.1:5672/%2f]
    #[arg(long, env = "AGENTTASK_AMQP_URL")]
    pub amqp_url: Option<String>,
    /// Tenants file (TOML): quotas per tenant, applied at start and on SIGHUP [default:
    /// ./tenants.toml if it exists, else the tenants last applied to the database]
    #[arg(long, env = "AGENTTASK_TENANTS")]
    pub tenants: Option<PathBuf>,
    /// Address of /metrics, /healthz, /readyz and the task API [default: 127.0.0.1:9464]
    #[arg(long, env = "AGENTTASK_HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// Where tasks run: local (a bubblewrap sandbox on this host), kubernetes, or null (runs
    /// nothing, every task succeeds at once: only for measuring the control plane) [default: local]
    #[arg(long, env = "AGENTTASK_BACKEND", value_enum)]
    pub backend: Option<BackendKind>,
    /// Run only these components (comma-separated) [default: all]
    #[arg(long, env = "AGENTTASK_COMPONENTS", value_enum, value_delimiter = ',')]
    pub components: Option<Vec<Component>>,
    /// Tasks running at once across all tenants [default: 8]
    #[arg(long, env = "AGENTTASK_MAX_RUNNING")]
    pub max_running: Option<u32>,
    /// Unacknowledged task messages per tenant queue. One tenant's ingest rate grows with it (each
    /// message waits for its group commit), and so does the memory a flood of large messages can
    /// hold (up to this many bodies per tenant); raise it for a few tenants that each publish fast
    /// [default: 16]
    #[arg(long, env = "AGENTTASK_PREFETCH")]
    pub prefetch: Option<u16>,
    /// Service state on disk: sandboxes' scratch space and artifacts [default: /var/lib/agenttask]
    #[arg(long, env = "AGENTTASK_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Cap on each of stdout and stderr per task, in bytes [default: 1048576]
    #[arg(long, env = "AGENTTASK_OUTPUT_LIMIT_BYTES")]
    pub output_limit_bytes: Option<usize>,
    /// Postgres connections this process keeps at most (besides the scheduler's leadership
    /// session and the notification listener); mind the server's max_connections [default: 32]
    #[arg(long, env = "AGENTTASK_DATABASE_POOL_SIZE")]
    pub database_pool_size: Option<u32>,
    /// Token that opens the admin and task API (Authorization: Bearer ...). Without it those
    /// endpoints are closed.
    #[arg(long, env = "AGENTTASK_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Total CPU the admitted tasks may ask for together, e.g. "16"; set it above the host's CPUs
    /// to overcommit on purpose [default: this host's CPU count with --backend local; unlimited
    /// with kubernetes (the cluster's scheduler places the pods) and null (nothing runs)]
    #[arg(long, env = "AGENTTASK_CAPACITY_CPU")]
    pub capacity_cpu: Option<String>,
    /// Total memory the admitted tasks may ask for together, e.g. "64Gi" [default: unlimited]
    #[arg(long, env = "AGENTTASK_CAPACITY_MEMORY")]
    pub capacity_memory: Option<String>,
    /// Half-life of the usage history that breaks fair-share ties; 0 turns it off [default: 60]
    #[arg(long, env = "AGENTTASK_USAGE_HALF_LIFE_SECONDS")]
    pub usage_half_life_seconds: Option<u64>,
    /// Times the broker may refuse a result before it is parked (kept in the outbox, shown in
    /// agenttask.parked_results, no longer retried until re-queued); retries back off from 1 s
    /// to 60 s [default: 10]
    #[arg(long, env = "AGENTTASK_OUTBOX_MAX_ATTEMPTS")]
    pub outbox_max_attempts: Option<u32>,
    /// Days after which finished tasks' stdout, stderr and artifacts are removed (the rest of
    /// the row stays, see --retention-delete-rows); 0 keeps them forever [default: 30]
    #[arg(long, env = "AGENTTASK_RETENTION_DAYS")]
    pub retention_days: Option<u32>,
    /// With retention, delete finished tasks' rows once past it instead of keeping them without
    /// their outputs (their client ids can then be used again)
    #[arg(long, env = "AGENTTASK_RETENTION_DELETE_ROWS")]
    #[serde(default)]
    pub retention_delete_rows: bool,
    /// Pre-started Python sandboxes the local backend keeps ready, so a Python task does not wait
    /// for its interpreter to start; each holds a sandbox uid and about 10 MiB; 0 turns them off
    /// [default: 2]
    #[arg(long, env = "AGENTTASK_WARM_PYTHON")]
    pub warm_python: Option<usize>,
    /// Pre-started R sandboxes the local backend keeps ready (each about 60 MiB); 0 turns them
    /// off [default: 1]
    #[arg(long, env = "AGENTTASK_WARM_R")]
    pub warm_r: Option<usize>,
    /// A warm sandbox idle this long is replaced by a fresh one (which also picks up upgraded
    /// runtimes) [default: 600]
    #[arg(long, env = "AGENTTASK_WARM_MAX_IDLE_SECONDS")]
    pub warm_max_idle_seconds: Option<u64>,
    /// Settings file [default: ./agenttask.toml when it exists]
    #[arg(long, env = "AGENTTASK_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// `--backend kubernetes` settings; the `[kubernetes]` table of `agenttask.toml`.
    #[command(flatten)]
    #[serde(default, rename = "kubernetes")]
    pub kube: KubeArgs,
}

/// Settings of `--backend kubernetes` (the README's Kubernetes section lists the defaults).
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeArgs {
    /// kubeconfig file to use [default: as kube-rs finds it: $KUBECONFIG, ~/.kube/config, in-cluster]
    #[arg(long, env = "AGENTTASK_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubernetes flavour of standard tasks: podjob (a hardened Pod) or sandbox [default: podjob]
    #[arg(long, env = "AGENTTASK_KUBE_BACKEND", value_enum)]
    pub kube_backend: Option<crate::kube::KubeBackendKind>,
    /// Namespace of AgentTasks and their pods [default: agenttask]
    #[arg(long, env = "AGENTTASK_NAMESPACE", conflicts_with = "namespace_per_tenant")]
    pub namespace: Option<String>,
    /// One namespace per tenant, agenttask-<tenant> (they must exist); AgentTasks applied directly
    /// in such a namespace belong to its tenant
    #[arg(long, env = "AGENTTASK_NAMESPACE_PER_TENANT")]
    #[serde(default)]
    pub namespace_per_tenant: bool,
    /// Image of Python tasks [default: python:3.12-slim]
    #[arg(long, env = "AGENTTASK_PYTHON_IMAGE")]
    pub python_image: Option<String>,
    /// Image of R tasks [default: r-base:4.4.1]
    #[arg(long, env = "AGENTTASK_R_IMAGE")]
    pub r_image: Option<String>,
    /// Seconds a pod may fail to pull its image before the task fails (ImagePullFailed) [default: 120]
    #[arg(long, env = "AGENTTASK_IMAGE_PULL_GRACE_SECONDS")]
    pub image_pull_grace_seconds: Option<u64>,
    /// Task label prefixes copied to pods as annotations, comma-separated [default: none]
    #[arg(long, env = "AGENTTASK_POD_ANNOTATION_PREFIXES", value_delimiter = ',')]
    pub pod_annotation_prefixes: Option<Vec<String>>,
    /// Seconds a finished AgentTask is kept [default: 3600]
    #[arg(long, env = "AGENTTASK_TTL_SECONDS_AFTER_FINISHED")]
    pub ttl_seconds_after_finished: Option<u32>,
    /// agent-sandbox API version of --kube-backend sandbox: v1beta1 or v1alpha1 [default: v1beta1]
    #[arg(long, env = "AGENTTASK_SANDBOX_API_VERSION", value_enum)]
    pub sandbox_api_version: Option<crate::kube::sandbox::SandboxApiVersion>,
    /// Seconds after a task's deadline at which agent-sandbox shuts its Sandbox down [default: 300]
    #[arg(long, env = "AGENTTASK_SANDBOX_SHUTDOWN_GRACE_SECONDS")]
    pub sandbox_shutdown_grace_seconds: Option<u64>,
    /// PersistentVolumeClaim (ReadWriteMany) that keeps task pods' artifacts; it must exist in
    /// the tasks' namespaces and be mounted in the service at --artifacts-pvc-mount [default:
    /// none: Kubernetes tasks keep no artifacts]
    #[arg(long, env = "AGENTTASK_ARTIFACTS_PVC")]
    pub artifacts_pvc: Option<String>,
    /// Where the service's own pod mounts the --artifacts-pvc claim [default: /var/lib/agenttask/artifacts-pvc]
    #[arg(long, env = "AGENTTASK_ARTIFACTS_PVC_MOUNT")]
    pub artifacts_pvc_mount: Option<PathBuf>,
    /// Namespace the service's own pods run in: warm pools' NetworkPolicies admit only them to
    /// the pool pods' task agent [default: agenttask-system]
    #[arg(long, env = "AGENTTASK_SERVICE_NAMESPACE")]
    pub service_namespace: Option<String>,
}

impl KubeArgs {
    fn or(self, file: KubeArgs) -> KubeArgs {
        KubeArgs {
            kubeconfig: self.kubeconfig.or(file.kubeconfig),
            kube_backend: self.kube_backend.or(file.kube_backend),
            namespace: self.namespace.or(file.namespace),
            namespace_per_tenant: self.namespace_per_tenant || file.namespace_per_tenant,
            python_image: self.python_image.or(file.python_image),
            r_image: self.r_image.or(file.r_image),
            image_pull_grace_seconds: self.image_pull_grace_seconds.or(file.image_pull_grace_seconds),
            pod_annotation_prefixes: self.pod_annotation_prefixes.or(file.pod_annotation_prefixes),
            ttl_seconds_after_finished: self.ttl_seconds_after_finished.or(file.ttl_seconds_after_finished),
            sandbox_api_version: self.sandbox_api_version.or(file.sandbox_api_version),
            sandbox_shutdown_grace_seconds: self.sandbox_shutdown_grace_seconds.or(file.sandbox_shutdown_grace_seconds),
            artifacts_pvc: self.artifacts_pvc.or(file.artifacts_pvc),
            artifacts_pvc_mount: self.artifacts_pvc_mount.or(file.artifacts_pvc_mount),
            service_namespace: self.service_namespace.or(file.service_namespace),
        }
    }

    fn resolve(self, output_limit_bytes: usize) -> Result<crate::kube::KubeSettings, SettingsError> {
        use crate::kube::{KubeBackendKind, KubeSettings, Namespaces};
        if self.namespace_per_tenant && self.namespace.is_some() {
            return Err(invalid("--namespace", "cannot be combined with --namespace-per-tenant"));
        }
        let mut k = KubeSettings::default();
        if self.namespace_per_tenant {
            k.namespaces = Namespaces::PerTenant { prefix: crate::kube::TENANT_NAMESPACE_PREFIX.into() };
        } else if let Some(ns) = self.namespace {
            crate::kube::check_namespace_name(&ns).map_err(|e| invalid("--namespace", e))?;
            k.namespaces = Namespaces::Single(ns);
        }
        if let Some(i) = self.python_image {
            k.pods.python_image = i;
        }
        if let Some(i) = self.r_image {
            k.pods.r_image = i;
        }
        if let Some(s) = self.image_pull_grace_seconds {
            k.image_pull_grace = std::time::Duration::from_secs(s);
        }
        if let Some(p) = self.pod_annotation_prefixes {
            k.pods.annotation_prefixes = p.into_iter().filter(|p| !p.is_empty()).collect();
        }
        if let Some(t) = self.ttl_seconds_after_finished {
            k.ttl_seconds_after_finished = t;
        }
        k.backend = self.kube_backend.unwrap_or(KubeBackendKind::Podjob);
        if let Some(v) = self.sandbox_api_version {
            k.sandbox_version = v;
        }
        if let Some(g) = self.sandbox_shutdown_grace_seconds {
            k.sandbox_shutdown_grace = std::time::Duration::from_secs(g);
        }
        if let Some(claim) = self.artifacts_pvc {
            crate::kube::check_claim_name(&claim).map_err(|e| invalid("--artifacts-pvc", e))?;
            k.pods.artifacts_claim = Some(claim);
        }
        if let Some(mount) = self.artifacts_pvc_mount {
            if !mount.is_absolute() {
                return Err(invalid("--artifacts-pvc-mount", format!("{} is not an absolute path", mount.display())));
            }
            k.artifacts_pvc_mount = mount;
        }
        if let Some(ns) = self.service_namespace {
            crate::kube::check_namespace_name(&ns).map_err(|e| invalid("--service-namespace", e))?;
            k.service_namespace = ns;
        }
        k.pods.output_limit_bytes = output_limit_bytes;
        k.kubeconfig = self.kubeconfig;
        Ok(k)
    }
}

/// Why the settings cannot be resolved; each names the setting or file to fix.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read settings file {}: {source}", path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    ParseFile {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    /// A setting has a value the service cannot use.
    #[error("{setting}: {reason}")]
    Invalid { setting: &'static str, reason: String },
    #[error(transparent)]
    Tenants(#[from] TenantsFileError),
}

/// Why a tenants file cannot be used. On a reload, the tenants in force stay as they were.
#[derive(Debug, thiserror::Error)]
pub enum TenantsFileError {
    #[error(
        "no tenants file: pass --tenants FILE or set AGENTTASK_TENANTS \
         (deploy/tenants.example.toml is a starting point)"
    )]
    NotConfigured,
    #[error("cannot read tenants file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file does not validate (the message names the tenant and field).
    #[error("tenants file {}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
}

impl TenantsFileError {
    /// A stable name for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            TenantsFileError::NotConfigured => "tenants_not_configured",
            TenantsFileError::Read { .. } => "tenants_file_unreadable",
            TenantsFileError::Invalid { .. } => "tenants_file_invalid",
        }
    }
}

fn invalid(setting: &'static str, reason: impl Into<String>) -> SettingsError {
    SettingsError::Invalid { setting, reason: reason.into() }
}

/// Fully resolved settings of one `serve` process.
#[derive(Debug, Clone)]
pub struct Settings {
    pub database_url: String,
    pub amqp_url: String,
    pub tenants_path: Option<PathBuf>,
    pub http_addr: SocketAddr,
    pub backend: BackendKind,
    pub components: Vec<Component>,
    pub max_running: u32,
    pub prefetch: u16,
    pub data_dir: PathBuf,
    pub output_limit_bytes: usize,
    pub database_pool_size: u32,
    pub admin_token: Option<String>,
    /// Global CPU capacity in millicores: `--capacity-cpu`, else this host's CPU count when the
    /// tasks run on this host (the local backend), else unlimited.
    pub capacity_cpu_millis: Option<u64>,
    /// Global memory capacity in bytes, if limited.
    pub capacity_memory_bytes: Option<u64>,
    /// Usage-history half-life; zero disables the history term.
    pub usage_half_life: std::time::Duration,
    /// `--backend kubernetes` settings.
    pub kube: crate::kube::KubeSettings,
    /// Refusals of a result by the broker before it is parked.
    pub outbox_max_attempts: u32,
    /// When finished tasks' outputs (or rows) are removed; `None` keeps them forever.
    pub retention: Option<crate::retention::Retention>,
    /// The local backend's warm sandboxes.
    pub warm: crate::exec::local::WarmConfig,
}

/// This host's CPUs (as far as the process may use them: affinity and cgroup quota), in
/// millicores: the default CPU capacity, so tasks asking for whole CPUs do not overcommit it.
pub fn host_cpu_millis() -> u64 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u64) * 1000
}

impl Settings {
    /// Resolves flags/env against the settings file and defaults.
    pub fn resolve(args: ServeArgs) -> Result<Settings, SettingsError> {
        let file = load_file(args.config.as_deref())?;
        let tenants_path = args.tenants.or(file.tenants).or_else(|| {
            let p = PathBuf::from("tenants.toml");
            p.exists().then_some(p)
        });
        let backend = args.backend.or(file.backend).unwrap_or(BackendKind::Local);
        let output_limit_bytes = args.output_limit_bytes.or(file.output_limit_bytes).unwrap_or(1 << 20);
        let kube = args.kube.or(file.kube).resolve(output_limit_bytes)?;
        let settings = Settings {
            kube,
            database_url: args.database_url.or(file.database_url).unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned()),
            amqp_url: args.amqp_url.or(file.amqp_url).unwrap_or_else(|| DEFAULT_AMQP_URL.to_owned()),
            tenants_path,
            http_addr: args
                .http_addr
                .or(file.http_addr)
                .unwrap_or_else(|| DEFAULT_HTTP_ADDR.parse().expect("valid default")),
            backend,
            components: args.components.or(file.components).unwrap_or_else(|| Component::ALL.to_vec()),
            max_running: args.max_running.or(file.max_running).unwrap_or(8),
            prefetch: args.prefetch.or(file.prefetch).unwrap_or(16),
            data_dir: args.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from("/var/lib/agenttask")),
            output_limit_bytes,
            database_pool_size: args.database_pool_size.or(file.database_pool_size).unwrap_or(32),
            admin_token: args.admin_token.or(file.admin_token).filter(|t| !t.is_empty()),
            capacity_cpu_millis: args
                .capacity_cpu
                .or(file.capacity_cpu)
                .map(|c| parse_cpu_millis(&c).map_err(|e| invalid("--capacity-cpu", e.to_string())))
                .transpose()?
                .or_else(|| (backend == BackendKind::Local).then(host_cpu_millis)),
            capacity_memory_bytes: args
                .capacity_memory
                .or(file.capacity_memory)
                .map(|m| parse_memory_bytes(&m).map_err(|e| invalid("--capacity-memory", e.to_string())))
                .transpose()?,
            usage_half_life: std::time::Duration::from_secs(
                args.usage_half_life_seconds.or(file.usage_half_life_seconds).unwrap_or(60),
            ),
            outbox_max_attempts: args
                .outbox_max_attempts
                .or(file.outbox_max_attempts)
                .unwrap_or(crate::store::RetryPolicy::DEFAULT_MAX_ATTEMPTS),
            retention: resolve_retention(
                args.retention_days.or(file.retention_days).unwrap_or(DEFAULT_RETENTION_DAYS),
                args.retention_delete_rows || file.retention_delete_rows,
            )?,
            warm: {
                let d = crate::exec::local::WarmConfig::default();
                crate::exec::local::WarmConfig {
                    python: args.warm_python.or(file.warm_python).unwrap_or(d.python),
                    r: args.warm_r.or(file.warm_r).unwrap_or(d.r),
                    max_idle: args
                        .warm_max_idle_seconds
                        .or(file.warm_max_idle_seconds)
                        .map_or(d.max_idle, std::time::Duration::from_secs),
                }
            },
        };
        if settings.warm.python > 64 || settings.warm.r > 64 {
            return Err(invalid("--warm-python/--warm-r", "at most 64 warm sandboxes per language"));
        }
        if settings.warm.max_idle.is_zero() {
            return Err(invalid("--warm-max-idle-seconds", "must be at least 1"));
        }
        if settings.capacity_cpu_millis == Some(0) {
            return Err(invalid("--capacity-cpu", "must be greater than 0"));
        }
        if settings.capacity_memory_bytes == Some(0) {
            return Err(invalid("--capacity-memory", "must be greater than 0"));
        }
        if settings.max_running == 0 {
            return Err(invalid("--max-running", "must be at least 1"));
        }
        if settings.prefetch == 0 {
            return Err(invalid("--prefetch", "must be at least 1"));
        }
        if settings.database_pool_size == 0 {
            return Err(invalid("--database-pool-size", "must be at least 1"));
        }
        if settings.outbox_max_attempts == 0 {
            return Err(invalid("--outbox-max-attempts", "must be at least 1"));
        }
        if settings.components.is_empty() {
            return Err(invalid("--components", "must name at least one component"));
        }
        Ok(settings)
    }

    pub fn runs(&self, c: Component) -> bool {
        self.components.contains(&c)
    }

    /// Reads and parses the tenants file.
    pub fn load_tenants(&self) -> Result<Tenants, TenantsFileError> {
        let Some(path) = &self.tenants_path else {
            return Err(TenantsFileError::NotConfigured);
        };
        load_tenants_file(path)
    }
}

/// Finished tasks keep their outputs this many days unless set otherwise.
pub const DEFAULT_RETENTION_DAYS: u32 = 30;

/// `--retention-days` and `--retention-delete-rows` as a policy; 0 days keeps everything.
fn resolve_retention(days: u32, delete_rows: bool) -> Result<Option<crate::retention::Retention>, SettingsError> {
    if days == 0 {
        return match delete_rows {
            true => Err(invalid("--retention-delete-rows", "needs a retention period: set --retention-days above 0")),
            false => Ok(None),
        };
    }
    let keep_for = std::time::Duration::from_secs(u64::from(days) * 86_400);
    Ok(Some(crate::retention::Retention { keep_for, delete_rows }))
}

pub fn load_tenants_file(path: &Path) -> Result<Tenants, TenantsFileError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| TenantsFileError::Read { path: path.to_owned(), source })?;
    parse_tenants(&text).map_err(|reason| TenantsFileError::Invalid { path: path.to_owned(), reason })
}

/// The settings file: the same fields as the flags.
fn load_file(explicit: Option<&Path>) -> Result<ServeArgs, SettingsError> {
    let (path, required) = match explicit {
        Some(p) => (p.to_path_buf(), true),
        None => (PathBuf::from("agenttask.toml"), false),
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text).map_err(|source| SettingsError::ParseFile { path, source }),
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => Ok(ServeArgs::default()),
        Err(source) => Err(SettingsError::ReadFile { path, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_file_and_defaults_fill_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("agenttask.toml");
        std::fs::write(&cfg, "max_running = 3\nprefetch = 7\nbackend = \"local\"\n").unwrap();
        let args = ServeArgs { config: Some(cfg), max_running: Some(5), ..Default::default() };
        let s = Settings::resolve(args).unwrap();
        assert_eq!((s.max_running, s.prefetch), (5, 7));
        assert_eq!(s.database_url, DEFAULT_DATABASE_URL);
        assert_eq!(s.components.len(), Component::ALL.len());
    }

    #[test]
    fn cpu_capacity_defaults_to_the_hosts_cpus_only_where_tasks_run_on_this_host() {
        let s = Settings::resolve(ServeArgs::default()).unwrap();
        let cpus = std::thread::available_parallelism().unwrap().get() as u64;
        assert_eq!(s.capacity_cpu_millis, Some(cpus * 1000));
        let s = Settings::resolve(ServeArgs { capacity_cpu: Some("64".into()), ..Default::default() }).unwrap();
        assert_eq!(s.capacity_cpu_millis, Some(64_000));
        for backend in [BackendKind::Kubernetes, BackendKind::Null] {
            let s = Settings::resolve(ServeArgs { backend: Some(backend), ..Default::default() }).unwrap();
            assert_eq!(s.capacity_cpu_millis, None, "{backend:?}: the pods' CPUs are not this host's");
            let args = ServeArgs { backend: Some(backend), capacity_cpu: Some("8".into()), ..Default::default() };
            assert_eq!(Settings::resolve(args).unwrap().capacity_cpu_millis, Some(8_000));
        }
    }

    #[test]
    fn kubernetes_settings_come_from_flags_then_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("agenttask.toml");
        std::fs::write(&cfg, "[kubernetes]\nnamespace = \"from-file\"\npython_image = \"py:file\"\n").unwrap();
        let mut args = ServeArgs { config: Some(cfg.clone()), ..Default::default() };
        args.kube.python_image = Some("py:flag".into());
        let s = Settings::resolve(args).unwrap();
        assert_eq!(s.kube.namespaces, crate::kube::Namespaces::Single("from-file".into()));
        assert_eq!(s.kube.pods.python_image, "py:flag");
        assert_eq!(s.kube.pods.r_image, crate::kube::PodSettings::default().r_image);
        let args = ServeArgs {
            config: Some(cfg.clone()),
            kube: KubeArgs { kube_backend: Some(crate::kube::KubeBackendKind::Sandbox), ..Default::default() },
            ..Default::default()
        };
        assert_eq!(Settings::resolve(args).unwrap().kube.backend, crate::kube::KubeBackendKind::Sandbox);
        for (kube, setting) in [
            (KubeArgs { namespace: Some("Not_A_Namespace".into()), ..Default::default() }, "--namespace"),
            (
                KubeArgs { service_namespace: Some("Not_A_Namespace".into()), ..Default::default() },
                "--service-namespace",
            ),
        ] {
            let args = ServeArgs { config: Some(cfg.clone()), kube, ..Default::default() };
            match Settings::resolve(args) {
                Err(SettingsError::Invalid { setting: s, .. }) => assert_eq!(s, setting),
                other => panic!("{setting}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_service_namespace_defaults_and_comes_from_flags_then_the_file() {
        let s = Settings::resolve(ServeArgs::default()).unwrap();
        assert_eq!(s.kube.service_namespace, crate::kube::DEFAULT_SERVICE_NAMESPACE);
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("agenttask.toml");
        std::fs::write(&cfg, "[kubernetes]\nservice_namespace = \"ops\"\n").unwrap();
        let s = Settings::resolve(ServeArgs { config: Some(cfg.clone()), ..Default::default() }).unwrap();
        assert_eq!(s.kube.service_namespace, "ops");
        let kube = KubeArgs { service_namespace: Some("platform".into()), ..Default::default() };
        let s = Settings::resolve(ServeArgs { config: Some(cfg), kube, ..Default::default() }).unwrap();
        assert_eq!(s.kube.service_namespace, "platform");
    }

    #[test]
    fn the_artifacts_claim_is_off_by_default_and_checked() {
        let s = Settings::resolve(ServeArgs::default()).unwrap();
        assert_eq!(s.kube.pods.artifacts_claim, None);
        assert_eq!(s.kube.artifacts_pvc_mount, PathBuf::from(crate::kube::DEFAULT_ARTIFACTS_PVC_MOUNT));
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("agenttask.toml");
        std::fs::write(&cfg, "[kubernetes]\nartifacts_pvc = \"task-artifacts\"\nartifacts_pvc_mount = \"/pvc\"\n")
            .unwrap();
        let s = Settings::resolve(ServeArgs { config: Some(cfg), ..Default::default() }).unwrap();
        assert_eq!(s.kube.pods.artifacts_claim.as_deref(), Some("task-artifacts"));
        assert_eq!(s.kube.artifacts_pvc_mount, PathBuf::from("/pvc"));
        for (kube, setting) in [
            (KubeArgs { artifacts_pvc: Some("Bad_Claim".into()), ..Default::default() }, "--artifacts-pvc"),
            (KubeArgs { artifacts_pvc_mount: Some("relative".into()), ..Default::default() }, "--artifacts-pvc-mount"),
        ] {
            match Settings::resolve(ServeArgs { kube, ..Default::default() }) {
                Err(SettingsError::Invalid { setting: s, .. }) => assert_eq!(s, setting),
                other => panic!("{setting}: {other:?}"),
            }
        }
    }

    #[test]
    fn retention_defaults_to_thirty_days_of_outputs_and_zero_keeps_everything() {
        let s = Settings::resolve(ServeArgs::default()).unwrap();
        let thirty =
            crate::retention::Retention { keep_for: std::time::Duration::from_secs(30 * 86_400), delete_rows: false };
        assert_eq!(s.retention, Some(thirty));
        let s = Settings::resolve(ServeArgs { retention_days: Some(0), ..Default::default() }).unwrap();
        assert_eq!(s.retention, None);
    }

    #[test]
    fn bad_settings_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("x.toml");
        std::fs::write(&cfg, "max_runing = 3\n").unwrap();
        let err = Settings::resolve(ServeArgs { config: Some(cfg), ..Default::default() }).unwrap_err();
        assert!(matches!(err, SettingsError::ParseFile { .. }), "{err:?}");
        assert!(err.to_string().contains("max_runing"), "{err}");
        let err = Settings::resolve(ServeArgs { config: Some(dir.path().join("missing.toml")), ..Default::default() })
            .unwrap_err();
        assert!(matches!(&err, SettingsError::ReadFile { path, .. } if path.ends_with("missing.toml")), "{err:?}");
    }

    #[test]
    fn every_flag_is_also_a_file_setting() {
        // One declaration: the file accepts the flags' names (but not `config` itself).
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("agenttask.toml");
        std::fs::write(
            &cfg,
            "database_url = \"postgres://x@h/db\"\namqp_url = \"amqp://h\"\ntenants = \"t.toml\"\n\
             http_addr = \"127.0.0.1:1\"\nbackend = \"null\"\ncomponents = [\"http\"]\nmax_running = 2\n\
             prefetch = 3\ndata_dir = \"/d\"\noutput_limit_bytes = 4\nadmin_token = \"t\"\n\
             capacity_cpu = \"2\"\ncapacity_memory = \"1Gi\"\nusage_half_life_seconds = 5\n\
             database_pool_size = 6\noutbox_max_attempts = 7\nretention_days = 8\n\
             retention_delete_rows = true\n",
        )
        .unwrap();
        let s = Settings::resolve(ServeArgs { config: Some(cfg.clone()), ..Default::default() }).unwrap();
        assert_eq!(s.database_url, "postgres://x@h/db");
        assert_eq!(s.backend, BackendKind::Null);
        assert_eq!(s.components, vec![Component::Http]);
        assert_eq!((s.max_running, s.prefetch, s.output_limit_bytes, s.database_pool_size), (2, 3, 4, 6));
        assert_eq!((s.capacity_cpu_millis, s.capacity_memory_bytes), (Some(2000), Some(1 << 30)));
        assert_eq!(s.outbox_max_attempts, 7);
        let retention =
            crate::retention::Retention { keep_for: std::time::Duration::from_secs(8 * 86_400), delete_rows: true };
        assert_eq!(s.retention, Some(retention));
        std::fs::write(&cfg, "config = \"other.toml\"\n").unwrap();
        let err = Settings::resolve(ServeArgs { config: Some(cfg), ..Default::default() }).unwrap_err();
        assert!(matches!(err, SettingsError::ParseFile { .. }), "{err:?}");
    }

    #[test]
    fn invalid_values_name_the_setting() {
        let err = Settings::resolve(ServeArgs { config: Some("/nonexistent-but-unused".into()), ..Default::default() });
        assert!(matches!(err, Err(SettingsError::ReadFile { .. })));
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("a.toml");
        std::fs::write(&cfg, "").unwrap();
        for (args, setting) in [
            (ServeArgs { max_running: Some(0), ..Default::default() }, "--max-running"),
            (ServeArgs { prefetch: Some(0), ..Default::default() }, "--prefetch"),
            (ServeArgs { capacity_cpu: Some("0".into()), ..Default::default() }, "--capacity-cpu"),
            (ServeArgs { capacity_memory: Some("lots".into()), ..Default::default() }, "--capacity-memory"),
            (ServeArgs { components: Some(vec![]), ..Default::default() }, "--components"),
            (ServeArgs { outbox_max_attempts: Some(0), ..Default::default() }, "--outbox-max-attempts"),
            (
                ServeArgs { retention_days: Some(0), retention_delete_rows: true, ..Default::default() },
                "--retention-delete-rows",
            ),
        ] {
            let args = ServeArgs { config: Some(cfg.clone()), ..args };
            match Settings::resolve(args) {
                Err(SettingsError::Invalid { setting: s, .. }) => assert_eq!(s, setting),
                other => panic!("{setting}: {other:?}"),
            }
        }
    }
}
