//! One integration-test binary (faster to link than one per file). Every test talks to the real
//! Postgres and RabbitMQ on this machine, each in its own database and with its own tenant names
//! (or its own vhost), so the suite runs in parallel.

mod support;

/// The whole path: RabbitMQ in, Postgres, scheduler, sandbox, result out.
mod pipeline;

/// The local sandbox against attacks: each attack fails and a normal task still runs.
mod sandbox;

/// Fair-share admission, quotas and the scheduler's leadership.
mod admission;

/// Messages crafted to break the consumer itself.
mod poison;

/// The task API: tenants' tokens and what each may see and do.
mod api;

/// Tenant-safe SQL: each tenant's read-only role sees only its rows in the views.
mod tenant_sql;

/// The execution seam: cancel from agentctl, the null backend.
mod execution;

/// The database's vocabulary (phases, phase sets) matches the service's; unknown stored values
/// are errors.
mod schema;

/// The dashboard and alert rules in deploy/monitoring.
mod monitoring;

/// Outages of the broker and the database, through a proxy.
mod reliability;

/// The Kubernetes backend against the API emulator, and the manifests' schema validation.
mod kube;
mod kube_manifests;
mod kube_sandbox;

/// Postgres restarted, stopped and its pool exhausted, on a private server per test.
mod pg_outage;

/// A task's log lines carry its id through every stage.
mod logs;

/// Results the broker refuses: bounded retry, parking, re-queueing.
mod outbox;

/// agentctl's batch commands, `wait` and its settings, against a running service.
mod ctl;

/// The evaluation pipeline of examples/eval, scored with its SQL query.
mod eval_example;

/// Ingest's group commit: exactly one result per message, duplicates, bad messages, SIGKILL.
mod group_commit;

/// Retention: old finished tasks' outputs, then rows, removed; the views keep answering.
mod retention;

/// Many tenants over a few shared AMQP connections; SIGTERM within the grace period.
mod many_tenants;
