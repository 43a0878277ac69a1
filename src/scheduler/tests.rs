//! One admission round against an in-memory store: what is admitted under the tenants' and the
//! service's limits, that the view follows what was committed, and what happens when the store
//! admits fewer tasks than asked (a task cancelled meanwhile). No Postgres: the round's
//! `RoundStore` is a fake that applies the same `Queued` guard as the SQL.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::view::HEAD_MIN;
use super::*;
use crate::domain::tenant::{TenantName, TenantPolicy};

#[derive(Debug, Clone)]
struct FakeTask {
    tenant: String,
    cpu_millis: i64,
    memory_bytes: i64,
    submitted_at: DateTime<Utc>,
    queued: bool,
}

/// The database as the round sees it; shared so a test can look after the round.
#[derive(Default)]
struct FakeDb {
    /// In admission order per tenant (insertion order here).
    tasks: Vec<(Uuid, FakeTask)>,
    /// Tasks holding capacity, per tenant: (tasks, cpu, memory).
    running: BTreeMap<String, (i64, i64, i64)>,
    /// Tasks that vanish between the read and the admit (cancelled meanwhile).
    cancelled_meanwhile: Vec<Uuid>,
    commits: u32,
    admitted: Vec<Uuid>,
    /// Every tenant whose heads a round fetched, in order.
    fetched: Vec<String>,
}

#[derive(Clone, Default)]
struct FakeRound(Arc<Mutex<FakeDb>>);

impl RoundStore for FakeRound {
    async fn running_usage(&mut self) -> Result<Vec<RunningUsage>, StoreError> {
        let db = self.0.lock().unwrap();
        Ok(db
            .running
            .iter()
            .map(|(t, (n, c, m))| RunningUsage { tenant: t.clone(), tasks: *n, cpu_millis: *c, memory_bytes: *m })
            .collect())
    }

    async fn queued_heads(&mut self, tenants: &[String], limits: &[i32]) -> Result<Vec<QueuedHead>, StoreError> {
        let mut db = self.0.lock().unwrap();
        db.fetched.extend(tenants.iter().cloned());
        let mut out = Vec::new();
        for (t, limit) in tenants.iter().zip(limits) {
            out.extend(db.tasks.iter().filter(|(_, x)| &x.tenant == t && x.queued).take(*limit as usize).map(
                |(id, x)| QueuedHead {
                    tenant: x.tenant.clone(),
                    task_id: *id,
                    cpu_millis: x.cpu_millis,
                    memory_bytes: x.memory_bytes,
                    submitted_at: x.submitted_at,
                },
            ));
        }
        Ok(out)
    }

    async fn admit(&mut self, ids: &[Uuid]) -> Result<Vec<Admitted>, StoreError> {
        let mut db = self.0.lock().unwrap();
        let gone = db.cancelled_meanwhile.clone();
        let mut out = Vec::new();
        for (id, t) in db.tasks.iter_mut() {
            // The SQL's guard: only tasks still `Queued` move.
            if ids.contains(id) && t.queued && !gone.contains(id) {
                t.queued = false;
                out.push(Admitted { task_id: *id, tenant: t.tenant.clone(), submitted_at: t.submitted_at });
            }
        }
        db.admitted.extend(out.iter().map(|a| a.task_id));
        Ok(out)
    }

    async fn commit(self) -> Result<(), StoreError> {
        self.0.lock().unwrap().commits += 1;
        Ok(())
    }
}

impl FakeRound {
    fn queue(&self, tenant: &str, n: usize, cpu_millis: i64, memory_bytes: i64) -> Vec<Uuid> {
        let mut db = self.0.lock().unwrap();
        (0..n)
            .map(|_| {
                let id = Uuid::new_v4();
                let submitted_at = Utc::now();
                db.tasks.push((
                    id,
                    FakeTask { tenant: tenant.into(), cpu_millis, memory_bytes, submitted_at, queued: true },
                ));
                id
            })
            .collect()
    }

    fn admitted(&self) -> Vec<Uuid> {
        self.0.lock().unwrap().admitted.clone()
    }
}

fn policy(weight: u32, max_concurrency: u32) -> TenantPolicy {
    TenantPolicy { weight, max_concurrency, rate_per_second: 1000, burst: 1000, ..TenantPolicy::default() }
}

fn scheduler(tenants: &[(&str, TenantPolicy)], capacity: Capacity) -> Scheduler {
    let config: Tenants = tenants.iter().map(|(n, p)| (TenantName::parse(n).unwrap(), p.clone())).collect();
    Scheduler {
        // Never used by `round` (only by the rejection that follows it).
        store: Store::connect_lazy("postgres://nobody@127.0.0.1:1/unused").unwrap(),
        metrics: Metrics::new(),
        tenants: tokio::sync::watch::channel(Arc::new(config)).1,
        wake: Arc::new(Wake::default()),
        executors: Arc::new(Notify::new()),
        capacity,
    }
}

fn capacity(max_running: u32) -> Capacity {
    Capacity { max_running, cpu_millis: None, memory_bytes: None, usage_half_life: Duration::ZERO }
}

#[tokio::test]
async fn admits_up_to_each_tenants_concurrency_and_the_global_slots_in_queue_order() {
    let s = scheduler(&[("a", policy(1, 3)), ("b", policy(1, 10))], capacity(8));
    let db = FakeRound::default();
    let a = db.queue("a", 5, 100, 1 << 20);
    let b = db.queue("b", 10, 100, 1 << 20);
    let mut view = View::default();

    let out = round(&s, db.clone(), &mut view, Duration::ZERO).await.unwrap();
    let admitted = db.admitted();
    assert_eq!(out.admitted, 8, "the global slots are all used");
    assert!(out.full, "so no submit can be admitted before a task ends");
    assert_eq!(admitted.len(), 8);
    let of_a: Vec<Uuid> = admitted.iter().copied().filter(|id| a.contains(id)).collect();
    let of_b: Vec<Uuid> = admitted.iter().copied().filter(|id| b.contains(id)).collect();
    assert_eq!(of_a, a[..3].to_vec(), "a is capped at max_concurrency 3, oldest first");
    assert_eq!(of_b, b[..5].to_vec(), "b gets the remaining slots, oldest first");
    assert_eq!(db.0.lock().unwrap().commits, 1);
    // The view dropped exactly the admitted heads.
    assert_eq!(view.tenants["a"].heads.0.front().map(|h| h.task_id), Some(a[3]));
    assert_eq!(view.tenants["b"].heads.0.front().map(|h| h.task_id), Some(b[5]));
    assert!(out.too_large.is_empty());
}

#[tokio::test]
async fn running_tasks_count_against_the_limits() {
    let s = scheduler(&[("a", policy(1, 3)), ("b", policy(1, 10))], capacity(8));
    let db = FakeRound::default();
    db.0.lock().unwrap().running.insert("a".into(), (3, 300, 3 << 20));
    db.0.lock().unwrap().running.insert("b".into(), (4, 400, 4 << 20));
    db.queue("a", 2, 100, 1 << 20);
    let b = db.queue("b", 2, 100, 1 << 20);
    let out = round(&s, db.clone(), &mut View::default(), Duration::ZERO).await.unwrap();
    assert_eq!(out.admitted, 1, "7 of 8 slots are taken and a is at its cap");
    assert_eq!(db.admitted(), vec![b[0]]);
    assert!(out.full, "the running tasks and the admitted one fill the slots");
}

#[tokio::test]
async fn weights_split_a_contended_capacity() {
    let s = scheduler(&[("heavy", policy(3, 100)), ("light", policy(1, 100))], capacity(8));
    let db = FakeRound::default();
    let heavy = db.queue("heavy", 20, 100, 1 << 20);
    db.queue("light", 20, 100, 1 << 20);
    round(&s, db.clone(), &mut View::default(), Duration::ZERO).await.unwrap();
    let admitted = db.admitted();
    let n_heavy = admitted.iter().filter(|id| heavy.contains(id)).count();
    assert_eq!((n_heavy, admitted.len() - n_heavy), (6, 2), "3:1 weights share 8 slots 6:2");
}

#[tokio::test]
async fn a_task_gone_before_the_admit_makes_the_next_round_look_again() {
    let s = scheduler(&[("a", policy(1, 10))], capacity(8));
    let db = FakeRound::default();
    let a = db.queue("a", 3, 100, 1 << 20);
    db.0.lock().unwrap().cancelled_meanwhile.push(a[1]);
    let mut view = View::default();
    let out = round(&s, db.clone(), &mut view, Duration::ZERO).await.unwrap();
    assert_eq!(db.admitted(), vec![a[0], a[2]]);
    assert_eq!(out.admitted, 2);
    assert!(out.again, "fewer admitted than decided: run again");
    assert!(view.tenants["a"].dirty, "and refetch the queue first");
}

#[tokio::test]
async fn a_task_larger_than_the_whole_capacity_is_reported_not_admitted() {
    let cap = Capacity { cpu_millis: Some(1000), ..capacity(8) };
    let s = scheduler(&[("a", policy(1, 10))], cap);
    let db = FakeRound::default();
    let big = db.queue("a", 1, 4000, 1 << 20);
    let out = round(&s, db.clone(), &mut View::default(), Duration::ZERO).await.unwrap();
    assert!(db.admitted().is_empty());
    assert_eq!(out.too_large, vec![(big[0], 4000, 1 << 20)]);
}

#[tokio::test]
async fn an_empty_queue_commits_an_empty_round() {
    let s = scheduler(&[("a", policy(1, 10))], capacity(8));
    let db = FakeRound::default();
    let out = round(&s, db.clone(), &mut View::default(), Duration::ZERO).await.unwrap();
    assert_eq!(out.admitted, 0);
    assert!(!out.again);
    assert_eq!(db.0.lock().unwrap().commits, 1);
}

#[tokio::test]
async fn a_round_that_leaves_slots_free_is_not_full() {
    let s = scheduler(&[("a", policy(1, 3))], capacity(8));
    let db = FakeRound::default();
    db.queue("a", 5, 100, 1 << 20);
    let out = round(&s, db.clone(), &mut View::default(), Duration::ZERO).await.unwrap();
    assert_eq!(out.admitted, 3, "a is at its cap");
    assert!(!out.full, "another tenant's submit could still be admitted");
}

#[test]
fn only_an_ending_task_or_a_lost_notification_frees_capacity() {
    let wake = Wake::default();
    wake.queue_changed("a");
    assert!(!wake.take_freed(), "a submit takes capacity, it gives none back");
    assert_eq!(wake.take_dirty(), vec!["a".to_owned()]);
    wake.round();
    assert!(wake.take_freed());
    assert!(!wake.take_freed(), "taken once");
    wake.cancelled("b");
    assert!(wake.take_freed(), "a cancelled task may have been running");
    assert_eq!(wake.take_dirty(), vec!["b".to_owned()], "or queued");
    wake.everything_changed();
    assert!(wake.take_freed());
    assert!(wake.take_all_dirty());
}

#[tokio::test]
async fn a_cache_that_covers_the_free_slots_is_not_fetched_again() {
    let s = scheduler(&[("a", policy(1, 1000)), ("b", policy(1, 1000))], capacity(260));
    let db = FakeRound::default();
    db.0.lock().unwrap().running.insert("b".into(), (250, 0, 0));
    let a = db.queue("a", 400, 100, 1 << 20);
    let mut view = View::default();
    round(&s, db.clone(), &mut view, Duration::ZERO).await.unwrap();
    assert_eq!(db.admitted(), a[..10].to_vec(), "the 10 free slots");

    // Five of a's tasks end: the heads left over from the first fetch cover the 5 free slots.
    db.0.lock().unwrap().running.insert("a".into(), (5, 500, 5 << 20));
    let out = round(&s, db.clone(), &mut view, Duration::ZERO).await.unwrap();
    assert_eq!(out.admitted, 5);
    assert_eq!(db.admitted()[10..].to_vec(), a[10..15].to_vec(), "still in queue order");
    let fetched = db.0.lock().unwrap().fetched.iter().filter(|t| *t == "a").count();
    assert_eq!(fetched, 1, "a's heads fetched once, in the first round");
}

#[tokio::test]
async fn a_tenant_that_uses_up_its_shallow_cache_is_fetched_deeper_in_the_same_round() {
    let s = scheduler(&[("a", policy(1, 1000))], capacity(64));
    let db = FakeRound::default();
    let a = db.queue("a", 100, 100, 1 << 20);
    let mut view = View::default();
    let out = round(&s, db.clone(), &mut view, Duration::ZERO).await.unwrap();
    assert_eq!(out.admitted, 64, "every free slot, not only the shallow fetch's {HEAD_MIN}");
    assert_eq!(db.admitted(), a[..64].to_vec(), "in queue order");
    assert_eq!(db.0.lock().unwrap().commits, 1, "one round");
    assert_eq!(db.0.lock().unwrap().fetched, ["a", "a"], "a shallow fetch, then a deeper one");
    assert!(out.full);
}

#[tokio::test]
async fn the_deeper_fetch_gives_the_shares_whole_queues_would() {
    let s =
        scheduler(&[("heavy", policy(3, 1000)), ("light", policy(1, 1000)), ("other", policy(1, 1000))], capacity(80));
    let db = FakeRound::default();
    let heavy = db.queue("heavy", 200, 100, 1 << 20);
    let light = db.queue("light", 5, 100, 1 << 20);
    let other = db.queue("other", 200, 100, 1 << 20);
    round(&s, db.clone(), &mut View::default(), Duration::ZERO).await.unwrap();
    let admitted = db.admitted();
    let of = |ids: &[Uuid]| admitted.iter().copied().filter(|id| ids.contains(id)).collect::<Vec<_>>();
    // light has only 5 queued; heavy and other split the other 75 slots 3:1 (56 or 57 : 19 or 18).
    assert_eq!(of(&light), light.to_vec());
    let (h, o) = (of(&heavy), of(&other));
    assert_eq!(h.len() + o.len(), 75, "every slot is used");
    assert!((56..=57).contains(&h.len()), "heavy gets three times other's share: {} and {}", h.len(), o.len());
    assert_eq!(h, heavy[..h.len()].to_vec(), "each in queue order");
    assert_eq!(o, other[..o.len()].to_vec());
    let fetched = db.0.lock().unwrap().fetched.clone();
    assert_eq!(fetched.iter().filter(|t| *t == "light").count(), 1, "light's queue was whole in the first fetch");
    assert_eq!(fetched.iter().filter(|t| *t == "heavy").count(), 2, "heavy needed more than {HEAD_MIN}");
}
