//! Service settings: flags, then `AGENTTASK_*` environment variables, then an optional
//! `agenttask.toml`, then built-in defaults. Resolving them is pure apart from reading files, and
//! every error says which setting to fix.

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
    pub const ALL: [Component; 5] = [
        Component::Ingest,
        Component::Scheduler,
        Component::Executor,
        Component::Publisher,
        Component::Http,
    ];
}

/// `agenttask serve` flags. Every one can also come from the environment or `agenttask.toml`.
#[derive(Debug, Clone, Default, Args)]
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
    /// Unacknowledged task messages per tenant queue [default: 16]
    #[arg(long, env = "AGENTTASK_PREFETCH")]
    pub prefetch: Option<u16>,
    /// Service state on disk: sandboxes' scratch space and artifacts [default: /var/lib/agenttask]
    #[arg(long, env = "AGENTTASK_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Cap on each of stdout and stderr per task, in bytes [default: 1048576]
    #[arg(long, env = "AGENTTASK_OUTPUT_LIMIT_BYTES")]
    pub output_limit_bytes: Option<usize>,
    /// Token that opens the admin and task API (Authorization: Bearer ...). Without it those
    /// endpoints are closed.
    #[arg(long, env = "AGENTTASK_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Total CPU the admitted tasks may ask for together, e.g. "16" [default: unlimited; slots only]
    #[arg(long, env = "AGENTTASK_CAPACITY_CPU")]
    pub capacity_cpu: Option<String>,
    /// Total memory the admitted tasks may ask for together, e.g. "64Gi" [default: unlimited]
    #[arg(long, env = "AGENTTASK_CAPACITY_MEMORY")]
    pub capacity_memory: Option<String>,
    /// Half-life of the usage history that breaks fair-share ties; 0 turns it off [default: 60]
    #[arg(long, env = "AGENTTASK_USAGE_HALF_LIFE_SECONDS")]
    pub usage_half_life_seconds: Option<u64>,
    /// Settings file [default: ./agenttask.toml when it exists]
    #[arg(long, env = "AGENTTASK_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub kube: KubeArgs,
}

/// Settings of `--backend kubernetes` (see the README's Kubernetes section for defaults).
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeArgs {
    /// kubeconfig file to use [default: as kube-rs finds it: $KUBECONFIG, ~/.kube/config, in-cluster]
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Kubernetes flavour for standard tasks: podjob (hardened Pod) or sandbox [default: podjob]
    #[arg(long, env = "AGENTTASK_KUBE_BACKEND", value_enum)]
    pub kube_backend: Option<crate::kube::KubeBackendKind>,
    /// Namespace of AgentTasks and their pods [default: agenttask]
    #[arg(long, env = "AGENTTASK_NAMESPACE", conflicts_with = "namespace_per_tenant")]
    pub namespace: Option<String>,
    /// One namespace per tenant, agenttask-<tenant> (they must exist)
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
        }
    }

    /// The resolved Kubernetes settings.
    pub fn resolve(self, output_limit_bytes: usize) -> Result<crate::kube::KubeSettings, String> {
        use crate::kube::{KubeBackendKind, KubeSettings, Namespaces};
        if self.kube_backend == Some(KubeBackendKind::Sandbox) {
            return Err("--kube-backend sandbox (agent-sandbox Sandboxes) comes with issue 12; use podjob".into());
        }
        let mut k = KubeSettings::default();
        if self.namespace_per_tenant {
            k.namespaces = Namespaces::PerTenant { prefix: "agenttask-".into() };
        } else if let Some(ns) = self.namespace {
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
        k.pods.output_limit_bytes = output_limit_bytes;
        k.kubeconfig = self.kubeconfig;
        Ok(k)
    }
}

/// The optional `agenttask.toml`; same names as the flags, in snake_case.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    database_url: Option<String>,
    amqp_url: Option<String>,
    tenants: Option<PathBuf>,
    http_addr: Option<SocketAddr>,
    backend: Option<BackendKind>,
    components: Option<Vec<Component>>,
    max_running: Option<u32>,
    prefetch: Option<u16>,
    data_dir: Option<PathBuf>,
    output_limit_bytes: Option<usize>,
    admin_token: Option<String>,
    capacity_cpu: Option<String>,
    capacity_memory: Option<String>,
    usage_half_life_seconds: Option<u64>,
    #[serde(default)]
    kubernetes: KubeArgs,
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
    pub admin_token: Option<String>,
    /// Global CPU capacity in millicores, if limited.
    pub capacity_cpu_millis: Option<u64>,
    /// Global memory capacity in bytes, if limited.
    pub capacity_memory_bytes: Option<u64>,
    /// Usage-history half-life; zero disables the history term.
    pub usage_half_life: std::time::Duration,
    /// `--backend kubernetes` settings.
    pub kube: crate::kube::KubeSettings,
}

impl Settings {
    /// Resolves flags/env against the settings file and defaults.
    pub fn resolve(args: ServeArgs) -> Result<Settings, String> {
        let file = load_file(args.config.as_deref())?;
        let tenants_path = args.tenants.or(file.tenants).or_else(|| {
            let p = PathBuf::from("tenants.toml");
            p.exists().then_some(p)
        });
        let output_limit_bytes = args.output_limit_bytes.or(file.output_limit_bytes).unwrap_or(1 << 20);
        let kube = args.kube.or(file.kubernetes).resolve(output_limit_bytes)?;
        let settings = Settings {
            kube,
            database_url: args
                .database_url
                .or(file.database_url)
                .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned()),
            amqp_url: args
                .amqp_url
                .or(file.amqp_url)
                .unwrap_or_else(|| DEFAULT_AMQP_URL.to_owned()),
            tenants_path,
            http_addr: args
                .http_addr
                .or(file.http_addr)
                .unwrap_or_else(|| DEFAULT_HTTP_ADDR.parse().expect("valid default")),
            backend: args.backend.or(file.backend).unwrap_or(BackendKind::Local),
            components: args
                .components
                .or(file.components)
                .unwrap_or_else(|| Component::ALL.to_vec()),
            max_running: args.max_running.or(file.max_running).unwrap_or(8),
            prefetch: args.prefetch.or(file.prefetch).unwrap_or(16),
            data_dir: args
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("/var/lib/agenttask")),
            output_limit_bytes,
            admin_token: args.admin_token.or(file.admin_token).filter(|t| !t.is_empty()),
            capacity_cpu_millis: args
                .capacity_cpu
                .or(file.capacity_cpu)
                .map(|c| parse_cpu_millis(&c).map_err(|e| format!("--capacity-cpu: {e}")))
                .transpose()?,
            capacity_memory_bytes: args
                .capacity_memory
                .or(file.capacity_memory)
                .map(|m| parse_memory_bytes(&m).map_err(|e| format!("--capacity-memory: {e}")))
                .transpose()?,
            usage_half_life: std::time::Duration::from_secs(
                args.usage_half_life_seconds.or(file.usage_half_life_seconds).unwrap_or(60),
            ),
        };
        if settings.capacity_cpu_millis == Some(0) || settings.capacity_memory_bytes == Some(0) {
            return Err("--capacity-cpu and --capacity-memory must be greater than 0".into());
        }
        if settings.max_running == 0 {
            return Err("--max-running must be at least 1".into());
        }
        if settings.prefetch == 0 {
            return Err("--prefetch must be at least 1".into());
        }
        if settings.components.is_empty() {
            return Err("--components must name at least one component".into());
        }
        Ok(settings)
    }

    pub fn runs(&self, c: Component) -> bool {
        self.components.contains(&c)
    }

    /// Reads and parses the tenants file.
    pub fn load_tenants(&self) -> Result<Tenants, String> {
        let Some(path) = &self.tenants_path else {
            return Err("no tenants file: pass --tenants FILE or set AGENTTASK_TENANTS \
                        (deploy/tenants.example.toml is a starting point)"
                .into());
        };
        load_tenants_file(path)
    }
}

pub fn load_tenants_file(path: &Path) -> Result<Tenants, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read tenants file {}: {e}", path.display()))?;
    parse_tenants(&text).map_err(|e| format!("tenants file {}: {e}", path.display()))
}

fn load_file(explicit: Option<&Path>) -> Result<FileSettings, String> {
    let (path, required) = match explicit {
        Some(p) => (p.to_path_buf(), true),
        None => (PathBuf::from("agenttask.toml"), false),
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => Ok(FileSettings::default()),
        Err(e) => Err(format!("cannot read settings file {}: {e}", path.display())),
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
        let mut args = ServeArgs { config: Some(cfg), ..Default::default() };
        args.kube.kube_backend = Some(crate::kube::KubeBackendKind::Sandbox);
        assert!(Settings::resolve(args).unwrap_err().contains("issue 12"));
    }

    #[test]
    fn bad_settings_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("x.toml");
        std::fs::write(&cfg, "max_runing = 3\n").unwrap();
        let err = Settings::resolve(ServeArgs { config: Some(cfg), ..Default::default() }).unwrap_err();
        assert!(err.contains("max_runing"), "{err}");
        let err = Settings::resolve(ServeArgs {
            config: Some(dir.path().join("missing.toml")),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.contains("missing.toml"), "{err}");
    }
}
