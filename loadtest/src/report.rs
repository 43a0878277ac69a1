//! What a run measured, shaped for people (a table), programs (JSON, CSV) and the chart: the
//! throughput, latency and admission-wait percentiles, each tenant's share, and Jain's fairness
//! index for every window. Pure: it sees samples, never a connection.
//!
//! Times are seconds from the run's start on the wall clock. `admitted_s` comes from the
//! service's own `admitted_at`, so the service and the generator must share a clock: the
//! generator only talks to a loopback broker, and so to a service on the same machine.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

/// One finished task as the generator saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub tenant: usize,
    pub published_s: f64,
    /// Publish to result, on the generator's monotonic clock.
    pub latency_ms: f64,
    pub phase: String,
    pub admitted_s: Option<f64>,
    /// Submitted to admitted, as the service measured it.
    pub admission_wait_ms: Option<f64>,
    /// Whether the task's body should have ended `Succeeded`, and whether it did not.
    pub unexpected: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles; `None` without values.
    pub fn of(mut values: Vec<f64>) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let at = |p: f64| values[((p * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1];
        Some(Percentiles { count: values.len(), p50: at(0.50), p95: at(0.95), p99: at(0.99), max: at(1.0) })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TenantShare {
    pub tenant: String,
    pub weight: u32,
    pub published: usize,
    pub admitted: usize,
    /// Of all admissions in the run.
    pub share: f64,
    /// What weighted fair sharing gives it while every tenant that published is backlogged.
    pub fair_share: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Window {
    pub start_s: f64,
    /// Admissions in this window, by tenant name (tenants with none are left out).
    pub admitted: BTreeMap<String, usize>,
    /// Tenants with a task waiting from before the window until after it.
    pub backlogged: usize,
    #[serde(skip)]
    pub backlogged_tenants: Vec<usize>,
    /// Jain's index of the backlogged tenants' weight-normalised admissions; `None` with fewer
    /// than two backlogged tenants or no admission at all.
    pub jain: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fairness {
    pub window_seconds: f64,
    /// Windows with a Jain's index.
    pub windows_measured: usize,
    pub min: Option<f64>,
    pub mean: Option<f64>,
    /// Share of measured windows at or above 0.98.
    pub at_least_0_98: Option<f64>,
    /// Jain's index over the whole run: each tenant's admissions per second of being
    /// backlogged, per unit of weight. Per-window figures need many admissions per tenant and
    /// window to mean much; this one does not.
    pub whole_run: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub tasks: usize,
    pub seconds: f64,
    pub tasks_per_second: f64,
    pub phases: BTreeMap<String, usize>,
    /// Tasks whose body should have succeeded but did not, and the opposite.
    pub unexpected: usize,
    pub latency_ms: Option<Percentiles>,
    pub admission_wait_ms: Option<Percentiles>,
    pub tenants: Vec<TenantShare>,
    pub fairness: Fairness,
    pub windows: Vec<Window>,
}

/// Jain's fairness index: 1 when all are equal, 1/n when one gets everything.
pub fn jain(xs: &[f64]) -> Option<f64> {
    let sum: f64 = xs.iter().sum();
    let squares: f64 = xs.iter().map(|x| x * x).sum();
    (xs.len() >= 2 && squares > 0.0).then(|| sum * sum / (xs.len() as f64 * squares))
}

/// Builds the report. `tenants` are (name, weight) in plan order; `seconds` is the run's length.
pub fn build(samples: &[Sample], tenants: &[(String, u32)], seconds: f64, window_seconds: f64) -> Report {
    let mut phases = BTreeMap::new();
    for s in samples {
        *phases.entry(s.phase.clone()).or_insert(0) += 1;
    }
    let mut published = vec![0usize; tenants.len()];
    let mut admitted = vec![0usize; tenants.len()];
    for s in samples {
        published[s.tenant] += 1;
        admitted[s.tenant] += usize::from(s.admitted_s.is_some());
    }
    let total_admitted: usize = admitted.iter().sum();
    let active_weight: f64 =
        tenants.iter().zip(&published).filter(|(_, &p)| p > 0).map(|((_, w), _)| f64::from(*w)).sum();
    let shares = tenants
        .iter()
        .enumerate()
        .filter(|(i, _)| published[*i] > 0)
        .map(|(i, (name, weight))| TenantShare {
            tenant: name.clone(),
            weight: *weight,
            published: published[i],
            admitted: admitted[i],
            share: if total_admitted == 0 { 0.0 } else { admitted[i] as f64 / total_admitted as f64 },
            fair_share: f64::from(*weight) / active_weight,
        })
        .collect();
    let windows = windows(samples, tenants, window_seconds);
    let measured: Vec<f64> = windows.iter().filter_map(|w| w.jain).collect();
    let whole_run = {
        let (mut admitted_backlogged, mut backlogged_windows) =
            (vec![0usize; tenants.len()], vec![0usize; tenants.len()]);
        for w in &windows {
            for &t in &w.backlogged_tenants {
                backlogged_windows[t] += 1;
                admitted_backlogged[t] += w.admitted.get(&tenants[t].0).copied().unwrap_or(0);
            }
        }
        let xs: Vec<f64> = (0..tenants.len())
            .filter(|&t| backlogged_windows[t] > 0)
            .map(|t| admitted_backlogged[t] as f64 / (backlogged_windows[t] as f64 * f64::from(tenants[t].1.max(1))))
            .collect();
        jain(&xs)
    };
    let fairness = Fairness {
        window_seconds,
        windows_measured: measured.len(),
        min: measured.iter().copied().reduce(f64::min),
        mean: (!measured.is_empty()).then(|| measured.iter().sum::<f64>() / measured.len() as f64),
        at_least_0_98: (!measured.is_empty())
            .then(|| measured.iter().filter(|&&j| j >= 0.98).count() as f64 / measured.len() as f64),
        whole_run,
    };
    Report {
        tasks: samples.len(),
        seconds,
        tasks_per_second: if seconds > 0.0 { samples.len() as f64 / seconds } else { 0.0 },
        phases,
        unexpected: samples.iter().filter(|s| s.unexpected).count(),
        latency_ms: Percentiles::of(samples.iter().map(|s| s.latency_ms).collect()),
        admission_wait_ms: Percentiles::of(samples.iter().filter_map(|s| s.admission_wait_ms).collect()),
        tenants: shares,
        fairness,
        windows,
    }
}

fn windows(samples: &[Sample], tenants: &[(String, u32)], len: f64) -> Vec<Window> {
    let admitted: Vec<(usize, f64)> = samples.iter().filter_map(|s| s.admitted_s.map(|a| (s.tenant, a))).collect();
    let Some(last) = admitted.iter().map(|(_, a)| *a).reduce(f64::max) else {
        return Vec::new();
    };
    let first = admitted.iter().map(|(_, a)| *a).fold(f64::INFINITY, f64::min);
    let start = (first / len).floor() * len;
    let n = (((last - start) / len).floor() as usize) + 1;
    let mut counts = vec![vec![0usize; tenants.len()]; n];
    for (t, a) in &admitted {
        counts[(((a - start) / len) as usize).min(n - 1)][*t] += 1;
    }
    // A tenant is backlogged through [a, b) when one of its tasks was published by a and
    // admitted no earlier than b. Per tenant, the widest such wait is what matters, so keep
    // each task's (published, admitted) and test the windows against them.
    let mut waits: Vec<Vec<(f64, f64)>> = vec![Vec::new(); tenants.len()];
    for s in samples {
        if let Some(a) = s.admitted_s {
            waits[s.tenant].push((s.published_s, a));
        }
    }
    (0..n)
        .map(|i| {
            let a = start + i as f64 * len;
            let b = a + len;
            let backlogged: Vec<usize> =
                (0..tenants.len()).filter(|&t| waits[t].iter().any(|&(p, adm)| p <= a && adm >= b)).collect();
            let xs: Vec<f64> =
                backlogged.iter().map(|&t| counts[i][t] as f64 / f64::from(tenants[t].1.max(1))).collect();
            Window {
                start_s: a,
                admitted: (0..tenants.len())
                    .filter(|&t| counts[i][t] > 0)
                    .map(|t| (tenants[t].0.clone(), counts[i][t]))
                    .collect(),
                backlogged: backlogged.len(),
                backlogged_tenants: backlogged,
                jain: jain(&xs),
            }
        })
        .collect()
}

fn ms(p: &Option<Percentiles>) -> String {
    match p {
        Some(p) => format!("p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms", p.p50, p.p95, p.p99, p.max),
        None => "-".into(),
    }
}

/// The report for people; at most `max_tenants` rows of tenants, the busiest first.
pub fn table(r: &Report, max_tenants: usize) -> String {
    let mut out = String::new();
    let phases: Vec<String> = r.phases.iter().map(|(p, n)| format!("{p} {n}")).collect();
    let _ = writeln!(out, "tasks            {} in {:.2} s: {:.1} tasks/s", r.tasks, r.seconds, r.tasks_per_second);
    let _ = writeln!(out, "phases           {}", phases.join(", "));
    if r.unexpected > 0 {
        let _ = writeln!(out, "unexpected       {} tasks did not end as their body should", r.unexpected);
    }
    let _ = writeln!(out, "publish→result   {}", ms(&r.latency_ms));
    let _ = writeln!(out, "admission wait   {}", ms(&r.admission_wait_ms));
    let f = &r.fairness;
    match (f.min, f.mean, f.at_least_0_98) {
        (Some(min), Some(mean), Some(ok)) => {
            let _ = writeln!(
                out,
                "Jain's index     {} windows of {} s with every counted tenant backlogged: min {min:.3}, mean {mean:.3}, {:.0}% at or above 0.98",
                f.windows_measured,
                f.window_seconds,
                ok * 100.0
            );
        }
        _ => {
            let _ = writeln!(out, "Jain's index     no window had two or more tenants backlogged throughout");
        }
    }
    if let Some(j) = f.whole_run {
        let _ = writeln!(
            out,
            "                 {j:.3} over the whole run (admissions per backlogged second and unit of weight)"
        );
    }
    let mut rows: Vec<&TenantShare> = r.tenants.iter().collect();
    rows.sort_by(|a, b| b.published.cmp(&a.published).then(a.tenant.cmp(&b.tenant)));
    let width = rows.iter().take(max_tenants).map(|t| t.tenant.len()).max().unwrap_or(6).max(6);
    let _ = writeln!(
        out,
        "\n{:<width$}  {:>6}  {:>9}  {:>8}  {:>7}  {:>10}",
        "TENANT", "WEIGHT", "PUBLISHED", "ADMITTED", "SHARE", "FAIR SHARE"
    );
    for t in rows.iter().take(max_tenants) {
        let _ = writeln!(
            out,
            "{:<width$}  {:>6}  {:>9}  {:>8}  {:>6.1}%  {:>9.1}%",
            t.tenant,
            t.weight,
            t.published,
            t.admitted,
            t.share * 100.0,
            t.fair_share * 100.0
        );
    }
    if rows.len() > max_tenants {
        let _ = writeln!(out, "… and {} more tenants (all of them with -o json or -o csv)", rows.len() - max_tenants);
    }
    out
}

/// One row per window and tenant with admissions: `window_start_s,tenant,weight,admitted,share,backlogged,jain`.
pub fn csv(r: &Report) -> String {
    let weights: BTreeMap<&str, u32> = r.tenants.iter().map(|t| (t.tenant.as_str(), t.weight)).collect();
    let mut out = String::from("window_start_s,tenant,weight,admitted,share,backlogged_tenants,jain\n");
    for w in &r.windows {
        let total: usize = w.admitted.values().sum();
        for (tenant, n) in &w.admitted {
            let jain = w.jain.map(|j| format!("{j:.4}")).unwrap_or_default();
            let _ = writeln!(
                out,
                "{:.3},{},{},{},{:.4},{},{}",
                w.start_s,
                tenant,
                weights.get(tenant.as_str()).copied().unwrap_or(1),
                n,
                *n as f64 / total as f64,
                w.backlogged,
                jain
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(tenant: usize, published_s: f64, admitted_s: f64) -> Sample {
        Sample {
            tenant,
            published_s,
            latency_ms: (admitted_s - published_s) * 1000.0 + 5.0,
            phase: "Succeeded".into(),
            admitted_s: Some(admitted_s),
            admission_wait_ms: Some((admitted_s - published_s) * 1000.0),
            unexpected: false,
        }
    }

    fn tenants(weights: &[u32]) -> Vec<(String, u32)> {
        weights.iter().enumerate().map(|(i, w)| (format!("t{i}"), *w)).collect()
    }

    #[test]
    fn jains_index_is_one_for_equals_and_one_over_n_for_a_monopoly() {
        assert_eq!(jain(&[3.0, 3.0, 3.0]), Some(1.0));
        assert!((jain(&[5.0, 0.0, 0.0, 0.0]).unwrap() - 0.25).abs() < 1e-12);
        assert!((jain(&[1.0, 2.0]).unwrap() - 0.9).abs() < 1e-12);
        assert_eq!(jain(&[4.0]), None);
        assert_eq!(jain(&[0.0, 0.0]), None);
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let p = Percentiles::of((1..=100).map(f64::from).collect()).unwrap();
        assert_eq!((p.p50, p.p95, p.p99, p.max, p.count), (50.0, 95.0, 99.0, 100.0, 100));
        assert_eq!(Percentiles::of(vec![]), None);
        assert_eq!(Percentiles::of(vec![7.0]).unwrap().p99, 7.0);
    }

    /// Two tenants, weights 2 and 1, both backlogged from 0 s; the first is admitted twice as
    /// often, which is fair by weight.
    fn weighted_run() -> Vec<Sample> {
        let mut s = Vec::new();
        for k in 0..60 {
            s.push(sample(0, 0.0, 0.05 + k as f64 * 0.05));
        }
        for k in 0..30 {
            s.push(sample(1, 0.0, 0.05 + k as f64 * 0.1));
        }
        // Each keeps one task waiting past the end, so both stay backlogged in every window.
        s.push(sample(0, 0.0, 3.5));
        s.push(sample(1, 0.0, 3.5));
        s
    }

    #[test]
    fn admissions_in_proportion_to_weight_are_perfectly_fair() {
        let r = build(&weighted_run(), &tenants(&[2, 1]), 3.6, 1.0);
        let full: Vec<&Window> = r.windows.iter().filter(|w| w.jain.is_some()).collect();
        assert_eq!(full.len(), 3, "{:?}", r.windows);
        for w in full {
            assert_eq!(w.backlogged, 2);
            assert!(w.jain.unwrap() > 0.99, "{w:?}");
        }
        assert_eq!(r.fairness.at_least_0_98, Some(1.0));
        assert!(r.fairness.whole_run.unwrap() > 0.99, "{:?}", r.fairness);
        assert!((r.tenants[0].fair_share - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn ignoring_weights_shows_up_as_unfairness() {
        // The same admissions, but the tenants claim equal weights: 2:1 is then unfair.
        let r = build(&weighted_run(), &tenants(&[1, 1]), 3.6, 1.0);
        let min = r.fairness.min.unwrap();
        assert!((min - 0.9).abs() < 0.02, "{min}");
        assert!((r.fairness.whole_run.unwrap() - 0.9).abs() < 0.02, "{:?}", r.fairness);
    }

    #[test]
    fn a_tenant_that_is_not_waiting_is_not_counted_against_fairness() {
        // t1 publishes late (2 s), so in the first windows only t0 is backlogged.
        let mut s: Vec<Sample> = (0..30).map(|k| sample(0, 0.0, 0.1 * k as f64)).collect();
        s.push(sample(1, 2.5, 2.6));
        let r = build(&s, &tenants(&[1, 1]), 3.0, 1.0);
        assert!(r.windows.iter().all(|w| w.backlogged <= 1 && w.jain.is_none()), "{:?}", r.windows);
        assert_eq!(r.fairness.windows_measured, 0);
        assert!(table(&r, 10).contains("no window had two or more tenants backlogged"));
    }

    #[test]
    fn shares_phases_and_rejections_are_counted() {
        let mut s = weighted_run();
        s.push(Sample {
            tenant: 1,
            published_s: 0.1,
            latency_ms: 2.0,
            phase: "Rejected".into(),
            admitted_s: None,
            admission_wait_ms: None,
            unexpected: true,
        });
        let r = build(&s, &tenants(&[2, 1, 5]), 4.0, 1.0);
        assert_eq!(r.tasks, 93);
        assert_eq!(r.phases["Succeeded"], 92);
        assert_eq!(r.phases["Rejected"], 1);
        assert_eq!(r.unexpected, 1);
        // t2 published nothing: no row, and its weight is not in anyone's fair share.
        assert_eq!(r.tenants.len(), 2);
        assert_eq!((r.tenants[1].published, r.tenants[1].admitted), (32, 31));
        assert!((r.tenants[0].share - 61.0 / 92.0).abs() < 1e-12);
        assert_eq!(r.admission_wait_ms.as_ref().unwrap().count, 92);
        assert_eq!(r.latency_ms.as_ref().unwrap().count, 93);
    }

    #[test]
    fn the_table_and_csv_carry_the_figures() {
        let r = build(&weighted_run(), &tenants(&[2, 1]), 3.6, 1.0);
        let t = table(&r, 1);
        assert!(t.contains("92 in 3.60 s"), "{t}");
        assert!(t.contains("t0") && !t.contains("\nt1 "), "{t}");
        assert!(t.contains("… and 1 more tenants"), "{t}");
        let c = csv(&r);
        let mut lines = c.lines();
        assert_eq!(lines.next(), Some("window_start_s,tenant,weight,admitted,share,backlogged_tenants,jain"));
        let first: Vec<&str> = lines.next().unwrap().split(',').collect();
        assert_eq!(first[..4], ["0.000", "t0", "2", "19"]);
        assert_eq!(c.lines().count(), 1 + r.windows.iter().map(|w| w.admitted.len()).sum::<usize>());
    }
}
