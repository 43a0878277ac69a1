//! The outbox: results written with the task's final transition, published later with
//! confirms, deleted only after the broker confirmed them.
//!
//! A result the broker refuses is retried with backoff (`next_attempt_at`) and, after
//! [`RetryPolicy::max_attempts`] refusals, parked: kept with its last error, no longer claimed,
//! visible in `agenttask.parked_results`, and re-queued by `agenttask.requeue_parked_results()`.
//! Outages (a lost connection) are not refusals and count no attempt.
//!
//! The functions take a connection (`impl PgExecutor`); the claim's locks last as long as the
//! caller's transaction. [`Store::claim_outbox`] is the shorthand the publisher uses.

use std::time::Duration;

use sqlx::{PgExecutor, Postgres, Transaction};
use uuid::Uuid;

use super::{Result, Store};
use crate::domain::result::storable_text;
use crate::retry::Backoff;

/// A result waiting to be published.
#[derive(Debug, Clone)]
pub struct OutboxMessage {
    pub message_id: Uuid,
    pub exchange: String,
    pub routing_key: String,
    pub correlation_id: Option<String>,
    pub phase: String,
    pub body: Vec<u8>,
    /// Refusals so far.
    pub attempts: i32,
    /// The task's tenant (for logs; absent on rows written before the outbox had it).
    pub tenant: Option<String>,
}

/// How often a refused result is retried, and how long apart.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Refusals after which a result is parked (at least 1).
    pub max_attempts: u32,
    pub backoff: Backoff,
}

/// What happens to a result after one more refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterRefusal {
    RetryIn(Duration),
    Park,
}

impl RetryPolicy {
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 10;

    pub fn new(max_attempts: u32) -> RetryPolicy {
        RetryPolicy { max_attempts: max_attempts.max(1), backoff: Backoff::publish() }
    }

    /// The decision for a result refused once more, having been refused `attempts` times before.
    pub fn after_refusal(&self, attempts: i32) -> AfterRefusal {
        let refusals = u32::try_from(attempts).unwrap_or(0).saturating_add(1);
        if refusals >= self.max_attempts {
            AfterRefusal::Park
        } else {
            AfterRefusal::RetryIn(self.backoff.delay_after(refusals))
        }
    }
}

/// A result the broker refused, and why.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub message_id: Uuid,
    pub attempts: i32,
    pub error: String,
}

/// Locks up to `limit` results that are due (not parked, not waiting out a backoff), oldest
/// first, skipping rows another publisher holds. Call it inside a transaction: the locks are
/// what keeps a second publisher off these rows.
pub async fn claim_outbox(conn: impl PgExecutor<'_>, limit: i64) -> Result<Vec<OutboxMessage>> {
    let messages = sqlx::query_as!(
        OutboxMessage,
        "select message_id, exchange, routing_key, correlation_id, phase, body, attempts, tenant \
         from agenttask.outbox where parked_at is null and next_attempt_at <= now() \
         order by created_at limit $1 for update skip locked",
        limit
    )
    .fetch_all(conn)
    .await?;
    Ok(messages)
}

/// Removes results the broker confirmed.
pub async fn delete_published(conn: impl PgExecutor<'_>, confirmed: &[Uuid]) -> Result<()> {
    if !confirmed.is_empty() {
        // A join, not `message_id = any($1)`: a fresh outbox's statistics say it is tiny, so a
        // generic plan scans it and tests every row against every id (the profile's `uuid_eq`
        // under load); the join hashes the ids instead, or probes the key when the table is big.
        sqlx::query!(
            "delete from agenttask.outbox o using unnest($1::uuid[]) as c(message_id) where o.message_id = c.message_id",
            confirmed
        )
        .execute(conn)
        .await?;
    }
    Ok(())
}

/// Counts a refusal on each result: schedules its next attempt, or parks it when it has used
/// up its attempts. Returns the ids parked now.
pub async fn record_refusals(
    conn: impl PgExecutor<'_>,
    refused: &[Refusal],
    policy: &RetryPolicy,
) -> Result<Vec<Uuid>> {
    if refused.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = refused.iter().map(|r| r.message_id).collect();
    // Text Postgres can store (no NUL): a refused value would make this write fail forever.
    let errors: Vec<String> = refused.iter().map(|r| storable_text(&r.error).into_owned()).collect();
    let decisions: Vec<AfterRefusal> = refused.iter().map(|r| policy.after_refusal(r.attempts)).collect();
    let delays: Vec<f64> = decisions
        .iter()
        .map(|d| match d {
            AfterRefusal::RetryIn(d) => d.as_secs_f64(),
            AfterRefusal::Park => 0.0,
        })
        .collect();
    let park: Vec<bool> = decisions.iter().map(|d| *d == AfterRefusal::Park).collect();
    sqlx::query!(
        "update agenttask.outbox o \
         set attempts = o.attempts + 1, last_error = f.error, \
             next_attempt_at = now() + make_interval(secs => f.delay), \
             parked_at = case when f.park then now() end \
         from unnest($1::uuid[], $2::text[], $3::float8[], $4::bool[]) as f(message_id, error, delay, park) \
         where o.message_id = f.message_id",
        &ids,
        &errors,
        &delays,
        &park
    )
    .execute(conn)
    .await?;
    Ok(ids.into_iter().zip(park).filter_map(|(id, p)| p.then_some(id)).collect())
}

/// A claimed batch: its rows stay locked (so a second publisher skips them) until the batch is
/// completed or dropped.
pub struct OutboxBatch {
    tx: Transaction<'static, Postgres>,
    pub messages: Vec<OutboxMessage>,
}

impl Store {
    /// Locks up to `limit` due results, oldest first, in a transaction of their own.
    pub async fn claim_outbox(&self, limit: i64) -> Result<OutboxBatch> {
        let mut tx = self.pool.begin().await?;
        let messages = claim_outbox(&mut *tx, limit).await?;
        Ok(OutboxBatch { tx, messages })
    }
}

impl OutboxBatch {
    /// Removes the confirmed results and counts a refusal on the refused ones, then releases
    /// the locks. Results in neither list are left as they were. Returns the ids parked now.
    pub async fn complete(
        mut self,
        confirmed: &[Uuid],
        refused: &[Refusal],
        policy: &RetryPolicy,
    ) -> Result<Vec<Uuid>> {
        delete_published(&mut *self.tx, confirmed).await?;
        let parked = record_refusals(&mut *self.tx, refused, policy).await?;
        self.tx.commit().await?;
        Ok(parked)
    }
}

impl Store {
    /// Records what the broker did with results whose claim was lost (the database went away
    /// after the broker answered), in a transaction of its own. Returns the ids parked now.
    pub async fn record_publish_outcome(
        &self,
        confirmed: &[Uuid],
        refused: &[Refusal],
        policy: &RetryPolicy,
    ) -> Result<Vec<Uuid>> {
        let mut tx = self.pool.begin().await?;
        delete_published(&mut *tx, confirmed).await?;
        let parked = record_refusals(&mut *tx, refused, policy).await?;
        tx.commit().await?;
        Ok(parked)
    }
}

/// The outbox at a glance, for the gauges.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutboxLag {
    /// Results waiting to be published (not parked).
    pub pending: i64,
    /// Age of the oldest of them, in seconds (0 when none waits).
    pub oldest_seconds: f64,
    /// Results parked after too many refusals.
    pub parked: i64,
}

impl Store {
    /// How many results wait to be published, how old the oldest is, and how many are parked.
    pub async fn outbox_lag(&self) -> Result<OutboxLag> {
        let lag = sqlx::query!(
            r#"select count(*) filter (where parked_at is null) as "pending!",
                 coalesce(extract(epoch from now() - min(created_at) filter (where parked_at is null)), 0)::float8
                   as "oldest_seconds!",
                 count(*) filter (where parked_at is not null) as "parked!"
               from agenttask.outbox"#
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(OutboxLag { pending: lag.pending, oldest_seconds: lag.oldest_seconds, parked: lag.parked })
    }

    /// Re-queues parked results (all, or one task's) for publishing now; returns how many.
    pub async fn requeue_parked_results(&self, only_task: Option<Uuid>) -> Result<i64> {
        let n = sqlx::query_scalar!(r#"select agenttask.requeue_parked_results($1) as "n!""#, only_task)
            .fetch_one(&self.pool)
            .await?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_back_off_then_park() {
        let policy = RetryPolicy::new(4);
        let decisions: Vec<AfterRefusal> = (0..5).map(|attempts| policy.after_refusal(attempts)).collect();
        assert_eq!(
            decisions,
            [
                AfterRefusal::RetryIn(Duration::from_secs(1)),
                AfterRefusal::RetryIn(Duration::from_secs(2)),
                AfterRefusal::RetryIn(Duration::from_secs(4)),
                AfterRefusal::Park,
                // A re-queued row starts again at 0; a row somehow past the limit parks at once.
                AfterRefusal::Park,
            ]
        );
        // One attempt at least: 0 would park a result without ever trying it.
        assert_eq!(RetryPolicy::new(0).after_refusal(0), AfterRefusal::Park);
        assert_eq!(RetryPolicy::new(0).max_attempts, 1);
    }
}
