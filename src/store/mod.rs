//! Postgres: the source of truth. All SQL of the service lives under this module.
//!
//! - [`Store::connect`] creates the database when it is missing and applies the migrations.
//! - `tasks`: the task row every consumer reads, and queueing a finished task's result.
//! - one module per consumer: `ingest` (idempotent inserts, backlog), `admission` (the
//!   scheduler's round), `runs` (executors: claims, leases, transitions, cancellation), `api`
//!   (reads for the task API), `tenants` (the configured tenants mirrored for the SQL views).
//! - `kube`: what the Kubernetes reconciler asks about directly applied and admitted AgentTasks.
//! - `tokens`: tenants' API tokens (hashes only).
//! - `outbox`: results waiting to be published.
//! - `retention`: removing old finished tasks' outputs, or the rows, in bounded batches.
//! - `sql_types`: how `Phase`, `Reason` and `Language` are stored.
//!
//! Every static query is checked against the schema at compile time (`sqlx::query!` and
//! friends; offline data in `.sqlx/`, refreshed by `cargo sqlx prepare`). The functions take a
//! connection (`impl PgExecutor` or `&mut PgConnection`) so callers can compose transactions;
//! the `Store` methods are shorthands on the pool.

mod admission;
mod api;
mod ingest;
mod kube;
pub mod notify;
mod outbox;
pub mod retention;
mod runs;
mod sql_types;
mod tasks;
mod tenants;
mod tokens;

pub use admission::{acquire_leadership, reject_queued, AdmissionRound, Admitted, QueuedHead, RunningUsage};
pub use api::{batch_status, batch_tasks, find_task, list_tasks, position, BatchStatus, Position, TaskSummary};
pub use ingest::{
    enqueue_orphan_result, insert_rejection, insert_task, insert_tasks, BacklogFull, Inserted, NewRejection, NewTask,
};
pub use kube::KubeTask;
pub use outbox::{
    claim_outbox, delete_published, record_refusals, AfterRefusal, OutboxBatch, OutboxLag, OutboxMessage, Refusal,
    RetryPolicy,
};
pub use runs::{
    adopt, cancel_requested, claim, finish, reap_expired, release, renew_leases, request_cancel, unfinished_in_batch,
    unstarted_of_other_tenants, write_journal, AdoptedRun, CancelOutcome, ClaimedTask, FinishWrite, JournalWritten,
    Mark, MarkWrite,
};
pub use tasks::{fetch_row, ReplyTo, TaskRow};
pub use tenants::{load_tenants, phase_counts, sync_tenants, tenant_statuses, TenantStatus};
pub use tokens::{create_token, list_tokens, live_token, revoke_token, touch_token, TokenInfo};

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

/// Errors of the store; the message says what to check.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid database URL {url:?}: {source}")]
    BadUrl {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot reach Postgres at {target}: {source}. Is it running? (pg_lsclusters; pg_ctlcluster <version> main start)")]
    Unreachable {
        target: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("applying migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored value the service cannot read back (a bug or a hand edit): logged, never guessed.
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl StoreError {
    /// A stable, low-cardinality name for metrics (`agenttask_errors_total{error}`).
    pub fn metric_label(&self) -> &'static str {
        match self {
            StoreError::BadUrl { .. } => "bad_database_url",
            StoreError::Unreachable { .. } => "database_unreachable",
            StoreError::Migrate(_) => "migration_failed",
            StoreError::Corrupt(_) => "corrupt_row",
            StoreError::Sql(sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_)) => "corrupt_row",
            StoreError::Sql(sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed) => {
                "database_unreachable"
            }
            StoreError::Sql(_) => "database_error",
        }
    }

    /// Postgres refused a *value* (SQLSTATE class 22, data exception, e.g. an invalid escape in
    /// JSON): retrying the same write can never succeed. Everything else (lost connections,
    /// deadlocks, serialization failures, a full pool) is worth retrying.
    pub fn is_bad_value(&self) -> bool {
        match self {
            StoreError::Sql(sqlx::Error::Database(db)) => db.code().is_some_and(|c| c.starts_with("22")),
            _ => false,
        }
    }
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A handle on the database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
    /// Kept to open dedicated connections (the scheduler's leadership lock lives on one).
    opts: PgConnectOptions,
}

impl Store {
    /// Connects, creating the database if it does not exist, and applies migrations.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store> {
        let opts = connect_options(url)?;
        create_database_if_missing(&opts).await?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts.clone())
            .await
            .map_err(|source| StoreError::Unreachable { target: describe(&opts), source })?;
        let store = Store { pool, opts };
        store.migrate().await?;
        Ok(store)
    }

    /// A handle that connects only when first used: for tests of components whose code under
    /// test never reaches the database.
    pub fn connect_lazy(url: &str) -> Result<Store> {
        let opts = connect_options(url)?;
        let pool = PgPoolOptions::new().max_connections(1).connect_lazy_with(opts.clone());
        Ok(Store { pool, opts })
    }

    /// Applies pending migrations. Safe to run from several processes at once: sqlx serialises
    /// them with an advisory lock.
    pub async fn migrate(&self) -> Result<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A connection outside the pool, for state that lives as long as a session (locks). The
    /// server probes it every few seconds, so a session whose host vanished (not just its
    /// process) is closed, and its locks released, in about 25 s rather than hours.
    pub async fn dedicated_connection(&self) -> Result<sqlx::PgConnection> {
        self.opts
            .clone()
            .options([("tcp_keepalives_idle", "10"), ("tcp_keepalives_interval", "5"), ("tcp_keepalives_count", "3")])
            .connect()
            .await
            .map_err(|source| StoreError::Unreachable { target: describe(&self.opts), source })
    }

    /// Whether every migration this build knows is applied: a newer binary against an older
    /// schema is not ready. Also answers "can we run a query right now?".
    pub async fn migrations_applied(&self) -> Result<bool> {
        let latest = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
        let applied: Option<i64> = sqlx::query_scalar!("select max(version) from _sqlx_migrations where success")
            .fetch_one(&self.pool)
            .await?;
        Ok(applied.unwrap_or(0) >= latest)
    }

    /// For readiness: can we run a query right now?
    pub async fn ping(&self) -> bool {
        sqlx::query!("select 1 as one").fetch_one(&self.pool).await.is_ok()
    }
}

/// The URL's connection options, with every statement planned for its own parameters and the
/// table sizes of the moment. By default Postgres switches a prepared statement to one generic
/// plan after five executions, and sqlx prepares every query once per connection: a plan made
/// while `tasks` held a few hundred rows (a seq scan with `task_id = any($1)`) was still used
/// with 100,000 rows, where that admission statement took 76 ms instead of an index lookup.
/// Planning each execution costs a fraction of a millisecond.
fn connect_options(url: &str) -> Result<PgConnectOptions> {
    Ok(PgConnectOptions::from_str(url)
        .map_err(|source| StoreError::BadUrl { url: redact(url), source })?
        .options([("plan_cache_mode", "force_custom_plan")]))
}

fn describe(opts: &PgConnectOptions) -> String {
    format!("{}:{}/{}", opts.get_host(), opts.get_port(), opts.get_database().unwrap_or("(default)"))
}

/// Hides a password in a URL we print.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{}:***{}", &url[..s + 3], user, &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

async fn create_database_if_missing(opts: &PgConnectOptions) -> Result<()> {
    let Some(db) = opts.get_database().map(str::to_owned) else {
        return Ok(());
    };
    match opts.connect().await {
        Ok(conn) => {
            let _ = conn.close().await;
            return Ok(());
        }
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => {}
        Err(source) => return Err(StoreError::Unreachable { target: describe(opts), source }),
    }
    let admin = opts.clone().database("postgres");
    let mut conn =
        admin.connect().await.map_err(|source| StoreError::Unreachable { target: describe(&admin), source })?;
    let stmt = format!("create database \"{}\"", db.replace('"', "\"\""));
    match sqlx::query(sqlx::AssertSqlSafe(stmt)).execute(&mut conn).await {
        Ok(_) => tracing::info!(database = %db, "created database"),
        // Another process created it between our check and now (42P04), or at the same
        // moment (23505 on pg_database's unique index).
        Err(sqlx::Error::Database(e)) if matches!(e.code().as_deref(), Some("42P04" | "23505")) => {}
        Err(e) => return Err(e.into()),
    }
    let _ = conn.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_redacted() {
        assert_eq!(super::redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(super::redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(super::redact("amqp://guest:guest@127.0.0.1:5672/%2f"), "amqp://guest:***@127.0.0.1:5672/%2f");
    }
}
