-- Notify only the phase changes a listener acts on: Queued (the scheduler refetches that
-- tenant's queue), Pending (executors claim), Succeeded, Failed and Cancelled (capacity is back,
-- or a queue shrank). Scheduled and Running happen for every task and nobody waits for them;
-- Rejected is written by ingest (never queued) or by the scheduler itself. Each notification is
-- queued in Postgres and read and parsed by every listening service process, so under a flood
-- the silent phases were about half of all the notifications to no one's use.
create or replace function agenttask.notify_task_change() returns trigger language plpgsql as $$
begin
    -- "<phase>:<tenant>", so the scheduler refreshes only the tenant that changed.
    if new.phase in ('Queued', 'Pending', 'Succeeded', 'Failed', 'Cancelled') then
        perform pg_notify('agenttask_tasks', new.phase || ':' || new.tenant);
    end if;
    return null;
end $$;
