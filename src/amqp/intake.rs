//! Ingest's intake: the writes waiting for a group writer, handed out round-robin across tenants.
//!
//! A plain FIFO would put one tenant's next message behind everything every other tenant's
//! consumers already hold (tenants × prefetch writes, several group commits' worth under a flood),
//! so a tenant well under its quota would wait for the others' bursts before its task is even
//! stored. Here each group takes one write per tenant in turn, so a tenant's next message goes
//! into the next group whatever the others hold. Within a tenant, writes keep their order.
//!
//! The round-robin itself ([`Rotation`]) is plain data; [`Intake`] adds the bound (a full intake
//! makes consumers wait, holding their messages) and the wake-ups; [`Shards`] gives each group
//! writer an intake of its own, a tenant always in the same one.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use tokio::sync::{Notify, Semaphore};

/// Items per key, and the keys that have items, in turn order.
#[derive(Debug)]
pub(super) struct Rotation<T> {
    queues: HashMap<String, VecDeque<T>>,
    turn: VecDeque<String>,
    len: usize,
}

impl<T> Default for Rotation<T> {
    fn default() -> Self {
        Self { queues: HashMap::new(), turn: VecDeque::new(), len: 0 }
    }
}

impl<T> Rotation<T> {
    pub(super) fn push(&mut self, key: &str, item: T) {
        match self.queues.get_mut(key) {
            Some(q) => q.push_back(item),
            None => {
                self.queues.insert(key.to_owned(), VecDeque::from([item]));
                self.turn.push_back(key.to_owned());
            }
        }
        self.len += 1;
    }

    /// Up to `max` items: one from each key in turn, as many rounds as it takes. A key that still
    /// has items goes to the back of the turn, so the next take starts with the keys this one did
    /// not reach.
    pub(super) fn take(&mut self, max: usize) -> Vec<T> {
        let mut out = Vec::with_capacity(max.min(self.len));
        while out.len() < max {
            let Some(key) = self.turn.pop_front() else { break };
            let queue = self.queues.get_mut(&key).expect("a key in turn has a queue");
            out.push(queue.pop_front().expect("a key in turn has an item"));
            if queue.is_empty() {
                self.queues.remove(&key);
            } else {
                self.turn.push_back(key);
            }
        }
        self.len -= out.len();
        out
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }
}

/// The bounded, shared intake between ingest's consumers and its group writers.
pub(super) struct Intake<T> {
    waiting: Mutex<(Rotation<T>, bool)>,
    /// Free places: a consumer takes one per write and a writer gives them back.
    room: Semaphore,
    ready: Notify,
}

/// The intake was closed: ingest is stopping.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Closed;

impl<T> Intake<T> {
    pub(super) fn new(capacity: usize) -> Self {
        Self { waiting: Mutex::new((Rotation::default(), false)), room: Semaphore::new(capacity), ready: Notify::new() }
    }

    /// Queues `item` under `key`, waiting while the intake is full.
    pub(super) async fn push(&self, key: &str, item: T) -> Result<(), Closed> {
        self.room.acquire().await.map_err(|_| Closed)?.forget();
        {
            let mut w = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
            if w.1 {
                return Err(Closed);
            }
            w.0.push(key, item);
        }
        // A permit, not a broadcast: one writer wakes per write, and a writer that finds more
        // than it takes wakes the next (see `take`).
        self.ready.notify_one();
        Ok(())
    }

    /// At least one and at most `max` items, round-robin across keys; `None` once the intake is
    /// closed and empty.
    pub(super) async fn take(&self, max: usize) -> Option<Vec<T>> {
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut w = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
                if w.0.len() > 0 {
                    let items = w.0.take(max.max(1));
                    let more = w.0.len() > 0;
                    drop(w);
                    self.room.add_permits(items.len());
                    if more {
                        self.ready.notify_one();
                    }
                    return Some(items);
                }
                if w.1 {
                    return None;
                }
            }
            notified.await;
        }
    }

    /// No more pushes; writers take what is left, then get `None`.
    pub(super) fn close(&self) {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        self.room.close();
        self.ready.notify_waiters();
        // A writer between its check and its wait has registered (`enable`): notify_waiters
        // reaches it. One that has not yet looked sees the flag.
        self.ready.notify_one();
    }
}

/// One intake per group writer, each tenant always in the same one. A group locks the counter
/// rows of the capped tenants it holds until it commits; two writers whose groups shared tenants
/// would wait for each other's commits, one whole transaction at a time, and a message in the
/// second group would wait for both.
pub(super) struct Shards<T> {
    shards: Vec<Intake<T>>,
}

impl<T> Shards<T> {
    /// `count` intakes (at least one) sharing `capacity` places between them.
    pub(super) fn new(count: usize, capacity: usize) -> Self {
        let count = count.max(1);
        Self { shards: (0..count).map(|_| Intake::new(capacity.div_ceil(count).max(1))).collect() }
    }

    pub(super) fn len(&self) -> usize {
        self.shards.len()
    }

    /// The intake a key's items go to, the same for the key's whole life.
    pub(super) fn shard_of(&self, key: &str) -> usize {
        super::connections::slot_of(key, self.shards.len())
    }

    pub(super) fn shard(&self, index: usize) -> &Intake<T> {
        &self.shards[index]
    }

    pub(super) async fn push(&self, key: &str, item: T) -> Result<(), Closed> {
        self.shards[self.shard_of(key)].push(key, item).await
    }

    pub(super) fn close(&self) {
        for shard in &self.shards {
            shard.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn each_take_serves_every_key_in_turn_and_keeps_each_keys_order() {
        let mut r = Rotation::default();
        for i in 0..5 {
            r.push("flood", format!("flood-{i}"));
        }
        r.push("quiet", "quiet-0".to_owned());
        r.push("other", "other-0".to_owned());
        r.push("other", "other-1".to_owned());
        assert_eq!(r.len(), 8);
        // The quiet tenant's one write is in the first group although five were queued before it.
        assert_eq!(r.take(3), ["flood-0", "quiet-0", "other-0"]);
        // The next take starts where this one stopped: `flood` went to the back after `other`.
        assert_eq!(r.take(3), ["flood-1", "other-1", "flood-2"]);
        r.push("quiet", "quiet-1".to_owned());
        assert_eq!(r.take(10), ["flood-3", "quiet-1", "flood-4"]);
        assert_eq!(r.len(), 0);
        assert!(r.take(10).is_empty());
    }

    #[tokio::test]
    async fn a_full_intake_holds_pushers_until_a_writer_takes() {
        let intake = Arc::new(Intake::new(2));
        intake.push("a", 1).await.unwrap();
        intake.push("a", 2).await.unwrap();
        let third = tokio::spawn({
            let intake = intake.clone();
            async move { intake.push("b", 3).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!third.is_finished(), "the third push waits for room");
        assert_eq!(intake.take(1).await, Some(vec![1]));
        third.await.unwrap().unwrap();
        assert_eq!(intake.take(10).await, Some(vec![2, 3]));
    }

    #[tokio::test]
    async fn closing_lets_writers_drain_then_end_and_refuses_pushes() {
        let intake = Arc::new(Intake::new(8));
        let writer = tokio::spawn({
            let intake = intake.clone();
            async move {
                let mut got = Vec::new();
                while let Some(items) = intake.take(1).await {
                    got.extend(items);
                }
                got
            }
        });
        intake.push("a", 1).await.unwrap();
        intake.push("b", 2).await.unwrap();
        intake.close();
        assert_eq!(intake.push("a", 3).await, Err(Closed));
        let mut got = tokio::time::timeout(Duration::from_secs(5), writer).await.expect("the writer ends").unwrap();
        got.sort();
        assert_eq!(got, [1, 2]);
    }

    #[tokio::test]
    async fn a_key_always_goes_to_the_same_shard_and_the_shards_share_the_room() {
        let shards = Shards::new(2, 8);
        assert_eq!(shards.len(), 2);
        // Keys in both shards, the way tenant names fall.
        let keys: Vec<String> = (0..40).map(|i| format!("tenant-{i:04}")).collect();
        let (a, b): (Vec<&String>, Vec<&String>) = keys.iter().partition(|k| shards.shard_of(k) == 0);
        assert!(!a.is_empty() && !b.is_empty(), "forty tenants fall into both shards");
        for k in &keys {
            assert_eq!(shards.shard_of(k), shards.shard_of(k));
        }
        shards.push(a[0], 1).await.unwrap();
        shards.push(b[0], 2).await.unwrap();
        shards.push(a[0], 3).await.unwrap();
        assert_eq!(shards.shard(0).take(10).await, Some(vec![1, 3]));
        assert_eq!(shards.shard(1).take(10).await, Some(vec![2]));
        // Each shard holds half the room: a fifth push to one shard waits.
        for i in 0..4 {
            shards.push(a[0], i).await.unwrap();
        }
        let fifth = tokio::time::timeout(Duration::from_millis(50), shards.push(a[0], 9)).await;
        assert!(fifth.is_err(), "a full shard holds its pusher");
        shards.close();
        assert_eq!(shards.push(b[0], 5).await, Err(Closed));
        assert_eq!(shards.shard(0).take(10).await, Some(vec![0, 1, 2, 3]));
        assert_eq!(shards.shard(0).take(10).await, None);
    }
}
