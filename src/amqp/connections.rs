//! Ingest's AMQP connections: a small fixed set shared by every tenant queue.
//!
//! One connection per queue does not scale: each costs the broker a socket (RabbitMQ's default
//! limit here is 832) and the service an I/O thread and its buffers, so a thousand idle tenants
//! held gigabytes and took over a minute to close. Here each queue maps to one of
//! [`INGEST_CONNECTIONS`] slots by a stable hash of its name and gets its own *channel* on that
//! slot's connection: prefetch (QoS) stays per queue, and a channel error (a deleted queue, a
//! refused declare) closes only that queue's channel.
//!
//! A slot connects lazily, on the first channel asked of it, and again after its connection was
//! lost. Only one caller connects a slot at a time; callers that waited behind a failed attempt
//! get its error instead of trying again, so a broker outage costs one connection attempt per
//! slot and round of backoff, not one per queue. What a queue does when its channel or the
//! connection under it ends (back off, ask for a channel again) is the consumer's business.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::StreamExt;
use lapin::{Channel, Connection};

use super::{connect, AmqpError};

/// Connections ingest opens, whatever the number of tenants. Four spread the queues' traffic
/// over the broker's and the client's per-connection processes; RabbitMQ's default of 2,047
/// channels per connection leaves room for about 8,000 tenant queues.
pub const INGEST_CONNECTIONS: usize = 4;

/// How long a close (of a channel or a connection) waits for the broker's answer.
pub const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The slot of `queue` among `slots`: FNV-1a of its name, so a queue keeps its slot across
/// restarts and reloads (stable, unlike std's randomly seeded hasher).
pub fn slot_of(queue: &str, slots: usize) -> usize {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = queue.bytes().fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME));
    (hash % slots.max(1) as u64) as usize
}

/// The shared connections.
pub struct Connections {
    url: String,
    slots: Vec<Slot>,
}

struct Slot {
    /// Shown in `rabbitmqctl list_connections name`: `agenttask-ingest-<n>`.
    name: String,
    /// Connection attempts started so far; read before waiting for the lock, it tells a caller
    /// whether an attempt failed while it waited.
    attempts: AtomicU64,
    /// Held while connecting, so one caller at a time connects the slot.
    state: tokio::sync::Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    conn: Option<Arc<Connection>>,
    /// Why the last attempt failed (cleared by a success).
    last_error: Option<String>,
}

impl Connections {
    pub fn new(url: String, slots: usize) -> Connections {
        let slots = (0..slots.max(1))
            .map(|i| Slot {
                name: format!("agenttask-ingest-{i}"),
                attempts: AtomicU64::new(0),
                state: tokio::sync::Mutex::new(SlotState::default()),
            })
            .collect();
        Connections { url, slots }
    }

    /// A new channel for `queue` on its slot's connection, connecting the slot first if it has
    /// no live connection.
    ///
    /// # Errors
    /// The connection attempt's error (or, for a caller that waited behind a failed attempt,
    /// that attempt's), or the broker's refusal of the channel.
    pub async fn channel(&self, queue: &str) -> Result<Channel, AmqpError> {
        let slot = &self.slots[slot_of(queue, self.slots.len())];
        let conn = slot.connection(&self.url).await?;
        Ok(conn.create_channel().await?)
    }

    /// Closes every open connection (at shutdown, after the consumers stopped), waiting at most
    /// [`CLOSE_WAIT`] for the broker's answer: a broker that stopped answering must not hold
    /// the process past its grace period.
    pub async fn close(&self) {
        let closing = self.slots.iter().map(|slot| async move {
            let conn = slot.state.lock().await.conn.take();
            if let Some(conn) = conn.filter(|c| c.status().connected()) {
                let close = conn.close(200, "agenttask ingest stopping".into());
                if tokio::time::timeout(CLOSE_WAIT, close).await.is_err() {
                    tracing::warn!(connection = %slot.name, "the broker did not answer the connection's close; leaving it");
                }
            }
        });
        futures_util::future::join_all(closing).await;
    }
}

impl Slot {
    async fn connection(&self, url: &str) -> Result<Arc<Connection>, AmqpError> {
        let seen = self.attempts.load(Ordering::SeqCst);
        let mut state = self.state.lock().await;
        if let Some(conn) = state.conn.as_ref().filter(|c| c.status().connected()) {
            return Ok(conn.clone());
        }
        if self.attempts.load(Ordering::SeqCst) != seen {
            if let Some(why) = &state.last_error {
                return Err(AmqpError::SharedConnectionDown(why.clone()));
            }
        }
        state.conn = None;
        self.attempts.fetch_add(1, Ordering::SeqCst);
        match connect(url, &self.name).await {
            Ok(conn) => {
                log_loss(&conn, self.name.clone());
                let conn = Arc::new(conn);
                state.conn = Some(conn.clone());
                state.last_error = None;
                Ok(conn)
            }
            Err(e) => {
                state.last_error = Some(e.to_string());
                Err(e)
            }
        }
    }
}

/// Logs the connection's loss once, with the broker's or the socket's reason, rather than each
/// of the queues that notice it (they log at debug). The listener ends with the connection.
fn log_loss(conn: &Connection, name: String) {
    let mut events = conn.events_listener();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            if let lapin::Event::Error(e) = event {
                tracing::warn!(connection = %name, error = %e, "an ingest connection was lost; its queues reconnect");
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_keeps_its_slot_and_queues_spread_over_all_slots() {
        let queues: Vec<String> = (0..1000).map(|i| format!("agenttask.tasks.tenant-{i:03}")).collect();
        let mut per_slot = [0usize; INGEST_CONNECTIONS];
        for q in &queues {
            let slot = slot_of(q, INGEST_CONNECTIONS);
            assert_eq!(slot, slot_of(q, INGEST_CONNECTIONS), "stable for {q}");
            per_slot[slot] += 1;
        }
        // An even share is 250; no slot should carry much more (its channel limit) or idle.
        for (slot, n) in per_slot.iter().enumerate() {
            assert!((200..=300).contains(n), "slot {slot} got {n} of 1000 queues: {per_slot:?}");
        }
    }

    #[test]
    fn the_hash_is_fnv_1a_so_slots_survive_a_rebuild() {
        // FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c (the published test vector).
        assert_eq!(slot_of("a", usize::MAX), (0xaf63_dc4c_8601_ec8c_u64 % usize::MAX as u64) as usize);
        assert_eq!(slot_of("anything", 1), 0);
        assert_eq!(slot_of("anything", 0), 0, "no slots is treated as one");
    }
}
