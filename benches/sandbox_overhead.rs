//! Sandbox overhead for `print(1)`: the local backend vs plain `/usr/bin/python3 -c 'print(1)'`,
//! interleaved in one run; then warm sandboxes (the pool) against plain `python3 -I -B -c
//! 'print(1)'`, latency and sustained throughput, interleaved in the same run.
//! Usage (as root): `cargo bench --bench sandbox_overhead -- [iterations]`.
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use agenttask::domain::task::Language;
use agenttask::exec::local::{LocalBackend, LocalConfig};
use agenttask::exec::{Job, Termination};

fn stats(name: &str, v: &mut [Duration]) -> Duration {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let med = v[v.len() / 2];
    println!(
        "{name:>8}: median {:6.2} ms  p10 {:6.2}  p90 {:6.2}  min {:6.2}  (n={})",
        ms(med),
        ms(v[v.len() / 10]),
        ms(v[v.len() * 9 / 10]),
        ms(v[0]),
        v.len()
    );
    med
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; take the first numeric argument as the iteration count.
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(50);
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let mut cold_config = LocalConfig::new(tmp.path().join("data"));
    cold_config.warm_pool.python = 0;
    let backend = LocalBackend::new(cold_config).unwrap();
    let job = || Job {
        key: agenttask::exec::RunKey { task_id: uuid::Uuid::new_v4(), attempt: 1 },
        tenant: "bench".into(),
        language: Language::Python,
        code: "print(1)".into(),
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
    };
    // Warm-up (page cache, first cgroup creation).
    for _ in 0..3 {
        backend.run(job()).await;
        tokio::process::Command::new("/usr/bin/python3")
            .args(["-c", "print(1)"])
            .output()
            .await
            .unwrap();
    }
    let (mut sandboxed, mut plain) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let t = Instant::now();
        let o = backend.run(job()).await;
        sandboxed.push(t.elapsed());
        assert_eq!(
            (o.termination, o.stdout.text.as_str()),
            (Termination::Exited, "1\n")
        );
        let t = Instant::now();
        let out = tokio::process::Command::new("/usr/bin/python3")
            .args(["-c", "print(1)"])
            .output()
            .await
            .unwrap();
        plain.push(t.elapsed());
        assert_eq!(out.stdout, b"1\n");
    }
    let s = stats("sandbox", &mut sandboxed);
    let p = stats("plain", &mut plain);
    println!(
        "overhead: median {:.2} ms",
        (s.as_secs_f64() - p.as_secs_f64()) * 1e3
    );
    // Under load: two sandboxes at a time, back to back (cgroup migrations then come close
    // together and skip the RCU grace period an idle host pays on the first one).
    let mut loaded = Vec::new();
    for _ in 0..n / 2 {
        let t = Instant::now();
        let (a, b) = tokio::join!(
            async {
                let t = Instant::now();
                backend.run(job()).await;
                t.elapsed()
            },
            async {
                let t = Instant::now();
                backend.run(job()).await;
                t.elapsed()
            }
        );
        let _ = t;
        loaded.push(a);
        loaded.push(b);
    }
    stats("2-way", &mut loaded);
    drop(backend);
    warm(n, tmp.path(), job).await;
}

async fn plain_isolated() -> Duration {
    plain_start(&["-I", "-B", "-c", "print(1)"]).await
}

async fn plain_start(args: &[&str]) -> Duration {
    let t = Instant::now();
    let out = tokio::process::Command::new("/usr/bin/python3")
        .args(args)
        .output()
        .await
        .unwrap();
    assert_eq!(out.stdout, b"1\n");
    t.elapsed()
}

/// Warm sandboxes: one task at a time with a ready pool, against the plain isolated start,
/// interleaved; then the sustained rate of two streams of tasks against two streams of plain
/// starts, each for the same wall time.
async fn warm(n: usize, dir: &std::path::Path, job: impl Fn() -> Job) {
    let mut config = LocalConfig::new(dir.join("warm"));
    config.warm_pool.python = 2;
    let backend = std::sync::Arc::new(LocalBackend::new(config).unwrap());
    backend.start_warm_pool();
    let ready = |want: usize| {
        let b = backend.clone();
        async move {
            while b.warm_ready(Language::Python) < want {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    };
    let (mut warm, mut plain) = (Vec::new(), Vec::new());
    for _ in 0..n {
        ready(1).await;
        let t = Instant::now();
        let o = backend.run(job()).await;
        warm.push(t.elapsed());
        assert_eq!((o.warm, o.stdout.text.as_str()), (Some(true), "1\n"), "{o:?}");
        plain.push(plain_isolated().await);
    }
    let w = stats("warm", &mut warm);
    let p = stats("plain -I", &mut plain);
    println!("warm / plain: {:.2}", w.as_secs_f64() / p.as_secs_f64());

    // Sustained: 2 streams for `secs` each side, alternating sides 3 times.
    let secs = Duration::from_secs(5);
    let (mut tasks, mut plains, mut warm_hits) = (0usize, 0usize, 0usize);
    let mut wall_tasks = Duration::ZERO;
    let mut wall_plain = Duration::ZERO;
    for _ in 0..3 {
        ready(2).await;
        let t = Instant::now();
        let stream = || async {
            let (mut k, mut hits) = (0, 0);
            while t.elapsed() < secs {
                let o = backend.run(job()).await;
                assert_eq!(o.stdout.text, "1\n");
                hits += usize::from(o.warm == Some(true));
                k += 1;
            }
            (k, hits)
        };
        let ((a, ha), (b, hb)) = tokio::join!(stream(), stream());
        wall_tasks += t.elapsed();
        tasks += a + b;
        warm_hits += ha + hb;
        let t = Instant::now();
        let stream = || async {
            let mut k = 0;
            while t.elapsed() < secs {
                plain_start(&["-c", "print(1)"]).await;
                k += 1;
            }
            k
        };
        let (a, b) = tokio::join!(stream(), stream());
        wall_plain += t.elapsed();
        plains += a + b;
    }
    let rt = tasks as f64 / wall_tasks.as_secs_f64();
    let rp = plains as f64 / wall_plain.as_secs_f64();
    println!(
        "sustained: tasks {rt:.1}/s ({warm_hits} of {tasks} warm), plain `python3 -c` starts {rp:.1}/s, ratio {:.2}",
        rt / rp
    );
}
