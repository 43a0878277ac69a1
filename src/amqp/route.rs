//! Where results go: the results exchange and the `reply_to` rule. Pure; RabbitMQ naming lives
//! in `amqp`, not in `domain`.

use crate::domain::tenant::TenantName;

/// Where a task's result goes: an exchange and routing key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyRoute {
    pub exchange: String,
    pub routing_key: String,
}

/// The exchange for results of tasks without `reply_to`.
pub const RESULTS_EXCHANGE: &str = "agenttask.results";

impl ReplyRoute {
    /// The route as the store records it.
    pub fn as_reply_to(&self) -> crate::store::ReplyTo<'_> {
        crate::store::ReplyTo { exchange: &self.exchange, routing_key: &self.routing_key }
    }

    /// The tenant's durable results queue, through the results exchange.
    pub fn tenant_results(tenant: &TenantName) -> Self {
        ReplyRoute { exchange: RESULTS_EXCHANGE.to_owned(), routing_key: tenant.as_str().to_owned() }
    }
}

/// Decides where the result of a message with this `reply_to` may go. A tenant must never be able
/// to write into another tenant's queues, so only broker-generated reply queues and the tenant's
/// own `agenttask.reply.<tenant>.` namespace are allowed.
pub fn reply_route(tenant: &TenantName, reply_to: Option<&str>) -> Result<ReplyRoute, String> {
    let Some(q) = reply_to else {
        return Ok(ReplyRoute::tenant_results(tenant));
    };
    let own_prefix = format!("agenttask.reply.{tenant}.");
    let printable = q.len() <= 255 && q.bytes().all(|c| (0x21..0x7f).contains(&c));
    let allowed = printable
        && (q.starts_with("amq.gen-")
            || q.starts_with("amq.rabbitmq.reply-to")
            || (q.starts_with(&own_prefix) && q.len() > own_prefix.len()));
    if allowed {
        Ok(ReplyRoute { exchange: String::new(), routing_key: q.to_owned() })
    } else {
        Err(format!(
            "reply_to {:?} is refused: use an amq.gen-* or amq.rabbitmq.reply-to queue, or a \
             queue named {own_prefix}<name>",
            q.chars().take(80).collect::<String>()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant() -> TenantName {
        TenantName::parse("acme").unwrap()
    }

    #[test]
    fn reply_to_cannot_reach_other_tenants() {
        let t = tenant();
        assert_eq!(reply_route(&t, None).unwrap().exchange, RESULTS_EXCHANGE);
        for ok in ["amq.gen-abc", "amq.rabbitmq.reply-to.g1h2", "agenttask.reply.acme.x"] {
            assert_eq!(reply_route(&t, Some(ok)).unwrap().routing_key, ok);
        }
        for bad in [
            "agenttask.tasks.other",
            "agenttask.results.other",
            "agenttask.reply.other.x",
            "agenttask.reply.acme.",
            "agenttask.reply.acmex.y",
            "amq.gen-\u{0}x",
            "victim-queue",
            "",
        ] {
            assert!(reply_route(&t, Some(bad)).is_err(), "{bad}");
        }
    }
}
