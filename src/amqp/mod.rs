//! RabbitMQ edge: the contract's topology, the ingest consumers and the result publisher.
//!
//! Names here are the contract's; nothing else in the crate spells a queue or exchange name.

pub mod connections;
pub mod ingest;
mod intake;
pub mod publish;
pub mod route;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::domain::tenant::TenantName;
pub use route::{reply_route, ReplyRoute, RESULTS_EXCHANGE};

/// Submit exchange: direct, routing key = tenant.
pub const TASKS_EXCHANGE: &str = "agenttask.tasks";
/// Alternate exchange of [`TASKS_EXCHANGE`]: catches messages for tenants that do not exist.
pub const UNROUTED_EXCHANGE: &str = "agenttask.unrouted";
/// The one queue behind [`UNROUTED_EXCHANGE`].
pub const UNROUTED_QUEUE: &str = "agenttask.unrouted";
/// Where RabbitMQ parks a task message that was delivered [`DELIVERY_LIMIT`] times without being
/// acked: a message the service cannot even parse (it breaks the AMQP client's connection), so
/// it cannot be answered either. Operators inspect it here; nothing else reads it.
pub const DEAD_LETTER_EXCHANGE: &str = "agenttask.deadletter";
pub const DEAD_LETTER_QUEUE: &str = "agenttask.deadletter";
/// Deliveries of one message before the broker dead-letters it. Normal redeliveries (a restart,
/// a dropped connection, a database outage) stay far below this.
pub const DELIVERY_LIMIT: i64 = 10;

/// Header repeating a result's phase, so consumers can route without parsing the body.
pub const PHASE_HEADER: &str = "x-agenttask-phase";

pub fn tasks_queue(tenant: &TenantName) -> String {
    format!("agenttask.tasks.{tenant}")
}

pub fn results_queue(tenant: &TenantName) -> String {
    format!("agenttask.results.{tenant}")
}

/// Errors at the AMQP edge, with what to check.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error(
        "cannot connect to RabbitMQ at {url}: {source}. Is it running? (rabbitmqctl status; rabbitmq-server -detached)"
    )]
    Connect {
        url: String,
        #[source]
        source: lapin::Error,
    },
    #[error(transparent)]
    Lapin(#[from] lapin::Error),
    /// A shared connection is down and the attempt to reconnect it (made by another of its
    /// users while this one waited) failed.
    #[error("the shared RabbitMQ connection is down: {0}")]
    SharedConnectionDown(String),
}

/// Connects with a connection name, so operators can tell our connections apart in the
/// management UI and `rabbitmqctl list_connections`.
pub async fn connect(url: &str, name: &str) -> Result<Connection, AmqpError> {
    let props = ConnectionProperties::default().with_connection_name(LongString::from(name.to_owned()));
    Connection::connect(url, props)
        .await
        .map_err(|source| AmqpError::Connect { url: crate::store::redact(url), source })
}

/// Declares the exchanges and, for each tenant, its task and results queues. Idempotent.
pub async fn declare_topology<'a>(
    channel: &Channel,
    tenants: impl IntoIterator<Item = &'a TenantName>,
) -> Result<(), lapin::Error> {
    declare_exchanges(channel).await?;
    for tenant in tenants {
        declare_tenant(channel, tenant).await?;
    }
    Ok(())
}

/// The exchanges, the unrouted queue and the dead-letter queue: what every tenant shares.
pub async fn declare_exchanges(channel: &Channel) -> Result<(), lapin::Error> {
    let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
    channel.exchange_declare(UNROUTED_EXCHANGE.into(), ExchangeKind::Fanout, durable, FieldTable::default()).await?;
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("alternate-exchange"),
        AMQPValue::LongString(LongString::from(UNROUTED_EXCHANGE.to_owned())),
    );
    channel.exchange_declare(TASKS_EXCHANGE.into(), ExchangeKind::Direct, durable, args).await?;
    channel.exchange_declare(RESULTS_EXCHANGE.into(), ExchangeKind::Direct, durable, FieldTable::default()).await?;
    channel.exchange_declare(DEAD_LETTER_EXCHANGE.into(), ExchangeKind::Fanout, durable, FieldTable::default()).await?;
    declare_bound_queue(channel, DEAD_LETTER_QUEUE, DEAD_LETTER_EXCHANGE, "", QueueKind::Plain).await?;
    declare_bound_queue(channel, UNROUTED_QUEUE, UNROUTED_EXCHANGE, "", QueueKind::Inbound).await
}

/// One tenant's task queue (bound to the submit exchange) and results queue.
pub async fn declare_tenant(channel: &Channel, tenant: &TenantName) -> Result<(), lapin::Error> {
    declare_bound_queue(channel, &tasks_queue(tenant), TASKS_EXCHANGE, tenant.as_str(), QueueKind::Inbound).await?;
    declare_bound_queue(channel, &results_queue(tenant), RESULTS_EXCHANGE, tenant.as_str(), QueueKind::Plain).await
}

#[derive(Clone, Copy)]
enum QueueKind {
    /// Untrusted messages the service consumes: a quorum queue, so the broker counts
    /// deliveries and dead-letters a message that keeps killing the consumer.
    Inbound,
    Plain,
}

async fn declare_bound_queue(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    key: &str,
    kind: QueueKind,
) -> Result<(), lapin::Error> {
    let mut args = FieldTable::default();
    if let QueueKind::Inbound = kind {
        args.insert(ShortString::from("x-queue-type"), AMQPValue::LongString(LongString::from("quorum")));
        args.insert(ShortString::from("x-delivery-limit"), AMQPValue::LongLongInt(DELIVERY_LIMIT));
        args.insert(
            ShortString::from("x-dead-letter-exchange"),
            AMQPValue::LongString(LongString::from(DEAD_LETTER_EXCHANGE)),
        );
    }
    channel
        .queue_declare(queue.into(), QueueDeclareOptions { durable: true, ..Default::default() }, args)
        .await
        .inspect_err(|e| {
            if e.to_string().contains("PRECONDITION_FAILED") {
                tracing::error!(
                    %queue,
                    "queue {queue} exists with other arguments (an older AgentTask declared it); \
                     move its messages elsewhere and delete it (rabbitmqctl delete_queue {queue}), \
                     then restart"
                );
            }
        })?;
    channel
        .queue_bind(queue.into(), exchange.into(), key.into(), QueueBindOptions::default(), FieldTable::default())
        .await
}

/// Gives threads spawned without an explicit stack size (lapin's I/O thread, one per
/// connection) a large stack.
///
/// lapin parses AMQP field tables recursively on that thread; a message whose headers nest
/// thousands of tables deep (5 bytes a level: 26,000 levels fit in a 128 KiB frame) would
/// otherwise overflow the default 2 MiB stack and abort the process, again at every redelivery.
/// 1 GiB covers that nesting even in debug builds; it is address space, touched only by such a
/// message. Runtimes that spawn many threads must set their own stack size
/// ([`THREAD_STACK_BYTES`]). Call first thing in `main`, before any thread exists (the value is
/// read once per process).
pub fn reserve_parser_stack() {
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        std::env::set_var("RUST_MIN_STACK", (1usize << 30).to_string());
    }
}

/// Stack of the async runtime's threads, set explicitly so [`reserve_parser_stack`] does not
/// apply to them.
pub const THREAD_STACK_BYTES: usize = 8 << 20;

/// A short string property as `&str`.
pub(crate) fn prop(v: &Option<ShortString>) -> Option<&str> {
    v.as_ref().map(ShortString::as_str)
}
