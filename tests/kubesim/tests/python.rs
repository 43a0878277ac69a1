//! The official Kubernetes Python client (`kubernetes` on PyPI) against the emulator: the suite in
//! `python/test_kubesim.py` (metadata, Status errors, selectors and pages, watch ordering,
//! bookmarks and 410, patches, status subresource, finalizers, garbage collection, server-side
//! apply, the core kinds, the simulated kubelet and logs). `deploy/local/common.sh`
//! (`prepare_host`) installs the client.

mod common;

use std::path::Path;
use std::process::Command;

use common::Sim;

#[test]
fn official_python_client_suite() {
    let probe = Command::new("python3")
        .args(["-c", "import kubernetes, kubernetes_validate"])
        .output()
        .expect("python3");
    assert!(
        probe.status.success(),
        "the Python packages `kubernetes` and `kubernetes-validate` are missing: run deploy/local/common.sh's prepare_host (or `python3 -m pip install kubernetes kubernetes-validate`)\n{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let sim = Sim::start();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("python");
    let out = Command::new("python3")
        .args(["-m", "unittest", "-v", "test_kubesim"])
        .current_dir(&dir)
        .env("KUBESIM_URL", &sim.url)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("run python3");
    let report = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "Python client suite failed:\n{report}\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The suite really ran (unittest prints the count on stderr).
    let ran: usize = report
        .lines()
        .find_map(|l| {
            l.strip_prefix("Ran ")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
        .expect("unittest summary");
    assert!(ran >= 25, "only {ran} Python tests ran:\n{report}");
}
