//! The scheduler: one leader at a time admits queued tasks by weighted dominant-resource fair
//! share (`domain::fairshare`), under every tenant's concurrency, rate and size limits and the
//! global capacity.
//!
//! - **Leadership.** Each scheduler process waits on a Postgres advisory lock on its own session;
//!   the holder leads. Admissions are committed *on that session*, so a leader that lost its
//!   connection (and with it the lock) cannot commit another one: two schedulers never admit
//!   the same task or overshoot a quota. A standby takes over as soon as the lock is free.
//! - **Events, not polling.** Ingest's inserts and executors' finishes notify (`pg_notify`); the
//!   leader runs a round at once, so a submit or a finish is acted on within milliseconds.
//! - **Durable.** Queued tasks live only in Postgres; the in-memory view (`view`) is a cache that
//!   is rebuilt on every leadership change.

mod view;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::domain::fairshare::{self, decide, FairshareError, Policy, Resources, Stop, Tenant};
use crate::domain::phase::Reason;
use crate::domain::quantity::{format_cpu, format_memory};
use crate::domain::tenant::Tenants;
use crate::metrics::Metrics;
use crate::retry::Backoff;
use crate::store::{acquire_leadership, AdmissionRound, Admitted, QueuedHead, RunningUsage, Store, StoreError};

/// What the scheduler needs, and nothing else.
pub struct Scheduler {
    pub store: Store,
    pub metrics: Metrics,
    pub tenants: tokio::sync::watch::Receiver<Arc<Tenants>>,
    /// Its own wake-ups: which tenants' queues changed.
    pub wake: Arc<Wake>,
    /// Notified after admissions, so executors claim at once.
    pub executors: Arc<Notify>,
    pub capacity: Capacity,
}

/// Why a leader stepped down or its housekeeping failed.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// A query failed; the session, and with it the leadership, may be gone.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The fair-share decision refused its input: a zero capacity or an invalid tenant weight.
    #[error("the admission decision refused its input: {0}")]
    Decision(#[from] FairshareError),
}

impl SchedulerError {
    /// A stable, low-cardinality name for `agenttask_errors_total{component="scheduler"}`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            SchedulerError::Store(e) => e.metric_label(),
            SchedulerError::Decision(_) => "invalid_admission_input",
        }
    }
}

/// The global capacity admission works within.
#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    /// Tasks admitted and unfinished at once, all tenants together (`--max-running`).
    pub max_running: u32,
    pub cpu_millis: Option<u64>,
    pub memory_bytes: Option<u64>,
    /// Half-life of the usage history; zero turns the history term off.
    pub usage_half_life: Duration,
}

/// The scheduler's wake-ups. Postgres notifications feed them too, so submits and finishes in
/// other processes wake it just as fast.
#[derive(Default)]
pub struct Wake {
    notify: Notify,
    /// Tenants whose queue changed since the scheduler last looked.
    dirty: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Notifications may have been missed: every tenant must be looked at again.
    all_dirty: std::sync::atomic::AtomicBool,
    /// Capacity may have been given back (a finish, a cancel) or the rules changed since the
    /// last round: while the slots are full, only this makes a round worth running.
    freed: std::sync::atomic::AtomicBool,
}

impl Wake {
    /// A tenant's queue changed: the scheduler refetches it and runs a round.
    pub fn queue_changed(&self, tenant: &str) {
        self.dirty.lock().expect("not poisoned").insert(tenant.to_owned());
        self.notify.notify_one();
    }

    /// Something else changed (a finish, the tenants): run a round.
    pub fn round(&self) {
        self.freed.store(true, std::sync::atomic::Ordering::SeqCst);
        self.notify.notify_one();
    }

    /// A tenant's task was cancelled: it left the queue, or gave back the capacity it held.
    pub fn cancelled(&self, tenant: &str) {
        self.dirty.lock().expect("not poisoned").insert(tenant.to_owned());
        self.round();
    }

    /// Notifications may have been lost: recheck every queue.
    pub fn everything_changed(&self) {
        self.all_dirty.store(true, std::sync::atomic::Ordering::SeqCst);
        self.round();
    }

    fn take_dirty(&self) -> Vec<String> {
        self.dirty.lock().expect("not poisoned").drain().collect()
    }

    fn take_all_dirty(&self) -> bool {
        self.all_dirty.swap(false, std::sync::atomic::Ordering::SeqCst)
    }

    fn take_freed(&self) -> bool {
        self.freed.swap(false, std::sync::atomic::Ordering::SeqCst)
    }
}
use view::{Heads, View};

/// How often expired executor leases are reaped.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(2);
/// How often the queue-depth and running gauges are recounted: counting a million queued tasks
/// takes the database about a second, so not on every housekeeping tick.
const GAUGES_EVERY: Duration = Duration::from_secs(15);
/// Executions per task before a vanished executor fails it.
pub const MAX_ATTEMPTS: i32 = 3;
/// How often every tenant's cached heads are refetched regardless of notifications.
const FULL_REFRESH_EVERY: Duration = Duration::from_secs(30);
/// Admissions per transaction, to keep rounds short under a huge backlog.
const MAX_ADMISSIONS_PER_ROUND: usize = 512;

pub async fn run(ctx: Arc<Scheduler>, shutdown: CancellationToken) {
    let mut backoff = Backoff::write();
    while !shutdown.is_cancelled() {
        let mut conn = match ctx.store.dedicated_connection().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff.peek(), "scheduler cannot connect; retrying");
                backoff.wait(&shutdown).await;
                continue;
            }
        };
        tracing::info!("scheduler waiting for leadership");
        tokio::select! {
            _ = shutdown.cancelled() => return,
            res = acquire_leadership(&mut conn) => if let Err(e) = res {
                tracing::warn!(error = %e, retry_in = ?backoff.peek(), "leadership campaign failed; retrying");
                backoff.wait(&shutdown).await;
                continue;
            },
        }
        backoff.reset();
        tracing::info!("scheduler is the leader");
        let err = lead(&ctx, &mut conn, &shutdown).await;
        if let Err(e) = err {
            ctx.metrics.errors.with_label_values(&["scheduler", e.metric_label()]).inc();
            tracing::warn!(error = %e, "scheduler stepped down");
            backoff.wait(&shutdown).await;
        }
        // Dropping the session releases the lock for a standby.
    }
}

/// Admits while this session holds the leadership. Returns on shutdown (Ok) or on a database
/// error (the session, and so the leadership, may be gone).
async fn lead(
    ctx: &Scheduler,
    conn: &mut sqlx::PgConnection,
    shutdown: &CancellationToken,
) -> Result<(), SchedulerError> {
    let mut view = View::default();
    let mut last_housekeeping = Instant::now() - HOUSEKEEPING_EVERY;
    let mut last_round = Instant::now();
    let mut last_full_refresh = Instant::now();
    let mut last_gauges = Instant::now() - GAUGES_EVERY;
    // Every slot was taken when the last round committed. Under a flood, most wake-ups are new
    // submits; while the slots are full none of them can be admitted, and a round for each would
    // only take CPU and Postgres time from the rounds that can (and from ingest).
    let mut full = false;
    while !shutdown.is_cancelled() {
        // Register for the next wake-up before reading state, so an event during the round is
        // not missed.
        let woken = ctx.wake.notify.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let mut again = false;
        if ctx.wake.take_freed() || !full {
            let elapsed = last_round.elapsed();
            last_round = Instant::now();
            let outcome = round(ctx, AdmissionRound::begin(conn).await?, &mut view, elapsed).await?;
            if outcome.admitted > 0 {
                ctx.executors.notify_one();
            }
            full = outcome.full;
            again = outcome.again || reject_too_large(ctx, &outcome.too_large).await?;
        }
        if last_full_refresh.elapsed() >= FULL_REFRESH_EVERY {
            // A safety net under the notifications, which are the normal path.
            last_full_refresh = Instant::now();
            view.mark_all_dirty();
        }
        if last_housekeeping.elapsed() >= HOUSEKEEPING_EVERY {
            last_housekeeping = Instant::now();
            let gauges = last_gauges.elapsed() >= GAUGES_EVERY;
            if gauges {
                last_gauges = Instant::now();
            }
            if let Err(e) = housekeeping(ctx, gauges).await {
                ctx.metrics.errors.with_label_values(&["scheduler", e.metric_label()]).inc();
                tracing::warn!(error = %e, "scheduler housekeeping failed");
            }
            // It may have taken expired runs back, and a finish it raced with is seen anyway.
            full = false;
        }
        if again {
            continue;
        }
        let now = Instant::now();
        let next_token = view
            .tenants
            .values()
            .filter_map(|s| s.blocked_until)
            .filter(|t| *t > now)
            .min()
            .map(|t| t - now)
            .unwrap_or(HOUSEKEEPING_EVERY)
            .min(HOUSEKEEPING_EVERY);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = &mut woken => {}
            _ = tokio::time::sleep(next_token) => {}
        }
    }
    Ok(())
}

#[derive(Debug)]
struct RoundOutcome {
    admitted: usize,
    /// Every slot is taken now: nothing more can be admitted before a task ends.
    full: bool,
    /// Run another round at once: something changed under us or a bucket ran dry mid-round.
    again: bool,
    /// Queued heads larger than the whole capacity: (task, CPU millis, memory bytes). They can
    /// never be admitted; the caller rejects them after the round committed.
    too_large: Vec<(uuid::Uuid, u64, u64)>,
}

/// What one admission round reads and writes, in one transaction: the leader's
/// [`AdmissionRound`] in the service, an in-memory fake in the unit tests.
pub(crate) trait RoundStore {
    /// Tasks holding capacity, per tenant.
    async fn running_usage(&mut self) -> Result<Vec<RunningUsage>, StoreError>;
    /// The first queued tasks of each tenant, as many as its limit, in admission order.
    async fn queued_heads(&mut self, tenants: &[String], limits: &[i32]) -> Result<Vec<QueuedHead>, StoreError>;
    /// `Queued` → `Pending`; returns the tasks that moved.
    async fn admit(&mut self, ids: &[uuid::Uuid]) -> Result<Vec<Admitted>, StoreError>;
    async fn commit(self) -> Result<(), StoreError>;
}

impl RoundStore for AdmissionRound<'_> {
    async fn running_usage(&mut self) -> Result<Vec<RunningUsage>, StoreError> {
        AdmissionRound::running_usage(self).await
    }
    async fn queued_heads(&mut self, tenants: &[String], limits: &[i32]) -> Result<Vec<QueuedHead>, StoreError> {
        AdmissionRound::queued_heads(self, tenants, limits).await
    }
    async fn admit(&mut self, ids: &[uuid::Uuid]) -> Result<Vec<Admitted>, StoreError> {
        AdmissionRound::admit(self, ids).await
    }
    async fn commit(self) -> Result<(), StoreError> {
        AdmissionRound::commit(self).await
    }
}

/// One admission decision, applied and committed in `tx`.
async fn round(
    ctx: &Scheduler,
    mut tx: impl RoundStore,
    view: &mut View,
    elapsed: Duration,
) -> Result<RoundOutcome, SchedulerError> {
    let config = ctx.tenants.borrow().clone();
    view.sync(&config);
    for tenant in ctx.wake.take_dirty() {
        view.mark_dirty(&tenant);
    }
    if ctx.wake.take_all_dirty() {
        view.mark_all_dirty();
    }
    let usage: HashMap<String, RunningUsage> =
        tx.running_usage().await?.into_iter().map(|u| (u.tenant.clone(), u)).collect();
    let slots_of = |t: &str| usage.get(t).map_or(0, |u| u.tasks.max(0) as u64);
    let used_slots: u64 = usage.values().map(|u| u.tasks.max(0) as u64).sum();
    let free_slots = (ctx.capacity.max_running as u64).saturating_sub(used_slots);
    // What this round could admit of a tenant at most: its own room, within the free slots.
    let room = |name: &str| {
        let max = config.get(name).map_or(0, |p| p.max_concurrency as u64);
        max.saturating_sub(slots_of(name)).min(free_slots) as usize
    };
    let refresh = view.needing_refresh();
    fetch_heads(&mut tx, view, &refresh).await?;

    let total = Resources {
        cpu_millis: ctx.capacity.cpu_millis.unwrap_or(u64::MAX),
        memory_bytes: ctx.capacity.memory_bytes.unwrap_or(u64::MAX),
        slots: ctx.capacity.max_running as u64,
    };
    let now = Instant::now();
    let now_ms = chrono::Utc::now().timestamp_millis().max(0) as u64;
    let policy = Policy {
        max_admissions: MAX_ADMISSIONS_PER_ROUND,
        history_weight: if ctx.capacity.usage_half_life.is_zero() { 0.0 } else { fairshare::DEFAULT_HISTORY_WEIGHT },
        ..Policy::default()
    };
    let (mut names, mut decision) = decide_over(&config, view, &usage, total, now, now_ms, &policy)?;
    // The caches are shallow: a tenant whose cached heads all went into the decision while more
    // are queued may deserve more of this round. Fetch those deeper and decide again, so that
    // what is admitted is what the whole queues would have given.
    let exhausted: Vec<&str> =
        names.iter().zip(&decision.tenants).filter(|(_, t)| t.stop == Stop::QueueEmpty).map(|(n, _)| *n).collect();
    let deeper = view.deeper(&exhausted, room);
    if !deeper.is_empty() {
        fetch_heads(&mut tx, view, &deeper).await?;
        (names, decision) = decide_over(&config, view, &usage, total, now, now_ms, &policy)?;
    }
    // Stopped at the per-round cap: there may be more to admit right away.
    let mut again = decision.admissions.len() >= MAX_ADMISSIONS_PER_ROUND;

    // Apply in decision order; each admission also takes a token from the tenant's bucket.
    let mut taken = vec![0usize; names.len()];
    let mut out_of_tokens = vec![false; names.len()];
    let mut ids = Vec::with_capacity(decision.admissions.len());
    for a in &decision.admissions {
        let i = a.tenant;
        if i >= names.len() || out_of_tokens[i] {
            continue;
        }
        let state = view.tenants.get_mut(names[i]).expect("tenant in view");
        if !state.take_token(now) {
            out_of_tokens[i] = true;
            again = true;
            continue;
        }
        ids.push(state.heads.0[taken[i]].task_id);
        taken[i] += 1;
    }
    let too_large: Vec<(uuid::Uuid, u64, u64)> = decision
        .tenants
        .iter()
        .enumerate()
        .filter(|(i, t)| *i < names.len() && t.stop == Stop::TooLarge)
        .filter_map(|(i, _)| {
            let s = &view.tenants[names[i]];
            s.heads.0.get(taken[i]).map(|h| (h.task_id, h.task.cpu_millis, h.task.memory_bytes))
        })
        .collect();
    let admitted = if ids.is_empty() { Vec::new() } else { tx.admit(&ids).await? };
    tx.commit().await?;

    // The view follows what was committed.
    for (i, n) in taken.iter().enumerate() {
        if let Some(state) = view.tenants.get_mut(names[i]) {
            state.heads.0.drain(..(*n).min(state.heads.0.len()));
        }
    }
    if admitted.len() < ids.len() {
        // Some heads were no longer queued (cancelled, or admitted by a previous leader).
        view.mark_all_dirty();
        again = true;
    }
    let now_utc = chrono::Utc::now();
    for a in &admitted {
        let _span = tracing::info_span!("admit", task_id = %a.task_id, tenant = %a.tenant).entered();
        ctx.metrics.admitted.with_label_values(&[&a.tenant]).inc();
        let wait = (now_utc - a.submitted_at).num_milliseconds().max(0) as f64 / 1000.0;
        ctx.metrics.admission_wait.with_label_values(&[&a.tenant]).observe(wait);
        tracing::debug!(wait_seconds = wait, "task admitted");
    }
    for (i, name) in names.iter().enumerate() {
        let t = &decision.tenants[i];
        ctx.metrics.fair_share.with_label_values(&[name]).set(t.fair_share);
        ctx.metrics.actual_share.with_label_values(&[name]).set(t.actual_share);
        if let Some(state) = view.tenants.get_mut(*name) {
            state.history = if ctx.capacity.usage_half_life.is_zero() {
                0.0
            } else {
                fairshare::update_history(state.history, t.actual_share, elapsed, ctx.capacity.usage_half_life)
            };
        }
    }
    ctx.metrics.fairness_index.set(decision.fairness_index());
    if !admitted.is_empty() {
        tracing::debug!(admitted = admitted.len(), "admission round");
    }
    let full = used_slots + admitted.len() as u64 >= total.slots;
    Ok(RoundOutcome { admitted: admitted.len(), full, again, too_large })
}

/// Replaces the cached heads of `tenants` (each with how many to fetch) with their queues' heads.
async fn fetch_heads(tx: &mut impl RoundStore, view: &mut View, tenants: &[(String, usize)]) -> Result<(), StoreError> {
    if tenants.is_empty() {
        return Ok(());
    }
    let (names, limits): (Vec<String>, Vec<i32>) =
        tenants.iter().map(|(name, limit)| (name.clone(), (*limit).min(i32::MAX as usize) as i32)).unzip();
    let rows = tx.queued_heads(&names, &limits).await?;
    view.replace_heads(tenants, rows);
    Ok(())
}

/// The fair-share decision over the view as it stands, and the names of its tenants in input
/// order (the configured tenants the view has; tasks of removed tenants only hold capacity).
fn decide_over<'c>(
    config: &'c Tenants,
    view: &View,
    usage: &HashMap<String, RunningUsage>,
    total: Resources,
    now: Instant,
    now_ms: u64,
    policy: &Policy,
) -> Result<(Vec<&'c str>, fairshare::Decision), FairshareError> {
    let resources_of = |u: Option<&RunningUsage>| {
        u.map_or(Resources::ZERO, |u| Resources {
            cpu_millis: u.cpu_millis.max(0) as u64,
            memory_bytes: u.memory_bytes.max(0) as u64,
            slots: u.tasks.max(0) as u64,
        })
    };
    let no_heads = Heads::default();
    let mut names: Vec<&str> = Vec::new();
    let mut views: Vec<Tenant<'_, Heads>> = Vec::new();
    for (name, policy) in config.iter() {
        let Some(state) = view.tenants.get(name.as_str()) else { continue };
        names.push(name.as_str());
        views.push(Tenant {
            name: name.as_str(),
            weight: policy.weight as f64,
            max_concurrency: policy.max_concurrency,
            tokens: state.tokens(now),
            running: resources_of(usage.get(name.as_str())),
            history: state.history,
            queue: &state.heads,
        });
    }
    // Tasks of tenants that were removed from the configuration still hold capacity.
    let orphaned = usage
        .values()
        .filter(|u| !config.contains_key(u.tenant.as_str()))
        .fold(Resources::ZERO, |acc, u| acc.saturating_add(resources_of(Some(u))));
    if orphaned != Resources::ZERO {
        views.push(Tenant {
            name: "",
            weight: 1.0,
            max_concurrency: 0,
            tokens: 0,
            running: orphaned,
            history: 0.0,
            queue: &no_heads,
        });
    }
    Ok((names, decide(&views, total, now_ms, policy)?))
}

/// Rejects queued tasks that ask for more than the whole capacity. True if any was rejected.
async fn reject_too_large(ctx: &Scheduler, too_large: &[(uuid::Uuid, u64, u64)]) -> Result<bool, StoreError> {
    let mut any = false;
    for &(task_id, cpu, memory) in too_large {
        let message = format!(
            "asks for {} CPU and {} memory, more than the service's whole capacity ({} CPU, {} memory); ask for less",
            format_cpu(cpu),
            format_memory(memory),
            ctx.capacity.cpu_millis.map_or("unlimited".into(), format_cpu),
            ctx.capacity.memory_bytes.map_or("unlimited".into(), format_memory),
        );
        if ctx.store.reject_queued(task_id, Reason::ValidationFailed, &message).await? {
            any = true;
        }
    }
    Ok(any)
}

/// Slow-path duties: fail or requeue tasks of vanished executors, refresh gauges.
async fn housekeeping(ctx: &Scheduler, gauges: bool) -> Result<(), StoreError> {
    let (requeued, failed) = ctx.store.reap_expired(MAX_ATTEMPTS).await?;
    if requeued + failed > 0 {
        tracing::warn!(requeued, failed, "reaped tasks whose executor stopped responding");
    }
    // The outbox is small unless publishing is stuck, and then its lag is what operators need.
    let lag = ctx.store.outbox_lag().await?;
    ctx.metrics.outbox_pending.set(lag.pending);
    ctx.metrics.outbox_oldest_seconds.set(lag.oldest_seconds);
    ctx.metrics.outbox_parked.set(lag.parked);
    if !gauges {
        return Ok(());
    }
    for (tenant, queued, running) in ctx.store.phase_counts().await? {
        ctx.metrics.queue_depth.with_label_values(&[&tenant]).set(queued);
        ctx.metrics.running.with_label_values(&[&tenant]).set(running);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
