//! Supervision of the service's components: every component and background task runs on one
//! tracker; when one of them stops while the service is not shutting down (it returned, failed
//! or panicked), the supervisor says which and why, shuts the others down gracefully and makes
//! the process exit non-zero, so that systemd or Kubernetes restarts it. Half a service that
//! keeps answering `/healthz` is worse than a restart.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long the other components get to stop after one failed or shutdown began.
pub const GRACE: Duration = Duration::from_secs(30);

/// Runs named components until shutdown or the first unexpected exit.
pub struct Supervisor {
    tracker: TaskTracker,
    shutdown: CancellationToken,
    exits: mpsc::UnboundedSender<(&'static str, anyhow::Result<()>)>,
    exited: mpsc::UnboundedReceiver<(&'static str, anyhow::Result<()>)>,
}

impl Supervisor {
    pub fn new(shutdown: CancellationToken) -> Self {
        let (exits, exited) = mpsc::unbounded_channel();
        Supervisor { tracker: TaskTracker::new(), shutdown, exits, exited }
    }

    /// The token every component watches; cancelled on shutdown or when a component fails.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// The tracker, for components that start tasks of their own.
    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// Starts a component. It should run until the shutdown token is cancelled.
    pub fn spawn<F>(&self, name: &'static str, component: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let exits = self.exits.clone();
        self.tracker.spawn(async move {
            let result = match AssertUnwindSafe(component).catch_unwind().await {
                Ok(r) => r,
                Err(panic) => Err(anyhow::anyhow!("panicked: {}", panic_message(&panic))),
            };
            let _ = exits.send((name, result));
        });
    }

    /// Waits for shutdown or the first component to stop; then stops the rest and waits for
    /// them (at most [`GRACE`]). Returns an error naming the component when one stopped on its
    /// own.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        self.tracker.close();
        drop(self.exits);
        let first = tokio::select! {
            _ = self.shutdown.cancelled() => None,
            exit = self.exited.recv() => exit,
        };
        let failure = match first {
            Some((name, result)) if !self.shutdown.is_cancelled() => {
                let why = match result {
                    Ok(()) => "it returned".to_owned(),
                    Err(e) => format!("{e:#}"),
                };
                tracing::error!(component = name, reason = %why, "a component stopped; shutting the service down");
                self.shutdown.cancel();
                Some(anyhow::anyhow!("component {name} stopped unexpectedly: {why}"))
            }
            Some((name, Err(e))) => {
                tracing::warn!(component = name, error = %format!("{e:#}"), "component failed while stopping");
                None
            }
            _ => None,
        };
        let rest = async {
            while let Some((name, result)) = self.exited.recv().await {
                match result {
                    Ok(()) => tracing::debug!(component = name, "stopped"),
                    Err(e) => {
                        tracing::warn!(component = name, error = %format!("{e:#}"), "component failed while stopping")
                    }
                }
            }
        };
        if tokio::time::timeout(GRACE, async { tokio::join!(rest, self.tracker.wait()) }).await.is_err() {
            tracing::error!("components did not stop within {GRACE:?}; exiting anyway");
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_component_that_returns_stops_the_others_and_is_named() {
        let shutdown = CancellationToken::new();
        let sup = Supervisor::new(shutdown.clone());
        let stopped = CancellationToken::new();
        let s = shutdown.clone();
        let flag = stopped.clone();
        sup.spawn("steady", async move {
            s.cancelled().await;
            flag.cancel();
            Ok(())
        });
        sup.spawn("quitter", async { Err(anyhow::anyhow!("lost its broker")) });
        let err = sup.wait().await.unwrap_err().to_string();
        assert!(err.contains("quitter") && err.contains("lost its broker"), "{err}");
        assert!(shutdown.is_cancelled());
        assert!(stopped.is_cancelled(), "the other component was shut down before wait returned");
    }

    #[tokio::test]
    async fn a_panic_is_a_failure_and_a_clean_shutdown_is_not() {
        let sup = Supervisor::new(CancellationToken::new());
        sup.spawn("boom", async { panic!("kaboom") });
        let err = sup.wait().await.unwrap_err().to_string();
        assert!(err.contains("boom") && err.contains("kaboom"), "{err}");

        let shutdown = CancellationToken::new();
        let sup = Supervisor::new(shutdown.clone());
        let s = shutdown.clone();
        sup.spawn("steady", async move {
            s.cancelled().await;
            Ok(())
        });
        shutdown.cancel();
        sup.wait().await.unwrap();
    }
}
