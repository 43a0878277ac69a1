//! The outbox: results written with the task's final transition, published later with
//! confirms, deleted only after the broker confirmed them.

use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::{Result, Store};

/// A result waiting to be published.
#[derive(Debug, Clone)]
pub struct OutboxMessage {
    pub message_id: Uuid,
    pub exchange: String,
    pub routing_key: String,
    pub correlation_id: Option<String>,
    pub phase: String,
    pub body: Vec<u8>,
}

/// A claimed batch: its rows stay locked (so a second publisher skips them) until the batch is
/// completed or dropped.
pub struct OutboxBatch {
    tx: Transaction<'static, Postgres>,
    pub messages: Vec<OutboxMessage>,
}

impl Store {
    /// Locks up to `limit` unpublished results, oldest first.
    pub async fn claim_outbox(&self, limit: i64) -> Result<OutboxBatch> {
        let mut tx = self.pool.begin().await?;
        let messages = sqlx::query_as!(
            OutboxMessage,
            "select message_id, exchange, routing_key, correlation_id, phase, body \
             from agenttask.outbox order by created_at limit $1 for update skip locked",
            limit
        )
        .fetch_all(&mut *tx)
        .await?;
        Ok(OutboxBatch { tx, messages })
    }
}

impl OutboxBatch {
    /// Removes the confirmed messages and counts attempts on the others, then releases the locks.
    pub async fn complete(mut self, confirmed: &[Uuid]) -> Result<()> {
        sqlx::query!("delete from agenttask.outbox where message_id = any($1)", confirmed)
            .execute(&mut *self.tx)
            .await?;
        let failed: Vec<Uuid> =
            self.messages.iter().map(|m| m.message_id).filter(|id| !confirmed.contains(id)).collect();
        if !failed.is_empty() {
            sqlx::query!("update agenttask.outbox set attempts = attempts + 1 where message_id = any($1)", &failed)
                .execute(&mut *self.tx)
                .await?;
        }
        self.tx.commit().await?;
        Ok(())
    }
}

impl Store {
    /// How many results wait to be published, and how old the oldest is (seconds).
    pub async fn outbox_lag(&self) -> Result<(i64, f64)> {
        let lag = sqlx::query!(
            r#"select count(*) as "pending!",
                 coalesce(extract(epoch from now() - min(created_at)), 0)::float8 as "oldest_seconds!"
               from agenttask.outbox"#
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((lag.pending, lag.oldest_seconds))
    }
}
