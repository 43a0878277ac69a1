//! The executor loop: claims admitted tasks, runs each on a [`Backend`], records the outcome and
//! its result in one transaction.
//!
//! Claims carry a lease that a heartbeat renews; if this process dies, the scheduler's
//! housekeeping hands its tasks to another executor. On a clean shutdown running tasks are
//! killed and handed back at once.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::domain::phase::{Phase, Reason};
use crate::domain::result::{classify, describe, storable_json, Ending};
use crate::domain::tenant::TenantPolicy;
use crate::exec::{Backend, Job, Outcome, ProgramResult, Termination};
use crate::service::Context;
use crate::store::{ClaimedTask, FinishedRun};

/// How long a claim stays valid without a heartbeat.
const LEASE: Duration = Duration::from_secs(30);

pub async fn run(ctx: Arc<Context>, backend: Arc<dyn Backend>, shutdown: CancellationToken) {
    let owner = Uuid::new_v4();
    let slots = Arc::new(Semaphore::new(ctx.settings.max_running as usize));
    let mut runs = tokio::task::JoinSet::new();
    // What this process is running right now; only these leases are renewed.
    let running: Arc<Mutex<HashSet<Uuid>>> = Arc::default();
    let heartbeat = {
        let ctx = ctx.clone();
        let running = running.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(LEASE / 3).await;
                let ids: Vec<Uuid> = running.lock().expect("not poisoned").iter().copied().collect();
                if ids.is_empty() {
                    continue;
                }
                if let Err(e) = ctx.store.renew_leases(owner, &ids, LEASE).await {
                    tracing::warn!(error = %e, "cannot renew executor leases");
                }
            }
        })
    };
    tracing::info!(backend = backend.name(), %owner, "executor started");
    while !shutdown.is_cancelled() {
        while runs.try_join_next().is_some() {}
        let woken = ctx.wake.executor.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let free = slots.available_permits();
        let claimed = if free > 0 {
            match ctx.store.claim_pending(owner, backend.name(), free as i64, LEASE).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot claim tasks; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
        } else {
            Vec::new()
        };
        let got = claimed.len();
        for task in claimed {
            let permit = slots.clone().acquire_owned().await.expect("semaphore never closes");
            let ctx = ctx.clone();
            let backend = backend.clone();
            let running = running.clone();
            running.lock().expect("not poisoned").insert(task.task_id);
            runs.spawn(async move {
                let task_id = task.task_id;
                run_one(&ctx, backend.as_ref(), task).await;
                running.lock().expect("not poisoned").remove(&task_id);
                drop(permit);
                // A slot is free: more may be claimable, and the scheduler may admit more.
                ctx.wake.executor.notify_one();
            });
        }
        if got > 0 && got == free {
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = &mut woken => {}
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
    heartbeat.abort();
    // Dropping the runs kills their sandboxes; the tasks go back to Pending for another run.
    runs.shutdown().await;
    match ctx.store.release(owner).await {
        Ok(n) if n > 0 => tracing::info!(released = n, "handed unfinished tasks back"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not hand tasks back; their leases will expire"),
    }
}

async fn run_one(ctx: &Context, backend: &dyn Backend, task: ClaimedTask) {
    let started = chrono::Utc::now();
    match ctx.store.mark_running(task.task_id, task.attempt, started).await {
        Ok(true) => {}
        // Another attempt owns the task now (our claim expired): do not run it twice.
        Ok(false) => {
            tracing::warn!(task_id = %task.task_id, "task is no longer ours to run; skipping");
            return;
        }
        Err(e) => tracing::warn!(task_id = %task.task_id, error = %e, "cannot mark task running"),
    }
    let timeout_seconds = task.timeout_seconds;
    let language = task.language;
    let tenant = task.tenant.clone();
    let artifact_quota = ctx
        .tenants
        .borrow()
        .iter()
        .find(|(name, _)| name.as_str() == task.tenant)
        .map_or(TenantPolicy::default().max_artifact_bytes, |(_, p)| p.max_artifact_bytes);
    let outcome = match job_of(&task, artifact_quota) {
        Ok(job) => backend.run(job).await,
        Err(message) => Outcome::backend_error(message, started),
    };
    let mut run = finished_run(&outcome, timeout_seconds);
    let duration = (run.finished_at - run.started_at).num_milliseconds().max(0) as f64 / 1000.0;
    // The result must reach the database; keep trying through a database outage.
    let mut wait = Duration::from_millis(200);
    let mut stripped = false;
    loop {
        match ctx.store.finish(task.task_id, task.attempt, &run).await {
            Ok(true) => break,
            Ok(false) => {
                tracing::warn!(task_id = %task.task_id, "task was taken over by another executor; dropping this run's outcome");
                return;
            }
            // Postgres refused a value (not an outage): record the failure without the payload
            // rather than retrying forever.
            Err(e) if e.is_bad_value() && stripped => {
                tracing::error!(task_id = %task.task_id, error = %e, "outcome cannot be stored even without its payload; the task will be retried when its lease expires");
                return;
            }
            Err(e) if e.is_bad_value() => {
                stripped = true;
                tracing::warn!(task_id = %task.task_id, error = %e, "outcome could not be stored; recording a BackendError instead");
                run = FinishedRun {
                    phase: Phase::Failed,
                    reason: Some(Reason::BackendError),
                    message: format!("the task's outcome could not be stored: {e}"),
                    exit_code: run.exit_code,
                    result: None,
                    stdout: String::new(),
                    stderr: String::new(),
                    stdout_truncated: run.stdout_truncated,
                    stderr_truncated: run.stderr_truncated,
                    artifacts: Vec::new(),
                    started_at: run.started_at,
                    finished_at: run.finished_at,
                };
            }
            Err(e) => {
                tracing::warn!(task_id = %task.task_id, error = %e, "cannot record outcome; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
    let (phase, reason) = (run.phase, run.reason);
    ctx.metrics
        .finished
        .with_label_values(&[tenant.as_str(), phase.as_str(), reason.map_or("", |r| r.as_str())])
        .inc();
    ctx.metrics
        .task_duration
        .with_label_values(&[&tenant, language.as_str()])
        .observe(duration);
    tracing::info!(task_id = %task.task_id, %tenant, %phase, reason = reason.map_or("", |r| r.as_str()), "task finished");
}

fn job_of(task: &ClaimedTask, artifact_quota_bytes: u64) -> Result<Job, String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut files = BTreeMap::new();
    for (name, encoded) in &task.program.files {
        let bytes = b64
            .decode(encoded)
            .map_err(|e| format!("stored input file {name:?} is corrupt: {e}"))?;
        files.insert(name.clone(), bytes);
    }
    Ok(Job {
        task_id: task.task_id,
        tenant: task.tenant.clone(),
        language: task.language,
        code: task.program.code.clone(),
        files,
        stdin: task.program.stdin.clone(),
        args: task.program.args.clone(),
        env: task.program.env.clone(),
        timeout: Duration::from_secs(task.timeout_seconds as u64),
        cpu_millis: task.cpu_millis,
        memory_bytes: task.memory_bytes,
        artifact_quota_bytes,
    })
}

/// Maps a backend's report to what the store records.
fn finished_run(outcome: &Outcome, timeout_seconds: u32) -> FinishedRun {
    let ending = match &outcome.termination {
        Termination::Exited => Ending::Exited,
        Termination::TimedOut => Ending::TimedOut,
        Termination::OomKilled => Ending::OomKilled,
        Termination::OutputLimitExceeded => Ending::OutputLimitExceeded,
        Termination::BackendError(_) => Ending::BackendError,
    };
    let (phase, reason) = classify(ending, outcome.exit_code);
    let mut message = match &outcome.termination {
        Termination::BackendError(detail) => format!("{}: {detail}", describe(ending, outcome.exit_code, timeout_seconds)),
        _ => describe(ending, outcome.exit_code, timeout_seconds),
    };
    let result = match &outcome.result {
        ProgramResult::Json(v) => Some(storable_json(v.clone())),
        ProgramResult::Missing => None,
        ProgramResult::Invalid(why) => {
            message.push_str(&format!("; AGENTTASK_RESULT_FILE ignored: {why}"));
            None
        }
    };
    if let Some(note) = &outcome.artifacts_note {
        message.push_str(&format!("; {note}"));
    }
    FinishedRun {
        phase,
        reason,
        message,
        exit_code: outcome.exit_code,
        result,
        stdout: outcome.stdout.text.clone(),
        stderr: outcome.stderr.text.clone(),
        stdout_truncated: outcome.stdout.truncated,
        stderr_truncated: outcome.stderr.truncated,
        artifacts: outcome.artifacts.clone(),
        started_at: outcome.started_at,
        finished_at: outcome.finished_at,
    }
}
