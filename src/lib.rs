//! AgentTask runs untrusted Python and R code, written by LLM agents, for many tenants at once.
//!
//! Tasks arrive on per-tenant RabbitMQ queues, are stored in Postgres, admitted under each
//! tenant's quotas, run in a sandbox, and end in exactly one result message.
//!
//! # Layout
//! - [`domain`]: pure logic (validation, phases, admission, result shaping); no I/O.
//! - [`config`]: service settings from flags, environment and `agenttask.toml`; the tenants file.
//! - [`store`]: all SQL; the source of truth, the outbox, the scheduler's and executors' queries.
//! - [`amqp`]: RabbitMQ topology, ingest consumers, the result publisher.
//! - [`scheduler`]: the admission loop.
//! - [`executor`]: claims admitted tasks and runs them on a [`exec::Backend`].
//! - [`exec`]: the execution seam (launch, observe, cancel, adopt) and its backends: the local
//!   bubblewrap sandbox and the null backend.
//! - [`kube`]: the Kubernetes backends: the AgentTask CRD, pod builders, reconciler, backend.
//! - [`sandbox`]: pure sandbox policy: bubblewrap arguments, seccomp filter, limits, cgroup paths.
//! - [`http`]: `/metrics`, `/healthz`, `/readyz` and the task API.
//! - [`readiness`]: what each component says about its connections, for `/readyz`.
//! - [`metrics`]: the contract's Prometheus metrics.
//! - [`retention`]: removing old finished tasks' outputs (or rows), one process at a time.
//! - [`retry`]: the one backoff policy of every loop that waits out an outage.
//! - [`service`]: wiring for `agenttask serve`.
//! - [`supervise`]: runs the components; one that stops takes the process down with it.
//! - [`ctl`]: `agentctl`, the user's CLI.

pub mod amqp;
pub mod config;
pub mod ctl;
pub mod domain;
pub mod exec;
pub mod executor;
pub mod http;
pub mod kube;
pub mod metrics;
pub mod readiness;
pub mod retention;
pub mod retry;
pub mod sandbox;
pub mod scheduler;
pub mod service;
pub mod store;
pub mod supervise;
