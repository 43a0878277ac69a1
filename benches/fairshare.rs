//! Admission throughput of the fair-share core, and the Jain's index simulation.
//!
//! `cargo bench --bench fairshare -- --warm-up-time 1 --measurement-time 3`

use std::collections::VecDeque;
use std::hint::black_box;
use std::time::Duration;

use agenttask::domain::fairshare::{
    decide, dominant_share, jain_index, update_history, Policy, QueuedTask, Resources, Tenant, DEFAULT_HALF_LIFE,
};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const TENANTS: usize = 1_000;
const TASKS_PER_TENANT: u64 = 1_000;
const DECISIONS: u64 = 10_000;

struct State {
    name: String,
    weight: f64,
    running: Resources,
    queue: VecDeque<QueuedTask>,
}

/// 1,000 tenants with 1,000 queued tasks each (1,000,000 in all); `mixed` varies weights and
/// task sizes, otherwise every tenant and task is alike (all keys tie: the worst case for the
/// heap's tie-breaking).
fn population(mixed: bool) -> Vec<State> {
    (0..TENANTS)
        .map(|i| State {
            name: format!("tenant-{i:04}"),
            weight: if mixed { (i % 10 + 1) as f64 } else { 1.0 },
            running: if mixed {
                Resources::new((i as u64 % 7) * 500, (i as u64 % 5) << 28, i as u64 % 4)
            } else {
                Resources::ZERO
            },
            queue: (0..TASKS_PER_TENANT)
                .map(|k| QueuedTask {
                    id: i as u64 * TASKS_PER_TENANT + k,
                    cpu_millis: if mixed { 250 * (1 + (k + i as u64) % 8) } else { 500 },
                    memory_bytes: if mixed { (64 << 20) * (1 + (k * 7 + i as u64) % 16) } else { 256 << 20 },
                    enqueued_at_ms: 0,
                })
                .collect(),
        })
        .collect()
}

fn views(state: &[State]) -> Vec<Tenant<'_, VecDeque<QueuedTask>>> {
    state
        .iter()
        .map(|s| Tenant {
            name: &s.name,
            weight: s.weight,
            max_concurrency: u32::MAX,
            tokens: u32::MAX,
            running: s.running,
            history: 0.0,
            queue: &s.queue,
        })
        .collect()
}

fn admission_throughput(c: &mut Criterion) {
    let mut group = c.benchmark_group("admission");
    group.throughput(Throughput::Elements(DECISIONS));
    for (label, mixed) in [("uniform", false), ("mixed", true)] {
        let state = population(mixed);
        let tenants = views(&state);
        // Plenty of cpu and memory; exactly DECISIONS more slots than are in use.
        let used: u64 = state.iter().map(|s| s.running.slots).sum();
        let total = Resources::new(u64::MAX / 2, u64::MAX / 2, used + DECISIONS);
        let policy = Policy::default();
        let d = decide(&tenants, total, 0, &policy).unwrap();
        assert_eq!(d.admissions.len() as u64, DECISIONS);
        group.bench_function(format!("{label}/1000_tenants_1M_queued_10k_decisions"), |b| {
            b.iter(|| decide(black_box(&tenants), black_box(total), 0, &policy).unwrap())
        });
        // The same, bounded by max_admissions instead of by capacity.
        let bounded = Policy { max_admissions: DECISIONS as usize, ..Policy::default() };
        let roomy = Resources::new(u64::MAX / 2, u64::MAX / 2, u64::MAX / 2);
        group.bench_function(format!("{label}/1000_tenants_1M_queued_10k_decisions_max_admissions"), |b| {
            b.iter(|| decide(black_box(&tenants), black_box(roomy), 0, &bounded).unwrap())
        });
    }
    group.finish();

    // The fixed cost of one call (validation, heap build, fair shares over 1,000 tenants),
    // paid once per round however few tasks it admits.
    let state = population(true);
    let tenants = views(&state);
    let one = Policy { max_admissions: 1, ..Policy::default() };
    let roomy = Resources::new(u64::MAX / 2, u64::MAX / 2, u64::MAX / 2);
    c.bench_function("per_call_overhead/1000_tenants_1M_queued_1_decision", |b| {
        b.iter(|| decide(black_box(&tenants), black_box(roomy), 0, &one).unwrap())
    });
}

/// 10 always-backlogged tenants with weights 1..=10 on 50 slots, one-slot tasks lasting 10 ticks;
/// returns the mean Jain's index of actual ÷ fair share over 100-tick windows after the first.
fn jain_simulation() -> f64 {
    let total = Resources::new(1 << 40, 1 << 40, 50);
    let mut state: Vec<(State, f64)> = (1..=10u64)
        .map(|w| {
            let s = State {
                name: format!("t{w:02}"),
                weight: w as f64,
                running: Resources::ZERO,
                queue: (0..5_000)
                    .map(|k| QueuedTask { id: w * 10_000 + k, cpu_millis: 1, memory_bytes: 1, enqueued_at_ms: 0 })
                    .collect(),
            };
            (s, 0.0)
        })
        .collect();
    let wsum: f64 = (1..=10).sum::<u64>() as f64;
    let mut finishing: VecDeque<Vec<(usize, Resources)>> = (0..10).map(|_| Vec::new()).collect();
    let (window, windows) = (100u64, 20u64);
    let mut indices = Vec::new();
    for _ in 0..windows {
        let mut slot_ticks = [0u64; 10];
        for tick in 0..window {
            for (t, r) in finishing.pop_front().unwrap() {
                state[t].0.running = state[t].0.running.saturating_sub(r);
            }
            finishing.push_back(Vec::new());
            for (s, h) in state.iter_mut() {
                *h = update_history(*h, dominant_share(s.running, total), Duration::from_secs(1), DEFAULT_HALF_LIFE);
            }
            let tenants: Vec<Tenant<'_, VecDeque<QueuedTask>>> = state
                .iter()
                .map(|(s, h)| Tenant {
                    name: &s.name,
                    weight: s.weight,
                    max_concurrency: u32::MAX,
                    tokens: u32::MAX,
                    running: s.running,
                    history: *h,
                    queue: &s.queue,
                })
                .collect();
            let d = decide(&tenants, total, tick * 1_000, &Policy::default()).unwrap();
            drop(tenants);
            for a in &d.admissions {
                let task = state[a.tenant].0.queue.pop_front().unwrap();
                state[a.tenant].0.running = state[a.tenant].0.running.saturating_add(task.request());
                finishing[9].push((a.tenant, task.request()));
            }
            for (i, (s, _)) in state.iter().enumerate() {
                slot_ticks[i] += s.running.slots;
            }
        }
        let ratios: Vec<f64> =
            (0..10).map(|i| (slot_ticks[i] as f64 / (window as f64 * 50.0)) / ((i + 1) as f64 / wsum)).collect();
        indices.push(jain_index(&ratios));
    }
    let steady = &indices[1..];
    steady.iter().sum::<f64>() / steady.len() as f64
}

fn fairness_simulation(c: &mut Criterion) {
    let index = jain_simulation();
    println!("jain_index(weights 1..=10, 50 slots, 100-tick windows, steady state) = {index:.4}");
    c.bench_function("jain_simulation/weights_1_to_10_50_slots_2000_ticks", |b| b.iter(jain_simulation));
}

criterion_group!(benches, admission_throughput, fairness_simulation);
criterion_main!(benches);
