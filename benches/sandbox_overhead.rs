//! Sandbox overhead for `print(1)`: the local backend vs plain `/usr/bin/python3 -c 'print(1)'`,
//! interleaved in one run. Usage (as root): `cargo bench --bench sandbox_overhead -- [iterations]`.
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
    let n: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(50);
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let backend = LocalBackend::new(LocalConfig::new(tmp.path().join("data"))).unwrap();
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
        kube_object: None,
    };
    // Warm-up (page cache, first cgroup creation).
    for _ in 0..3 {
        backend.run(job()).await;
        tokio::process::Command::new("/usr/bin/python3").args(["-c", "print(1)"]).output().await.unwrap();
    }
    let (mut sandboxed, mut plain) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let t = Instant::now();
        let o = backend.run(job()).await;
        sandboxed.push(t.elapsed());
        assert_eq!((o.termination, o.stdout.text.as_str()), (Termination::Exited, "1\n"));
        let t = Instant::now();
        let out = tokio::process::Command::new("/usr/bin/python3").args(["-c", "print(1)"]).output().await.unwrap();
        plain.push(t.elapsed());
        assert_eq!(out.stdout, b"1\n");
    }
    let s = stats("sandbox", &mut sandboxed);
    let p = stats("plain", &mut plain);
    println!("overhead: median {:.2} ms", (s.as_secs_f64() - p.as_secs_f64()) * 1e3);
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
}
