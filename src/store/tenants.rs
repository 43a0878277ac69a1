//! The configured tenants, mirrored into `agenttask.tenants` (the shared truth across
//! processes and the base of the SQL views), and their load.

use sqlx::types::Json;
use sqlx::{Connection, PgConnection, PgExecutor};

use super::{Result, Store, StoreError};
use crate::domain::tenant::{TenantName, TenantPolicy, Tenants};

/// A tenant's configuration and load, as `agentctl tenant list|get` shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct TenantStatus {
    pub tenant: String,
    pub policy: TenantPolicy,
    pub queued: i64,
    pub running: i64,
    pub admitted_last_minute: i64,
}

/// Mirrors the configured tenants for the SQL views.
pub async fn sync_tenants(conn: &mut PgConnection, tenants: &Tenants) -> Result<()> {
    let mut tx = conn.begin().await?;
    let names: Vec<String> = tenants.keys().map(|t| t.as_str().to_owned()).collect();
    sqlx::query!("delete from agenttask.tenants where not (name = any($1))", &names).execute(&mut *tx).await?;
    let weights: Vec<i32> = tenants.values().map(|p| p.weight as i32).collect();
    let concurrency: Vec<i32> = tenants.values().map(|p| p.max_concurrency as i32).collect();
    let policies: Vec<Json<&TenantPolicy>> = tenants.values().map(Json).collect();
    sqlx::query!(
        "insert into agenttask.tenants (name, weight, max_concurrency, policy, updated_at) \
         select *, now() from unnest($1::text[], $2::int[], $3::int[], $4::jsonb[]) \
         on conflict (name) do update set weight = excluded.weight, \
         max_concurrency = excluded.max_concurrency, policy = excluded.policy, updated_at = now()",
        &names,
        &weights,
        &concurrency,
        &policies as _
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// The configured tenants as stored. A stored name that is not a valid tenant name (only a
/// hand edit can put one there: `sync_tenants` writes validated names) is an error, not a
/// tenant silently dropped.
pub async fn load_tenants(conn: impl PgExecutor<'_>) -> Result<Tenants> {
    let rows =
        sqlx::query!(r#"select name, policy as "policy: Json<TenantPolicy>" from agenttask.tenants order by name"#)
            .fetch_all(conn)
            .await?;
    rows.into_iter()
        .map(|r| {
            let name = TenantName::parse(&r.name).map_err(|e| {
                StoreError::Corrupt(format!("agenttask.tenants holds an invalid tenant name {:?}: {e}", r.name))
            })?;
            Ok((name, r.policy.0))
        })
        .collect()
}

/// Queued and active counts per configured tenant, for gauges.
pub async fn phase_counts(conn: impl PgExecutor<'_>) -> Result<Vec<(String, i64, i64)>> {
    Ok(sqlx::query!(
        r#"select tenant as "tenant!", queued as "queued!", running as "running!" from agenttask.tenant_usage"#
    )
    .fetch_all(conn)
    .await?
    .into_iter()
    .map(|r| (r.tenant, r.queued, r.running))
    .collect())
}

pub async fn tenant_statuses(conn: impl PgExecutor<'_>) -> Result<Vec<TenantStatus>> {
    Ok(sqlx::query!(
        r#"select u.tenant as "tenant!", t.policy as "policy: Json<TenantPolicy>", u.queued as "queued!",
             u.running as "running!", u.admitted_last_minute as "admitted_last_minute!"
           from agenttask.tenant_usage u join agenttask.tenants t on t.name = u.tenant order by u.tenant"#
    )
    .fetch_all(conn)
    .await?
    .into_iter()
    .map(|r| TenantStatus {
        tenant: r.tenant,
        policy: r.policy.0,
        queued: r.queued,
        running: r.running,
        admitted_last_minute: r.admitted_last_minute,
    })
    .collect())
}

impl Store {
    pub async fn sync_tenants(&self, tenants: &Tenants) -> Result<()> {
        sync_tenants(&mut *self.pool.acquire().await?, tenants).await
    }

    pub async fn load_tenants(&self) -> Result<Tenants> {
        load_tenants(&self.pool).await
    }

    pub async fn phase_counts(&self) -> Result<Vec<(String, i64, i64)>> {
        phase_counts(&self.pool).await
    }

    pub async fn tenant_statuses(&self) -> Result<Vec<TenantStatus>> {
        tenant_statuses(&self.pool).await
    }
}

/// Creates (or resets the password of) `tenant`'s read-only SQL role `role`; see the migration
/// `tenant_sql_roles`. `Ok(false)` when there is no such tenant.
pub async fn ensure_sql_role(conn: impl PgExecutor<'_>, tenant: &str, role: &str, password: &str) -> Result<bool> {
    match sqlx::query!("select agenttask.ensure_tenant_sql_role($1, $2, $3)", tenant, role, password)
        .execute(conn)
        .await
    {
        Ok(_) => Ok(true),
        // no_data_found, raised for an unknown tenant.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("P0002") => Ok(false),
        Err(e) => Err(e.into()),
    }
}

impl Store {
    pub async fn ensure_sql_role(&self, tenant: &str, role: &str, password: &str) -> Result<bool> {
        ensure_sql_role(&self.pool, tenant, role, password).await
    }

    /// `postgres://ROLE:PASSWORD@HOST:PORT/DATABASE` for the database this store uses.
    pub fn connection_string_for(&self, role: &str, password: &str) -> String {
        let host = self.opts.get_host();
        let host = if host.contains(':') { format!("[{host}]") } else { host.to_owned() };
        format!(
            "postgres://{role}:{password}@{host}:{}/{}",
            self.opts.get_port(),
            self.opts.get_database().unwrap_or(role)
        )
    }
}
