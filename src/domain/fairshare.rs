//! Weighted dominant-resource fair share: which queued tasks to admit next.
//!
//! This module decides; it does nothing. It reads no clock (the caller passes `now_ms`), does no
//! I/O and holds no state between calls: the scheduler keeps the queues, the running usage, the
//! rate-limit buckets and the decayed usage history, and asks [`decide`] for the next admissions.
//!
//! # The policy
//!
//! * **Dominant share.** A tenant's share of a resource is its usage ÷ the global total; its
//!   *dominant share* is the largest of its cpu, memory and slot shares (one slot per running task).
//!   Its admission key is `(dominant_share + history_weight × history) ÷ weight`.
//! * **Progressive filling.** Among the *backlogged* tenants that could start their head task
//!   (queue not empty, below `max_concurrency`, a rate token left), the one with the lowest key
//!   gets its head task admitted if the task fits in the free capacity; its key is recomputed and it
//!   competes again. Ties go to the lower `history`, then the lower name, then the lower index,
//!   so the result never depends on hash order or on floating-point noise across runs.
//! * **Limits are hard.** A decision never admits more than a tenant's `tokens`, never lets its
//!   running tasks exceed `max_concurrency`, and never hands out more than the free global
//!   capacity (`total − Σ running`, per resource, floored at zero) in any resource.
//! * **FIFO within a tenant.** Only a tenant's head is ever admitted, so the admitted tasks of a
//!   tenant are always a prefix of the queue the caller passed in; the caller orders each queue
//!   (priority descending, then submit order). Priority never crosses tenants.
//! * **Idle tenants.** A tenant with an empty queue takes nothing and blocks no one; its share
//!   goes to the others.
//!
//! # Large tasks: the reservation
//!
//! Plain progressive filling lets a large head task starve: every time a little capacity frees
//! up, a small task of another tenant takes it, and the large task never finds room. So:
//!
//! When the lowest-key eligible tenant's head does **not** fit in the free capacity (but does fit
//! in the total capacity) and it has waited at least [`Policy::reserve_after_ms`] (default: `0`,
//! i.e. at once), the decision *reserves* that head's request. For the rest of the decision other
//! tenants are admitted only if their head fits in `free − reserved` (per resource, floored at zero),
//! so nobody eats into what the large task needs, and as running tasks finish the free capacity
//! grows until it fits. There is at most one reservation per decision (the lowest-key blocked
//! tenant that qualifies); it is not remembered, each decision makes it afresh, and since the
//! reserved tenant gets nothing its key only falls while others' rise, so it keeps it until it runs.
//! Tenants with a lower key than the reserved one were served before it, as fairness demands.
//!
//! The price is that capacity may stay idle while the reservation drains (the classic trade-off of
//! reservations without runtime estimates). `reserve_after_ms: Some(t)` keeps the cluster
//! work-conserving for heads that waited less than `t`; `None` turns reservations off (and allows
//! starvation). A head larger than the *total* capacity can never run: it gets no reservation, its
//! tenant is reported with [`Stop::TooLarge`], and the caller should reject that task.
//!
//! Stated exactly: unless the decision stopped at [`Policy::max_admissions`], afterwards every
//! tenant that is still eligible (a next head queued, below `max_concurrency`, a token left) and
//! whose head fits in the total capacity has a head that does not fit in [`Decision::free`] minus
//! the reservation's request, or, for the tenant holding the reservation, in [`Decision::free`].
//! With reservations off (or none made) this is plain work conservation. A reservation is only
//! made for a head that does not fit in the free capacity.
//!
//! # Usage history (optional)
//!
//! `history` is an exponentially weighted average of a tenant's (unweighted) dominant share, kept by
//! the caller with [`update_history`] and the half-life [`DEFAULT_HALF_LIFE`] (60 s). It enters the
//! key with the small weight [`DEFAULT_HISTORY_WEIGHT`] (0.1): in steady state history ≈ share, so
//! the ranking is the weighted-DRF ranking; after a burst a tenant that just used a lot yields to
//! one that did not, and equal keys go to the tenant with less recent usage. Pass `0.0` (and/or
//! `history_weight: 0.0`) to ignore it.
//!
//! # Metrics
//!
//! Each [`TenantOutcome`] carries the tenant's *fair share*, its weight's part of the cluster among
//! backlogged tenants, water-filled so that a tenant never gets more than its demand (estimated as
//! its running usage plus its head task's request times the number of tasks it may still start:
//! `min(queued, max_concurrency − running)`), and its *actual share*, its dominant share after this
//! decision. [`Decision::fairness_index`] is Jain's index ([`jain_index`]) of actual ÷ fair share
//! over backlogged tenants.
//!
//! # Cost
//!
//! O(n) to set up for n tenants (plus O(b log b) for the fair shares of b backlogged tenants), then
//! O(log n) per admission: a binary heap keyed by the admission key, where only the admitted tenant's
//! entry is updated. Queues are read through [`QueueView`], so nothing is copied: a decision looks
//! at most at `admitted + 1` tasks per tenant.
//!
//! # Example (the scheduler's side)
//!
//! ```text
//! use std::collections::VecDeque;
//! use crate::domain::fairshare::{decide, Policy, QueuedTask, Resources, Tenant};
//!
//! // Per tenant, the scheduler keeps its queue (priority desc, then submit order) and its usage.
//! let views: Vec<Tenant<'_, VecDeque<QueuedTask>>> = state
//!     .iter()
//!     .map(|s| Tenant {
//!         name: &s.name,
//!         weight: s.weight,
//!         max_concurrency: s.max_concurrency,
//!         tokens: s.tokens_available(now),   // from the tenant's token bucket
//!         running: s.running,                // Resources of its running tasks
//!         history: s.history,                // kept with update_history()
//!         queue: &s.queue,
//!     })
//!     .collect();
//! let decision = decide(&views, capacity, now_ms, &Policy::default())?;
//! drop(views);
//! for a in &decision.admissions {            // in admission order
//!     let task = state[a.tenant].queue.pop_front().expect("admitted tasks are the queue's prefix");
//!     debug_assert_eq!(task.id, a.task_id);
//!     // mark admitted in the store, take a token, add task.request() to state[a.tenant].running ...
//! }
//! ```
//! (The `caller_example` test compiles and runs this shape; `crate::scheduler` is the real caller.)

use std::cmp::Ordering;
use std::collections::binary_heap::PeekMut;
use std::collections::{BinaryHeap, VecDeque};
use std::fmt;
use std::time::Duration;

/// Half-life of the usage history the scheduler keeps with [`update_history`].
pub const DEFAULT_HALF_LIFE: Duration = Duration::from_secs(60);

/// How much the usage history counts next to the current dominant share in the admission key.
/// Small on purpose: history breaks near-ties and damps bursts; current usage decides.
pub const DEFAULT_HISTORY_WEIGHT: f64 = 0.1;

/// How long a blocked head must have waited before capacity is reserved for it: at once.
pub const DEFAULT_RESERVE_AFTER_MS: Option<u64> = Some(0);

/// An amount of each resource the admission decision accounts for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Resources {
    /// CPU in millicores (Kubernetes `500m` = 500).
    pub cpu_millis: u64,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// Task slots: every running task holds exactly one.
    pub slots: u64,
}

impl Resources {
    /// Nothing of anything.
    pub const ZERO: Resources = Resources { cpu_millis: 0, memory_bytes: 0, slots: 0 };

    /// Builds an amount from its three parts.
    pub const fn new(cpu_millis: u64, memory_bytes: u64, slots: u64) -> Self {
        Resources { cpu_millis, memory_bytes, slots }
    }

    /// True when `self` is at most `other` in every resource.
    pub fn fits_in(self, other: Resources) -> bool {
        self.cpu_millis <= other.cpu_millis && self.memory_bytes <= other.memory_bytes && self.slots <= other.slots
    }

    /// Per-resource subtraction, floored at zero.
    pub fn saturating_sub(self, other: Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_sub(other.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_sub(other.memory_bytes),
            slots: self.slots.saturating_sub(other.slots),
        }
    }

    /// Per-resource addition, capped at `u64::MAX`.
    pub fn saturating_add(self, other: Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_add(other.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_add(other.memory_bytes),
            slots: self.slots.saturating_add(other.slots),
        }
    }

    /// Per-resource multiplication by `n`, capped at `u64::MAX`.
    pub fn saturating_mul(self, n: u64) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_mul(n),
            memory_bytes: self.memory_bytes.saturating_mul(n),
            slots: self.slots.saturating_mul(n),
        }
    }
}

/// One of the three resources, to name the culprit in an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resource {
    /// CPU millicores.
    Cpu,
    /// Memory bytes.
    Memory,
    /// Task slots.
    Slots,
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Resource::Cpu => "cpu",
            Resource::Memory => "memory",
            Resource::Slots => "slots",
        })
    }
}

/// What the decision needs to know about one queued task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QueuedTask {
    /// Opaque to this module; handed back in [`Admission::task_id`].
    pub id: u64,
    /// CPU the task asks for, in millicores.
    pub cpu_millis: u64,
    /// Memory the task asks for, in bytes.
    pub memory_bytes: u64,
    /// When the task was queued, in milliseconds on the caller's clock (the same clock as
    /// `now_ms`); only used to decide whether a blocked head has waited long enough for a
    /// reservation.
    pub enqueued_at_ms: u64,
}

impl QueuedTask {
    /// The resources the task holds while it runs: its cpu and memory, and one slot.
    pub fn request(&self) -> Resources {
        Resources { cpu_millis: self.cpu_millis, memory_bytes: self.memory_bytes, slots: 1 }
    }
}

/// Read access to one tenant's queue, in admission order (index 0 is the head).
///
/// The decision reads only the first `admitted + 1` tasks, so the caller lends its queues
/// instead of copying them. Implemented for `VecDeque<QueuedTask>`, `Vec<QueuedTask>` and
/// `[QueuedTask]`; a scheduler that keeps richer entries implements it for its own queue type
/// (or uses `Tenant<'_, dyn QueueView>` to mix types).
pub trait QueueView {
    /// Number of queued tasks.
    fn len(&self) -> usize;

    /// The task at `index` (0 = head), or `None` past the end.
    fn get(&self, index: usize) -> Option<QueuedTask>;

    /// True when nothing is queued.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl QueueView for [QueuedTask] {
    fn len(&self) -> usize {
        <[QueuedTask]>::len(self)
    }
    fn get(&self, index: usize) -> Option<QueuedTask> {
        <[QueuedTask]>::get(self, index).copied()
    }
}

impl QueueView for Vec<QueuedTask> {
    fn len(&self) -> usize {
        Vec::len(self)
    }
    fn get(&self, index: usize) -> Option<QueuedTask> {
        self.as_slice().get(index).copied()
    }
}

impl QueueView for VecDeque<QueuedTask> {
    fn len(&self) -> usize {
        VecDeque::len(self)
    }
    fn get(&self, index: usize) -> Option<QueuedTask> {
        VecDeque::get(self, index).copied()
    }
}

impl<T: QueueView + ?Sized> QueueView for &T {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn get(&self, index: usize) -> Option<QueuedTask> {
        (**self).get(index)
    }
}

/// One tenant as the decision sees it: configuration, current state and a view of its queue.
pub struct Tenant<'a, Q: ?Sized> {
    /// Tenant name; the last tie-breaker.
    pub name: &'a str,
    /// Fair-share weight; must be finite and > 0.
    pub weight: f64,
    /// Most tasks it may have running at once (running ones included).
    pub max_concurrency: u32,
    /// Rate-limit tokens available now: at most this many admissions in this decision.
    pub tokens: u32,
    /// What its running (and already admitted) tasks hold; `slots` = number of those tasks.
    pub running: Resources,
    /// Decayed usage history (see [`update_history`]); finite and >= 0, `0.0` if unused.
    pub history: f64,
    /// Its queued tasks, head first.
    pub queue: &'a Q,
}

impl<Q: ?Sized> Clone for Tenant<'_, Q> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<Q: ?Sized> Copy for Tenant<'_, Q> {}

impl<Q: QueueView + ?Sized> fmt::Debug for Tenant<'_, Q> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tenant")
            .field("name", &self.name)
            .field("weight", &self.weight)
            .field("max_concurrency", &self.max_concurrency)
            .field("tokens", &self.tokens)
            .field("running", &self.running)
            .field("history", &self.history)
            .field("queued", &self.queue.len())
            .finish()
    }
}

/// Knobs of the decision. `Policy::default()` is the documented default.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Reserve capacity for a blocked lowest-key head once it has waited this long (ms);
    /// `Some(0)` at once (the default), `None` never.
    pub reserve_after_ms: Option<u64>,
    /// Weight of `Tenant::history` in the admission key; finite and >= 0 (default 0.1).
    pub history_weight: f64,
    /// Stop after this many admissions (e.g. to bound a store transaction); default unlimited.
    pub max_admissions: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            reserve_after_ms: DEFAULT_RESERVE_AFTER_MS,
            history_weight: DEFAULT_HISTORY_WEIGHT,
            max_admissions: usize::MAX,
        }
    }
}

/// Why a decision was refused. Every variant is a caller bug or bad configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FairshareError {
    /// The total capacity of a resource is zero, so no share of it can be computed.
    ZeroCapacity(Resource),
    /// A tenant's weight is zero, negative or not finite.
    InvalidWeight {
        /// Index of the tenant in the input.
        tenant: usize,
        /// The weight given.
        weight: f64,
    },
    /// A tenant's history is negative or not finite.
    InvalidHistory {
        /// Index of the tenant in the input.
        tenant: usize,
        /// The history given.
        history: f64,
    },
    /// `Policy::history_weight` is negative or not finite.
    InvalidHistoryWeight(f64),
    /// More tenants than a `u32` can count.
    TooManyTenants(usize),
}

impl fmt::Display for FairshareError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FairshareError::ZeroCapacity(r) => write!(f, "total {r} capacity is zero"),
            FairshareError::InvalidWeight { tenant, weight } => {
                write!(f, "tenant #{tenant}: weight {weight} must be finite and > 0")
            }
            FairshareError::InvalidHistory { tenant, history } => {
                write!(f, "tenant #{tenant}: usage history {history} must be finite and >= 0")
            }
            FairshareError::InvalidHistoryWeight(w) => {
                write!(f, "history weight {w} must be finite and >= 0")
            }
            FairshareError::TooManyTenants(n) => write!(f, "{n} tenants is more than supported"),
        }
    }
}

impl std::error::Error for FairshareError {}

/// One admitted task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Admission {
    /// Index of the tenant in the input slice.
    pub tenant: usize,
    /// The task's [`QueuedTask::id`].
    pub task_id: u64,
}

/// Capacity held back for a large head task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Reservation {
    /// Index of the tenant in the input slice.
    pub tenant: usize,
    /// The head task it is held for.
    pub task_id: u64,
    /// What is held: the task's request.
    pub request: Resources,
}

/// Why a tenant got no (further) admission in this decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stop {
    /// Nothing (more) is queued.
    QueueEmpty,
    /// `max_concurrency` reached.
    MaxConcurrency,
    /// No rate-limit token left.
    NoTokens,
    /// The head does not fit in the capacity left (minus the reservation, if any).
    NoCapacity,
    /// The head does not fit yet; capacity is held for it ([`Decision::reservation`]).
    Reserved,
    /// The head asks for more than the total capacity: it can never run; reject it.
    TooLarge,
    /// `Policy::max_admissions` reached before this tenant was done.
    AdmissionLimit,
}

/// What happened to one tenant, and the numbers for its metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TenantOutcome {
    /// How many tasks were admitted: the first `admitted` of its queue.
    pub admitted: u32,
    /// Whether it had queued tasks when the decision started.
    pub backlogged: bool,
    /// Why it stopped.
    pub stop: Stop,
    /// Its fair share of the cluster (0 when not backlogged); see the module docs.
    pub fair_share: f64,
    /// Its dominant share after this decision (running plus admitted).
    pub actual_share: f64,
}

/// The result of [`decide`].
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The admitted tasks, in the order they were decided.
    pub admissions: Vec<Admission>,
    /// One entry per input tenant, same order.
    pub tenants: Vec<TenantOutcome>,
    /// Capacity held for a large head task, if any.
    pub reservation: Option<Reservation>,
    /// Capacity still free after the admissions (the reservation is not subtracted).
    pub free: Resources,
}

impl Decision {
    /// Jain's index of actual ÷ fair share over backlogged tenants with a fair share > 0
    /// (1.0 when there are none).
    pub fn fairness_index(&self) -> f64 {
        let ratios: Vec<f64> = self
            .tenants
            .iter()
            .filter(|t| t.backlogged && t.fair_share > 0.0)
            .map(|t| t.actual_share / t.fair_share)
            .collect();
        jain_index(&ratios)
    }
}

/// Jain's fairness index `(Σx)² ÷ (n·Σx²)`: 1.0 when all values are equal, 1/n when one value
/// holds everything. Non-finite values are skipped; returns 1.0 for no values or all zeros.
pub fn jain_index(values: &[f64]) -> f64 {
    let (mut n, mut sum, mut sum_sq) = (0usize, 0.0f64, 0.0f64);
    for &x in values.iter().filter(|x| x.is_finite()) {
        n += 1;
        sum += x;
        sum_sq += x * x;
    }
    if n == 0 || sum_sq <= 0.0 || !sum_sq.is_finite() {
        return 1.0;
    }
    (sum * sum / (n as f64 * sum_sq)).clamp(0.0, 1.0)
}

/// `value` halved once per `half_life` of `elapsed`: `value · 2^(−elapsed/half_life)`.
///
/// A zero half-life forgets everything as soon as any time passes. A non-finite `value`
/// decays to 0.0, so a corrupt history cannot poison later decisions.
pub fn decay(value: f64, elapsed: Duration, half_life: Duration) -> f64 {
    if !value.is_finite() {
        return 0.0;
    }
    if elapsed.is_zero() {
        return value;
    }
    if half_life.is_zero() {
        return 0.0;
    }
    value * (-(elapsed.as_secs_f64() / half_life.as_secs_f64())).exp2()
}

/// Moves the usage `history` towards the tenant's `current_share` (its dominant share over the
/// last `elapsed`): an exponentially weighted moving average with the given half-life. The result
/// stays between the two inputs; non-finite or negative inputs count as 0.
pub fn update_history(history: f64, current_share: f64, elapsed: Duration, half_life: Duration) -> f64 {
    let clean = |x: f64| if x.is_finite() && x > 0.0 { x } else { 0.0 };
    let (history, current) = (clean(history), clean(current_share));
    (current + decay(history - current, elapsed, half_life)).max(0.0)
}

/// A tenant's dominant share of `total`: the largest of its per-resource shares.
///
/// `total` must have no zero part (`decide` checks); a zero part counts as no share.
pub fn dominant_share(usage: Resources, total: Resources) -> f64 {
    let share = |u: u64, t: u64| if t == 0 { 0.0 } else { u as f64 / t as f64 };
    share(usage.cpu_millis, total.cpu_millis)
        .max(share(usage.memory_bytes, total.memory_bytes))
        .max(share(usage.slots, total.slots))
}

/// Decides which queued tasks to admit now. See the module docs for the policy.
///
/// `total` is the global capacity; the free capacity is `total − Σ tenants[i].running`, so every
/// running task must be counted in some tenant's `running`. `now_ms` is on the same clock as
/// [`QueuedTask::enqueued_at_ms`].
///
/// # Errors
///
/// [`FairshareError`] for a zero total in any resource, a weight that is not finite and > 0, a
/// history or history weight that is not finite and >= 0, or more than `u32::MAX` tenants.
/// Nothing else is an error: empty inputs give an empty decision, and no input panics.
pub fn decide<Q: QueueView + ?Sized>(
    tenants: &[Tenant<'_, Q>],
    total: Resources,
    now_ms: u64,
    policy: &Policy,
) -> Result<Decision, FairshareError> {
    validate(tenants, total, policy)?;

    let mut used = Resources::ZERO;
    for t in tenants {
        used = used.saturating_add(t.running);
    }
    let mut free = total.saturating_sub(used);

    // Per-tenant working state and the starting heap of eligible tenants.
    let mut work: Vec<Work> = Vec::with_capacity(tenants.len());
    let mut heap: Vec<Entry<'_>> = Vec::with_capacity(tenants.len());
    for (i, t) in tenants.iter().enumerate() {
        let hist_term = policy.history_weight * t.history;
        let mut w = Work { usage: t.running, admitted: 0, hist_term, head: None, stop: Stop::QueueEmpty };
        match next_head(t, 0) {
            Ok(head) => {
                w.head = Some(head);
                heap.push(Entry {
                    key: (dominant_share(t.running, total) + hist_term) / t.weight,
                    history: t.history,
                    name: t.name,
                    idx: i as u32,
                });
            }
            Err(stop) => w.stop = stop,
        }
        work.push(w);
    }
    let mut heap = BinaryHeap::from(heap);

    let mut admissions = Vec::with_capacity(free.slots.min(policy.max_admissions as u64).min(1 << 16) as usize);
    let mut reserved = Resources::ZERO;
    let mut reservation: Option<Reservation> = None;

    while admissions.len() < policy.max_admissions {
        let Some(mut top) = heap.peek_mut() else {
            break;
        };
        let i = top.idx as usize;
        let t = &tenants[i];
        let w = &mut work[i];
        let Some(head) = w.head else {
            // Unreachable: only tenants with a head are in the heap.
            w.stop = Stop::QueueEmpty;
            PeekMut::pop(top);
            continue;
        };
        let request = head.request();
        if request.fits_in(free.saturating_sub(reserved)) {
            free = free.saturating_sub(request);
            w.usage = w.usage.saturating_add(request);
            w.admitted += 1;
            admissions.push(Admission { tenant: i, task_id: head.id });
            match next_head(t, w.admitted) {
                Ok(next) => {
                    w.head = Some(next);
                    // Dropping `top` sifts the updated entry down: O(log n).
                    top.key = (dominant_share(w.usage, total) + w.hist_term) / t.weight;
                }
                Err(stop) => {
                    w.head = None;
                    w.stop = stop;
                    PeekMut::pop(top);
                }
            }
            continue;
        }
        // The head does not fit; it will not fit later in this decision either (free only shrinks).
        w.stop = if !request.fits_in(total) {
            Stop::TooLarge
        } else if reservation.is_none()
            && policy.reserve_after_ms.is_some_and(|after| now_ms.saturating_sub(head.enqueued_at_ms) >= after)
        {
            reserved = request;
            reservation = Some(Reservation { tenant: i, task_id: head.id, request });
            Stop::Reserved
        } else {
            Stop::NoCapacity
        };
        PeekMut::pop(top);
    }
    for e in heap.iter() {
        work[e.idx as usize].stop = Stop::AdmissionLimit;
    }

    let fair = fair_shares(tenants, total);
    let outcomes = tenants
        .iter()
        .zip(&work)
        .zip(fair)
        .map(|((t, w), fair_share)| TenantOutcome {
            admitted: w.admitted,
            backlogged: !t.queue.is_empty(),
            stop: w.stop,
            fair_share,
            actual_share: dominant_share(w.usage, total),
        })
        .collect();

    Ok(Decision { admissions, tenants: outcomes, reservation, free })
}

fn validate<Q: QueueView + ?Sized>(
    tenants: &[Tenant<'_, Q>],
    total: Resources,
    policy: &Policy,
) -> Result<(), FairshareError> {
    if total.cpu_millis == 0 {
        return Err(FairshareError::ZeroCapacity(Resource::Cpu));
    }
    if total.memory_bytes == 0 {
        return Err(FairshareError::ZeroCapacity(Resource::Memory));
    }
    if total.slots == 0 {
        return Err(FairshareError::ZeroCapacity(Resource::Slots));
    }
    if !(policy.history_weight.is_finite() && policy.history_weight >= 0.0) {
        return Err(FairshareError::InvalidHistoryWeight(policy.history_weight));
    }
    if u32::try_from(tenants.len()).is_err() {
        return Err(FairshareError::TooManyTenants(tenants.len()));
    }
    for (i, t) in tenants.iter().enumerate() {
        if !(t.weight.is_finite() && t.weight > 0.0) {
            return Err(FairshareError::InvalidWeight { tenant: i, weight: t.weight });
        }
        if !(t.history.is_finite() && t.history >= 0.0) {
            return Err(FairshareError::InvalidHistory { tenant: i, history: t.history });
        }
    }
    Ok(())
}

/// The tenant's next candidate after `admitted` admissions, or why there is none.
fn next_head<Q: QueueView + ?Sized>(t: &Tenant<'_, Q>, admitted: u32) -> Result<QueuedTask, Stop> {
    let head = t.queue.get(admitted as usize).ok_or(Stop::QueueEmpty)?;
    if t.running.slots.saturating_add(u64::from(admitted)) >= u64::from(t.max_concurrency) {
        return Err(Stop::MaxConcurrency);
    }
    if admitted >= t.tokens {
        return Err(Stop::NoTokens);
    }
    Ok(head)
}

/// Water-filled weighted fair shares of backlogged tenants, capped by their estimated demand.
fn fair_shares<Q: QueueView + ?Sized>(tenants: &[Tenant<'_, Q>], total: Resources) -> Vec<f64> {
    let mut out = vec![0.0; tenants.len()];
    // (index, weight, demand cap)
    let mut items: Vec<(usize, f64, f64)> = Vec::new();
    for (i, t) in tenants.iter().enumerate() {
        let Some(head) = t.queue.get(0) else { continue };
        let room = u64::from(t.max_concurrency).saturating_sub(t.running.slots);
        let startable = room.min(t.queue.len() as u64);
        let demand = t.running.saturating_add(head.request().saturating_mul(startable));
        items.push((i, t.weight, dominant_share(demand, total)));
    }
    items.sort_by(|a, b| (a.2 / a.1).total_cmp(&(b.2 / b.1)).then(a.0.cmp(&b.0)));
    let mut remaining = 1.0f64;
    let mut weight_left: f64 = items.iter().map(|it| it.1).sum();
    for (n, &(i, w, cap)) in items.iter().enumerate() {
        let proportional = remaining * w / weight_left;
        if cap <= proportional {
            out[i] = cap;
            remaining = (remaining - cap).max(0.0);
            weight_left -= w;
        } else {
            // Every later tenant also wants more than its proportion: split what is left.
            let rest: f64 = items[n..].iter().map(|it| it.1).sum();
            for &(j, wj, _) in &items[n..] {
                out[j] = remaining * wj / rest;
            }
            break;
        }
    }
    out
}

/// Per-tenant state while deciding.
struct Work {
    /// Running plus admitted so far.
    usage: Resources,
    admitted: u32,
    /// `history_weight × history`, added to the share in the key.
    hist_term: f64,
    /// The next candidate; `Some` exactly while the tenant is in the heap.
    head: Option<QueuedTask>,
    stop: Stop,
}

/// A heap entry; the heap's top is the lowest key (then history, name, index).
struct Entry<'a> {
    key: f64,
    history: f64,
    name: &'a str,
    idx: u32,
}

impl Ord for Entry<'_> {
    fn cmp(&self, other: &Self) -> Ordering {
        // Reversed: BinaryHeap is a max-heap and we want the smallest first.
        other
            .key
            .total_cmp(&self.key)
            .then_with(|| other.history.total_cmp(&self.history))
            .then_with(|| other.name.cmp(self.name))
            .then_with(|| other.idx.cmp(&self.idx))
    }
}

impl PartialOrd for Entry<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Entry<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Entry<'_> {}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GI: u64 = 1 << 30;
    /// Plenty of cpu and memory: only slots bind.
    const BIG: u64 = 1 << 40;

    fn slots(n: u64) -> Resources {
        Resources::new(BIG, BIG, n)
    }

    fn task(id: u64, cpu_millis: u64, memory_bytes: u64) -> QueuedTask {
        QueuedTask { id, cpu_millis, memory_bytes, enqueued_at_ms: 0 }
    }

    /// A tenant under test, owning its queue.
    #[derive(Clone, Debug)]
    struct Spec {
        name: String,
        weight: f64,
        max_concurrency: u32,
        tokens: u32,
        running: Resources,
        history: f64,
        queue: VecDeque<QueuedTask>,
    }

    /// `name` with weight 1, no limits and `n` one-slot tasks (1m cpu, 1 byte) with ids `base+k`.
    fn spec(name: &str, weight: f64, n: u64) -> Spec {
        let base = (name.bytes().map(u64::from).sum::<u64>()) * 1_000;
        Spec {
            name: name.to_string(),
            weight,
            max_concurrency: u32::MAX,
            tokens: u32::MAX,
            running: Resources::ZERO,
            history: 0.0,
            queue: (0..n).map(|k| task(base + k, 1, 1)).collect(),
        }
    }

    impl Spec {
        fn conc(mut self, n: u32) -> Self {
            self.max_concurrency = n;
            self
        }
        fn tokens(mut self, n: u32) -> Self {
            self.tokens = n;
            self
        }
        fn running(mut self, r: Resources) -> Self {
            self.running = r;
            self
        }
        fn history(mut self, h: f64) -> Self {
            self.history = h;
            self
        }
        /// Replaces the queue with `n` tasks of the given size.
        fn tasks(mut self, n: u64, cpu_millis: u64, memory_bytes: u64) -> Self {
            let base = self.queue.front().map_or(0, |t| t.id);
            self.queue = (0..n).map(|k| task(base + k, cpu_millis, memory_bytes)).collect();
            self
        }
        fn push_front(mut self, t: QueuedTask) -> Self {
            self.queue.push_front(t);
            self
        }
    }

    fn views(specs: &[Spec]) -> Vec<Tenant<'_, VecDeque<QueuedTask>>> {
        specs
            .iter()
            .map(|s| Tenant {
                name: &s.name,
                weight: s.weight,
                max_concurrency: s.max_concurrency,
                tokens: s.tokens,
                running: s.running,
                history: s.history,
                queue: &s.queue,
            })
            .collect()
    }

    fn run(specs: &[Spec], total: Resources, now_ms: u64, policy: &Policy) -> Result<Decision, FairshareError> {
        decide(&views(specs), total, now_ms, policy)
    }

    fn admitted(d: &Decision) -> Vec<u32> {
        d.tenants.iter().map(|t| t.admitted).collect()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    /// Table-driven cases in the manner of Armada's fairness tests.
    #[test]
    fn admission_table() {
        struct Case {
            specs: Vec<Spec>,
            total: Resources,
            policy: Policy,
            now_ms: u64,
            want_admitted: Vec<u32>,
            /// `None`: not checked; `Some(r)`: the reserved tenant must be `r`.
            want_reserved: Option<Option<usize>>,
            want_stops: Option<Vec<Stop>>,
        }
        let case = |specs: Vec<Spec>, total: Resources, want_admitted: Vec<u32>| Case {
            specs,
            total,
            policy: Policy::default(),
            now_ms: 0,
            want_admitted,
            want_reserved: None,
            want_stops: None,
        };
        // DRF paper example: 9 CPUs, 18 GiB; A's tasks <1 cpu, 4 GiB>, B's <3 cpu, 1 GiB>.
        let drf_total = Resources::new(9_000, 18 * GI, 100);
        let cases: Vec<(&str, Case)> = vec![
            (
                "balancing three queues",
                case(vec![spec("a", 1.0, 10), spec("b", 1.0, 10), spec("c", 1.0, 10)], slots(9), vec![3, 3, 3]),
            ),
            (
                "weighted 1:2:3",
                case(vec![spec("a", 1.0, 20), spec("b", 2.0, 20), spec("c", 3.0, 20)], slots(12), vec![2, 4, 6]),
            ),
            ("fractional weights", case(vec![spec("a", 0.5, 20), spec("b", 1.5, 20)], slots(8), vec![2, 6])),
            (
                "with inactive queues",
                case(vec![spec("a", 1.0, 10), spec("b", 1.0, 0), spec("c", 1.0, 10)], slots(10), vec![5, 0, 5]),
            ),
            (
                "inactive queue holding running tasks takes nothing more",
                case(
                    vec![spec("a", 1.0, 10), spec("b", 1.0, 0).running(Resources::new(0, 0, 4))],
                    Resources::new(BIG, BIG, 10),
                    vec![6, 0],
                ),
            ),
            (
                "existing usage counts towards the share",
                case(
                    vec![spec("a", 1.0, 10).running(Resources::new(4, 4, 4)), spec("b", 1.0, 10)],
                    slots(10),
                    vec![1, 5],
                ),
            ),
            (
                "max concurrency caps, the rest goes to others",
                case(vec![spec("a", 1.0, 10).conc(2), spec("b", 1.0, 10)], slots(10), vec![2, 8]),
            ),
            (
                "max concurrency counts running tasks",
                case(
                    vec![spec("a", 1.0, 10).conc(3).running(Resources::new(2, 2, 2)), spec("b", 1.0, 10)],
                    slots(10),
                    vec![1, 7],
                ),
            ),
            (
                "running above max concurrency admits nothing",
                case(vec![spec("a", 1.0, 10).conc(1).running(Resources::new(2, 2, 2))], slots(10), vec![0]),
            ),
            (
                "rate tokens cap",
                case(
                    vec![spec("a", 1.0, 10).tokens(1), spec("b", 1.0, 10).tokens(0), spec("c", 1.0, 10)],
                    slots(10),
                    vec![1, 0, 9],
                ),
            ),
            (
                "dominant resource: DRF paper example",
                Case {
                    want_reserved: Some(Some(0)),
                    ..case(
                        vec![spec("a", 1.0, 10).tasks(10, 1_000, 4 * GI), spec("b", 1.0, 10).tasks(10, 3_000, GI)],
                        drf_total,
                        vec![3, 2],
                    )
                },
            ),
            (
                "dominant resource: cpu-heavy vs memory-heavy, weighted 2:1",
                Case {
                    policy: Policy { max_admissions: 12, ..Policy::default() },
                    ..case(
                        vec![
                            spec("cpu-heavy", 2.0, 20).tasks(20, 1_000, 100),
                            spec("mem-heavy", 1.0, 20).tasks(20, 10, GI),
                        ],
                        Resources::new(12_000, 12 * GI, 1_000),
                        // Equal weighted dominant shares: cpu 8/12 ÷ 2 = memory 4/12 ÷ 1.
                        vec![8, 4],
                    )
                },
            ),
            (
                "global cpu capacity binds",
                Case {
                    // The cluster is full: the next cpu is held for the lowest key ("a", by name).
                    want_reserved: Some(Some(0)),
                    ..case(
                        vec![spec("a", 1.0, 10).tasks(10, 500, 1), spec("b", 1.0, 10).tasks(10, 500, 1)],
                        Resources::new(2_000, BIG, 100),
                        vec![2, 2],
                    )
                },
            ),
            (
                "capacity already exceeded by running tasks",
                case(vec![spec("a", 1.0, 10).running(Resources::new(0, 0, 20))], slots(10), vec![0]),
            ),
            (
                "large head reserves capacity at once",
                Case {
                    want_reserved: Some(Some(0)),
                    want_stops: Some(vec![Stop::Reserved, Stop::NoCapacity]),
                    ..case(
                        vec![
                            spec("big", 1.0, 2).tasks(2, 4_000, 1),
                            spec("small", 1.0, 10).tasks(10, 1_000, 1).running(Resources::new(2_000, 2, 2)),
                        ],
                        Resources::new(4_000, BIG, 100),
                        vec![0, 0],
                    )
                },
            ),
            (
                "reservations off: small tasks fill the gap",
                Case {
                    policy: Policy { reserve_after_ms: None, ..Policy::default() },
                    want_reserved: Some(None),
                    want_stops: Some(vec![Stop::NoCapacity, Stop::NoCapacity]),
                    ..case(
                        vec![
                            spec("big", 1.0, 2).tasks(2, 4_000, 1),
                            spec("small", 1.0, 10).tasks(10, 1_000, 1).running(Resources::new(2_000, 2, 2)),
                        ],
                        Resources::new(4_000, BIG, 100),
                        vec![0, 2],
                    )
                },
            ),
            (
                "reservation threshold not reached",
                Case {
                    policy: Policy { reserve_after_ms: Some(1_000), ..Policy::default() },
                    now_ms: 999,
                    want_reserved: Some(None),
                    ..case(
                        vec![
                            spec("big", 1.0, 2).tasks(2, 4_000, 1),
                            spec("small", 1.0, 10).tasks(10, 1_000, 1).running(Resources::new(2_000, 2, 2)),
                        ],
                        Resources::new(4_000, BIG, 100),
                        vec![0, 2],
                    )
                },
            ),
            (
                "reservation threshold reached",
                Case {
                    policy: Policy { reserve_after_ms: Some(1_000), ..Policy::default() },
                    now_ms: 1_000,
                    want_reserved: Some(Some(0)),
                    ..case(
                        vec![
                            spec("big", 1.0, 2).tasks(2, 4_000, 1),
                            spec("small", 1.0, 10).tasks(10, 1_000, 1).running(Resources::new(2_000, 2, 2)),
                        ],
                        Resources::new(4_000, BIG, 100),
                        vec![0, 0],
                    )
                },
            ),
            (
                "reservation leaves room others may use",
                Case {
                    want_reserved: Some(Some(0)),
                    ..case(
                        vec![
                            // 3 cpus held of 2 free: no cpu left for others, but a zero-cpu task fits.
                            spec("big", 1.0, 1).tasks(1, 3_000, 1),
                            spec("small", 1.0, 3).tasks(3, 0, 1).running(Resources::new(2_000, 2, 2)),
                        ],
                        Resources::new(4_000, BIG, 100),
                        vec![0, 3],
                    )
                },
            ),
            (
                "a lower-share tenant is served before the reservation",
                Case {
                    want_reserved: Some(Some(1)),
                    ..case(
                        vec![
                            spec("a", 10.0, 1).tasks(1, 1_000, 1),
                            spec("big", 1.0, 1).tasks(1, 4_000, 1).running(Resources::new(0, 0, 0)),
                            spec("c", 1.0, 5).tasks(5, 1_000, 1).running(Resources::new(1_000, 1, 1)),
                        ],
                        Resources::new(4_000, BIG, 100),
                        // a (key 0, name a) first; big (key 0) then blocks and reserves; c gets nothing.
                        vec![1, 0, 0],
                    )
                },
            ),
            (
                "head larger than total capacity: no reservation, others proceed",
                Case {
                    want_reserved: Some(None),
                    want_stops: Some(vec![Stop::TooLarge, Stop::QueueEmpty]),
                    ..case(
                        vec![spec("huge", 1.0, 1).tasks(1, 8_000, 1), spec("b", 1.0, 3).tasks(3, 1_000, 1)],
                        Resources::new(4_000, BIG, 100),
                        vec![0, 3],
                    )
                },
            ),
            (
                "admission limit",
                Case {
                    policy: Policy { max_admissions: 3, ..Policy::default() },
                    want_stops: Some(vec![Stop::AdmissionLimit, Stop::AdmissionLimit]),
                    ..case(vec![spec("a", 1.0, 10), spec("b", 1.0, 10)], slots(10), vec![2, 1])
                },
            ),
            (
                "zero admission limit",
                Case {
                    policy: Policy { max_admissions: 0, ..Policy::default() },
                    ..case(vec![spec("a", 1.0, 10)], slots(10), vec![0])
                },
            ),
            ("no tenants", case(vec![], slots(10), vec![])),
            ("only empty queues", case(vec![spec("a", 1.0, 0), spec("b", 2.0, 0)], slots(10), vec![0, 0])),
            (
                "zero max concurrency and zero tokens",
                case(vec![spec("a", 1.0, 5).conc(0), spec("b", 1.0, 5).tokens(0)], slots(10), vec![0, 0]),
            ),
        ];
        for (name, c) in cases {
            let d = run(&c.specs, c.total, c.now_ms, &c.policy).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(admitted(&d), c.want_admitted, "{name}: admitted");
            if let Some(want) = c.want_reserved {
                assert_eq!(d.reservation.map(|r| r.tenant), want, "{name}: reservation");
            }
            if let Some(stops) = c.want_stops {
                assert_eq!(d.tenants.iter().map(|t| t.stop).collect::<Vec<_>>(), stops, "{name}: stops");
            }
            check_invariants(&c.specs, c.total, &c.policy, c.now_ms, &d);
        }
    }

    #[test]
    fn bad_config_is_rejected() {
        let ok = vec![spec("a", 1.0, 1)];
        let p = Policy::default();
        assert_eq!(run(&ok, Resources::new(0, 1, 1), 0, &p), Err(FairshareError::ZeroCapacity(Resource::Cpu)));
        assert_eq!(run(&ok, Resources::new(1, 0, 1), 0, &p), Err(FairshareError::ZeroCapacity(Resource::Memory)));
        assert_eq!(run(&ok, Resources::new(1, 1, 0), 0, &p), Err(FairshareError::ZeroCapacity(Resource::Slots)));
        // Zero capacity is refused even without tenants: it is a configuration error.
        assert!(run(&[], Resources::ZERO, 0, &p).is_err());
        for w in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let specs = vec![spec("a", 1.0, 1), spec("b", w, 0)];
            match run(&specs, slots(1), 0, &p) {
                Err(FairshareError::InvalidWeight { tenant: 1, .. }) => {}
                other => panic!("weight {w}: {other:?}"),
            }
        }
        for h in [-0.5, f64::NAN] {
            let specs = vec![spec("a", 1.0, 1).history(h)];
            assert!(matches!(run(&specs, slots(1), 0, &p), Err(FairshareError::InvalidHistory { tenant: 0, .. })));
        }
        let bad = Policy { history_weight: -1.0, ..p };
        assert!(matches!(run(&ok, slots(1), 0, &bad), Err(FairshareError::InvalidHistoryWeight(_))));
        // Errors print something a person can act on.
        let msg = run(&[spec("a", 0.0, 1)], slots(1), 0, &p).unwrap_err().to_string();
        assert!(msg.contains("weight"), "{msg}");
    }

    #[test]
    fn fifo_within_tenant() {
        // The caller orders by priority desc then submit order; the core keeps that order.
        let a = Spec { queue: [30, 10, 20, 1, 2].map(|id| task(id, 1, 1)).into_iter().collect(), ..spec("a", 1.0, 0) };
        let d = run(&[a], slots(4), 0, &Policy::default()).unwrap();
        let ids: Vec<u64> = d.admissions.iter().map(|x| x.task_id).collect();
        assert_eq!(ids, vec![30, 10, 20, 1]);
    }

    #[test]
    fn fifo_head_blocks_its_own_tenant() {
        // A large head is not skipped in favour of the same tenant's smaller tasks.
        let a =
            spec("a", 1.0, 0).tasks(3, 1_000, 1).push_front(task(99, 3_000, 1)).running(Resources::new(2_000, 2, 2));
        let d = run(&[a], Resources::new(4_000, BIG, 10), 0, &Policy { reserve_after_ms: None, ..Policy::default() })
            .unwrap();
        assert!(d.admissions.is_empty());
        assert_eq!(d.tenants[0].stop, Stop::NoCapacity);
    }

    #[test]
    fn deterministic_ties() {
        // Equal keys: lower history first, then lower name, regardless of input order.
        let specs = vec![spec("b", 1.0, 3), spec("a", 1.0, 3), spec("c", 1.0, 3)];
        let d = run(&specs, slots(1), 0, &Policy::default()).unwrap();
        assert_eq!(d.admissions, vec![Admission { tenant: 1, task_id: specs[1].queue[0].id }]);

        let specs = vec![spec("a", 1.0, 3).history(0.2), spec("b", 1.0, 3).history(0.1)];
        let no_hist_weight = Policy { history_weight: 0.0, ..Policy::default() };
        let d = run(&specs, slots(1), 0, &no_hist_weight).unwrap();
        assert_eq!(d.admissions[0].tenant, 1, "lower history wins a tie");

        // Same names: the input index decides.
        let specs = vec![spec("x", 1.0, 3), spec("x", 1.0, 3)];
        let d = run(&specs, slots(1), 0, &Policy::default()).unwrap();
        assert_eq!(d.admissions[0].tenant, 0);

        // Running twice gives the same decision.
        let specs = vec![spec("a", 1.0, 7), spec("b", 2.0, 9).history(0.3), spec("c", 3.0, 2)];
        let p = Policy::default();
        assert_eq!(run(&specs, slots(11), 0, &p).unwrap(), run(&specs, slots(11), 0, &p).unwrap());
    }

    #[test]
    fn history_damps_a_tenant_that_just_used_a_lot() {
        // Both idle now; "a" used half the cluster recently, so "b" goes first.
        let specs = vec![spec("a", 1.0, 5).history(0.5), spec("b", 1.0, 5)];
        let d = run(&specs, slots(3), 0, &Policy::default()).unwrap();
        assert_eq!(d.admissions.iter().map(|a| a.tenant).collect::<Vec<_>>(), vec![1, 0, 1]);
    }

    #[test]
    fn fair_and_actual_shares() {
        let specs = vec![spec("a", 1.0, 20), spec("b", 3.0, 20), spec("idle", 5.0, 0)];
        let d = run(&specs, slots(8), 0, &Policy::default()).unwrap();
        assert_eq!(admitted(&d), vec![2, 6, 0]);
        assert!(close(d.tenants[0].fair_share, 0.25) && close(d.tenants[1].fair_share, 0.75));
        assert_eq!(d.tenants[2].fair_share, 0.0);
        assert!(!d.tenants[2].backlogged);
        assert!(close(d.tenants[0].actual_share, 0.25) && close(d.tenants[1].actual_share, 0.75));
        assert!(close(d.fairness_index(), 1.0));

        // Capped by demand: "a" can run 1 task (10% of 10 slots); b and c split the rest 1:1.
        let specs = vec![spec("a", 2.0, 20).conc(1), spec("b", 1.0, 20), spec("c", 1.0, 20)];
        let d = run(&specs, slots(10), 0, &Policy::default()).unwrap();
        let fair: Vec<f64> = d.tenants.iter().map(|t| t.fair_share).collect();
        assert!(close(fair[0], 0.1) && close(fair[1], 0.45) && close(fair[2], 0.45), "{fair:?}");
        assert!(close(fair.iter().sum::<f64>(), 1.0));

        // Demand of everyone below the whole: each gets its demand.
        let specs = vec![spec("a", 1.0, 2), spec("b", 1.0, 3)];
        let d = run(&specs, slots(10), 0, &Policy::default()).unwrap();
        assert!(close(d.tenants[0].fair_share, 0.2) && close(d.tenants[1].fair_share, 0.3));
    }

    #[test]
    fn jain_index_values() {
        assert!(close(jain_index(&[]), 1.0));
        assert!(close(jain_index(&[0.0, 0.0]), 1.0));
        assert!(close(jain_index(&[2.0, 2.0, 2.0]), 1.0));
        assert!(close(jain_index(&[1.0, 0.0, 0.0, 0.0]), 0.25));
        assert!(close(jain_index(&[1.0, 3.0]), 16.0 / 20.0));
        assert!(close(jain_index(&[1.0, f64::NAN, 1.0, f64::INFINITY]), 1.0));
    }

    #[test]
    fn decay_values() {
        let hl = Duration::from_secs(60);
        assert!(close(decay(8.0, Duration::ZERO, hl), 8.0));
        assert!(close(decay(8.0, hl, hl), 4.0));
        assert!(close(decay(8.0, hl * 3, hl), 1.0));
        assert!(close(decay(8.0, Duration::from_secs(30), hl), 8.0 / 2f64.sqrt()));
        assert_eq!(decay(8.0, Duration::from_millis(1), Duration::ZERO), 0.0);
        assert_eq!(decay(8.0, Duration::ZERO, Duration::ZERO), 8.0);
        assert_eq!(decay(f64::NAN, hl, hl), 0.0);
        assert_eq!(decay(1.0, Duration::MAX, Duration::from_nanos(1)), 0.0);

        assert!(close(update_history(0.0, 1.0, hl, hl), 0.5));
        assert!(close(update_history(1.0, 0.0, hl, hl), 0.5));
        assert!(close(update_history(0.3, 0.3, hl, hl), 0.3));
        assert!(close(update_history(0.2, 0.6, Duration::ZERO, hl), 0.2));
        assert_eq!(update_history(f64::NAN, -1.0, hl, hl), 0.0);
    }

    /// The code of the module-level example, compiled and run.
    #[test]
    fn caller_example() {
        struct TenantState {
            name: String,
            weight: f64,
            max_concurrency: u32,
            tokens: u32,
            running: Resources,
            history: f64,
            queue: VecDeque<QueuedTask>,
        }
        impl TenantState {
            fn tokens_available(&self, _now_ms: u64) -> u32 {
                self.tokens
            }
        }
        let mut state: Vec<TenantState> = ["acme", "globex"]
            .iter()
            .enumerate()
            .map(|(i, n)| TenantState {
                name: n.to_string(),
                weight: (i + 1) as f64,
                max_concurrency: 8,
                tokens: 50,
                running: Resources::ZERO,
                history: 0.0,
                queue: (0..10).map(|k| task(i as u64 * 100 + k, 500, 256 << 20)).collect(),
            })
            .collect();
        let (capacity, now_ms) = (Resources::new(4_000, 8 * GI, 6), 0);

        let views: Vec<Tenant<'_, VecDeque<QueuedTask>>> = state
            .iter()
            .map(|s| Tenant {
                name: &s.name,
                weight: s.weight,
                max_concurrency: s.max_concurrency,
                tokens: s.tokens_available(now_ms),
                running: s.running,
                history: s.history,
                queue: &s.queue,
            })
            .collect();
        let decision = decide(&views, capacity, now_ms, &Policy::default()).unwrap();
        drop(views);
        for a in &decision.admissions {
            let task = state[a.tenant].queue.pop_front().expect("admitted tasks are the queue's prefix");
            assert_eq!(task.id, a.task_id);
            state[a.tenant].running = state[a.tenant].running.saturating_add(task.request());
            state[a.tenant].tokens -= 1;
        }
        assert_eq!(admitted(&decision), vec![2, 4]);
        assert_eq!(state[1].running, Resources::new(2_000, 4 * (256 << 20), 4));
    }

    #[test]
    fn mixed_queue_types_through_dyn() {
        let a: Vec<QueuedTask> = vec![task(1, 1, 1)];
        let b: VecDeque<QueuedTask> = [task(2, 1, 1)].into_iter().collect();
        let c: &[QueuedTask] = &[task(3, 1, 1)];
        fn mk<'a>(name: &'a str, queue: &'a dyn QueueView) -> Tenant<'a, dyn QueueView + 'a> {
            Tenant { name, weight: 1.0, max_concurrency: 9, tokens: 9, running: Resources::ZERO, history: 0.0, queue }
        }
        let tenants = [mk("a", &a), mk("b", &b), mk("c", &c)];
        let d = decide(&tenants, slots(10), 0, &Policy::default()).unwrap();
        assert_eq!(d.admissions.len(), 3);
        assert!(format!("{:?}", tenants[0]).contains("queued: 1"));
    }

    // ---- simulation ------------------------------------------------------------------------

    /// A deterministic discrete-time model of the scheduler around `decide`.
    struct Sim {
        specs: Vec<Spec>,
        total: Resources,
        policy: Policy,
        tick_ms: u64,
        now_ms: u64,
        /// (finish time, tenant, resources)
        running: Vec<(u64, usize, Resources)>,
    }

    impl Sim {
        fn new(specs: Vec<Spec>, total: Resources, policy: Policy) -> Self {
            Sim { specs, total, policy, tick_ms: 1_000, now_ms: 0, running: Vec::new() }
        }

        /// Advances one tick: finishes due tasks, updates history, decides, starts the admitted
        /// tasks for `duration(tenant)` ticks.
        fn step(&mut self, duration: impl Fn(usize) -> u64) -> Decision {
            self.now_ms += self.tick_ms;
            let now = self.now_ms;
            let specs = &mut self.specs;
            self.running.retain(|&(finish, t, r)| {
                if finish <= now {
                    specs[t].running = specs[t].running.saturating_sub(r);
                }
                finish > now
            });
            for s in specs.iter_mut() {
                let share = dominant_share(s.running, self.total);
                s.history = update_history(s.history, share, Duration::from_millis(self.tick_ms), DEFAULT_HALF_LIFE);
            }
            let d = run(specs, self.total, now, &self.policy).expect("valid simulation");
            check_invariants(specs, self.total, &self.policy, now, &d);
            for a in &d.admissions {
                let t = specs[a.tenant].queue.pop_front().unwrap();
                assert_eq!(t.id, a.task_id);
                specs[a.tenant].running = specs[a.tenant].running.saturating_add(t.request());
                specs[a.tenant].tokens = specs[a.tenant].tokens.saturating_sub(1);
                self.running.push((now + duration(a.tenant) * self.tick_ms, a.tenant, t.request()));
            }
            d
        }
    }

    #[test]
    fn jain_index_in_steady_state_weights_1_to_10_on_50_slots() {
        let specs: Vec<Spec> = (1..=10).map(|w| spec(&format!("t{w:02}"), w as f64, 5_000)).collect();
        let weights: Vec<f64> = specs.iter().map(|s| s.weight).collect();
        let wsum: f64 = weights.iter().sum();
        let mut sim = Sim::new(specs, slots(50), Policy::default());
        let (window, windows, duration) = (100, 20, 10);
        let mut indices = Vec::new();
        for _ in 0..windows {
            let mut slot_ticks = [0u64; 10];
            for _ in 0..window {
                let d = sim.step(|_| duration);
                assert!(d.tenants.iter().all(|t| t.backlogged));
                for (i, s) in sim.specs.iter().enumerate() {
                    slot_ticks[i] += s.running.slots;
                }
            }
            let ratios: Vec<f64> =
                (0..10).map(|i| (slot_ticks[i] as f64 / (window as f64 * 50.0)) / (weights[i] / wsum)).collect();
            indices.push(jain_index(&ratios));
        }
        eprintln!("Jain index per window: {indices:?}");
        // Everything is busy from the first tick; skip one window of warm-up anyway.
        for (n, j) in indices.iter().enumerate().skip(1) {
            assert!(*j >= 0.98, "window {n}: Jain index {j:.4} ({indices:?})");
        }
        // The per-decision index the scheduler exports agrees.
        let d = sim.step(|_| duration);
        assert!(d.fairness_index() >= 0.98, "{}", d.fairness_index());
        assert!(d.tenants.iter().zip(&weights).all(|(t, w)| close(t.fair_share, w / wsum)));
    }

    /// Multi-round: a 4-cpu task behind a stream of 1-cpu tasks from other tenants, on 4 cpus,
    /// where one small task finishes every tick (so only 1 cpu is ever free).
    fn starvation_sim(policy: Policy, ticks: u64) -> Option<u64> {
        let total = Resources::new(4_000, BIG, 100);
        let specs = vec![
            spec("big", 1.0, 1).tasks(1, 4_000, 1),
            spec("s1", 1.0, 1_000).tasks(1_000, 1_000, 1),
            spec("s2", 1.0, 1_000).tasks(1_000, 1_000, 1),
        ];
        let mut sim = Sim::new(specs, total, policy);
        // Four small tasks already running, finishing at ticks 1, 2, 3, 4.
        for k in 0..4u64 {
            let t = 1 + (k % 2) as usize;
            let r = Resources::new(1_000, 1, 1);
            sim.specs[t].running = sim.specs[t].running.saturating_add(r);
            sim.running.push(((k + 1) * sim.tick_ms, t, r));
        }
        for tick in 1..=ticks {
            let d = sim.step(|_| 4);
            if d.admissions.iter().any(|a| a.tenant == 0) {
                return Some(tick);
            }
        }
        None
    }

    #[test]
    fn reservation_prevents_starvation_of_a_large_task() {
        let off = Policy { reserve_after_ms: None, ..Policy::default() };
        assert_eq!(starvation_sim(off, 200), None, "without reservation the big task starves");
        // At once: drains in at most the small tasks' duration.
        let at_once = starvation_sim(Policy::default(), 200).expect("admitted");
        assert!(at_once <= 4, "admitted at tick {at_once}");
        // After 5 s of waiting (ticks are 1 s): small tasks flow until then, then it drains.
        let after = Policy { reserve_after_ms: Some(5_000), ..Policy::default() };
        let t = starvation_sim(after, 200).expect("admitted");
        assert!(t > 4 && t <= 5 + 4, "admitted at tick {t}");
    }

    // ---- properties ------------------------------------------------------------------------

    /// Checks every promise of `decide` against its input; used by the table, the simulations
    /// and the property tests.
    fn check_invariants(specs: &[Spec], total: Resources, policy: &Policy, now_ms: u64, d: &Decision) {
        assert_eq!(d.tenants.len(), specs.len());
        assert!(d.admissions.len() <= policy.max_admissions);
        let used = specs.iter().fold(Resources::ZERO, |acc, s| acc.saturating_add(s.running));
        let free0 = total.saturating_sub(used);

        // Admissions per tenant are a prefix of its queue, in order.
        let mut counts = vec![0u32; specs.len()];
        let mut taken = Resources::ZERO;
        for a in &d.admissions {
            let s = &specs[a.tenant];
            let t = s.queue[counts[a.tenant] as usize];
            assert_eq!(t.id, a.task_id, "not the queue's prefix");
            counts[a.tenant] += 1;
            taken = taken.saturating_add(t.request());
        }
        assert_eq!(counts, admitted(d));
        // Capacity in every dimension.
        assert!(taken.fits_in(free0), "took {taken:?} of free {free0:?}");
        assert_eq!(d.free, free0.saturating_sub(taken));

        for (i, (s, o)) in specs.iter().zip(&d.tenants).enumerate() {
            // Tokens and concurrency.
            assert!(o.admitted <= s.tokens, "tenant {i}: tokens");
            if o.admitted > 0 {
                assert!(
                    s.running.slots.saturating_add(u64::from(o.admitted)) <= u64::from(s.max_concurrency),
                    "tenant {i}: concurrency"
                );
            }
            assert_eq!(o.backlogged, !s.queue.is_empty());
            if !o.backlogged {
                assert_eq!(o.fair_share, 0.0);
            }
            assert!(o.fair_share.is_finite() && o.actual_share.is_finite());
        }
        let fair_sum: f64 = d.tenants.iter().map(|t| t.fair_share).sum();
        assert!(fair_sum <= 1.0 + 1e-9, "fair shares sum to {fair_sum}");

        // The reservation is for a head that does not fit in free, fits in total, waited enough.
        let reserved = match d.reservation {
            Some(r) => {
                let s = &specs[r.tenant];
                let head = s.queue[d.tenants[r.tenant].admitted as usize];
                assert_eq!(head.id, r.task_id);
                assert_eq!(head.request(), r.request);
                assert!(!r.request.fits_in(d.free) && r.request.fits_in(total));
                let after = policy.reserve_after_ms.expect("reservation while reservations are off");
                assert!(now_ms.saturating_sub(head.enqueued_at_ms) >= after);
                assert_eq!(d.tenants[r.tenant].stop, Stop::Reserved);
                r.request
            }
            None => Resources::ZERO,
        };

        // Work conserving modulo the reservation (see the module docs for the exact statement).
        if d.admissions.len() < policy.max_admissions {
            for (i, (s, o)) in specs.iter().zip(&d.tenants).enumerate() {
                let n = o.admitted;
                let Some(head) = s.queue.get(n as usize) else {
                    continue;
                };
                let eligible =
                    s.running.slots.saturating_add(u64::from(n)) < u64::from(s.max_concurrency) && n < s.tokens;
                if !eligible || !head.request().fits_in(total) {
                    continue;
                }
                let room =
                    if d.reservation.map(|r| r.tenant) == Some(i) { d.free } else { d.free.saturating_sub(reserved) };
                assert!(!head.request().fits_in(room), "tenant {i}: head {head:?} fits in {room:?} but was left idle");
            }
        }
    }

    fn arb_spec(k: usize) -> impl Strategy<Value = Spec> {
        (
            prop_oneof![Just(1.0), Just(2.0), 0.1f64..10.0],
            prop_oneof![Just(u32::MAX), 0u32..10],
            prop_oneof![Just(u32::MAX), 0u32..10],
            prop_oneof![Just((0, 0, 0)), (0u64..2_000, 0u64..2_000, 0u64..4)],
            prop_oneof![Just(0.0), 0.0f64..1.0],
            prop::collection::vec((0u64..2_500, 0u64..2_500, 0u64..3), 0..10),
        )
            .prop_map(move |(weight, max_concurrency, tokens, (c, m, n), history, tasks)| Spec {
                name: format!("t{k}"),
                weight,
                max_concurrency,
                tokens,
                running: Resources::new(c, m, n),
                history,
                queue: tasks
                    .into_iter()
                    .enumerate()
                    .map(|(j, (cpu, mem, age))| QueuedTask {
                        id: (k * 100 + j) as u64,
                        cpu_millis: cpu,
                        memory_bytes: mem,
                        enqueued_at_ms: 10_000 - age * 1_000,
                    })
                    .collect(),
            })
    }

    fn arb_input() -> impl Strategy<Value = (Vec<Spec>, Resources, Policy)> {
        (
            (0usize..7).prop_flat_map(|n| (0..n).map(arb_spec).collect::<Vec<_>>()),
            (1u64..16_000, 1u64..16_000, 1u64..30),
            prop_oneof![Just(None), Just(Some(0)), Just(Some(1_000)), Just(Some(5_000))],
            prop_oneof![Just(usize::MAX), 0usize..6],
            prop_oneof![Just(0.0), Just(DEFAULT_HISTORY_WEIGHT), 0.0f64..2.0],
        )
            .prop_map(|(specs, (c, m, s), reserve_after_ms, max_admissions, history_weight)| {
                (specs, Resources::new(c, m, s), Policy { reserve_after_ms, history_weight, max_admissions })
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        /// Limits, capacity, prefix order, work conservation modulo the reservation.
        #[test]
        fn decide_keeps_its_promises((specs, total, policy) in arb_input()) {
            let d = run(&specs, total, 10_000, &policy).unwrap();
            check_invariants(&specs, total, &policy, 10_000, &d);
        }

        /// The decision does not depend on the order tenants are passed in (names are unique).
        #[test]
        fn decide_ignores_input_order((specs, total, policy) in arb_input(), seed in any::<u64>()) {
            let d = run(&specs, total, 10_000, &policy).unwrap();
            let mut order: Vec<usize> = (0..specs.len()).collect();
            // A deterministic shuffle from the seed.
            let mut x = seed | 1;
            for i in (1..order.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                order.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let shuffled: Vec<Spec> = order.iter().map(|&i| specs[i].clone()).collect();
            let e = run(&shuffled, total, 10_000, &policy).unwrap();
            let back: Vec<Admission> = e.admissions.iter().map(|a| Admission { tenant: order[a.tenant], ..*a }).collect();
            prop_assert_eq!(back, d.admissions);
            prop_assert_eq!(e.reservation.map(|r| order[r.tenant]), d.reservation.map(|r| r.tenant));
        }

        /// Any weight, history or capacity: an answer or an error, never a panic.
        #[test]
        fn decide_never_panics(
            weight in prop_oneof![any::<f64>(), Just(0.0), Just(f64::NAN)],
            history in prop_oneof![any::<f64>(), Just(0.0)],
            cpu in any::<u64>(), mem in any::<u64>(), n in 0u64..3,
            running in (any::<u64>(), any::<u64>(), any::<u64>()),
            task_size in (any::<u64>(), any::<u64>()),
            conc in any::<u32>(), tokens in any::<u32>(),
            now in any::<u64>(), queued_at in any::<u64>(),
        ) {
            let s = Spec {
                name: "t".into(), weight, max_concurrency: conc, tokens,
                running: Resources::new(running.0, running.1, running.2), history,
                queue: (0..3).map(|id| QueuedTask { id, cpu_millis: task_size.0, memory_bytes: task_size.1, enqueued_at_ms: queued_at }).collect(),
            };
            let specs = vec![s.clone(), Spec { name: "u".into(), weight: 1.0, history: 0.0, ..s }];
            let total = Resources::new(cpu, mem, n);
            let p = Policy::default();
            if let Ok(d) = run(&specs, total, now, &p) {
                check_invariants(&specs, total, &p, now, &d);
            }
        }

        #[test]
        fn jain_index_is_between_1_over_n_and_1(xs in prop::collection::vec(0.0f64..1e6, 1..50)) {
            let j = jain_index(&xs);
            prop_assert!(j <= 1.0 + 1e-12);
            if xs.iter().any(|&x| x > 0.0) {
                prop_assert!(j >= 1.0 / xs.len() as f64 - 1e-12);
            }
        }
    }
}
