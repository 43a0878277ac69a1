-- Per-tenant API tokens. Only a token's SHA-256 is kept: the token itself is printed once, when
-- it is created. A token is `agt_<id>_<secret>`; the id finds the row, and the secret's hash is
-- compared in constant time in the service.
create table agenttask.api_tokens (
    id            uuid primary key,
    tenant        text not null,
    secret_sha256 bytea not null check (length(secret_sha256) = 32),
    created_at    timestamptz not null default now(),
    last_used_at  timestamptz,
    -- Revoked tokens stay listed (who had access, until when); they authenticate nothing.
    revoked_at    timestamptz
);
create index api_tokens_tenant on agenttask.api_tokens (tenant, created_at);

