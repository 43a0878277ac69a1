//! Tenants' API tokens: created, looked up by id, listed and revoked. Only hashes are stored.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use super::{Result, Store};
use crate::domain::token::{Digest32, NewToken};

/// A token as listed: never its secret.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct TokenInfo {
    pub id: Uuid,
    pub tenant: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Stores `token` for `tenant`. `None` when no such tenant is configured.
pub async fn create_token(conn: impl PgExecutor<'_>, tenant: &str, token: &NewToken) -> Result<Option<TokenInfo>> {
    Ok(sqlx::query_as!(
        TokenInfo,
        r#"insert into agenttask.api_tokens (id, tenant, secret_sha256)
           select $1, $2, $3 where exists (select 1 from agenttask.tenants where name = $2)
           returning id, tenant, created_at, last_used_at, revoked_at"#,
        token.id,
        tenant,
        &token.secret_sha256[..]
    )
    .fetch_optional(conn)
    .await?)
}

/// The tenant and secret hash of an unrevoked token.
pub async fn live_token(conn: impl PgExecutor<'_>, id: Uuid) -> Result<Option<(String, Digest32)>> {
    let row =
        sqlx::query!("select tenant, secret_sha256 from agenttask.api_tokens where id = $1 and revoked_at is null", id)
            .fetch_optional(conn)
            .await?;
    Ok(row.and_then(|r| Some((r.tenant, r.secret_sha256.try_into().ok()?))))
}

/// Records a use; at most one write a minute per token, so reads do not all become writes.
pub async fn touch_token(conn: impl PgExecutor<'_>, id: Uuid) -> Result<()> {
    sqlx::query!(
        "update agenttask.api_tokens set last_used_at = now()
         where id = $1 and (last_used_at is null or last_used_at < now() - interval '1 minute')",
        id
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Tokens of one tenant, or of all, oldest first.
pub async fn list_tokens(conn: impl PgExecutor<'_>, tenant: Option<&str>) -> Result<Vec<TokenInfo>> {
    Ok(sqlx::query_as!(
        TokenInfo,
        "select id, tenant, created_at, last_used_at, revoked_at from agenttask.api_tokens
         where $1::text is null or tenant = $1 order by tenant, created_at, id",
        tenant
    )
    .fetch_all(conn)
    .await?)
}

/// Revokes a token (again is a no-op that keeps the first time). `None` when there is no such token.
pub async fn revoke_token(conn: impl PgExecutor<'_>, id: Uuid) -> Result<Option<TokenInfo>> {
    Ok(sqlx::query_as!(
        TokenInfo,
        "update agenttask.api_tokens set revoked_at = coalesce(revoked_at, now()) where id = $1
         returning id, tenant, created_at, last_used_at, revoked_at",
        id
    )
    .fetch_optional(conn)
    .await?)
}

impl Store {
    pub async fn create_token(&self, tenant: &str, token: &NewToken) -> Result<Option<TokenInfo>> {
        create_token(&self.pool, tenant, token).await
    }

    pub async fn live_token(&self, id: Uuid) -> Result<Option<(String, Digest32)>> {
        live_token(&self.pool, id).await
    }

    pub async fn touch_token(&self, id: Uuid) -> Result<()> {
        touch_token(&self.pool, id).await
    }

    pub async fn list_tokens(&self, tenant: Option<&str>) -> Result<Vec<TokenInfo>> {
        list_tokens(&self.pool, tenant).await
    }

    pub async fn revoke_token(&self, id: Uuid) -> Result<Option<TokenInfo>> {
        revoke_token(&self.pool, id).await
    }
}
