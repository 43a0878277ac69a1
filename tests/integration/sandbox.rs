//! The local sandbox backend against hostile programs, driven through `Backend::run`.
//!
//! Each attack test asserts that the attack failed and that an ordinary task still runs
//! afterwards. Needs what `deploy/local/install-sandbox.sh` sets up (bubblewrap, python3,
//! r-base-core, the `agenttask-sandbox` user) and root, like the service itself.
//!
//! The whole suite runs twice: `cold` starts a fresh sandbox for every task (the warm pool off),
//! `warm` hands each task to a pre-started one (see `exec::local::warm`), so everything proven
//! for a cold sandbox is proven for a warm one too. `warm_only` holds what only warm sandboxes
//! need proving: single use, nothing of the warm-up visible, the same view as a cold run.

use std::collections::BTreeMap;
use std::time::Duration;

use agenttask::domain::task::Language;
use agenttask::exec::{Job, RunKey};

/// A task of tenant `acme` with `code`, 1 CPU, 256 MiB and a 5 s timeout, for both suites.
fn job(language: Language, code: &str) -> Job {
    Job {
        key: RunKey { task_id: uuid::Uuid::new_v4(), attempt: 1 },
        tenant: "acme".into(),
        language,
        code: code.into(),
        files: BTreeMap::new(),
        stdin: None,
        args: Vec::new(),
        env: BTreeMap::new(),
        timeout: Duration::from_secs(5),
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

mod cold {
    const WARM: bool = false;
    include!("sandbox_suite.rs");
}

mod warm {
    const WARM: bool = true;
    include!("sandbox_suite.rs");
}

mod warm_only;
