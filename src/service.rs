//! Wiring: builds what each component needs and runs those `serve` was asked for under one
//! [`Supervisor`] until shutdown. Nothing here decides anything; it only connects the parts.
//!
//! Components never see each other or this module: each gets its own dependencies (the store,
//! metrics, the tenants it watches, its wake-ups, its settings). What they share lives here:
//! the tenants (a watch channel fed by the tenants file, SIGHUP and Postgres notifications) and
//! the wake-ups that notifications trigger.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::amqp::ingest::Ingest;
use crate::amqp::publish::Publisher;
use crate::config::{BackendKind, Component, Settings, TenantsFileError};
use crate::domain::phase::Phase;
use crate::domain::tenant::Tenants;
use crate::domain::validate::BackendIsolation;
use crate::exec::artifacts::{ArtifactSink, DataDirSink, SinkConfig};
use crate::exec::local::{LocalBackend, LocalConfig, SetupError};
use crate::exec::null::NullBackend;
use crate::exec::Backend;
use crate::executor::{Executor, LEASE};
use crate::http::Api;
use crate::metrics::Metrics;
use crate::retry::Backoff;
use crate::scheduler::{Capacity, Scheduler};
use crate::store::notify::{Notification, CHANNELS};
use crate::store::{Store, StoreError};
use crate::supervise::{Stopped, Supervisor};

/// The wake-ups that Postgres notifications (and components in this process) trigger.
#[derive(Default)]
struct Wakes {
    scheduler: Arc<crate::scheduler::Wake>,
    executors: Arc<Notify>,
    publisher: Arc<Notify>,
}

impl Wakes {
    /// Notifications may have been lost (the listener reconnected): everyone looks again.
    fn everything_changed(&self) {
        self.scheduler.everything_changed();
        self.executors.notify_one();
        self.publisher.notify_one();
    }
}

/// The tenants this process serves: its tenants file, applied to the database, when it has one;
/// otherwise those last applied (by another process or `agentctl tenant apply`).
async fn current_tenants(settings: &Settings, store: &Store) -> Result<Tenants, TenantReloadError> {
    match &settings.tenants_path {
        Some(_) => {
            let t = settings.load_tenants()?;
            store.sync_tenants(&t).await?;
            Ok(t)
        }
        None => Ok(store.load_tenants().await?),
    }
}

/// Why the tenants could not be (re)loaded. A reload that fails keeps the tenants in force.
#[derive(Debug, thiserror::Error)]
pub enum TenantReloadError {
    #[error(transparent)]
    File(#[from] TenantsFileError),
    #[error("cannot read or store the tenants in Postgres: {0}")]
    Store(#[from] StoreError),
}

impl TenantReloadError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            TenantReloadError::File(e) => e.metric_label(),
            TenantReloadError::Store(e) => e.metric_label(),
        }
    }
}

/// Why the service could not start, or stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Postgres is unreachable, the URL is bad or the migrations failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The tenants file is invalid, or the tenants could not be read or stored.
    #[error(transparent)]
    Tenants(#[from] TenantReloadError),
    /// The local sandbox backend cannot run on this host (the message names the fix).
    #[error(transparent)]
    LocalBackend(#[from] SetupError),
    /// `--backend kubernetes` found no usable cluster configuration.
    #[error("--backend kubernetes: {0}")]
    Kubernetes(#[from] crate::kube::ClientError),
    #[error("cannot listen on {addr} (set --http-addr): {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// `--artifacts-pvc` cannot work as configured (the message names the fix).
    #[error("--artifacts-pvc: {0}")]
    Artifacts(String),
    /// A component stopped while the service was not shutting down.
    #[error(transparent)]
    Stopped(#[from] Stopped),
}

/// The SIGHUP handler could not be installed, so tenants could not be reloaded.
#[derive(Debug, thiserror::Error)]
#[error("cannot install the SIGHUP handler: {0}")]
pub struct SighupError(#[source] std::io::Error);

/// Which isolations the configured backend kind can run (ingest may run in a process without
/// the executor, so this follows the setting, not a backend object).
fn isolation_of(kind: BackendKind) -> BackendIsolation {
    match kind {
        BackendKind::Local => BackendIsolation::StandardOnly,
        BackendKind::Kubernetes | BackendKind::Null => BackendIsolation::Any,
    }
}

/// The backend executors use, and the local one again when it is local (for its housekeeping).
type Backends = (Arc<dyn Backend>, Option<Arc<LocalBackend>>);

async fn build_backend(settings: &Settings, tenants: &watch::Sender<Arc<Tenants>>) -> Result<Backends, ServiceError> {
    match settings.backend {
        BackendKind::Local => {
            let mut config = LocalConfig::new(settings.data_dir.clone());
            config.output_limit_bytes = settings.output_limit_bytes;
            // Artifact files go with the rest of a task's outputs (see `crate::retention`).
            if let Some(r) = settings.retention {
                config.artifact_ttl = r.keep_for;
            }
            config.warm = settings.warm.clone();
            let b = Arc::new(LocalBackend::new(config)?);
            Ok((b.clone(), Some(b)))
        }
        BackendKind::Null => {
            tracing::warn!(
                "--backend null runs NO code: every task succeeds at once with empty output. \
                 Use it only to measure the control plane"
            );
            Ok((Arc::new(NullBackend), None))
        }
        BackendKind::Kubernetes => {
            if let Some(pvc) = settings.kube.artifact_sink() {
                pvc.check_owner(settings.kube.pods.uid).map_err(ServiceError::Artifacts)?;
            }
            let client = crate::kube::client(&settings.kube).await?;
            let backend = crate::kube::backend::KubeBackend::new(client, settings.kube.clone(), tenants.subscribe());
            Ok((Arc::new(backend), None))
        }
    }
}

/// Runs the service until `shutdown` is cancelled, or until a component stops on its own (then
/// the error names it).
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), ServiceError> {
    let store = Store::connect(&settings.database_url, settings.database_pool_size).await?;
    let initial = current_tenants(&settings, &store).await?;
    if initial.is_empty() && (settings.runs(Component::Ingest) || settings.runs(Component::Scheduler)) {
        tracing::warn!(
            "no tenants are configured: pass --tenants FILE (see deploy/tenants.example.toml) \
             or run `agentctl tenant apply -f FILE`"
        );
    }
    let tenants = Arc::new(watch::Sender::new(Arc::new(initial)));
    let backend =
        if settings.runs(Component::Executor) { Some(build_backend(&settings, &tenants).await?) } else { None };
    let metrics = Metrics::new();
    if let Some((_, Some(local))) = &backend {
        local.set_warm_metrics(metrics.warm.clone());
        local.start_warm_pool();
    }
    let wakes = Arc::new(Wakes::default());
    let readiness = Arc::new(crate::readiness::Readiness::new());

    let sup = Supervisor::new(shutdown.clone());
    let (cancel_tx, cancel_rx) = mpsc::unbounded_channel();
    sup.spawn(
        "notifications",
        listen(store.clone(), tenants.clone(), wakes.clone(), cancel_tx, metrics.clone(), shutdown.clone()),
    );
    sup.spawn(
        "sighup",
        reload_on_sighup(settings.clone(), store.clone(), tenants.clone(), metrics.clone(), shutdown.clone()),
    );
    if settings.runs(Component::Http) {
        let listener = tokio::net::TcpListener::bind(settings.http_addr)
            .await
            .map_err(|source| ServiceError::Listen { addr: settings.http_addr, source })?;
        tracing::info!(addr = %settings.http_addr, "http listening");
        let api = Arc::new(Api {
            store: store.clone(),
            metrics: metrics.clone(),
            admin_token: settings.admin_token.clone(),
            readiness: readiness.clone(),
            backend: backend.as_ref().map(|(b, _)| b.clone()),
            artifacts: Some(artifact_store(&settings)),
        });
        sup.spawn("http", crate::http::serve(listener, api, shutdown.clone()));
    }
    if settings.runs(Component::Ingest) {
        let ingest = Arc::new(Ingest {
            store: store.clone(),
            metrics: metrics.clone(),
            tenants: tenants.subscribe(),
            amqp_url: settings.amqp_url.clone(),
            prefetch: settings.prefetch,
            isolation: isolation_of(settings.backend),
            readiness: readiness.clone(),
            tracker: sup.tracker().clone(),
        });
        crate::amqp::ingest::starting(&ingest);
        sup.spawn("ingest", crate::amqp::ingest::run(ingest, shutdown.clone()));
    }
    if settings.runs(Component::Scheduler) {
        let scheduler = Arc::new(Scheduler {
            store: store.clone(),
            metrics: metrics.clone(),
            tenants: tenants.subscribe(),
            wake: wakes.scheduler.clone(),
            executors: wakes.executors.clone(),
            capacity: Capacity {
                max_running: settings.max_running,
                cpu_millis: settings.capacity_cpu_millis,
                memory_bytes: settings.capacity_memory_bytes,
                usage_half_life: settings.usage_half_life,
            },
        });
        sup.spawn("scheduler", crate::scheduler::run(scheduler, shutdown.clone()));
        // Beside the scheduler, which every deployment runs somewhere; one process at a time
        // sweeps (an advisory lock).
        if let Some(policy) = settings.retention {
            let sweep = crate::retention::run(store.clone(), policy, metrics.clone(), shutdown.clone());
            sup.spawn("retention", sweep);
        }
    }
    if let Some((backend, local)) = backend {
        let executor = Executor {
            store: Arc::new(store.clone()),
            backend,
            metrics: metrics.clone(),
            wake: wakes.executors.clone(),
            cancels: cancel_rx,
            lease: LEASE,
            tenants: tenants.subscribe(),
        };
        sup.spawn("executor", executor.run(shutdown.clone()));
        // Artifacts go with the rest of a task's outputs (see `crate::retention`): without
        // retention they are kept forever.
        if let Some(retention) = settings.retention {
            if let Some(local) = local {
                sup.spawn("artifact-sweeper", sweep_artifacts(local.artifact_sink(), shutdown.clone()));
            } else if let (Some(_), BackendKind::Kubernetes) = (settings.kube.artifact_sink(), settings.backend) {
                let config = SinkConfig { ttl: retention.keep_for, ..SinkConfig::default() };
                let pvc = crate::exec::artifacts::PvcSink::new(settings.kube.artifacts_pvc_mount.clone(), config);
                sup.spawn("artifact-sweeper", sweep_artifacts(Arc::new(pvc), shutdown.clone()));
            }
        }
        if settings.backend == BackendKind::Kubernetes {
            // Runs in every executor process; one at a time reconciles (a Postgres lock).
            let client = crate::kube::client(&settings.kube).await?;
            let reconciler = crate::kube::reconcile::run(
                client,
                settings.kube.clone(),
                metrics.clone(),
                store.clone(),
                tenants.subscribe(),
                shutdown.clone(),
            );
            sup.spawn("reconciler", reconciler);
        }
    }
    if settings.runs(Component::Publisher) {
        let publisher = Arc::new(Publisher {
            store: store.clone(),
            tenants: tenants.subscribe(),
            amqp_url: settings.amqp_url.clone(),
            wake: wakes.publisher.clone(),
            readiness: readiness.clone(),
            retry: crate::store::RetryPolicy::new(settings.outbox_max_attempts),
            metrics: metrics.clone(),
        });
        sup.spawn("publisher", crate::amqp::publish::run(publisher, shutdown.clone()));
    }
    tracing::info!(components = ?settings.components, backend = ?settings.backend, "agenttask running");
    let result = sup.wait().await;
    // Only now: every component that used the pool has stopped.
    store.pool().close().await;
    result.map_err(ServiceError::from)
}

/// Turns Postgres notifications into in-process wake-ups, tenant reloads and cancel requests
/// for the executor, reconnecting as needed.
async fn listen(
    store: Store,
    tenants: Arc<watch::Sender<Arc<Tenants>>>,
    wakes: Arc<Wakes>,
    cancels: mpsc::UnboundedSender<uuid::Uuid>,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::reconnect();
    while !shutdown.is_cancelled() {
        let mut listener = match sqlx::postgres::PgListener::connect_with(store.pool()).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff.peek(), "cannot listen for notifications; retrying");
                backoff.wait(&shutdown).await;
                continue;
            }
        };
        if let Err(e) = listener.listen_all(CHANNELS).await {
            tracing::warn!(error = %e, retry_in = ?backoff.peek(), "LISTEN failed; retrying");
            backoff.wait(&shutdown).await;
            continue;
        }
        backoff.reset();
        // Missed notifications while reconnecting: wake everyone once.
        wakes.everything_changed();
        loop {
            let n = tokio::select! {
                _ = shutdown.cancelled() => return,
                n = listener.try_recv() => n,
            };
            let n = match n {
                Ok(Some(n)) => n,
                // The connection dropped and was re-established; notifications in between
                // are lost, so look again everywhere.
                Ok(None) => {
                    wakes.everything_changed();
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "notification listener lost its connection");
                    break;
                }
            };
            match Notification::parse(n.channel(), n.payload()) {
                Some(Notification::Outbox) => wakes.publisher.notify_one(),
                Some(Notification::Tenants) => match store.load_tenants().await {
                    Ok(t) => {
                        tenants.send_replace(Arc::new(t));
                        wakes.scheduler.round();
                    }
                    Err(e) => {
                        metrics.errors.with_label_values(&["tenants", e.metric_label()]).inc();
                        tracing::error!(error = %e, "cannot reload tenants; keeping the tenants in force");
                    }
                },
                Some(Notification::Cancel(task_id)) => {
                    let _ = cancels.send(task_id);
                }
                Some(Notification::TaskPhase { phase, tenant }) => match phase {
                    Phase::Queued => wakes.scheduler.queue_changed(&tenant),
                    // A queued task left its queue, or a running one gave its capacity back.
                    Phase::Cancelled => wakes.scheduler.cancelled(&tenant),
                    Phase::Pending => wakes.executors.notify_one(),
                    Phase::Succeeded | Phase::Failed => wakes.scheduler.round(),
                    // Refused at the door (never queued), or too large (the scheduler did it).
                    Phase::Scheduled | Phase::Running | Phase::Rejected => {}
                },
                None => tracing::debug!(channel = n.channel(), "unknown notification ignored"),
            }
        }
    }
}

/// Where this process's HTTP API reads artifacts: the Kubernetes backend's claim when one is
/// configured, else the data directory.
fn artifact_store(settings: &Settings) -> Arc<dyn ArtifactSink> {
    match settings.kube.artifact_sink() {
        Some(pvc) if settings.backend == BackendKind::Kubernetes => Arc::new(pvc),
        _ => Arc::new(DataDirSink::new(settings.data_dir.clone(), SinkConfig::default())),
    }
}

/// Removes artifacts older than their TTL, now and then.
async fn sweep_artifacts(sink: Arc<dyn ArtifactSink>, shutdown: CancellationToken) {
    loop {
        let s = sink.clone();
        match tokio::task::spawn_blocking(move || s.sweep()).await {
            Ok(Ok(n)) if n > 0 => tracing::info!(removed = n, "expired artifacts removed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "sweeping artifacts failed"),
            _ => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(600)) => {}
        }
    }
}

/// SIGHUP re-reads the tenants file (if this process has one) and applies it without a
/// restart. Every process picks the change up from Postgres; queued tasks are untouched.
async fn reload_on_sighup(
    settings: Settings,
    store: Store,
    tenants: Arc<watch::Sender<Arc<Tenants>>>,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Result<(), SighupError> {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).map_err(SighupError)?;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = hup.recv() => match current_tenants(&settings, &store).await {
                Ok(t) => {
                    let n = t.len();
                    tenants.send_replace(Arc::new(t));
                    tracing::info!(tenants = n, "tenants reloaded");
                }
                Err(e) => {
                    metrics.errors.with_label_values(&["tenants", e.metric_label()]).inc();
                    tracing::error!(error = %e, "tenants refused; keeping the previous tenants");
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isolation_follows_the_backend_kind() {
        assert!(matches!(isolation_of(BackendKind::Local), BackendIsolation::StandardOnly));
        assert!(matches!(isolation_of(BackendKind::Kubernetes), BackendIsolation::Any));
    }
}
