//! Prometheus metrics of the contract, in one registry owned by the service (not the global
//! default, so tests can run several services in one process).

use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric the service exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Every metric family's name, for checking dashboards and alert rules against them.
    names: Vec<String>,
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
    /// Results waiting in the outbox to be published.
    pub outbox_pending: prometheus::IntGauge,
    /// Age of the oldest unpublished result (0 when the outbox is empty).
    pub outbox_oldest_seconds: Gauge,
    /// Results parked after the broker refused them too often (see `agenttask.parked_results`).
    pub outbox_parked: prometheus::IntGauge,
    /// 1 when `/readyz` would answer 200, evaluated at every scrape.
    pub ready: prometheus::IntGauge,
    /// Messages per ingest group commit.
    pub ingest_group_size: prometheus::Histogram,
    /// Finished tasks retention removed the outputs of (`action="outputs_removed"`) or deleted
    /// (`action="deleted"`).
    pub retention: IntCounterVec,
    /// The local backend's warm sandboxes (see `exec::local::warm`).
    pub warm: WarmMetrics,
    /// Errors a component handled without stopping (logged and counted, never silent), by the
    /// component and the error's `metric_label()`.
    pub errors: IntCounterVec,
}

/// The warm pool's metrics, handed to the local backend.
#[derive(Clone, Debug)]
pub struct WarmMetrics {
    pub idle: IntGaugeVec,
    pub hits: IntCounterVec,
    pub misses: IntCounterVec,
    pub warmup: HistogramVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let names = std::cell::RefCell::new(Vec::new());
        fn reg<C: prometheus::core::Collector + Clone + 'static>(
            r: &Registry,
            names: &std::cell::RefCell<Vec<String>>,
            c: C,
        ) -> C {
            names.borrow_mut().extend(c.desc().into_iter().map(|d| d.fq_name.clone()));
            r.register(Box::new(c.clone())).expect("metric names are unique");
            c
        }
        let counter = |name: &str, help: &str, labels: &[&str]| {
            reg(&registry, &names, IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
        };
        let igauge = |name: &str, help: &str, labels: &[&str]| {
            reg(&registry, &names, IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
        };
        let fgauge = |name: &str, help: &str, labels: &[&str]| {
            reg(&registry, &names, GaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
        };
        let wait_buckets =
            vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
        let m = Metrics {
            submitted: counter("agenttask_tasks_submitted_total", "Tasks accepted into a tenant's queue.", &["tenant"]),
            rejected: counter("agenttask_tasks_rejected_total", "Messages refused, by reason.", &["tenant", "reason"]),
            admitted: counter("agenttask_tasks_admitted_total", "Tasks admitted to run.", &["tenant"]),
            finished: counter(
                "agenttask_tasks_finished_total",
                "Tasks that ended, by phase and reason.",
                &["tenant", "phase", "reason"],
            ),
            queue_depth: igauge("agenttask_queue_depth", "Tasks waiting for admission.", &["tenant"]),
            running: igauge("agenttask_running_tasks", "Tasks admitted and not finished.", &["tenant"]),
            admission_wait: reg(
                &registry,
                &names,
                HistogramVec::new(
                    HistogramOpts::new("agenttask_admission_wait_seconds", "Time from submit to admission.")
                        .buckets(wait_buckets.clone()),
                    &["tenant"],
                )
                .expect("valid metric"),
            ),
            task_duration: reg(
                &registry,
                &names,
                HistogramVec::new(
                    HistogramOpts::new("agenttask_task_duration_seconds", "Run time of finished tasks.")
                        .buckets(wait_buckets.clone()),
                    &["tenant", "language"],
                )
                .expect("valid metric"),
            ),
            fair_share: fgauge("agenttask_fair_share", "Each backlogged tenant's fair share of capacity.", &["tenant"]),
            actual_share: fgauge("agenttask_actual_share", "Each tenant's actual share of capacity.", &["tenant"]),
            fairness_index: reg(
                &registry,
                &names,
                Gauge::new("agenttask_fairness_index", "Jain's index of actual / fair share over backlogged tenants.")
                    .expect("valid metric"),
            ),
            reconcile_duration: reg(
                &registry,
                &names,
                prometheus::Histogram::with_opts(
                    HistogramOpts::new("agenttask_reconcile_duration_seconds", "Duration of one reconcile.")
                        .buckets(wait_buckets),
                )
                .expect("valid metric"),
            ),
            reconcile_errors: counter(
                "agenttask_reconcile_errors_total",
                "Reconcile failures, by reason.",
                &["reason"],
            ),
            build_info: igauge("agenttask_build_info", "Build of this process.", &["version"]),
            retention: counter(
                "agenttask_retention_tasks_total",
                "Finished tasks whose outputs retention removed, or that it deleted, by action.",
                &["action"],
            ),
            errors: counter(
                "agenttask_errors_total",
                "Errors handled without stopping, by component and kind.",
                &["component", "error"],
            ),
            outbox_pending: reg(
                &registry,
                &names,
                prometheus::IntGauge::new("agenttask_outbox_pending", "Results waiting in the outbox to be published.")
                    .expect("valid metric"),
            ),
            outbox_oldest_seconds: reg(
                &registry,
                &names,
                Gauge::new(
                    "agenttask_outbox_oldest_seconds",
                    "Age of the oldest unpublished result; 0 when the outbox is empty.",
                )
                .expect("valid metric"),
            ),
            outbox_parked: reg(
                &registry,
                &names,
                prometheus::IntGauge::new(
                    "agenttask_outbox_parked",
                    "Results parked after the broker refused them too often; see agenttask.parked_results.",
                )
                .expect("valid metric"),
            ),
            ready: reg(
                &registry,
                &names,
                prometheus::IntGauge::new(
                    "agenttask_ready",
                    "1 when /readyz answers 200 (database and broker reachable), evaluated at each scrape.",
                )
                .expect("valid metric"),
            ),
            ingest_group_size: reg(
                &registry,
                &names,
                prometheus::Histogram::with_opts(
                    HistogramOpts::new(
                        "agenttask_ingest_group_size",
                        "Messages stored by one ingest transaction (group commit).",
                    )
                    .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
                )
                .expect("valid metric"),
            ),
            warm: WarmMetrics {
                idle: igauge(
                    "agenttask_warm_pool_size",
                    "Warm sandboxes started and waiting for a task, by language.",
                    &["language"],
                ),
                hits: counter(
                    "agenttask_warm_pool_hits_total",
                    "Tasks that ran in a warm sandbox, by language.",
                    &["language"],
                ),
                misses: counter(
                    "agenttask_warm_pool_misses_total",
                    "Tasks of a language with a warm pool that started cold, by language and why \
                     (empty: none was ready; env: the task sets a start-up variable; failed: handing \
                     it over failed).",
                    &["language", "reason"],
                ),
                warmup: reg(
                    &registry,
                    &names,
                    HistogramVec::new(
                        HistogramOpts::new(
                            "agenttask_warm_pool_warmup_seconds",
                            "Time from starting a warm sandbox to its interpreter waiting for a task.",
                        )
                        .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
                        &["language"],
                    )
                    .expect("valid metric"),
                ),
            },
            registry,
            names: names.into_inner(),
        };
        m.build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        m
    }

    /// The name of every metric family this service exports (histograms without their
    /// `_bucket`/`_sum`/`_count` suffixes).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding does not fail");
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
        let text = m.render();
        for name in [
            "agenttask_tasks_submitted_total{tenant=\"acme\"} 1",
            "agenttask_build_info{version=",
            "agenttask_fairness_index 1",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
    }
}
