//! The load to offer, decided before anything is sent: which tenant each task goes to, when it is
//! published, and what it runs. Pure and seeded, so a run can be repeated exactly.

use std::time::Duration;

/// How tasks are spread over tenants.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Spread {
    /// Every tenant equally often.
    Even,
    /// The tenant of rank k (in the order given) gets tasks in proportion to 1 / k^s.
    Zipf { exponent: f64 },
}

/// When tasks are published.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arrival {
    /// All at once, as fast as the in-flight bound allows: every tenant stays backlogged.
    Flood,
    /// Evenly spaced at `rate` tasks per second.
    Steady { rate: f64 },
    /// Groups of `burst` tasks published together, the groups spaced so the average is `rate`.
    Bursty { rate: f64, burst: usize },
}

/// What a task runs. Each kind exercises a different path through the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Body {
    /// `print(1)`: the shortest real task.
    Print,
    /// Sleeps 50 ms: holds a running slot without using CPU.
    Sleep,
    /// A short CPU loop (~10 ms of Python).
    Cpu,
    /// Exits 3: a Failed result.
    Fail,
    /// `cat(1)` in R.
    R,
    /// An unknown language: a Rejected result from the validator, never admitted.
    Invalid,
}

impl Body {
    pub const ALL: [Body; 6] = [Body::Print, Body::Sleep, Body::Cpu, Body::Fail, Body::R, Body::Invalid];

    pub fn name(self) -> &'static str {
        match self {
            Body::Print => "print",
            Body::Sleep => "sleep",
            Body::Cpu => "cpu",
            Body::Fail => "fail",
            Body::R => "r",
            Body::Invalid => "invalid",
        }
    }

    /// The task message's `language` and `code`.
    pub fn message(self) -> (&'static str, &'static str) {
        match self {
            Body::Print => ("python", "print(1)"),
            Body::Sleep => ("python", "import time\ntime.sleep(0.05)"),
            Body::Cpu => ("python", "sum(i * i for i in range(200000))"),
            Body::Fail => ("python", "raise SystemExit(3)"),
            Body::R => ("r", "cat(1)"),
            Body::Invalid => ("cobol", "DISPLAY 1."),
        }
    }

    /// Whether a correct service ends this task `Succeeded`.
    pub fn should_succeed(self) -> bool {
        matches!(self, Body::Print | Body::Sleep | Body::Cpu | Body::R)
    }
}

/// Parses a mix such as `print=8,fail=1,r=1` into weighted bodies.
pub fn parse_mix(s: &str) -> Result<Vec<(Body, u32)>, String> {
    let mut mix = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, weight) = part.split_once('=').unwrap_or((part, "1"));
        let body = Body::ALL.into_iter().find(|b| b.name() == name.trim()).ok_or_else(|| {
            let names: Vec<_> = Body::ALL.iter().map(|b| b.name()).collect();
            format!("unknown task body {name:?} in --mix; choose from {}", names.join(", "))
        })?;
        let weight: u32 =
            weight.trim().parse().map_err(|_| format!("--mix {part:?}: the weight must be a whole number"))?;
        if weight > 0 {
            mix.push((body, weight));
        }
    }
    if mix.is_empty() {
        return Err("--mix needs at least one body with a weight above 0, e.g. print=1".into());
    }
    Ok(mix)
}

/// One task of the plan.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Planned {
    /// When to publish, from the start of the run.
    pub at: Duration,
    /// Index into the tenant list.
    pub tenant: usize,
    pub body: Body,
}

/// SplitMix64: tiny, seeded and good enough to pick tenants and bodies.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Cumulative distribution over `weights`, for sampling by binary search.
fn cdf(weights: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut acc = 0.0;
    let mut c: Vec<f64> = weights
        .map(|w| {
            acc += w;
            acc
        })
        .collect();
    for v in &mut c {
        *v /= acc;
    }
    c
}

fn sample(cdf: &[f64], rng: &mut Rng) -> usize {
    let u = rng.next_f64();
    cdf.partition_point(|&c| c <= u).min(cdf.len() - 1)
}

/// The whole run: `count` tasks over `tenants` tenants.
pub fn plan(
    count: usize,
    tenants: usize,
    spread: Spread,
    arrival: Arrival,
    mix: &[(Body, u32)],
    seed: u64,
) -> Vec<Planned> {
    assert!(tenants > 0 && !mix.is_empty(), "callers check there is a tenant and a body");
    let mut rng = Rng::new(seed);
    let tenant_cdf = match spread {
        Spread::Even => cdf((0..tenants).map(|_| 1.0)),
        Spread::Zipf { exponent } => cdf((1..=tenants).map(|k| 1.0 / (k as f64).powf(exponent))),
    };
    let body_cdf = cdf(mix.iter().map(|(_, w)| f64::from(*w)));
    (0..count)
        .map(|i| {
            let at = match arrival {
                Arrival::Flood => Duration::ZERO,
                Arrival::Steady { rate } => Duration::from_secs_f64(i as f64 / rate),
                Arrival::Bursty { rate, burst } => {
                    let burst = burst.max(1);
                    Duration::from_secs_f64((i / burst * burst) as f64 / rate)
                }
            };
            Planned { at, tenant: sample(&tenant_cdf, &mut rng), body: mix[sample(&body_cdf, &mut rng)].0 }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(p: &[Planned], tenants: usize) -> Vec<usize> {
        let mut c = vec![0; tenants];
        for t in p {
            c[t.tenant] += 1;
        }
        c
    }

    #[test]
    fn even_spread_gives_every_tenant_about_the_same() {
        let p = plan(40_000, 4, Spread::Even, Arrival::Flood, &[(Body::Print, 1)], 7);
        for c in counts(&p, 4) {
            assert!((9_500..10_500).contains(&c), "{c}");
        }
    }

    #[test]
    fn zipf_spread_follows_one_over_rank() {
        let p = plan(100_000, 3, Spread::Zipf { exponent: 1.0 }, Arrival::Flood, &[(Body::Print, 1)], 1);
        let c = counts(&p, 3);
        // 1 : 1/2 : 1/3 of 11/6 → 54.5%, 27.3%, 18.2%.
        assert!((53_500..55_500).contains(&c[0]), "{c:?}");
        assert!((26_300..28_300).contains(&c[1]), "{c:?}");
        assert!((17_200..19_200).contains(&c[2]), "{c:?}");
    }

    #[test]
    fn the_same_seed_gives_the_same_plan() {
        let mix = parse_mix("print=3,fail=1").unwrap();
        let a = plan(500, 10, Spread::Zipf { exponent: 1.2 }, Arrival::Flood, &mix, 42);
        assert_eq!(a, plan(500, 10, Spread::Zipf { exponent: 1.2 }, Arrival::Flood, &mix, 42));
        assert_ne!(a, plan(500, 10, Spread::Zipf { exponent: 1.2 }, Arrival::Flood, &mix, 43));
    }

    #[test]
    fn arrivals_are_spaced_by_the_rate_and_bursts_share_an_instant() {
        let steady = plan(5, 1, Spread::Even, Arrival::Steady { rate: 10.0 }, &[(Body::Print, 1)], 0);
        let at: Vec<u128> = steady.iter().map(|p| p.at.as_millis()).collect();
        assert_eq!(at, [0, 100, 200, 300, 400]);
        let bursty = plan(7, 1, Spread::Even, Arrival::Bursty { rate: 10.0, burst: 3 }, &[(Body::Print, 1)], 0);
        let at: Vec<u128> = bursty.iter().map(|p| p.at.as_millis()).collect();
        assert_eq!(at, [0, 0, 0, 300, 300, 300, 600]);
    }

    #[test]
    fn a_mix_is_parsed_with_weights_and_errors_name_the_choices() {
        assert_eq!(parse_mix("print=8, r=2 ,sleep").unwrap(), [(Body::Print, 8), (Body::R, 2), (Body::Sleep, 1)]);
        let err = parse_mix("print=1,java=2").unwrap_err();
        assert!(err.contains("java") && err.contains("print, sleep, cpu, fail, r, invalid"), "{err}");
        assert!(parse_mix("print=x").unwrap_err().contains("whole number"));
        assert!(parse_mix("print=0").is_err());
    }

    #[test]
    fn the_mix_is_followed() {
        let mix = parse_mix("print=3,fail=1").unwrap();
        let p = plan(40_000, 1, Spread::Even, Arrival::Flood, &mix, 3);
        let fails = p.iter().filter(|t| t.body == Body::Fail).count();
        assert!((9_500..10_500).contains(&fails), "{fails}");
    }
}
