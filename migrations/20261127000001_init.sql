-- AgentTask schema. Tables may change between versions; the views at the end are the stable,
-- documented surface for users' own SQL.
create schema if not exists agenttask;

-- Configured tenants, synced from the tenants file at start and on every reload.
create table agenttask.tenants (
    name            text primary key,
    weight          integer not null,
    max_concurrency integer not null,
    policy          jsonb not null,
    updated_at      timestamptz not null default now()
);

create table agenttask.tasks (
    task_id          uuid primary key,
    tenant           text not null,
    -- The client's idempotency key (body `id`, else AMQP message_id).
    client_id        text,
    batch_id         text,
    language         text check (language in ('python', 'r')),
    phase            text not null check (phase in
        ('Queued', 'Pending', 'Scheduled', 'Running', 'Succeeded', 'Failed', 'Rejected', 'Cancelled')),
    reason           text,
    message          text,
    priority         smallint not null default 0,
    -- Null only for Rejected tasks, which never ran.
    timeout_seconds  integer,
    cpu_millis       bigint,
    memory_bytes     bigint,
    isolation        text not null default 'standard',
    labels           jsonb not null default '{}',
    -- Code, files, stdin, args, env: what the sandbox needs, nothing scheduling reads.
    program          jsonb,
    reply_exchange   text not null,
    reply_routing_key text not null,
    correlation_id   text,
    exit_code        integer,
    result           jsonb,
    stdout           text,
    stderr           text,
    stdout_truncated boolean not null default false,
    stderr_truncated boolean not null default false,
    artifacts        jsonb not null default '[]',
    backend          text,
    -- Executions started; fences a stale executor's late write.
    attempt          integer not null default 0,
    lease_owner      uuid,
    lease_expires_at timestamptz,
    submitted_at     timestamptz not null default now(),
    admitted_at      timestamptz,
    started_at       timestamptz,
    finished_at      timestamptz
);

-- Idempotency: one task per (tenant, client key).
create unique index tasks_client_key on agenttask.tasks (tenant, client_id) where client_id is not null;
-- A tenant's queue, in admission order.
create index tasks_queue on agenttask.tasks (tenant, priority desc, submitted_at, task_id) where phase = 'Queued';
-- Admitted work waiting for an executor, and work holding capacity.
create index tasks_pending on agenttask.tasks (admitted_at) where phase = 'Pending';
create index tasks_active on agenttask.tasks (tenant) where phase in ('Pending', 'Scheduled', 'Running');
create index tasks_batch on agenttask.tasks (tenant, batch_id) where batch_id is not null;
create index tasks_admitted_at on agenttask.tasks (admitted_at);

-- Results waiting to be published with publisher confirms. A row is written in the same
-- transaction that makes a task terminal, so a crash between the two cannot lose a result.
create table agenttask.outbox (
    message_id     uuid primary key,
    exchange       text not null,
    routing_key    text not null,
    correlation_id text,
    phase          text not null,
    body           bytea not null,
    created_at     timestamptz not null default now(),
    attempts       integer not null default 0
);
create index outbox_created on agenttask.outbox (created_at);

-- Wake-ups: the scheduler, executors and the publisher listen instead of polling.
create function agenttask.notify_task_change() returns trigger language plpgsql as $$
begin
    -- "<phase>:<tenant>", so the scheduler refreshes only the tenant that changed.
    perform pg_notify('agenttask_tasks', new.phase || ':' || new.tenant);
    return null;
end $$;

create trigger tasks_notify after insert or update of phase on agenttask.tasks
    for each row execute function agenttask.notify_task_change();

create function agenttask.notify_outbox() returns trigger language plpgsql as $$
begin
    perform pg_notify('agenttask_outbox', '');
    return null;
end $$;

create trigger outbox_notify after insert on agenttask.outbox
    for each statement execute function agenttask.notify_outbox();

create function agenttask.notify_tenants() returns trigger language plpgsql as $$
begin
    perform pg_notify('agenttask_tenants', '');
    return null;
end $$;

create trigger tenants_notify after insert or update or delete on agenttask.tenants
    for each statement execute function agenttask.notify_tenants();

-- The stable SQL surface.
create view agenttask.task_results as
select task_id, tenant, client_id, batch_id, language, phase, reason, exit_code, result,
       stdout, stderr, labels, backend, submitted_at, admitted_at, started_at, finished_at,
       greatest(0, (extract(epoch from (admitted_at - submitted_at)) * 1000)::bigint) as queue_wait_ms,
       greatest(0, (extract(epoch from (finished_at - started_at)) * 1000)::bigint) as duration_ms
from agenttask.tasks;

create view agenttask.batch_summary as
select tenant, batch_id,
       count(*) as total,
       count(*) filter (where phase = 'Queued') as queued,
       count(*) filter (where phase in ('Pending', 'Scheduled', 'Running')) as running,
       count(*) filter (where phase = 'Succeeded') as succeeded,
       count(*) filter (where phase = 'Failed') as failed,
       count(*) filter (where phase = 'Rejected') as rejected,
       count(*) filter (where phase = 'Cancelled') as cancelled,
       min(submitted_at) as first_submitted_at,
       max(finished_at) as last_finished_at,
       (percentile_cont(0.5) within group (order by extract(epoch from (finished_at - started_at)) * 1000))::bigint as p50_duration_ms,
       (percentile_cont(0.95) within group (order by extract(epoch from (finished_at - started_at)) * 1000))::bigint as p95_duration_ms
from agenttask.tasks
where batch_id is not null
group by tenant, batch_id;

create view agenttask.tenant_usage as
select t.name as tenant, t.weight, t.max_concurrency,
       (select count(*) from agenttask.tasks q where q.tenant = t.name and q.phase = 'Queued') as queued,
       (select count(*) from agenttask.tasks r where r.tenant = t.name and r.phase in ('Pending', 'Scheduled', 'Running')) as running,
       (select count(*) from agenttask.tasks a where a.tenant = t.name and a.admitted_at > now() - interval '1 minute') as admitted_last_minute
from agenttask.tenants t;
