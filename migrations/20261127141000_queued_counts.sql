-- Each tenant's number of Queued tasks, kept by triggers in the same transaction as every change
-- of a task's phase, so ingest enforces `max_queued` exactly and in constant time: it locks the
-- tenant's row, compares, and inserts, while a concurrent insert of the same tenant waits for
-- the lock instead of counting the same backlog twice.
-- No `check (queued >= 0)`: an upsert checks its proposed row (a decrement's negative delta)
-- before it finds the conflict, and a decrement always finds its tenant's row.
create table agenttask.queued_counts (
    tenant text primary key,
    queued bigint not null default 0
);

insert into agenttask.queued_counts (tenant, queued)
select tenant, count(*) from agenttask.tasks where phase = 'Queued' group by tenant;

-- Statement-level, over the transition tables: one upsert per tenant per statement, in tenant
-- order, so two statements that touch several tenants (an admission round, a batch cancel)
-- always lock the counters in the same order and cannot deadlock on them.
create function agenttask.count_queued() returns trigger language plpgsql as $$
begin
    if tg_op = 'INSERT' then
        insert into agenttask.queued_counts as c (tenant, queued)
        select tenant, count(*) from new_rows where phase = 'Queued' group by tenant order by tenant
        on conflict (tenant) do update set queued = c.queued + excluded.queued;
    elsif tg_op = 'UPDATE' then
        insert into agenttask.queued_counts as c (tenant, queued)
        select tenant, sum(d) from (
            select tenant, -1 as d from old_rows where phase = 'Queued'
            union all
            select tenant, 1 from new_rows where phase = 'Queued'
        ) delta group by tenant having sum(d) <> 0 order by tenant
        on conflict (tenant) do update set queued = c.queued + excluded.queued;
    else
        update agenttask.queued_counts c set queued = c.queued - d.n
        from (select tenant, count(*) as n from old_rows where phase = 'Queued' group by tenant) d
        where c.tenant = d.tenant;
    end if;
    return null;
end $$;

create trigger tasks_count_queued_insert after insert on agenttask.tasks
    referencing new table as new_rows for each statement execute function agenttask.count_queued();
create trigger tasks_count_queued_update after update on agenttask.tasks
    referencing old table as old_rows new table as new_rows for each statement execute function agenttask.count_queued();
create trigger tasks_count_queued_delete after delete on agenttask.tasks
    referencing old table as old_rows for each statement execute function agenttask.count_queued();
