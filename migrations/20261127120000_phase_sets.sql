-- The phase sets SQL needs, defined once. The service's queries, the views and the partial index
-- use these functions instead of repeating literal lists; they are immutable and inlined, so the
-- planner folds them to constants (the partial index still matches). The integration tests check
-- them against `Phase::ACTIVE` and `Phase::UNFINISHED` in Rust. The views still return `phase`
-- and `reason` as text.
create function agenttask.active_phases() returns text[] language sql immutable parallel safe
    as $$ select array['Pending', 'Scheduled', 'Running']::text[] $$;

create function agenttask.unfinished_phases() returns text[] language sql immutable parallel safe
    as $$ select array['Queued', 'Pending', 'Scheduled', 'Running']::text[] $$;

drop index agenttask.tasks_active;
create index tasks_active on agenttask.tasks (tenant) where phase = any(agenttask.active_phases());

create or replace view agenttask.batch_summary as
select tenant, batch_id,
       count(*) as total,
       count(*) filter (where phase = 'Queued') as queued,
       count(*) filter (where phase = any(agenttask.active_phases())) as running,
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

create or replace view agenttask.tenant_usage as
select t.name as tenant, t.weight, t.max_concurrency,
       (select count(*) from agenttask.tasks q where q.tenant = t.name and q.phase = 'Queued') as queued,
       (select count(*) from agenttask.tasks r where r.tenant = t.name and r.phase = any(agenttask.active_phases())) as running,
       (select count(*) from agenttask.tasks a where a.tenant = t.name and a.admitted_at > now() - interval '1 minute') as admitted_last_minute
from agenttask.tenants t;
