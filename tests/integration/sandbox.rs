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

mod cold {
    const WARM: bool = false;
    include!("sandbox_suite.rs");
}

mod warm {
    const WARM: bool = true;
    include!("sandbox_suite.rs");
}

mod warm_only;
