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
    let allowed = broker_generated(q) || (printable(q) && q.starts_with(&own_prefix) && q.len() > own_prefix.len());
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

fn printable(q: &str) -> bool {
    q.len() <= 255 && q.bytes().all(|c| (0x21..0x7f).contains(&c))
}

/// A reply queue that only its consumer can have: RabbitMQ names it (`amq.gen-*`) or routes
/// it to the publishing channel (direct reply-to).
fn broker_generated(q: &str) -> bool {
    printable(q) && (q.starts_with("amq.gen-") || q.starts_with("amq.rabbitmq.reply-to"))
}

/// Where the `UnknownTenant` result of a message for a tenant that does not exist may go. A
/// routing key that is a valid tenant name may use that name's reply namespace; any other key
/// only broker-generated queues, so that no configured tenant's namespace can receive it.
pub fn unrouted_reply_route(routing_key: &str, reply_to: Option<&str>) -> Result<ReplyRoute, String> {
    match (TenantName::parse(routing_key), reply_to) {
        (Ok(name), _) => reply_route(&name, reply_to),
        (Err(_), Some(q)) if broker_generated(q) => {
            Ok(ReplyRoute { exchange: String::new(), routing_key: q.to_owned() })
        }
        (Err(_), _) => Err(format!(
            "routing key {:?} is not a tenant name: a reply can only go to an amq.gen-* or \
             amq.rabbitmq.reply-to queue",
            routing_key.chars().take(64).collect::<String>()
        )),
    }
}

/// The task id of the `UnknownTenant` result for one message: the same message (a redelivery)
/// always gets the same id, so consumers that drop duplicates by `message_id` see it once.
pub fn unrouted_task_id(
    routing_key: &str,
    message_id: Option<&str>,
    correlation_id: Option<&str>,
    body: &[u8],
) -> uuid::Uuid {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for part in
        [routing_key.as_bytes(), message_id.unwrap_or("").as_bytes(), correlation_id.unwrap_or("").as_bytes(), body]
    {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
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

    #[test]
    fn an_invalid_routing_key_cannot_reply_into_a_tenants_namespace() {
        // A real tenant may be named "invalid": nothing of an invalid key may reach its queues.
        for key in ["Not A Tenant", "", "x".repeat(70).as_str(), "-bad"] {
            assert!(unrouted_reply_route(key, Some("agenttask.reply.invalid.q")).is_err(), "{key:?}");
            assert!(unrouted_reply_route(key, None).is_err(), "{key:?}");
            assert_eq!(unrouted_reply_route(key, Some("amq.gen-1")).unwrap().routing_key, "amq.gen-1");
        }
        // A valid name that is not configured keeps its own namespace, and only its own.
        assert!(unrouted_reply_route("ghost", Some("agenttask.reply.ghost.q")).is_ok());
        assert!(unrouted_reply_route("ghost", Some("agenttask.reply.acme.q")).is_err());
    }

    #[test]
    fn unknown_tenant_results_have_a_stable_id_per_message() {
        let a = unrouted_task_id("ghost", Some("m1"), None, b"{}");
        assert_eq!(a, unrouted_task_id("ghost", Some("m1"), None, b"{}"));
        assert_ne!(a, unrouted_task_id("ghost", Some("m2"), None, b"{}"));
        assert_ne!(a, unrouted_task_id("ghost", Some("m1"), None, b"{ }"));
        // Parts are length-prefixed: moving bytes between them changes the id.
        assert_ne!(unrouted_task_id("ab", Some("c"), None, b""), unrouted_task_id("a", Some("bc"), None, b""));
    }
}
