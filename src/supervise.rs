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

/// A component's own error, whatever its type: the supervisor only reports it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a component's future may return: nothing (it handles its errors itself and runs until
/// shutdown) or a `Result` whose error says why it could not go on.
pub trait ComponentExit: Send + 'static {
    fn into_result(self) -> Result<(), BoxError>;
}

impl ComponentExit for () {
    fn into_result(self) -> Result<(), BoxError> {
        Ok(())
    }
}

impl<E: std::error::Error + Send + Sync + 'static> ComponentExit for Result<(), E> {
    fn into_result(self) -> Result<(), BoxError> {
        self.map_err(|e| Box::new(e) as BoxError)
    }
}

/// Why the service stopped on its own: which component stopped, and how.
#[derive(Debug, thiserror::Error)]
pub enum Stopped {
    /// The component's future finished without an error although nobody asked it to stop.
    #[error("component {component} stopped unexpectedly: it returned")]
    Returned { component: &'static str },
    /// The component gave up with an error.
    #[error("component {component} stopped unexpectedly: {source}")]
    Failed {
        component: &'static str,
        #[source]
        source: BoxError,
    },
    #[error("component {component} stopped unexpectedly: panicked: {message}")]
    Panicked { component: &'static str, message: String },
}

impl Stopped {
    /// The component that stopped.
    pub fn component(&self) -> &'static str {
        match self {
            Stopped::Returned { component }
            | Stopped::Failed { component, .. }
            | Stopped::Panicked { component, .. } => component,
        }
    }
}

/// How one component's future ended.
enum Exit {
    Returned,
    Failed(BoxError),
    Panicked(String),
}

impl Exit {
    fn into_stopped(self, component: &'static str) -> Stopped {
        match self {
            Exit::Returned => Stopped::Returned { component },
            Exit::Failed(source) => Stopped::Failed { component, source },
            Exit::Panicked(message) => Stopped::Panicked { component, message },
        }
    }
}

/// Runs named components until shutdown or the first unexpected exit.
pub struct Supervisor {
    tracker: TaskTracker,
    shutdown: CancellationToken,
    exits: mpsc::UnboundedSender<(&'static str, Exit)>,
    exited: mpsc::UnboundedReceiver<(&'static str, Exit)>,
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
        F: Future + Send + 'static,
        F::Output: ComponentExit,
    {
        let exits = self.exits.clone();
        self.tracker.spawn(async move {
            let exit = match AssertUnwindSafe(component).catch_unwind().await {
                Ok(r) => match r.into_result() {
                    Ok(()) => Exit::Returned,
                    Err(e) => Exit::Failed(e),
                },
                Err(panic) => Exit::Panicked(panic_message(&panic)),
            };
            let _ = exits.send((name, exit));
        });
    }

    /// Waits for shutdown or the first component to stop; then stops the rest and waits for
    /// them (at most [`GRACE`]). Returns an error naming the component when one stopped on its
    /// own.
    pub async fn wait(mut self) -> Result<(), Stopped> {
        self.tracker.close();
        drop(self.exits);
        let first = tokio::select! {
            _ = self.shutdown.cancelled() => None,
            exit = self.exited.recv() => exit,
        };
        let stopped_while_stopping = |name: &'static str, exit: Exit| match exit {
            Exit::Returned => tracing::debug!(component = name, "stopped"),
            Exit::Failed(e) => tracing::warn!(component = name, error = %e, "component failed while stopping"),
            Exit::Panicked(m) => tracing::warn!(component = name, panic = %m, "component panicked while stopping"),
        };
        let failure = match first {
            Some((name, exit)) if !self.shutdown.is_cancelled() => {
                let stopped = exit.into_stopped(name);
                tracing::error!(component = name, error = %stopped, "a component stopped; shutting the service down");
                self.shutdown.cancel();
                Some(stopped)
            }
            Some((name, exit)) => {
                stopped_while_stopping(name, exit);
                None
            }
            None => None,
        };
        let rest = async {
            while let Some((name, exit)) = self.exited.recv().await {
                stopped_while_stopping(name, exit);
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
        });
        sup.spawn("quitter", async { Err(std::io::Error::other("lost its broker")) });
        let err = sup.wait().await.unwrap_err();
        assert!(matches!(err, Stopped::Failed { component: "quitter", .. }), "{err:?}");
        let err = err.to_string();
        assert!(err.contains("quitter") && err.contains("lost its broker"), "{err}");
        assert!(shutdown.is_cancelled());
        assert!(stopped.is_cancelled(), "the other component was shut down before wait returned");
    }

    #[tokio::test]
    async fn a_panic_is_a_failure_and_a_clean_shutdown_is_not() {
        let sup = Supervisor::new(CancellationToken::new());
        sup.spawn("boom", async {
            if true {
                panic!("kaboom")
            }
        });
        let err = sup.wait().await.unwrap_err();
        assert!(matches!(err, Stopped::Panicked { component: "boom", .. }), "{err:?}");
        let err = err.to_string();
        assert!(err.contains("boom") && err.contains("kaboom"), "{err}");

        let shutdown = CancellationToken::new();
        let sup = Supervisor::new(shutdown.clone());
        let s = shutdown.clone();
        sup.spawn("steady", async move { s.cancelled().await });
        shutdown.cancel();
        sup.wait().await.unwrap();

        // A component without an error type that returns is a failure too.
        let sup = Supervisor::new(CancellationToken::new());
        sup.spawn("done", async {});
        let err = sup.wait().await.unwrap_err();
        assert!(matches!(err, Stopped::Returned { component: "done" }), "{err:?}");
        assert_eq!(err.component(), "done");
    }
}
