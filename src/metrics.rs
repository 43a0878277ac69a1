//! Prometheus metrics of the contract, in one registry owned by the service (not the global
//! default, so tests can run several services in one process).

use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric the service exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub submitted: IntCounterVec,
    pub rejected: IntCounterVec,
    pub admitted: IntCounterVec,
    pub finished: IntCounterVec,
    pub queue_depth: IntGaugeVec,
    pub running: IntGaugeVec,
    pub admission_wait: HistogramVec,
    pub task_duration: HistogramVec,
    pub fair_share: GaugeVec,
    pub actual_share: GaugeVec,
    pub fairness_index: Gauge,
    pub reconcile_duration: prometheus::Histogram,
    pub reconcile_errors: IntCounterVec,
    pub build_info: IntGaugeVec,
    pub warm_pool: WarmPoolMetrics,
}

/// The local backend's warm sandbox pool, by language. The backend owns an unregistered set
/// until the service hands it these (`LocalBackend::use_metrics`).
#[derive(Clone)]
pub struct WarmPoolMetrics {
    /// Warm sandboxes ready to be claimed.
    pub size: IntGaugeVec,
    /// Tasks that took a warm sandbox.
    pub hits: IntCounterVec,
    /// Tasks that found the pool empty and started cold.
    pub misses: IntCounterVec,
    /// From starting a warm sandbox until its interpreter waits for a task.
    pub warmup: HistogramVec,
}

impl Default for WarmPoolMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl WarmPoolMetrics {
    /// Unregistered metrics.
    pub fn new() -> Self {
        let l = &["language"];
        WarmPoolMetrics {
            size: IntGaugeVec::new(Opts::new("agenttask_warm_pool_size", "Warm local sandboxes ready to be claimed."), l).expect("valid metric"),
            hits: IntCounterVec::new(Opts::new("agenttask_warm_pool_hits_total", "Tasks that ran in a warm sandbox."), l).expect("valid metric"),
            misses: IntCounterVec::new(Opts::new("agenttask_warm_pool_misses_total", "Tasks that found the warm pool empty and started cold."), l).expect("valid metric"),
            warmup: HistogramVec::new(
                HistogramOpts::new("agenttask_warm_pool_warmup_seconds", "Time to start a warm sandbox until its interpreter waits for a task.")
                    .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
                l,
            ).expect("valid metric"),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            r.register(Box::new(c.clone())).expect("metric names are unique");
            c
        }
        let counter = |name: &str, help: &str, labels: &[&str]| {
            reg(&registry, IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
        };
        let igauge = |name: &str, help: &str, labels: &[&str]| {
            reg(&registry, IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
        };
        let fgauge = |name: &str, help: &str, labels: &[&str]| {
            reg(&registry, GaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
        };
        let wait_buckets = vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
        let m = Metrics {
            submitted: counter("agenttask_tasks_submitted_total", "Tasks accepted into a tenant's queue.", &["tenant"]),
            rejected: counter("agenttask_tasks_rejected_total", "Messages refused, by reason.", &["tenant", "reason"]),
            admitted: counter("agenttask_tasks_admitted_total", "Tasks admitted to run.", &["tenant"]),
            finished: counter("agenttask_tasks_finished_total", "Tasks that ended, by phase and reason.", &["tenant", "phase", "reason"]),
            queue_depth: igauge("agenttask_queue_depth", "Tasks waiting for admission.", &["tenant"]),
            running: igauge("agenttask_running_tasks", "Tasks admitted and not finished.", &["tenant"]),
            admission_wait: reg(&registry, HistogramVec::new(
                HistogramOpts::new("agenttask_admission_wait_seconds", "Time from submit to admission.").buckets(wait_buckets.clone()),
                &["tenant"],
            ).expect("valid metric")),
            task_duration: reg(&registry, HistogramVec::new(
                HistogramOpts::new("agenttask_task_duration_seconds", "Run time of finished tasks.").buckets(wait_buckets.clone()),
                &["tenant", "language"],
            ).expect("valid metric")),
            fair_share: fgauge("agenttask_fair_share", "Each backlogged tenant's fair share of capacity.", &["tenant"]),
            actual_share: fgauge("agenttask_actual_share", "Each tenant's actual share of capacity.", &["tenant"]),
            fairness_index: reg(&registry, Gauge::new("agenttask_fairness_index", "Jain's index of actual / fair share over backlogged tenants.").expect("valid metric")),
            reconcile_duration: reg(&registry, prometheus::Histogram::with_opts(
                HistogramOpts::new("agenttask_reconcile_duration_seconds", "Duration of one reconcile.").buckets(wait_buckets),
            ).expect("valid metric")),
            reconcile_errors: counter("agenttask_reconcile_errors_total", "Reconcile failures, by reason.", &["reason"]),
            build_info: igauge("agenttask_build_info", "Build of this process.", &["version"]),
            warm_pool: {
                let w = WarmPoolMetrics::new();
                WarmPoolMetrics {
                    size: reg(&registry, w.size),
                    hits: reg(&registry, w.hits),
                    misses: reg(&registry, w.misses),
                    warmup: reg(&registry, w.warmup),
                }
            },
            registry,
        };
        m.build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        m
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding does not fail");
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_contract_names() {
        let m = super::Metrics::new();
        m.submitted.with_label_values(&["acme"]).inc();
        m.fairness_index.set(1.0);
        m.warm_pool.hits.with_label_values(&["python"]).inc();
        let text = m.render();
        for name in ["agenttask_tasks_submitted_total{tenant=\"acme\"} 1", "agenttask_warm_pool_hits_total{language=\"python\"} 1", "agenttask_build_info{version=", "agenttask_fairness_index 1"] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
    }
}
