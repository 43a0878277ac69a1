-- Bounded publishing: a result the broker keeps refusing is retried with backoff, then parked
-- (kept, never deleted) so it stops being retried and operators can see and re-queue it.
alter table agenttask.outbox
    add column next_attempt_at timestamptz not null default now(),
    add column last_error      text,
    add column parked_at       timestamptz,
    -- For the publisher's logs and for operators; null only for rows older than this column.
    add column tenant          text;

update agenttask.outbox o set tenant = t.tenant from agenttask.tasks t where t.task_id = o.message_id;

-- The publisher's claim: unparked rows, oldest first.
drop index agenttask.outbox_created;
create index outbox_unparked on agenttask.outbox (created_at) where parked_at is null;

-- What operators look at.
create view agenttask.parked_results as
select message_id as task_id, tenant, exchange, routing_key, correlation_id, phase, attempts, last_error,
       created_at, parked_at
from agenttask.outbox
where parked_at is not null;

-- Re-queues parked results (all of them, or one task's) for publishing now, with a fresh count
-- of attempts; returns how many. The row is still deleted only after the broker confirmed it,
-- so a re-queued result is published once, like any other.
create function agenttask.requeue_parked_results(only_task uuid default null) returns bigint
language sql as $$
    with requeued as (
        update agenttask.outbox
        set parked_at = null, attempts = 0, next_attempt_at = now()
        where parked_at is not null and (only_task is null or message_id = only_task)
        returning 1
    )
    select count(*) from requeued
$$;

-- Wake the publisher when rows are re-queued (inserts already do).
create trigger outbox_requeue_notify after update of parked_at on agenttask.outbox
    for each statement execute function agenttask.notify_outbox();
