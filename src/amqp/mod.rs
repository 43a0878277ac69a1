//! RabbitMQ edge: the contract's topology, the ingest consumers and the result publisher.
//!
//! Names here are the contract's; nothing else in the crate spells a queue or exchange name.

pub mod ingest;
pub mod publish;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::domain::tenant::TenantName;
pub use crate::domain::validate::RESULTS_EXCHANGE;

/// Submit exchange: direct, routing key = tenant.
pub const TASKS_EXCHANGE: &str = "agenttask.tasks";
/// Alternate exchange of [`TASKS_EXCHANGE`]: catches messages for tenants that do not exist.
pub const UNROUTED_EXCHANGE: &str = "agenttask.unrouted";
/// The one queue behind [`UNROUTED_EXCHANGE`].
pub const UNROUTED_QUEUE: &str = "agenttask.unrouted";
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
    #[error("cannot connect to RabbitMQ at {url}: {source}. Is it running? (rabbitmqctl status; rabbitmq-server -detached)")]
    Connect {
        url: String,
        #[source]
        source: lapin::Error,
    },
    #[error(transparent)]
    Lapin(#[from] lapin::Error),
}

/// Connects with a connection name, so operators can tell our connections apart in the
/// management UI and `rabbitmqctl list_connections`.
pub async fn connect(url: &str, name: &str) -> Result<Connection, AmqpError> {
    let props = ConnectionProperties::default().with_connection_name(LongString::from(name.to_owned()));
    Connection::connect(url, props).await.map_err(|source| AmqpError::Connect {
        url: crate::store::redact(url),
        source,
    })
}

/// Declares the exchanges and, for each tenant, its task and results queues. Idempotent.
pub async fn declare_topology<'a>(
    channel: &Channel,
    tenants: impl IntoIterator<Item = &'a TenantName>,
) -> Result<(), lapin::Error> {
    let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
    channel
        .exchange_declare(UNROUTED_EXCHANGE.into(), ExchangeKind::Fanout, durable, FieldTable::default())
        .await?;
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("alternate-exchange"),
        AMQPValue::LongString(LongString::from(UNROUTED_EXCHANGE.to_owned())),
    );
    channel
        .exchange_declare(TASKS_EXCHANGE.into(), ExchangeKind::Direct, durable, args)
        .await?;
    channel
        .exchange_declare(RESULTS_EXCHANGE.into(), ExchangeKind::Direct, durable, FieldTable::default())
        .await?;
    declare_bound_queue(channel, UNROUTED_QUEUE, UNROUTED_EXCHANGE, "").await?;
    for tenant in tenants {
        declare_bound_queue(channel, &tasks_queue(tenant), TASKS_EXCHANGE, tenant.as_str()).await?;
        declare_bound_queue(channel, &results_queue(tenant), RESULTS_EXCHANGE, tenant.as_str()).await?;
    }
    Ok(())
}

async fn declare_bound_queue(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    key: &str,
) -> Result<(), lapin::Error> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(queue.into(), exchange.into(), key.into(), QueueBindOptions::default(), FieldTable::default())
        .await
}

/// A short string property as `&str`.
pub(crate) fn prop(v: &Option<ShortString>) -> Option<&str> {
    v.as_ref().map(ShortString::as_str)
}
