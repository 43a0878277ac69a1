//! The leader's in-memory view: each tenant's queue heads, rate bucket and usage history.
//!
//! Postgres stays the truth: heads are a cache of the first queued tasks of each tenant, refetched
//! when a notification says the tenant's queue changed or a decision used the cache up, and the whole view
//! is rebuilt whenever a scheduler becomes leader. So a million queued tasks cost a few hundred
//! cached heads per tenant, not a million rows in memory.

use std::collections::{BTreeMap, VecDeque};
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use uuid::Uuid;

use crate::domain::fairshare::{QueueView, QueuedTask};
use crate::domain::tenant::{TenantPolicy, Tenants};
use crate::store::QueuedHead;

/// Heads fetched per tenant at a time, at most.
pub const HEAD_BATCH: usize = 256;
/// Heads fetched per tenant at a time, at least: a tenant that takes a few tasks a round is then
/// not refetched every round.
pub const HEAD_MIN: usize = 16;

/// A cached queued task.
#[derive(Debug, Clone)]
pub struct Head {
    pub task_id: Uuid,
    pub task: QueuedTask,
}

/// A tenant's cached heads, in admission order.
#[derive(Debug, Default)]
pub struct Heads(pub VecDeque<Head>);

impl QueueView for Heads {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn get(&self, index: usize) -> Option<QueuedTask> {
        self.0.get(index).map(|h| h.task)
    }
}

/// One tenant's scheduling state.
pub struct TenantState {
    pub heads: Heads,
    /// The cache holds every queued task of the tenant (the last fetch came back short).
    pub complete: bool,
    /// The queue changed since the last fetch.
    pub dirty: bool,
    limiter: DefaultDirectRateLimiter,
    quota: (u32, u32),
    /// Out of rate tokens until then.
    pub blocked_until: Option<Instant>,
    /// Decayed dominant share (see `fairshare::update_history`).
    pub history: f64,
}

fn limiter(rate: u32, burst: u32) -> DefaultDirectRateLimiter {
    let rate = NonZeroU32::new(rate.max(1)).expect("non-zero");
    let burst = NonZeroU32::new(burst.max(1)).expect("non-zero");
    RateLimiter::direct(Quota::per_second(rate).allow_burst(burst))
}

impl TenantState {
    fn new(policy: &TenantPolicy) -> Self {
        TenantState {
            heads: Heads::default(),
            complete: false,
            dirty: true,
            limiter: limiter(policy.rate_per_second, policy.burst),
            quota: (policy.rate_per_second, policy.burst),
            blocked_until: None,
            history: 0.0,
        }
    }

    /// Upper bound on admissions now: the bucket (checked again per admission) or nothing while
    /// the tenant is known to be out of tokens.
    pub fn tokens(&self, now: Instant) -> u32 {
        match self.blocked_until {
            Some(t) if t > now => 0,
            _ => self.quota.1,
        }
    }

    /// Takes one admission token; when there is none, records until when and says no.
    pub fn take_token(&mut self, now: Instant) -> bool {
        match self.limiter.check() {
            Ok(()) => true,
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                self.blocked_until = Some(now + wait.max(Duration::from_millis(1)));
                false
            }
        }
    }
}

/// Every configured tenant's state, by name.
#[derive(Default)]
pub struct View {
    pub tenants: BTreeMap<String, TenantState>,
}

impl View {
    /// Follows the configuration: new tenants appear, removed ones go, changed rates rebuild
    /// the bucket. Queues are untouched (they live in Postgres).
    pub fn sync(&mut self, config: &Tenants) {
        self.tenants.retain(|name, _| config.contains_key(name.as_str()));
        for (name, policy) in config {
            let state = self.tenants.entry(name.as_str().to_owned()).or_insert_with(|| TenantState::new(policy));
            if state.quota != (policy.rate_per_second, policy.burst) {
                state.limiter = limiter(policy.rate_per_second, policy.burst);
                state.quota = (policy.rate_per_second, policy.burst);
                state.blocked_until = None;
            }
        }
    }

    pub fn mark_dirty(&mut self, tenant: &str) {
        if let Some(s) = self.tenants.get_mut(tenant) {
            s.dirty = true;
        }
    }

    pub fn mark_all_dirty(&mut self) {
        for s in self.tenants.values_mut() {
            s.dirty = true;
        }
    }

    /// Tenants whose cached heads must be refetched before deciding (changed queues, or an empty
    /// cache of a queue that has more), each fetched [`HEAD_MIN`] deep. Under a flood every queue
    /// changes between two rounds while a round admits a task or two of each tenant, so a
    /// shallow fetch for each, deepened only for the tenants that use it all up
    /// ([`View::deeper`]), reads a few rows per admission instead of a round's worth per tenant.
    pub fn needing_refresh(&self) -> Vec<(String, usize)> {
        self.tenants
            .iter()
            .filter(|(_, s)| s.dirty || (!s.complete && s.heads.0.is_empty()))
            .map(|(name, _)| (name.clone(), HEAD_MIN))
            .collect()
    }

    /// Of the tenants a decision took every cached head of (`exhausted`), those whose queue has
    /// more than the cache and could take more this round (`room`, what the round could admit
    /// of it at most), each with how deep to fetch: its room, within [`HEAD_MIN`] and
    /// [`HEAD_BATCH`].
    pub fn deeper(&self, exhausted: &[&str], room: impl Fn(&str) -> usize) -> Vec<(String, usize)> {
        exhausted
            .iter()
            .filter_map(|name| {
                let s = self.tenants.get(*name)?;
                let room = room(name);
                (!s.complete && s.heads.0.len() < room.min(HEAD_BATCH))
                    .then(|| (name.to_string(), room.clamp(HEAD_MIN, HEAD_BATCH)))
            })
            .collect()
    }

    /// Replaces the heads of `refreshed` tenants with what was fetched (rows in admission order,
    /// at most the given number per tenant).
    pub fn replace_heads(&mut self, refreshed: &[(String, usize)], rows: Vec<QueuedHead>) {
        for (name, _) in refreshed {
            if let Some(s) = self.tenants.get_mut(name) {
                s.heads.0.clear();
                s.dirty = false;
            }
        }
        for row in rows {
            if let Some(s) = self.tenants.get_mut(&row.tenant) {
                s.heads.0.push_back(Head {
                    task_id: row.task_id,
                    task: QueuedTask {
                        id: 0,
                        cpu_millis: row.cpu_millis.max(0) as u64,
                        memory_bytes: row.memory_bytes.max(0) as u64,
                        enqueued_at_ms: row.submitted_at.timestamp_millis().max(0) as u64,
                    },
                });
            }
        }
        for (name, limit) in refreshed {
            if let Some(s) = self.tenants.get_mut(name) {
                s.complete = s.heads.0.len() < *limit;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::tenant::parse_tenants;

    #[test]
    fn rate_bucket_blocks_after_burst_and_reports_until_when() {
        let tenants = parse_tenants("[tenants.a]\nrate_per_second = 1\nburst = 2\n").unwrap();
        let mut view = View::default();
        view.sync(&tenants);
        let s = view.tenants.get_mut("a").unwrap();
        let now = Instant::now();
        assert_eq!(s.tokens(now), 2);
        assert!(s.take_token(now) && s.take_token(now));
        assert!(!s.take_token(now));
        assert_eq!(s.tokens(now), 0);
        assert!(s.blocked_until.unwrap() > now);
    }

    #[test]
    fn sync_follows_configuration_and_keeps_state() {
        let mut view = View::default();
        view.sync(&parse_tenants("[tenants.a]\n[tenants.b]\n").unwrap());
        view.tenants.get_mut("a").unwrap().history = 0.5;
        view.sync(&parse_tenants("[tenants.a]\nrate_per_second = 5\n[tenants.c]\n").unwrap());
        let names: Vec<_> = view.tenants.keys().cloned().collect();
        assert_eq!(names, ["a", "c"]);
        assert_eq!(view.tenants["a"].history, 0.5);
        assert_eq!(view.tenants["a"].quota, (5, 5));
    }

    #[test]
    fn refresh_when_dirty_or_run_dry() {
        let mut view = View::default();
        view.sync(&parse_tenants("[tenants.a]\n[tenants.b]\n").unwrap());
        let both = view.needing_refresh();
        assert_eq!(both, [("a".to_owned(), HEAD_MIN), ("b".to_owned(), HEAD_MIN)]);
        view.replace_heads(&both, Vec::new());
        assert!(view.needing_refresh().is_empty(), "empty and complete: nothing to fetch");
        view.mark_dirty("b");
        assert_eq!(view.needing_refresh(), [("b".to_owned(), HEAD_MIN)]);
    }

    fn heads(tenant: &str, n: usize) -> Vec<QueuedHead> {
        (0..n)
            .map(|_| QueuedHead {
                tenant: tenant.to_owned(),
                task_id: Uuid::new_v4(),
                cpu_millis: 100,
                memory_bytes: 1 << 20,
                submitted_at: chrono::Utc::now(),
            })
            .collect()
    }

    #[test]
    fn a_shallow_fetch_is_deepened_only_for_a_tenant_that_used_it_up_and_could_take_more() {
        let mut view = View::default();
        view.sync(&parse_tenants("[tenants.a]\n[tenants.b]\n[tenants.c]\n").unwrap());
        let shallow = view.needing_refresh();
        // a and c filled the shallow fetch, so there may be more; b's came back short: that is all.
        let mut rows = heads("a", HEAD_MIN);
        rows.extend(heads("b", 7));
        rows.extend(heads("c", HEAD_MIN));
        view.replace_heads(&shallow, rows);
        assert!(!view.tenants["a"].complete && view.tenants["b"].complete && !view.tenants["c"].complete);
        assert!(view.needing_refresh().is_empty(), "cached heads stand until used up or changed");
        let room = |name: &str| match name {
            "a" => 40,
            "c" => HEAD_MIN,
            _ => 10_000,
        };
        // All three used up their heads in a decision. b has no more; c could take no more than
        // it had; a could take 40, so it is fetched 40 deep.
        assert_eq!(view.deeper(&["a", "b", "c"], room), [("a".to_owned(), 40)]);
        assert_eq!(view.deeper(&["a"], |_| 10_000), [("a".to_owned(), HEAD_BATCH)], "never deeper than a batch");
        let deeper = view.deeper(&["a"], room);
        view.replace_heads(&deeper, heads("a", 40));
        assert_eq!(view.tenants["a"].heads.0.len(), 40);
        assert!(view.deeper(&["a"], room).is_empty(), "40 cached heads cover a room of 40");
        // Once its cache is used up between rounds, a tenant is refetched before the next decision.
        view.tenants.get_mut("a").unwrap().heads.0.clear();
        assert_eq!(view.needing_refresh(), [("a".to_owned(), HEAD_MIN)]);
    }
}
