-- Each tenant's number of Queued tasks, split into two monotonic counters so that the writers
-- that fill a queue and those that drain it never wait for each other:
--
-- - `queue_entries`: tasks that became Queued. Ingest locks a capped tenant's row before it
--   inserts, so concurrent inserts of one tenant take turns and `max_queued` holds exactly.
-- - `queue_exits`: tasks that left Queued (admitted, cancelled, refused, deleted). Written by the
--   admission round and the rest; never locked by ingest.
--
-- With one row per tenant for both (the earlier `queued_counts` table), an admission round had
-- to lock the counters of the tenants it admitted, and so waited for every ingest transaction
-- that held them: under a flood each round waited behind a group commit of hundreds of tasks
-- (rounds of 60-190 ms instead of a few), and a tenant with room waited for those rounds.
--
-- Ingest reads the exits after it holds the entry lock, so it never counts a task as gone that is
-- still queued: at worst an admission committing at that very moment is not seen yet, as if the
-- insert had happened just before it. The cap is never exceeded.
create table agenttask.queue_entries (
    tenant text primary key,
    entered bigint not null default 0
);
create table agenttask.queue_exits (
    tenant text primary key,
    exited bigint not null default 0
);

insert into agenttask.queue_entries (tenant, entered) select tenant, queued from agenttask.queued_counts;
drop table agenttask.queued_counts;

-- What the two counters say together, for people and tests.
create view agenttask.queued_counts as
    select e.tenant, e.entered - coalesce(x.exited, 0) as queued
    from agenttask.queue_entries e left join agenttask.queue_exits x using (tenant);

-- Statement-level, over the transition tables: one upsert per tenant per statement, in tenant
-- order, so two statements that touch several tenants (an admission round, a batch cancel)
-- always lock the counters in the same order and cannot deadlock on them. A statement's net
-- change per tenant goes to one of the two counters.
create or replace function agenttask.count_queued() returns trigger language plpgsql as $$
begin
    if tg_op = 'INSERT' then
        insert into agenttask.queue_entries as c (tenant, entered)
        select tenant, count(*) from new_rows where phase = 'Queued' group by tenant order by tenant
        on conflict (tenant) do update set entered = c.entered + excluded.entered;
    elsif tg_op = 'UPDATE' then
        insert into agenttask.queue_entries as c (tenant, entered)
        select tenant, sum(d) from (
            select tenant, -1 as d from old_rows where phase = 'Queued'
            union all
            select tenant, 1 from new_rows where phase = 'Queued'
        ) delta group by tenant having sum(d) > 0 order by tenant
        on conflict (tenant) do update set entered = c.entered + excluded.entered;
        insert into agenttask.queue_exits as c (tenant, exited)
        select tenant, -sum(d) from (
            select tenant, -1 as d from old_rows where phase = 'Queued'
            union all
            select tenant, 1 from new_rows where phase = 'Queued'
        ) delta group by tenant having sum(d) < 0 order by tenant
        on conflict (tenant) do update set exited = c.exited + excluded.exited;
    else
        insert into agenttask.queue_exits as c (tenant, exited)
        select tenant, count(*) from old_rows where phase = 'Queued' group by tenant order by tenant
        on conflict (tenant) do update set exited = c.exited + excluded.exited;
    end if;
    return null;
end $$;
