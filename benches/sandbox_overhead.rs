//! Sandbox overhead, cold and warm: the local backend running `print(1)` (Python) and `cat(1)`
//! (R) in a fresh sandbox and in a pre-started one, against the plain interpreter started by
//! itself (`python3 -I -B -c 'print(1)'`, `Rscript --vanilla -e 'cat(1)'`), all interleaved one
//! for one in one run; then sustained throughput: plain `python3 -c 'print(1)'` processes back to
//! back on every core, against warm-pool tasks.
//!
//! Usage (as root): `cargo bench --bench sandbox_overhead -- [iterations] [seconds]`.
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agenttask::domain::task::Language;
use agenttask::exec::local::{LocalBackend, LocalConfig, WarmConfig};
use agenttask::exec::{Job, Termination};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn stats(name: &str, v: &mut [Duration]) -> Duration {
    v.sort();
    let med = v[v.len() / 2];
    println!(
        "{name:>14}: median {:7.2} ms  p10 {:7.2}  p90 {:7.2}  min {:7.2}  (n={})",
        ms(med),
        ms(v[v.len() / 10]),
        ms(v[v.len() * 9 / 10]),
        ms(v[0]),
        v.len()
    );
    med
}

fn job(language: Language) -> Job {
    Job {
        key: agenttask::exec::RunKey { task_id: uuid::Uuid::new_v4(), attempt: 1 },
        tenant: "bench".into(),
        language,
        code: match language {
            Language::Python => "print(1)".into(),
            Language::R => "cat(1)".into(),
        },
        files: BTreeMap::new(),
        stdin: None,
        args: vec![],
        env: BTreeMap::new(),
        timeout: Duration::from_secs(10),
        cpu_millis: 1000,
        memory_bytes: 256 << 20,
        isolation: "standard".into(),
        labels: BTreeMap::new(),
        batch_id: None,
        priority: 0,
        artifact_quota_bytes: 1 << 30,
        kube_object: None,
    }
}

fn backend(dir: &std::path::Path, warm: WarmConfig) -> Arc<LocalBackend> {
    let mut c = LocalConfig::new(dir);
    c.warm = warm;
    let b = Arc::new(LocalBackend::new(c).expect("local backend (run deploy/local/install-sandbox.sh as root)"));
    b.start_warm_pool();
    b
}

async fn sandboxed(b: &LocalBackend, language: Language, warm: bool) -> Duration {
    sandboxed_at(b, language, warm, 1000).await
}

/// As [`sandboxed`], with the task asking for `cpu_millis` (its CFS quota).
async fn sandboxed_at(b: &LocalBackend, language: Language, warm: bool, cpu_millis: u64) -> Duration {
    if warm {
        assert!(b.wait_warm(Duration::from_secs(60)).await, "the warm pool did not fill");
    }
    let mut j = job(language);
    j.cpu_millis = cpu_millis;
    let t = Instant::now();
    let o = b.run(j).await;
    let d = t.elapsed();
    let want = if language == Language::Python { "1\n" } else { "1" };
    assert_eq!((&o.termination, o.stdout.text.as_str()), (&Termination::Exited, want), "{o:?}");
    assert_eq!(o.warm == Some(true), warm, "{o:?}");
    d
}

async fn plain(argv: &[&str], want: &[u8]) -> Duration {
    let t = Instant::now();
    let out = tokio::process::Command::new(argv[0]).args(&argv[1..]).output().await.unwrap();
    let d = t.elapsed();
    assert_eq!(out.stdout, want);
    d
}

const PLAIN_PY: &[&str] = &["/usr/bin/python3", "-I", "-B", "-c", "print(1)"];
const PLAIN_R: &[&str] = &["/usr/bin/Rscript", "--vanilla", "-e", "cat(1)"];

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; the numeric arguments are iterations and seconds.
    let nums: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let n = nums.first().copied().unwrap_or(50) as usize;
    let secs = nums.get(1).copied().unwrap_or(10);
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let cold = backend(&tmp.path().join("cold"), WarmConfig::off());
    let warm = backend(&tmp.path().join("warm"), WarmConfig { python: 1, r: 1, max_idle: Duration::from_secs(600) });

    // Page cache, first cgroups.
    for language in [Language::Python, Language::R] {
        sandboxed(&cold, language, false).await;
        sandboxed(&warm, language, true).await;
    }
    plain(PLAIN_PY, b"1\n").await;
    plain(PLAIN_R, b"1").await;

    println!("latency, interleaved one for one ({n} rounds):");
    let (mut pp, mut pc, mut pw, mut rp, mut rc, mut rw) = Default::default();
    // A cold start under the tenants' default CPU request (500m): the interpreter starts at half
    // a core.
    let (mut pc5, mut rc5, mut rw5): (Vec<Duration>, Vec<Duration>, Vec<Duration>) = Default::default();
    let push = |v: &mut Vec<Duration>, d| v.push(d);
    for _ in 0..n {
        push(&mut pp, plain(PLAIN_PY, b"1\n").await);
        push(&mut pc, sandboxed(&cold, Language::Python, false).await);
        push(&mut pw, sandboxed(&warm, Language::Python, true).await);
        push(&mut pc5, sandboxed_at(&cold, Language::Python, false, 500).await);
    }
    for _ in 0..n.div_ceil(3) {
        push(&mut rp, plain(PLAIN_R, b"1").await);
        push(&mut rc, sandboxed(&cold, Language::R, false).await);
        push(&mut rw, sandboxed(&warm, Language::R, true).await);
        push(&mut rc5, sandboxed_at(&cold, Language::R, false, 500).await);
        push(&mut rw5, sandboxed_at(&warm, Language::R, true, 500).await);
    }
    let (a, b, c): (Duration, Duration, Duration) =
        (stats("python plain", &mut pp), stats("python cold", &mut pc), stats("python warm", &mut pw));
    println!("  cold overhead {:.2} ms; warm / plain {:.2}", ms(b) - ms(a), ms(c) / ms(a));
    let (a, b, c): (Duration, Duration, Duration) =
        (stats("R plain", &mut rp), stats("R cold", &mut rc), stats("R warm", &mut rw));
    println!("  cold overhead {:.2} ms; warm / plain {:.2}", ms(b) - ms(a), ms(c) / ms(a));
    println!("at the tenants' default CPU request, 500m:");
    stats("python cold", &mut pc5);
    stats("R cold", &mut rc5);
    stats("R warm", &mut rw5);

    // Throughput: as many at once as there are cores, for `secs` seconds each, alternately.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    println!("throughput, {cores} at a time, {secs} s each:");
    let sustained =
        backend(&tmp.path().join("sustained"), WarmConfig { python: cores, r: 0, max_idle: Duration::from_secs(600) });
    sustained.wait_warm(Duration::from_secs(60)).await;
    for round in 0..2 {
        let end = Instant::now() + Duration::from_secs(secs);
        let plain_done: usize = futures_util::future::join_all((0..cores).map(|_| async move {
            let mut k = 0;
            while Instant::now() < end {
                plain(&["/usr/bin/python3", "-c", "print(1)"], b"1\n").await;
                k += 1;
            }
            k
        }))
        .await
        .into_iter()
        .sum();
        let end = Instant::now() + Duration::from_secs(secs);
        let (mut hits, mut total) = (0usize, 0usize);
        for (h, t) in futures_util::future::join_all((0..cores).map(|_| {
            let b = sustained.clone();
            async move {
                let (mut h, mut t) = (0, 0);
                while Instant::now() < end {
                    let o = b.run(job(Language::Python)).await;
                    assert_eq!(o.stdout.text, "1\n");
                    h += usize::from(o.warm == Some(true));
                    t += 1;
                }
                (h, t)
            }
        }))
        .await
        {
            hits += h;
            total += t;
        }
        let (p, w) = (plain_done as f64 / secs as f64, total as f64 / secs as f64);
        println!(
            "  round {}: plain {p:.1}/s, warm pool {w:.1}/s ({:.0}% of plain; {hits} of {total} warm)",
            round + 1,
            100.0 * w / p
        );
    }
}
