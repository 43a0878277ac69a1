//! Wiring: builds what the components need and runs those `serve` was asked for under one
//! [`Supervisor`] until shutdown. Nothing here decides anything; it only connects the parts.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::config::{BackendKind, Component, Settings};
use crate::domain::phase::Phase;
use crate::domain::tenant::Tenants;
use crate::exec::local::{LocalBackend, LocalConfig};
use crate::exec::null::NullBackend;
use crate::exec::Backend;
use crate::executor::{Executor, LEASE};
use crate::metrics::Metrics;
use crate::store::notify::{Notification, CHANNELS};
use crate::store::Store;
use crate::supervise::Supervisor;

/// In-process wake-ups. Postgres notifications feed them too, so components in other
/// processes wake just as fast.
#[derive(Default)]
pub struct Wake {
    pub scheduler: Notify,
    pub executor: Arc<Notify>,
    pub publisher: Notify,
    /// Tenants whose queue changed since the scheduler last looked.
    dirty: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Notifications may have been missed: every tenant must be looked at again.
    all_dirty: AtomicBool,
}

impl Wake {
    /// A tenant's queue changed: the scheduler refetches it and runs a round.
    pub fn queue_changed(&self, tenant: &str) {
        self.dirty.lock().expect("not poisoned").insert(tenant.to_owned());
        self.scheduler.notify_one();
    }

    pub fn take_dirty(&self) -> Vec<String> {
        self.dirty.lock().expect("not poisoned").drain().collect()
    }

    /// True once after [`Wake::everything_changed`].
    pub fn take_all_dirty(&self) -> bool {
        self.all_dirty.swap(false, Ordering::SeqCst)
    }

    /// Notifications may have been lost (the listener reconnected): recheck every queue.
    pub fn everything_changed(&self) {
        self.all_dirty.store(true, Ordering::SeqCst);
        self.scheduler.notify_one();
        self.executor.notify_one();
        self.publisher.notify_one();
    }
}

/// What `/readyz` reports besides the database (which it pings).
#[derive(Default)]
pub struct Ready {
    pub amqp: AtomicBool,
}

/// Everything the components share.
pub struct Context {
    pub settings: Settings,
    pub store: Store,
    pub metrics: Metrics,
    /// The current tenants; replaced on reload, watched by ingest.
    pub tenants: watch::Sender<Arc<Tenants>>,
    pub wake: Wake,
    pub ready: Ready,
}

impl Context {
    /// Re-reads the tenants file (if this process has one) and applies it without a restart.
    /// Every process picks the change up from Postgres; queued tasks are untouched.
    pub async fn reload_tenants(&self) -> Result<usize, String> {
        let tenants = current_tenants(&self.settings, &self.store).await?;
        let n = tenants.len();
        self.tenants.send_replace(Arc::new(tenants));
        self.wake.scheduler.notify_one();
        Ok(n)
    }
}

/// The tenants this process serves: its tenants file, applied to the database, when it has one;
/// otherwise those last applied (by another process or `agentctl tenant apply`).
async fn current_tenants(settings: &Settings, store: &Store) -> Result<Tenants, String> {
    match &settings.tenants_path {
        Some(_) => {
            let t = settings.load_tenants()?;
            store.sync_tenants(&t).await.map_err(|e| e.to_string())?;
            Ok(t)
        }
        None => store.load_tenants().await.map_err(|e| e.to_string()),
    }
}

/// Runs the service until `shutdown` is cancelled.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let store = Store::connect(&settings.database_url, 32).await?;
    let tenants = current_tenants(&settings, &store).await.map_err(anyhow::Error::msg)?;
    if tenants.is_empty() && (settings.runs(Component::Ingest) || settings.runs(Component::Scheduler)) {
        tracing::warn!(
            "no tenants are configured: pass --tenants FILE (see deploy/tenants.example.toml) \
             or run `agentctl tenant apply -f FILE`"
        );
    }
    let mut local: Option<Arc<LocalBackend>> = None;
    let backend: Option<Arc<dyn Backend>> = if settings.runs(Component::Executor) {
        match settings.backend {
            BackendKind::Local => {
                let mut config = LocalConfig::new(settings.data_dir.clone());
                config.output_limit_bytes = settings.output_limit_bytes;
                let b = Arc::new(LocalBackend::new(config).map_err(anyhow::Error::msg)?);
                local = Some(b.clone());
                Some(b)
            }
            BackendKind::Null => {
                tracing::warn!(
                    "--backend null runs NO code: every task succeeds at once with empty output. \
                     Use it only to measure the control plane"
                );
                Some(Arc::new(NullBackend))
            }
            BackendKind::Kubernetes => anyhow::bail!(
                "--backend kubernetes is not available in this build yet; use --backend local"
            ),
        }
    } else {
        None
    };
    let ctx = Arc::new(Context {
        store,
        metrics: Metrics::new(),
        tenants: watch::Sender::new(Arc::new(tenants)),
        wake: Wake::default(),
        ready: Ready::default(),
        settings,
    });
    if !ctx.settings.runs(Component::Ingest) {
        ctx.ready.amqp.store(true, Ordering::Relaxed);
    }

    let sup = Supervisor::new(shutdown.clone());
    let (cancel_tx, cancel_rx) = tokio::sync::mpsc::unbounded_channel();
    sup.spawn("notifications", listen(ctx.clone(), cancel_tx, shutdown.clone()));
    sup.spawn("sighup", reload_on_sighup(ctx.clone(), shutdown.clone()));
    if ctx.settings.runs(Component::Http) {
        let listener = tokio::net::TcpListener::bind(ctx.settings.http_addr)
            .await
            .with_context(|| format!("cannot listen on {} (set --http-addr)", ctx.settings.http_addr))?;
        tracing::info!(addr = %ctx.settings.http_addr, "http listening");
        sup.spawn("http", crate::http::serve(listener, ctx.clone(), shutdown.clone()));
    }
    if ctx.settings.runs(Component::Ingest) {
        let (ctx, stop) = (ctx.clone(), shutdown.clone());
        sup.spawn("ingest", async move {
            crate::amqp::ingest::run(ctx, stop).await;
            Ok(())
        });
    }
    if ctx.settings.runs(Component::Scheduler) {
        let (ctx, stop) = (ctx.clone(), shutdown.clone());
        sup.spawn("scheduler", async move {
            crate::scheduler::run(ctx, stop).await;
            Ok(())
        });
    }
    if let Some(backend) = backend {
        let executor = Executor {
            store: Arc::new(ctx.store.clone()),
            backend,
            metrics: ctx.metrics.clone(),
            wake: ctx.wake.executor.clone(),
            cancels: cancel_rx,
            lease: LEASE,
            tenants: ctx.tenants.subscribe(),
        };
        sup.spawn("executor", executor.run(shutdown.clone()));
    }
    if let Some(local) = local {
        sup.spawn("artifact-sweeper", sweep_artifacts(local, shutdown.clone()));
    }
    if ctx.settings.runs(Component::Publisher) {
        let (ctx, stop) = (ctx.clone(), shutdown.clone());
        sup.spawn("publisher", async move {
            crate::amqp::publish::run(ctx, stop).await;
            Ok(())
        });
    }
    tracing::info!(components = ?ctx.settings.components, backend = ?ctx.settings.backend, "agenttask running");
    let result = sup.wait().await;
    // Only now: every component that used the pool has stopped.
    ctx.store.pool().close().await;
    result
}

/// Turns Postgres notifications into in-process wake-ups (and cancel requests for the
/// executor), reconnecting as needed.
async fn listen(
    ctx: Arc<Context>,
    cancels: tokio::sync::mpsc::UnboundedSender<uuid::Uuid>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    while !shutdown.is_cancelled() {
        let mut listener = match sqlx::postgres::PgListener::connect_with(ctx.store.pool()).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for notifications; retrying");
                sleep_or_stop(&shutdown, Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(e) = listener.listen_all(CHANNELS).await {
            tracing::warn!(error = %e, "LISTEN failed; retrying");
            sleep_or_stop(&shutdown, Duration::from_secs(1)).await;
            continue;
        }
        // Missed notifications while reconnecting: wake everyone once.
        ctx.wake.everything_changed();
        loop {
            let n = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                n = listener.try_recv() => n,
            };
            let n = match n {
                Ok(Some(n)) => n,
                // The connection dropped and was re-established; notifications in between
                // are lost, so look again everywhere.
                Ok(None) => {
                    ctx.wake.everything_changed();
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "notification listener lost its connection");
                    break;
                }
            };
            match Notification::parse(n.channel(), n.payload()) {
                Some(Notification::Outbox) => ctx.wake.publisher.notify_one(),
                Some(Notification::Tenants) => match ctx.store.load_tenants().await {
                    Ok(t) => {
                        ctx.tenants.send_replace(Arc::new(t));
                        ctx.wake.scheduler.notify_one();
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot reload tenants"),
                },
                Some(Notification::Cancel(task_id)) => {
                    let _ = cancels.send(task_id);
                }
                Some(Notification::TaskPhase { phase, tenant }) => match phase {
                    Phase::Queued | Phase::Cancelled => ctx.wake.queue_changed(&tenant),
                    Phase::Pending => ctx.wake.executor.notify_one(),
                    Phase::Succeeded | Phase::Failed => ctx.wake.scheduler.notify_one(),
                    Phase::Scheduled | Phase::Running | Phase::Rejected => {}
                },
                None => tracing::debug!(channel = n.channel(), "unknown notification ignored"),
            }
        }
    }
    Ok(())
}

async fn sleep_or_stop(shutdown: &CancellationToken, d: Duration) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

/// Removes artifacts older than their TTL, now and then.
async fn sweep_artifacts(backend: Arc<LocalBackend>, shutdown: CancellationToken) -> anyhow::Result<()> {
    loop {
        let b = backend.clone();
        match tokio::task::spawn_blocking(move || b.sweep_artifacts()).await {
            Ok(Ok(n)) if n > 0 => tracing::info!(removed = n, "expired artifacts removed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "sweeping artifacts failed"),
            _ => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(600)) => {}
        }
    }
}

async fn reload_on_sighup(ctx: Arc<Context>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot install the SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = hup.recv() => match ctx.reload_tenants().await {
                Ok(n) => tracing::info!(tenants = n, "tenants reloaded"),
                Err(e) => tracing::error!(error = %e, "tenants file refused; keeping the previous tenants"),
            },
        }
    }
}
