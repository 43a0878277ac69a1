//! The scheduler loop: wakes on submits and finishes, asks the admission policy whom to admit,
//! and moves those tasks to `Pending` in Postgres.
//!
//! Each round runs in one transaction under an advisory lock, so two schedulers against one
//! database never admit the same task or overshoot a quota. The policy itself is pure
//! (`domain::admission`); this module only reads state and applies decisions.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::domain::admission::{round_robin, TenantLoad};
use crate::service::Context;

/// How often expired executor leases are reaped and gauges refreshed.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(2);
/// Executions per task before a vanished executor fails it.
pub const MAX_ATTEMPTS: i32 = 3;

pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let mut turn = 0usize;
    let mut last_housekeeping = Instant::now() - HOUSEKEEPING_EVERY;
    while !shutdown.is_cancelled() {
        // Register for the next wake-up before reading state, so a submit that lands during the
        // round is not missed.
        let woken = ctx.wake.scheduler.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        match round(&ctx, turn).await {
            Ok(admitted) => {
                turn = turn.wrapping_add(1);
                if admitted > 0 {
                    ctx.wake.executor.notify_one();
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "admission round failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        }
        if last_housekeeping.elapsed() >= HOUSEKEEPING_EVERY {
            last_housekeeping = Instant::now();
            if let Err(e) = housekeeping(&ctx).await {
                tracing::warn!(error = %e, "scheduler housekeeping failed");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = &mut woken => {}
            _ = tokio::time::sleep(HOUSEKEEPING_EVERY) => {}
        }
    }
}

/// One admission decision. Returns how many tasks were admitted.
async fn round(ctx: &Context, turn: usize) -> anyhow::Result<usize> {
    let tenants = ctx.tenants.borrow().clone();
    let mut tx = ctx.store.begin_admission().await?;
    let active: HashMap<String, i64> = tx.active_counts().await?.into_iter().collect();
    let total_active: i64 = active.values().sum();
    let free = (ctx.settings.max_running as i64 - total_active).max(0) as u32;
    if free == 0 || tenants.is_empty() {
        tx.commit().await?;
        return Ok(0);
    }
    // Ask each tenant for at most what it could take this round.
    let mut names = Vec::new();
    let mut limits = Vec::new();
    for (name, policy) in tenants.iter() {
        let running = *active.get(name.as_str()).unwrap_or(&0) as u32;
        let room = policy.max_concurrency.saturating_sub(running).min(free);
        if room > 0 {
            names.push(name.as_str().to_owned());
            limits.push(room as i32);
        }
    }
    if names.is_empty() {
        tx.commit().await?;
        return Ok(0);
    }
    let heads = tx.queued_heads(&names, &limits).await?;
    let mut by_tenant: Vec<(String, Vec<uuid::Uuid>)> = Vec::new();
    for (tenant, id) in heads {
        match by_tenant.last_mut() {
            Some((t, ids)) if *t == tenant => ids.push(id),
            _ => by_tenant.push((tenant, vec![id])),
        }
    }
    let loads: Vec<TenantLoad> = by_tenant
        .iter()
        .map(|(t, ids)| {
            let policy = tenants
                .iter()
                .find(|(n, _)| n.as_str() == t)
                .map(|(_, p)| p.max_concurrency)
                .unwrap_or(0);
            TenantLoad {
                tenant: t.clone(),
                running: *active.get(t).unwrap_or(&0) as u32,
                max_concurrency: policy,
                queued: ids.len() as u32,
            }
        })
        .collect();
    let plan = round_robin(&loads, free, turn);
    let mut next = vec![0usize; by_tenant.len()];
    let ids: Vec<uuid::Uuid> = plan
        .into_iter()
        .map(|i| {
            let id = by_tenant[i].1[next[i]];
            next[i] += 1;
            id
        })
        .collect();
    if ids.is_empty() {
        tx.commit().await?;
        return Ok(0);
    }
    let admitted = tx.admit(&ids).await?;
    tx.commit().await?;
    let now = chrono::Utc::now();
    for (tenant, submitted_at) in &admitted {
        ctx.metrics.admitted.with_label_values(&[tenant]).inc();
        let wait = (now - *submitted_at).num_milliseconds().max(0) as f64 / 1000.0;
        ctx.metrics.admission_wait.with_label_values(&[tenant]).observe(wait);
    }
    tracing::debug!(admitted = admitted.len(), "admission round");
    Ok(admitted.len())
}

/// Slow-path duties: fail or requeue tasks of vanished executors, refresh gauges.
async fn housekeeping(ctx: &Context) -> anyhow::Result<()> {
    let (requeued, failed) = ctx.store.reap_expired(MAX_ATTEMPTS).await?;
    if requeued + failed > 0 {
        tracing::warn!(requeued, failed, "reaped tasks whose executor stopped responding");
    }
    for (tenant, queued, running) in ctx.store.phase_counts().await? {
        ctx.metrics.queue_depth.with_label_values(&[&tenant]).set(queued);
        ctx.metrics.running.with_label_values(&[&tenant]).set(running);
    }
    Ok(())
}
